"""eval on a Ray cluster: one Ray actor per worker slot keeps the model loaded and takes documents from a queue;
the driver writes the same run directory a local run does.

A slot is `--gpus-per-worker` GPUs (when given) or `--cpus-per-worker` CPUs of the cluster; each slot's actor
loads the model once and answers one document at a time, appending its cells to the document's own part file,
RUN_DIR/parts/DOC.jsonl (so RUN_DIR must be on a file system every worker sees, as under Slurm or Kubernetes
with a shared volume). A document whose worker dies (killed, out of host memory) gets a fresh actor, and one
whose worker raises an out-of-memory error (CUDA or host; the actor frees its cached memory and lives on) is
queued again; either way it is retried `max_retries` times, resuming from its part file. After that it is
reported in failures.json and the summary, and the other documents' answers are kept. Other errors are not
retried: they would fail again. At the end the parts are folded into answers.jsonl, and `--resume` continues an
interrupted cluster run (or a local one) without redoing a finished cell.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from pathlib import Path
from typing import Any

from loramem.adapters.attach import detach_adapter
from loramem.data.formats import DocRecord
from loramem.errors import LoramemError
from loramem.evaluation.config import budget_sizes, file_name, key_of
from loramem.evaluation.library_modes import build_library
from loramem.evaluation.report import write_report
from loramem.evaluation.rundir import (
    PARTS,
    AnswerLog,
    cell_key,
    fold_parts,
    model_info,
    read_answers,
    record_failures,
    writes_run,
)
from loramem.evaluation.runner import evaluate_document, prepare_run
from loramem.log import progress_bar, warn
from loramem.model.loading import LoadedModel, load_model
from loramem.specs import EvalSpec
from loramem.specs.eval import RaySpec

# Test hooks: a worker given LORAMEM_FAULT_DOCS=ID:N,... dies abruptly (as a killed or out-of-memory process
# would) on its first N attempts at document ID (ID:N:oom: raises out of memory instead, as CUDA does); with
# LORAMEM_LOAD_LOG=FILE each model load appends its pid to FILE.
_FAULT_DOCS = "LORAMEM_FAULT_DOCS"
_LOAD_LOG = "LORAMEM_LOAD_LOG"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise LoramemError("--ray needs Ray: pip install 'loramem[ray]'") from exc
    return ray


class _Worker:
    """One worker slot (a Ray actor): the model is loaded once, on first use, and serves every document sent."""

    def __init__(self, spec: tuple, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.lm: LoadedModel | None = None

    def model(self) -> LoadedModel:
        if self.lm is None:
            self.lm = load_model(*self.spec)
            if os.environ.get(_LOAD_LOG):
                with open(os.environ[_LOAD_LOG], "a") as log:
                    log.write(f"{os.getpid()}\n")
        return self.lm

    def describe(self, config: EvalSpec) -> tuple[dict[str, Any], dict[int, int]]:
        """The model's identity as config.json records it and its adapter sizes at the budget ranks, taken on a
        worker (the driver may have no GPU)."""
        lm = self.model()
        return model_info(lm), budget_sizes(lm, config)

    def library(self, documents: list[DocRecord], config: EvalSpec, run_dir: str) -> None:
        """Build the run's library once, before any document routes over it."""
        build_library(self.model(), documents, config, Path(run_dir))

    def document(self, record: DocRecord, cells: list[Any], config: EvalSpec, run_dir: str) -> int:
        """Answer one document's cells not yet in its part file (a retry continues where the last attempt stopped)."""
        import torch

        run = Path(run_dir)
        part = _part(run, record)
        part.parent.mkdir(exist_ok=True)
        remaining = _unanswered(part, record, cells, config.groups, repair=True)
        if remaining:
            _inject_fault(record, part)
            lm = self.model()
            answers = AnswerLog(part, runtime=lm.runtime())
            try:
                evaluate_document(lm, record, remaining, config, run, answers)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()  # so that this actor can take the retry or the next document
                raise
            finally:
                answers.close()
                detach_adapter(lm)
        return len(remaining)


def _part(run: Path, record: DocRecord) -> Path:
    return run / PARTS / f"{file_name(record.id)}.jsonl"


def _inject_fault(record: DocRecord, part: Path) -> None:
    """LORAMEM_FAULT_DOCS=ID:N dies on the first N attempts at document ID; ID:N:oom raises out of memory instead."""
    faults = {}
    for item in os.environ.get(_FAULT_DOCS, "").split(","):
        kind = "oom" if item.endswith(":oom") else "die"
        if ":" in item.removesuffix(":oom"):
            doc, times = item.removesuffix(":oom").rsplit(":", 1)
            faults[doc] = (int(times), kind)
    if record.id not in faults:
        return
    attempts = part.with_suffix(".attempts")
    count = int(attempts.read_text()) if attempts.exists() else 0
    attempts.write_text(str(count + 1))
    if count < faults[record.id][0]:
        if faults[record.id][1] == "oom":
            import torch

            raise torch.OutOfMemoryError("injected: out of memory")
        os._exit(137)


def _unanswered(part: Path, record: DocRecord, cells: list[Any], groups: int, repair: bool = False) -> list[Any]:
    done = {cell_key(row) for row in read_answers(part, repair=repair)}
    return [c for c in cells if key_of(record, c, groups) not in done]


def _retryable(exc: BaseException) -> bool:
    """A dead worker, or an out-of-memory error inside one: another attempt may succeed."""
    import torch

    ray = _import_ray()
    if isinstance(exc, ray.exceptions.RayActorError):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(cause, (torch.OutOfMemoryError, MemoryError))


