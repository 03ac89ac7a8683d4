"""EvalSpec is the one source of an eval's settings: flags, a --config TOML file and a resumed run's config.json
all become one EvalSpec, and a resume takes the recorded settings without retyping them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inprocess import assert_refused, invoke

from loramem.errors import LoramemError
from loramem.evaluation.config import resumed_spec
from loramem.specs import EvalSpec
from loramem.specs.eval import RECORD_VERSION

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
    config = EvalSpec.from_record({"ratios": "0.5,0", "shard": [1, 2], "budget-bytes": ["8MB"], "train": {"lr": 1e-3}})
    assert config.ratios == [0.0, 0.5] and config.shard == (1, 2) and config.budget_bytes == [8_000_000]
    assert config.train.lr == 1e-3 and config.ratios == EvalSpec.parse({"ratios": [0.5, -0.0]}).ratios
    assert EvalSpec.from_record(json.loads(json.dumps(config.record()))) == config
    for bad, message in (
        ({"ratio": [0.5]}, "ratio: unknown setting"),
        ({"groups": "four"}, "groups: input should be a valid integer"),
        ({"ratios": "0,half"}, "ratios: input should be a valid number"),
        ({"ratios": [2.0]}, "ratios: a ratio must be in [0, 1]"),
        ({"train": {"rank": 0}}, "train.rank: must be at least 1"),
        ({"modes": "none,decodee"}, "modes: input should be 'none', 'decode'"),
    ):
        with pytest.raises(LoramemError, match=("grid.toml: " + message).replace("[", r"\[")):
            EvalSpec.from_record(bad, "grid.toml")
    again, disagree = resumed_spec(config.record(), {"limit": 5, "train": {"lr": 1e-3, "seed": 3}})
    assert again.limit == 5 and again.train.seed == 3 and disagree == ["train.seed"]


def test_a_flat_record_of_loramem_0_1_reads_as_the_same_spec():
    """config.json of runs made before the settings were nested (one flat mapping, runtime settings left out)."""
    old = {
        "ratios": [0.0, 0.5], "presses": ["snapkv"], "modes": ["none", "decode"], "formats": ["qa"],
        "granularities": ["token"], "store_dtypes": ["native"], "groups": 4, "max_new_tokens": 8, "limit": None,
        "shard": [0, 1], "seed": 2, "synth_pairs": 16, "adapters": None, "rank": 4, "alpha": 8.0, "dropout": 0.0,
        "targets": "all", "layers": None, "lr": 0.0015, "epochs": 8, "steps": 1, "batch_size": 2, "max_length": 512,
        "chunk_size": 128, "merge": "cat",
    }  # fmt: skip
    spec = EvalSpec.from_record(old)
    assert (spec.train.rank, spec.train.seed, spec.train.batch_size, spec.answer.max_new_tokens) == (4, 2, 2, 8)
    assert spec.synth.pairs == 16 and spec.library.path is None and spec.record()["version"] == RECORD_VERSION == 3
    assert spec.library.merge == ["cat"] and spec.library.merge_weights == ["equal"]


def test_a_version_2_record_with_one_merge_reads_as_a_list_of_one():
    """Version 2 recorded library.merge as one method; version 3 records a list (each merge its own cells)."""
    record = EvalSpec.parse({"modes": ["routed-merge"]}).record()
    assert record["version"] == 3 and record["library"]["merge"] == ["ties"]
    old = {**record, "version": 2, "library": {**record["library"], "merge": "linear"}}
    del old["library"]["merge_weights"], old["library"]["merge_temperature"]
    spec = EvalSpec.from_record(old)
    assert spec.library.merge == ["linear"] and spec.record() == {
        **record,
        "library": {**record["library"], "merge": ["linear"]},
    }
    many = EvalSpec.parse(
        {"modes": ["hybrid"], "library": {"merge": "ties, linear,cat,ties", "merge_weights": "routing,equal"}}
    )
    assert many.library.merge == ["ties", "linear", "cat"] and many.library.merge_weights == ["routing", "equal"]
    for bad, message in (
        ({"merge": []}, "give at least one"),
        ({"merge_weights": "softmax"}, "merge_weights"),
        ({"merge_temperature": 0}, "> 0"),
    ):
        with pytest.raises(LoramemError, match=message):
            EvalSpec.parse({"library": bad})


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
    assert recorded(tmp_path / "c")["answer"]["max_new_tokens"] == 2 and recorded(tmp_path / "c")["train"]["steps"] == 1

    grid.write_text(GRID_TOML + "ratio = 0.5\n")
    line = assert_refused(invoke(capsys, "eval", str(dataset), "--out", str(tmp_path / "d"), "--config", str(grid)))
    assert f"ratio in {grid}: unknown setting" in line
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
    assert "give a dataset" in assert_refused(invoke(capsys, "eval", "--out", str(tmp_path / "none"), "--resume"))
