"""Continuous batching (`loramem.model.running.RunningBatch`): rows that join a decoding batch between its steps and
leave it as they end get exactly the tokens `decode` gives each prompt alone, whenever they joined and whoever ran
beside them (CPU fp32; up to floating-point ties, reported as in tests/test_batch.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

import pytest
import torch
from conftest import REPO, assert_same_sums
from families import FAMILIES, make_family_model
from test_batch import QUESTIONS, assert_same_tokens, lone_gaps, prompts_for

from loramem import compress, encode
from loramem.adapters.attach import attach_adapter, detach_adapter
from loramem.adapters.train import train_adapter
from loramem.answer import Answer, LiveBatch, answer_batch
from loramem.errors import LoramemError
from loramem.kv.value_groups import compress_value_groups
from loramem.model import limits
from loramem.model.attention import attending
from loramem.model.decode import Decoded, decode, forward, padded_ids
from loramem.model.documents import row_documents
from loramem.model.loading import load_model
from loramem.model.presized import aligned, assemble
from loramem.model.running import RunningBatch
from loramem.specs import TrainSpec

# (step it joins at, prompt length, max new tokens): questions shorter and longer than the columns so far
JOINS = [(0, 6, 12), (0, 11, 7), (1, 4, 10), (1, 25, 12), (5, 3, 9), (5, 40, 6), (8, 9, 1), (14, 7, 5)]


@pytest.fixture(scope="module")
def cache(tiny, doc_text):
    return encode(tiny, doc_text, presses=["snapkv", "knorm"])


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 500) -> list[list[int]]:
    """Random ids: the random tiny model answers real questions alike, random prompts differently."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def run_steps(batch, joins: list[tuple[int, Callable[[], int]]], cancels: dict[int, int], watch=None) -> list[int]:
    """Step `batch` until it is idle, join i (a call that joins a row and returns its id) made before step
    joins[i][0] and its row cancelled before step cancels[i]; the rows' ids. `watch(batch)` sees every step."""
    ids: list[int] = [-1] * len(joins)
    step = 0
    while step <= max(at for at, _ in joins) or batch.busy:
        for i, (at, join) in enumerate(joins):
            if at == step:
                ids[i] = join()
        for i, at in cancels.items():
            if at == step:
                batch.cancel(ids[i])
        if batch.busy:
            batch.step()
            if watch is not None:
                watch(batch)
        step += 1
    return ids


def drive(
    model,
    over,
    joins: list[tuple[int, list[int], int]],
    stops: frozenset[int] = frozenset(),
    cancels: dict[int, int] | None = None,
    watch=None,
) -> tuple[list[Decoded], list[list[int | None]]]:
    """A RunningBatch over `over` run with rows (step it joins at, prompt, max new tokens): each row's result and
    what its sink heard."""
    batch = RunningBatch(model, over, set(stops), 0)
    heard: list[list[int | None]] = [[] for _ in joins]
    calls = [(at, partial(batch.join, prompt, limit, sink.append)) for (at, prompt, limit), sink in zip(joins, heard)]
    return [batch.result(i) for i in run_steps(batch, calls, cancels or {}, watch)], heard


def assert_rows_equal_alone(model, over, joins, stops=frozenset()) -> list[Decoded]:
    """Every row's tokens, end and streamed tokens are those of `decode` of its prompt alone."""
    results, heard = drive(model, over, joins, set(stops))
    for (_, prompt, limit), got, told in zip(joins, results, heard):
        alone = decode(model, [prompt], over, set(stops), limit, 0)[0]
        assert (got.tokens, got.stopped) == (alone.tokens, alone.stopped), prompt
        assert told == [*got.tokens, None]
        assert got.prompt_tokens == len(prompt)
    return results


def cache_kind(cache, kind: str):
    if kind == "snapkv":
        return compress(cache, "snapkv", ratio=0.6)
    if kind == "per-layer":  # layer 1 keeps half of what layer 0 keeps
        small = compress(cache, "knorm", ratio=0.5)
        for kept in (small.keys, small.values, small.positions):
            kept[1] = kept[1][:, ::2].clone()
        return small
    if kind == "value-groups":  # kept tokens differ per head
        return compress_value_groups(cache, "knorm", groups=4, budget=0.3)
    return None if kind == "closed-book" else cache


