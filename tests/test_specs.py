"""The specs are the one declaration of every setting: vocabularies defined once, the CLI's options made from the
spec fields (choices listed, no type placeholders), and a run resumed from its folder alone, old runs included."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from inprocess import assert_refused, invoke

import loramem.vocab as vocab
from loramem import LoramemError, SpecError
from loramem.cli.app import click_command
from loramem.evaluation.rundir import ANSWERS, CONFIG
from loramem.evaluation.runner import run_eval
from loramem.specs import AskSpec, CompressSpec, EvalSpec, ModelSpec, ProbeSpec, TrainSpec
from loramem.specs.base import Spec, leaves
from loramem.specs.data import ConvertSpec, FictionSpec

PACKAGE = Path(vocab.__file__).parent
VOCABULARIES = {
    name: set(value)
    for name, value in vars(vocab).items()
    if name.isupper() and isinstance(value, tuple) and len(value) > 1 and all(isinstance(v, str) for v in value)
}
DOC = "The lighthouse at Varnaby Point was designed by Mara Quell in 1871. Tobin Hale keeps its lamp."
DATA = [
    {"id": "light", "document": DOC, "qa": [{"question": "Who designed it?", "answers": ["Mara Quell"]}]},
    {"id": "keeper", "document": DOC, "qa": [{"question": "Who keeps the lamp?", "answers": ["Tobin Hale"]}]},
]


def _module_literals(path: Path):
    """(name, set of strings) of each module-level assignment of a tuple, list or set of string literals."""
    for node in ast.parse(path.read_text()).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        value = getattr(node, "value", None)
        strings = isinstance(value, (ast.Tuple, ast.List, ast.Set)) and value.elts
        if strings and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
            for target in targets:
                yield getattr(target, "id", "?"), {e.value for e in value.elts}


def test_each_vocabulary_is_defined_once_in_vocab():
    """No module but loramem/vocab.py spells out a vocabulary (presses, modes, formats, store dtypes, ...) again,
    under its name or another."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "vocab.py":
            continue
        for name, values in _module_literals(path):
            assert name not in VOCABULARIES, f"{path}: {name} is defined in loramem.vocab"
            for known, allowed in VOCABULARIES.items():
                assert values != allowed, f"{path}: {name} spells out vocab.{known} again"


def _help(capsys, *path: str) -> str:
    result = invoke(capsys, *path, "--help")
    assert result.code == 0, result.stderr
    return " ".join(result.stdout.replace("│", " ").split())


def _paths(command, path=()):
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from _paths(sub, (*path, name))


def test_every_help_lists_choices_and_no_type_placeholders(capsys, monkeypatch):
    import typer.rich_utils

    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None)  # the docs/cli.md test sets a fixed width
    for path in _paths(click_command()):
        shown = _help(capsys, *path)
        assert not re.search(r"<(bool|str|int|float|path)>|list\[", shown), (path, shown)
    shown = _help(capsys, "eval")
    for flag, values in (
        ("--press", vocab.PRESSES),
        ("--mode", vocab.MODES),
        ("--format", vocab.FORMATS),
        ("--granularity", vocab.GRANULARITIES),
        ("--store-dtype", vocab.STORE_DTYPES),
    ):
        assert f"{flag} [{'|'.join(values)}]" in shown, flag
    assert "--batch-size INTEGER Questions decoded together" in shown
    assert "--train-batch-size INTEGER Training examples per step [default: 4]" in shown
    train = _help(capsys, "train-adapter")
    assert "--train-batch-size INTEGER" in train and "--batch-size" not in train.replace("--train-batch-size", "")
    assert "--format [qa|ntp|mixed]" in train and "[default: qa]" in train


def test_the_old_training_batch_flag_still_works_with_a_warning(capsys, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    result = invoke(capsys, "train-adapter", str(doc), "-o", str(tmp_path / "a"), "--batch-size", "0")
    assert result.code == 2 and "--batch-size is deprecated here; use --train-batch-size" in result.stderr
    assert "--train-batch-size: must be at least 1 (got 0)" in result.stderr


def _flags(spec: type[Spec]) -> set[str]:
    found = set()
    for _, holder, name in leaves(spec):
        extra = holder.model_fields[name].json_schema_extra or {}
        found.add(extra.get("flag") or "--" + name.replace("_", "-"))  # type: ignore[union-attr]
    return found


INPUTS = {"--adapter", "--library", "--cache", "--doc"}


def test_no_command_declares_a_setting_of_a_spec_by_hand():
    """Options whose flag is a spec field's are made from the field (`cli/specopts.py`), never typed again in a
    command; `--query` (repeatable, with --questions FILE) feeds CompressSpec.query, which the command fills.
    Artifacts named by path (--adapter, --library, ...) are inputs that each command takes in its own sense."""
    spec_flags = set().union(
        *(
            _flags(s)
            for s in (AskSpec, CompressSpec, ConvertSpec, EvalSpec, FictionSpec, ModelSpec, ProbeSpec, TrainSpec)
        )
    )
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Option":
                flags = {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
                declared = {f for f in flags if f.startswith("--")} & spec_flags - {"--query", *INPUTS}
                assert not declared, f"{path}: {declared} declared by hand; it is a spec field"


def test_specs_publish_their_json_schema_with_choices_and_bounds():
    schema = EvalSpec.model_json_schema()
    train = schema["$defs"]["TrainSpec"]["properties"]
    assert train["rank"]["minimum"] == 1 and train["rank"]["description"] == "LoRA rank"
    assert set(schema["properties"]["modes"]["items"]["enum"]) == set(vocab.MODES)
    with pytest.raises(SpecError, match=r"route\.top_k: routing settings need a library"):
        AskSpec.parse({"route": {"top_k": 2}})
    assert AskSpec(adapter="a").mode == "decode" and AskSpec().mode == "none"


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in DATA))
    return path


