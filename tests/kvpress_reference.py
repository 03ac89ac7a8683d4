"""What kvpress itself keeps when it compresses a prefill: the reference loramem must equal."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from loramem.kv.presses import make_kvpress


def kvpress_keep(lm, cache, press: str, ratio: float):
    """Per layer: (kept original positions [H, n] ascending, keys, values) under kvpress's own press.

    kvpress stores kept keys in score order; each is located in the uncompressed prefill (`cache`,
    unevicted) by an integer hash of the key row's bits (exact, unlike a float projection), then
    checked for exact equality.
    """
    small = DynamicCache()
    with torch.inference_mode(), make_kvpress(press, ratio)(lm.model):
        lm.model.model(input_ids=cache.token_ids[None].to(lm.device), past_key_values=small, use_cache=True)
    probe = torch.randint(1, 2**31, (cache.keys[0].shape[-1],), generator=torch.Generator().manual_seed(0)) * 2 + 1

    def signature(rows: torch.Tensor) -> torch.Tensor:
        bits = rows.float().contiguous().view(torch.int32).long()
        return (bits * probe).sum(-1)

    result = []
    for layer, kept_layer in enumerate(small.layers):
        keys_full, keys_kept = cache.keys[layer], kept_layer.keys[0].to("cpu")
        sig_full, sig_kept = signature(keys_full), signature(keys_kept)
        order = sig_full.sort(-1)
        found = torch.searchsorted(order.values, sig_kept).clamp(max=sig_full.shape[-1] - 1)
        positions = order.indices.gather(-1, found)
        assert torch.equal(cache.keys[layer].gather(1, positions.unsqueeze(-1).expand_as(keys_kept)), keys_kept)
        ordered = positions.sort(-1)
        gather = ordered.indices.unsqueeze(-1).expand_as(keys_kept)
        result.append((ordered.values, keys_kept.gather(1, gather), kept_layer.values[0].to("cpu").gather(1, gather)))
    return result


def assert_agrees(lm, cache, small, press: str, ratio: float) -> None:
    """loramem's kept positions, keys and values equal kvpress's for every layer and head."""
    for layer, (positions, keys, values) in enumerate(kvpress_keep(lm, cache, press, ratio)):
        assert torch.equal(small.positions[layer].long(), positions), (
            f"{press}@{ratio}: positions differ, layer {layer}"
        )
        assert torch.equal(small.keys[layer], keys), f"{press}@{ratio}: keys differ at layer {layer}"
        assert torch.equal(small.values[layer], values), f"{press}@{ratio}: values differ at layer {layer}"
