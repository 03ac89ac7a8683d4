"""What kvpress itself keeps when it compresses a prefill: the reference loramem must equal."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from loramem import compress
from loramem.kv.presses import make_kvpress


def kvpress_prefills(lm, cache, settings: Sequence[tuple[str, float]]) -> list[DynamicCache]:
    """The compressed prefill cache kvpress produces for each (press, ratio), from one forward pass.

    The first setting's press runs as kvpress runs it (its context manager's hooks). kvpress compresses only the
    cache, never a layer's output, so every setting's prefill computes the same layer inputs: each further press
    runs its own `forward_hook` on those inputs, over its own cache holding the layer's uncompressed keys and
    values (this hook is registered first, so it runs before the first press has evicted anything).
    `test_one_prefill_equals_a_prefill_per_setting` checks that this equals separate prefills.
    """
    presses = [make_kvpress(press, ratio) for press, ratio in settings]
    caches = [DynamicCache() for _ in settings]
    for other in presses[1:]:
        other.post_init_from_model(lm.model)

    def fan_out(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        for other, own in zip(presses[1:], caches[1:]):
            own.update(layer.keys.clone(), layer.values.clone(), module.layer_idx)
            other.forward_hook(module, args, {**kwargs, "past_key_values": own}, output)
        return output

    base = lm.model.model
    hooks = [layer.self_attn.register_forward_hook(fan_out, with_kwargs=True) for layer in base.layers]
    try:
        with torch.inference_mode(), presses[0](lm.model):
            base(input_ids=cache.token_ids[None].to(lm.device), past_key_values=caches[0], use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return caches


def kvpress_keep(cache, small: DynamicCache):
    """Per layer: (kept original positions [H, n] ascending, keys, values) of kvpress's compressed prefill `small`.

    kvpress stores kept keys in score order; each is located in the uncompressed prefill (`cache`,
    unevicted) by an integer hash of the key row's bits (exact, unlike a float projection), then
    checked for exact equality.
    """
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


def assert_keeps_what_kvpress_keeps(cache, press: str, ratio: float, small: DynamicCache) -> None:
    """loramem's compression of `cache` keeps the positions, keys and values of kvpress's prefill `small`, for
    every layer and head."""
    ours = compress(cache, press, ratio=ratio)
    for layer, (positions, keys, values) in enumerate(kvpress_keep(cache, small)):
        assert torch.equal(ours.positions[layer].long(), positions), f"{press}@{ratio}: positions differ, layer {layer}"
        assert torch.equal(ours.keys[layer], keys), f"{press}@{ratio}: keys differ at layer {layer}"
        assert torch.equal(ours.values[layer], values), f"{press}@{ratio}: values differ at layer {layer}"


def assert_agrees(lm, cache, press: str, ratios: Sequence[float]) -> None:
    """loramem's kept positions, keys and values equal kvpress's for every ratio, layer and head."""
    for ratio, small in zip(ratios, kvpress_prefills(lm, cache, [(press, ratio) for ratio in ratios])):
        assert_keeps_what_kvpress_keeps(cache, press, ratio, small)
