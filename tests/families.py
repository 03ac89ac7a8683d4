"""The model families the paper and its readers use, as tiny random models built offline from configs.

Each family keeps what makes it differ from a plain Llama (RoPE scaling, qkv bias, qk-norm, fused qkv and
gate-up projections, sliding-window attention, logit softcapping) and a chat template of its family's shape
(Llama-3.2's date stamp, Qwen3's thinking switch, Mistral's [INST] turns without a system role, Gemma's
"model" turns). All share the default model's tokenizer, with the family's special tokens added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
    "{%- endif %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3's shape: no default system turn, the last assistant turn carries its (possibly empty) think block, and the
# generation prompt gets an empty think block only when enable_thinking is false.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# The same tokens without the thinking switch: plain ChatML, for comparison.
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}{%- endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Family:
    """A family: its config (given the vocabulary and special-token ids), template, tokens and what it exercises."""

    name: str
    config: Callable[[dict[str, Any]], Any]
    template: str
    bos: str
    eos: str
    tokens: tuple[str, ...]
    traits: str
    extra_tokens: tuple[str, ...] = ()  # added as ordinary tokens (Qwen3's <think> is not special)


def _llama3(common: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    return LlamaConfig(**common, rope_parameters=rope)


def _qwen25(common: dict[str, Any]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**common, use_sliding_window=False)


def _qwen3(common: dict[str, Any]) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**common)


def _mistral(common: dict[str, Any]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**common, sliding_window=4096)


def _phi3(common: dict[str, Any]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**{k: v for k, v in common.items() if k != "head_dim"})


def _gemma2(common: dict[str, Any]) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        **common,
        sliding_window=64,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "llama3",
            _llama3,
            LLAMA3_TEMPLATE,
            "<|begin_of_text|>",
            "<|eot_id|>",
            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "llama3 RoPE scaling, date-stamped template",
        ),
        Family(
            "qwen2.5",
            _qwen25,
            QWEN25_TEMPLATE,
            "<|im_start|>",
            "<|im_end|>",
            ("<|im_start|>", "<|im_end|>"),
            "qkv bias, ChatML with a default system turn",
        ),
        Family(
            "qwen3",
            _qwen3,
            QWEN3_TEMPLATE,
            "<|im_start|>",
            "<|im_end|>",
            ("<|im_start|>", "<|im_end|>"),
            "qk-norm, thinking template (enable_thinking)",
            extra_tokens=("<think>", "</think>"),
        ),
        Family(
            "mistral",
            _mistral,
            MISTRAL_TEMPLATE,
            "<s>",
            "</s>",
            ("<s>", "</s>", "[INST]", "[/INST]"),
            "sliding-window config, [INST] turns, no system role",
        ),
        Family(
            "phi3",
            _phi3,
            PHI3_TEMPLATE,
            "<s>",
            "<|endoftext|>",
            ("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            "fused qkv_proj and gate_up_proj",
        ),
        Family(
            "gemma2",
            _gemma2,
            GEMMA_TEMPLATE,
            "<bos>",
            "<eos>",
            ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
            "sliding window 64 on alternate layers, attention and final logit softcapping",
        ),
    )
}


def default_tokenizer() -> Any:
    """A fresh copy of the embedded default model's tokenizer."""
    from transformers import AutoTokenizer

    from loramem.model.loading import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def family_tokenizer(family: Family, template: str | None = None) -> Any:
    """The default tokenizer with the family's special tokens, BOS/EOS and chat template."""
    tok = default_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(family.tokens)})
    if family.extra_tokens:
        tok.add_tokens(list(family.extra_tokens))
    tok.bos_token, tok.eos_token = family.bos, family.eos
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = family.template if template is None else template
    return tok


def make_family_model(family: Family, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of the family with its tokenizer in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = family_tokenizer(family)
    common = {
        **SHAPE,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family.config(common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
