"""QA synthesis: rule-based pairs on any text, parsing and checking the model's pairs, and combining both."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_DOC, run_cli
from test_cli import one_line_error

from loramem.data import synth
from loramem.data.synth import (
    model_qa,
    parse_pairs,
    passages,
    rule_qa,
    spans,
    supported,
    synth_writer,
    synthesize,
    synthesize_pairs,
    trim_restated,
)
from loramem.errors import LoramemError
from loramem.text import normalize_answer, sentences

PLAIN = "the river runs slowly past the mill. nobody remembers when the wheel stopped turning."


def _questions(pairs) -> list[str]:
    return [normalize_answer(q) for q, _ in pairs]


def test_rule_qa_is_deterministic_deduplicated_and_covers_the_document(doc_text):
    pairs = rule_qa(doc_text, 24)
    assert pairs == rule_qa(doc_text, 24) and len(pairs) == 24
    assert pairs != rule_qa(doc_text, 24, seed=1)
    assert len(set(_questions(pairs))) == len(pairs)
    kinds = {q.split(":")[0] if q.startswith("Fill") else q.split()[0] for q, _ in pairs}
    assert {"Fill in the blank", "What", "Who"} <= kinds
    for question, answer in pairs:
        assert answer in doc_text
        if question.startswith("Fill in the blank: "):
            assert question.count("___") == 1
            assert question.removeprefix("Fill in the blank: ").replace("___", answer, 1) in doc_text
    answers = {a for _, a in pairs}
    assert {"1871", "Orla Quenby", "Hobart Fennick", "Port Allery"} & answers  # entities and numbers are asked for
    assert rule_qa(doc_text, 5) == pairs[:5]


@pytest.mark.parametrize("text", [PLAIN, "hello", "ONE TWO THREE", "Zahl: 42 — ja.", "x" * 300])
def test_rule_qa_works_on_any_text(text):
    pairs = rule_qa(text, 10)
    assert pairs and len(set(_questions(pairs))) == len(pairs)
    assert all(a and a in text for _, a in pairs)


def test_rule_qa_without_words_gives_nothing():
    assert rule_qa("", 5) == [] and rule_qa("!!! ...", 5) == [] and rule_qa("Some text here.", 0) == []


def test_parse_pairs_reads_the_usual_shapes():
    text = (
        "Here are questions:\n1. Q: Who built it? A: Orla Quenby.\nQ2: When was it built?\nA2: 1871\n"
        "Question: What colour is the granite? Answer: pale green\nQ: Is this dangling?\nnoise\nA: stray"
    )
    assert parse_pairs(text) == [
        ("Who built it?", "Orla Quenby"),
        ("When was it built?", "1871"),
        ("What colour is the granite?", "pale green"),
        ("Is this dangling?", "stray"),
    ]


def test_supported_needs_the_answer_in_the_passage_and_not_in_the_question():
    passage = "Its lighthouse was built in 1871 by the engineer Orla Quenby."
    assert supported("Who built the lighthouse?", "the engineer Orla Quenby", passage)
    assert not supported("Who built the lighthouse?", "Gustave Eiffel", passage)
    assert not supported("When did Orla Quenby build it?", "Orla Quenby", passage)
    assert not supported("Who built the lighthouse?", "", passage)
    assert not supported("Who?", "1871", passage)


def test_sentences_keep_quotes_and_titles():
    text = (
        'He said "Go home." Then Dr. Quill left the room at 5 p.m. sharp. 12 boats sailed.'
        "\n\nA Heading\n\nLast one here!"
    )
    assert sentences(text) == [
        'He said "Go home."',
        "Then Dr. Quill left the room at 5 p.m. sharp.",
        "12 boats sailed.",
        "Last one here!",
    ]


def test_trim_restated_keeps_what_the_question_does_not_say():
    assert trim_restated("When was the lighthouse built?", "The lighthouse was built in 1871") == "in 1871"
    assert trim_restated("Who was the last keeper?", "The last keeper was Ines Carrow") == "Ines Carrow"
    assert trim_restated("Who is Ines Carrow?", "Ines Carrow") == "Ines Carrow"


def test_passages_cut_at_sentences(doc_text):
    parts = passages(doc_text, words=40)
    assert len(parts) > 3 and " ".join(parts) == " ".join(sentences(doc_text))
    assert all(len(p.split()) <= 40 or p in sentences(doc_text) for p in parts)


class Calls(list):
    """Prompts asked, with (model, framing) of each call in .framings."""

    def __init__(self) -> None:
        super().__init__()
        self.framings: list = []


def reply(text: str):
    return type("Answer", (), {"answer": text})()


@pytest.fixture
def canned_model(monkeypatch):
    """answer_batch() replaced by replies in the model's usual shape: two good pairs, an invented one, a repeat."""
    replies = [
        "Q: Who designed the lighthouse? A: Orla Quenby\nQ: Who designed the lighthouse? A: Orla Quenby\n"
        "Q: Who painted the tower? A: Vincent van Gogh\nQ: What was the first keeper's name? A: Hobart Fennick"
    ]
    prompts = Calls()
    framings = prompts.framings

    def fake_answer_batch(lm, questions, cache, **kwargs):
        prompts.extend(questions)
        framings.extend((lm, kwargs.get("framing")) for _ in questions)
        return [reply(replies[0] if "Orla Quenby" in q else "I cannot help with that.") for q in questions]

    monkeypatch.setattr(synth, "answer_batch", fake_answer_batch)
    return prompts


