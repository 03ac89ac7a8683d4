"""Eval's library modes: build or check the run's adapter library and answer by routing."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramem.answer import iter_answers
from loramem.data.formats import DocRecord
from loramem.errors import LoramemError
from loramem.evaluation.config import Cell, file_name
from loramem.evaluation.doc_adapters import document_adapter
from loramem.evaluation.rundir import LIBRARY, AnswerLog, answer_row
from loramem.kv.cache import KVCache
from loramem.library.embed import Embedder, load_embedder
from loramem.library.qa import MERGED, ContextCaches, context_cache, routed_adapter, routing_weights, use_adapter
from loramem.library.store import (
    AddOptions,
    Library,
    add_documents,
    check_model,
    library_embedder,
    open_library,
    retrieve_chunks,
    route,
)
from loramem.model.loading import LoadedModel, clock, sha256_text
from loramem.specs import EvalSpec, MergeSpec
from loramem.specs.base import refuse


def library_path(config: EvalSpec, run: Path) -> Path:
    """The library that library modes route over: --library, else the one the run builds in RUN_DIR/library."""
    return Path(config.library.path) if config.library.path is not None else run / LIBRARY


def check_library(model: dict[str, Any], documents: list[DocRecord], config: EvalSpec) -> None:
    """Before the run starts: --library must be of this model and hold every document of the run, and the
    library (given or to be built) must hold at least --library-top-k documents."""
    n = len({sha256_text(r.document) for r in documents})
    if config.library.path is not None:
        lib = open_library(config.library.path)
        check_model(lib, model)
        held = {d["sha256"] for d in lib.documents}
        missing = [r.id for r in documents if sha256_text(r.document) not in held]
        if missing:
            raise LoramemError(
                f"--library {config.library.path} lacks {len(missing)} of the run's documents (first: "
                f"{missing[0]}); add them with loramem library add, or leave out --library"
            )
        n = len(lib.documents)
    if config.library.top_k > n:
        refuse(f"{config.library.top_k} is more than the library's {n} documents", "library.top_k")


def build_library(
    lm: LoadedModel,
    documents: list[DocRecord],
    config: EvalSpec,
    run: Path,
    status: Callable[[str], None] = lambda text: None,
) -> Path:
    """The run's library: --library as given, else RUN_DIR/library holding every document of the run (all shards,
    so routing does not depend on sharding), each added once with the run's qa adapter (from --adapters or
    RUN_DIR/adapters, trained there if missing). A resume with a wider --limit adds the new documents; each answer
    records how many documents its routing chose from (`library_documents`)."""
    path = library_path(config, run)
    if config.library.path is not None:
        return path
    known = {d["sha256"] for d in open_library(path).documents} if path.exists() else set()
    unique: dict[str, DocRecord] = {}
    for record in documents:  # a text repeated in the dataset is one library document
        unique.setdefault(sha256_text(record.document), record)
    missing = [record for sha, record in unique.items() if sha not in known]
    if not missing:
        return path
    embedder = load_embedder(device=str(lm.device))
    with tempfile.TemporaryDirectory() as tmp:
        for number, record in enumerate(missing, 1):

            def step(text: str, prefix: str = f"library {number}/{len(missing)} {record.id}: ") -> None:
                status(prefix + text)

            adapter = document_adapter(lm, record, "qa", config, run, step)
            source = Path(tmp) / f"{file_name(record.id)}.txt"
            source.write_bytes(record.document.encode("utf-8"))
            step("adding it to the library")
            add_documents(
                path, lm, [str(source)], AddOptions(adapter=str(adapter), doc_id=file_name(record.id)), embedder
            )
    return path


def _named(adapter: Path | None, lib: Library, scratch: Path) -> str | None:
    """An answer's adapter by its path in the library (a scratch merge as LIB/merged would hold it)."""
    if adapter is None:
        return None
    return f"{MERGED}/{adapter.name}" if adapter.parent == scratch else str(adapter.relative_to(lib.path))


def merge_spec(cell: Cell, scores: list[float], config: EvalSpec) -> MergeSpec:
    """How a merging cell's routed adapters merge: its method, with equal weights or its routing scores'."""
    assert cell.merge is not None  # a merging library mode's cell
    weights = routing_weights(scores, config.library.merge_temperature) if cell.merge_weights == "routing" else None
    return MergeSpec.parse({"method": cell.merge, "weights": weights})