def _answers(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / ANSWERS).read_text().splitlines()]


def _interrupted(run: Path, keep: int) -> None:
    """As a run killed after `keep` answers leaves its folder."""
    lines = (run / ANSWERS).read_text().splitlines(keepends=True)
    (run / ANSWERS).write_text("".join(lines[:keep]))


def _cells(rows: list[dict]) -> list[tuple]:
    return sorted((r["doc_id"], r["ratio"], r["press"], r["answer"]) for r in rows)


GRID = {"ratios": [0.0, 1.0], "presses": ["snapkv", "knorm"], "modes": ["none"], "formats": ["qa"]}


def test_run_eval_continues_a_run_from_its_folder_alone(tiny, dataset, tmp_path, one_thread):
    run = tmp_path / "run"
    run_eval(tiny, dataset, run, {**GRID, "answer": {"max_new_tokens": 3}})
    complete = _answers(run)
    assert len(complete) == 2 * 2 * 2
    _interrupted(run, 3)
    summary = run_eval(tiny, None, run, resume=True)  # dataset and settings from config.json
    assert summary["complete"] and _cells(_answers(run)) == _cells(complete)
    with pytest.raises(SpecError, match="ratios: disagree with the run being resumed"):
        run_eval(tiny, None, run, {"ratios": [0.5]}, resume=True)


def test_a_run_folder_written_by_loramem_0_1_still_resumes(capsys, tiny, tiny_dir, dataset, tmp_path, one_thread):
    """config.json as loramem 0.1 wrote it: one flat mapping (library and budget settings left out when unused)."""
    run = tmp_path / "run"
    run_eval(tiny, dataset, run, {**GRID, "answer": {"max_new_tokens": 3}})
    complete = _answers(run)
    header = json.loads((run / CONFIG).read_text())
    header["config"] = {
        **GRID, "granularities": ["token"], "store_dtypes": ["native"], "groups": 4, "max_new_tokens": 3,
        "limit": None, "shard": [0, 1], "seed": 0, "synth_pairs": 16, "adapters": None, "rank": 16, "alpha": 32.0,
        "dropout": 0.0, "targets": "all", "layers": None, "lr": 0.0015, "epochs": 8, "steps": None,
        "batch_size": 4, "max_length": 512, "chunk_size": 128,
    }  # fmt: skip
    (run / CONFIG).write_text(json.dumps(header))
    _interrupted(run, 5)
    result = invoke(capsys, "eval", "--resume", "--out", str(run), "--model", str(tiny_dir), "--json")
    assert result.code == 0, result.stderr
    assert _cells(_answers(run)) == _cells(complete)
    wrong = invoke(capsys, "eval", "--resume", "--out", str(run), "--rank", "8", "--model", str(tiny_dir))
    assert "--rank: disagree with the run being resumed" in assert_refused(wrong, codes=(2,))


def test_answer_rows_are_typed_and_checked_where_a_run_is_read(tiny, dataset, tmp_path, one_thread):
    """answers.jsonl lines are AnswerRows: a damaged one is refused with its line and the field at fault."""
    from loramem.evaluation.rundir import read_answers

    run = tmp_path / "run"
    run_eval(tiny, dataset, run, {**GRID, "answer": {"max_new_tokens": 2}})
    rows = read_answers(run / ANSWERS)
    assert len(rows) == 8 and all(isinstance(r["ratio"], float) for r in rows)
    for damage, field in (({"ratio": "half"}, "ratio"), ({"question_index": -1}, "question_index"), ({}, "answer")):
        row = {**rows[0], **damage}
        if not damage:
            del row["answer"]
        (run / ANSWERS).write_text(json.dumps(rows[1]) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(LoramemError, match=rf"answers\.jsonl:2: not a valid answer line: {field}: "):
            read_answers(run / ANSWERS)
