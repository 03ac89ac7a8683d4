"""eval on a Ray cluster: documents become Ray tasks; the driver writes the same run directory a local run does.

Each task answers one document's remaining cells and appends them to its own part file,
RUN_DIR/parts/DOC.jsonl (so RUN_DIR must be on a file system every worker sees, as under Slurm or
Kubernetes with a shared volume). Worker processes keep the model loaded between tasks. A task
whose worker dies (killed, out of memory) is retried `max_retries` times, resuming from its part
file; after that its document is reported in failures.json and the summary, and the other
documents' answers are kept. At the end the parts are folded into answers.jsonl, and `--resume`
continues an interrupted cluster run (or a local one) without redoing a finished cell.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loramem.adapters.attach import detach_adapter
from loramem.data.formats import DocRecord
from loramem.errors import LoramemError
from loramem.evaluation.config import EvalConfig, budget_sizes, file_name, key_of
from loramem.evaluation.library_modes import build_library
from loramem.evaluation.report import write_report
from loramem.evaluation.rundir import PARTS, AnswerLog, cell_key, fold_parts, model_info, read_answers, record_failures
from loramem.evaluation.runner import evaluate_document, prepare_run
from loramem.log import progress_bar, warn
from loramem.model.loading import LoadedModel, load_model

# Fault injection for tests: a worker given LORAMEM_FAULT_DOCS=ID:N,... dies abruptly (as a killed or
# out-of-memory process would) on its first N attempts at document ID.
_FAULT_DOCS = "LORAMEM_FAULT_DOCS"
_models: dict[tuple, LoadedModel] = {}  # per worker process: the model stays loaded between tasks


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise LoramemError("--ray needs Ray: pip install 'loramem[ray]'") from exc
    return ray


def _worker_model(spec: tuple, threads: int) -> LoadedModel:
    import torch

    torch.set_num_threads(max(1, threads))
    if spec not in _models:
        _models[spec] = load_model(*spec)
    return _models[spec]


def _describe_model(spec: tuple, threads: int, config: EvalConfig) -> tuple[dict[str, Any], dict[int, int]]:
    """The model's identity as config.json records it and its adapter sizes at the budget ranks, taken on a worker
    (the driver may have no GPU)."""
    lm = _worker_model(spec, threads)
    return model_info(lm), budget_sizes(lm, config)


def _part(run: Path, record: DocRecord) -> Path:
    return run / PARTS / f"{file_name(record.id)}.jsonl"


def _inject_fault(record: DocRecord, part: Path) -> None:
    faults = dict(item.rsplit(":", 1) for item in os.environ.get(_FAULT_DOCS, "").split(",") if ":" in item)
    if record.id not in faults:
        return
    attempts = part.with_suffix(".attempts")
    count = int(attempts.read_text()) if attempts.exists() else 0
    attempts.write_text(str(count + 1))
    if count < int(faults[record.id]):
        os._exit(137)


def _unanswered(part: Path, record: DocRecord, cells: list[Any], groups: int, repair: bool = False) -> list[Any]:
    done = {cell_key(row) for row in read_answers(part, repair=repair)}
    return [c for c in cells if key_of(record, c, groups) not in done]


def _document_task(
    spec: tuple,
    threads: int,
    record: DocRecord,
    cells: list[Any],
    config: EvalConfig,
    run_dir: str,
) -> int:
    """Answer one document's cells not yet in its part file (a retry continues where the dead worker stopped)."""
    run = Path(run_dir)
    part = _part(run, record)
    part.parent.mkdir(exist_ok=True)
    remaining = _unanswered(part, record, cells, config.groups, repair=True)
    if remaining:
        _inject_fault(record, part)
        lm = _worker_model(spec, threads)
        answers = AnswerLog(part, runtime=lm.runtime())
        try:
            evaluate_document(lm, record, remaining, config, run, answers)
        finally:
            answers.close()
            detach_adapter(lm)
    return len(remaining)


def _library_task(spec: tuple, threads: int, documents: list[DocRecord], config: EvalConfig, run_dir: str) -> None:
    """Build the run's library once, before any document task routes over it."""
    build_library(_worker_model(spec, threads), documents, config, Path(run_dir))


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".strip(": ")


def run_eval_ray(
    model: str | None,
    dataset: str | Path,
    run_dir: str | Path,
    config: EvalConfig,
    *,
    address: str | None = "local",
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    allow_mixed: bool = False,
    chat_template_kwargs: str | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    max_retries: int = 2,
) -> dict[str, Any]:
    """`run_eval` with one Ray task per document; returns the same summary.

    `address`: "local" starts a Ray instance on this machine, "auto" or "HOST:PORT" joins a cluster;
    when Ray is already initialised in this process (a script, a test) that instance is used.
    """
    if max_retries < 0 or cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise LoramemError("--max-retries and --gpus-per-worker must be >= 0, --cpus-per-worker > 0")
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    try:
        spec, threads = (model, device, dtype, False, chat_template_kwargs), int(max(1, cpus_per_worker))
        resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        describe = ray.remote(_describe_model).options(**resources, max_retries=max_retries)
        model_ids, sizes = ray.get(describe.remote(spec, threads, config))
        plan = prepare_run(model_ids, dataset, run_dir, config, resume=resume, sizes=sizes, allow_mixed=allow_mixed)
        if plan.needs_library:
            library = ray.remote(_library_task).options(**resources, max_retries=max_retries)
            try:
                ray.get(library.remote(spec, threads, plan.documents, config, str(plan.run)))
            except ray.exceptions.RayError as exc:
                raise LoramemError(f"building the run's library failed: {_reason(exc)}") from exc
        task = ray.remote(_document_task).options(**resources, max_retries=max_retries, retry_exceptions=False)
        pending = {
            task.remote(spec, threads, record, cells, config, str(plan.run)): (record, cells)
            for record, cells in plan.todo
        }
        failures = []
        with progress_bar("evaluating on Ray", plan.n_cells) as advance:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                record, cells = pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    missing = len(_unanswered(_part(plan.run, record), record, cells, config.groups))
                    failures.append({"doc_id": record.id, "cells": missing, "error": _reason(exc)})
                    warn(f"document {record.id} failed after {max_retries} retries: {_reason(exc)}")
                advance(len(cells), status=f"{len(failures)} failed" if failures else "")
    finally:
        if started_here:
            ray.shutdown()
    fold_parts(plan.run)
    record_failures(plan.run, failures)
    return write_report(plan.run)
