"""A decoding batch that rows join and leave between steps (continuous batching), over one shared document.

`loramem.model.decode.decode` answers a fixed set of prompts: every row starts together. A server's requests come
one by one, and a request should not wait for the batch before it to end: a `RunningBatch` takes rows as they come
(`join`), runs their question passes at its next `step` and merges them into the rows already decoding, which
then go on together, one column a step; a row leaves once it ends (stop token, limit) or is cancelled. Every row
reads one copy of one stored document (or none), so a step reads the document once whatever the batch size.

Each row gets exactly the tokens `decode` gives its prompt alone (up to floating-point ties): its question pass is
the same computation, and merging only moves its columns (`loramem.model.presized.aligned`: a shorter question
is padded on the left, a longer one pads the running rows), with its masks rebuilt to show it its own columns
only. The shared-lead trick of `decode` (leading tokens every prompt shares, computed once) is not used: a later
joiner need not share them. How many rows run together is the caller's call (`rows`, `columns`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loramem.model.attention import attending
from loramem.model.decode import Decoded, RowSink, RowState, forward, padded_ids
from loramem.model.documents import DocumentKV, row_documents
from loramem.model.loading import clock
from loramem.model.presized import PresizedCache, aligned, assemble


@dataclass(eq=False)  # rows are told apart by identity
class _Row(RowState):
    """A row of a running batch: its prompt, and when it joined, got its first token, or was cancelled."""

    prompt: list[int] = field(default_factory=list)
    joined: float = 0.0
    prefill_seconds: float = 0.0
    first: float | None = None  # when its first token was picked
    cancelled: bool = False

    @property
    def running(self) -> bool:
        return not self.cancelled and super().running


class RunningBatch:
    """Rows over one stored document cache (or None: closed-book) with one stop set and pad id, joining and leaving
    between steps. Not thread-safe: join, cancel, step and result are called from one thread."""

    def __init__(self, model: Any, cache: DocumentKV | None, stops: set[int], pad_id: int) -> None:
        self.model, self.stops, self.pad_id = model, set(stops), pad_id
        with torch.inference_mode():  # the document, put on the device once for every row that will join
            self._docs, self._start = row_documents(model, cache, 1, model.device, model.dtype)
        self._batch: PresizedCache | None = None
        self._running: list[_Row] = []  # the batch's rows, in its order
        self._last: list[int] = []  # each batch row's last kept token: what the next step feeds it
        self._queued: list[_Row] = []
        self._rows: dict[int, _Row] = {}  # by id, until their result is taken
        self._ids = itertools.count()

    def join(self, prompt: list[int], max_new_tokens: int, on_token: RowSink | None = None) -> int:
        """Queue a row for `prompt` (its question pass runs at the next `step`), to decode at most `max_new_tokens`;
        `on_token` hears each token kept, then None at its end. Returns the row's id."""
        if not prompt:
            raise ValueError("a row needs at least one prompt token")
        if max_new_tokens < 1:
            raise ValueError(f"max new tokens must be at least 1, got {max_new_tokens}")
        row_id = next(self._ids)
        self._rows[row_id] = _Row(max_new_tokens, on_token, prompt=list(prompt), joined=time.perf_counter())
        self._queued.append(self._rows[row_id])
        return row_id

    def cancel(self, row_id: int) -> None:
        """End a row now (its sink hears None); a running one leaves the batch at the next step. A row that has
        ended already (its result perhaps taken) is left as it is."""
        row = self._rows.get(row_id)
        if row is None or not row.running:
            return
        row.cancelled, row.finished = True, time.perf_counter()
        if row in self._queued:
            self._queued.remove(row)
        if row.sink is not None:
            row.sink(None)

    @property
    def rows(self) -> int:
        """Rows running or queued: what the next step computes."""
        return len(self._queued) + sum(row.running for row in self._running)

    @property
    def columns(self) -> int:
        """The question and answer columns each running row holds now (its cached tokens beside the document)."""
        return 0 if self._batch is None else int(self._batch.new_positions.shape[1])

    @property
    def busy(self) -> bool:
        return self.rows > 0

    def __len__(self) -> int:
        return self.rows

    def step(self) -> None:
        """The queued rows' question passes (one pass for all of them), which give each its first token, merged into
        the running rows; then one decoding step of every running row. Rows that ended leave. No model work when
        nothing is running or queued."""
        with torch.inference_mode():
            self._leave()
            if self._queued:
                self._admit()
            if self._running:
                assert self._batch is not None
                with attending(self._batch, self.model):
                    ids = torch.tensor(self._last, device=self.model.device)[:, None]
                    self._last = forward(self.model, self._batch, ids).argmax(-1).tolist()
                for row, token in zip(self._running, self._last):
                    row.keep(token, self.stops)
                self._leave()

    def result(self, row_id: int) -> Decoded:
        """The row's tokens and timings, once it has ended (from when `on_token` hears None); taken once, the batch
        then forgets the row."""
        row = self._rows[row_id]
        if row.running:
            raise ValueError(f"row {row_id} is still decoding")
        del self._rows[row_id]
        first = row.first if row.first is not None else row.finished
        return Decoded(
            row.tokens,
            row.stopped,
            len(row.prompt),
            row.prefill_seconds,
            max(first - row.joined, 0.0),
            max(row.finished - first, 0.0),
        )

    def _admit(self) -> None:
        """Run the queued rows' question pass and merge those still running into the batch."""
        device = self.model.device
        rows, self._queued = self._queued, []
        prompts = [row.prompt for row in rows]
        started = clock(device)
        part = assemble(self.model, self._docs, prompts, self._start.expand(len(rows)), max(map(len, prompts)))
        with attending(part, self.model):
            logits = forward(self.model, part, padded_ids(prompts, self.pad_id, device))
        prefilled = clock(device)
        tokens = logits.argmax(-1).tolist()
        first = clock(device)
        for row, token in zip(rows, tokens):
            row.prefill_seconds, row.first = prefilled - started, first
            row.keep(token, self.stops)
        live = [i for i, row in enumerate(rows) if row.running]
        if not live:
            return
        if len(live) < len(rows):
            part.retain(live)
        self._running += [rows[i] for i in live]
        self._last += [tokens[i] for i in live]
        extra = max(row.limit - len(row.tokens) for row in self._running)
        self._batch = aligned([part] if self._batch is None else [self._batch, part], extra)

    def _leave(self) -> None:
        """Rows that ended leave the batch (a copy of the rest's own columns; the document stays one copy)."""
        keep = [i for i, row in enumerate(self._running) if row.running]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        self._last = [self._last[i] for i in keep]
        if not keep:
            self._batch = None
        else:
            assert self._batch is not None
            self._batch.retain(keep)