def answer_library(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[Cell],
    config: EvalSpec,
    run: Path,
    answers: AnswerLog,
    status: Callable[[str], None],
) -> None:
    """Library cells of one document: each question routed once and its adapters merged first (a merge detaches
    the model's adapter; once per merge method and weighting), then answered in batches grouped by adapter, so each
    adapter is attached once. The last stays attached (base-model rows switch it off): the document's other modes
    may use the same weights. Merges are made in a scratch folder removed with the document's cells, not kept in
    LIB/merged/: a routing-weighted merge is one per question, and with routing that finds the document, other
    documents' questions are routed to other sets; kept, a 100-document study of three merges would leave tens of
    GB there. A row names its merge as LIB/merged would (`routed_adapter` remakes it from the row's routed ids and
    weights). A row's `setup_seconds` is the time its merge and its context prefill took where this
    row made them (0 where an earlier row had: spread over a mode's rows, the cost of the mode per answer)."""
    lib = open_library(library_path(config, run))
    gold = {d["sha256"]: d["id"] for d in lib.documents}.get(sha256_text(record.document))
    if gold is None:
        raise LoramemError(f"library {lib.path} does not hold this document")
    embedder = library_embedder(lib)
    with tempfile.TemporaryDirectory(prefix="loramem-merges-") as scratch:
        _answer_library(lm, record, cells, config, lib, gold, embedder, Path(scratch), answers, status)


def _answer_library(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[Cell],
    config: EvalSpec,
    lib: Library,
    gold: str,
    embedder: Embedder,
    scratch: Path,
    answers: AnswerLog,
    status: Callable[[str], None],
) -> None:
    status("routing and merging")
    routing: dict[int, dict[str, Any]] = {}
    chunks: dict[int, list[Any]] = {}
    for q in sorted({c.question_index for c in cells}):
        question = record.qa[q].question
        routed = route(lib, question, config.library.top_k, embedder)
        ids = [i for i, _ in routed]
        routing[q] = {
            "routed": [{"id": i, "score": round(s, 6)} for i, s in routed],
            "routed_gold": gold in ids,
            "gold_rank": ids.index(gold) + 1 if gold in ids else None,
            "library_documents": len(lib.documents),
        }
        if any(c.question_index == q and c.mode in ("hybrid", "rag") for c in cells):
            chunks[q] = retrieve_chunks(lib, question, config.library.context_chunks, embedder)
    jobs = []
    weights: dict[Cell, list[float]] = {}  # a merging cell's, one per routed document, best first
    setup: dict[Cell, float] = {}  # seconds a cell spent making its merge and its context cache
    for cell in cells:
        routed_set = routing[cell.question_index]["routed"]
        ids = [r["id"] for r in routed_set]
        if cell.mode == "oracle":
            adapter = lib.adapter_dir(gold)
        elif cell.mode == "routed":
            adapter = lib.adapter_dir(ids[0])
        elif cell.merge is not None:
            spec = merge_spec(cell, [r["score"] for r in routed_set], config)
            start = clock(lm.device)
            adapter = routed_adapter(lm, lib, ids, spec, scratch)
            setup[cell] = clock(lm.device) - start
            weights[cell] = spec.weights or [1.0] * len(ids)
        else:
            adapter = None
        jobs.append((cell, adapter))
    contexts: ContextCaches = {}
    status("answering from the library")
    by_adapter: dict[Path | None, list[Cell]] = {}
    for cell, adapter in jobs:
        by_adapter.setdefault(adapter, []).append(cell)
    for adapter, group in sorted(by_adapter.items(), key=lambda item: str(item[0] or "")):
        if adapter is not None:
            use_adapter(lm, adapter)
        caches: list[KVCache | None] = []
        for cell in group:
            if cell.mode in ("hybrid", "rag"):
                start = clock(lm.device)
                caches.append(context_cache(lm, chunks[cell.question_index], contexts))
                setup[cell] = setup.get(cell, 0.0) + clock(lm.device) - start
            else:
                caches.append(None)
        # One adapter's questions in batches (closed-book rows and rows over their own retrieved context together),
        # as the other modes are answered: one at a time, the library modes cost more than all the others.
        replies = iter_answers(
            lm,
            [record.qa[cell.question_index].question for cell in group],
            caches,
            max_new_tokens=config.answer.max_new_tokens,
            adapter_on=adapter is not None,
            batch_size=config.answer.batch_size,
            max_batch_tokens=config.answer.max_batch_tokens,
        )
        for index, answer, seconds in replies:
            cell, cache = group[index], caches[index]
            q = cell.question_index
            row = answer_row(record, cell, config, answer, seconds, cache.nbytes_stored if cache else 0)
            answers.write(
                {
                    **row,
                    **routing[q],
                    **({"weights": weights[cell]} if cell in weights else {}),
                    "setup_seconds": round(setup.get(cell, 0.0), 4),
                    "adapter": _named(adapter, lib, scratch),
                    "context_chunks": [[c.doc_id, c.index] for c in chunks[q]] if cache else [],
                }
            )
