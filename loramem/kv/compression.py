"""One entry point for every way a cache is compressed: a CompressSpec in, the compressed cache out.

Token eviction by recorded scores (`kv.compress`), value groups inside tokens (`kv.value_groups`) and re-storing in
another dtype (`kv.quantize`) are chosen here, from the spec alone, for the CLI, the eval and any script alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loramem.kv.cache import KVCache
from loramem.kv.compress import compress, stored_as
from loramem.kv.quantize import Storage, make_storage
from loramem.kv.value_groups import QueryScores, check_groups, compress_value_groups, query_group_scores
from loramem.specs import CompressSpec

if TYPE_CHECKING:
    from loramem.model.loading import LoadedModel


def storage_of(spec: CompressSpec, cache: KVCache) -> Storage | None:
    """How the spec stores the cache's kept keys and values; None keeps the cache's own dtype."""
    if spec.store_dtype in (None, "native"):
        return None
    return make_storage(spec.store_dtype, spec.quant_axis, spec.quant_group, int(cache.meta["head_dim"]))


def query_scores(lm: LoadedModel, cache: KVCache, spec: CompressSpec) -> QueryScores:
    """The value groups' relevance to the spec's questions (the model that made the cache runs them)."""
    check_groups(cache, spec.press, spec.groups, spec.rule, query=True)
    return query_group_scores(lm, cache, spec.query, spec.groups)


def compress_cache(
    cache: KVCache, spec: CompressSpec, *, scores_from: KVCache | None = None, scores: QueryScores | None = None
) -> KVCache:
    """The cache as `spec` compresses it. `scores_from`: another encoding's token scores pick the tokens (token
    granularity); `scores`: the query rule's value-group scores (`query_scores`)."""
    storage = storage_of(spec, cache)
    if spec.granularity == "value-group":
        assert spec.budget is not None  # the spec requires it
        small = compress_value_groups(cache, spec.press, spec.groups, spec.budget, spec.rule, scores)
        return stored_as(small, storage) if storage is not None else small
    if not spec.evicts:
        return stored_as(cache, storage) if storage is not None else cache
    return compress(cache, spec.press, ratio=spec.ratio, keep=spec.keep, scores_from=scores_from, storage=storage)
