"""The server's one decoding thread: every request's questions become rows of the batch of its memory (cache,
adapter and whether decoding uses it), rows of one memory decode together and leave as they finish, and memories
take turns a step at a time, so one busy memory does not starve another. Work in flight is bounded: a request that
would go beyond `max_queue` questions is refused (503) before anything is queued.

Requests hand the engine a `Job` and hear back through its `emit` (called from the engine thread; the app turns it
into an asyncio queue): ("text", index, piece), ("answer", index, Answer), ("error", Refused), then ("done",).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from loramem.answer import Answer, LiveBatch, batch_rows
from loramem.errors import LoramemError
from loramem.log import console
from loramem.model.loading import LoadedModel
from loramem.serve.paths import Refused
from loramem.serve.store import AdapterRef, HeldCache, refused_artifact
from loramem.specs.serve import AnswersRequest

Event = tuple[Any, ...]
# Cached tokens a row's question is assumed to take when sizing a memory's batch (the answer's come on top)
QUESTION_TOKENS = 128


class Busy(Exception):
    """The engine holds `max_queue` questions already; the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request's questions over one memory, and where its answers go."""

    request: AnswersRequest
    cache: HeldCache | None
    adapter: AdapterRef | None
    library: Path | None
    emit: Callable[[Event], None]
    left: int = 0  # questions not yet answered
    rows: set[int] = field(default_factory=set)  # its rows decoding in its memory's batch
    cancelled: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        """What rows of one batch share: the cache as compressed, the adapter and its mode, the framing."""
        request = self.request
        cache = None if self.cache is None else (self.cache.sha256, id(self.cache.cache))
        adapter = None if self.adapter is None else self.adapter.sha256
        return (cache, adapter, request.mode, request.framing if self.cache is None else None)


@dataclass
class Group:
    """The running batch of one memory and the rows waiting for room in it."""

    batch: LiveBatch
    adapter: AdapterRef | None
    cap: int
    waiting: deque[tuple[Job, int]] = field(default_factory=deque)  # (job, question index)
    jobs: dict[int, Job] = field(default_factory=dict)  # row id -> the job it answers

    def all_jobs(self) -> list[Job]:
        return list({id(j): j for j in [*self.jobs.values(), *(j for j, _ in self.waiting)]}.values())


