"""Quantized storage: exact int packing, bounded error, idempotent re-storing, smaller files."""

from __future__ import annotations

import pytest
import torch

from loramem import KVCache, LoramemError, compress, encode
from loramem.kv.quantize import dequantize, make_storage, quantize, round_trip


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("axis,group", [("token", 0), ("token", 4), ("channel", 0)])
def test_error_is_within_half_a_step(dtype, axis, group):
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0))
    storage = make_storage(dtype, axis, group, head_dim=16)
    y = round_trip(x, storage)
    qmax = 127 if dtype == "int8" else 7
    if axis == "channel":
        step = x.abs().amax(dim=1, keepdim=True) / qmax
    else:
        g = group or 16
        step = (x.reshape(3, 50, 16 // g, g).abs().amax(-1, keepdim=True) / qmax).expand(-1, -1, -1, g).reshape(x.shape)
    assert bool(((y - x).abs() <= step / 2 + 1e-6).all())
    assert torch.equal(round_trip(y, storage), y), "re-storing stored values must not drift"


def test_int4_packs_two_values_per_byte_exactly():
    x = torch.tensor([[[-7.0, -3.0, 0.0, 1.0, 2.0, 7.0]]])
    storage = make_storage("int4", "token", 0, head_dim=6)
    parts = quantize(x, storage)
    assert parts["q"].dtype == torch.uint8 and parts["q"].shape[-1] == 3
    assert torch.equal(dequantize(parts, storage, torch.float32), x)


@pytest.mark.parametrize(
    "dtype,group,dim,message",
    [
        ("int4", 0, 15, "even"),
        ("int8", 5, 16, "does not divide"),
        ("int3", 0, 16, "store_dtype: unknown 'int3'"),
    ],
)
def test_bad_storage_requests(dtype, group, dim, message):
    with pytest.raises(LoramemError, match=message):
        make_storage(dtype, "token", group, head_dim=dim)


def test_stored_cache_is_smaller_and_reloads_as_stored(tiny, doc_text):
    cache = encode(tiny, doc_text, presses=["knorm"])
    sizes = {}
    for dtype in ("native", "fp16", "int8", "int4"):
        stored = compress(cache, storage=make_storage(dtype, head_dim=cache.meta["head_dim"]))
        data = stored.to_bytes()
        back = KVCache.from_bytes(data)
        sizes[dtype] = stored.nbytes_stored
        for a, b in zip(stored.keys + stored.values, back.keys + back.values):
            assert torch.equal(a, b)
        assert back.meta["storage"]["dtype"] == dtype
    assert sizes["native"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
    # and eviction composes with storage: compress an int8 cache further
    small = compress(compress(cache, storage=make_storage("int8")), "knorm", ratio=0.5)
    assert small.storage.dtype == "int8" and small.kept_per_layer[0] < cache.n_tokens
