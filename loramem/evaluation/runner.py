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
top-1 routed document's adapter, closed-book; `routed-merge` the top-k routed adapters merged; `hybrid` that
merge with the best retrieved chunks in context; `rag` those chunks and no adapter. They hold no KV of the
question's own document, so their answers carry press "library" and ratio 1.0, and their margin is against
`none` at ratio 1.0; each also records where routing put the gold document (`routed_gold`, `gold_rank`).

Budget points (`budget_bytes`) spend one byte budget on both memories: an adapter of each `budget_ranks` rank
and, in the bytes left, the press's top document tokens as stored. Their answers carry ratio null (the share
kept depends on the document's length) and the bytes and tokens spent.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loramem._version import __version__
from loramem.adapters.attach import adapter_tensor_bytes, attach_adapter, detach_adapter, read_adapter_meta
from loramem.adapters.merge import MergeConfig
from loramem.adapters.synth import synthesize
from loramem.adapters.train import FORMATS, TrainConfig, adapter_element_bytes, lora_parameters, train_adapter
from loramem.data.formats import DocRecord, load_dataset, load_qa_pairs
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.evaluation.metrics import score_answer
from loramem.evaluation.report import (
    ANSWERS,
    CONFIG,
    FAILURES,
    LIBRARY_MODES,
    LIBRARY_SERIES,
    MODES,
    cell_key,
    read_answers,
    read_json,
    write_report,
)
from loramem.fileio import atomic_write_bytes, read_input_bytes
from loramem.kv.cache import KVCache
from loramem.kv.compress import compress, restore, within_budget
from loramem.kv.encode import encode
from loramem.kv.presses import parse_presses
from loramem.kv.quantize import Storage, make_storage
from loramem.kv.value_groups import compress_value_groups
from loramem.library.embed import load_embedder
from loramem.library.qa import context_cache, routed_adapter, use_adapter
from loramem.library.store import (
    AddOptions,
    add_documents,
    check_model,
    library_embedder,
    open_library,
    retrieve_chunks,
    route,
)
from loramem.log import log, progress_bar, warn
from loramem.model.generate import Answer, generate
from loramem.model.loading import LoadedModel, sha256_bytes, sha256_text
from loramem.sizes import format_size

