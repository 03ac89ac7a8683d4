"""Continuous batching (`loramem.model.running.RunningBatch`): rows that join a decoding batch between its steps and
leave it as they end get exactly the tokens `decode` gives each prompt alone, whenever they joined and whoever ran
beside them (CPU fp32; up to floating-point ties, reported as in tests/test_batch.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from families import FAMILIES, make_family_model
from test_batch import assert_same_tokens, lone_gaps, prompts_for

from loramem import compress, encode
from loramem.kv.value_groups import compress_value_groups
from loramem.model.attention import attending
from loramem.model.decode import Decoded, decode, forward, padded_ids
from loramem.model.documents import row_documents
from loramem.model.loading import load_model
from loramem.model.presized import aligned, assemble
from loramem.model.running import RunningBatch

# (step it joins at, prompt length, max new tokens): questions shorter and longer than the columns so far
JOINS = [(0, 6, 12), (0, 11, 7), (1, 4, 10), (1, 25, 12), (5, 3, 9), (5, 40, 6), (8, 9, 1), (14, 7, 5)]


@pytest.fixture(scope="module")
def cache(tiny, doc_text):
    return encode(tiny, doc_text, presses=["snapkv", "knorm"])


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 500) -> list[list[int]]:
    """Random ids: the random tiny model answers real questions alike, random prompts differently."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def drive(
    model,
    over,
    joins: list[tuple[int, list[int], int]],
    stops: frozenset[int] = frozenset(),
    cancels: dict[int, int] | None = None,
    watch=None,
) -> tuple[list[Decoded], list[list[int | None]]]:
    """Run a RunningBatch until it is idle, row i joining before step joins[i][0] and cancelled before step
    cancels[i]; each row's result and what its sink heard. `watch(batch)` is called after every step."""
    batch = RunningBatch(model, over, set(stops), 0)
    heard: list[list[int | None]] = [[] for _ in joins]
    ids: list[int] = [-1] * len(joins)
    cancels = cancels or {}
    step = 0
    while step <= max(at for at, _, _ in joins) or batch.busy:
        for i, (at, prompt, limit) in enumerate(joins):
            if at == step:
                ids[i] = batch.join(prompt, limit, heard[i].append)
        for i, at in cancels.items():
            if at == step:
                batch.cancel(ids[i])
        if batch.busy:
            batch.step()
            if watch is not None:
                watch(batch)
        step += 1
    return [batch.result(i) for i in ids], heard


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
            assert torch.allclose(next_logits(merged), apart, atol=1e-5)


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
