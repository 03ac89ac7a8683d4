"""Answering: greedy decoding over a stored (possibly compressed) KV cache, or with no document, with or without the
attached adapter.

The layer above the artifacts (`loramem.kv`, `loramem.adapters`) and below their users: it frames each question as
its cache was framed, groups questions into batches and turns the decoded tokens into `Answer`s; the decoding itself
is the model layer's (`loramem.model.decode`), which reads the caches' tensors and knows no artifact. Questions over
one document are answered in batches (`answer_batch`); `generate` is the one-question case.

Stored keys are post-RoPE at their original positions, so the question continues at position
`n_tokens` of the original prefill whatever was evicted: RoPE stays consistent after eviction.

Answers can be shown as they are decoded: `on_token` hears each row's tokens from the decoder, and
`StreamedAnswers` (one `AnswerText` per question) turns them into text in question order.

A server's questions come one by one: `LiveBatch` answers them over one memory in one running batch that each
joins at its next step and leaves once answered (`loramem.model.running`), with the answers `answer_batch` gives.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypedDict, Unpack

from loramem.errors import LoramemError
from loramem.kv.cache import KVCache
from loramem.model import MAX_BATCH, MAX_BATCH_TOKENS, MAX_NEW_TOKENS
from loramem.model.decode import Decoded, TokenSink, decode
from loramem.model.documents import one_cache
from loramem.model.limits import answer_budgets, check_batch_memory
from loramem.model.loading import LoadedModel, adapter_scope
from loramem.model.prompt import DEFAULT_FRAMING, Framing, closed_book_ids, question_ids, stop_token_ids
from loramem.model.running import RunningBatch
from loramem.text import InOrder, one_line


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
    """Rows over one shared `cache` that fit `max_batch_tokens` as `batch_tokens` counts them (at least one)."""
    rows = MAX_BATCH
    while rows > 1 and batch_tokens([cache] * rows, width, max_new_tokens) > max_batch_tokens:
        rows -= 1
    return rows


def batch_tokens(caches: list[KVCache | None], width: int, max_new_tokens: int) -> int:
    """Cached tokens a batch of rows over `caches` holds: the document once when every row shares one cache (as
    the engine keeps it), else a copy per row padded to the largest; plus each row's question and answer."""
    copies = 1 if one_cache(caches) else len(caches)  # (no document: nothing to copy either way)
    return copies * max(_kept_tokens(c) for c in caches) + len(caches) * (width + max_new_tokens)


def _kept_tokens(cache: KVCache | None) -> int:
    """Tokens the cache's fullest layer kept: what a row over it holds of the document."""
    return max(cache.kept_per_layer) if cache is not None and cache.n_layers else 0


Caches = KVCache | None | list[KVCache | None]


class AnswerOptions(TypedDict, total=False):
    """`iter_answers`' keyword options (and their defaults there), which `answer_batch` passes on."""

    max_new_tokens: int
    adapter_on: bool
    framing: str | Framing
    batch_size: int | None
    max_batch_tokens: int
    on_token: TokenSink | None


def answer_batch(
    lm: LoadedModel, questions: list[str], cache: Caches = None, **options: Unpack[AnswerOptions]
) -> list[Answer]:
    """Answer every question from `cache` (None: closed-book, framed as `framing`: a style or a Framing; a list:
    each question's own cache or None), in batches.

    Greedy and token for token the answers `generate` gives one at a time (up to floating-point ties).
    `batch_size` None: as many rows as `max_batch_tokens` cached tokens allow (at most 16); a row over a smaller
    cache than the batch's largest counts as the largest (it is padded to it). Options: `iter_answers`.
    """
    answers: list[Answer | None] = [None] * len(questions)
    for index, answer, _ in iter_answers(lm, questions, cache, **options):
        answers[index] = answer
    return [a for a in answers if a is not None]