@pytest.mark.parametrize("kind", ["full", "snapkv", "per-layer", "value-groups", "closed-book"])
def test_rows_joining_at_any_step_equal_each_alone(tiny, cache, one_thread, kind):
    """Rows join at steps 0, 1, 5, 8 and 14 with questions shorter and longer than the running columns and their
    own limits (one of a single token), some stopping early: each decodes what it decodes alone."""
    over = cache_kind(cache, kind)
    prompts = random_prompts([n for _, n, _ in JOINS])
    joins = [(at, prompt, limit) for (at, _, limit), prompt in zip(JOINS, prompts)]
    free = assert_rows_equal_alone(tiny.model, over, joins)
    assert len({tuple(r.tokens[:3]) for r in free}) > 3, "rows alike: the test would not tell rows apart"
    stops = {free[0].tokens[3], free[3].tokens[1]}  # rows end at several steps, not only at their limits
    stopped = assert_rows_equal_alone(tiny.model, over, joins, stops)
    assert sum(r.stopped for r in stopped) >= 2


def test_a_fixed_batch_through_the_running_batch_is_decode(tiny, cache, one_thread):
    """Rows that all join at step 0 are decode()'s fixed batch: the same tokens as one call over all of them."""
    prompts = random_prompts([5, 9, 3, 12, 7], seed=1)
    together = decode(tiny.model, prompts, cache, set(), [10, 4, 10, 7, 1], 0)
    results, _ = drive(tiny.model, cache, [(0, p, limit) for p, limit in zip(prompts, [10, 4, 10, 7, 1])])
    assert [r.tokens for r in results] == [r.tokens for r in together]


def test_a_cancelled_row_leaves_and_the_others_go_on(tiny, cache, one_thread):
    """A row cancelled mid-decode (a client gone) ends there, its sink hearing None once; a queued row cancelled
    before its question pass gets nothing; the others decode as they would alone."""
    prompts = random_prompts([6, 14, 4, 8], seed=2)
    joins = [(0, prompts[0], 12), (0, prompts[1], 12), (2, prompts[2], 12), (4, prompts[3], 12)]
    sizes: list[int] = []
    results, heard = drive(tiny.model, cache, joins, cancels={1: 3, 3: 4}, watch=lambda b: sizes.append(b.rows))
    cut = decode(tiny.model, [prompts[1]], cache, set(), 12, 0)[0].tokens
    assert results[1].tokens == cut[:4] and not results[1].stopped  # its question pass and three steps
    assert heard[1] == [*cut[:4], None]
    assert results[3].tokens == [] and heard[3] == [None]
    for i in (0, 2):
        assert results[i].tokens == decode(tiny.model, [prompts[i]], cache, set(), 12, 0)[0].tokens
    assert sizes[:4] == [2, 2, 3, 2]  # the cancelled row gone from the step after its cancel


def test_a_batch_that_never_empties_stays_bounded(tiny, cache, one_thread):
    """Rows joining every other step for many steps: the batch's columns span only its rows' own (columns freed by
    rows that left are dropped; at most the widest row's question and answer, and room for the longest answer, since
    every row writes the same column), not the steps run so far; every row still decodes what it does alone."""
    lengths = [3 + (7 * i) % 17 for i in range(60)]
    joins = [(2 * i, p, 4 + i % 5) for i, p in enumerate(random_prompts(lengths, seed=3))]
    widest: list[int] = []
    results, _ = drive(tiny.model, cache, joins, watch=lambda b: widest.append(b.columns))
    assert max(widest) <= max(len(p) + limit for _, p, limit in joins) + max(limit for _, _, limit in joins)
    assert len(widest) > 3 * max(widest)  # many more steps than columns
    for (_, prompt, limit), got in zip(joins, results):
        assert got.tokens == decode(tiny.model, [prompt], cache, set(), limit, 0)[0].tokens


def test_a_step_without_rows_does_nothing(tiny, cache):
    batch = RunningBatch(tiny.model, cache, set(), 0)
    assert not batch.busy and len(batch) == 0 and batch.columns == 0
    batch.step()
    row = batch.join([5, 6, 7], 2)
    assert batch.busy and len(batch) == 1
    with pytest.raises(ValueError, match="still decoding"):
        batch.result(row)
    with pytest.raises(ValueError, match="at least 1"):
        batch.join([5], 0)
    batch.step()  # the question pass gives token 1, the step token 2: the limit
    assert not batch.busy and len(batch.result(row).tokens) == 2


