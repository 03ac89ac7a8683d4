"""Value-group eviction: compression inside a token (the sub-token routing seed).

Each value head vector is split into G contiguous channel groups; under a budget B (the fraction
of document value bytes kept) the best (token, group) pairs are kept per layer and KV head. A
token keeps its key when at least one of its groups survives. Dropped groups contribute nothing
to attention outputs (their values are zero), and a head attends only to the tokens it kept, so
heads may keep different tokens: `head_masks` adds that per-head restriction to attention.

Query-agnostic score ("norm", the default): the token's rank under the recorded press score,
times the group's share of the token's value norm. "uniform" ignores the share (token-level
eviction in group units).

Query-aware score ("query", `query_group_scores`): the model runs each framed question over the
full cache exactly as `generate` would (at the document's original positions, so RoPE matches);
each layer's attention of the question to every document token is averaged over the query heads
of a KV group and over the question tokens, then over the questions. A (token, group) pair scores
attention x the L2 norm of that value group: the size of the group's contribution to the
question's attention output. The same per-layer, per-head budget then keeps the top pairs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from loramem.errors import LoramemError
from loramem.kv.cache import KVCache
from loramem.kv.presses import check_recorded
from loramem.model.loading import LoadedModel, sha256_text
from loramem.model.prompt import Framing, question_ids
from loramem.specs import CompressSpec
from loramem.specs.base import refuse

QUERY_RULE = (
    "attention of the framed question(s) to the token (mean over the query heads of the KV group, "
    "the question tokens and the questions) x L2 norm of the value group"
)


@dataclass
class QueryScores:
    """(token, group) relevance to some questions, [H, n_doc, groups] per layer, with what they were computed for."""

    pairs: list[torch.Tensor]
    questions_sha256: str
    n_questions: int


def pair_scores(token_scores: torch.Tensor, values: torch.Tensor, groups: int, rule: str) -> torch.Tensor:
    """[H, N, G] score of each (token, group) pair from token scores [H, N] and values [H, N, D]."""
    h, n, d = values.shape
    rank = token_scores.argsort(-1).argsort(-1).float().add(1) / n  # (0, 1], higher = more important
    if rule == "uniform":
        return rank.unsqueeze(-1).expand(h, n, groups).clone()
    norms = values.float().reshape(h, n, groups, d // groups).norm(dim=-1)
    share = norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)
    return rank.unsqueeze(-1) * share


def _check_cache(cache: KVCache, groups: int, query: bool) -> None:
    head_dim = int(cache.meta["head_dim"])
    if groups <= 0 or head_dim % groups:
        refuse(f"{groups} does not divide the head dimension {head_dim}", "groups")
    if cache.meta.get("compression") or cache.masks is not None:
        raise LoramemError("value-group eviction needs an uncompressed cache (the output of encode)")
    if query and cache.meta.get("adapter"):
        raise LoramemError("query scoring runs the base model, but this cache was encoded with an adapter")


def check_groups(cache: KVCache, press: str, groups: int, rule: str, query: bool) -> None:
    """Refuse value groups this cache cannot give (a budget and rule are the CompressSpec's to check) before the
    query rule loads a model."""
    if rule == "query" and not query:
        refuse("query needs questions to score the groups by (or their scores)", "score_groups", "query")
    if query and rule != "query":
        refuse(f"{rule} does not use a question; drop the questions or score groups by query", "score_groups")
    _check_cache(cache, groups, query)
    if rule != "query":
        check_recorded(press, cache.scores)


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Only eager attention materializes the attention weights; the model's own implementation comes back after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def query_group_scores(lm: LoadedModel, cache: KVCache, questions: list[str], groups: int) -> QueryScores:
    """Relevance of each (token, group) pair to `questions`: their attention to the token x the group's value norm.

    Each framed question runs over the full stored cache as `generate` would run it; per layer, the
    attention weights to document tokens are averaged over the query heads of each KV head and over
    the question tokens, then over the questions (see the module docstring).
    """
    _check_cache(cache, groups, query=True)
    if not questions:
        raise LoramemError("no question given for query-aware scoring")
    protected = int(cache.meta.get("n_protected", 0))
    n_kv = cache.keys[0].shape[0]
    frame = Framing.from_dict(cache.meta["framing"])
    attention = torch.zeros(cache.n_layers, n_kv, cache.n_tokens - protected)

    def record(module: Any, args: tuple, output: tuple) -> None:
        weights = output[1][0, :, :, protected : cache.n_tokens].float()  # [heads, question, doc]
        rep = weights.shape[0] // n_kv  # query heads h * rep ... h * rep + rep - 1 share KV head h
        per_kv = weights.reshape(n_kv, rep, *weights.shape[1:]).mean(dim=(1, 2))
        attention[module.layer_idx] += per_kv.cpu() / len(questions)

    hooks = [layer.self_attn.register_forward_hook(record) for layer in _decoder_layers(lm.model)]
    try:
        with torch.inference_mode(), _eager_attention(lm.model):
            for question in questions:
                ids = question_ids(lm.tokenizer, frame, question, after_document=True)
                position = torch.arange(cache.n_tokens, cache.n_tokens + len(ids), device=lm.device)[None]
                lm.model.model(
                    input_ids=torch.tensor([ids], device=lm.device),
                    position_ids=position,
                    past_key_values=cache.to_dynamic_cache(lm.device, lm.dtype),
                    use_cache=True,
                )
    finally:
        for hook in hooks:
            hook.remove()
    pairs = []
    for layer in range(cache.n_layers):
        v = cache.values[layer][:, protected:].float()
        norms = v.reshape(n_kv, v.shape[1], groups, -1).norm(dim=-1)
        pairs.append(attention[layer].unsqueeze(-1) * norms)
    return QueryScores(
        pairs=pairs, questions_sha256=sha256_text(json.dumps(questions, ensure_ascii=False)), n_questions=len(questions)
    )


def compress_value_groups(
    cache: KVCache, press: str, groups: int, budget: float, rule: str = "norm", scores: QueryScores | None = None
) -> KVCache:
    """A cache keeping the top (token, group) pairs under `budget`; framing tokens keep everything.

    Rule "query" takes its pair scores from `scores` (`query_group_scores`); the others from `press`.
    """
    CompressSpec.parse(
        {"press": press, "granularity": "value-group", "groups": groups, "budget": budget, "score_groups": rule}
    )
    check_groups(cache, press, groups, rule, query=scores is not None)
    protected = int(cache.meta.get("n_protected", 0))
    n_doc = cache.n_tokens - protected
    n_pairs = round(budget * n_doc * groups)
    width = int(cache.meta["head_dim"]) // groups
    keys, values, positions, masks = [], [], [], []
    for layer in range(cache.n_layers):
        v = cache.values[layer]
        if scores is not None:
            score = scores.pairs[layer]
            if score.shape != (v.shape[0], n_doc, groups):
                raise LoramemError("the query scores were computed for another cache or another --groups")
        else:
            score = pair_scores(cache.scores[press][layer, :, protected:], v[:, protected:], groups, rule)
        h = score.shape[0]
        flat = score.reshape(h, -1)
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept.scatter_(-1, flat.topk(min(n_pairs, flat.shape[-1]), dim=-1).indices, True)
        mask = torch.cat([torch.ones(h, protected, groups, dtype=torch.bool), kept.reshape(h, n_doc, groups)], 1)
        union = mask.any(-1).any(0)  # tokens some head keeps
        mask = mask[:, union]
        dense = v[:, union] * mask.repeat_interleave(width, dim=-1).to(v.dtype)
        keys.append(cache.keys[layer][:, union] * mask.any(-1, keepdim=True).to(v.dtype))
        values.append(dense)
        positions.append(torch.arange(cache.n_tokens)[union].expand(h, -1).clone())
        masks.append(mask)
    meta = copy.deepcopy(cache.meta)
    step: dict[str, Any] = {
        "press": None if scores is not None else press,
        "granularity": "value-group",
        "groups": groups,
        "budget": budget,
        "score_groups": rule,
        "ratio": None,
        "keep": None,
    }
    if scores is not None:
        step["query"] = {
            "rule": QUERY_RULE,
            "questions_sha256": scores.questions_sha256,
            "n_questions": scores.n_questions,
        }
    meta["compression"] = step
    meta.setdefault("history", []).append(step)
    return KVCache(
        keys=keys,
        values=values,
        positions=positions,
        token_ids=cache.token_ids,
        scores=cache.scores,
        meta=meta,
        masks=masks,
    )


def _decoder_layers(model: Any) -> Any:
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


@contextmanager
def head_masks(model: Any, present: list[torch.Tensor] | None) -> Iterator[None]:
    """Restrict each KV head to the cached tokens it kept ([H, n] per layer); causal for new tokens, and within
    the window on sliding-window layers (cache index = position: value-group caches keep every position). The mask
    is additive, which every attention implementation reads alike (eager adds a boolean mask as 0/1)."""
    if present is None:
        yield
        return
    hooks = []
    for index, layer in enumerate(_decoder_layers(model)):
        attn = layer.self_attn
        rep = model.config.num_attention_heads // model.config.num_key_value_heads

        def pre_hook(module: Any, args: tuple, kwargs: dict, index: int = index, rep: int = rep) -> tuple:
            q_len = kwargs["hidden_states"].shape[1]
            past = kwargs["past_key_values"].get_seq_length(index)
            keep = present[index].to(kwargs["hidden_states"].device)
            n_cache = keep.shape[1]
            kv = past + q_len
            column = torch.arange(kv, device=keep.device)
            row = torch.arange(past, past + q_len, device=keep.device)
            allowed = (column[None, :] <= row[:, None]).unsqueeze(0).expand(keep.shape[0], -1, -1).clone()
            allowed[:, :, :n_cache] &= keep[:, None, :]
            window = getattr(module, "sliding_window", None)
            if window:
                allowed &= row[:, None] - column[None, :] < window
            dtype = kwargs["hidden_states"].dtype
            blocked = torch.zeros(allowed.shape, dtype=dtype, device=keep.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min
            )
            kwargs["attention_mask"] = blocked.repeat_interleave(rep, dim=0).unsqueeze(0)
            return args, kwargs

        hooks.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
