"""The eval grid and an adapter library end to end on the embedded default model (SmolLM2-135M-Instruct).

The longest real-model tests, in a file of their own so that another xdist worker runs the rest of the real-model
tests meanwhile (`--dist loadfile` keeps a file on one worker)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, flat_spec, run_cli

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def eval_run(real, tmp_path_factory):
    """One eval run on two fiction documents: its summary, and its trained QA adapters for the library test."""
    from loramem.evaluation.runner import run_eval

    folder = tmp_path_factory.mktemp("eval")
    data = folder / "two.jsonl"
    data.write_text("".join((REPO / "examples" / "fiction.jsonl").read_text().splitlines(keepends=True)[:2]))
    config = flat_spec(
        ratios=[0.0, 1.0],
        presses=["snapkv"],
        modes=["none", "decode", "oracle", "rag"],
        formats=["qa"],
        max_new_tokens=12,
        steps=6,
        limit=2,
        library_top_k=1,
        budget_bytes=[24_000_000],
        budget_ranks=[0, 16],
    )
    return folder / "run", run_eval(real, data, folder / "run", config)


def test_eval_with_adapter_and_library_modes_on_default_model(real, eval_run):
    """The eval grid end to end on the default model: prefill, compression, a QA adapter, a library, routing."""
    _, summary = eval_run
    assert summary["complete"] and summary["n_documents"] == 2 and summary["n_questions"] == 16
    assert summary["routing"]["recall_at_1"] >= 0.5  # questions name the document's invented people and places
    cells = {(c["mode"], c["ratio"]): c for c in summary["cells"]}
    assert cells[("none", 0.0)]["contains"]["mean"] > cells[("none", 1.0)]["contains"]["mean"]
    assert real.adapter is None
    # 24 MB: the whole document as fp32 KV (46,080 bytes a token), or the r=16 all-linear adapter (4,884,480
    # float32 parameters) plus the 96 best tokens that fit in the rest.
    kv_only, split = sorted(summary["budget"], key=lambda p: p["adapter_rank"])
    assert kv_only["kv_tokens_kept"] == kv_only["document_tokens"] and kv_only["adapter_bytes"] == 0
    assert split["adapter_bytes"] == 4_884_480 * 4
    assert split["kv_tokens_kept"] == (24_000_000 - 4_884_480 * 4) // 46_080
    assert split["n"] == kv_only["n"] == 16 and "versus_kv_only" in split


def test_library_with_caches_and_merge_on_default_model(eval_run, tmp_path):
    """A library of two invented documents on the default model (their QA adapters, trained by the eval run, copied
    in): routing finds each question's document, its stored KV answers it, and the two adapters merge (TIES) into
    one that loads and answers."""
    from loramem.evaluation.metrics import contains

    run, _ = eval_run
    records = [json.loads(line) for line in (REPO / "examples" / "fiction.jsonl").read_text().splitlines()[:2]]
    lib = tmp_path / "lib"
    for record in records:
        (tmp_path / f"{record['id']}.txt").write_text(record["document"])
        adapter = run / "adapters" / f"{record['id']}-qa"
        added = run_cli(
            "library", "add", str(lib), str(tmp_path / f"{record['id']}.txt"), "--adapter", str(adapter), "--with-cache"
        )
        assert added.returncode == 0, added.stderr.decode()
    questions = [(record["id"], qa) for record in records for qa in record["qa"]]
    (tmp_path / "q.txt").write_text("".join(qa["question"] + "\n" for _, qa in questions))
    asked = run_cli(
        "ask",
        "--library",
        str(lib),
        "--top-k",
        "1",
        "--with-caches",
        "--questions",
        str(tmp_path / "q.txt"),
        "--max-new-tokens",
        "24",
        "--json",
    )
    assert asked.returncode == 0, asked.stderr.decode()
    lines = [json.loads(line) for line in asked.stdout.decode().splitlines()]
    routed = [d["routed"][0]["id"] == doc_id for d, (doc_id, _) in zip(lines, questions)]
    found = [contains(d["answer"], qa["answers"]) for d, (_, qa) in zip(lines, questions)]
    # Of 16 questions; measured 16 routed and 7 answered (closed-book, the base model answers none of them).
    assert sum(routed) >= 12 and sum(found) >= 6, (sum(routed), sum(found))

    merged = tmp_path / "merged.lora"
    adapters = [str(lib / "docs" / record["id"] / "adapter") for record in records]
    done = run_cli("merge", *adapters, "-o", str(merged), "--method", "ties")
    assert done.returncode == 0, done.stderr.decode()
    answer = run_cli("ask", "--adapter", str(merged), questions[0][1]["question"], "--json")
    assert answer.returncode == 0 and json.loads(answer.stdout)["answer"].strip()