def test_aligned_rows_see_only_their_own_columns(tiny, cache, one_thread):
    """The merge itself: running rows (some steps in) and joiners (just past their question pass, shorter and longer
    than the running columns) aligned into one batch give, at the next step, each row's logits of its own batch
    going on alone. A joiner that saw another row's columns, its own left padding, or columns moved to the wrong
    place would be off by far more than rounding."""
    for over in (cache, compress_value_groups(cache, "knorm", groups=4, budget=0.3), None):
        running, joiners = random_prompts([7, 12], seed=4), random_prompts([3, 30], seed=5)

        docs, start = row_documents(tiny.model, over, 1, "cpu", torch.float32)  # one copy, as a running batch holds

        def started(prompts, steps):
            batch = assemble(tiny.model, docs, prompts, start.expand(len(prompts)), max(map(len, prompts)) + steps + 1)
            with torch.inference_mode(), attending(batch, tiny.model):
                forward(tiny.model, batch, padded_ids(prompts, 0, "cpu"))
                for step in range(steps):
                    forward(tiny.model, batch, torch.full((len(prompts), 1), 11 + step))
            return batch

        def next_logits(batch):
            with torch.inference_mode(), attending(batch, tiny.model):
                return forward(tiny.model, batch, torch.full((batch.new_positions.shape[0], 1), 7))

        for steps in (2, 25):  # the running columns longer, then shorter, than the long joiner's question
            parts = [started(running, steps), started(joiners, 0)]
            with torch.inference_mode():
                merged = aligned(parts, 1)
            apart = torch.cat([next_logits(part) for part in parts])
            # rounding errs once per layer, each over its longest reduction (the MLP's width or the keys attended)
            config = tiny.model.config
            widest = max(config.hidden_size, config.intermediate_size, merged.get_seq_length() + 1)
            assert_same_sums(next_logits(merged), apart, terms=config.num_hidden_layers * widest)


@pytest.mark.real
def test_default_model_rows_joining_equal_each_alone(real):
    """The demo questions over the demo document and over a compressed copy, joining a running batch at steps 0, 1
    and 5: each answer is the question's alone, token for token (a tie is reported as a skip)."""
    questions = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").open()]
    full = encode(real, (REPO / "examples/demo/lighthouse.txt").read_text(), presses=["snapkv"])
    for over in (full, compress(full, "snapkv", ratio=0.5)):
        prompts = prompts_for(real, over, questions)
        joins = [((0, 1, 5)[i % 3], prompt, 16 - 3 * (i % 2)) for i, prompt in enumerate(prompts)]
        results, _ = drive(real.model, over, joins)
        for (_, prompt, limit), got in zip(joins, results):
            expected = decode(real.model, [prompt], over, set(), limit, 0)[0].tokens
            if got.tokens != expected:
                assert_same_tokens(got.tokens, expected, lone_gaps(real, over, prompt, expected))


def test_sliding_window_rows_joining_equal_each_alone(tmp_path_factory, doc_text, one_thread):
    """Gemma-2's sliding window (64) on alternate layers, over a document longer than it and rows whose question and
    answer outgrow it: the window is each row's own original positions, wherever its columns were moved."""
    lm = load_model(str(make_family_model(FAMILIES["gemma2"], tmp_path_factory.mktemp("gemma2"))))
    assert any(getattr(layer.self_attn, "sliding_window", None) for layer in lm.model.model.layers)
    over = encode(lm, doc_text)
    assert over.n_tokens > 64
    prompts = random_prompts([10, 50, 4, 30], seed=6, vocab=len(lm.tokenizer) - 20)
    joins = [(0, prompts[0], 40), (1, prompts[1], 30), (5, prompts[2], 40), (5, prompts[3], 20)]
    assert_rows_equal_alone(lm.model, over, joins)


# --- the answering layer's LiveBatch --------------------------------------------------------------------------------

TIMINGS = ("prefill_seconds", "time_to_first_token_seconds", "decode_tokens_per_second")


def untimed(answer: Answer) -> dict:
    return {k: v for k, v in answer.to_dict().items() if k not in TIMINGS}


def live(
    lm, over, questions: list[str], steps: list[int], limits: list[int], cancels=None, **options
) -> tuple[list[list[Answer]], list[str]]:
    """Questions joining a LiveBatch at `steps`: each one's `on_done` answers, and its streamed text."""
    batch = LiveBatch(lm, over, **options)
    done: list[list[Answer]] = [[] for _ in questions]
    texts = [""] * len(questions)

    def joiner(i: int) -> Callable[[], int]:
        def on_text(piece: str) -> None:
            texts[i] += piece

        return partial(batch.join, questions[i], limits[i], on_text, done[i].append)

    run_steps(batch, [(at, joiner(i)) for i, at in enumerate(steps)], cancels or {})
    return done, texts


