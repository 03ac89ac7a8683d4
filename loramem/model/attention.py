"""The batched attention: every row's new columns over a document held once and over the rows' own columns.

Called as a transformers attention function (registered under ATTENTION, as transformers' `AttentionInterface`
takes custom ones) or directly by `loramem.model.lean`, always inside `attending(cache, model)`: transformers calls an
attention function with the layer's own query/key/value only, so the cache that holds the document and the masks
(anything that is a `BatchedKV`: `loramem.model.presized.PresizedCache`) reaches it through that block alone.
Query heads of one KV head are stacked as rows (no repeated keys); the rows of one document copy are stacked as
queries against it, so each step reads the document once whatever the batch size. The softmax over the document
and the new columns is assembled from the two parts' maxima and sums (the big score tensor is never copied); on
CPU in fp32 the document part runs through torch's fused attention and is merged in by its log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch

ATTENTION = "loramem_batched"

try:  # torch's fused CPU attention that also returns the log-sum-exp, so a second part can be merged in exactly
    _FLASH: Any = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # another torch: the plain products below
    _FLASH = None
SCORES_PER_CHUNK = 1 << 24  # attention scores held at once (64 MB in fp32): long question blocks go in chunks


class BatchedKV(Protocol):
    """What the batched attention reads of the cache its model runs over, per decoder layer."""

    def document(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's document keys and values, [1 (read by every row) or B, H, n_doc, d]."""
        ...

    def blocked(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Where the pass's query columns may NOT attend: over the document ([1 or B, 1 or H, 1, q, n_doc], None if
        nothing is blocked) and over the rows' own columns so far ([B, 1, 1, q, new])."""
        ...


_ACTIVE: ContextVar[BatchedKV | None] = ContextVar("loramem_batched_kv", default=None)


@contextmanager
def attending(cache: BatchedKV, model: Any) -> Iterator[None]:
    """Run `model` with the batched attention over `cache`: the one way the attention gets its cache. A transformers
    model is switched to it by name for the block; one with `uses_batched_attention` (`loramem.model.lean`'s) calls
    it already."""
    token = _ACTIVE.set(cache)
    switch = not getattr(model, "uses_batched_attention", False)
    if switch:
        register()
        before = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)
        _ACTIVE.reset(token)