class _Pool:
    """The worker actors, one per slot; a dead one is replaced by a fresh one when its slot gets work again (a
    replacement that would only be closed is never started)."""

    def __init__(self, spec: tuple, threads: int, resources: dict[str, float]) -> None:
        ray = _import_ray()
        self.make = lambda: ray.remote(_Worker).options(**resources).remote(spec, threads)
        self.actors = [self.make()]
        self.dead: set[int] = set()

    def actor(self, index: int) -> Any:
        """The slot's actor, a fresh one if the last one died."""
        if index in self.dead:
            self.dead.discard(index)
            self.replace(index)
        return self.actors[index]

    def grow(self, size: int) -> None:
        self.actors += [self.make() for _ in range(size - len(self.actors))]

    def replace(self, index: int) -> None:
        _import_ray().kill(self.actors[index], no_restart=True)
        self.actors[index] = self.make()

    def close(self) -> None:
        for actor in self.actors:
            _import_ray().kill(actor, no_restart=True)
        self.actors = []

    def call(self, method: str, *args: Any, max_retries: int, what: str) -> Any:
        """One call on the first actor, retried like a document."""
        ray = _import_ray()
        for attempt in range(max_retries + 1):
            try:
                return ray.get(getattr(self.actors[0], method).remote(*args))
            except ray.exceptions.RayError as exc:
                if isinstance(exc, ray.exceptions.RayActorError):
                    self.replace(0)
                if attempt == max_retries or not _retryable(exc):
                    raise LoramemError(f"{what} failed: {_reason(exc)}") from exc
        raise AssertionError("unreachable")


def _slots(cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Worker slots the cluster holds: by GPUs when workers take GPUs, else by CPUs."""
    total = _import_ray().cluster_resources()
    if gpus_per_worker:
        return int(total.get("GPU", 0) // gpus_per_worker)
    return int(total.get("CPU", 1) // cpus_per_worker)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".strip(": ")


@writes_run("run_dir")
def run_eval_ray(
    model: str | None,
    dataset: str | Path,
    run_dir: str | Path,
    config: EvalSpec,
    *,
    workers: RaySpec | None = None,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    allow_mixed: bool = False,
    chat_template_kwargs: str | None = None,
) -> dict[str, Any]:
    """`run_eval` with the documents answered by one Ray actor per worker slot; returns the same summary.

    `workers.address`: "local" (or None) starts a Ray instance on this machine, "auto" or "HOST:PORT" joins a
    cluster; when Ray is already initialised in this process (a script, a test) that instance is used.
    """
    workers = workers or RaySpec()
    address, cpus_per_worker, gpus_per_worker = workers.address, workers.cpus_per_worker, workers.gpus_per_worker
    max_retries = workers.max_retries
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=None if address in (None, "local") else address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    pool = None
    try:
        spec, threads = (model, device, dtype, False, chat_template_kwargs), int(max(1, cpus_per_worker))
        resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        pool = _Pool(spec, threads, resources)
        model_ids, sizes = pool.call("describe", config, max_retries=max_retries, what="loading the model")
        plan = prepare_run(model_ids, dataset, run_dir, config, resume=resume, sizes=sizes, allow_mixed=allow_mixed)
        if plan.needs_library:
            args = (plan.documents, config, str(plan.run))
            pool.call("library", *args, max_retries=max_retries, what="building the run's library")
        failures = _dispatch_documents(
            pool, plan, config, max_retries, max(1, min(_slots(cpus_per_worker, gpus_per_worker), len(plan.todo)))
        )
    finally:
        if pool is not None:
            pool.close()  # their slots go back to the cluster (and to the next run in this process)
        if started_here:
            ray.shutdown()
    fold_parts(plan.run)
    record_failures(plan.run, failures)
    return write_report(plan.run)


def _dispatch_documents(pool: _Pool, plan: Any, config: EvalSpec, max_retries: int, size: int) -> list[dict[str, Any]]:
    """Send the documents to the actors as they come free; retry retryable failures; return the documents that
    failed for good."""
    ray = _import_ray()
    pool.grow(size)
    queue = deque(plan.todo)
    attempts: Counter[str] = Counter()
    running: dict[Any, tuple[int, DocRecord, list[Any]]] = {}
    failures: list[dict[str, Any]] = []

    def send(index: int) -> None:
        if queue:
            record, cells = queue.popleft()
            ref = pool.actor(index).document.remote(record, cells, config, str(plan.run))
            running[ref] = (index, record, cells)

    with progress_bar("evaluating on Ray", plan.n_cells) as advance:
        for index in range(len(pool.actors)):
            send(index)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, record, cells = running.pop(ref)
            try:
                ray.get(ref)
                advance(len(cells))
            except ray.exceptions.RayError as exc:
                if isinstance(exc, ray.exceptions.RayActorError):
                    pool.dead.add(index)
                attempts[record.id] += 1
                if _retryable(exc) and attempts[record.id] <= max_retries:
                    queue.appendleft((record, cells))
                else:
                    missing = len(_unanswered(_part(plan.run, record), record, cells, config.groups))
                    failures.append({"doc_id": record.id, "cells": missing, "error": _reason(exc)})
                    warn(f"document {record.id} failed after {attempts[record.id] - 1} retries: {_reason(exc)}")
                    advance(len(cells), status=f"{len(failures)} failed")
            send(index)
    return failures
