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
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loramem import __version__
from loramem.adapters import attach_adapter, detach_adapter, read_adapter_meta
from loramem.cache import KVCache
from loramem.compress import compress, restore
from loramem.datasets import DocRecord, load_dataset, load_qa_pairs
from loramem.encode import encode
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.fileio import atomic_write_bytes, read_input_bytes
from loramem.generate import generate
from loramem.log import log, progress_bar, warn
from loramem.metrics import score_answer
from loramem.models import LoadedModel, sha256_bytes, sha256_text
from loramem.presses import parse_presses
from loramem.quantize import make_storage
from loramem.report import ANSWERS, CONFIG, FAILURES, MODES, cell_key, read_answers, read_json, write_report
from loramem.synth import synthesize
from loramem.train import FORMATS, TrainConfig, train_adapter
from loramem.value_groups import compress_value_groups

ADAPTER_MODES = ("decode", "all", "base_scores")
ADAPTERS = "adapters"
PARTS = "parts"
GRANULARITIES = ("token", "value-group")
STORE_DTYPES = ("native", "fp16", "bf16", "int8", "int4")
SYNTH_QA = "train_qa"
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
        if not self.ratios or not self.modes:
            raise LoramemError("give at least one ratio and one mode")
        if any(m in ADAPTER_MODES for m in self.modes) and not self.formats:
            raise LoramemError("adapter modes need at least one training format (--format qa,ntp)")
        index, count = self.shard = (int(self.shard[0]), int(self.shard[1]))
        if not 0 <= index < count:
            raise LoramemError(f"bad shard {index}/{count}; use I/N with 0 <= I < N")
        for name in ("limit", "max_new_tokens", "synth_pairs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LoramemError(f"{name} must be at least 1, got {value}")
        if self.adapters is not None:
            self.adapters = str(Path(self.adapters).resolve())
        for fmt in self.formats:
            self.train_config(fmt)

    def train_config(self, fmt: str) -> TrainConfig:
        """The adapter hyperparameters for one training format."""
        return TrainConfig(format=fmt, rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                           layers=self.layers, lr=self.lr, epochs=self.epochs, steps=self.steps,
                           batch_size=self.batch_size, seed=self.seed, max_length=self.max_length,
                           chunk_size=self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        """As config.json stores it (JSON types), so a stored config compares equal to a fresh one."""
        return json.loads(json.dumps(asdict(self)))


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
    ratio: float
    mode: str
    format: str | None
    granularity: str = "token"
    store: str = "native"

    def variant(self, groups: int) -> str:
        """How the kept KV is cut and stored, as answers.jsonl names it: e.g. token, value-group/4 int8."""
        return variant_name(self.granularity, groups, self.store)


def variant_name(granularity: str, groups: int, store: str) -> str:
    name = granularity if granularity == "token" else f"{granularity}/{groups}"
    return name if store == "native" else f"{name} {store}"


def _grid(record: DocRecord, config: EvalConfig) -> list[_Cell]:
    """Every cell of a document, grouped by press and ratio so each compressed cache is built once."""
    return [_Cell(q, press, ratio, mode, fmt, granularity, store)
            for press in config.presses for granularity in config.granularities for store in config.store_dtypes
            for ratio in config.ratios for mode in config.modes
            for fmt in ([None] if mode == "none" else config.formats) for q in range(len(record.qa))]


def key_of(record: DocRecord, cell: _Cell, groups: int) -> tuple:
    """The cell's key as report.cell_key reads it from an answer line."""
    return (record.id, cell.question_index, cell.press, cell.ratio, cell.mode, cell.format,
            cell.variant(groups))


def _check_same(old: dict[str, Any], new: dict[str, Any], where: Path, action: str,
                ignore: tuple[str, ...] = ()) -> None:
    """Refuse to combine answers made under another config, model or dataset."""
    if old["model"].get("model") != new["model"].get("model"):
        raise IncompatibleArtifactError(
            f"{where} was made with another model ({old['model'].get('id')}); cannot {action}")
    if old["dataset"]["sha256"] != new["dataset"]["sha256"]:
        raise LoramemError(f"{where} was made from another dataset ({old['dataset']['path']}); cannot {action}")
    changed = [f"{k} (was {old['config'].get(k)!r}, now {new['config'].get(k)!r})"
               for k in sorted({*old["config"], *new["config"]} - set(ignore))
               if old["config"].get(k) != new["config"].get(k)]
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
            atomic_write_bytes(run / CONFIG, (json.dumps({**header, "created": old["created"]}, indent=2)
                                              + "\n").encode())
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


def _header(model: dict[str, Any], config: EvalConfig, dataset: Path, sha: str,
            plans: list[tuple[DocRecord, list[_Cell]]]) -> dict[str, Any]:
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

    @property
    def n_cells(self) -> int:
        return sum(len(cells) for _, cells in self.todo)


def prepare_run(model: dict[str, Any], dataset: str | Path, run_dir: str | Path, config: EvalConfig,
                *, resume: bool = False) -> RunPlan:
    """Read and check the dataset, open (or resume) RUN_DIR, and list the cells still to answer."""
    if str(dataset) == "-":
        raise LoramemError("eval needs a dataset file, not stdin (resuming and sharding read it again)")
    data, _ = read_input_bytes(dataset, "dataset")
    records = select_documents(load_dataset(dataset), config.limit, config.shard)
    if not records:
        raise LoramemError(f"shard {config.shard[0]}/{config.shard[1]} of {dataset} holds no documents")
    run = Path(run_dir)
    grids = [(record, _grid(record, config)) for record in records]
    if config.adapters is not None and any(m in ADAPTER_MODES for m in config.modes):
        for record in records:
            for fmt in config.formats:
                path = Path(config.adapters) / f"{file_name(record.id)}-{fmt}"
                if not path.is_dir():
                    raise LoramemError(f"--adapters {config.adapters} has no {fmt} adapter for document "
                                       f"{record.id} (expected {path})")
                _check_adapter(path, record, fmt)
    done = _open_run(run, _header(model, config, Path(dataset), sha256_bytes(data), grids), resume)
    todo = [(record, [c for c in cells if key_of(record, c, config.groups) not in done]) for record, cells in grids]
    plan = RunPlan(run, [(record, cells) for record, cells in todo if cells])
    log(f"{len(records)} documents, {sum(len(c) for _, c in grids)} answers in the grid, {len(done)} done, "
        f"{plan.n_cells} to do -> {run}")
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

    Returns the summary (see `loramem.report.summarize`). `lm` is left without an adapter.
    """
    plan = prepare_run(model_info(lm), dataset, run_dir, config, resume=resume)
    with progress_bar("evaluating", plan.n_cells) as advance:
        answers = AnswerLog(plan.run / ANSWERS, advance)
        try:
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


def evaluate_document(lm: LoadedModel, record: DocRecord, cells: list[_Cell], config: EvalConfig, run: Path,
                      answers: AnswerLog, status: Callable[[str], None] = lambda text: None) -> None:
    """All remaining cells of one document: one base prefill, one adapter (and prefill) per format.

    Errors are re-raised with the document's id in front.
    """
    try:
        _evaluate_document(lm, record, cells, config, run, answers, status)
    except LoramemError as exc:
        raise type(exc)(f"document {record.id}: {exc}") from exc


def _evaluate_document(lm: LoadedModel, record: DocRecord, cells: list[_Cell], config: EvalConfig, run: Path,
                       answers: AnswerLog, status: Callable[[str], None]) -> None:
    base: KVCache | None = None
    if any(c.mode != "all" for c in cells):
        status("base prefill")
        base = encode(lm, record.document, presses=config.presses)
    status("answering")
    _answer(lm, record, [c for c in cells if c.mode == "none"], lambda c: _kept(base, c, config), False, config,
            answers)
    for fmt in config.formats:
        mine = [c for c in cells if c.format == fmt]
        if not mine:
            continue
        attach_adapter(lm, _adapter(lm, record, fmt, config, run, status))
        status(f"answering with the {fmt} adapter")
        _answer(lm, record, [c for c in mine if c.mode == "decode"], lambda c: _kept(base, c, config), True,
                config, answers)
        if any(c.mode in ("all", "base_scores") for c in mine):
            status(f"prefill with the {fmt} adapter")
            own = encode(lm, record.document, presses=config.presses, with_adapter=True)
            status(f"answering with the {fmt} adapter")
            _answer(lm, record, [c for c in mine if c.mode == "all"], lambda c: _kept(own, c, config), True,
                    config, answers)
            _answer(lm, record, [c for c in mine if c.mode == "base_scores"],
                    lambda c: _kept(own, c, config, scores_from=base), True, config, answers)
    detach_adapter(lm)


def _kept(cache: KVCache, cell: _Cell, config: EvalConfig, scores_from: KVCache | None = None) -> KVCache:
    """What a cell's cache keeps: token eviction at its ratio, or value groups at budget 1 - ratio, as stored."""
    storage = None if cell.store == "native" else make_storage(cell.store, head_dim=cache.meta["head_dim"])
    if cell.granularity == "value-group" and cell.ratio < 1.0:  # at 1.0 no document KV remains either way
        small = compress_value_groups(cache, cell.press, config.groups, 1.0 - cell.ratio)
        return restore(small, storage) if storage is not None else small
    return compress(cache, cell.press, ratio=cell.ratio, scores_from=scores_from, storage=storage)


def _answer(lm: LoadedModel, record: DocRecord, cells: list[_Cell], cache_for: Callable[[_Cell], KVCache],
            adapter_on: bool, config: EvalConfig, answers: AnswerLog) -> None:
    """Answer cells, building each kept cache once; `seconds` is the answer's own generation time."""
    groups: dict[tuple, list[_Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.press, cell.ratio, cell.granularity, cell.store), []).append(cell)
    for group in groups.values():
        cache = cache_for(group[0])
        for cell in group:
            qa = record.qa[cell.question_index]
            started = time.perf_counter()
            answer = generate(lm, qa.question, cache, max_new_tokens=config.max_new_tokens, adapter_on=adapter_on)
            seconds = time.perf_counter() - started
            answers.write({
                "doc_id": record.id, "question_index": cell.question_index, "question": qa.question,
                "references": qa.answers, "press": cell.press, "ratio": cell.ratio, "mode": cell.mode,
                "format": cell.format, "variant": cell.variant(config.groups),
                "answer": answer.answer, **score_answer(answer.answer, qa.answers),
                "cache_tokens": answer.cache_tokens, "kv_bytes": cache.nbytes_stored, "seconds": round(seconds, 4),
            })


def _adapter(lm: LoadedModel, record: DocRecord, fmt: str, config: EvalConfig, run: Path,
             status: Callable[[str], None]) -> Path:
    """The document's adapter for a format: reused from --adapters or RUN_DIR/adapters, else trained there."""
    name = f"{file_name(record.id)}-{fmt}"
    if config.adapters is not None:
        return Path(config.adapters) / name
    path = run / ADAPTERS / name
    if not path.exists():
        qa = _training_pairs(lm, record, config, run, status) if fmt in ("qa", "mixed") else []
        path.parent.mkdir(exist_ok=True)
        status(f"training the {fmt} adapter")
        train_adapter(lm, record.document, qa, path, config.train_config(fmt),
                      on_step=lambda step, total, loss: status(f"training the {fmt} adapter, step {step}/{total}"))
    _check_adapter(path, record, fmt)
    return path


def _check_adapter(path: Path, record: DocRecord, fmt: str) -> None:
    """An adapter made for this document and format (the model is checked when it is attached)."""
    _, meta = read_adapter_meta(path)
    if meta.get("document_sha256") != sha256_text(record.document):
        raise IncompatibleArtifactError(f"adapter {path} was trained on another document than {record.id}")
    if meta.get("format") != fmt:
        raise IncompatibleArtifactError(f"adapter {path} was trained with format {meta.get('format')}, not {fmt}")


def _training_pairs(lm: LoadedModel, record: DocRecord, config: EvalConfig, run: Path,
                    status: Callable[[str], None]) -> list[tuple[str, str]]:
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
        warn(f"the merged runs are shards {', '.join(f'{i}/{n}' for i, n in sorted(shards))}, not all of one "
             "split; the merge covers only their documents")
    merged = {**headers[0], "config": {**headers[0]["config"], "shard": [0, 1]}, "documents": documents,
              "merged_from": [str(d.resolve()) for d in dirs],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoramemError(f"cannot create {out}: {exc.strerror}") from exc
    atomic_write_bytes(out / CONFIG, (json.dumps(merged, indent=2) + "\n").encode())
    atomic_write_bytes(out / ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()).encode())
    return write_report(out)
