"""Batched answering: every row of a batch equals the question asked alone, token for token (CPU fp32).

A batch row and a lone question go through the same arithmetic except for the matrix shapes (batch rows, left
padding), so their logits agree to ~1e-6, not bit for bit. A greedy token could therefore flip only where the two
best logits tie to that precision; `assert_same_tokens` says so explicitly when it happens instead of failing on it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_DOC, REPO, run_cli

from loramem import compress, encode
from loramem.answer import _chunks, answer_batch, batch_rows, batch_tokens, generate
from loramem.errors import LoramemError
from loramem.kv.value_groups import compress_value_groups, head_masks
from loramem.model import attention as attention_module
from loramem.model import decode as decode_module
from loramem.model.attention import attending
from loramem.model.decode import decode
from loramem.model.documents import build_cache, shared_lead
from loramem.model.presized import PresizedCache
from loramem.model.prompt import Framing, closed_book_ids, question_ids

QUESTIONS = [
    "Who designed the lighthouse?",
    "When?",
    "What did the keeper write in the logbook on the night of the great storm, and why did he stop?",
    "Which island?",
    "How tall is the tower and what is it made of?",
]
TIE = 1e-4  # two best logits closer than this: a tie that floating-point order may break either way


def prompts_for(lm, cache, questions=QUESTIONS):
    frame = Framing.from_dict(cache.meta["framing"])
    return [question_ids(lm.tokenizer, frame, q, after_document=True) for q in questions]


def full_prompt_tokens(lm, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the whole prompt, one plain forward pass per token (no cache), with each step's top-2 gap."""
    ids, gaps = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            gaps.append(float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], gaps


def assert_same_tokens(got: list[int], expected: list[int], gaps: list[float]) -> None:
    """Equal, or equal up to a step where the reference's two best logits tie (reported, not hidden)."""
    for step, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert gaps[step] < TIE, f"step {step}: {a} != {b} with a top-2 gap of {gaps[step]:.2e} (no tie)"
            pytest.skip(f"floating-point tie at step {step} (top-2 gap {gaps[step]:.1e}): tokens may differ here")
    assert len(got) == len(expected)


@pytest.fixture(scope="module")
def cache(tiny, doc_text):
    return encode(tiny, doc_text, presses=["snapkv", "knorm"])


def batched_logits(lm, cache, prompts) -> torch.Tensor:
    """Last-token logits of every row after the (left-padded) question block of one batch."""
    width = max(len(p) for p in prompts)
    batch = build_cache(lm.model, cache, prompts, width + 1, lm.device, lm.dtype)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.inference_mode(), attending(batch, lm.model):
        batch.prepare(width)
        out = lm.model(input_ids=ids, past_key_values=batch, position_ids=batch.new_positions[:, :width])
    return out.logits[:, -1]


def lone_gaps(lm, cache, prompt: list[int], tokens: list[int]) -> list[float]:
    """The top-2 logit gap of a lone row before each of its `tokens` (question and answer so far as one block)."""
    gaps = []
    for step in range(len(tokens)):
        top = batched_logits(lm, cache, [prompt + tokens[:step]])[0].topk(2).values
        gaps.append(float(top[0] - top[1]))
    return gaps


@pytest.mark.parametrize("kind", ["full", "snapkv", "per-layer"])
def test_batch_rows_equal_full_prompt(tiny, cache, one_thread, kind):
    """Padded rows over a full, a per-head evicted, and a per-layer different cache: the logits and greedy tokens
    of the whole prompt run in plain transformers."""
    if kind == "snapkv":
        cache = compress(cache, "snapkv", ratio=0.6)
    elif kind == "per-layer":  # layer 1 keeps half of what layer 0 keeps
        cache = compress(cache, "snapkv", ratio=0.6)
        for kept in (cache.keys, cache.values, cache.positions):
            kept[1] = kept[1][:, ::2].clone()
    prompts = prompts_for(tiny, cache)
    rows = batched_logits(tiny, cache, prompts)
    decoded = decode(tiny.model, prompts, cache, set(), 8, 0)
    for prompt, row, got in zip(prompts, rows, decoded):
        if kind == "full":
            with torch.inference_mode():
                full = tiny.model(input_ids=torch.tensor([cache.token_ids.tolist() + prompt])).logits[0, -1]
            assert torch.allclose(row, full, atol=1e-4)
            assert_same_tokens(got.tokens, *full_prompt_tokens(tiny, cache.token_ids.tolist() + prompt, 8))
        lone = decode(tiny.model, [prompt], cache, set(), 8, 0)[0]
        assert torch.allclose(row, batched_logits(tiny, cache, [prompt])[0], atol=1e-5)
        assert got.tokens == lone.tokens


