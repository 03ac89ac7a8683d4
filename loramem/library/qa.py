"""Questions to an adapter library: route to documents, answer with their (merged) adapter, optionally with
retrieved chunks or the routed documents' stored caches in context.

A merge loads every source adapter onto the model, so a merged adapter is kept in LIB/merged/ under a hash of
what determines it (method, source adapters, weights, density) and reused by every later question routed to the
same documents. With context, the context is a base-model cache and the adapter is on for the question and the
answer only (the `decode` mode), the hybrid the second seed study found best.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loramem.adapters.attach import ADAPTER_WEIGHTS, attach_adapter
from loramem.adapters.merge import merge_adapters
from loramem.answer import Answer, answer_batch
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.kv.cache import KVCache, check_compatible
from loramem.kv.encode import encode
from loramem.library import MERGE, TOP_K
from loramem.library.embed import Embedder
from loramem.library.store import (
    CACHE_FILE,
    Chunk,
    Library,
    check_model,
    check_top_k,
    library_embedder,
    retrieve_chunks,
    route,
)
from loramem.model import MAX_BATCH, MAX_BATCH_TOKENS, MAX_NEW_TOKENS
from loramem.model.limits import check_questions
from loramem.model.loading import LoadedModel, sha256_text
from loramem.specs import AnswerSpec, MergeSpec, RouteSpec
from loramem.vocab import DENSITY_METHODS, EQUAL_RANK_METHODS

MERGED = "merged"
# A context cache is answered whole, never evicted; knorm is the cheapest press score to record.
CONTEXT_PRESSES = ["knorm"]
CONTEXT_SEPARATOR = "\n\n"


@dataclass
class LibraryAnswer:
    """An answer from a library with what it was answered from."""

    routed: list[tuple[str, float]]  # (document id, cosine similarity), best first
    adapter: Path
    context_chunks: list[Chunk]
    context_caches: list[str]  # ids of the documents whose stored caches were in context
    answer: Answer
    context_prefill_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.answer.to_dict(),
            "routed": [{"id": i, "score": round(s, 6)} for i, s in self.routed],
            "adapter": str(self.adapter),
            "context_chunks": [asdict(c) for c in self.context_chunks],
            "context_caches": self.context_caches,
            "document_prefill_seconds": self.context_prefill_seconds,
        }


def routing_weights(scores: list[float], temperature: float) -> list[float]:
    """Merge weights from routing scores: k x softmax(score / temperature), best first as the scores.

    A softmax, not the scores normalised: cosine similarities can be negative, and their ratios (0.5 against 0.4)
    say little; the temperature sets how far a lead in similarity moves the weight. Scaled to sum to k, as k equal
    weights of 1 do, so the merged update keeps the equal merge's size and only the shares change (a very high
    temperature gives the equal merge). Rounded to 6 places, so a merge is found again from its recorded weights.
    """
    shares = torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, 0)
    return [round(float(w), 6) for w in shares * len(scores)]


def merged_folder(lib: Library, doc_ids: list[str], config: MergeSpec) -> tuple[Path, list[str], list[float]]:
    """Where the merge of these documents' adapters is kept, and its sources and weights in merge order.

    Sources are ordered by adapter hash, so the same documents routed in another order share one merge.
    """
    if config.weights is not None and len(config.weights) != len(doc_ids):
        raise LoramemError(
            f"{len(config.weights)} weights for {len(doc_ids)} routed documents; give one weight per document"
        )
    records = {d["id"]: d for d in lib.documents}
    weights = [float(w) for w in config.weights] if config.weights is not None else [1.0] * len(doc_ids)
    ordered = sorted(zip((records[i]["adapter"]["sha256"] for i in doc_ids), doc_ids, weights))
    key = {
        "method": config.method,
        "sources": [[sha, w] for sha, _, w in ordered],
        "density": config.density if config.method in DENSITY_METHODS else None,
        "seed": config.seed if config.method == "dare_ties" else None,
    }
    folder = lib.inside(lib.path / MERGED / sha256_text(json.dumps(key, sort_keys=True))[:16])
    return folder, [i for _, i, _ in ordered], [w for *_, w in ordered]


def routed_adapter(
    lm: LoadedModel, lib: Library, doc_ids: list[str], config: MergeSpec, under: Path | None = None
) -> Path:
    """The adapter for the routed documents: one document's own, or their merge, made once and kept in LIB/merged/
    (or in `under`, for merges not worth keeping: named as LIB/merged would name them)."""
    if len(doc_ids) == 1:
        return lib.adapter_dir(doc_ids[0])
    folder, sources, weights = merged_folder(lib, doc_ids, config)
    if under is not None:
        folder = under / folder.name
    if (folder / ADAPTER_WEIGHTS).is_file():
        return folder
    ranks = {d["id"]: d["adapter"]["rank"] for d in lib.documents if d["id"] in doc_ids}
    if config.method in EQUAL_RANK_METHODS and len(set(ranks.values())) > 1:
        raise LoramemError(
            f"--merge {config.method} needs adapters of equal rank, but the routed documents' have "
            f"ranks {', '.join(f'{i} {r}' for i, r in ranks.items())}; use --merge cat or svd"
        )
    folder.parent.mkdir(exist_ok=True)
    try:
        merge_adapters(
            lm,
            [lib.adapter_dir(i) for i in sources],
            folder,
            MergeSpec(method=config.method, weights=weights, density=config.density, seed=config.seed),
        )
    except (LoramemError, OSError):
        if not (folder / ADAPTER_WEIGHTS).is_file():  # else another process merged the same set meanwhile
            raise
    return folder


def use_adapter(lm: LoadedModel, folder: Path) -> None:
    """Switch to the adapter unless it is the active one (one loaded before is switched to without reading it)."""
    if lm.adapter is None or Path(lm.adapter.path).resolve() != folder.resolve():
        attach_adapter(lm, folder)


ContextCaches = dict[tuple[tuple[str, int], ...], KVCache]


def context_cache(lm: LoadedModel, chunks: list[Chunk], made: ContextCaches) -> KVCache:
    """Retrieved chunks, joined in retrieval order, encoded by the base model as one document: once per chunk list
    in `made`, so questions that retrieve the same chunks in the same order share one prefill (and one cache)."""
    key = tuple((c.doc_id, c.index) for c in chunks)
    if key not in made:
        made[key] = encode(lm, CONTEXT_SEPARATOR.join(c.text for c in chunks), presses=CONTEXT_PRESSES)
    return made[key]


def stored_cache(lm: LoadedModel, lib: Library, doc_id: str) -> KVCache:
    """A document's cache stored in the library (`library add --with-cache`), checked against the model."""
    path = lib.inside(lib.doc_dir(doc_id) / CACHE_FILE)
    if not path.is_file():
        raise LoramemError(
            f"document {doc_id} of library {lib.path} has no stored KV cache; add documents with "
            "--with-cache, or use --with-context N"
        )
    cache = KVCache.load(path)
    check_compatible(cache, lm.fingerprint, str(path), lm)
    return cache


