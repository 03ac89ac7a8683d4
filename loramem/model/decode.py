"""Batched greedy decoding over stored document caches, in a pre-sized cache (`loramem.model.presized`).

Every row of a batch is one question over a stored document cache: one cache shared by every row, or each row its
own (an eval's cells of one document differ only in what their caches kept). The rows' documents are put in place
(`loramem.model.documents`), the questions run in one pass, then every step writes all rows' next token at one
column; rows that finish leave the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from loramem.model.attention import attending
from loramem.model.documents import Rows, lead_document, row_documents, shared_lead
from loramem.model.loading import clock
from loramem.model.presized import PresizedCache, assemble

# Rows that finished leave the batch: at once when the rows share one document (a retirement then copies only their
# own question and answer columns), else once at most this share of it is still running (each retirement copies the
# running rows' document copies, about what one step reads, so it is not done for every finished row).
RETIRE_AT = 0.75

# Told each token a row keeps as it is decoded, (row, token), then (row, None) once the row has finished: what a
# caller that shows answers as they come (streaming) reads, without waiting for the whole batch.
TokenSink = Callable[[int, "int | None"], None]
# One row's sink: each token it keeps, then None once it has ended (a running batch's rows also when cancelled).
RowSink = Callable[["int | None"], None]


@dataclass
class Decoded:
    """One row's greedy tokens, whether it ended on a stop token, and when it finished."""

    tokens: list[int]
    stopped: bool
    prompt_tokens: int
    prefill_seconds: float  # the questions' passes (the shared leading tokens' included)
    first_token_seconds: float  # from the call: the stored cache put on the device, the question pass, the argmax
    decode_seconds: float  # from the first token to this row's last


@dataclass
class RowState:
    """A row being decoded: its tokens so far and whether it has ended; `keep` is the one rule of a step, for
    `decode` and for `loramem.model.running.RunningBatch` alike."""

    limit: int
    sink: RowSink | None = None
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False
    finished: float = 0.0  # when its last token was kept

    @property
    def running(self) -> bool:
        return not self.stopped and len(self.tokens) < self.limit

    def keep(self, token: int, stops: set[int]) -> None:
        """The row's next greedy token: kept and told to the sink, or, a stop token, the row's end; the sink hears
        None once the row has ended (stop token or limit). A row that has ended keeps nothing more."""
        if not self.running:
            return
        if token in stops:
            self.stopped = True
        else:
            self.tokens.append(token)
        self.finished = time.perf_counter()
        if self.sink is not None:
            if not self.stopped:
                self.sink(token)
            if not self.running:
                self.sink(None)


def forward(model: Any, batch: PresizedCache, ids: torch.Tensor) -> torch.Tensor:
    """One pass of `ids` [rows, columns] (a question block, or each row's last token) at the batch's next columns,
    inside `attending(batch, model)`: each row's logits after its last column."""
    start, width = batch.offset, ids.shape[1]
    batch.prepare(width)
    out = model(
        input_ids=ids,
        past_key_values=batch,
        position_ids=batch.new_positions[:, start : start + width],
        cache_position=torch.arange(start, start + width, device=ids.device),
        use_cache=True,
        logits_to_keep=1,
    )
    logits: torch.Tensor = out.logits[:, -1]
    return logits


def padded_ids(prompts: list[list[int]], pad_id: int, device: Any) -> torch.Tensor:
    """The prompts as one left-padded block, as `assemble` lays out their columns."""
    width = max(len(p) for p in prompts)
    return torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)


def decode(
    model: Any,
    prompts: list[list[int]],
    cache: Rows,
    stops: set[int],
    max_new_tokens: int | list[int],
    pad_id: int,
    on_token: TokenSink | None = None,
) -> list[Decoded]:
    """Greedy tokens for each prompt over `cache` (one shared, or a list with one per prompt), each row stopping at
    its own stop token or after `max_new_tokens` (one for every row, each at least 1, or each row's own); `on_token`
    is told each row's tokens as they are decoded and when the row ends."""
    device, dtype = model.device, model.dtype
    started = clock(device)  # time to first token counts putting the stored cache on the device
    n_rows = len(prompts)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n_rows
    rows = [RowState(limit, None if on_token is None else partial(on_token, row)) for row, limit in enumerate(limits)]
    lead = shared_lead(prompts, cache)
    with torch.inference_mode():
        prefill_started = clock(device)
        if lead:  # the leading tokens every row shares (the instruction, a closed-book chat prefix), once
            docs, starts = lead_document(model, cache, prompts[0][:lead], n_rows, device, dtype)
        else:
            docs, starts = row_documents(model, cache, n_rows, device, dtype)
        own = [p[lead:] for p in prompts]
        width = max(len(p) for p in own)
        batch = assemble(model, docs, own, starts, width + max(limits))
    with torch.inference_mode(), attending(batch, model):
        logits = forward(model, batch, padded_ids(own, pad_id, device))
        prefilled = clock(device)
        next_ids = logits.argmax(-1).tolist()
        first = clock(device)
        alive = list(range(n_rows))  # the prompt of each row still in the batch
        while True:
            for row, token in zip(alive, next_ids):
                rows[row].keep(token, stops)
            running = [i for i, row in enumerate(alive) if rows[row].running]
            if not running:
                break
            if len(running) < len(alive) and (batch.shares_document or len(running) <= RETIRE_AT * len(alive)):
                # finished rows leave: later steps compute only the rest
                batch.retain(running)
                alive, next_ids = [alive[i] for i in running], [next_ids[i] for i in running]
            next_ids = forward(model, batch, torch.tensor(next_ids, device=device)[:, None]).argmax(-1).tolist()
    return [
        Decoded(
            row.tokens,
            row.stopped,
            len(prompt),
            prefilled - prefill_started,
            first - started,
            max(row.finished - first, 0.0),
        )
        for row, prompt in zip(rows, prompts)
    ]