def test_value_group_batch_equals_head_masked_reference(tiny, cache, one_thread):
    """Per-head kept tokens (value groups): batched logits equal the reference head-masked DynamicCache pass."""
    small = compress_value_groups(cache, "knorm", groups=4, budget=0.3)
    prompts = prompts_for(tiny, small)
    rows = batched_logits(tiny, small, prompts)
    present = [m.any(-1) for m in small.masks]
    for prompt, row in zip(prompts, rows):
        position = torch.arange(small.n_tokens, small.n_tokens + len(prompt))[None]
        with torch.inference_mode(), head_masks(tiny.model, present):
            ref = tiny.model(
                input_ids=torch.tensor([prompt]), past_key_values=small.to_dynamic_cache(), position_ids=position
            ).logits[0, -1]
        assert torch.allclose(row, ref, atol=1e-5)
    batched = answer_batch(tiny, QUESTIONS, small, max_new_tokens=8, batch_size=5)
    assert [a.answer for a in batched] == [generate(tiny, q, small, max_new_tokens=8).answer for q in QUESTIONS]


def cache_variants(cache):
    """What an eval's cells of one document hold: the whole cache, evictions at two ratios and two presses, per-head
    value groups, and no document at all."""
    return [
        cache,
        compress(cache, "snapkv", ratio=0.5),
        compress(cache, "knorm", ratio=0.9),
        compress_value_groups(cache, "knorm", groups=4, budget=0.3),
        None,
    ]


def test_shared_document_is_held_once_and_chunked_attention_agrees(tiny, cache, one_thread, monkeypatch):
    """Rows over one document read a single copy of its keys/values; attention taken one query column at a time
    (how long question blocks are bounded in memory) gives the logits of the whole block at once."""
    for kept in (cache, compress_value_groups(cache, "knorm", groups=4, budget=0.3)):
        prompts = prompts_for(tiny, kept)
        batch = build_cache(tiny.model, kept, prompts, 40, tiny.device, tiny.dtype)
        assert all(layer.doc_keys.shape[0] == 1 and layer.keys.shape[0] == len(prompts) for layer in batch.layers)
        whole = batched_logits(tiny, kept, prompts)
        with monkeypatch.context() as patch:
            patch.setattr(attention_module, "SCORES_PER_CHUNK", 1)
            assert torch.allclose(batched_logits(tiny, kept, prompts), whole, atol=1e-5)


def mixed_rows(lm, cache) -> tuple[list, list[str], list[list[int]]]:
    """Eleven rows over the cache variants (caches, questions, prompts), each variant with different questions."""
    variants = cache_variants(cache)
    frame = Framing.for_tokenizer(lm.tokenizer)
    rows = [(variants[i % len(variants)], QUESTIONS[i % len(QUESTIONS)]) for i in range(2 * len(variants) + 1)]
    prompts = [
        prompts_for(lm, c, [q])[0] if c is not None else closed_book_ids(lm.tokenizer, frame, q) for c, q in rows
    ]
    return [c for c, _ in rows], [q for _, q in rows], prompts


