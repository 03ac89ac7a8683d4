"""Batched greedy decoding over stored document caches, in a pre-sized cache (`loramem.model.presized`).

Every row of a batch is one question over a stored document cache: one cache shared by every row, or each row its
own (an eval's cells of one document differ only in what their caches kept). The rows' documents are put in place
(`loramem.model.documents`), the questions run in one pass, then every step writes all rows' next token at one
column; rows that finish leave the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from loramem.model.attention import attending
from loramem.model.documents import Rows, lead_document, row_documents, shared_lead
from loramem.model.loading import clock
from loramem.model.presized import assemble

# Rows that finished leave the batch: at once when the rows share one document (a retirement then copies only their
# own question and answer columns), else once at most this share of it is still running (each retirement copies the
# running rows' document copies, about what one step reads, so it is not done for every finished row).
RETIRE_AT = 0.75

# Told each token a row keeps as it is decoded, (row, token), then (row, None) once the row has finished: what a
# caller that shows answers as they come (streaming) reads, without waiting for the whole batch.
TokenSink = Callable[[int, "int | None"], None]


@dataclass
class Decoded:
    """One row's greedy tokens, whether it ended on a stop token, and when it finished."""

    tokens: list[int]
    stopped: bool
    prompt_tokens: int
    prefill_seconds: float  # the questions' passes (the shared leading tokens' included)
    first_token_seconds: float  # from the call: the stored cache put on the device, the question pass, the argmax
    decode_seconds: float  # from the first token to this row's last


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
    rows = len(prompts)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * rows
    lead = shared_lead(prompts, cache)
    with torch.inference_mode():
        prefill_started = clock(device)
        if lead:  # the leading tokens every row shares (the instruction, a closed-book chat prefix), once
            docs, starts = lead_document(model, cache, prompts[0][:lead], rows, device, dtype)
        else:
            docs, starts = row_documents(model, cache, rows, device, dtype)
        own = [p[lead:] for p in prompts]
        width = max(len(p) for p in own)
        room = width + max(limits)
        batch = assemble(model, docs, own, starts, room)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in own], device=device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    finished = [0.0] * rows
    with torch.inference_mode(), attending(batch, model):
        batch.prepare(width)
        out = model(
            input_ids=ids,
            past_key_values=batch,
            position_ids=batch.new_positions[:, :width],
            cache_position=torch.arange(width, device=device),
            use_cache=True,
            logits_to_keep=1,
        )
        prefilled = clock(device)
        next_ids = out.logits[:, -1].argmax(-1).tolist()
        first = clock(device)
        step = 0
        alive = list(range(rows))  # the prompt of each row still in the batch
        while True:
            for row, token in zip(alive, next_ids):
                if stopped[row] or len(tokens[row]) >= limits[row]:
                    continue
                if token in stops:
                    stopped[row] = True
                else:
                    tokens[row].append(token)
                finished[row] = time.perf_counter()
                if on_token is not None:
                    if not stopped[row]:
                        on_token(row, token)
                    if stopped[row] or len(tokens[row]) >= limits[row]:
                        on_token(row, None)
            running = [i for i, row in enumerate(alive) if not stopped[row] and len(tokens[row]) < limits[row]]
            if not running:
                break
            if len(running) < len(alive) and (batch.shares_document or len(running) <= RETIRE_AT * len(alive)):
                # finished rows leave: later steps compute only the rest
                batch.retain(running)
                alive, next_ids = [alive[i] for i in running], [next_ids[i] for i in running]
            column = width + step
            batch.prepare(1)
            out = model(
                input_ids=torch.tensor(next_ids, device=device)[:, None],
                past_key_values=batch,
                position_ids=batch.new_positions[:, column : column + 1],
                cache_position=torch.tensor([column], device=device),
                use_cache=True,
            )
            next_ids = out.logits[:, -1].argmax(-1).tolist()
            step += 1
    return [
        Decoded(
            tokens[row],
            stopped[row],
            len(prompts[row]),
            prefilled - prefill_started,
            first - started,
            max(finished[row] - first, 0.0),
        )
        for row in range(rows)
    ]
