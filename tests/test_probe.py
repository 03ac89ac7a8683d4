"""probe capacity: invented facts, recall measured by asking, saturation read off the rows."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_cli import one_line_error

from loramem.errors import LoramemError
from loramem.evaluation.probe import PLOT, POINTS, RESULTS, phonebook, run_probe, saturation
from loramem.specs import ProbeSpec, TrainSpec


def test_training_settings_given_keep_the_probes_other_defaults():
    given = ProbeSpec.parse({"train": {"lr": 5e-4}}).train
    assert (given.lr, given.epochs, given.batch_size) == (5e-4, ProbeSpec().train.epochs, ProbeSpec().train.batch_size)
    assert ProbeSpec().train.epochs != TrainSpec().epochs  # else this test could not fail
    assert ProbeSpec.parse({"train": {"epochs": 3}}).train.batch_size == ProbeSpec().train.batch_size


def test_phonebook_is_seeded_and_unambiguous():
    book = phonebook(300, seed=3)
    assert book == phonebook(300, seed=3) and book != phonebook(300, seed=4)
    assert len({q for q, _ in book}) == 300 and len({a for _, a in book}) == 300
    assert all(len(a) == 8 and a[3] == "-" for _, a in book)
    assert phonebook(10, seed=3) == book[:10]  # a smaller book is a prefix: sizes are nested


def test_saturation_reads_the_threshold():
    rows = [
        {"rank": 2, "facts": 10, "recall": 0.9, "facts_stored": 9.0, "trainable_parameters": 1000},
        {"rank": 2, "facts": 40, "recall": 0.45, "facts_stored": 18.0, "trainable_parameters": 1000},
        {"rank": 8, "facts": 10, "recall": 0.5, "facts_stored": 5.0, "trainable_parameters": 4000},
        {"rank": 8, "facts": 40, "recall": 0.5, "facts_stored": 20.0, "trainable_parameters": 4000},
    ]
    assert saturation(rows, threshold=0.9, stop_below=0.5) == [
        {
            "rank": 2,
            "trainable_parameters": 1000,
            "saturation_facts": 10,
            "saturation_facts_per_million_parameters": 10_000.0,
            "max_facts_stored": 18.0,
            "collapsed_at": 40,
        },
        {
            "rank": 8,
            "trainable_parameters": 4000,
            "saturation_facts": None,
            "saturation_facts_per_million_parameters": None,
            "max_facts_stored": 20.0,
            "collapsed_at": None,  # 0.5 is not below 0.5: the walk goes on
        },
    ]


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"ranks": []}, "ranks: give at least one"),
        ({"facts": [0]}, "facts: must be positive"),
        ({"threshold": 0}, "threshold: must be in \\(0, 1\\]"),
        ({"train": {"epochs": 0}}, "train.epochs: must be at least 1"),
        ({"patience": 0}, "patience: must be at least 1"),
        ({"min_delta": 1}, "min_delta: must be in \\[0, 1\\)"),
        ({"stop_below": 1.5}, "stop_below: must be in \\[0, 1\\]"),
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
    config = ProbeSpec(ranks=[1, 2], facts=[3, 5], stop_below=0, train=TrainSpec(epochs=1, batch_size=4))
    result = run_probe(tiny, config, tmp_path)
    assert [(r["rank"], r["facts"]) for r in result["rows"]] == [(1, 3), (1, 5), (2, 3), (2, 5)]
    assert len(asked) == 2 * (3 + 5) and all(on and attached for _, on, attached in asked)
    assert {q for q, _, _ in asked} == {q for q, _ in phonebook(5)}
    r1, r2 = result["rows"][0], result["rows"][2]
    assert r2["trainable_parameters"] == 2 * r1["trainable_parameters"]
    assert json.loads((tmp_path / RESULTS).read_text()) == result
    assert (tmp_path / PLOT).read_bytes().startswith(b"\x89PNG") and tiny.adapter is None
    lines = [json.loads(line) for line in (tmp_path / POINTS).read_text().splitlines()]
    assert [(r["rank"], r["facts"]) for r in lines] == [(1, 3), (2, 3), (1, 5), (2, 5)]  # size by size, as walked
    assert sorted(lines, key=lambda r: (r["rank"], r["facts"])) == result["rows"]
    assert not (tmp_path / "adapters").exists()  # each adapter is deleted once asked, unless kept


def _counting_training(monkeypatch) -> list[tuple[int, int]]:
    """The (rank, facts) points trained from here on, recorded as run_probe trains them."""
    import loramem.evaluation.probe as probe

    trained = []
    real = probe.train_adapter

    def counting(lm, document, qa, out, config, **kwargs):
        trained.append((config.rank, len(qa)))
        return real(lm, document, qa, out, config, **kwargs)

    monkeypatch.setattr(probe, "train_adapter", counting)
    return trained


FAST = TrainSpec(epochs=1, batch_size=4)


def test_each_rank_grows_its_facts_until_recall_falls_below_half(tiny, tmp_path, monkeypatch):
    """Recall stands in for a model that holds 4 facts at rank 1 and 8 at rank 2: rank 1 stops after the first
    size it recalls below 0.5 (not trying 16), rank 2 goes on; sizes are walked smallest first across ranks."""
    import loramem.evaluation.probe as probe

    trained = _counting_training(monkeypatch)
    monkeypatch.setattr(probe, "recall", lambda lm, book: 1.0 if len(book) <= 4 * trained[-1][0] else 0.25)
    result = run_probe(tiny, ProbeSpec(ranks=[1, 2], facts=[4, 8, 16], train=FAST), tmp_path)
    assert trained == [(1, 4), (2, 4), (1, 8), (2, 8), (2, 16)]
    assert [(s["rank"], s["saturation_facts"], s["collapsed_at"]) for s in result["saturation"]] == [
        (1, 4, 8),
        (2, 8, 16),
    ]


def test_a_rerun_skips_done_points_and_refuses_other_settings(tiny, tmp_path, monkeypatch):
    trained = _counting_training(monkeypatch)
    config = ProbeSpec(ranks=[1], facts=[3], stop_below=0, train=FAST)
    first = run_probe(tiny, config, tmp_path)
    with (tmp_path / POINTS).open("a") as log:
        log.write('{"rank": 2, "fac')  # the remainder of an interrupted append: dropped, the point trained again
    more = run_probe(tiny, config.replace(ranks=[1, 2], facts=[3, 4]), tmp_path)
    assert trained == [(1, 3), (2, 3), (1, 4), (2, 4)]
    assert more["rows"][0] == first["rows"][0] and len(more["rows"]) == 4
    assert len((tmp_path / POINTS).read_text().splitlines()) == 4
    again = run_probe(tiny, config.replace(ranks=[2], threshold=0.5), tmp_path)  # nothing to train; re-read
    assert len(trained) == 4 and again["rows"] == more["rows"]
    reported = run_probe(tiny, config.replace(ranks=[1, 2, 3], facts=[3, 4, 5]), tmp_path, train=False)
    assert len(trained) == 4 and reported["rows"] == more["rows"]
    with pytest.raises(LoramemError, match="not a probe study"):
        run_probe(tiny, config, tmp_path / "none", train=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(LoramemError, match=r"trained otherwise \(settings.train.lr: 0.0015 there, 0.003 now\)"):
        run_probe(tiny, config.replace(train=FAST.replace(lr=3e-3)), tmp_path)
    with pytest.raises(LoramemError, match=r"settings.patience: 3 there, 5 now"):
        run_probe(tiny, config.replace(patience=5), tmp_path)
    assert len(trained) == 4


def test_probe_cli_refuses_a_folder_trained_otherwise(tiny_dir, tmp_path):
    args = ("probe", "capacity", "-o", str(tmp_path / "p"), "--model", str(tiny_dir), "--ranks", "1", "--facts", "2")
    done = run_cli(*args, "--epochs", "1", "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert [r["facts"] for r in json.loads(done.stdout)["rows"]] == [2]
    line = one_line_error(run_cli(*args, "--epochs", "2"))
    assert "settings.train.epochs: 1 there, 2 now" in line and run_cli(*args, "--epochs", "2").returncode == 2


def test_probe_cli_bad_input(tmp_path):
    line = one_line_error(run_cli("probe", "capacity", "-o", str(tmp_path / "p"), "--ranks", "a,b"))
    assert line.count("--ranks: input should be a valid integer") == 1, line  # one reason per setting
    assert not (tmp_path / "p").exists()