def test_rows_over_different_caches_equal_each_alone(tiny, cache, one_thread):
    """One batch whose rows carry different caches (padded to the longest, masked): every row's logits and greedy
    tokens equal that row decoded alone over its own cache."""
    caches, questions, prompts = mixed_rows(tiny, cache)
    rows = list(zip(caches, questions))
    logits = batched_logits(tiny, caches, prompts)
    decoded = decode(tiny.model, prompts, caches, set(), 8, 0)
    for c, prompt, row, got in zip(caches, prompts, logits, decoded):
        assert torch.allclose(row, batched_logits(tiny, c, [prompt])[0], atol=1e-5)
        assert got.tokens == decode(tiny.model, [prompt], c, set(), 8, 0)[0].tokens
    together = answer_batch(tiny, questions, caches, max_new_tokens=8)
    assert [a.answer for a in together] == [generate(tiny, q, c, max_new_tokens=8).answer for c, q in rows]
    assert [a.cache_tokens for a in together] == [max(c.kept_per_layer) if c else 0 for c in caches]
    with pytest.raises(LoramemError, match="one per question"):
        answer_batch(tiny, questions, caches[:-1])


def test_retained_rows_go_on_as_a_batch_of_only_them(tiny, cache, one_thread):
    """Over one shared document (held once): after some rows leave, the next step's logits of the rest equal those
    of a batch of only those rows (the tiny model answers every question alike, so no row would stop first)."""
    prompts, keep = prompts_for(tiny, cache), [0, 2, 3]  # row 2 is the longest: both batches pad alike
    width = max(len(p) for p in prompts)

    def next_logits(rows: list[list[int]], retain: list[int] | None = None) -> torch.Tensor:
        batch = build_cache(tiny.model, cache, rows, width + 1, tiny.device, tiny.dtype)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in rows])
        with torch.inference_mode(), attending(batch, tiny.model):
            batch.prepare(width)
            tiny.model(input_ids=ids, past_key_values=batch, position_ids=batch.new_positions[:, :width])
            if retain is not None:
                batch.retain(retain)
                assert all(layer.doc_keys.shape[0] == 1 for layer in batch.layers)
            batch.prepare(1)
            out = tiny.model(
                input_ids=torch.full((len(retain or rows), 1), 7),
                past_key_values=batch,
                position_ids=batch.new_positions[:, width:],
                cache_position=torch.tensor([width]),
            )
        return out.logits[:, -1]

    assert torch.allclose(next_logits(prompts, keep), next_logits([prompts[i] for i in keep]), atol=1e-5)


def test_finished_rows_leave_the_batch(tiny, cache, one_thread, monkeypatch):
    """Rows that stop early leave the batch (its buffers and masks shrink to the running rows); the others go on
    exactly as they would alone."""
    caches, _, prompts = mixed_rows(tiny, cache)
    free = decode(tiny.model, prompts, caches, set(), 10, 0)
    stops = {free[row].tokens[step] for row, step in ((0, 1), (3, 2), (6, 4), (9, 6))}  # rows end at several steps
    sizes: list[int] = []
    retain = PresizedCache.retain
    monkeypatch.setattr(PresizedCache, "retain", lambda self, rows: retain(self, rows) or sizes.append(len(rows)))
    together = decode(tiny.model, prompts, caches, stops, 10, 0)
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(prompts)
    assert sum(row.stopped for row in together) >= 4
    for c, prompt, row in zip(caches, prompts, together):
        lone = decode(tiny.model, [prompt], c, stops, 10, 0)[0]
        assert (row.tokens, row.stopped) == (lone.tokens, lone.stopped)


def test_rows_over_one_shared_document_leave_as_soon_as_they_finish(tiny, cache, one_thread, monkeypatch):
    """Over one shared document a retirement copies only the rows' own columns, so a row leaves at the step it
    finishes; the others go on exactly as they would alone."""
    generator = torch.Generator().manual_seed(0)  # the random tiny model answers real questions alike: random ids
    prompts = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (5, 9, 3, 12, 7)]
    free = decode(tiny.model, prompts, cache, set(), 10, 0)
    stops = {free[0].tokens[1], free[4].tokens[4]}
    ends = [next((i for i, t in enumerate(r.tokens) if t in stops), None) for r in free]
    expected = []
    for step in sorted({e for e in ends if e is not None and e < 9}):
        running = sum(e is None or e > step for e in ends)
        if running > 0 and (not expected or running < expected[-1]):
            expected.append(running)
    sizes: list[int] = []
    retain = PresizedCache.retain
    monkeypatch.setattr(PresizedCache, "retain", lambda self, rows: retain(self, rows) or sizes.append(len(rows)))
    together = decode(tiny.model, prompts, cache, stops, 10, 0)
    assert expected and sizes == expected
    for prompt, row in zip(prompts, together):
        lone = decode(tiny.model, [prompt], cache, stops, 10, 0)[0]
        assert (row.tokens, row.stopped) == (lone.tokens, lone.stopped)