def batched_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Grouped-query attention of the batch's new columns over the shared document and each row's own columns.

    `key`/`value` are the rows' question/answer columns so far; the document's keys/values are the layer's, held
    once for all rows, so each step reads them once whatever the batch size. Masks are the active cache's (the
    model's own is unused)."""
    cache = _ACTIVE.get()
    assert cache is not None, "the batched attention runs only inside attending()"
    doc_keys, doc_values = cache.document(module.layer_idx)
    doc_blocked, new_blocked = cache.blocked(module.layer_idx)
    b, n_q, q_len, d = query.shape
    n_kv = key.shape[1]
    rep = n_q // n_kv
    scale = scaling if scaling is not None else d**-0.5
    step = max(1, SCORES_PER_CHUNK // max(1, b * n_q * (doc_keys.shape[2] + key.shape[2])))
    parts = [
        _attend(
            query[:, :, start : start + step] * scale,
            (doc_keys, doc_values),
            key,
            value,
            None if doc_blocked is None else doc_blocked[..., start : start + step, :],
            new_blocked[..., start : start + step, :],
            rep,
            softcap,
        )
        for start in range(0, q_len, step)
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _attend(
    query: torch.Tensor,
    document: tuple[torch.Tensor, torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    doc_blocked: torch.Tensor | None,
    new_blocked: torch.Tensor,
    rep: int,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of scaled `query` [B, n_q, q, d] over the document then the new columns; [B, n_q, q, d].

    The document's scores are the big tensor ([docs, H, rows * rep * q, n_doc]): they are computed once in the
    layout that reads each document copy once, exponentiated in place and never copied; the softmax over the
    document and the new columns together is assembled from the two parts' maxima and sums."""
    b, n_q, q_len, d = query.shape
    doc_keys, doc_values = document
    n_kv, docs, n_doc = key.shape[1], doc_keys.shape[0], doc_keys.shape[2]
    per_doc = b // docs  # rows reading each document copy: every row when they share one, else 1
    grouped = query.reshape(b, n_kv, rep, q_len, d)  # query head h * rep + r reads KV head h

    def to_rows(t: torch.Tensor) -> torch.Tensor:  # [docs, H, per_doc * rep * q, x] -> [B, H, rep, q, x]
        return t.view(docs, n_kv, per_doc, rep, q_len, -1).transpose(1, 2).reshape(b, n_kv, rep, q_len, -1)

    # a KV head's query heads as rows of one product (no copy of its keys per query head): [B, H, rep, q, new]
    own = (grouped.reshape(b, n_kv, rep * q_len, d) @ key.transpose(-1, -2)).view(b, n_kv, rep, q_len, -1)
    if softcap is not None:
        own = torch.tanh(own / softcap) * softcap
    own = own.float().masked_fill_(new_blocked, float("-inf"))
    peak = own.amax(-1, keepdim=True)  # finite: every column may attend to itself
    doc_sum = doc_out = None
    if n_doc:
        # the rows of one document copy stacked as queries: [docs, H, per_doc * rep * q, d], its keys read once
        stacked = grouped.view(docs, per_doc, n_kv, rep, q_len, d).transpose(1, 2)
        stacked = stacked.reshape(docs, n_kv, per_doc * rep * q_len, d)
        fused = _FLASH is not None and query.device.type == "cpu" and query.dtype == torch.float32
        if fused and doc_blocked is None and softcap is None:  # no scores held; merged in by its log-sum-exp
            doc_out, lse = _FLASH(stacked, doc_keys, doc_values, 0.0, False, scale=1.0)
            lse = to_rows(lse[..., None])
            peak = torch.maximum(peak, lse)
            doc_sum = (lse - peak).exp_()
            doc_out = to_rows(doc_out) * doc_sum
        if doc_sum is None:
            doc = stacked @ doc_keys.transpose(-1, -2)
            if softcap is not None:
                doc = torch.tanh(doc / softcap) * softcap
            doc = doc.float()
            if doc_blocked is not None:  # [1 or B, 1 or H, 1, q, n] -> broadcast over [docs, H, per_doc, rep, q, n]
                blocked = doc_blocked.reshape(doc_blocked.shape[0], doc_blocked.shape[1], q_len, n_doc)
                if blocked.shape[0] == b and b > 1:
                    blocked = blocked.view(docs, per_doc, blocked.shape[1], q_len, n_doc).transpose(1, 2)
                else:
                    blocked = blocked[:, :, None]
                doc.view(docs, n_kv, per_doc, rep, q_len, n_doc).masked_fill_(blocked[:, :, :, None], float("-inf"))
            peak = torch.maximum(peak, to_rows(doc.amax(-1, keepdim=True)))
            stacked_peak = peak.view(docs, per_doc, n_kv, rep, q_len, 1).transpose(1, 2)
            doc.view(docs, n_kv, per_doc, rep, q_len, n_doc).sub_(stacked_peak).exp_()
            doc_sum = to_rows(doc.sum(-1, keepdim=True))
            doc_out = to_rows(doc.to(query.dtype) @ doc_values)
    own = own.sub_(peak).exp_()
    total = own.sum(-1, keepdim=True)
    out = (own.to(query.dtype).view(b, n_kv, rep * q_len, -1) @ value).view(b, n_kv, rep, q_len, -1)
    if doc_sum is not None and doc_out is not None:
        total = total + doc_sum
        out = out + doc_out
    return (out / total.to(out.dtype)).reshape(b, n_q, q_len, -1)


def register() -> None:
    """Make the batched attention known to transformers (for models switched to it by name)."""
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, batched_attention)
