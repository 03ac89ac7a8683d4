"""`loramem demo`: its data shipped in the package (read via importlib.resources, present in a built wheel), the
adapter column at ratio 1.0 and the margin line, on a tiny model and on the default model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib import resources

import pytest
from conftest import REPO, run_cli
from typer.testing import CliRunner

from loramem.cli.app import app
from loramem.demo import NO_CONTEXT, column_score, load_example, margin_line, run_demo, summary
from loramem.evaluation.metrics import contains
from loramem.specs import TrainSpec
from loramem.text import normalize_answer

DEMO_FILES = ("lighthouse.txt", "questions.jsonl", "train_qa.jsonl")
COLUMNS = [(0.0, False), (0.5, False), (1.0, False), (1.0, True)]  # ratio 0 and 1.0 are always added


def test_demo_data_is_read_from_the_package_via_importlib_resources(monkeypatch):
    package_data = resources.files("loramem") / "demo_data"
    example = load_example()
    assert example.document == (package_data / "lighthouse.txt").read_text(encoding="utf-8")
    assert len(example.questions) == len((package_data / "questions.jsonl").read_text().splitlines())
    # A checkout's examples/demo is the same folder, for users of the repository.
    assert all(
        (REPO / "examples" / "demo" / name).read_bytes() == (package_data / name).read_bytes() for name in DEMO_FILES
    )
    # Nothing else is consulted: with the package's files hidden, the demo says so.
    monkeypatch.setattr("loramem.demo.DATA", "no_such_folder")
    with pytest.raises(Exception, match="example files are missing"):
        load_example()


def test_training_pairs_are_worded_apart_from_the_questions_and_cover_their_facts():
    example = load_example()
    asked = {normalize_answer(q["question"]) for q in example.questions}
    assert not asked & {normalize_answer(q) for q, _ in example.train_qa}
    document = set(normalize_answer(example.document).split())
    for _, answer in example.train_qa:  # answers are the document's facts, in its words
        assert set(normalize_answer(answer).split()) <= document, answer
    for item in example.questions:  # each question's fact is taught by at least one pair, in other words
        assert any(contains(answer, item["answers"]) for _, answer in example.train_qa), item["question"]


def test_built_wheel_ships_the_demo_data(tmp_path):
    """A wheel built from the sources holds the example files, so `loramem demo` runs after a plain install."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "loramem", source / "loramem", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("loramem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in DEMO_FILES:
        assert f"loramem/demo_data/{name}" in names


def test_demo_on_a_tiny_model_has_the_adapter_column_and_the_margin(tiny, one_thread):
    rows = run_demo(tiny, [0.0, 0.5, NO_CONTEXT], "snapkv", training=TrainSpec(rank=2, epochs=1))
    n_questions = len(load_example().questions)
    assert [(r.ratio, r.adapter) for r in rows[::n_questions]] == [
        (0.0, False),
        (0.5, False),
        (1.0, False),
        (1.0, True),
    ]
    with_adapter = [r for r in rows if r.adapter]
    assert len(with_adapter) == n_questions and {r.kept_tokens for r in with_adapter} == {
        rows[-n_questions - 1].kept_tokens
    }
    assert tiny.adapter is None  # the demo leaves the model as it found it
    data = summary(rows)
    ours, base = column_score(rows, NO_CONTEXT, True), column_score(rows, NO_CONTEXT, False)
    assert data["margin_vs_no_adapter"] == {
        "correct": ours.correct - base.correct,
        "rouge_l": round(ours.rouge_l - base.rouge_l, 3),
    }
    assert margin_line(rows).startswith(f"Margin at ratio 1.0 (no document token left): the adapter gives {ours};")


def test_demo_command_json_on_a_tiny_model(tiny_dir, one_thread):
    result = CliRunner().invoke(app, ["demo", "--model", str(tiny_dir), "--ratios", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted({(r["ratio"], r["adapter"]) for r in lines[:-1]}) == [
        (0.0, False),
        (0.5, False),
        (1.0, False),
        (1.0, True),
    ]
    assert set(lines[-1]) == {"summary", "margin"} and lines[-1]["margin"].startswith("Margin at ratio 1.0")
    quick = CliRunner().invoke(app, ["demo", "--model", str(tiny_dir), "--ratios", "1", "--no-adapter", "--json"])
    assert quick.exit_code == 0, quick.output
    assert not any(json.loads(line).get("adapter") for line in quick.stdout.splitlines())


@pytest.mark.real
def test_demo_on_the_default_model_tells_the_story():
    """`loramem demo` as README runs it: the adapter answers at ratio 1.0 where the base model cannot."""
    done = run_cli("demo")
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "ratio 1 + adapter" in out
    margin = out.strip().splitlines()[-1]
    assert margin.startswith("Margin at ratio 1.0 (no document token left): the adapter gives ")
    gained = int(margin.split("; ")[1].split(" answers")[0])
    assert gained > 0, margin  # more answers than without the adapter at ratio 1.0
