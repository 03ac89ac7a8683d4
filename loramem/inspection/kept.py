"""Which tokens of its document a stored cache kept, per (layer, KV head) slot, and two caches of one document
compared slot by slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.kv.cache import KVCache
from loramem.specs import InspectSpec


def kept_grid(cache: KVCache) -> torch.Tensor:
    """[layers, heads, tokens]: the share of each slot's (token, group) pairs kept; 1 or 0 in a token-level cache."""
    heads = cache.positions[0].shape[0] if cache.n_layers else 0
    grid = torch.zeros(cache.n_layers, heads, cache.n_tokens)
    for layer, positions in enumerate(cache.positions):
        kept = cache.masks[layer].float().mean(-1) if cache.masks is not None else torch.ones(positions.shape)
        grid[layer].scatter_(1, positions.long(), kept)
    return grid


def token_texts(cache: KVCache) -> list[str] | None:
    """Each token's text, by the tokenizer that made the cache when it is on this machine (its tokenizer.json alone,
    checked against the vocabulary hash the cache records); None otherwise, and the map shows token ids."""
    from loramem.model.loading import local_file, vocab_sha256

    made = cache.meta.get("model", {})
    path = local_file(str(made.get("id") or ""), "tokenizer.json")
    if path is None:
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # tokenizers raises its own exception type for a file it cannot read
        return None
    if vocab_sha256(tokenizer.get_vocab(with_added_tokens=True)) != made.get("tokenizer_sha256"):
        return None
    return [tokenizer.decode([i], skip_special_tokens=False) for i in cache.token_ids.tolist()]


def token_label(texts: list[str] | None, token_ids: list[int], index: int) -> str:
    """A token as maps show it: its text when the tokenizer was at hand, else its id in brackets."""
    return texts[index] if texts is not None else f"[{token_ids[index]}]"


def _check_slot(spec: InspectSpec, grid: torch.Tensor) -> None:
    layers, heads = grid.shape[:2]
    if spec.layer is not None and spec.layer >= layers:
        raise LoramemError(f"--layer {spec.layer}: the cache has {layers} layers (0 to {layers - 1})")
    if spec.head is not None and spec.head >= heads:
        raise LoramemError(f"--head {spec.head}: the cache has {heads} KV heads (0 to {heads - 1})")


@dataclass
class KeptMap:
    """A cache's keep shares: per layer [layers, tokens] over the chosen heads, and per token over the chosen slots."""

    per_layer: torch.Tensor
    share: torch.Tensor
    grid: torch.Tensor
    token_ids: list[int]
    texts: list[str] | None
    framing_tokens: int
    groups: int
    storage: str
    layer: int | None
    head: int | None

    def label(self, index: int) -> str:
        return token_label(self.texts, self.token_ids, index)

    def slots(self) -> str:
        """Which slots the shares are over, in words."""
        layers = f"layer {self.layer}" if self.layer is not None else "all layers"
        heads = f"KV head {self.head}" if self.head is not None else "all KV heads"
        pairs = f" ({self.groups} value groups each: shares of (token, group) pairs)" if self.groups > 1 else ""
        return f"{layers}, {heads}{pairs}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "kept-map",
            "tokens_total": len(self.token_ids),
            "framing_tokens": self.framing_tokens,
            "layers": int(self.grid.shape[0]),
            "kv_heads": int(self.grid.shape[1]),
            "layer": self.layer,
            "head": self.head,
            "value_groups": self.groups if self.groups > 1 else None,
            "storage": self.storage,
            "decoded": self.texts is not None,
            "document_share_kept": round(float(self.share[self.framing_tokens :].mean()), 6),
            "tokens": [
                {
                    "index": i,
                    "id": self.token_ids[i],
                    "text": self.texts[i] if self.texts is not None else None,
                    "framing": i < self.framing_tokens,
                    "share": round(float(self.share[i]), 6),
                    "per_layer": [round(float(s), 6) for s in self.per_layer[:, i]],
                }
                for i in range(len(self.token_ids))
            ],
        }


def kept_map(cache: KVCache, spec: InspectSpec) -> KeptMap:
    """The keep shares a spec asks for: every slot, one layer, one head, or one (layer, head)."""
    grid = kept_grid(cache)
    _check_slot(spec, grid)
    heads = grid if spec.head is None else grid[:, spec.head : spec.head + 1]
    per_layer = heads.mean(1)
    chosen = per_layer if spec.layer is None else per_layer[spec.layer : spec.layer + 1]
    groups = int(cache.masks[0].shape[-1]) if cache.masks is not None else 1
    return KeptMap(
        per_layer=per_layer,
        share=chosen.mean(0),
        grid=grid,
        token_ids=cache.token_ids.tolist(),
        texts=token_texts(cache),
        framing_tokens=int(cache.meta.get("n_protected", 0)),
        groups=groups,
        storage=cache.storage.dtype,
        layer=spec.layer,
        head=spec.head,
    )


