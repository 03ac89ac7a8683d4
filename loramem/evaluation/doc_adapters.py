"""Each document's adapters in a run: training pairs, training once, reuse and checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from loramem.adapters.attach import read_adapter_meta
from loramem.adapters.train import View, train_adapter
from loramem.data.formats import DocRecord, load_qa_pairs
from loramem.data.synth import training_pairs
from loramem.data.views import read_views, training_views
from loramem.errors import IncompatibleArtifactError
from loramem.evaluation.config import file_name
from loramem.evaluation.rundir import ADAPTERS, SYNTH_QA, VIEWS
from loramem.fileio import atomic_write_bytes
from loramem.model.loading import LoadedModel, sha256_text
from loramem.specs import EvalSpec, TrainSpec
from loramem.specs.base import flag_of


def adapter_name(doc_id: str, fmt: str, rank: int | None, config: EvalSpec) -> str:
    """DOCID-FORMAT, or DOCID-FORMAT-rRANK for a budget point's rank other than the run's --rank."""
    name = f"{file_name(doc_id)}-{fmt}"
    return name if rank is None or rank == config.train.rank else f"{name}-r{rank}"


def document_adapter(
    lm: LoadedModel,
    record: DocRecord,
    fmt: str,
    config: EvalSpec,
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
        qa = run_training_pairs(lm, record, fmt, config, run, status)
        views = run_views(lm, record, fmt, config, run, status)
        path.parent.mkdir(exist_ok=True)
        status(f"training the {what}")
        train_adapter(
            lm,
            record.document,
            qa,
            path,
            config.train_spec(fmt, rank),
            on_step=lambda step, total, loss: status(f"training the {what}, step {step}/{total}"),
            views=views,
        )
    check_adapter(path, record, fmt, config, rank)
    return path


def check_adapter(path: Path, record: DocRecord, fmt: str, config: EvalSpec, rank: int | None = None) -> None:
    """An adapter made for this document, format and rank, trained with the run's settings: one trained with other
    targets, layers or a learning rate would be reported under this run's (the model is checked when attached)."""
    adapter_config, meta = read_adapter_meta(path)
    if meta.get("document_sha256") != sha256_text(record.document):
        raise IncompatibleArtifactError(f"adapter {path} was trained on another document than {record.id}")
    if meta.get("format") != fmt:
        raise IncompatibleArtifactError(f"adapter {path} was trained with format {meta.get('format')}, not {fmt}")
    if rank is not None and adapter_config.get("r") != rank:
        raise IncompatibleArtifactError(f"adapter {path} has rank {adapter_config.get('r')}, not {rank}")
    trained = meta.get("hyperparameters") or {}
    expected = config.train_spec(fmt, rank)
    differ = [
        f"{name} {trained[name]!r}, not {value!r} ({flag_of(TrainSpec, (name,))})"
        for name, value in expected.model_dump().items()
        if name in trained and trained[name] != value
    ]
    if differ:
        raise IncompatibleArtifactError(f"adapter {path} was trained with {'; '.join(differ)}")


def run_training_pairs(
    lm: LoadedModel, record: DocRecord, fmt: str, config: EvalSpec, run: Path, status: Callable[[str], None]
) -> list[tuple[str, str]]:
    """The pairs of `training_pairs` with the record's train_qa as the given pairs; synthesized pairs are kept in
    RUN_DIR/train_qa/ so that a resume and every format train on the same ones."""
    path = run / SYNTH_QA / f"{file_name(record.id)}.jsonl"
    if record.train_qa:
        given: list[tuple[str, str]] | None = [(t.question, t.answer) for t in record.train_qa]
    elif path.exists():
        given = [(p.question, p.answer) for p in load_qa_pairs(path)[0]]
    else:
        given = None
        if fmt != "ntp":
            status(f"synthesizing {config.synth.pairs} training pairs")
    pairs, written_by = training_pairs(
        lm, record.document, fmt, given, config.synth.pairs, config.train.seed, config.synth.model
    )
    if written_by is not None:
        path.parent.mkdir(exist_ok=True)
        lines = "".join(
            json.dumps({"question": q, "answer": a, "written_by": w}, ensure_ascii=False) + "\n"
            for (q, a), w in zip(pairs, written_by)
        )
        atomic_write_bytes(path, lines.encode("utf-8"))
    return pairs


def run_views(
    lm: LoadedModel, record: DocRecord, fmt: str, config: EvalSpec, run: Path, status: Callable[[str], None]
) -> list[View]:
    """The views of `training_views`, written once per document and kept in RUN_DIR/train_views/, so that a resume
    and every rank's mixed adapter train on the same ones."""
    if fmt != "mixed":
        return []
    path = run / VIEWS / f"{file_name(record.id)}.jsonl"
    if path.exists():
        return read_views(path.read_text(encoding="utf-8"))
    status("writing a summary and a rewrite of each passage")
    views = training_views(lm, record.document, fmt, config.synth.model)
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(v.to_dict(), ensure_ascii=False) + "\n" for v in views).encode())
    return views