def iter_answers(
    lm: LoadedModel,
    questions: list[str],
    cache: Caches = None,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    adapter_on: bool = False,
    framing: str | Framing = DEFAULT_FRAMING,
    batch_size: int | None = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    on_token: TokenSink | None = None,
) -> Iterator[tuple[int, Answer, float]]:
    """`answer_batch` as each batch finishes: (question index, answer, the batch's seconds per answer).
    `on_token(question index, token)` hears each answer's tokens as they are decoded, then (index, None) at its
    end (`StreamedAnswers` shows them)."""
    if batch_size is not None:
        _at_least_one("batch size", batch_size)
    _at_least_one("max batch tokens", max_batch_tokens)
    _at_least_one("max new tokens", max_new_tokens)
    caches = list(cache) if isinstance(cache, list) else [cache] * len(questions)
    if len(caches) != len(questions):
        raise LoramemError(f"{len(caches)} caches for {len(questions)} questions: give one per question")
    tok = lm.tokenizer
    frames = _framings(lm, caches, framing)
    prompts = [_prompt(tok, frames[id(c)], q, c) for q, c in zip(questions, caches)]
    budgets = _budgets(lm, questions, caches, prompts, max_new_tokens)
    max_new_tokens = max(budgets, default=max_new_tokens)  # what the batches are sized for
    pad_id = _pad_id(tok)
    # rows of one batch share their stop tokens; within that, alike caches and similar lengths pad less
    stop_sets = {key: _stops(lm, f) for key, f in frames.items()}
    stops = [stop_sets[id(c)] for c in caches]
    first_of = {id(c): i for i, c in reversed(list(enumerate(caches)))}
    order = sorted(
        range(len(prompts)),
        key=lambda i: (sorted(stops[i]), _kept_tokens(caches[i]), first_of[id(caches[i])], len(prompts[i])),
    )
    with adapter_scope(lm, adapter_on):
        for chunk in _chunks(order, caches, prompts, stops, max_new_tokens, batch_size, max_batch_tokens):
            started = time.perf_counter()
            rows, limits = [caches[i] for i in chunk], [budgets[i] for i in chunk]
            width = max(len(prompts[i]) for i in chunk)
            check_batch_memory(lm.config, lm.dtype.itemsize, batch_tokens(rows, width, max(limits)), lm.device)
            sink = None if on_token is None else _indexed(on_token, chunk)
            decoded = decode(lm.model, [prompts[i] for i in chunk], rows, set(stops[chunk[0]]), limits, pad_id, sink)
            seconds = (time.perf_counter() - started) / len(chunk)
            for i, row in zip(chunk, decoded):
                yield i, _decoded_answer(tok, questions[i], caches[i], row), seconds


def _at_least_one(what: str, value: int) -> None:
    if value < 1:
        raise LoramemError(f"{what} must be at least 1, got {value}")


def _framings(lm: LoadedModel, caches: list[KVCache | None], framing: str | Framing) -> dict[int, Framing]:
    """Each cache's framing, by id: the one it was encoded with; with no cache (closed-book), `framing`'s (a style
    or a Framing), made only when a question has none."""
    if any(c is None for c in caches):
        closed = framing if isinstance(framing, Framing) else lm.framing(framing)
    return {id(c): closed if c is None else Framing.from_dict(c.meta["framing"]) for c in caches}


def _prompt(tok: Any, frame: Framing, question: str, cache: KVCache | None) -> list[int]:
    """A question's tokens as its cache was framed: after the document, or the whole closed-book chat prompt."""
    if cache is None:
        return closed_book_ids(tok, frame, question)
    return question_ids(tok, frame, question, after_document=True)


def _budgets(
    lm: LoadedModel,
    questions: list[str],
    caches: list[KVCache | None],
    prompts: list[list[int]],
    max_new_tokens: int,
) -> list[int]:
    """Each question's answer budget: `max_new_tokens` cut to the room its cache and prompt leave in the context."""
    rows = [(q, c.n_tokens if c is not None else 0, len(p)) for q, c, p in zip(questions, caches, prompts)]
    return answer_budgets(lm.max_length, rows, max_new_tokens)


def _stops(lm: LoadedModel, frame: Framing) -> frozenset[int]:
    return frozenset(stop_token_ids(lm.tokenizer, frame, lm.model.generation_config))


def _pad_id(tok: Any) -> int:
    return next((t for t in (tok.pad_token_id, tok.eos_token_id) if isinstance(t, int)), 0)