ADAPTER_MODES = ("decode", "all", "base_scores")
ADAPTERS = "adapters"
PARTS = "parts"
GRANULARITIES = ("token", "value-group")
STORE_DTYPES = ("native", "fp16", "bf16", "int8", "int4")
SYNTH_QA = "train_qa"
LIBRARY = "library"
LIBRARY_SETTINGS = ("library", "library_top_k", "merge", "context_chunks")
BUDGET_SETTINGS = ("budget_bytes", "budget_ranks")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class EvalConfig:
    """The grid and the adapter hyperparameters of a run; recorded in RUN_DIR/config.json."""

    ratios: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    presses: list[str] = field(default_factory=lambda: ["snapkv", "knorm"])
    modes: list[str] = field(default_factory=lambda: ["none", "decode", "all"])
    formats: list[str] = field(default_factory=lambda: ["qa", "ntp"])
    granularities: list[str] = field(default_factory=lambda: ["token"])
    store_dtypes: list[str] = field(default_factory=lambda: ["native"])
    groups: int = 4
    max_new_tokens: int = 32
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    seed: int = 0
    synth_pairs: int = 16
    adapters: str | None = None
    rank: int = TrainConfig.rank
    alpha: float = TrainConfig.alpha
    dropout: float = TrainConfig.dropout
    targets: str = TrainConfig.targets
    layers: str | None = TrainConfig.layers
    lr: float = TrainConfig.lr
    epochs: int = TrainConfig.epochs
    steps: int | None = TrainConfig.steps
    batch_size: int = TrainConfig.batch_size
    max_length: int = TrainConfig.max_length
    chunk_size: int = TrainConfig.chunk_size
    library: str | None = None  # library modes: route over this library instead of building RUN_DIR/library
    library_top_k: int = 3  # routed-merge, hybrid: documents routed to and merged
    merge: str = "ties"
    context_chunks: int = 2  # hybrid, rag: retrieved chunks in context
    budget_bytes: list[int] = field(default_factory=list)  # byte budgets split between kept KV and an adapter
    budget_ranks: list[int] = field(default_factory=lambda: [0, 2, 8, 32])  # the split's points; 0: KV only

    def __post_init__(self) -> None:
        """Refuse a bad grid before the model does any work; ratios are deduplicated and sorted."""
        for ratio in self.ratios:
            if not 0.0 <= float(ratio) <= 1.0:
                raise LoramemError(f"ratio must be in [0, 1], got {ratio}")
        self.ratios = sorted({float(r) for r in self.ratios})
        self.presses = parse_presses(",".join(self.presses))
        self.modes = _known(self.modes, MODES, "mode")
        self.formats = _known(self.formats, FORMATS, "format")
        self.granularities = _known(self.granularities, GRANULARITIES, "granularity")
        self.store_dtypes = _known(self.store_dtypes, STORE_DTYPES, "store dtype")
        if "value-group" in self.granularities and "base_scores" in self.modes:
            raise LoramemError("mode base_scores works with token granularity only")
        if self.groups < 1:
            raise LoramemError(f"groups must be at least 1, got {self.groups}")
        if not self.budget_bytes and (not self.ratios or not self.modes):
            raise LoramemError("give at least one ratio and one mode")
        if any(b <= 0 for b in self.budget_bytes) or any(r < 0 for r in self.budget_ranks):
            raise LoramemError("byte budgets must be positive and budget ranks >= 0")
        self.budget_bytes = sorted(set(self.budget_bytes))
        self.budget_ranks = sorted(set(self.budget_ranks))
        if self.budget_bytes and not self.budget_ranks:
            raise LoramemError("give at least one budget rank (0: all bytes to kept KV)")
        if self.budget_bytes and any(self.budget_ranks) and not self.formats:
            raise LoramemError("budget ranks above 0 need a training format (--format qa)")
        if any(m in ADAPTER_MODES for m in self.modes) and not self.formats:
            raise LoramemError("adapter modes need at least one training format (--format qa,ntp)")
        index, count = self.shard = (int(self.shard[0]), int(self.shard[1]))
        if not 0 <= index < count:
            raise LoramemError(f"bad shard {index}/{count}; use I/N with 0 <= I < N")
        for name in ("limit", "max_new_tokens", "synth_pairs", "library_top_k", "context_chunks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LoramemError(f"{name} must be at least 1, got {value}")
        if self.adapters is not None:
            self.adapters = str(Path(self.adapters).resolve())
        if self.library is not None:
            self.library = str(Path(self.library).resolve())
        MergeConfig(method=self.merge)
        for fmt in self.formats:
            self.train_config(fmt)

    def train_config(self, fmt: str, rank: int | None = None) -> TrainConfig:
        """The adapter hyperparameters for one training format (and a budget point's rank)."""
        return TrainConfig(
            format=fmt,
            rank=self.rank if rank is None else rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=self.targets,
            layers=self.layers,
            lr=self.lr,
            epochs=self.epochs,
            steps=self.steps,
            batch_size=self.batch_size,
            seed=self.seed,
            max_length=self.max_length,
            chunk_size=self.chunk_size,
        )

    @property
    def uses_library(self) -> bool:
        return any(m in LIBRARY_MODES for m in self.modes)

    def to_dict(self) -> dict[str, Any]:
        """As config.json stores it (JSON types), so a stored config compares equal to a fresh one. Runs without
        library modes or budgets leave those settings out, so runs made before they existed still resume and merge."""
        data = json.loads(json.dumps(asdict(self)))
        unused = (() if self.uses_library else LIBRARY_SETTINGS) + (() if self.budget_bytes else BUDGET_SETTINGS)
        return {k: v for k, v in data.items() if k not in unused}


def _known(names: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise LoramemError(f"unknown {what} {unknown[0]!r}; use some of {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N): this process takes the documents whose index modulo N is I."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise LoramemError(f"bad shard {text!r}; use I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def select_documents(records: list[DocRecord], limit: int | None, shard: tuple[int, int]) -> list[DocRecord]:
    """The first `limit` documents, then every N-th from I (so shards split the same limited set)."""
    index, count = shard
    return [r for i, r in enumerate(records[:limit]) if i % count == index]


def file_name(doc_id: str) -> str:
    """A document id usable as a file name; ids that are not get a readable slug and a hash (stays unique)."""
    if _SAFE_ID.fullmatch(doc_id):
        return doc_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._")[:60]
    return f"{slug}-{sha256_text(doc_id)[:10]}"


@dataclass(frozen=True)
class _Cell:
    """One answer to produce for a document."""

    question_index: int
    press: str
    ratio: float | None  # None: a budget point, whose kept share depends on the document's length
    mode: str
    format: str | None
    granularity: str = "token"
    store: str = "native"
    budget: int | None = None  # budget points: bytes for kept KV plus the adapter of rank `rank`
    rank: int = 0

    def variant(self, groups: int) -> str:
        """How the kept KV is cut and stored, as answers.jsonl names it: e.g. token, value-group/4 int8,
        budget 16000000 r8."""
        if self.budget is not None:
            name = f"budget {self.budget} r{self.rank}"
            return name if self.store == "native" else f"{name} {self.store}"
        return variant_name(self.granularity, groups, self.store)


def variant_name(granularity: str, groups: int, store: str) -> str:
    name = granularity if granularity == "token" else f"{granularity}/{groups}"
    return name if store == "native" else f"{name} {store}"


def budget_sizes(lm: LoadedModel, config: EvalConfig) -> dict[int, int]:
    """Stored bytes of the run's adapter at each budget rank (0 for rank 0), from the model before any training."""
    element = adapter_element_bytes(lm.model)
    return (
        {
            rank: rank and lora_parameters(lm.model, config.train_config("qa", rank)) * element
            for rank in config.budget_ranks
        }
        if config.budget_bytes
        else {}
    )


def budget_points(config: EvalConfig, sizes: dict[int, int]) -> list[tuple[int, int]]:
    """(budget, rank) points of the trade-off: every budget with every rank whose adapter alone fits in it."""
    points, dropped = [], []
    for budget in config.budget_bytes:
        for rank in config.budget_ranks:
            (points if sizes[rank] < budget else dropped).append((budget, rank))
    for budget, rank in dropped:
        warn(
            f"budget {format_size(budget)}: a rank-{rank} adapter alone takes {format_size(sizes[rank])}; "
            "that point is left out"
        )
    if config.budget_bytes and not points:
        raise LoramemError(
            f"no adapter of ranks {', '.join(map(str, config.budget_ranks))} fits in any budget; "
            "add rank 0 (KV only), smaller ranks or larger budgets"
        )
    if config.budget_bytes and not any(rank for _, rank in points) and any(config.budget_ranks):
        warn("no budget holds any of the adapters; only KV-only points remain")
    return points


def _grid(record: DocRecord, config: EvalConfig, points: list[tuple[int, int]]) -> list[_Cell]:
    """Every cell of a document, grouped by press and ratio so each compressed cache is built once; library modes
    once per question, outside the press and ratio grid; budget points (base KV, adapter on for decoding) last."""
    kv_modes = [m for m in config.modes if m not in LIBRARY_MODES]
    library_modes = [m for m in config.modes if m in LIBRARY_MODES]
    questions = range(len(record.qa))
    return (
        [
            _Cell(q, press, ratio, mode, fmt, granularity, store)
            for press in config.presses
            for granularity in config.granularities
            for store in config.store_dtypes
            for ratio in config.ratios
            for mode in kv_modes
            for fmt in ([None] if mode == "none" else config.formats)
            for q in questions
        ]
        + [_Cell(q, LIBRARY_SERIES, 1.0, mode, None) for mode in library_modes for q in questions]
        + [
            _Cell(q, press, None, "decode" if rank else "none", fmt, store=store, budget=budget, rank=rank)
            for press in config.presses
            for store in config.store_dtypes
            for budget, rank in points
            for fmt in (config.formats if rank else [None])
            for q in questions
        ]
    )


def key_of(record: DocRecord, cell: _Cell, groups: int) -> tuple:
    """The cell's key as report.cell_key reads it from an answer line."""
    return (record.id, cell.question_index, cell.press, cell.ratio, cell.mode, cell.format, cell.variant(groups))


def _check_same(
    old: dict[str, Any], new: dict[str, Any], where: Path, action: str, ignore: tuple[str, ...] = ()
) -> None:
    """Refuse to combine answers made under another config, model or dataset."""
    if old["model"].get("model") != new["model"].get("model"):
        raise IncompatibleArtifactError(
            f"{where} was made with another model ({old['model'].get('id')}); cannot {action}"
        )
    if old["dataset"]["sha256"] != new["dataset"]["sha256"]:
        raise LoramemError(f"{where} was made from another dataset ({old['dataset']['path']}); cannot {action}")
    changed = [
        f"{k} (was {old['config'].get(k)!r}, now {new['config'].get(k)!r})"
        for k in sorted({*old["config"], *new["config"]} - set(ignore))
        if old["config"].get(k) != new["config"].get(k)
    ]
    if changed:
        raise LoramemError(f"{where} was run with another config; cannot {action}: {'; '.join(changed)}")


def _open_run(run: Path, header: dict[str, Any], resume: bool) -> set[tuple]:
    """Start a run directory, or (resume) check it matches and return the cells already answered."""
    if run.exists() and not run.is_dir():
        raise LoramemError(f"{run} is a file; --out needs a directory")
    if run.exists() and any(run.iterdir()):
        if not resume:
            raise LoramemError(f"{run} is not empty; add --resume to continue that run, or choose another --out")
        old = read_json(run / CONFIG, "cannot resume")
        _check_same(old, header, run, "resume it", ignore=("limit",))
        if old["config"].get("limit") != header["config"]["limit"]:  # a resume may widen or narrow the run
            atomic_write_bytes(
                run / CONFIG, (json.dumps({**header, "created": old["created"]}, indent=2) + "\n").encode()
            )
        return done_cells(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoramemError(f"cannot create {run}: {exc.strerror}") from exc
    atomic_write_bytes(run / CONFIG, (json.dumps(header, indent=2) + "\n").encode())
    return set()


def done_cells(run: Path) -> set[tuple]:
    """Cells answered in RUN_DIR/answers.jsonl or in a worker's part file (PARTS/*.jsonl) not yet folded in."""
    files = [run / ANSWERS, *sorted((run / PARTS).glob("*.jsonl"))]
    return {cell_key(row) for file in files for row in read_answers(file, repair=True)}


def fold_parts(run: Path) -> None:
    """Move the answers of workers' part files into RUN_DIR/answers.jsonl (atomically), then drop the parts."""
    parts = sorted((run / PARTS).glob("*.jsonl"))
    if not parts:
        return
    rows = {cell_key(row): row for row in read_answers(run / ANSWERS)}
    for part in parts:
        for row in read_answers(part):
            rows.setdefault(cell_key(row), row)
    atomic_write_bytes(run / ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()).encode())
    for part in parts:
        part.unlink()


def model_info(lm: LoadedModel) -> dict[str, Any]:
    """The model as a run's config.json records it; a resume or merge must match it."""
    return {"id": lm.model_id, **lm.fingerprint}


def _header(
    model: dict[str, Any], config: EvalConfig, dataset: Path, sha: str, plans: list[tuple[DocRecord, list[_Cell]]]
) -> dict[str, Any]:
    return {
        "loramem_version": __version__,
        "config": config.to_dict(),
        "model": model,
        "dataset": {"path": str(dataset.resolve()), "sha256": sha},
        "documents": {record.id: len(cells) for record, cells in plans},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class AnswerLog:
    """Appends answer lines durably (flush + fsync each), so an interruption loses at most the line being written."""

    def __init__(self, path: Path, advance: Callable[..., None] = lambda n: None) -> None:
        self.handle = path.open("a", encoding="utf-8")
        self.advance = advance

    def write(self, row: dict[str, Any]) -> None:
        self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.advance(1)

    def close(self) -> None:
        self.handle.close()


@dataclass
class RunPlan:
    """What a run has left to do: documents with their unanswered cells, in dataset order."""

    run: Path
    todo: list[tuple[DocRecord, list[_Cell]]]
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
    config: EvalConfig,
    *,
    resume: bool = False,
    sizes: dict[int, int] | None = None,
) -> RunPlan:
    """Read and check the dataset, open (or resume) RUN_DIR, and list the cells still to answer.

    `sizes`: the adapter bytes of each budget rank (`budget_sizes`), needed when the config has budgets.
    """
    if str(dataset) == "-":
        raise LoramemError("eval needs a dataset file, not stdin (resuming and sharding read it again)")
    data, _ = read_input_bytes(dataset, "dataset")
    documents = select_documents(load_dataset(dataset), config.limit, (0, 1))
    records = select_documents(documents, None, config.shard)
    if not records:
        raise LoramemError(f"shard {config.shard[0]}/{config.shard[1]} of {dataset} holds no documents")
    run = Path(run_dir)
    if config.budget_bytes and sizes is None:
        raise LoramemError("a run with byte budgets needs the adapter sizes of its model (budget_sizes)")
    points = budget_points(config, sizes or {})
    grids = [(record, _grid(record, config, points)) for record in records]
    if config.adapters is not None:
        needed = (
            [(r, fmt, None) for r in records for fmt in config.formats]
            if any(m in ADAPTER_MODES for m in config.modes) and config.ratios
            else []
        )
        if config.uses_library and config.library is None:
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
            _check_adapter(path, record, fmt, rank)
    if config.uses_library:
        _check_library(model, documents, config)
    done = _open_run(run, _header(model, config, Path(dataset), sha256_bytes(data), grids), resume)
    todo = [(record, [c for c in cells if key_of(record, c, config.groups) not in done]) for record, cells in grids]
    plan = RunPlan(run, [(record, cells) for record, cells in todo if cells], documents)
    log(
        f"{len(records)} documents, {sum(len(c) for _, c in grids)} answers in the grid, {len(done)} done, "
        f"{plan.n_cells} to do -> {run}"
    )
    return plan


def run_eval(
    lm: LoadedModel,
    dataset: str | Path,
    run_dir: str | Path,
    config: EvalConfig,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Answer every cell of the grid not yet in RUN_DIR/answers.jsonl, then write the summary and curves.

    Returns the summary (see `loramem.evaluation.report.summarize`). `lm` is left without an adapter.
    """
    plan = prepare_run(model_info(lm), dataset, run_dir, config, resume=resume, sizes=budget_sizes(lm, config))
    with progress_bar("evaluating", plan.n_cells) as advance:
        answers = AnswerLog(plan.run / ANSWERS, advance)
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


def record_failures(run: Path, failures: list[dict[str, Any]]) -> None:
    """RUN_DIR/failures.json lists documents whose cells could not be answered; none: the file is removed."""
    if failures:
        atomic_write_bytes(run / FAILURES, (json.dumps(failures, indent=2) + "\n").encode())
    else:
        (run / FAILURES).unlink(missing_ok=True)


def evaluate_document(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[_Cell],
    config: EvalConfig,
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
    cells: list[_Cell],
    config: EvalConfig,
    run: Path,
    answers: AnswerLog,
    status: Callable[[str], None],
) -> None:
    library_cells = [c for c in cells if c.mode in LIBRARY_MODES]
    budget_cells = [c for c in cells if c.budget is not None]
    cells = [c for c in cells if c.mode not in LIBRARY_MODES and c.budget is None]
    if library_cells:
        _answer_library(lm, record, library_cells, config, run, answers, status)
    base: KVCache | None = None
    if budget_cells or any(c.mode != "all" for c in cells):
        status("base prefill")
        base = encode(lm, record.document, presses=config.presses)
    if budget_cells:
        _answer_budget(lm, record, budget_cells, base, config, run, answers, status)
    status("answering")
    _answer(
        lm, record, [c for c in cells if c.mode == "none"], lambda c: _kept(base, c, config), False, config, answers
    )
    for fmt in config.formats:
        mine = [c for c in cells if c.format == fmt]
        if not mine:
            continue
        attach_adapter(lm, _adapter(lm, record, fmt, config, run, status))
        status(f"answering with the {fmt} adapter")
        _answer(
            lm, record, [c for c in mine if c.mode == "decode"], lambda c: _kept(base, c, config), True, config, answers
        )
        if any(c.mode in ("all", "base_scores") for c in mine):
            status(f"prefill with the {fmt} adapter")
            own = encode(lm, record.document, presses=config.presses, with_adapter=True)
            status(f"answering with the {fmt} adapter")
            _answer(
                lm, record, [c for c in mine if c.mode == "all"], lambda c: _kept(own, c, config), True, config, answers
            )
            _answer(
                lm,
                record,
                [c for c in mine if c.mode == "base_scores"],
                lambda c: _kept(own, c, config, scores_from=base),
                True,
                config,
                answers,
            )
    detach_adapter(lm)


def _storage(store: str, cache: KVCache) -> Storage | None:
    """A cell's storage for this cache; None keeps the cache's own dtype."""
    return None if store == "native" else make_storage(store, head_dim=cache.meta["head_dim"])


def _kept(cache: KVCache, cell: _Cell, config: EvalConfig, scores_from: KVCache | None = None) -> KVCache:
    """What a cell's cache keeps: token eviction at its ratio, or value groups at budget 1 - ratio, as stored."""
    storage = _storage(cell.store, cache)
    if cell.granularity == "value-group" and cell.ratio < 1.0:  # at 1.0 no document KV remains either way
        small = compress_value_groups(cache, cell.press, config.groups, 1.0 - cell.ratio)
        return restore(small, storage) if storage is not None else small
    return compress(cache, cell.press, ratio=cell.ratio, scores_from=scores_from, storage=storage)


def _answer(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[_Cell],
    cache_for: Callable[[_Cell], KVCache],
    adapter_on: bool,
    config: EvalConfig,
    answers: AnswerLog,
    extra: Callable[[_Cell, KVCache], dict[str, Any]] = lambda cell, cache: {},
) -> None:
    """Answer cells, building each kept cache once; `seconds` is the answer's own generation time, `extra` adds
    fields to each answer line from its cache."""
    groups: dict[tuple, list[_Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.press, cell.ratio, cell.granularity, cell.store, cell.budget), []).append(cell)
    for group in groups.values():
        cache = cache_for(group[0])
        for cell in group:
            qa = record.qa[cell.question_index]
            started = time.perf_counter()
            answer = generate(lm, qa.question, cache, max_new_tokens=config.max_new_tokens, adapter_on=adapter_on)
            row = _row(record, cell, config, answer, time.perf_counter() - started, cache.nbytes_stored)
            answers.write({**row, **extra(cell, cache)})


def _answer_budget(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[_Cell],
    base: KVCache,
    config: EvalConfig,
    run: Path,
    answers: AnswerLog,
    status: Callable[[str], None],
) -> None:
    """Budget points: the adapter's stored bytes come off the budget and the rest buys the press's top document
    tokens, as stored (rank 0 spends it all on KV; the framing around the document is not counted, see
    `within_budget`); the adapter is on for the question and answer only."""
    points: dict[tuple[str | None, int], list[_Cell]] = {}
    for cell in cells:
        points.setdefault((cell.format, cell.rank), []).append(cell)
    for (fmt, rank), mine in points.items():
        adapter_bytes = 0
        if fmt is not None:
            path = _adapter(lm, record, fmt, config, run, status, rank)
            attach_adapter(lm, path)
            adapter_bytes = adapter_tensor_bytes(path)
        status(f"answering within budgets, adapter rank {rank}")

        def fields(cell: _Cell, cache: KVCache) -> dict[str, Any]:  # called within this iteration only
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

        _answer(
            lm,
            record,
            mine,
            lambda c: within_budget(base, c.press, c.budget - adapter_bytes, _storage(c.store, base)),
            fmt is not None,
            config,
            answers,
            fields,
        )
        detach_adapter(lm)


def _row(
    record: DocRecord, cell: _Cell, config: EvalConfig, answer: Answer, seconds: float, kv_bytes: int
) -> dict[str, Any]:
    """An answer line of answers.jsonl, scored against the question's references."""
    qa = record.qa[cell.question_index]
    return {
        "doc_id": record.id,
        "question_index": cell.question_index,
        "question": qa.question,
        "references": qa.answers,
        "press": cell.press,
        "ratio": cell.ratio,
        "mode": cell.mode,
        "format": cell.format,
        "variant": cell.variant(config.groups),
        "answer": answer.answer,
        **score_answer(answer.answer, qa.answers),
        "cache_tokens": answer.cache_tokens,
        "kv_bytes": kv_bytes,
        "seconds": round(seconds, 4),
    }


def library_path(config: EvalConfig, run: Path) -> Path:
    """The library that library modes route over: --library, else the one the run builds in RUN_DIR/library."""
    return Path(config.library) if config.library is not None else run / LIBRARY


def _check_library(model: dict[str, Any], documents: list[DocRecord], config: EvalConfig) -> None:
    """Before the run starts: --library must be of this model and hold every document of the run, and the
    library (given or to be built) must hold at least --library-top-k documents."""
    n = len({sha256_text(r.document) for r in documents})
    if config.library is not None:
        lib = open_library(config.library)
        check_model(lib, model)
        held = {d["sha256"] for d in lib.documents}
        missing = [r.id for r in documents if sha256_text(r.document) not in held]
        if missing:
            raise LoramemError(
                f"--library {config.library} lacks {len(missing)} of the run's documents (first: "
                f"{missing[0]}); add them with loramem library add, or leave out --library"
            )
        n = len(lib.documents)
    if config.library_top_k > n:
        raise LoramemError(f"--library-top-k {config.library_top_k} is more than the library's {n} documents")


def build_library(
    lm: LoadedModel,
    documents: list[DocRecord],
    config: EvalConfig,
    run: Path,
    status: Callable[[str], None] = lambda text: None,
) -> Path:
    """The run's library: --library as given, else RUN_DIR/library holding every document of the run (all shards,
    so routing does not depend on sharding), each added once with the run's qa adapter (from --adapters or
    RUN_DIR/adapters, trained there if missing). A resume with a wider --limit adds the new documents; each answer
    records how many documents its routing chose from (`library_documents`)."""
    path = library_path(config, run)
    if config.library is not None:
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

            adapter = _adapter(lm, record, "qa", config, run, step)
            source = Path(tmp) / f"{file_name(record.id)}.txt"
            source.write_bytes(record.document.encode("utf-8"))
            step("adding it to the library")
            add_documents(
                path, lm, [str(source)], AddOptions(adapter=str(adapter), doc_id=file_name(record.id)), embedder
            )
    return path


def _answer_library(
    lm: LoadedModel,
    record: DocRecord,
    cells: list[_Cell],
    config: EvalConfig,
    run: Path,
    answers: AnswerLog,
    status: Callable[[str], None],
) -> None:
    """Library cells of one document: each question routed once and its adapters merged first (a merge detaches
    the model's adapter), then answered grouped by adapter, so each adapter is attached once."""
    lib = open_library(library_path(config, run))
    gold = {d["sha256"]: d["id"] for d in lib.documents}.get(sha256_text(record.document))
    if gold is None:
        raise LoramemError(f"library {lib.path} does not hold this document")
    embedder = library_embedder(lib)
    merge = MergeConfig(method=config.merge)
    status("routing and merging")
    routing: dict[int, dict[str, Any]] = {}
    chunks: dict[int, list[Any]] = {}
    for q in sorted({c.question_index for c in cells}):
        question = record.qa[q].question
        routed = route(lib, question, config.library_top_k, embedder)
        ids = [i for i, _ in routed]
        routing[q] = {
            "routed": [{"id": i, "score": round(s, 6)} for i, s in routed],
            "routed_gold": gold in ids,
            "gold_rank": ids.index(gold) + 1 if gold in ids else None,
            "library_documents": len(lib.documents),
        }
        if any(c.question_index == q and c.mode in ("hybrid", "rag") for c in cells):
            chunks[q] = retrieve_chunks(lib, question, config.context_chunks, embedder)
    jobs = []
    for cell in cells:
        ids = [r["id"] for r in routing[cell.question_index]["routed"]]
        if cell.mode == "oracle":
            adapter = lib.adapter_dir(gold)
        elif cell.mode == "routed":
            adapter = lib.adapter_dir(ids[0])
        elif cell.mode in ("routed-merge", "hybrid"):
            adapter = routed_adapter(lm, lib, ids, merge)
        else:
            adapter = None
        jobs.append((cell, adapter))
    contexts: dict[int, KVCache] = {}
    status("answering from the library")
    for cell, adapter in sorted(jobs, key=lambda job: str(job[1] or "")):
        if adapter is None:
            detach_adapter(lm)
        else:
            use_adapter(lm, adapter)
        q = cell.question_index
        cache = None
        if cell.mode in ("hybrid", "rag"):
            if q not in contexts:
                contexts[q] = context_cache(lm, chunks[q])
            cache = contexts[q]
        started = time.perf_counter()
        answer = generate(
            lm, record.qa[q].question, cache, max_new_tokens=config.max_new_tokens, adapter_on=adapter is not None
        )
        row = _row(record, cell, config, answer, time.perf_counter() - started, cache.nbytes_stored if cache else 0)
        answers.write(
            {
                **row,
                **routing[q],
                "adapter": str(adapter.relative_to(lib.path)) if adapter else None,
                "context_chunks": [[c.doc_id, c.index] for c in chunks[q]] if cache else [],
            }
        )
    detach_adapter(lm)


def adapter_name(doc_id: str, fmt: str, rank: int | None, config: EvalConfig) -> str:
    """DOCID-FORMAT, or DOCID-FORMAT-rRANK for a budget point's rank other than the run's --rank."""
    name = f"{file_name(doc_id)}-{fmt}"
    return name if rank is None or rank == config.rank else f"{name}-r{rank}"


def _adapter(
    lm: LoadedModel,
    record: DocRecord,
    fmt: str,
    config: EvalConfig,
    run: Path,
    status: Callable[[str], None],
    rank: int | None = None,
) -> Path:
    """The document's adapter for a format (and rank): reused from --adapters or RUN_DIR/adapters, else trained
    there."""
    name = adapter_name(record.id, fmt, rank, config)
    if config.adapters is not None:
        return Path(config.adapters) / name
    path = run / ADAPTERS / name
    what = f"{fmt} adapter" + (f" (rank {rank})" if rank is not None else "")
    if not path.exists():
        qa = _training_pairs(lm, record, config, run, status) if fmt in ("qa", "mixed") else []
        path.parent.mkdir(exist_ok=True)
        status(f"training the {what}")
        train_adapter(
            lm,
            record.document,
            qa,
            path,
            config.train_config(fmt, rank),
            on_step=lambda step, total, loss: status(f"training the {what}, step {step}/{total}"),
        )
    _check_adapter(path, record, fmt, rank)
    return path


def _check_adapter(path: Path, record: DocRecord, fmt: str, rank: int | None = None) -> None:
    """An adapter made for this document, format and rank (the model is checked when it is attached)."""
    config, meta = read_adapter_meta(path)
    if meta.get("document_sha256") != sha256_text(record.document):
        raise IncompatibleArtifactError(f"adapter {path} was trained on another document than {record.id}")
    if meta.get("format") != fmt:
        raise IncompatibleArtifactError(f"adapter {path} was trained with format {meta.get('format')}, not {fmt}")
    if rank is not None and config.get("r") != rank:
        raise IncompatibleArtifactError(f"adapter {path} has rank {config.get('r')}, not {rank}")


def _training_pairs(
    lm: LoadedModel, record: DocRecord, config: EvalConfig, run: Path, status: Callable[[str], None]
) -> list[tuple[str, str]]:
    """The record's train_qa, or pairs synthesized once and kept in RUN_DIR/train_qa/ for resumes."""
    if record.train_qa:
        return [(t.question, t.answer) for t in record.train_qa]
    path = run / SYNTH_QA / f"{file_name(record.id)}.jsonl"
    if not path.exists():
        status(f"synthesizing {config.synth_pairs} training pairs")
        pairs = synthesize(lm, record.document, config.synth_pairs, config.seed)
        path.parent.mkdir(exist_ok=True)
        lines = "".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n" for q, a in pairs)
        atomic_write_bytes(path, lines.encode("utf-8"))
    return [(p.question, p.answer) for p in load_qa_pairs(path)[0]]


def merge(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Combine shard runs of one config into a new run directory (answers deduplicated by cell) and summarize it.

    The merged config.json covers the whole dataset (shard 0/1), so `--resume` on it fills any gap.
    """
    if not run_dirs:
        raise LoramemError("give at least one run directory to merge")
    dirs = [Path(d) for d in run_dirs]
    headers = [read_json(d / CONFIG, "cannot merge it") for d in dirs]
    for where, header in zip(dirs[1:], headers[1:]):
        _check_same(headers[0], header, where, f"merge it with {dirs[0]}", ignore=("shard",))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoramemError(f"{out} is not empty; merge into a new directory")
    rows: dict[tuple, dict[str, Any]] = {}
    for where in dirs:
        for row in read_answers(where / ANSWERS):
            rows.setdefault(cell_key(row), row)
    documents: dict[str, int] = {}
    for header in headers:
        documents.update(header["documents"])
    shards = {tuple(h["config"]["shard"]) for h in headers}
    if len({n for _, n in shards}) != 1 or len(shards) != next(iter(shards))[1]:
        warn(
            f"the merged runs are shards {', '.join(f'{i}/{n}' for i, n in sorted(shards))}, not all of one "
            "split; the merge covers only their documents"
        )
    merged = {
        **headers[0],
        "config": {**headers[0]["config"], "shard": [0, 1]},
        "documents": documents,
        "merged_from": [str(d.resolve()) for d in dirs],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoramemError(f"cannot create {out}: {exc.strerror}") from exc
    atomic_write_bytes(out / CONFIG, (json.dumps(merged, indent=2) + "\n").encode())
    atomic_write_bytes(out / ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()).encode())
    return write_report(out)
