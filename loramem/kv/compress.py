"""compress: evict KV states by recorded press scores, as tensor work on the artifact (no model).

Per layer and KV head, the framing prefix (template tokens before the document) is always kept and
the top document tokens by score are kept; the count follows kvpress (`int(n * (1 - ratio))`,
at least 1 below ratio 1.0) and so does the selection (top-k). Top-k of one score row is nested:
what a higher ratio keeps is a subset of what a lower ratio keeps (tested, ties included).
Ratio 1.0 keeps no document token.
"""

from __future__ import annotations

import copy

import torch

from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.kv.cache import KVCache
from loramem.kv.presses import check_recorded
from loramem.kv.quantize import Storage, round_trip
from loramem.specs import CompressSpec
from loramem.vocab import EVICTION_PRESS


def n_kept(n_tokens: int, ratio: float) -> int:
    """Tokens kept at a compression ratio, exactly as kvpress counts them."""
    if ratio >= 1.0:
        return 0
    if ratio == 0:
        return n_tokens
    return max(1, int(n_tokens * (1 - ratio)))


def select(scores: torch.Tensor, n_protected: int, n_doc_kept: int, available: torch.Tensor | None) -> torch.Tensor:
    """Original positions kept per (layer, head): [L, H, n_protected + n_doc_kept], ascending.

    `available` masks tokens a previous compression already evicted (they cannot come back).
    """
    s = scores.to(torch.float32).clone()
    if available is not None:
        s[~available] = float("-inf")
    s[..., :n_protected] = float("inf")
    # torch.topk per layer on [1, H, N], exactly the call kvpress makes, so that ties (e.g. equal
    # key norms of repeated tokens at layer 0) are broken the same way kvpress breaks them.
    k = n_protected + n_doc_kept
    kept = torch.stack([s[layer : layer + 1].topk(k, dim=-1).indices[0] for layer in range(s.shape[0])])
    if available is not None and n_doc_kept > 0:
        picked = torch.gather(s, -1, kept)
        if torch.isinf(picked).logical_and(picked < 0).any():
            raise LoramemError(
                "this cache was already compressed further than asked; compress the original encoding instead"
            )
    return torch.sort(kept, dim=-1).values


def compress(
    cache: KVCache,
    press: str = EVICTION_PRESS,
    ratio: float | None = None,
    keep: int | None = None,
    scores_from: KVCache | None = None,
    storage: Storage | None = None,
) -> KVCache:
    """A new cache keeping the top tokens by `press` score, either a `ratio` evicted or `keep` tokens.

    `storage` (e.g. int8) re-stores the kept keys and values; with neither ratio nor keep given,
    nothing is evicted and only the storage changes.
    """
    CompressSpec.parse(  # the one rule of a compression request
        {"press": press, "ratio": ratio, "keep": keep, "store_dtype": storage.dtype if storage is not None else None}
    )
    if cache.masks is not None and (ratio is not None or keep is not None):
        raise LoramemError("a value-group cache cannot be evicted further; compress the original encoding")
    if ratio is None and keep is None:
        assert storage is not None  # checked above
        return stored_as(cache, storage)
    source = scores_from or cache
    if scores_from is not None:
        _check_same_document(cache, scores_from)
    check_recorded(press, source.scores)
    n_protected = int(cache.meta.get("n_protected", 0))
    n_doc = cache.n_tokens - n_protected
    if keep is not None:
        n_doc_kept = min(keep, n_doc)
    else:
        assert ratio is not None  # one of the two (checked above)
        n_doc_kept = n_kept(n_doc, float(ratio))
    available = None
    if cache.meta.get("compression"):
        available = torch.zeros(source.scores[press].shape, dtype=torch.bool)
        for layer, pos in enumerate(cache.positions):
            available[layer].scatter_(-1, pos.long(), True)
    positions = select(source.scores[press], n_protected, n_doc_kept, available)
    keys, values = [], []
    for layer, pos in enumerate(positions):
        index = torch.searchsorted(cache.positions[layer].long().contiguous(), pos.contiguous())
        gather = index.unsqueeze(-1).expand(-1, -1, cache.keys[layer].shape[-1])
        keys.append(cache.keys[layer].gather(1, gather))
        values.append(cache.values[layer].gather(1, gather))
    meta = copy.deepcopy(cache.meta)
    step = {
        "press": press,
        "ratio": ratio if ratio is None else float(ratio) + 0.0,  # + 0.0: -0.0 is recorded as 0.0
        "keep": keep,
        "n_doc_kept": n_doc_kept,
        "scores_from": {"adapter": scores_from.meta.get("adapter")} if scores_from else None,
    }
    meta["compression"] = step
    meta.setdefault("history", []).append(step)
    small = KVCache(
        keys=keys, values=values, positions=list(positions), token_ids=cache.token_ids, scores=cache.scores, meta=meta
    )
    return stored_as(small, storage) if storage is not None else small


def within_budget(cache: KVCache, press: str, room: int, storage: Storage | None = None) -> KVCache:
    """The press's top document tokens whose stored bytes fit in `room`.

    The framing tokens around the document (chat template, instructions) are kept as always and not counted: every
    answer needs them, with or without document memory, so a budget buys document tokens only. The compression
    step records `max_bytes` and `framing_bytes` (the stored size of the framing alone).
    """
    n_doc = cache.n_tokens - int(cache.meta.get("n_protected", 0))

    def kept(n: int) -> KVCache:
        return compress(cache, press, keep=n, storage=storage)

    empty = kept(0)
    framing = empty.nbytes_stored
    per_token = kept(1).nbytes_stored - framing if n_doc else 0
    n = 0 if per_token <= 0 else max(0, min(n_doc, room // per_token))
    small = kept(n)
    while n > 0 and small.nbytes_stored - framing > room:  # storage that does not grow linearly with tokens
        n = max(0, n - max(1, -(-(small.nbytes_stored - framing - room) // per_token)))
        small = kept(n)
    small.meta["compression"].update(max_bytes=room, framing_bytes=framing)
    return small


def stored_as(cache: KVCache, storage: Storage) -> KVCache:
    """The cache as it will be after storing with `storage` and loading again (quantization error included)."""
    meta = copy.deepcopy(cache.meta)
    meta["storage"] = storage.to_dict()
    return KVCache(
        keys=[round_trip(k, storage) for k in cache.keys],
        values=[round_trip(v, storage) for v in cache.values],
        positions=cache.positions,
        token_ids=cache.token_ids,
        scores=cache.scores,
        meta=meta,
        masks=cache.masks,
    )


def _check_same_document(cache: KVCache, other: KVCache) -> None:
    if cache.meta["model"].get("model") != other.meta["model"].get("model"):
        raise IncompatibleArtifactError("--scores-from is a cache of another base model")
    if not torch.equal(cache.token_ids, other.token_ids):
        raise LoramemError("--scores-from is a cache of another document or framing (token ids differ)")
    if other.n_layers != cache.n_layers or other.keys[0].shape[0] != cache.keys[0].shape[0]:
        raise IncompatibleArtifactError("--scores-from is a cache of another model shape (layers or KV heads differ)")