def _chunks(
    order: list[int],
    caches: list[KVCache | None],
    prompts: list[list[int]],
    stops: list[frozenset[int]],
    max_new_tokens: int,
    batch_size: int | None,
    max_batch_tokens: int,
) -> Iterator[list[int]]:
    """Consecutive rows of `order` as batches of one stop set: `batch_size` rows, or (None) as many as fit
    `max_batch_tokens` as `batch_tokens` counts them."""
    chunk: list[int] = []
    width = 0
    for i in order:
        if chunk:
            grown = len(chunk) + 1
            if batch_size is not None:
                fits = grown <= batch_size
            else:
                rows = [caches[j] for j in chunk] + [caches[i]]
                needed = batch_tokens(rows, max(width, len(prompts[i])), max_new_tokens)
                fits = grown <= MAX_BATCH and needed <= max_batch_tokens
            if not fits or stops[i] != stops[chunk[0]]:
                yield chunk
                chunk, width = [], 0
        chunk.append(i)
        width = max(width, len(prompts[i]))
    if chunk:
        yield chunk


def _indexed(on_token: TokenSink, chunk: list[int]) -> TokenSink:
    """A batch's sink: its rows told to `on_token` as the questions they answer."""
    return lambda row, token: on_token(chunk[row], token)


def _text(tok: Any, tokens: list[int]) -> str:
    """An answer's tokens as text, unstripped."""
    text: str = tok.decode(tokens, skip_special_tokens=True)
    return text


def _decoded_answer(tok: Any, question: str, cache: KVCache | None, row: Decoded) -> Answer:
    return Answer(
        question=question,
        answer=_text(tok, row.tokens).strip(),
        new_tokens=len(row.tokens),
        stopped_at_end_of_turn=row.stopped,
        cache_tokens=_kept_tokens(cache),
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
    max_new_tokens: int = MAX_NEW_TOKENS,
    adapter_on: bool = False,
    framing: str | Framing = DEFAULT_FRAMING,
) -> Answer:
    """Answer `question` from `cache` (None: closed-book, framed as `framing`: a style or a Framing), greedily,
    stopping at the end of the turn."""
    return answer_batch(
        lm, [question], cache, max_new_tokens=max_new_tokens, adapter_on=adapter_on, framing=framing, batch_size=1
    )[0]


_LAST_WORD = re.compile(r"\s\S*\Z")  # the last whitespace and what follows it


class AnswerText:
    """One answer's text as its tokens are decoded: `add(token)` gives what can be shown now, `end()` the rest;
    together exactly the `Answer.answer` of those tokens (or its `text.one_line`).

    The tokens so far are decoded whole and the new part of the text shown, so characters made of several tokens and
    a tokenizer's spacing come out as the whole answer's decode has them. What may still change waits: a partial
    UTF-8 character at the end (decoded as U+FFFD), trailing whitespace (the answer is stripped), and with a tokenizer
    that cleans up spaces (" ." -> ".", " n't" -> "n't", as the default model's does) the last word and the space
    before it."""

    def __init__(self, tokenizer: Any, one_line: bool = False) -> None:
        self._tokenizer, self._one_line = tokenizer, one_line
        self._cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._tokens: list[int] = []
        self._shown = ""

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = _text(self._tokenizer, self._tokens).rstrip("\ufffd")
        if self._cleans_up:
            text = _LAST_WORD.sub("", text)
        return self._show(text.rstrip())

    def end(self) -> str:
        return self._show(_text(self._tokenizer, self._tokens).strip())

    def _show(self, text: str) -> str:
        text = one_line(text) if self._one_line else text.lstrip()
        if not text.startswith(self._shown):  # not settled yet: wait for a decode that extends what is shown
            return ""
        new, self._shown = text[len(self._shown) :], text
        return new


