"""Shared fixtures: a tiny randomly initialised Llama (fast) and the real default model (slow, `real`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("LORAMEM_QUIET", "1")
REPO = Path(__file__).resolve().parent.parent
DEMO_DOC = REPO / "examples" / "demo" / "lighthouse.txt"

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_model(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """A 2-layer Llama with a ChatML template and a byte-level BPE tokenizer trained on the demo text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([DEMO_DOC.read_text()] * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small to share out: a second thread only adds waiting (worse on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer, other weights: a cache from it must be refused."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_other"), seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from loramem import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def real():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per session."""
    from loramem import load_model

    return load_model()


@pytest.fixture(scope="session")
def doc_text() -> str:
    return DEMO_DOC.read_text()


def run_cli(*args: str, input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `loramem` entry point in a subprocess, as a user's shell would."""
    env = {**os.environ, "LORAMEM_QUIET": "1"}
    return subprocess.run(
        [sys.executable, "-m", "loramem", *args], input=input, capture_output=True, env=env, cwd=cwd, timeout=600
    )
