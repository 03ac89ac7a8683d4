"""The cache artifact: round trip, and every way a file can be wrong."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from loramem import KVCache, LoramemError, encode
from loramem.errors import IncompatibleArtifactError
from loramem.kv.cache import check_compatible


@pytest.fixture(scope="module")
def cache(tiny, doc_text):
    return encode(tiny, doc_text)


def test_round_trip_keeps_every_tensor_and_the_metadata(cache):
    back = KVCache.from_bytes(cache.to_bytes())
    assert back.meta == cache.meta
    assert torch.equal(back.token_ids, cache.token_ids)
    for a, b in zip(cache.keys + cache.values + cache.positions, back.keys + back.values + back.positions):
        assert torch.equal(a, b.to(a.dtype))
    assert set(back.scores) == {"snapkv", "expected_attention", "knorm", "streaming_llm", "tova", "random"}


def test_metadata_records_provenance(cache, tiny):
    meta = cache.meta
    assert meta["model"]["model"] == tiny.fingerprint["model"]
    assert meta["n_tokens"] == cache.n_tokens == len(cache.token_ids)
    assert meta["framing"]["style"] == "chat" and meta["n_protected"] > 0
    for key in ("format_version", "loramem_version", "rope", "document", "dtype", "created", "adapter"):
        assert key in meta
    assert len(meta["document"]["sha256"]) == 64


def test_truncated_file_is_refused(cache):
    data = cache.to_bytes()
    with pytest.raises(LoramemError, match="truncated"):
        KVCache.from_bytes(data[: len(data) // 2])


def test_not_safetensors_is_refused():
    with pytest.raises(LoramemError, match="not a safetensors"):
        KVCache.from_bytes(b"hello, this is plain text and not a cache at all")


def test_other_safetensors_is_refused():
    from safetensors.torch import save

    with pytest.raises(LoramemError, match="not a loramem KV cache"):
        KVCache.from_bytes(save({"x": torch.zeros(2)}))


def test_unknown_format_version_is_refused(cache):
    data = cache.to_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["loramem"])
    meta["format_version"] = 99
    header["__metadata__"]["loramem"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with pytest.raises(IncompatibleArtifactError, match="version 99"):
        KVCache.from_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def test_cache_of_another_model_is_refused(cache, other_tiny_dir):
    from loramem import load_model

    other = load_model(str(other_tiny_dir))
    with pytest.raises(IncompatibleArtifactError, match="another model"):
        check_compatible(cache, other.fingerprint)


def test_document_longer_than_context_needs_truncate(tiny):
    long_doc = "The lighthouse keeper wrote in the logbook. " * 200
    with pytest.raises(LoramemError, match="--truncate"):
        encode(tiny, long_doc, presses=["knorm"])
    cut = encode(tiny, long_doc, presses=["knorm"], truncate=True)
    assert cut.meta["truncated"] and cut.n_tokens <= tiny.max_length


def test_empty_document_is_refused(tiny):
    with pytest.raises(LoramemError, match="empty"):
        encode(tiny, "  \n ")
