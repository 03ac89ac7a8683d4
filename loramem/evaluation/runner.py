"""eval: the paper's experiment over a dataset as one resumable, shardable run.

Every held-out question is answered under every press, compression ratio and inference mode (and,
for adapter modes, every training format); each answer is scored and appended to
RUN_DIR/answers.jsonl at once. Shared work is done once: one base prefill per document records all
presses' scores and every ratio is a `compress` of it; an adapter is trained once per (document,
format) and prefilled once more only when a mode needs an adapter-encoded cache.

Modes: `none` base model throughout (independent of format, so its answers carry format null);
`decode` base-model cache and scores, adapter on for question and answer; `all` adapter prefill,
adapter scores, adapter decoding; `base_scores` adapter prefill evicted by the base model's scores,
adapter decoding.

Library modes route each question over an adapter library of the run's documents (RUN_DIR/library, built once
from the run's `qa` adapters, or --library): `oracle` the gold document's adapter, closed-book; `routed` the
top-1 routed document's adapter, closed-book; `routed-merge` the top-k routed adapters merged (by each --merge
method, with each --merge-weights weighting); `hybrid` that merge with the best retrieved chunks in context; `rag`
those chunks and no adapter. They hold no KV of the question's own document, so their answers carry press
"library" and ratio 1.0, and their margin is against `none` at ratio 1.0; each also records where routing put the
gold document (`routed_gold`, `gold_rank`).

Budget points (`budget_bytes`) spend one byte budget on both memories: an adapter of each `budget_ranks` rank
and, in the bytes left, the press's top document tokens as stored. Their answers carry ratio null (the share
kept depends on the document's length) and the bytes and tokens spent."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramem.adapters.attach import adapter_tensor_bytes, attach_adapter, detach_adapter
from loramem.answer import iter_answers
from loramem.data.formats import DocRecord, load_dataset
from loramem.errors import LoramemError
from loramem.evaluation.config import (
    Cell,
    budget_points,
    budget_sizes,
    grid,
    key_of,
    select_documents,
    with_instruction,
)
from loramem.evaluation.doc_adapters import adapter_name, check_adapter, document_adapter
from loramem.evaluation.library_modes import answer_library, build_library, check_library
from loramem.evaluation.report import write_report
from loramem.evaluation.rundir import (
    ANSWERS,
    AnswerLog,
    answer_row,
    fold_parts,
    model_info,
    open_run,
    record_failures,
    run_header,
    run_settings,
    writes_run,
)
from loramem.fileio import read_input_bytes
from loramem.kv.cache import KVCache
from loramem.kv.compress import within_budget
from loramem.kv.compression import compress_cache, storage_of
from loramem.kv.encode import encode
from loramem.log import log, progress_bar
from loramem.model import MAX_BATCH
from loramem.model.limits import check_records
from loramem.model.loading import LoadedModel, sha256_bytes
from loramem.specs import CompressSpec, EvalSpec
from loramem.vocab import ADAPTER_MODES, LIBRARY_MODES


@dataclass
class RunPlan:
    """What a run has left to do: documents with their unanswered cells, in dataset order."""

    run: Path
    todo: list[tuple[DocRecord, list[Cell]]]
    documents: list[DocRecord]  # every shard's documents: a run's library holds them all

    @property
    def n_cells(self) -> int:
        return sum(len(cells) for _, cells in self.todo)

    @property
    def needs_library(self) -> bool:
        return any(c.mode in LIBRARY_MODES for _, cells in self.todo for c in cells)


def prepare_run(
    model: dict[str, Any],
    dataset: str | Path,
    run_dir: str | Path,
    config: EvalSpec,
    *,
    resume: bool = False,
    sizes: dict[int, int] | None = None,
    allow_mixed: bool = False,
    check: Callable[[list[DocRecord]], None] | None = None,
) -> RunPlan:
    """Read and check the dataset, open (or resume) RUN_DIR, and list the cells still to answer.

    `sizes`: the adapter bytes of each budget rank (`budget_sizes`), needed when the config has budgets; `check`
    refuses documents (of this shard) before the run folder is written (`check_records`, given a model).
    """
    if str(dataset) == "-":
        raise LoramemError("eval needs a dataset file, not stdin (resuming and sharding read it again)")
    data, _ = read_input_bytes(dataset, "dataset")
    documents = with_instruction(select_documents(load_dataset(dataset), config.limit, (0, 1)), config.instruction)
    records = select_documents(documents, None, config.shard)
    if not records:
        raise LoramemError(f"shard {config.shard[0]}/{config.shard[1]} of {dataset} holds no documents")
    run = Path(run_dir)
    if config.budget_bytes and sizes is None:
        raise LoramemError("a run with byte budgets needs the adapter sizes of its model (budget_sizes)")
    points = budget_points(config, sizes or {})
    grids = [(record, grid(record, config, points)) for record in records]
    if config.adapters is not None:
        needed: list[tuple[DocRecord, str, int | None]] = (
            [(r, fmt, None) for r in records for fmt in config.formats]
            if any(m in ADAPTER_MODES for m in config.modes) and config.ratios
            else []
        )
        if config.uses_library and config.library.path is None:
            needed += [(r, "qa", None) for r in documents]
        needed += [
            (r, fmt, rank)
            for r in records
            for fmt in config.formats
            for rank in sorted({rank for _, rank in points if rank})
        ]
        for record, fmt, rank in needed:
            path = Path(config.adapters) / adapter_name(record.id, fmt, rank, config)
            if not path.is_dir():
                raise LoramemError(
                    f"--adapters {config.adapters} has no {fmt} adapter"
                    + (f" of rank {rank}" if rank else "")
                    + f" for document {record.id} "
                    f"(expected {path})"
                )
            check_adapter(path, record, fmt, config, rank)
    if config.uses_library:
        check_library(model, documents, config)
    if check is not None:
        check(records)
    done = open_run(run, run_header(model, config, Path(dataset), sha256_bytes(data), grids), resume, allow_mixed)
    todo = [(record, [c for c in cells if key_of(record, c, config.groups) not in done]) for record, cells in grids]
    plan = RunPlan(run, [(record, cells) for record, cells in todo if cells], documents)
    log(
        f"{len(records)} documents, {sum(len(c) for _, c in grids)} answers in the grid, {len(done)} done, "
        f"{plan.n_cells} to do -> {run}"
    )
    return plan


@writes_run("run_dir")
def run_eval(
    lm: LoadedModel,
    dataset: str | Path | None,
    run_dir: str | Path,
    config: EvalSpec | Mapping[str, Any] | None = None,
    *,
    resume: bool = False,
    allow_mixed: bool = False,
) -> dict[str, Any]:
    """Answer every cell of the grid not yet in RUN_DIR/answers.jsonl, then write the summary and curves.

    `config`: the run's EvalSpec, or some of its settings (a mapping), or None for the defaults. Resuming, the
    dataset and settings come from RUN_DIR/config.json (`run_eval(lm, None, run_dir, resume=True)`); settings given
    again must agree with it but for `limit`. A resume refuses answers of another precision or device unless
    `allow_mixed`. Returns the summary (see `loramem.evaluation.report.summarize`). `lm` is left without an adapter.
    """
    settings = run_settings(run_dir, dataset, config, resume=resume)
    dataset, config = settings.dataset, settings.spec
    plan = prepare_run(
        model_info(lm),
        dataset,
        run_dir,
        config,
        resume=resume,
        sizes=budget_sizes(lm, config),
        allow_mixed=allow_mixed,
        check=lambda records: check_records(lm, records),
    )
    with progress_bar("evaluating", plan.n_cells) as advance:
        answers = AnswerLog(plan.run / ANSWERS, advance, lm.runtime())
        try:
            if plan.needs_library:
                build_library(lm, plan.documents, config, plan.run, lambda text: advance(0, status=text))
            for number, (record, cells) in enumerate(plan.todo, 1):

                def status(text: str, prefix: str = f"doc {number}/{len(plan.todo)} {record.id}: ") -> None:
                    advance(0, status=prefix + text)

                evaluate_document(lm, record, cells, config, plan.run, answers, status)
        finally:
            answers.close()
            detach_adapter(lm)
    fold_parts(plan.run)
    record_failures(plan.run, [])
    return write_report(plan.run)


def evaluate_document(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[Cell],
    config: EvalSpec,
    run: Path,
    answers: AnswerLog,
    status: Callable[[str], None] = lambda text: None,
) -> None:
    """All remaining cells of one document: one base prefill, one adapter (and prefill) per format.

    Errors are re-raised with the document's id in front.
    """
    try:
        _evaluate_document(lm, record, cells, config, run, answers, status)
    except LoramemError as exc:
        raise type(exc)(f"document {record.id}: {exc}") from exc


def _evaluate_document(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[Cell],
    config: EvalSpec,
    run: Path,
    answers: AnswerLog,
    status: Callable[[str], None],
) -> None:
    """An attached adapter stays attached from one group of cells to the next (switched off for base-model cells),
    so modes that use the same weights (oracle's library copy, a budget point at --rank, decode) read them once."""
    library_cells = [c for c in cells if c.mode in LIBRARY_MODES]
    budget_cells = [c for c in cells if c.budget is not None]
    cells = [c for c in cells if c.mode not in LIBRARY_MODES and c.budget is None]
    if library_cells:
        answer_library(lm, record, library_cells, config, run, answers, status)
    base: KVCache | None = None
    if budget_cells or any(c.mode != "all" for c in cells):
        status("base prefill")
        base = encode(lm, record.document, presses=config.presses)
    if budget_cells:
        assert base is not None  # prefilled above for budget cells
        _answer_budget(lm, record, budget_cells, base, config, run, answers, status)
    status("answering")
    _answer_cells(
        lm,
        record,
        [c for c in cells if c.mode == "none"],
        lambda c: _cell_cache(base, c, config),
        False,
        config,
        answers,
    )
    for fmt in config.formats:
        mine = [c for c in cells if c.format == fmt]
        if not mine:
            continue
        attach_adapter(lm, document_adapter(lm, record, fmt, config, run, status))
        own: KVCache | None = None
        if any(c.mode in ("all", "base_scores") for c in mine):
            status(f"prefill with the {fmt} adapter")
            own = encode(lm, record.document, presses=config.presses, with_adapter=True)
        status(f"answering with the {fmt} adapter")
        # every adapter mode decodes with the adapter on: their cells' questions share batches
        _answer_cells(lm, record, mine, lambda c: _mode_cache(base, own, c, config), True, config, answers)
    detach_adapter(lm)


def _cell_cache(cache: KVCache | None, cell: Cell, config: EvalSpec, scores_from: KVCache | None = None) -> KVCache:
    """What a cell's cache keeps, as its CompressSpec says (token eviction at its ratio, or value groups at budget
    1 - ratio, as stored)."""
    assert cache is not None  # ratio cells always have their prefill
    return compress_cache(cache, cell.compress_spec(config.groups), scores_from=scores_from)


def _mode_cache(base: KVCache | None, own: KVCache | None, cell: Cell, config: EvalSpec) -> KVCache:
    """An adapter mode's cache: `decode` the base prefill's; `all` the adapter prefill's; `base_scores` the adapter
    prefill's evicted by the base prefill's scores."""
    if cell.mode == "decode":
        return _cell_cache(base, cell, config)
    return _cell_cache(own, cell, config, scores_from=base if cell.mode == "base_scores" else None)


def _answer_cells(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[Cell],
    cache_for: Callable[[Cell], KVCache],
    adapter_on: bool,
    config: EvalSpec,
    answers: AnswerLog,
    extra: Callable[[Cell, KVCache], dict[str, Any]] = lambda cell, cache: {},
) -> None:
    """Answer cells, building each kept cache (and its stored size) once; questions of different cells share
    batches (each row over its own cell's cache), pooled a batch's worth of rows at a time so that only a few caches
    are held at once. `seconds` is the answer's share of its batch's generation time, `extra` adds fields to each
    answer line from its cache."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.mode, cell.press, cell.ratio, cell.granularity, cell.store, cell.budget), []).append(
            cell
        )
    pool: list[tuple[Cell, KVCache, int]] = []

    def flush() -> None:
        replies = iter_answers(
            lm,
            [record.qa[cell.question_index].question for cell, _, _ in pool],
            [cache for _, cache, _ in pool],
            max_new_tokens=config.answer.max_new_tokens,
            adapter_on=adapter_on,
            batch_size=config.answer.batch_size,
            max_batch_tokens=config.answer.max_batch_tokens,
        )
        for index, answer, seconds in replies:
            cell, cache, stored = pool[index]
            answers.write({**answer_row(record, cell, config, answer, seconds, stored), **extra(cell, cache)})
        pool.clear()

    for group in groups.values():
        cache = cache_for(group[0])
        stored = cache.nbytes_stored
        pool += [(cell, cache, stored) for cell in group]
        if len(pool) >= (config.answer.batch_size or MAX_BATCH):
            flush()
    if pool:
        flush()


def _answer_budget(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[Cell],
    base: KVCache,
    config: EvalSpec,
    run: Path,
    answers: AnswerLog,
    status: Callable[[str], None],
) -> None:
    """Budget points: the adapter's stored bytes come off the budget and the rest buys the press's top document
    tokens, as stored (rank 0 spends it all on KV; the framing around the document is not counted, see
    `within_budget`); the adapter is on for the question and answer only."""
    points: dict[tuple[str | None, int], list[Cell]] = {}
    for cell in cells:
        points.setdefault((cell.format, cell.rank), []).append(cell)
    for (fmt, rank), mine in points.items():
        adapter_bytes = 0
        if fmt is not None:
            path = document_adapter(lm, record, fmt, config, run, status, rank)
            attach_adapter(lm, path)
            adapter_bytes = adapter_tensor_bytes(path)
        status(f"answering within budgets, adapter rank {rank}")

        def fields(cell: Cell, cache: KVCache) -> dict[str, Any]:  # called within this iteration only
            step = cache.meta["compression"]
            document_kv = cache.nbytes_stored - step["framing_bytes"]
            return {
                "budget_bytes": cell.budget,
                "adapter_rank": cell.rank,
                "adapter_bytes": adapter_bytes,
                "document_kv_bytes": document_kv,
                "total_bytes": adapter_bytes + document_kv,
                "store": cell.store,
                "kv_tokens_kept": step["n_doc_kept"],
                "document_tokens": cache.n_tokens - int(cache.meta.get("n_protected", 0)),
            }

        _answer_cells(
            lm,
            record,
            mine,
            lambda c: within_budget(
                base,
                c.press,
                (c.budget or 0) - adapter_bytes,
                storage_of(CompressSpec.parse({"store_dtype": c.store}), base),
            ),
            fmt is not None,
            config,
            answers,
            fields,
        )