class Engine:
    """The decoding thread over `lm`: start it, `submit` jobs, `cancel` them, `close` to stop."""

    def __init__(self, lm: LoadedModel, max_queue: int, max_batch_tokens: int, max_new_tokens: int) -> None:
        self.lm = lm
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.max_new_tokens = max_new_tokens
        self._incoming: deque[Job] = deque()
        self._cancels: deque[Job] = deque()
        self._groups: dict[tuple[Any, ...], Group] = {}
        self._load = 0  # questions submitted and not yet answered
        self._seconds_per_answer = 1.0  # recent, for Retry-After
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="loramem-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def load(self) -> int:
        return self._load

    def submit(self, job: Job) -> None:
        """Queue a job, or raise Busy when it would take the engine beyond `max_queue` questions."""
        count = len(job.request.questions)
        with self._cv:
            if self._closing:
                raise Refused(503, "the server is shutting down", kind="unavailable")
            if self._load + count > self.max_queue:
                raise Busy(max(1, round(self._seconds_per_answer * count)))
            self._load += count
            job.left = count
            self._incoming.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job's questions (its client went away or ran out of time): their rows leave the batch."""
        with self._cv:
            if not job.cancelled:
                job.cancelled = True
                self._cancels.append(job)
                self._cv.notify()

    def close(self) -> None:
        """Cancel everything left and stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # --- the engine thread ---
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._cancels or self._groups or self._closing):
                    self._cv.wait()
                if self._closing:
                    jobs = list(self._incoming) + [j for g in self._groups.values() for j, _ in g.waiting]
                    break
                incoming, cancels = list(self._incoming), list(self._cancels)
                self._incoming.clear()
                self._cancels.clear()
            for job in cancels:
                self._drop(job)
            for job in incoming:
                if not job.cancelled:
                    self._guarded(job, self._admit)
            for key in list(self._groups):
                self._turn(key)
        for job in jobs:
            self._finish(job, Refused(503, "the server shut down before this was answered", kind="unavailable"))

    def _guarded(self, job: Job, work: Callable[[Job], None]) -> None:
        """Run `work(job)`; a refusal or a failure ends that job alone, never the engine."""
        try:
            work(job)
        except Refused as exc:
            self._finish(job, exc)
        except LoramemError as exc:
            self._finish(job, refused_artifact(exc))
        except Exception as exc:  # a bug: the server keeps serving, the log says where
            console.print(f"[red]internal error answering a request:[/red] {exc}", highlight=False)
            traceback.print_exc()
            self._finish(job, Refused(500, f"internal error: {type(exc).__name__}", exit_code=1, kind="server_error"))

    def _admit(self, job: Job) -> None:
        if job.library is not None:
            self._answer_library(job)
            return
        from loramem.memory import adapter_on

        self._activate(job.adapter)
        cache = None if job.cache is None else job.cache.cache
        on = adapter_on(self.lm, job.request.mode, cache)  # checks the mode against the cache's adapter
        group = self._groups.get(job.key)
        if group is None:
            batch = LiveBatch(self.lm, cache, on, job.request.framing)
            cap = batch_rows(cache, QUESTION_TOKENS, self.max_new_tokens, self.max_batch_tokens)
            group = self._groups[job.key] = Group(batch, job.adapter, cap)
        group.waiting.extend((job, index) for index in range(len(job.request.questions)))
        job.emit(("admitted",))

    def _turn(self, key: tuple[Any, ...]) -> None:
        """One step of a memory's batch: rows waiting join while there is room, then every row decodes a token."""
        group = self._groups[key]
        try:
            self._activate(group.adapter)
            while group.waiting and len(group.batch) < group.cap:
                job, index = group.waiting.popleft()
                if not job.cancelled:
                    self._join(group, key, job, index)
            if group.batch.busy:
                started = time.perf_counter()
                group.batch.step()
                self._seconds_per_answer = 0.9 * self._seconds_per_answer + 0.1 * (time.perf_counter() - started)
        except Exception as exc:  # the batch is lost: every job with a row in it ends
            del self._groups[key]
            for job in group.all_jobs():
                self._guarded(job, partial(_raise, exc))
            return
        if not group.batch.busy and not group.waiting:
            del self._groups[key]

    def _join(self, group: Group, key: tuple[Any, ...], job: Job, index: int) -> None:
        def on_text(piece: str) -> None:
            if piece and not job.cancelled:
                job.emit(("text", index, piece))

        def on_done(answer: Answer) -> None:
            group.jobs.pop(row, None)
            if row in job.rows:  # (a cancelled row was released when it was cancelled)
                job.rows.discard(row)
                job.emit(("answer", index, answer))
                self._answered(job)

        limit = job.request.answer.max_new_tokens
        try:
            row = group.batch.join(job.request.questions[index], limit, on_text, on_done)
        except LoramemError as exc:  # this question cannot be answered (too long, no memory): its request ends
            self._finish(job, refused_artifact(exc))
            return
        job.rows.add(row)
        group.jobs[row] = job

    def _answered(self, job: Job) -> None:
        job.left -= 1
        with self._cv:
            self._load -= 1
        if job.left == 0:
            job.emit(("done",))

    def _drop(self, job: Job) -> None:
        """A cancelled job's rows leave their batches; its questions no longer count against the queue."""
        group = self._groups.get(job.key)
        rows = sorted(job.rows)
        job.rows.clear()  # first: a cancelled row's on_done must not count it again
        for row in rows:
            if group is not None:
                group.jobs.pop(row, None)
                group.batch.cancel(row)
            self._answered(job)
        for group in self._groups.values():
            kept = deque(item for item in group.waiting if item[0] is not job)
            for _ in range(len(group.waiting) - len(kept)):
                self._answered(job)
            group.waiting = kept

    def _finish(self, job: Job, error: Refused) -> None:
        """End a job with an error: its rows leave, its unanswered questions are released."""
        job.emit(("error", error))
        job.cancelled = True
        self._drop(job)
        if job.left:  # (refused before any of its questions was queued)
            with self._cv:
                self._load -= job.left
            job.left = 0
            job.emit(("done",))

    def _activate(self, adapter: AdapterRef | None) -> None:
        """The model's active adapter made `adapter`'s, as its sha256 was when the request named it."""
        if adapter is None:
            return
        from loramem.adapters.attach import activate_loaded, attach_adapter

        current = self.lm.adapter
        if current is not None and current.sha256 == adapter.sha256:
            return
        if not activate_loaded(self.lm, adapter.sha256):
            attach_adapter(self.lm, adapter.path)
        if self.lm.adapter is None or self.lm.adapter.sha256 != adapter.sha256:
            raise Refused(409, f"adapter {adapter.name!r} changed on disk while queued; ask again", kind="changed")

    def _answer_library(self, job: Job) -> None:
        """A library request: routed and answered whole, in this turn (its adapters are merged per question)."""
        from loramem.library.qa import answer_routed
        from loramem.library.store import open_library

        request = job.request
        assert job.library is not None
        answer = request.answer.replace(max_batch_tokens=self.max_batch_tokens)
        results = answer_routed(self.lm, open_library(job.library), request.questions, request.route, answer)
        for index, result in enumerate(results):
            if not job.cancelled:
                job.emit(("library", index, result))
            self._answered(job)


def _raise(exc: BaseException, job: Job) -> None:
    raise exc
