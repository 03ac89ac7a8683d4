"""A decoding batch's documents: each layer's part of the stored caches its rows read, put on the device.

Rows sharing a cache share one copy of it; leading tokens that every question over a shared document begins with
(the instruction; a closed-book chat prefix) are computed once, in a one-row pass, and held with the document.
A stored cache is anything shaped as `DocumentKV` (`loramem.kv.cache.KVCache` is): this layer reads its tensors and
knows nothing of the artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from loramem.model.attention import attending
from loramem.model.presized import Doc, PresizedCache, assemble, decoder_attentions
from loramem.model.prompt import common_prefix


class DocumentKV(Protocol):
    """What decoding reads of a stored document cache, per layer: kept keys/values [H, n, d], their original
    positions [H, n], per-head kept masks (value groups) or None; and the document's original length."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    masks: list[torch.Tensor] | None

    @property
    def n_tokens(self) -> int: ...

    @property
    def kept_per_layer(self) -> list[int]: ...


# What a batch's rows read: one cache (or None: no document) shared by every row, or one per row.
Rows = DocumentKV | None | Sequence[DocumentKV | None]


def row_caches(cache: Rows, rows: int) -> list[DocumentKV | None]:
    """One cache per row: `cache` is one shared by every row (None: no document), or a list of them, one per row."""
    if isinstance(cache, Sequence):
        if len(cache) != rows:
            raise ValueError(f"{len(cache)} caches for {rows} rows")
        return list(cache)
    return [cache] * rows


def _layer_doc(
    caches: list[DocumentKV | None], index: int, n_kv: int, head_dim: int, device: Any, dtype: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's document part for every row: keys, values [1 or B, H, n, D], kept positions and kept mask
    [1 or B, H, n] (None: every row keeps all n). Rows sharing a cache share its copy; shorter rows are zero-padded
    (zeros, not garbage: a masked key must still give a finite score) and masked."""
    distinct = {id(c): c for c in caches if c is not None and c.kept_per_layer[index] > 0}
    kept = {key: c.kept_per_layer[index] for key, c in distinct.items()}
    n_doc = max(kept.values(), default=0)
    if not distinct:
        empty = torch.zeros(1, n_kv, 0, head_dim, device=device, dtype=dtype)
        return empty, empty, torch.zeros(1, n_kv, 0, dtype=torch.long, device=device), None
    if len(distinct) == 1 and all(c is not None and id(c) in distinct for c in caches):
        # the one-document case: one copy, broadcast to every row when the buffer is filled
        (only,) = distinct.values()
        present = only.masks[index].any(-1)[None].to(device) if only.masks is not None else None
        return (
            only.keys[index][None].to(device, dtype),
            only.values[index][None].to(device, dtype),
            only.positions[index][None].to(device),
            present,
        )
    rows = len(caches)
    values_dim = next(iter(distinct.values())).values[index].shape[-1]
    keys = torch.zeros(rows, n_kv, n_doc, head_dim, device=device, dtype=dtype)
    values = torch.zeros(rows, n_kv, n_doc, values_dim, device=device, dtype=dtype)
    positions = torch.zeros(rows, n_kv, n_doc, dtype=torch.long, device=device)
    present = torch.zeros(rows, n_kv, n_doc, dtype=torch.bool, device=device)
    for key, c in distinct.items():
        mine = torch.tensor([row for row, other in enumerate(caches) if id(other) == key], device=device)
        n = kept[key]
        keys[mine, :, :n] = c.keys[index].to(device, dtype)
        values[mine, :, :n] = c.values[index].to(device, dtype)
        positions[mine, :, :n] = c.positions[index].to(device, torch.long)
        present[mine, :, :n] = c.masks[index].any(-1).to(device) if c.masks is not None else True
    return keys, values, positions, present


def _documents(model: Any, caches: list[DocumentKV | None], device: Any, dtype: Any) -> list[Doc]:
    """Each layer's document part for these rows (`_layer_doc`)."""
    config = model.config
    n_kv = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = len(decoder_attentions(model))
    return [_layer_doc(caches, index, n_kv, head_dim, device, dtype) for index in range(layers)]


def row_documents(model: Any, cache: Rows, rows: int, device: Any, dtype: Any) -> tuple[list[Doc], torch.Tensor]:
    """Each layer's document part for `rows` rows over `cache` (`row_caches`), and the original position where
    each row's own tokens start (its document's length)."""
    caches = row_caches(cache, rows)
    starts = torch.tensor([c.n_tokens if c is not None else 0 for c in caches], device=device)
    return _documents(model, caches, device, dtype), starts


def build_cache(model: Any, cache: Rows, prompts: list[list[int]], room: int, device: Any, dtype: Any) -> PresizedCache:
    """A pre-sized batch cache for left-padded `prompts` over `cache` (`Rows`)."""
    docs, starts = row_documents(model, cache, len(prompts), device, dtype)
    return assemble(model, docs, prompts, starts, room)


def one_cache(caches: Sequence[DocumentKV | None]) -> bool:
    """Every row reads the same cache (or every row none): the engine then holds one copy of it."""
    return all(c is caches[0] for c in caches)


def shared_lead(prompts: list[list[int]], cache: Rows) -> int:
    """How many leading tokens every prompt shares, when every row reads one document (or none): those are computed
    once and held with the document. At least one token of each prompt is left to the batch's own pass."""
    if len(prompts) < 2 or not one_cache(row_caches(cache, len(prompts))):
        return 0
    return common_prefix(prompts, min(len(p) for p in prompts) - 1)


def lead_document(
    model: Any, cache: Rows, lead: list[int], rows: int, device: Any, dtype: Any
) -> tuple[list[Doc], torch.Tensor]:
    """The rows' one document extended by their shared leading tokens, computed in a one-row pass; and the original
    position where each row's own tokens start."""
    first = row_caches(cache, rows)[0]
    docs, start = row_documents(model, first, 1, device, dtype)
    one = assemble(model, docs, [lead], start, len(lead))
    with attending(one, model):
        one.prepare(len(lead))
        model(
            input_ids=torch.tensor([lead], device=device),
            past_key_values=one,
            position_ids=one.new_positions,
            cache_position=torch.arange(len(lead), device=device),
            use_cache=True,
            logits_to_keep=1,
        )
    extended = []
    for (keys, values, positions, present), layer in zip(docs, one.layers):
        heads = keys.shape[1]
        extended.append(
            (
                torch.cat([keys, layer.keys], dim=2),
                torch.cat([values, layer.values], dim=2),
                torch.cat([positions, one.new_positions[:, None].expand(1, heads, -1)], dim=2),
                None if present is None else torch.cat([present, present.new_ones(1, heads, len(lead))], dim=2),
            )
        )
    return extended, (start + len(lead)).expand(rows)