def parallel_cache(caches: list[KVCache]) -> KVCache:
    """Several documents' caches side by side in one cache (parallel context encoding).

    A stored cache's keys carry the RoPE rotation of their own positions 0..n_i-1, and each document's states
    were computed attending to its own framing prefix and itself only. So the documents keep their positions:
    the first keeps its framing prefix, the others drop theirs (the same tokens at the same positions, so the
    same states), and the question continues after the longest document. The result is for answering only:
    its token_ids are the longest prefill's, which puts `n_tokens`, where the question starts, after it.
    """
    first = caches[0]
    n_protected = int(first.meta["n_protected"])
    for cache in caches:
        if cache.masks is not None:
            raise LoramemError("value-group caches cannot be put side by side")
        if cache.meta.get("adapter") is not None:
            raise IncompatibleArtifactError(
                "a cache encoded with an adapter cannot be put side by side; the routed "
                "adapter decodes over base-model caches"
            )
        if cache.meta["framing"] != first.meta["framing"] or not torch.equal(
            cache.token_ids[:n_protected], first.token_ids[:n_protected]
        ):
            raise IncompatibleArtifactError("the stored caches were encoded with different framings; re-encode them")
    rest = caches[1:]
    keys = [torch.cat([first.keys[i], *(c.keys[i][:, n_protected:] for c in rest)], 1) for i in range(first.n_layers)]
    values = [
        torch.cat([first.values[i], *(c.values[i][:, n_protected:] for c in rest)], 1) for i in range(first.n_layers)
    ]
    positions = [
        torch.cat([first.positions[i], *(c.positions[i][:, n_protected:] for c in rest)], 1)
        for i in range(first.n_layers)
    ]
    longest = max(caches, key=lambda c: c.n_tokens)
    meta = {
        **first.meta,
        "n_tokens": longest.n_tokens,
        "scores": [],
        "parallel": [{"document": c.meta["document"], "n_tokens": c.n_tokens} for c in caches],
    }
    return KVCache(keys=keys, values=values, positions=positions, token_ids=longest.token_ids, meta=meta)


