"""train-adapter and eval as a shell user meets them: JSON summaries, loadable outputs, one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO_DOC, run_cli
from test_cli import one_line_error

SHORT_DOC = "The lighthouse on Brannock Point was designed by Mara Quell in 1871. Its keeper is Tobin Hale."


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text(
        '{"question": "Who designed the lighthouse?", "answer": "Mara Quell"}\n'
        '{"question": "Who keeps it?", "answer": "Tobin Hale"}\n'
    )
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, qa_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "doc.lora"
    result = run_cli(
        "train-adapter",
        str(DEMO_DOC),
        "-o",
        str(out),
        "--qa",
        str(qa_file),
        "--steps",
        "2",
        "--rank",
        "2",
        "--json",
        "--model",
        str(tiny_dir),
    )
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["trainable_parameters"] > 0 and summary["path"] == str(out)
    return out


def test_train_adapter_output_loads_in_peft_and_inspects(tiny_dir, adapter_dir):
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dir)
    assert model.peft_config["default"].r == 2
    shown = run_cli("inspect", str(adapter_dir), "--json")
    assert shown.returncode == 0, shown.stderr.decode()
    info = json.loads(shown.stdout)
    assert info["rank"] == 2 and info["format"] == "qa" and info["trainable_parameters"] > 0


def test_ntp_needs_no_question_answer_pairs(tiny_dir, tmp_path):
    out = tmp_path / "ntp.lora"
    result = run_cli(
        "train-adapter",
        "-",
        "-o",
        str(out),
        "--format",
        "ntp",
        "--steps",
        "1",
        "--rank",
        "2",
        "--model",
        str(tiny_dir),
        input=DEMO_DOC.read_bytes(),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert (out / "adapter_model.safetensors").exists() and (out / "train_qa.jsonl").read_text() == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "--rank: must be at least 1"),
        (["--targets", "nonsense_proj"], "unknown target module 'nonsense_proj'"),
        (["--layers", "5-1"], "runs backwards"),
        (["--format", "raw"], "--format: input should be 'qa', 'ntp' or 'mixed'"),
    ],
)
def test_train_adapter_bad_options(tiny_dir, qa_file, tmp_path, args, message):
    out = tmp_path / "bad.lora"
    result = run_cli(
        "train-adapter",
        str(DEMO_DOC),
        "-o",
        str(out),
        "--qa",
        str(qa_file),
        "--steps",
        "1",
        *args,
        "--model",
        str(tiny_dir),
    )
    assert message in one_line_error(result)
    assert result.returncode == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_train_adapter_bad_inputs(tiny_dir, qa_file, adapter_dir, tmp_path):
    model = ["--model", str(tiny_dir), "--steps", "1"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "empty" in one_line_error(
        run_cli("train-adapter", str(empty), "-o", str(tmp_path / "a"), "--qa", str(qa_file), *model)
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Q?", "answer": "A"}\n{"question": "no answer"\n')
    assert "broken.jsonl:2:" in one_line_error(
        run_cli("train-adapter", str(DEMO_DOC), "-o", str(tmp_path / "b"), "--qa", str(broken), *model)
    )
    before = sorted(p.name for p in adapter_dir.iterdir())
    assert "--force" in one_line_error(
        run_cli("train-adapter", str(DEMO_DOC), "-o", str(adapter_dir), "--qa", str(qa_file), *model)
    )
    assert sorted(p.name for p in adapter_dir.iterdir()) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_adapter_of_another_base_model_is_refused(other_tiny_dir, adapter_dir):
    result = run_cli("ask", "--adapter", str(adapter_dir), "Who?", "--model", str(other_tiny_dir))
    one_line_error(result)
    assert result.returncode == 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    records = [
        {
            "id": "light",
            "document": SHORT_DOC,
            "qa": [
                {"question": "Who designed it?", "answers": ["Mara Quell"]},
                {"question": "Who keeps it?", "answers": ["Tobin Hale"]},
            ],
            "train_qa": [{"question": "Designer?", "answer": "Mara Quell"}],
        },
        {
            "id": "bees",
            "document": "Ilse Varn keeps bees in Orlow and sells honey on Fridays.",
            "qa": [{"question": "Who keeps bees?", "answers": ["Ilse Varn"]}],
            "train_qa": [{"question": "Beekeeper?", "answer": "Ilse Varn"}],
        },
    ]
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GRID = [
    "--ratios",
    "0,1",
    "--press",
    "snapkv",
    "--mode",
    "none,decode",
    "--format",
    "qa",
    "--steps",
    "1",
    "--max-new-tokens",
    "3",
]


def eval_cli(tiny_dir: Path, *args: str):
    return run_cli("eval", *args, *GRID, "--model", str(tiny_dir))


def answers(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["doc_id"], r["question_index"], r["ratio"], r["mode"]))


def strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_eval_run_shard_merge_report_and_resume(tiny_dir, dataset, tmp_path):
    whole = tmp_path / "whole"
    result = eval_cli(tiny_dir, str(dataset), "--out", str(whole), "--json")
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["n_documents"] == 2 and summary["n_questions"] == 3 and summary["n_answers"] == 3 * 2 * 2
    assert summary["complete"] and (whole / "curves.png").exists()

    again = eval_cli(tiny_dir, str(dataset), "--out", str(whole))
    assert "--resume" in one_line_error(again)
    resumed = eval_cli(tiny_dir, str(dataset), "--out", str(whole), "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert len(answers(whole)) == 12  # nothing redone

    shards = [tmp_path / "s0", tmp_path / "s1"]
    for i, shard in enumerate(shards):
        done = eval_cli(tiny_dir, str(dataset), "--out", str(shard), "--shard", f"{i}/2", "--json")
        assert done.returncode == 0, done.stderr.decode()
    merged = run_cli("eval", "merge", *map(str, shards), "-o", str(tmp_path / "merged"), "--json")
    assert merged.returncode == 0, merged.stderr.decode()
    assert strip_time(answers(tmp_path / "merged")) == strip_time(answers(whole))

    (whole / "summary.json").unlink()
    shown = run_cli("eval", "report", str(whole))
    assert shown.returncode == 0, shown.stderr.decode()
    assert "2 documents, 3 questions" in shown.stdout.decode()
    assert json.loads((whole / "summary.json").read_text())["n_answers"] == 12

    reused = eval_cli(tiny_dir, str(dataset), "--out", str(tmp_path / "reused"), "--adapters", str(whole / "adapters"))
    assert reused.returncode == 0, reused.stderr.decode()
    assert strip_time(answers(tmp_path / "reused")) == strip_time(answers(whole))
    # adapters trained otherwise than the run says would be reported under its settings: refused before any work
    for flags, said in (
        (["--targets", "attn"], "targets 'all', not 'attn' (--targets)"),
        (["--lr", "1e-3", "--layers", "first-half"], "layers None, not 'first-half' (--layers); lr 0.0015, not 0.001"),
    ):
        other = tmp_path / "other"
        refused = eval_cli(tiny_dir, str(dataset), "--out", str(other), "--adapters", str(whole / "adapters"), *flags)
        assert refused.returncode == 3 and said in one_line_error(refused) and not other.exists()


def test_every_mode_asks_with_the_instruction(tiny_dir, dataset, tmp_path):
    """--instruction ends every held-out question in every mode (a control for answer style), is part of the run's
    settings (a resume with another is refused) and leaves the training pairs as they were."""
    run = tmp_path / "short"
    done = eval_cli(tiny_dir, str(dataset), "--out", str(run), "--instruction", " Answer in a few words. ", "--json")
    assert done.returncode == 0, done.stderr.decode()
    rows = answers(run)
    assert len(rows) == 12 and {r["mode"] for r in rows} == {"none", "decode"}
    plain = {r["question"] for r in answers_of_dataset(dataset)}
    assert {r["question"] for r in rows} == {f"{q} Answer in a few words." for q in plain}
    assert json.loads((run / "config.json").read_text())["config"]["instruction"] == "Answer in a few words."
    trained = (run / "adapters" / "light-qa" / "train_qa.jsonl").read_text()
    assert "Answer in a few words." not in trained
    other = eval_cli(tiny_dir, str(dataset), "--out", str(run), "--resume", "--instruction", "Answer in full.")
    assert other.returncode == 2 and "instruction" in one_line_error(other)
    empty = eval_cli(tiny_dir, str(dataset), "--out", str(tmp_path / "e"), "--instruction", "  ")
    assert empty.returncode == 2 and "--instruction" in one_line_error(empty)


def test_eval_compare_sets_runs_side_by_side(tiny_dir, dataset, tmp_path):
    """Two runs of an ablation (all layers' modules against attention only): each named by the setting in which it
    differs, its figures its own summary's, the base rows (the same answers in both) shown once."""
    runs = [tmp_path / "all", tmp_path / "attn"]
    for run, targets in zip(runs, ("all", "attn")):
        done = eval_cli(tiny_dir, str(dataset), "--out", str(run), "--targets", targets)
        assert done.returncode == 0, done.stderr.decode()
    plot = tmp_path / "compare.png"
    shown = run_cli("eval", "compare", *map(str, runs), "--plot", str(plot), "--json")
    assert shown.returncode == 0, shown.stderr.decode()
    result = json.loads(shown.stdout)
    assert [r["label"] for r in result["runs"]] == ["--targets all", "--targets attn"]
    rows = [(r["run"], r["series"]) for r in result["rows"]]
    assert rows == [
        ("--targets all", "base (no adapter)"),
        ("--targets all", "base KV + adapter decode · qa"),
        ("--targets attn", "base KV + adapter decode · qa"),
    ]
    for run, row in zip(runs[1:], result["rows"][2:]):
        own = json.loads((run / "summary.json").read_text())
        cells = [c for c in own["cells"] if c["mode"] == "decode"]
        assert [c["rouge_l"] for c in row["cells"]] == [c["rouge_l"] for c in cells]
        assert sorted(row["margins"]) == ["0.0", "1.0"]
    assert plot.read_bytes().startswith(b"\x89PNG")
    markdown = run_cli("eval", "compare", *map(str, runs), "--markdown", "--metric", "contains")
    assert markdown.returncode == 0 and "| --targets attn | base KV + adapter decode · qa |" in markdown.stdout.decode()
    assert "two run folders" in one_line_error(run_cli("eval", "compare", str(runs[0])))
    text = tmp_path / "notes.txt"
    text.write_text("mine")
    refused = run_cli("eval", "compare", *map(str, runs), "--plot", str(text))
    assert refused.returncode == 2 and text.read_text() == "mine"


def answers_of_dataset(dataset: Path) -> list[dict]:
    return [{"question": qa["question"]} for line in dataset.read_text().splitlines() for qa in json.loads(line)["qa"]]


def test_eval_bad_input(tiny_dir, dataset, tmp_path):
    assert "shard" in one_line_error(eval_cli(tiny_dir, str(dataset), "--out", str(tmp_path / "r"), "--shard", "2/2"))
    assert "ratio" in one_line_error(run_cli("eval", str(dataset), "--out", str(tmp_path / "r"), "--ratios", "1.5"))
    assert "mode" in one_line_error(run_cli("eval", str(dataset), "--out", str(tmp_path / "r"), "--mode", "magic"))
    assert "not an eval run directory" in one_line_error(run_cli("eval", "report", str(tmp_path)))
    assert not (tmp_path / "r").exists()


def test_eval_budget_bytes_beside_ratios(tiny_dir, dataset, tmp_path):
    run = tmp_path / "run"
    args = (str(dataset), "--out", str(run), "--budget-bytes", "20KB,1MB", "--budget-ranks", "16,0,2", "--rank", "2")
    result = eval_cli(tiny_dir, *args)
    assert result.returncode == 0, result.stderr.decode()
    table = result.stdout.decode()
    assert "within a byte budget" in table and "budget 19.5 KiB" in table and "0 (KV only)" in table
    assert "a rank-16 adapter alone takes 128 KiB" in " ".join(result.stderr.decode().split())
    rows = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    budget_rows = [r for r in rows if r.get("budget_bytes")]
    # 3 questions x (ratios 0,1 x modes none,decode) + 3 x (20KB: ranks 0,2; 1MB: ranks 0,2,16)
    assert len(rows) - len(budget_rows) == 12 and len(budget_rows) == 15
    assert {r["adapter_rank"] for r in budget_rows if r["budget_bytes"] == 20000} == {0, 2}
    everything = [r for r in budget_rows if r["budget_bytes"] == 10**6 and r["adapter_rank"] == 0]
    assert all(r["kv_tokens_kept"] == r["document_tokens"] for r in everything)  # 1 MB holds these documents whole
    # The run's --rank serves ratio cells and the rank-2 budget points alike: one adapter per document and rank.
    assert sorted(p.name for p in (run / "adapters").iterdir()) == [
        "bees-qa",
        "bees-qa-r16",
        "light-qa",
        "light-qa-r16",
    ]
    resumed = eval_cli(tiny_dir, *args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr.decode()
    summary = json.loads(resumed.stdout)
    assert len((run / "answers.jsonl").read_text().splitlines()) == 27 and len(summary["budget"]) == 5
    assert (run / "budget.png").exists() and (run / "curves.png").exists()
    shown = run_cli("eval", "report", str(run), "--metric", "contains")
    assert shown.returncode == 0 and "answer contains a reference within a byte budget" in shown.stdout.decode()
    markdown = run_cli("eval", "report", str(run), "--markdown")
    assert markdown.returncode == 0, markdown.stderr.decode()
    tables = [block.splitlines() for block in markdown.stdout.decode().split("\n\n") if block.startswith("| ")]
    grids = [t for t in tables if t[0].startswith("| mode | format | ratio 0")]
    budgets = [t for t in tables if t[0].startswith("| adapter rank | format | budget")]
    assert len(grids) == len({c["press"] for c in summary["cells"]}) and len(budgets) >= 1
    assert len(grids) + len(budgets) == len(tables)
    for table in tables:  # a header, its rule, then rows of the header's width (no stray | inside a cell)
        assert table[1] == "| " + " | ".join(["---"] * (table[0].count(" | ") + 1)) + " |"
        assert {row.count(" | ") for row in table} == {table[0].count(" | ")}
    none_at_0 = next(c for c in summary["cells"] if c["mode"] == "none" and c["ratio"] == 0)
    assert any(row.startswith(f"| none | — | {none_at_0['rouge_l']['mean']:.3f} ±") for row in grids[0])
    assert all("**" in "".join(table[2:]) for table in budgets)  # each budget's best split is bold


def test_eval_budget_bad_input(tiny_dir, dataset, tmp_path):
    out = ("--out", str(tmp_path / "r"))
    assert "byte size" in one_line_error(run_cli("eval", str(dataset), *out, "--budget-bytes", "12XB"))
    assert "--budget-bytes: a byte size must be positive" in one_line_error(
        run_cli("eval", str(dataset), *out, "--budget-bytes", "0")
    )
    assert "--budget-ranks: input should be a valid integer" in one_line_error(
        run_cli("eval", str(dataset), *out, "--budget-bytes", "1MB", "--budget-ranks", "two")
    )
    assert ">= 0" in one_line_error(
        run_cli("eval", str(dataset), *out, "--budget-bytes", "1MB", "--budget-ranks", "-2")
    )
    assert "qa adapter of rank 2 for document light" in one_line_error(
        run_cli(
            "eval",
            str(dataset),
            *out,
            "--budget-bytes",
            "1MB",
            "--budget-ranks",
            "0,2",
            "--format",
            "qa",
            "--adapters",
            str(tmp_path),
            "--model",
            str(tiny_dir),
        )
    )
    assert not (tmp_path / "r").exists()


def test_a_run_folder_has_one_writer_at_a_time(tiny_dir, dataset, tmp_path):
    from loramem.evaluation.rundir import CONFIG
    from loramem.fileio import locked_folder

    run = tmp_path / "dual"
    with locked_folder(run, "run folder", committed=CONFIG, wait=False):  # another eval, --resume or merge
        for result in (
            eval_cli(tiny_dir, str(dataset), "--out", str(run), "--resume"),
            run_cli("eval", "merge", str(run), "-o", str(run)),
        ):
            assert "run folder" in one_line_error(result) and "another loramem process" in one_line_error(result)
            assert result.returncode == 2
    assert list(run.iterdir()) == []
    missing, broken = tmp_path / "missing", tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    assert "not valid JSON" in one_line_error(eval_cli(tiny_dir, str(broken), "--out", str(missing)))
    assert not missing.exists()  # a run folder made for a run that failed before its config.json is removed