def one_at_a_time(answer, document: str, n: int, seed: int = 0) -> list:
    """model_qa as it was before batching: one passage asked at a time, min(4, missing) pairs each, until n."""
    import random

    chosen = passages(document)
    random.Random(seed).shuffle(chosen)
    pairs: list = []
    for passage in chosen[:n]:
        k = min(4, n - len(pairs))
        found = [(q, synth.trim_restated(q, a)) for q, a in parse_pairs(answer(synth._prompt(passage, k), k))]
        pairs = synth.dedupe(pairs + [(q, a) for q, a in found if supported(q, a, passage)])
        if len(pairs) >= n:
            break
    return pairs[:n]


def writer(prompt: str, k: int) -> str:
    """A deterministic stand-in writer: for some passages nothing, for others k + 1 pairs (more than asked, in an
    order that depends on k), some of them unsupported or repeated, so how many pairs are still missing changes from
    passage to passage."""
    passage = prompt.split("\n\n")[0].removeprefix("Text:\n")
    names = spans(passage)
    if len(names) % 3 == 0:
        return "I cannot help with that."
    chosen = names[: k + 1][::-1]  # what is asked for changes what comes first, not only how much
    lines = [f"Q: What is named {i} in the text about {names[0]}? A: {name}" for i, name in enumerate(chosen)]
    return "\n".join([*lines, "Q: Who painted the tower in the text? A: Vincent van Gogh"])