def check_same_document(a: KVCache, b: KVCache, sources: tuple[str, str]) -> None:
    """Two caches compare slot by slot only when one model made both from one document."""
    model_a, model_b = (c.meta.get("model", {}) for c in (a, b))
    if model_a.get("model") != model_b.get("model"):
        raise IncompatibleArtifactError(
            f"{sources[0]} and {sources[1]} were made by different models "
            f"({model_a.get('id', '?')}, {model_b.get('id', '?')}); compare caches of one model"
        )
    same_ids = a.n_tokens == b.n_tokens and bool(torch.equal(a.token_ids, b.token_ids))
    if not same_ids or a.meta["document"]["sha256"] != b.meta["document"]["sha256"]:
        raise IncompatibleArtifactError(
            f"{sources[0]} and {sources[1]} hold different documents; compare caches of one"
        )


def _jaccard(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> list[float]:
    union = (a | b).sum(dims)
    both = (a & b).sum(dims)
    return [round(float(i) / float(u), 6) if u else 1.0 for i, u in zip(both, union)]


def _describe(cache: KVCache) -> dict[str, Any]:
    step = cache.meta.get("compression") or {}
    return {key: step.get(key) for key in ("press", "ratio", "keep", "granularity", "budget")} | {
        "storage": cache.storage.dtype
    }


@dataclass
class Comparison:
    """Two caches of one document: per-layer overlap of their kept slots and tokens, and the tokens one alone kept."""

    sources: tuple[str, str]
    settings: tuple[dict[str, Any], dict[str, Any]]
    slot_jaccard: list[float]
    token_jaccard: list[float]
    only: tuple[list[list[int]], list[list[int]]]  # per layer, positions one cache's heads kept and the other's none
    only_anywhere: tuple[list[int], list[int]]  # positions some slot of one cache kept and no slot of the other
    difference: torch.Tensor  # [layers, tokens]: share of heads keeping a token in the first minus in the second
    texts: list[str] | None
    token_ids: list[int]
    framing_tokens: int

    def label(self, index: int) -> str:
        return token_label(self.texts, self.token_ids, index)

    def to_json(self) -> dict[str, Any]:
        def tokens(positions: list[int]) -> list[dict[str, Any]]:
            return [{"index": p, "id": self.token_ids[p], "text": self.label(p)} for p in positions]

        return {
            "kind": "kv-cache-comparison",
            "caches": [{"source": s, **d} for s, d in zip(self.sources, self.settings)],
            "tokens_total": len(self.token_ids),
            "framing_tokens": self.framing_tokens,
            "decoded": self.texts is not None,
            "layers": [
                {
                    "layer": layer,
                    "slot_jaccard": self.slot_jaccard[layer],
                    "token_jaccard": self.token_jaccard[layer],
                    "only_first": self.only[0][layer],
                    "only_second": self.only[1][layer],
                }
                for layer in range(len(self.slot_jaccard))
            ],
            "slot_jaccard_mean": round(sum(self.slot_jaccard) / len(self.slot_jaccard), 6)
            if self.slot_jaccard
            else 1.0,
            "only_first_anywhere": tokens(self.only_anywhere[0]),
            "only_second_anywhere": tokens(self.only_anywhere[1]),
        }


def compare_caches(a: KVCache, b: KVCache, sources: tuple[str, str]) -> Comparison:
    """Jaccard overlap per layer of the (head, position) slots each cache kept (a value-group slot counts when any
    of its groups is kept), and of the positions kept by any head."""
    check_same_document(a, b, sources)
    grid_a, grid_b = kept_grid(a), kept_grid(b)
    if grid_a.shape != grid_b.shape:
        raise IncompatibleArtifactError(f"{sources[0]} and {sources[1]} have different layers or KV heads")
    slots_a, slots_b = grid_a > 0, grid_b > 0
    tokens_a, tokens_b = slots_a.any(1), slots_b.any(1)

    def only(mine: torch.Tensor, theirs: torch.Tensor) -> list[list[int]]:
        return [torch.nonzero(m & ~t).flatten().tolist() for m, t in zip(mine, theirs)]

    anywhere_a, anywhere_b = tokens_a.any(0), tokens_b.any(0)

    return Comparison(
        sources=sources,
        settings=(_describe(a), _describe(b)),
        slot_jaccard=_jaccard(slots_a, slots_b, (1, 2)),
        token_jaccard=_jaccard(tokens_a, tokens_b, (1,)),
        only=(only(tokens_a, tokens_b), only(tokens_b, tokens_a)),
        only_anywhere=(only(anywhere_a[None], anywhere_b[None])[0], only(anywhere_b[None], anywhere_a[None])[0]),
        difference=grid_a.mean(1) - grid_b.mean(1),
        texts=token_texts(a),
        token_ids=a.token_ids.tolist(),
        framing_tokens=int(a.meta.get("n_protected", 0)),
    )