def test_batches_of_different_caches_fit_the_memory_budget(cache):
    """No batch exceeds --max-batch-tokens: rows over one shared cache count the document once (the engine holds one
    copy), rows over different caches a copy each at the batch's largest; questions at the batch's longest."""
    small, large = compress(cache, "knorm", ratio=0.9), cache
    caches = [small] * 6 + [large] * 6
    prompts = [[0] * (3 + i % 4) for i in range(12)]
    budget = large.n_tokens + 3 * (6 + 10)  # the large document once and three rows
    chunks = list(_chunks(list(range(12)), caches, prompts, [frozenset()] * 12, 10, None, budget))
    assert sorted(i for c in chunks for i in c) == list(range(12))
    for chunk in chunks:
        rows = [caches[i] for i in chunk]
        assert len(chunk) == 1 or batch_tokens(rows, max(len(prompts[i]) for i in chunk), 10) <= budget
    assert [len(c) for c in chunks] == [6, 3, 3]  # the small rows together; the large ones three at a time
    mixed = [small, large] * 3  # six different-cache rows: a copy each, so fewer fit
    assert batch_tokens(mixed, 6, 10) == 6 * large.n_tokens + 6 * 16
    assert batch_tokens([large] * 6, 6, 10) == large.n_tokens + 6 * 16
    stops = [frozenset()] * 6 + [frozenset({1})] * 6  # rows of one batch share their stop tokens
    assert [len(c) for c in _chunks(list(range(12)), [small] * 12, prompts, stops, 10, 16, 10**9)] == [6, 6]


def test_closed_book_batch_equals_one_at_a_time(tiny, one_thread):
    frame = Framing.for_tokenizer(tiny.tokenizer)
    prompts = [closed_book_ids(tiny.tokenizer, frame, q) for q in QUESTIONS]
    decoded = decode(tiny.model, prompts, None, set(), 6, 0)
    for prompt, got in zip(prompts, decoded):
        assert_same_tokens(got.tokens, *full_prompt_tokens(tiny, prompt, 6))
    assert [a.answer for a in answer_batch(tiny, QUESTIONS, None, max_new_tokens=6)] == [
        generate(tiny, q, None, max_new_tokens=6).answer for q in QUESTIONS
    ]


def test_rows_stop_at_their_own_end(tiny, cache, one_thread):
    """A row that meets a stop token ends there; the others run on to their own end or the limit."""
    prompts = prompts_for(tiny, cache)
    free = decode(tiny.model, prompts, cache, set(), 6, 0)
    stop = free[2].tokens[1]  # row 2's second token becomes a stop token
    stopped = decode(tiny.model, prompts, cache, {stop}, 6, 0)
    for before, after in zip(free, stopped):
        cut = before.tokens.index(stop) if stop in before.tokens else len(before.tokens)
        assert after.tokens == before.tokens[:cut]
        assert after.stopped == (stop in before.tokens)
    assert stopped[2].tokens == free[2].tokens[:1] and stopped[2].stopped


def test_batch_size_follows_the_memory_budget(tiny, cache):
    assert batch_rows(cache, 20, 30, 10**9) == 16
    assert batch_rows(cache, 20, 30, cache.n_tokens + 3 * 50) == 3  # the shared document is held once
    assert batch_rows(cache, 20, 30, 1) == 1
    with pytest.raises(Exception, match="batch size"):
        answer_batch(tiny, QUESTIONS, cache, batch_size=0)