class StreamedAnswers:
    """Answers written as they are decoded, in question order (`ask --stream`, `chat`): the first unwritten
    question's text as its tokens come, a later one's (decoded beside it in the batch, or later) once every
    question before it is written; each ends with a newline. It is the `on_token` of `answer_batch`."""

    def __init__(self, tokenizer: Any, count: int, write: Callable[[str], None], one_line: bool = False) -> None:
        self._texts = [AnswerText(tokenizer, one_line) for _ in range(count)]
        self._order = InOrder(count, write)

    @property
    def mid_line(self) -> bool:
        """A line was begun and not ended: what an interrupt leaves."""
        return self._order.mid_line

    def __call__(self, index: int, token: int | None) -> None:
        text = self._texts[index]
        if token is None:
            self._order.add(index, text.end() + "\n", ended=True)
        else:
            self._order.add(index, text.add(token))


class LiveBatch:
    """Questions over one memory (a stored cache, or none: closed-book in `framing`; the adapter on or off) answered
    as they come, for a server: each joins the decoding batch at its next `step` and leaves it once answered
    (`loramem.model.running.RunningBatch`), instead of waiting for the questions before it. Each question is framed,
    budgeted and stopped as `answer_batch` does it, and gets `answer_batch`'s tokens; its text is streamed through
    an `AnswerText` (the pieces make `Answer.answer`), and its `Answer` comes at its end, its time to first token
    counted from `join`. Call join, cancel and step from one thread; how many rows to let in is the caller's call
    (`rows`, `columns`, `document_tokens`: what the batch holds, as `batch_tokens` counts it)."""

    def __init__(
        self,
        lm: LoadedModel,
        cache: KVCache | None,
        adapter_on: bool = False,
        framing: str | Framing = DEFAULT_FRAMING,
    ) -> None:
        with adapter_scope(lm, adapter_on):  # refused now, not at the first step: adapter on and none attached
            pass
        self.lm, self.cache, self.adapter_on = lm, cache, adapter_on
        self._frame = _framings(lm, [cache], framing)[id(cache)]
        self._batch = RunningBatch(lm.model, cache, set(_stops(lm, self._frame)), _pad_id(lm.tokenizer))

    def join(
        self,
        question: str,
        max_new_tokens: int = MAX_NEW_TOKENS,
        on_text: Callable[[str], None] | None = None,
        on_done: Callable[[Answer], None] | None = None,
    ) -> int:
        """Queue `question` (refused, exit 2, if it leaves no room for an answer, or the batch with it would not fit
        the memory available); `on_text` hears its answer's text
        as it can be shown, `on_done` its `Answer` once it has ended, or been cancelled (the answer so far).
        Returns its id."""
        _at_least_one("max new tokens", max_new_tokens)
        tok = self.lm.tokenizer
        prompt = _prompt(tok, self._frame, question, self.cache)
        (budget,) = _budgets(self.lm, [question], [self.cache], [prompt], max_new_tokens)
        rows, width = self.rows + 1, max(self.columns, len(prompt) + budget)  # the batch once it has joined, about
        check_batch_memory(self.lm.config, self.lm.dtype.itemsize, self.document_tokens + rows * width, self.lm.device)
        text = AnswerText(tok)

        def heard(token: int | None) -> None:
            piece = text.add(token) if token is not None else text.end()
            if piece and on_text is not None:
                on_text(piece)
            if token is None:
                answer = _decoded_answer(tok, question, self.cache, self._batch.result(row))
                if on_done is not None:
                    on_done(answer)

        row = self._batch.join(prompt, budget, heard)
        return row

    def cancel(self, row: int) -> None:
        """End a question now (a client gone): its `on_done` hears the answer so far."""
        self._batch.cancel(row)

    def step(self) -> None:
        """One step of the batch (`RunningBatch.step`), with the adapter on or off."""
        with adapter_scope(self.lm, self.adapter_on):
            self._batch.step()

    @property
    def rows(self) -> int:
        """Questions decoding or queued."""
        return self._batch.rows

    @property
    def columns(self) -> int:
        """Question and answer tokens each row holds now, beside the document (held once)."""
        return self._batch.columns

    @property
    def document_tokens(self) -> int:
        """Tokens the document holds (its fullest layer), once for every row."""
        return _kept_tokens(self.cache)

    @property
    def busy(self) -> bool:
        return self._batch.busy

    def __len__(self) -> int:
        return self.rows
