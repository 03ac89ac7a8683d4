"""A transformers-free Llama for one-off answers from a stored cache.

Importing transformers costs a one-off `ask --cache` about 2.3 s of a ~3.5 s start (it pulls in torch.distributed,
dynamo and scipy). For the embedded default model (a plain Llama) this module computes what transformers'
LlamaForCausalLM computes, op for op, from the converted copy's safetensors, tokenizer.json and chat template, so
`ask --cache` needs only torch, tokenizers, safetensors and jinja2. Tests hold it to transformers: equal logits,
equal greedy answers, equal token ids, decoded text and rendered templates. Anything it does not cover (adapters,
other architectures, RoPE scaling, encoding) loads through transformers (`loading.load_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from loramem.model.attention import batched_attention

# What transformers' fast tokenizers do to decoded text when `clean_up_tokenization_spaces` is set, in its order.
_CLEAN_UP: tuple[tuple[str, str], ...] = tuple(
    (before, before.replace(" ", "", 1) if before != " ' " else "'")
    for before in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an added-token dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class LeanTokenizer:
    """The subset of a transformers fast tokenizer that answering uses, over the same tokenizer.json."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"
        self.chat_template: str | None = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.special_tokens = {name: _token_text(config.get(name)) for name in _SPECIAL}
        self.eos_token = self.special_tokens["eos_token"]
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(self.special_tokens["pad_token"])

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def __call__(self, text: str, *, add_special_tokens: bool = False, split_special_tokens: bool = False) -> dict:
        if add_special_tokens:
            raise ValueError("LeanTokenizer encodes without added special tokens only")
        self._tokenizer.encode_special_tokens = split_special_tokens
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=False).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def get_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = self._tokenizer.get_vocab(with_added_tokens=True)
        return vocab

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool = False, add_generation_prompt: bool = False, **kw: Any
    ) -> str:
        """The template rendered as transformers renders it (a sandboxed jinja2 environment with trim_blocks,
        lstrip_blocks, loop controls, raise_exception, strftime_now and a non-escaping tojson), as text."""
        if tokenize or not self.chat_template:
            raise ValueError("LeanTokenizer renders a chat template as text only")
        variables = {name: value for name, value in self.special_tokens.items() if value is not None}
        rendered: str = _compile(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **{**variables, **kw},
        )  # fmt: skip
        return rendered


def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)  # loramem passes a pinned date
    return env.from_string(template)


@dataclass
class LeanConfig:
    """The Llama config fields the forward and loramem's checks read."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    model_type: str = "llama"

    @classmethod
    def supported(cls, config: dict[str, Any]) -> LeanConfig | None:
        """The config if this module computes it exactly as transformers does, else None."""
        rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
        plain = (
            config.get("model_type") == "llama"
            and config.get("architectures", ["LlamaForCausalLM"]) == ["LlamaForCausalLM"]
            and rope.get("rope_type", "default") == "default"
            and not config.get("rope_scaling")
            and config.get("hidden_act", "silu") == "silu"
            and not config.get("attention_bias")
            and not config.get("mlp_bias")
            and config.get("pretraining_tp", 1) == 1
            and config.get("partial_rotary_factor", 1.0) == 1.0
        )
        if not plain:
            return None
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanAttention:
    """One layer's attention: projections and RoPE here, the attention itself is the batch engine's."""

    sliding_window = None

    def __init__(self, layer_idx: int, weights: dict[str, torch.Tensor], config: LeanConfig) -> None:
        self.layer_idx = layer_idx
        self.q, self.k, self.v, self.o = (weights[f"self_attn.{p}_proj.weight"] for p in "qkvo")
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any) -> torch.Tensor:
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        q = F.linear(hidden, self.q).view(shape).transpose(1, 2)
        k = F.linear(hidden, self.k).view(shape).transpose(1, 2)
        v = F.linear(hidden, self.v).view(shape).transpose(1, 2)
        q, k = (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
        k, v = cache.update(k, v, self.layer_idx)
        out, _ = batched_attention(self, q, k, v, None, scaling=self.scaling)
        return F.linear(out.reshape(*hidden.shape[:-1], -1).contiguous(), self.o)


class LeanLayer:
    def __init__(self, index: int, weights: dict[str, torch.Tensor], config: LeanConfig) -> None:
        self.self_attn = LeanAttention(index, weights, config)
        self.input_norm = weights["input_layernorm.weight"]
        self.post_norm = weights["post_attention_layernorm.weight"]
        self.gate, self.up, self.down = (weights[f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        self.eps = config.rms_norm_eps

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(_rms_norm(hidden, self.input_norm, self.eps), cos, sin, cache)
        normed = _rms_norm(hidden, self.post_norm, self.eps)
        return hidden + F.linear(F.silu(F.linear(normed, self.gate)) * F.linear(normed, self.up), self.down)


class LeanLlama:
    """LlamaForCausalLM's forward over the batch engine's cache (`loramem.model.presized.PresizedCache`) only."""

    uses_batched_attention = True  # its attention is the engine's already: nothing to switch

    def __init__(self, config: LeanConfig, weights: dict[str, torch.Tensor], eos_token_id: Any) -> None:
        self.config = config
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)
        self.embed = weights["model.embed_tokens.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        self.norm = weights["model.norm.weight"]
        layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            layers.append(
                LeanLayer(i, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, config)
            )
        self.model = SimpleNamespace(layers=layers)
        dim = config.head_dim
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(self.device)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    def __call__(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any,
        position_ids: torch.Tensor,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> SimpleNamespace:
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self._rope(position_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, past_key_values)
        hidden = _rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        return SimpleNamespace(logits=F.linear(hidden[:, -logits_to_keep:], self.lm_head))


def load_lean(folder: Path, device: str, dtype: torch.dtype) -> tuple[LeanLlama, LeanTokenizer] | None:
    """The model and tokenizer in `folder` without transformers, or None where this module does not cover it."""
    try:
        raw = json.loads((folder / "config.json").read_text())
        config = LeanConfig.supported(raw)
        weights_file, generation = folder / "model.safetensors", folder / "generation_config.json"
        if config is None or not weights_file.is_file() or not (folder / "tokenizer.json").is_file():
            return None
        # transformers' generation config: its own file, else the model config's
        eos = (json.loads(generation.read_text()) if generation.is_file() else raw).get("eos_token_id")
        tokenizer = LeanTokenizer(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from safetensors.torch import load_file

    weights = {name: t.to(device=device, dtype=dtype) for name, t in load_file(str(weights_file)).items()}
    try:
        model = LeanLlama(config, weights, eos)
    except KeyError:  # a weight this module expects is not in the file
        return None
    return model, tokenizer