@pytest.mark.real
def test_default_model_demo_questions_batched(real):
    """The bundled demo questions over the demo document: batch 4 gives the answers of batch 1, token for token."""
    questions = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").open()]
    cache = encode(real, (REPO / "examples/demo/lighthouse.txt").read_text())
    prompts = prompts_for(real, cache, questions)
    lone = [decode(real.model, [p], cache, set(), 16, 0)[0].tokens for p in prompts]
    together = [row.tokens for row in decode(real.model, prompts, cache, set(), 16, 0)]
    for prompt, got, expected in zip(prompts, together, lone):
        if got != expected:  # only a tie may separate them: check the margin at the first difference
            _, gaps = full_prompt_tokens(real, cache.token_ids.tolist() + prompt, 16)
            assert_same_tokens(got, expected, gaps)


@pytest.mark.real
def test_default_model_demo_questions_over_different_caches(real):
    """The demo questions over the whole demo cache and two evictions of it, all in one batch: each answer equals
    the question asked alone over its own cache, token for token."""
    questions = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").open()]
    cache = encode(real, (REPO / "examples/demo/lighthouse.txt").read_text(), presses=["snapkv"])
    variants = [cache, compress(cache, "snapkv", ratio=0.5), compress(cache, "snapkv", ratio=0.9)]
    caches = [c for c in variants for _ in questions]
    prompts = [p for c in variants for p in prompts_for(real, c, questions)]
    together = decode(real.model, prompts, caches, set(), 16, 0)
    for c, prompt, got in zip(caches, prompts, together):
        expected = decode(real.model, [prompt], c, set(), 16, 0)[0].tokens
        if got.tokens != expected:  # a tie is reported as a skip, any other difference fails
            assert_same_tokens(got.tokens, expected, lone_gaps(real, c, prompt, expected))


def test_cli_batch_sizes_give_the_same_answers(tiny_dir, tmp_path):
    """`ask --questions FILE --batch-size 16` prints the answers of `--batch-size 1`, in the file's order."""
    cache_file, questions = tmp_path / "c.safetensors", tmp_path / "q16.txt"
    assert run_cli("encode", str(DEMO_DOC), "-o", str(cache_file), "--model", str(tiny_dir)).returncode == 0
    questions.write_text("\n".join(f"{q} ({i})" for i, q in enumerate((QUESTIONS * 4)[:16])) + "\n")
    common = ("ask", "--cache", str(cache_file), "--questions", str(questions), "--max-new-tokens", "6")
    outputs = [run_cli(*common, "--batch-size", n, "--json", "--model", str(tiny_dir)) for n in ("16", "1")]
    assert all(out.returncode == 0 for out in outputs), outputs[0].stderr
    rows = [[json.loads(line) for line in out.stdout.splitlines()] for out in outputs]
    assert [r["question"] for r in rows[0]] == questions.read_text().splitlines()
    assert [r["answer"] for r in rows[0]] == [r["answer"] for r in rows[1]]
    refused = run_cli(*common, "--batch-size", "0", "--model", str(tiny_dir))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr.decode()


def test_shared_leading_tokens_are_computed_once_and_change_nothing(tiny, cache, one_thread, monkeypatch):
    """Questions over one document (or none) share their leading tokens (the instruction; the closed-book chat
    prefix): one one-row pass computes them, and every row decodes the tokens it decodes without that."""
    value_grouped = compress_value_groups(cache, "knorm", groups=4, budget=0.3)
    closed = [closed_book_ids(tiny.tokenizer, tiny.framing("chat"), q) for q in QUESTIONS]
    for over, prompts in ((cache, prompts_for(tiny, cache)), (value_grouped, prompts_for(tiny, cache)), (None, closed)):
        lead = shared_lead(prompts, over)
        assert 0 < lead < min(len(p) for p in prompts)
        assert all(p[:lead] == prompts[0][:lead] for p in prompts)
        shared = decode(tiny.model, prompts, over, set(), 8, 0)
        with monkeypatch.context() as patched:
            patched.setattr(decode_module, "shared_lead", lambda prompts, cache: 0)
            alone = decode(tiny.model, prompts, over, set(), 8, 0)
        assert [r.tokens for r in shared] == [r.tokens for r in alone]
    assert shared_lead(prompts_for(tiny, cache)[:1], cache) == 0  # one row: nothing to share
    assert shared_lead(prompts_for(tiny, cache), [cache, cache, cache, cache, value_grouped]) == 0