@pytest.mark.parametrize("n", [1, 3, 5, 9, 16, 40])
def test_batched_model_qa_gives_the_pairs_of_one_at_a_time(monkeypatch, tiny, doc_text, n):
    """Passages asked in batches, read in order, give exactly the pairs of asking one passage at a time (k changes
    partway through a batch are asked again), and never more passages than n."""
    asked: list[str] = []

    def fake_answer_batch(lm, questions, cache, *, max_new_tokens, **kwargs):
        asked.extend(questions)
        return [reply(writer(q, max_new_tokens // 30)) for q in questions]

    monkeypatch.setattr(synth, "answer_batch", fake_answer_batch)
    for seed in (0, 1):
        expected = one_at_a_time(writer, doc_text, n, seed)
        assert model_qa(tiny, doc_text, n, seed) == expected and expected
    assert len(set(asked)) <= 2 * n


def test_model_qa_replies_batched_equal_one_at_a_time(monkeypatch, tiny, doc_text, one_thread):
    """On a real (tiny random) model: the replies of the batched requests equal each request decoded alone."""
    real_answer_batch = synth.answer_batch
    replies: dict[str, list[str]] = {"batched": [], "alone": []}

    def recording(kind: str, **forced):
        def answer_batch(lm, questions, cache, **kwargs):
            answers = real_answer_batch(lm, questions, cache, **{**kwargs, **forced})
            replies[kind] += [a.answer for a in answers]
            return answers

        return answer_batch

    monkeypatch.setattr(synth, "answer_batch", recording("batched"))
    batched = model_qa(tiny, doc_text, 3)
    monkeypatch.setattr(synth, "answer_batch", recording("alone", batch_size=1))
    assert model_qa(tiny, doc_text, 3) == batched
    assert replies["batched"] == replies["alone"] and len(replies["batched"]) == 3


def test_model_qa_keeps_only_supported_new_pairs(canned_model, tiny, doc_text):
    pairs = model_qa(tiny, doc_text, 10)
    assert pairs == [
        ("Who designed the lighthouse?", "Orla Quenby"),
        ("What was the first keeper's name?", "Hobart Fennick"),
    ]
    assert len(canned_model) == len(passages(doc_text)) and "Format:\nQ: Who ...?" in canned_model[0]
    assert set(model_qa(tiny, doc_text, 1)) <= set(pairs[:1])  # one passage asked at most


def test_synthesize_puts_model_pairs_first_and_tops_up_with_rules(canned_model, tiny, doc_text):
    pairs = synthesize(tiny, doc_text, 12, seed=0)
    assert len(pairs) == 12 and pairs[:2] == model_qa(tiny, doc_text, 12)
    assert pairs[2:] == [p for p in rule_qa(doc_text, 14) if p not in pairs[:2]][:10]
    calls = len(canned_model)
    assert synthesize(None, doc_text, 3, sources=("rule",)) == rule_qa(doc_text, 3)
    assert len(canned_model) == calls  # no model call
    for bad in ({"n": 0}, {"document": " "}, {"sources": ("llm",)}):
        with pytest.raises(LoramemError):
            synthesize(tiny, **{"document": doc_text, "n": 3, **bad})


def test_model_qa_runs_on_a_tiny_model_within_its_bound(tiny, doc_text):
    """End to end on a real (random) model, which may write nothing usable; the filtering itself is proven with
    canned replies above."""
    pairs = model_qa(tiny, doc_text, 2)
    assert len(pairs) <= 2
    assert all(supported(q, a, doc_text) for q, a in pairs)


@pytest.mark.real
def test_default_model_writes_some_supported_pairs(real, doc_text):
    pairs = model_qa(real, doc_text, 2)
    print(f"\nthe default model wrote {len(pairs)} supported pairs: {pairs}")
    assert pairs, "the default model wrote no supported pair"
    assert all(supported(q, a, doc_text) for q, a in pairs)


def test_the_request_is_not_prefixed_with_the_answer_instruction(canned_model, tiny, doc_text):
    """ask's "Answer in a few words." would contradict "Write k questions ..."."""
    model_qa(tiny, doc_text, 2)
    for lm, framing in canned_model.framings:
        assert lm is tiny and framing.instruction == "" and framing.suffix == tiny.framing().suffix


def test_another_model_writes_the_pairs_and_is_named(canned_model, tiny, other_tiny_dir, doc_text):
    writer = synth_writer(str(other_tiny_dir), tiny)
    assert writer is not tiny and writer.fingerprint["model"] != tiny.fingerprint["model"]
    assert synth_writer(str(other_tiny_dir), tiny) is writer  # loaded once per process
    assert synth_writer(None, tiny) is tiny
    pairs, written_by = synthesize_pairs(writer, doc_text, 6)
    assert canned_model.framings and all(lm is writer for lm, _ in canned_model.framings)
    assert written_by == [str(other_tiny_dir.resolve())] * 2 + ["rules"] * 4 and len(pairs) == 6


def test_train_adapter_with_a_local_synth_model(tiny_dir, other_tiny_dir, tmp_path):
    """--synth-model takes a local model directory; the adapter's pairs say who wrote them."""
    doc = tmp_path / "doc.txt"
    doc.write_text(DEMO_DOC.read_text())
    out = tmp_path / "adapter"
    args = ("--model", str(tiny_dir), "--synth-model", str(other_tiny_dir), "--synth", "4", "--steps", "1")
    done = run_cli("train-adapter", str(doc), "-o", str(out), *args)
    assert done.returncode == 0, done.stderr.decode()
    lines = [json.loads(line) for line in (out / "train_qa.jsonl").read_text().splitlines()]
    writers = {str(other_tiny_dir.resolve()), "rules"}
    assert len(lines) == 4 and all(line["written_by"] in writers for line in lines)
    meta = json.loads((out / "loramem.json").read_text())
    assert sum(meta["qa_written_by"].values()) == 4 and set(meta["qa_written_by"]) <= writers
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Who?", "answer": "Ada"}\n')
    refused = run_cli("train-adapter", str(doc), "-o", str(tmp_path / "b"), "--qa", str(qa), *args)
    assert refused.returncode == 2 and "--synth-model" in one_line_error(refused)
