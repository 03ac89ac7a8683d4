"""docs/FORMAT.md against the code: KVCache.to_dynamic_cache, and the plain-transformers example that loads a cache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loramem import KVCache, compress, encode, generate
from loramem.kv.quantize import make_storage
from loramem.model.prompt import Framing, question_ids

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
QUESTION = "Who designed the lighthouse?"


def next_logits(lm, cache: KVCache, past) -> torch.Tensor:
    """Logits after the framed question, continued at the original document length."""
    ids = question_ids(lm.tokenizer, Framing.from_dict(cache.meta["framing"]), QUESTION, after_document=True)
    position = torch.arange(cache.n_tokens, cache.n_tokens + len(ids))[None]
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), past_key_values=past, position_ids=position).logits[0, -1]


def test_to_dynamic_cache_holds_the_dequantized_kept_states(tiny, doc_text, one_thread):
    cache = encode(tiny, doc_text, presses=["snapkv"])
    small = KVCache.from_bytes(compress(cache, "snapkv", ratio=0.5, storage=make_storage("int8")).to_bytes())
    past = small.to_dynamic_cache()
    assert len(past.layers) == small.n_layers
    for layer, (k, v) in enumerate(zip(small.keys, small.values)):
        assert past.layers[layer].keys.shape == (1, *k.shape)
        assert torch.equal(past.layers[layer].keys[0], k) and torch.equal(past.layers[layer].values[0], v)
    assert past.get_seq_length() == small.kept_per_layer[0] < small.n_tokens
    # Each call gives fresh tensors: decoding into one cache must not change the next.
    first = next_logits(tiny, small, small.to_dynamic_cache())
    assert torch.equal(first, next_logits(tiny, small, small.to_dynamic_cache()))
    # Continued at position n_tokens, it answers as loramem does.
    answer = generate(tiny, QUESTION, small, max_new_tokens=1)
    assert tiny.tokenizer.decode([int(first.argmax())], skip_special_tokens=True).strip() == answer.answer


def test_to_dynamic_cache_of_nothing_kept_is_empty(tiny, doc_text):
    cache = encode(tiny, doc_text, presses=["snapkv"], framing="raw")  # raw framing: no prefix tokens to keep
    empty = compress(cache, "snapkv", ratio=1.0)
    assert empty.to_dynamic_cache().get_seq_length() == 0
    assert compress(encode(tiny, doc_text, presses=["snapkv"]), "snapkv", ratio=1.0).to_dynamic_cache().get_seq_length()


def example_block() -> str:
    text = FORMAT_MD.read_text()
    section = text[text.index("## Loading a cache without loramem") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_format_md_example_loads_a_cache_into_plain_transformers(tiny, tiny_dir, doc_text, tmp_path, capsys):
    code = example_block()
    assert len(code.strip().splitlines()) <= 5
    assert not re.search(r"(import|from)\s+loramem", code)  # safetensors and transformers only
    cache = compress(encode(tiny, doc_text, presses=["snapkv"]), "snapkv", ratio=0.5)
    path = tmp_path / "doc.kv.safetensors"
    path.write_bytes(cache.to_bytes())
    namespace = {"CACHE": str(path), "MODEL": str(tiny_dir), "QUESTION": QUESTION}
    exec(compile(code, str(FORMAT_MD), "exec"), namespace)
    expected = next_logits(tiny, cache, cache.to_dynamic_cache())
    assert torch.allclose(namespace["logits"], expected, atol=1e-5)
    assert capsys.readouterr().out == tiny.tokenizer.decode(expected.argmax()) + "\n"


@pytest.mark.real
def test_format_md_example_on_the_default_model(real, doc_text, tmp_path):
    """The same block on the embedded model's converted copy, as a user would run it."""
    from loramem.model.loading import default_model_dir

    cache = compress(encode(real, doc_text, presses=["snapkv"]), "snapkv", ratio=0.5)
    path = tmp_path / "doc.kv.safetensors"
    path.write_bytes(cache.to_bytes())
    namespace = {"CACHE": str(path), "MODEL": str(default_model_dir()), "QUESTION": QUESTION}
    exec(compile(example_block(), str(FORMAT_MD), "exec"), namespace)
    expected = next_logits(real, cache, cache.to_dynamic_cache(real.device, real.dtype))
    assert int(namespace["logits"].argmax()) == int(expected.argmax())
