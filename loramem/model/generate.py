"""Answering: greedy decoding over a stored (possibly compressed) KV cache, or with no document.

Questions over one document are answered in batches (`answer_batch`, engine in `loramem.model.batch`);
`generate` is the one-question case.

Stored keys are post-RoPE at their original positions, so the question continues at position
`n_tokens` of the original prefill whatever was evicted: RoPE stays consistent after eviction.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from loramem.adapters.attach import adapter_scope
from loramem.errors import LoramemError
from loramem.kv.cache import KVCache
from loramem.model import MAX_BATCH, MAX_BATCH_TOKENS
from loramem.model.batch import Decoded, decode
from loramem.model.loading import LoadedModel
from loramem.model.prompt import Framing, closed_book_ids, question_ids, stop_token_ids


@dataclass
class Answer:
    """An answer with the timings and cache use that `ask --json` reports."""

    question: str
    answer: str
    new_tokens: int
    stopped_at_end_of_turn: bool
    cache_tokens: int
    document_tokens: int
    question_tokens: int
    prefill_seconds: float
    time_to_first_token_seconds: float
    decode_tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_rows(cache: KVCache | None, width: int, max_new_tokens: int, max_batch_tokens: int) -> int:
    """Rows that fit `max_batch_tokens` cached tokens (each row holds the document, its question and answer)."""
    per_row = (max(cache.kept_per_layer) if cache is not None and cache.n_layers else 0) + width + max_new_tokens
    return max(1, min(MAX_BATCH, max_batch_tokens // per_row))


def answer_batch(
    lm: LoadedModel,
    questions: list[str],
    cache: KVCache | None = None,
    *,
    max_new_tokens: int = 64,
    adapter_on: bool = False,
    framing: str | Framing = "chat",
    batch_size: int | None = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> list[Answer]:
    """Answer every question from `cache` (None: closed-book, framed as `framing`: a style or a Framing), in
    batches over one shared document.

    Greedy and token for token the answers `generate` gives one at a time (up to floating-point ties).
    `batch_size` None: as many rows as `max_batch_tokens` cached tokens allow (at most 16).
    """
    answers: list[Answer | None] = [None] * len(questions)
    for index, answer, _ in iter_answers(
        lm,
        questions,
        cache,
        max_new_tokens=max_new_tokens,
        adapter_on=adapter_on,
        framing=framing,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
    ):
        answers[index] = answer
    return [a for a in answers if a is not None]


def iter_answers(
    lm: LoadedModel,
    questions: list[str],
    cache: KVCache | None = None,
    *,
    max_new_tokens: int = 64,
    adapter_on: bool = False,
    framing: str | Framing = "chat",
    batch_size: int | None = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> Iterator[tuple[int, Answer, float]]:
    """`answer_batch` as each batch finishes: (question index, answer, the batch's seconds per answer)."""
    if batch_size is not None and batch_size < 1:
        raise LoramemError(f"batch size must be at least 1, got {batch_size}")
    if max_batch_tokens < 1:
        raise LoramemError(f"max batch tokens must be at least 1, got {max_batch_tokens}")
    if max_new_tokens < 1:
        raise LoramemError(f"max new tokens must be at least 1, got {max_new_tokens}")
    tok = lm.tokenizer
    if cache is not None:
        frame = Framing.from_dict(cache.meta["framing"])
        prompts = [question_ids(tok, frame, q, after_document=True) for q in questions]
    else:
        frame = framing if isinstance(framing, Framing) else lm.framing(framing)
        prompts = [closed_book_ids(tok, frame, q) for q in questions]
    stops = stop_token_ids(tok, frame, lm.model.generation_config)
    pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if isinstance(t, int)), 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    start = 0
    with adapter_scope(lm, adapter_on):
        while start < len(order):
            rows = batch_size or batch_rows(cache, len(prompts[order[start]]), max_new_tokens, max_batch_tokens)
            chunk = order[start : start + rows]
            if batch_size is None:  # the longest question of the chunk decides what fits
                while len(chunk) > 1 and len(chunk) > batch_rows(
                    cache, len(prompts[chunk[-1]]), max_new_tokens, max_batch_tokens
                ):
                    chunk.pop()
            started = time.perf_counter()
            decoded = decode(lm.model, [prompts[i] for i in chunk], cache, stops, max_new_tokens, pad_id)
            seconds = (time.perf_counter() - started) / len(chunk)
            for i, row in zip(chunk, decoded):
                yield i, _answer(tok, questions[i], cache, row), seconds
            start += len(chunk)


def _answer(tok: Any, question: str, cache: KVCache | None, row: Decoded) -> Answer:
    return Answer(
        question=question,
        answer=tok.decode(row.tokens, skip_special_tokens=True).strip(),
        new_tokens=len(row.tokens),
        stopped_at_end_of_turn=row.stopped,
        cache_tokens=max(cache.kept_per_layer) if cache is not None and cache.n_layers else 0,
        document_tokens=cache.n_tokens if cache is not None else 0,
        question_tokens=row.prompt_tokens,
        prefill_seconds=round(row.prefill_seconds, 4),
        time_to_first_token_seconds=round(row.first_token_seconds, 4),
        decode_tokens_per_second=round((len(row.tokens) - 1) / row.decode_seconds, 2)
        if len(row.tokens) > 1 and row.decode_seconds > 0
        else 0.0,
    )


def generate(
    lm: LoadedModel,
    question: str,
    cache: KVCache | None = None,
    *,
    max_new_tokens: int = 64,
    adapter_on: bool = False,
    framing: str | Framing = "chat",
) -> Answer:
    """Answer `question` from `cache` (None: closed-book, framed as `framing`: a style or a Framing), greedily,
    stopping at the end of the turn."""
    return answer_batch(
        lm, [question], cache, max_new_tokens=max_new_tokens, adapter_on=adapter_on, framing=framing, batch_size=1
    )[0]