@pytest.mark.parametrize("closed_book", [False, True])
def test_live_answers_are_the_batch_answers(tiny, cache, one_thread, closed_book):
    """Questions joining at steps 0, 1 and 3 with their own limits get `answer_batch`'s answers, cache use and
    lengths (the timings are theirs: time to first token from the join); the streamed text is the answer."""
    over = None if closed_book else cache
    questions, limits = QUESTIONS, [12, 5, 12, 1, 8]
    done, texts = live(tiny, over, questions, [0, 1, 1, 3, 3], limits, framing="chat")
    for question, limit, answers, text in zip(questions, limits, done, texts):
        (expected,) = answer_batch(tiny, [question], over, max_new_tokens=limit, framing="chat")
        (answer,) = answers
        assert untimed(answer) == untimed(expected) and text == answer.answer
        assert answer.time_to_first_token_seconds >= answer.prefill_seconds > 0
    assert any(a.new_tokens > 1 and a.decode_tokens_per_second > 0 for (a,) in done)


def test_live_answers_with_the_adapter_on(tiny, cache, doc_text, tmp_path, one_thread):
    """Steps run with the attached adapter on or off as the batch was made: answer_batch's answers for each."""
    trained = tmp_path / "doc.lora"
    train_adapter(tiny, doc_text, [("Who designed the lighthouse?", "Orla Quenby")], trained, TrainSpec(steps=1))
    attach_adapter(tiny, trained)
    try:
        generator = torch.Generator().manual_seed(0)
        for name, weight in tiny.model.named_parameters():  # a trained-looking adapter that changes the answers
            if "lora_B" in name:
                weight.data.normal_(0.0, 0.3, generator=generator)
        answers = {}
        for on in (True, False):
            done, _ = live(tiny, cache, QUESTIONS[:3], [0, 1, 2], [8, 8, 8], adapter_on=on)
            expected = answer_batch(tiny, QUESTIONS[:3], cache, max_new_tokens=8, adapter_on=on)
            assert [untimed(a) for (a,) in done] == [untimed(a) for a in expected]
            answers[on] = [a.answer for (a,) in done]
        assert answers[True] != answers[False], "the adapter changed nothing: the test would not see it"
    finally:
        detach_adapter(tiny)


def test_a_cancelled_live_question_is_done_with_its_answer_so_far(tiny, cache, one_thread):
    """A client gone: its question ends at once with the answer so far; the others are answered as ever."""
    done, texts = live(tiny, cache, QUESTIONS[:3], [0, 0, 1], [12, 12, 12], cancels={1: 2, 2: 1})
    (cut,) = done[1]
    (whole,) = answer_batch(tiny, [QUESTIONS[1]], cache, max_new_tokens=12)
    assert cut.new_tokens == 3 and not cut.stopped_at_end_of_turn and texts[1] == cut.answer
    assert whole.answer.startswith(cut.answer)
    assert done[2][0].new_tokens == 0 and done[2][0].answer == ""
    assert untimed(done[0][0]) == untimed(answer_batch(tiny, [QUESTIONS[0]], cache, max_new_tokens=12)[0])


def test_live_batch_refusals(tiny, cache, monkeypatch):
    """What a server answers 400 to (exit 2): no adapter to turn on, a question past the context, a bad limit, a
    batch that would outgrow the memory."""
    with pytest.raises(LoramemError, match="no adapter"):
        LiveBatch(tiny, cache, adapter_on=True)
    batch = LiveBatch(tiny, cache)
    with pytest.raises(LoramemError, match="does not fit"):
        batch.join("word " * tiny.max_length)
    with pytest.raises(LoramemError, match="at least 1"):
        batch.join("Who?", 0)
    assert not batch.busy and len(batch) == 0
    held = 2 * tiny.config.num_hidden_layers * tiny.config.num_key_value_heads * tiny.config.head_dim * 4
    monkeypatch.setattr(limits, "available_memory", lambda device: held * (cache.n_tokens + 40))
    batch.join("Who?", 8)  # the document and one row fit
    with pytest.raises(LoramemError, match="more than"):
        batch.join("Who?", 30)
    assert len(batch) == 1 and batch.document_tokens == cache.n_tokens


@pytest.mark.real
def test_default_model_live_answers_are_the_batch_answers(real):
    """The demo questions joining at steps 0, 1 and 5 over the demo cache: `answer_batch`'s answers."""
    questions = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").open()]
    over = encode(real, (REPO / "examples/demo/lighthouse.txt").read_text())
    done, texts = live(real, over, questions, [0, 1, 5, 5], [16] * len(questions))
    expected = answer_batch(real, questions, over, max_new_tokens=16, batch_size=1)
    assert [untimed(a) for (a,) in done] == [untimed(a) for a in expected]
    assert texts == [a.answer for a in expected]
