"""probe capacity: invented facts, recall measured by asking, saturation read off the rows."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_cli import one_line_error

from loramem.errors import LoramemError
from loramem.evaluation.probe import PLOT, RESULTS, phonebook, run_probe, saturation
from loramem.specs import ProbeSpec, TrainSpec


def test_phonebook_is_seeded_and_unambiguous():
    book = phonebook(300, seed=3)
    assert book == phonebook(300, seed=3) and book != phonebook(300, seed=4)
    assert len({q for q, _ in book}) == 300 and len({a for _, a in book}) == 300
    assert all(len(a) == 8 and a[3] == "-" for _, a in book)
    assert phonebook(10, seed=3) == book[:10]  # a smaller book is a prefix: sizes are nested


def test_saturation_reads_the_threshold():
    config = ProbeSpec(ranks=[2, 8], facts=[10, 40], threshold=0.9)
    rows = [
        {"rank": 2, "facts": 10, "recall": 0.9, "facts_stored": 9.0},
        {"rank": 2, "facts": 40, "recall": 0.5, "facts_stored": 20.0},
        {"rank": 8, "facts": 10, "recall": 0.5, "facts_stored": 5.0},
        {"rank": 8, "facts": 40, "recall": 0.25, "facts_stored": 10.0},
    ]
    assert saturation(rows, config) == [
        {"rank": 2, "saturation_facts": 10, "max_facts_stored": 20.0},
        {"rank": 8, "saturation_facts": None, "max_facts_stored": 10.0},
    ]


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"ranks": []}, "ranks: give at least one"),
        ({"facts": [0]}, "facts: must be positive"),
        ({"threshold": 0}, "threshold: must be in \\(0, 1\\]"),
        ({"train": {"epochs": 0}}, "train.epochs: must be at least 1"),
    ],
)
def test_bad_probe_config(bad, message):
    with pytest.raises(LoramemError, match=message):
        ProbeSpec.parse(bad)


def test_probe_runs_and_recall_is_measured_by_asking(tiny, tmp_path, monkeypatch):
    import loramem.evaluation.probe as probe

    asked = []
    real = probe.answer_batch

    def counting(lm, questions, cache, **kwargs):
        asked.extend((question, kwargs["adapter_on"], lm.adapter is not None) for question in questions)
        return real(lm, questions, cache, **kwargs)

    monkeypatch.setattr(probe, "answer_batch", counting)
    result = run_probe(tiny, ProbeSpec(ranks=[1, 2], facts=[3, 5], train=TrainSpec(epochs=1, batch_size=4)), tmp_path)
    assert [(r["rank"], r["facts"]) for r in result["rows"]] == [(1, 3), (1, 5), (2, 3), (2, 5)]
    assert len(asked) == 2 * (3 + 5) and all(on and attached for _, on, attached in asked)
    assert {q for q, _, _ in asked} == {q for q, _ in phonebook(5)}
    r1, r2 = result["rows"][0], result["rows"][2]
    assert r2["trainable_parameters"] == 2 * r1["trainable_parameters"]
    assert json.loads((tmp_path / RESULTS).read_text()) == result
    assert (tmp_path / PLOT).read_bytes().startswith(b"\x89PNG") and tiny.adapter is None


def test_probe_cli_bad_input(tmp_path):
    line = one_line_error(run_cli("probe", "capacity", "-o", str(tmp_path / "p"), "--ranks", "a,b"))
    assert line.count("--ranks: input should be a valid integer") == 1, line  # one reason per setting
    assert not (tmp_path / "p").exists()
