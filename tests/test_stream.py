"""Answers shown as they are decoded (`ask --stream`): the streamed text is the answer, exactly, in question order."""

from __future__ import annotations

import json
import random
import signal

import pytest
from conftest import interrupt_once_written, run_cli

from loramem import encode
from loramem.answer import AnswerText, StreamedAnswers, answer_batch
from loramem.text import one_line

QUESTIONS = ["Who designed the lighthouse?", "When?", "Where is the lighthouse and who keeps its lamp?", "Why?"]
# Characters the default tokenizer writes as several byte-level tokens, next to the spacing its clean-up changes.
TRICKY = [
    "Café déjà vu, naïve façade.",
    "It's 🎉 — don't stop , he said . Then ' quoted ' words ?",
    "  Leading and trailing spaces \n\n and a new line.  ",
    "日本語のテキスト 🙂🙃 ok !",
]


def streamed(tokenizer, tokens: list[int], line: bool = False) -> list[str]:
    """The pieces an AnswerText gives for `tokens`, its end included."""
    text = AnswerText(tokenizer, one_line=line)
    return [text.add(t) for t in tokens] + [text.end()]


def assert_streams_exactly(tokenizer, tokens: list[int]) -> None:
    final = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    for line in (False, True):
        pieces = streamed(tokenizer, tokens, line)
        assert "".join(pieces) == (one_line(final) if line else final), (tokens, pieces)
        if "\ufffd" not in final:  # never a broken character on the way
            assert not any("\ufffd" in p for p in pieces), pieces


def test_streamed_text_is_the_answer_for_random_tokens_of_the_tiny_tokenizer(tiny):
    vocab = len(tiny.tokenizer)
    rng = random.Random(0)
    for _ in range(200):
        assert_streams_exactly(tiny.tokenizer, [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))])


@pytest.mark.real
def test_streamed_text_is_the_answer_with_the_default_tokenizer():
    """The default model's tokenizer cleans up spaces (" ." -> ".") and splits accents and emoji into byte tokens:
    the stream waits for what may still change and ends as the whole decode."""
    from loramem.model.lean import LeanTokenizer
    from loramem.model.loading import default_model_dir

    tok = LeanTokenizer(default_model_dir())
    assert tok.clean_up_tokenization_spaces
    split = [c for c in "é🎉🙂日" if len(tok(c)["input_ids"]) > 1]
    assert split, "no character of several tokens: the test would not test that"
    for text in TRICKY:
        ids = tok(text)["input_ids"]
        assert_streams_exactly(tok, ids)
        for cut in range(1, len(ids)):  # every prefix: an answer may end anywhere
            assert_streams_exactly(tok, ids[:cut])
    rng = random.Random(1)
    vocab = len(tok.get_vocab())
    for _ in range(300):
        assert_streams_exactly(tok, [rng.randrange(vocab) for _ in range(rng.randrange(1, 25))])


@pytest.fixture(scope="module")
def cache(tiny, doc_text):
    return encode(tiny, doc_text)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_streamed_answers_are_the_batch_answers_in_question_order(tiny, cache, batch_size):
    written: list[str] = []
    stream = StreamedAnswers(tiny.tokenizer, len(QUESTIONS), written.append, one_line=True)
    streamed_answers = answer_batch(tiny, QUESTIONS, cache, max_new_tokens=12, batch_size=batch_size, on_token=stream)
    answers = answer_batch(tiny, QUESTIONS, cache, max_new_tokens=12, batch_size=batch_size)
    assert [a.answer for a in streamed_answers] == [a.answer for a in answers]
    assert "".join(written) == "".join(one_line(a.answer) + "\n" for a in answers)
    assert len(written) > len(QUESTIONS)  # pieces as they came, not one write per answer
    assert not stream.mid_line


def test_a_later_question_finished_first_waits_for_the_earlier_ones(tiny):
    written: list[str] = []
    stream = StreamedAnswers(tiny.tokenizer, 2, written.append)
    ids = tiny.tokenizer("Orla Quenby")["input_ids"]
    for token in ids:
        stream(1, token)
    stream(1, None)
    assert written == []
    stream(0, ids[0])
    assert stream.mid_line and "".join(written) == tiny.tokenizer.decode(ids[:1]).strip()
    stream(0, None)
    assert "".join(written).splitlines() == [tiny.tokenizer.decode(ids[:1]).strip(), "Orla Quenby"]


def test_ask_stream_writes_what_ask_writes(tiny_dir, tmp_path, doc_text):
    kv = tmp_path / "doc.kv"
    assert run_cli("encode", "-", "-o", str(kv), "--model", str(tiny_dir), input=doc_text.encode()).returncode == 0
    questions = tmp_path / "q.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    args = ["ask", "--cache", str(kv), "-q", str(questions), "--model", str(tiny_dir), "--max-new-tokens", "10"]
    plain, stream = run_cli(*args), run_cli(*args, "--stream")
    assert plain.returncode == stream.returncode == 0, stream.stderr.decode()
    assert stream.stdout == plain.stdout and len(plain.stdout.decode().splitlines()) == len(QUESTIONS)
    one = run_cli(*args[:3], QUESTIONS[2], *args[5:], "--stream")
    assert one.stdout.decode() == run_cli(*args[:3], QUESTIONS[2], *args[5:], "--no-stream").stdout.decode()
    rows = [json.loads(line) for line in run_cli(*args, "--json").stdout.decode().splitlines()]
    assert [one_line(r["answer"]) for r in rows] == plain.stdout.decode().splitlines()
    refused = run_cli(*args, "--json", "--stream")
    assert refused.returncode == 2 and "give one" in refused.stderr.decode()
    refused = run_cli("ask", "--library", str(tmp_path / "lib"), "Who?", "--stream")
    assert refused.returncode == 2 and "--stream: a library's answers are written whole" in refused.stderr.decode()


def test_sigint_during_a_streamed_answer_exits_130(tiny_dir, tmp_path):
    """Ctrl-C stops the decode: exit 130, 'interrupted' on stderr, stdout holds only what was already written."""
    out = tmp_path / "out.txt"
    questions = tmp_path / "q.txt"
    questions.write_text("Tell me everything.\n" * 40)
    args = ["ask", "-q", str(questions), "--model", str(tiny_dir), "--stream", "--batch-size", "1"]
    result = interrupt_once_written([*args, "--max-new-tokens", "900"], signal.SIGINT, out)
    err = result.stderr.decode()
    assert result.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    written = out.read_text()
    assert written and len(written.splitlines()) < 40
