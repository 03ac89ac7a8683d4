"""The synthetic fiction generator and the shipped examples/fiction.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramem.data.fiction import EXAMPLE_DOCS, EXAMPLE_SEED, MAX_WORDS, MIN_WORDS, synth_fiction
from loramem.data.formats import DocRecord, load_dataset, write_dataset

SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "fiction.jsonl"


@pytest.fixture(scope="module")
def corpus() -> list[DocRecord]:
    return synth_fiction(EXAMPLE_DOCS, EXAMPLE_SEED)


def test_deterministic_for_a_seed() -> None:
    assert synth_fiction(6, 3) == synth_fiction(6, 3)
    assert synth_fiction(6, 3) != synth_fiction(6, 4)
    assert synth_fiction(3, 3) == synth_fiction(6, 3)[:3]


def test_held_out_questions_are_worded_apart_from_training(corpus: list[DocRecord]) -> None:
    training = {t.question.lower() for r in corpus for t in r.train_qa}
    assert all(q.question.lower() not in training for r in corpus for q in r.qa)


def test_answers_are_short_spans_of_their_document(corpus: list[DocRecord]) -> None:
    for record in corpus:
        assert len(record.train_qa) == 8 and len(record.qa) == 8
        assert [q.answers for q in record.qa] == [[t.answer] for t in record.train_qa]  # same facts, paraphrased
        for qa in record.qa:
            assert all(a in record.document and len(a.split()) <= 3 for a in qa.answers), (record.id, qa)


def test_documents_are_invented_prose_of_the_right_length(corpus: list[DocRecord]) -> None:
    assert len({r.id for r in corpus}) == len(corpus)
    assert all(MIN_WORDS <= len(r.document.split()) <= MAX_WORDS for r in corpus)
    assert len({r.document for r in corpus}) == len(corpus)
    names = [t.answer for r in corpus for t in r.train_qa if not t.answer.isdigit()]
    assert len(set(names)) == len(names)  # no invented name is reused across documents


def test_valid_in_the_dataset_format(tmp_path: Path, corpus: list[DocRecord]) -> None:
    write_dataset(corpus, tmp_path / "f.jsonl")
    assert load_dataset(tmp_path / "f.jsonl") == corpus


def test_shipped_example_equals_a_fresh_generation(tmp_path: Path) -> None:
    write_dataset(synth_fiction(EXAMPLE_DOCS, EXAMPLE_SEED), tmp_path / "fiction.jsonl")
    assert SHIPPED.read_bytes() == (tmp_path / "fiction.jsonl").read_bytes()
