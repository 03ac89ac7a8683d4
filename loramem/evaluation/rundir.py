"""The run folder: its files, config.json header checks, answers.jsonl I/O, resume, parts and shards."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pydantic import ValidationError

from loramem._version import __version__
from loramem.answer import Answer
from loramem.data.formats import DocRecord
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.evaluation.config import AnswerRow, Cell, resumed_spec
from loramem.evaluation.metrics import score_answer
from loramem.fileio import atomic_write_bytes, locked_folder
from loramem.model.loading import LoadedModel
from loramem.model.prompt import check_template_record
from loramem.specs import EvalSpec, SpecError
from loramem.specs.base import flatten, spec_error
from loramem.specs.eval import RECORD_VERSION, RESIZABLE
from loramem.vocab import MERGE_MODES

ADAPTERS = "adapters"


PARTS = "parts"


SYNTH_QA = "train_qa"
VIEWS = "train_views"  # format mixed: each document's views, written once


LIBRARY = "library"


ANSWERS = "answers.jsonl"


CONFIG = "config.json"


SUMMARY = "summary.json"


CURVES = "curves.png"


CURVES_CONTAINS = "curves-contains.png"


BYTES_PLOT = "bytes.png"


BUDGET_PLOT = "budget.png"


BUDGET_PLOT_CONTAINS = "budget-contains.png"


LIBRARY_PLOT = "library.png"


FAILURES = "failures.json"


def cell_key(row: dict[str, Any]) -> CellKey:
    """What makes an answer unique in a run: one question under one press, ratio, mode, format and KV variant (and a
    merging library mode's merge and weighting)."""
    ratio = None if row["ratio"] is None else float(row["ratio"])  # budget points have no fixed ratio
    return (
        row["doc_id"],
        int(row["question_index"]),
        row["press"],
        ratio,
        row["mode"],
        row["format"],
        row.get("variant", "token"),
        row.get("merge"),
        row.get("merge_weights"),
    )


def series(row: dict[str, Any]) -> str:
    """The curve family of an answer: its press, plus the KV variant when not plain token eviction."""
    variant = row.get("variant", "token")
    return row["press"] if variant == "token" else f"{row['press']} [{variant}]"


def read_answers(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete answer lines of an answers.jsonl (`read_lines`)."""
    return read_lines(path, "answer line", AnswerRow.model_validate, repair=repair)


def read_lines(
    path: str | Path, what: str, check: Callable[[Any], Any], *, repair: bool = False
) -> list[dict[str, Any]]:
    """The complete JSON lines of a file appended to line by line (answers, probe points), each passed to `check`
    (which raises pydantic's ValidationError on a bad one); a trailing line without its newline is ignored.

    Each line is written ending in a newline, so a last line without one is the remainder of an interrupted write.
    `repair` cuts it off the file, so that appending continues on a clean line; a damaged line anywhere else is
    refused.
    """
    file = Path(path)
    if not file.exists():
        return []
    data = file.read_bytes()
    *lines, tail = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoramemError(f"{file}:{number}: not a valid {what} ({exc.msg})") from exc
        try:
            check(row)
        except ValidationError as exc:
            raise LoramemError(f"{file}:{number}: not a valid {what}: {spec_error(exc, None)}") from None
        rows.append(row)
    if tail and repair:
        with file.open("r+b") as handle:
            handle.truncate(len(data) - len(tail))
            os.fsync(handle.fileno())
    return rows


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a run directory, with a clear error when it is missing or damaged."""
    if not path.is_file():
        raise LoramemError(f"{path.parent} is not an eval run directory (no {path.name}); {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LoramemError(f"{path} is damaged: {exc.msg}") from exc


def _precision(model: dict[str, Any]) -> tuple[str, str] | None:
    runtime = model.get("runtime")
    return (runtime["dtype"], runtime["device"].split(":")[0]) if runtime else None


def check_same(
    old: dict[str, Any],
    new: dict[str, Any],
    where: Path,
    action: str,
    ignore: tuple[str, ...] = (),
    allow_mixed: bool = False,
) -> None:
    """Refuse to combine answers made under another config, model or dataset, or (unless `allow_mixed`) in another
    precision or on another kind of device (runs from before the runtime was recorded are not checked for it)."""
    if old["model"].get("model") != new["model"].get("model"):
        raise IncompatibleArtifactError(
            f"{where} was made with another model ({old['model'].get('id')}); cannot {action}"
        )
    check_template_record(old["model"], new["model"], f"{where} (cannot {action})")
    was, now = _precision(old["model"]), _precision(new["model"])
    if not allow_mixed and was and now and was != now:
        raise IncompatibleArtifactError(
            f"{where} was answered in {was[0]} on {was[1]}, this run is {now[0]} on {now[1]}; cannot {action} "
            "(--allow-mixed combines them, each answer keeps its runtime)"
        )
    if old["dataset"]["sha256"] != new["dataset"]["sha256"]:
        raise LoramemError(f"{where} was made from another dataset ({old['dataset']['path']}); cannot {action}")
    before, after = _settings(old["config"]), _settings(new["config"])
    changed = [
        f"{k} (was {before.get(k)!r}, now {after.get(k)!r})"
        for k in sorted({*before, *after} - set(ignore))
        if before.get(k) != after.get(k)
    ]
    if changed:
        raise LoramemError(f"{where} was run with another config; cannot {action}: {'; '.join(changed)}")


def _settings(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded config of any version, setting by setting (train.rank: 16), to compare with another."""
    return flatten(EvalSpec.from_record(record, "config.json").record())


@dataclass
class RunSettings:
    """What a run is made of before any model loads: its dataset, its spec, and (resuming) the model it recorded."""

    dataset: str
    spec: EvalSpec
    model: str | None = None  # the recorded model id (a resume loads it unless told otherwise)
    chat_template_kwargs: Any = None


def run_settings(
    run_dir: str | Path,
    dataset: str | Path | None = None,
    settings: EvalSpec | Mapping[str, Any] | None = None,
    *,
    resume: bool = False,
) -> RunSettings:
    """A run's dataset and spec. Resuming a run folder, both come from its config.json, with the settings given
    again (a full spec, or only some, as a mapping) checked against the record: all but RESIZABLE must agree."""
    run = Path(run_dir)
    if not (resume and (run / CONFIG).is_file()):
        if dataset is None:
            raise LoramemError("give a dataset (a JSONL file), or resume a run folder that recorded one")
        spec = settings if isinstance(settings, EvalSpec) else EvalSpec.parse(settings or {})
        return RunSettings(str(dataset), spec)
    header = read_json(run / CONFIG, "cannot resume")
    if isinstance(settings, EvalSpec):
        spec, was, now = settings, _settings(header["config"]), flatten(settings.record())
        disagree = [name for name in now if name not in RESIZABLE and was.get(name) != now[name]]
    else:
        spec, disagree = resumed_spec(header["config"], settings or {})
    if disagree:
        raise SpecError(
            [
                (
                    [tuple(name.split(".")) for name in disagree],
                    f"disagree with the run being resumed in {run}; leave them out to resume it as recorded (see its "
                    "config.json), or choose another run folder",
                )
            ]
        )
    model = header["model"]
    return RunSettings(
        str(dataset or header["dataset"]["path"]), spec, model.get("id"), model.get("chat_template_kwargs")
    )


P = ParamSpec("P")
R = TypeVar("R")


def output_folder(path: Path, noun: str) -> None:
    """An --out folder's place made ready: refused if a file is there, its parent created (one-line errors)."""
    if path.exists() and not path.is_dir():
        raise LoramemError(f"{path} is a file; --out needs {noun}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoramemError(f"cannot create {path}: {(exc.strerror or str(exc)).lower()}") from exc


def writes_run(argument: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a writer of a run folder (eval, its resume, a merge): the folder given as `argument` is locked
    while it runs, so a second writer is refused at once (two resumes would both append the same cells, and both
    train the same adapters) instead of corrupting the run; a folder it created but never wrote a config.json
    into is removed on failure."""

    def decorate(writer: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(writer)

        @functools.wraps(writer)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            run = Path(signature.bind(*args, **kwargs).arguments[argument])
            output_folder(run, "a directory")
            with locked_folder(run, "run folder", committed=CONFIG, wait=False):
                return writer(*args, **kwargs)

        return locked

    return decorate


def open_run(run: Path, header: dict[str, Any], resume: bool, allow_mixed: bool = False) -> set[tuple]:
    """Start a run directory, or (resume) check it matches and return the cells already answered."""
    if run.exists() and not run.is_dir():
        raise LoramemError(f"{run} is a file; --out needs a directory")
    if run.exists() and any(run.iterdir()):
        if not resume:
            raise LoramemError(f"{run} is not empty; add --resume to continue that run, or choose another --out")
        old = read_json(run / CONFIG, "cannot resume")
        check_same(old, header, run, "resume it", ignore=RESIZABLE, allow_mixed=allow_mixed)
        recorded = old["config"].get("version", 1)
        if recorded < RECORD_VERSION:
            record_merges(run, EvalSpec.from_record(old["config"], "config.json"))
        # A resume may widen or narrow the limits; an older record is rewritten once its answers are upgraded.
        was = _settings(old["config"])
        if any(was.get(n) != header["config"].get(n) for n in RESIZABLE) or recorded < RECORD_VERSION:
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


def record_merges(run: Path, spec: EvalSpec) -> None:
    """Answers of merging library modes from before a row recorded its merge (config versions 1 and 2: one merge
    method a run, equal weights) get the run's, so that a resume finds their cells answered."""
    for file in [run / ANSWERS, *sorted((run / PARTS).glob("*.jsonl"))]:
        rows = read_answers(file, repair=True)
        if not any(r["mode"] in MERGE_MODES and "merge" not in r for r in rows):
            continue
        merge = {"merge": spec.library.merge[0], "merge_weights": "equal"}
        upgraded = [{**r, **merge} if r["mode"] in MERGE_MODES and "merge" not in r else r for r in rows]
        atomic_write_bytes(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in upgraded).encode())


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
    """The model as a run's config.json records it; a resume or merge must match it (its runtime too, unless
    mixing is allowed)."""
    return {"id": lm.model_id, **lm.fingerprint, "runtime": lm.runtime()}


def run_header(
    model: dict[str, Any], config: EvalSpec, dataset: Path, sha: str, plans: list[tuple[DocRecord, list[Cell]]]
) -> dict[str, Any]:
    return {
        "loramem_version": __version__,
        "config": config.record(),
        "model": model,
        "dataset": {"path": str(dataset.resolve()), "sha256": sha},
        "documents": {record.id: len(cells) for record, cells in plans},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


class AnswerLog:
    """Appends answer lines durably (flush + fsync each), so an interruption loses at most the line being written."""

    def __init__(
        self, path: Path, advance: Callable[..., None] = lambda n: None, runtime: dict[str, str] | None = None
    ) -> None:
        self.handle = path.open("a", encoding="utf-8")
        self.advance = advance
        self.runtime = runtime  # LoadedModel.runtime() of the answering model: kept on every line

    def write(self, row: dict[str, Any]) -> None:
        if self.runtime is not None:
            row = {**row, "runtime": self.runtime}
        self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.advance(1)

    def close(self) -> None:
        self.handle.close()


def record_failures(run: Path, failures: list[dict[str, Any]]) -> None:
    """RUN_DIR/failures.json lists documents whose cells could not be answered; none: the file is removed."""
    if failures:
        atomic_write_bytes(run / FAILURES, (json.dumps(failures, indent=2) + "\n").encode())
    else:
        (run / FAILURES).unlink(missing_ok=True)


CellKey = tuple[str, int, str, "float | None", str, "str | None", str, "str | None", "str | None"]


def answer_row(
    record: DocRecord, cell: Cell, config: EvalSpec, answer: Answer, seconds: float, kv_bytes: int
) -> dict[str, Any]:
    """An answer line of answers.jsonl, scored against the question's references."""
    qa = record.qa[cell.question_index]
    merge = {"merge": cell.merge, "merge_weights": cell.merge_weights} if cell.merge is not None else {}
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
        **merge,
        "answer": answer.answer,
        **score_answer(answer.answer, qa.answers),
        "cache_tokens": answer.cache_tokens,
        "kv_bytes": kv_bytes,
        "seconds": round(seconds, 4),
    }