def open_routed(
    library: str | Path | Library,
    top_k: int,
    merge: str,
    with_context: int,
    with_caches: bool,
    weights: list[float] | None = None,
    density: float | None = None,
) -> tuple[Library, MergeSpec]:
    """The library and merge settings of a library question, checked (as RouteSpec and MergeSpec check them) before
    any model is loaded."""
    RouteSpec.parse({"top_k": top_k, "merge": merge, "with_context": with_context, "with_caches": with_caches})
    config = MergeSpec.parse({"method": merge, "weights": weights, **({} if density is None else {"density": density})})
    if weights is not None and len(weights) != top_k:
        raise LoramemError(f"{len(weights)} weights for top_k {top_k}; give one weight per routed document")
    return check_top_k(library, top_k), config


def ask_library(
    lm: LoadedModel,
    library: str | Path | Library,
    question: str,
    *,
    top_k: int = TOP_K,
    merge: str = MERGE,
    with_context: int = 0,
    with_caches: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    weights: list[float] | None = None,
    density: float = MergeSpec().density,
    embedder: Embedder | None = None,
) -> LibraryAnswer:
    """Route the question to the top_k documents and answer with their adapter on: the document's own for top_k 1,
    else their merge. with_context N puts the N best retrieved chunks in context, with_caches the routed documents'
    stored caches side by side. `weights` (one per routed document, best first) and `density` tune the merge."""
    return ask_library_batch(
        lm,
        library,
        [question],
        top_k=top_k,
        merge=merge,
        with_context=with_context,
        with_caches=with_caches,
        max_new_tokens=max_new_tokens,
        weights=weights,
        density=density,
        embedder=embedder,
    )[0]


def ask_library_batch(
    lm: LoadedModel,
    library: str | Path | Library,
    questions: list[str],
    *,
    top_k: int = TOP_K,
    merge: str = MERGE,
    with_context: int = 0,
    with_caches: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    weights: list[float] | None = None,
    density: float = MergeSpec().density,
    embedder: Embedder | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> list[LibraryAnswer]:
    """`ask_library` for many questions: questions routed to the same adapter are answered together in batches, each
    over its own cache (its retrieved chunks, made once per chunk list in a batch, or with_caches its routed
    documents' caches side by side, made once per routed set in a batch), or none."""
    lib, config = open_routed(library, top_k, merge, with_context, with_caches, weights, density)
    check_model(lib, lm.fingerprint)
    check_questions(lm, questions)
    embedder = library_embedder(lib, embedder)
    plans = []
    groups: dict[str, list[int]] = {}
    for index, question in enumerate(questions):
        routed = route(lib, question, top_k, embedder)
        ids = [i for i, _ in routed]
        adapter = routed_adapter(lm, lib, ids, config)
        chunks = retrieve_chunks(lib, question, with_context, embedder) if with_context else []
        plans.append((routed, ids, adapter, chunks))
        groups.setdefault(str(adapter), []).append(index)
    results: list[LibraryAnswer | None] = [None] * len(questions)
    step = batch_size or MAX_BATCH  # a batch's worth of questions at a time: only their caches are held
    pieces = [members[start : start + step] for members in groups.values() for start in range(0, len(members), step)]
    for members in pieces:
        side_by_side: dict[tuple[str, ...], KVCache] = {}
        contexts: ContextCaches = {}
        caches: list[KVCache | None] = []
        for index in members:
            _, ids, _, chunks = plans[index]
            if chunks:
                caches.append(context_cache(lm, chunks, contexts))
            elif with_caches:
                if tuple(ids) not in side_by_side:
                    side_by_side[tuple(ids)] = parallel_cache([stored_cache(lm, lib, i) for i in ids])
                caches.append(side_by_side[tuple(ids)])
            else:
                caches.append(None)
        use_adapter(lm, plans[members[0]][2])
        answers = answer_batch(
            lm,
            [questions[i] for i in members],
            caches,
            max_new_tokens=max_new_tokens,
            adapter_on=True,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
        )
        for index, answer, cache in zip(members, answers, caches):
            routed, ids, adapter, chunks = plans[index]
            results[index] = LibraryAnswer(
                routed=routed,
                adapter=adapter,
                context_chunks=chunks,
                context_caches=ids if with_caches else [],
                answer=answer,
                context_prefill_seconds=cache.meta["prefill_seconds"] if cache is not None and chunks else 0.0,
            )
    return [r for r in results if r is not None]


def answer_routed(
    lm: LoadedModel, library: Library, questions: list[str], route: RouteSpec, answer: AnswerSpec
) -> list[LibraryAnswer]:
    """`ask_library_batch` with a request's routing and decoding specs (`ask --library`, a server's request)."""
    return ask_library_batch(
        lm,
        library,
        questions,
        top_k=route.top_k,
        merge=route.merge,
        with_context=route.with_context,
        with_caches=route.with_caches,
        max_new_tokens=answer.max_new_tokens,
        embedder=library_embedder(library),
        batch_size=answer.batch_size,
        max_batch_tokens=answer.max_batch_tokens,
    )
