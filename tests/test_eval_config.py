"""EvalConfig is the one source of an eval's settings: flags, a --config TOML file and a resumed run's config.json
all become one EvalConfig, and a resume takes the recorded settings without retyping them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inprocess import assert_refused, invoke

from loramem.errors import LoramemError
from loramem.evaluation.config import EvalConfig, resumed_config

DOCS = [
    {
        "id": "light",
        "document": "The lighthouse at Varnaby Point was designed by Mara Quell. Tobin Hale keeps it.",
        "qa": [{"question": "Who designed it?", "answers": ["Mara Quell"]}],
        "train_qa": [{"question": "Designer?", "answer": "Mara Quell"}],
    },
    {
        "id": "bees",
        "document": "Ilse Varn keeps bees in Orlow and sells honey on Fridays.",
        "qa": [{"question": "Who keeps bees?", "answers": ["Ilse Varn"]}],
        "train_qa": [{"question": "Beekeeper?", "answer": "Ilse Varn"}],
    },
]
GRID_TOML = """
ratios = [0, 1]
presses = "snapkv"
modes = ["none", "decode"]
formats = ["qa"]
steps = 1
max-new-tokens = 3
"""
GRID_FLAGS = ["--ratios", "0,1", "--press", "snapkv", "--mode", "none,decode", "--format", "qa", "--steps", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    return path


def recorded(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["config"]


def answered(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    return sorted((r["doc_id"], r["ratio"], r["mode"], r["answer"]) for r in rows)


def test_config_round_trips_and_refuses_bad_settings():
    config = EvalConfig.from_dict({"ratios": "0.5,0", "shard": [1, 2], "budget-bytes": ["8MB"], "lr": 1e-3})
    assert config.ratios == [0.0, 0.5] and config.shard == (1, 2) and config.budget_bytes == [8_000_000]
    assert EvalConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, message in (
        ({"ratio": [0.5]}, "unknown setting 'ratio'"),
        ({"groups": "four"}, "groups must be int"),
        ({"ratios": "0,half"}, "'half' is not float"),
        ({"ratios": [True]}, "ratios must be list[float]"),
        ({"ratios": [2.0]}, "ratio must be in [0, 1]"),
    ):
        with pytest.raises(LoramemError, match=message.replace("[", r"\[")):
            EvalConfig.from_dict(bad, "grid.toml")
    again, disagree = resumed_config(config.to_dict(), {"limit": 5, "lr": 1e-3, "seed": 3})
    assert again.limit == 5 and disagree == ["seed"]


def test_config_file_is_the_same_run_as_flags_and_flags_override_it(capsys, tiny_dir, dataset, tmp_path, one_thread):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID_TOML)
    model = ["--model", str(tiny_dir)]
    by_flags = invoke(
        capsys, "eval", str(dataset), "--out", str(tmp_path / "a"), *GRID_FLAGS, "--max-new-tokens", "3", *model
    )
    assert by_flags.code == 0, by_flags.stderr
    by_file = invoke(capsys, "eval", str(dataset), "--out", str(tmp_path / "b"), "--config", str(grid), *model)
    assert by_file.code == 0, by_file.stderr
    assert recorded(tmp_path / "a") == recorded(tmp_path / "b") and answered(tmp_path / "a") == answered(tmp_path / "b")
    overridden = invoke(
        capsys, "eval", str(dataset), "--out", str(tmp_path / "c"), "--config", str(grid), "--max-new-tokens", "2",
        "--limit", "1", *model,
    )  # fmt: skip
    assert overridden.code == 0, overridden.stderr
    assert recorded(tmp_path / "c")["max_new_tokens"] == 2 and recorded(tmp_path / "c")["steps"] == 1

    grid.write_text(GRID_TOML + "ratio = 0.5\n")
    line = assert_refused(invoke(capsys, "eval", str(dataset), "--out", str(tmp_path / "d"), "--config", str(grid)))
    assert "unknown setting 'ratio'" in line and str(grid) in line
    grid.write_text("ratios = [0,\n")
    assert "not valid TOML" in assert_refused(
        invoke(capsys, "eval", str(dataset), "--out", str(tmp_path / "d"), "--config", str(grid))
    )


def test_resume_takes_the_recorded_settings_dataset_and_model(capsys, tiny_dir, dataset, tmp_path, one_thread):
    run = tmp_path / "run"
    first = invoke(
        capsys, "eval", str(dataset), "--out", str(run), *GRID_FLAGS, "--max-new-tokens", "3", "--limit", "1",
        "--model", str(tiny_dir), "--json",
    )  # fmt: skip
    assert first.code == 0, first.stderr
    assert {row[0] for row in answered(run)} == {"light"}

    wrong = invoke(capsys, "eval", "--resume", "--out", str(run), "--ratios", "0.5", "--press", "snapkv")
    line = assert_refused(wrong, codes=(2,))
    assert "--ratios" in line and "--press" not in line and "disagree" in line  # --press agrees with the record

    resumed = invoke(capsys, "eval", "--resume", "--out", str(run), "--limit", "2", "--json")
    assert resumed.code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["complete"] and {row[0] for row in answered(run)} == {"light", "bees"}
    assert recorded(run) == {**recorded(run), "limit": 2, "ratios": [0.0, 1.0], "modes": ["none", "decode"]}

    fresh = invoke(
        capsys, "eval", str(dataset), "--out", str(tmp_path / "fresh"), *GRID_FLAGS, "--max-new-tokens", "3",
        "--limit", "2", "--model", str(tiny_dir),
    )  # fmt: skip
    assert fresh.code == 0 and answered(tmp_path / "fresh") == answered(run)


def test_eval_needs_data_unless_resuming_a_recorded_run(capsys, tmp_path):
    assert "give DATA" in assert_refused(invoke(capsys, "eval", "--out", str(tmp_path / "none"), "--resume"))
