"""eval: shared work, resume after an interruption, shards + merge, adapter reuse, and the summary statistics."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import DEMO_DOC, flat_spec, untimed
from rich.console import Console

import loramem.evaluation.doc_adapters as doc_adapters
import loramem.evaluation.runner as ev
import loramem.kv.compression as compression
from loramem.data import synth
from loramem.data.formats import QA, DocRecord, TrainQA, write_dataset
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.evaluation.config import file_name, select_documents
from loramem.evaluation.report import write_report
from loramem.evaluation.rundir import ANSWERS, CONFIG, CURVES, SUMMARY, cell_key, read_answers
from loramem.evaluation.runner import run_eval
from loramem.evaluation.shards import merge
from loramem.evaluation.stats import mean_ci, paired_bootstrap, paired_t_test
from loramem.evaluation.tables import print_table
from loramem.specs import EvalSpec

GRID = {
    "ratios": [0, 0.5, 1.0],
    "presses": ["snapkv", "knorm"],
    "modes": ["none", "decode", "all", "base_scores"],
    "formats": ["qa", "ntp"],
}
FAST = {
    "max_new_tokens": 4,
    "steps": 2,
    "rank": 4,
    "alpha": 8.0,
    "batch_size": 2,
    "synth_pairs": 2,
    "chunk_size": 32,
    "max_length": 256,
}
N_DOCS, N_QUESTIONS = 3, 2
CELLS_PER_DOC = N_QUESTIONS * 2 * 3 * (1 + 3 * 2)  # presses x ratios x (none + 3 adapter modes x 2 formats)


def config(**changes) -> EvalSpec:
    return flat_spec(**{**GRID, **FAST, **changes})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three documents from the demo text; the last has no train_qa, so its QA adapter trains on synthesized pairs."""
    paragraphs = DEMO_DOC.read_text().split("\n\n")[1:]
    texts = [paragraphs[0] + "\n\n" + paragraphs[1], paragraphs[2], paragraphs[3]]
    qa = [QA("Who designed the lighthouse?", ["Orla Quenby"]), QA("Who was the first keeper?", ["Hobart Fennick"])]
    train = [
        TrainQA("Which engineer built the light?", "Orla Quenby"),
        TrainQA("Name the first keeper.", "Hobart Fennick"),
    ]
    records = [
        DocRecord("doc-a", texts[0], qa, train),
        DocRecord("doc-b", texts[1], qa, train),
        DocRecord("doc c/3", texts[2], qa),
    ]
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    write_dataset(records, path)
    return path


# Where the eval modules look each counted function up.
WHERE = {
    "encode": ev,
    "compress": compression,  # every cell is compressed through the one dispatch (kv.compression)
    "iter_answers": ev,
    "train_adapter": doc_adapters,
    "synthesize_pairs": synth,  # called by data.synth.training_pairs, the one rule for training pairs
    "training_views": doc_adapters,
}


class Counter:
    """Wraps the eval modules' view of a function and counts its calls (with their keyword arguments), or with
    `per_item` the items a generator function yields (iter_answers: one per answer)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, name: str, fail_after: int | None = None, per_item: bool = False
    ) -> None:
        self.calls: list[dict] = []
        self.real = getattr(WHERE[name], name)
        self.fail_after = fail_after
        self.per_item = per_item
        monkeypatch.setattr(WHERE[name], name, self)

    def tick(self, kwargs: dict) -> None:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(kwargs)

    def __call__(self, *args, **kwargs):
        if self.per_item:
            return self.items(*args, **kwargs)
        self.tick(kwargs)
        return self.real(*args, **kwargs)

    def items(self, *args, **kwargs):
        for item in self.real(*args, **kwargs):
            self.tick(kwargs)
            yield item


def counted_run(tiny, dataset, out, cfg, *, resume=False, fail_after=None) -> dict[str, Counter]:
    with pytest.MonkeyPatch.context() as mp:
        counters = {name: Counter(mp, name) for name in ("encode", "compress", "train_adapter", "synthesize_pairs")}
        counters["answers"] = Counter(mp, "iter_answers", fail_after, per_item=True)
        run_eval(tiny, dataset, out, cfg, resume=resume)
    return counters


def answers_by_cell(run: Path) -> dict[tuple, dict]:
    """Answer rows keyed by cell, without the timing (which differs between runs)."""
    rows = read_answers(run / ANSWERS)
    return {cell_key(r): {k: v for k, v in r.items() if k != "seconds"} for r in rows}


@pytest.fixture(scope="module")
def reference(tiny, dataset, tmp_path_factory) -> tuple[Path, dict[str, Counter]]:
    """One uninterrupted, unsharded run with every mode, its work counted."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    return out, counted_run(tiny, dataset, out, config())


def test_work_is_shared_and_every_cell_answered_once(reference):
    run, counts = reference
    encodes = counts["encode"].calls
    assert [c.get("with_adapter", False) for c in encodes].count(False) == N_DOCS  # one base prefill per document
    assert [c.get("with_adapter", False) for c in encodes].count(True) == N_DOCS * 2  # one per (document, format)
    assert len(counts["train_adapter"].calls) == N_DOCS * 2
    assert len(counts["synthesize_pairs"].calls) == 1  # only doc c has no train_qa, and only the qa format needs pairs
    # One compress per (press, ratio) for none, and per format for decode, all and base_scores.
    assert len(counts["compress"].calls) == N_DOCS * 6 * (1 + 3 * 2)
    assert sum(1 for c in counts["compress"].calls if c.get("scores_from") is not None) == N_DOCS * 6 * 2
    rows = read_answers(run / ANSWERS)
    assert len(rows) == len({cell_key(r) for r in rows}) == N_DOCS * CELLS_PER_DOC == len(counts["answers"].calls)
    assert {r["format"] for r in rows if r["mode"] == "none"} == {None}
    assert {r["format"] for r in rows if r["mode"] != "none"} == {"qa", "ntp"}
    assert min(r["cache_tokens"] for r in rows if r["ratio"] == 0) > max(
        r["cache_tokens"] for r in rows if r["ratio"] == 1
    )
    assert sorted(p.name for p in (run / "adapters").iterdir()) == sorted(
        f"{d}-{f}" for d in ("doc-a", "doc-b", file_name("doc c/3")) for f in ("qa", "ntp")
    )
    synthesized = (run / "train_qa" / f"{file_name('doc c/3')}.jsonl").read_text().splitlines()
    assert len(synthesized) == 2 and all(json.loads(line)["answer"] for line in synthesized)
    assert (run / SUMMARY).exists() and (run / CURVES).read_bytes().startswith(b"\x89PNG")


def test_resume_after_interruption_redoes_nothing(tiny, dataset, reference, tmp_path):
    out, k = tmp_path / "run", 30  # stops inside doc-a's qa-adapter cells, after that adapter was trained
    with pytest.raises(KeyboardInterrupt):
        counted_run(tiny, dataset, out, config(), fail_after=k)
    assert tiny.adapter is None
    assert len(read_answers(out / ANSWERS)) == k
    with (out / ANSWERS).open("a") as handle:  # an answer line cut short by the interruption
        handle.write('{"doc_id": "doc-a", "question_ind')
    with pytest.raises(LoramemError, match="not empty; add --resume"):
        run_eval(tiny, dataset, out, config())

    counts = counted_run(tiny, dataset, out, config(), resume=True)
    assert len(counts["answers"].calls) == N_DOCS * CELLS_PER_DOC - k
    assert len(counts["train_adapter"].calls) == N_DOCS * 2 - 1  # doc-a's qa adapter is reused
    assert answers_by_cell(out) == answers_by_cell(reference[0])
    lines = (out / ANSWERS).read_text().splitlines()
    assert len(lines) == N_DOCS * CELLS_PER_DOC and all(json.loads(line) for line in lines)


def test_resume_refuses_another_config_model_or_dataset(tiny, dataset, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    with pytest.raises(LoramemError, match=r"ratios: disagree with the run being resumed"):
        run_eval(tiny, dataset, run, config(ratios=[0, 0.5]), resume=True)
    other_model = dataclasses.replace(tiny, fingerprint={**tiny.fingerprint, "model": "0" * 16})
    with pytest.raises(IncompatibleArtifactError, match="another model"):
        run_eval(other_model, dataset, run, config(), resume=True)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(dataset.read_text().replace("Hobart", "Hubert"))
    with pytest.raises(LoramemError, match="another dataset"):
        run_eval(tiny, other_data, run, config(), resume=True)
    assert len(counted_run(tiny, dataset, run, config(), resume=True)["answers"].calls) == 0  # finished: no work


def test_resume_with_a_wider_limit_adds_only_the_new_documents(tiny, dataset, reference, tmp_path):
    small = {"modes": ["none"], "presses": ["knorm"]}
    run = tmp_path / "run"
    run_eval(tiny, dataset, run, config(limit=1, **small))
    counters = counted_run(tiny, dataset, run, config(limit=2, **small), resume=True)
    assert len(counters["encode"].calls) == 1 and len(counters["answers"].calls) == N_QUESTIONS * 3
    assert json.loads((run / CONFIG).read_text())["config"]["limit"] == 2
    assert {key[0] for key in answers_by_cell(run)} == {"doc-a", "doc-b"}


def test_questions_per_document_and_a_resume_that_widens_them(tiny, dataset, tmp_path):
    """--max-questions N answers each document's first N questions only; a resume may widen it (like --limit) and then
    answers only the added questions, exactly as an unlimited run does."""
    small = {"modes": ["none"], "presses": ["knorm"]}
    run = tmp_path / "run"
    run_eval(tiny, dataset, run, config(max_questions=1, **small))
    assert {(key[0], key[1]) for key in answers_by_cell(run)} == {(d, 0) for d in ("doc-a", "doc-b", "doc c/3")}
    counters = counted_run(tiny, dataset, run, config(max_questions=2, **small), resume=True)
    assert len(counters["answers"].calls) == N_DOCS * 3  # the second question at each of the three ratios
    assert json.loads((run / CONFIG).read_text())["config"]["max_questions"] == 2
    full = tmp_path / "full"
    run_eval(tiny, dataset, full, config(**small))
    assert answers_by_cell(run).keys() == answers_by_cell(full).keys()
    assert {k: v["answer"] for k, v in answers_by_cell(run).items()} == {
        k: v["answer"] for k, v in answers_by_cell(full).items()
    }


def test_mixed_adapters_train_on_views_written_once(tiny, dataset, tmp_path):
    """An eval's mixed adapter trains on views written once per document and kept in RUN_DIR/train_views/: a
    resume that trains the adapter again (here: it was removed) reads them instead of writing them again."""
    from loramem.adapters.validate import TRAIN_VIEWS
    from loramem.evaluation.rundir import VIEWS

    small = {"modes": ["decode"], "presses": ["knorm"], "ratios": [1.0], "formats": ["mixed"], "limit": 1}
    run = tmp_path / "run"
    run_eval(tiny, dataset, run, config(**small))
    kept = run / VIEWS / "doc-a.jsonl"
    adapter = run / "adapters" / "doc-a-mixed"
    assert kept.read_text() and (adapter / TRAIN_VIEWS).read_text() == kept.read_text()
    shutil.rmtree(adapter)
    (run / ANSWERS).write_text("")
    with pytest.MonkeyPatch.context() as mp:
        written = Counter(mp, "training_views")
        run_eval(tiny, dataset, run, config(**small), resume=True)
    assert not written.calls and (adapter / TRAIN_VIEWS).read_text() == kept.read_text()


def test_kv_variants_each_get_their_curve_and_bytes(tiny, dataset, tmp_path):
    from loramem import compress, encode, generate
    from loramem.data.formats import load_dataset
    from loramem.evaluation.rundir import BYTES_PLOT
    from loramem.kv.value_groups import compress_value_groups

    cfg = config(
        modes=["none"],
        presses=["knorm"],
        ratios=[0.0, 0.5],
        limit=1,
        granularities=["token", "value-group"],
        store_dtypes=["native", "int8"],
        groups=4,
    )
    summary = run_eval(tiny, dataset, tmp_path / "run", cfg)
    rows = answers_by_cell(tmp_path / "run")
    assert len(rows) == N_QUESTIONS * 2 * 2 * 2
    assert {c["press"] for c in summary["cells"]} == {
        "knorm",
        "knorm [token int8]",
        "knorm [value-group/4]",
        "knorm [value-group/4 int8]",
    }
    nbytes = {(r["variant"], r["ratio"]): r["kv_bytes"] for r in rows.values()}
    assert nbytes[("token int8", 0.5)] < nbytes[("token", 0.5)] < nbytes[("token", 0.0)]
    assert nbytes[("value-group/4 int8", 0.5)] < nbytes[("value-group/4", 0.5)]
    assert (tmp_path / "run" / BYTES_PLOT).read_bytes().startswith(b"\x89PNG")
    record = load_dataset(dataset)[0]  # a value-group cell answers as generate does on that cache
    cache = compress_value_groups(encode(tiny, record.document, presses=["knorm"]), "knorm", 4, 0.5)
    row = rows[(record.id, 0, "knorm", 0.5, "none", None, "value-group/4", None, None)]
    assert row["answer"] == generate(tiny, record.qa[0].question, cache, max_new_tokens=4).answer
    assert row["kv_bytes"] == cache.nbytes_stored
    token_row = rows[(record.id, 0, "knorm", 0.5, "none", None, "token", None, None)]
    assert (
        token_row["kv_bytes"]
        == compress(encode(tiny, record.document, presses=["knorm"]), "knorm", ratio=0.5).nbytes_stored
    )


def test_shards_merged_equal_the_unsharded_run(tiny, dataset, reference, tmp_path):
    shards = [tmp_path / "s0", tmp_path / "s1"]
    for i, out in enumerate(shards):
        run_eval(tiny, dataset, out, config(shard=(i, 2)))
    assert {r["doc_id"] for r in read_answers(shards[0] / ANSWERS)} == {"doc-a", "doc c/3"}
    summary = merge([*shards, shards[0]], tmp_path / "merged")  # a repeated shard is deduplicated
    assert answers_by_cell(tmp_path / "merged") == answers_by_cell(reference[0])
    expected = json.loads((reference[0] / SUMMARY).read_text())
    assert untimed(summary)["cells"] == untimed(expected)["cells"] and summary["margins"] == expected["margins"]
    assert summary["complete"] and summary["n_documents"] == N_DOCS and summary["n_questions"] == N_DOCS * N_QUESTIONS
    assert json.loads((tmp_path / "merged" / CONFIG).read_text())["config"]["shard"] == [0, 1]

    conflicting = tmp_path / "conflicting"
    shutil.copytree(shards[1], conflicting)
    header = json.loads((conflicting / CONFIG).read_text())
    header["config"]["max_new_tokens"] = 8
    (conflicting / CONFIG).write_text(json.dumps(header))
    with pytest.raises(LoramemError, match="max_new_tokens"):
        merge([shards[0], conflicting], tmp_path / "merged2")
    with pytest.raises(LoramemError, match="not empty"):
        merge(shards, tmp_path / "merged")


def test_adapters_are_reused_from_another_run(tiny, dataset, reference, tmp_path):
    adapters = reference[0] / "adapters"
    cfg = config(modes=["none", "decode"], adapters=str(adapters))
    counts = counted_run(tiny, dataset, tmp_path / "run", cfg)
    assert not counts["train_adapter"].calls and not counts["synthesize_pairs"].calls
    assert [c.get("with_adapter", False) for c in counts["encode"].calls] == [False] * N_DOCS
    mine, theirs = answers_by_cell(tmp_path / "run"), answers_by_cell(reference[0])
    assert mine == {key: row for key, row in theirs.items() if row["mode"] in ("none", "decode")}

    partial = tmp_path / "partial"
    shutil.copytree(adapters, partial)
    shutil.rmtree(partial / "doc-b-ntp")
    with pytest.raises(LoramemError, match="no ntp adapter for document doc-b"):
        run_eval(tiny, dataset, tmp_path / "run2", config(adapters=str(partial)))
    assert not (tmp_path / "run2").exists()  # refused before the run directory is made
    shutil.rmtree(partial / "doc-b-qa")
    shutil.copytree(partial / "doc-a-qa", partial / "doc-b-qa")
    shutil.copytree(partial / "doc-a-ntp", partial / "doc-b-ntp")
    with pytest.raises(IncompatibleArtifactError, match="another document"):
        run_eval(tiny, dataset, tmp_path / "run3", config(adapters=str(partial)))


def test_cells_share_batches_and_answer_as_one_at_a_time(tiny, dataset, reference, tmp_path):
    """By default one document's cells of one adapter state (every press and ratio; decode, all and base_scores
    alike) are rows of the same batches, each over its own cache; --batch-size 1 answers each question alone: the
    answers are the same."""
    import loramem.answer as answer_module

    adapters = str(reference[0] / "adapters")
    batches: list[list] = []

    def recording(model, prompts, caches, *args):
        batches.append(caches)
        return decode(model, prompts, caches, *args)

    decode = answer_module.decode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(answer_module, "decode", recording)
        run_eval(tiny, dataset, tmp_path / "pooled", config(limit=1, adapters=adapters))
    assert max(len({id(c) for c in caches}) for caches in batches) >= 6
    assert max(len(caches) for caches in batches) == 16  # MAX_BATCH rows: a cell holds only N_QUESTIONS
    run_eval(tiny, dataset, tmp_path / "single", config(limit=1, adapters=adapters, answer_batch_size=1))
    pooled, single = answers_by_cell(tmp_path / "pooled"), answers_by_cell(tmp_path / "single")
    assert len(pooled) == CELLS_PER_DOC
    assert {k: (r["answer"], r["cache_tokens"]) for k, r in pooled.items()} == {
        k: (r["answer"], r["cache_tokens"]) for k, r in single.items()
    }


def test_limit_and_shard_selection():
    records = [DocRecord(str(i), "text", []) for i in range(7)]
    assert [r.id for r in select_documents(records, None, (1, 3))] == ["1", "4"]
    assert [r.id for r in select_documents(records, 5, (1, 3))] == ["1", "4"]
    assert [r.id for r in select_documents(records, 4, (0, 2))] == ["0", "2"]
    assert flat_spec(shard="2/4").shard == (2, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(LoramemError, match="shard"):
            flat_spec(shard=bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"granularities": ["pixel"]},
        {"store_dtypes": ["int3"]},
        {"granularities": ["value-group"], "modes": ["base_scores"]},
        {"groups": 0},
        {"ratios": [1.5]},
        {"modes": ["decoder"]},
        {"formats": ["chat"]},
        {"presses": ["nope"]},
        {"shard": (2, 2)},
        {"limit": 0},
        {"rank": 0},
        {"modes": ["decode"], "formats": []},
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(LoramemError):
        config(**bad)


def hand_made_run(tmp_path: Path) -> Path:
    """Two documents x two questions; base and a qa adapter (decode) at ratios 0 and 1, with known scores."""
    rouge = {
        ("none", 0.0): [1.0, 0.8, 0.6, 1.0],
        ("decode", 0.0): [1.0, 0.9, 0.6, 1.0],
        ("none", 1.0): [0.0, 0.1, 0.0, 0.2],
        ("decode", 1.0): [0.5, 0.7, 0.4, 0.9],
    }
    rows = []
    for (mode, ratio), values in rouge.items():
        for i, value in enumerate(values):
            rows.append(
                {
                    "doc_id": f"d{i // 2}",
                    "question_index": i % 2,
                    "question": "q",
                    "references": ["r"],
                    "press": "snapkv",
                    "ratio": ratio,
                    "mode": mode,
                    "format": None if mode == "none" else "qa",
                    "answer": "a",
                    "rouge_l": value,
                    "exact_match": float(value == 1.0),
                    "token_f1": value,
                    "cache_tokens": 40 if ratio == 0 else 10,
                    "seconds": 0.1,
                }
            )
    run = tmp_path / "hand"
    run.mkdir()
    header = {
        "model": {"id": "m", "model": "x"},
        "dataset": {"path": "d", "sha256": "s"},
        "config": {},
        "documents": {"d0": 8, "d1": 8},
    }
    (run / CONFIG).write_text(json.dumps(header))
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"doc_id": "d0", "quest'  # a partial last line
    (run / ANSWERS).write_text(text)
    return run


def test_summary_statistics_on_known_answers(tmp_path):
    run = hand_made_run(tmp_path)
    console = Console(record=True, width=200)
    summary = write_report(run)
    print_table(summary, console)
    assert summary["n_documents"] == 2 and summary["n_questions"] == 4 and summary["n_answers"] == 16
    assert summary["complete"]
    cells = {(c["mode"], c["ratio"]): c for c in summary["cells"]}
    assert list(cells) == [("none", 0.0), ("none", 1.0), ("decode", 0.0), ("decode", 1.0)]
    cell = cells[("decode", 1.0)]
    _, low, high = mean_ci([0.5, 0.7, 0.4, 0.9])  # beside it: questions as if independent
    assert cell["n"] == cell["n_questions"] == 4 and cell["n_documents"] == 2 and cell["cache_tokens"] == 10
    # documents d0 (0.5, 0.7) and d1 (0.4, 0.9) resampled: 0.6, 0.625 or 0.65, so the 95% interval is [0.6, 0.65]
    assert cell["rouge_l"] == {
        "mean": 0.625,
        "low": 0.6,
        "high": 0.65,
        "question": {"low": round(low, 6), "high": round(high, 6)},
    }
    assert summary["unit"] == "document"
    assert cells[("none", 0.0)]["exact_match"]["mean"] == 0.5

    margins = {m["ratio"]: m for m in summary["margins"]}
    assert set(margins) == {0.0, 1.0} and all(m["mode"] == "decode" and m["format"] == "qa" for m in margins.values())
    m = margins[1.0]["rouge_l"]
    base, lora = [0.0, 0.1, 0.0, 0.2], [0.5, 0.7, 0.4, 0.9]
    boot, t = paired_bootstrap(base, lora), paired_t_test(base, lora)
    assert m["diff"] == pytest.approx(0.55) and margins[1.0]["n"] == 4 and margins[1.0]["n_documents"] == 2
    assert (m["documents"]["low"], m["documents"]["high"]) == pytest.approx((0.55, 0.55))  # both documents +0.55
    assert m["bootstrap"]["p_value"] == pytest.approx(boot["p_value"], abs=1e-6)
    assert m["t_test"] == pytest.approx({"low": t["low"], "high": t["high"], "p_value": t["p_value"]}, abs=1e-6)
    assert m["t_test"]["p_value"] < 0.05 and margins[0.0]["rouge_l"]["t_test"]["p_value"] > 0.05

    assert json.loads((run / SUMMARY).read_text()) == summary
    assert (run / CURVES).read_bytes().startswith(b"\x89PNG")
    table = console.export_text()
    assert "ratio 1" in table and "Δ+0.550" in table and "2 documents, 4 questions" in table and "n=4/2" in table


def test_cells_report_answer_lengths_seconds_and_a_length_matched_score(tmp_path):
    """The adapter answers in sentences and slower, the base model tersely: each cell's mean answer and reference
    words and seconds stand beside its scores, and the length-matched ROUGE-L (computed for rows written before
    it) scores both right answers alike, so its margin is 0 where ROUGE-L's length-blind one is not."""
    run = hand_made_run(tmp_path)
    rows = read_answers(run / ANSWERS)
    for r in rows:
        verbose = r["mode"] == "decode"
        r.update(answer="well it is r" if verbose else "r", references=["r", "r s t"], seconds=0.3 if verbose else 0.1)
    (run / ANSWERS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_report(run)
    cells = {(c["mode"], c["ratio"]): c for c in summary["cells"]}
    assert {k: (c["answer_words"], c["reference_words"], c["seconds"]) for k, c in cells.items()} == {
        ("none", 0.0): (1.0, 2.0, 0.1),
        ("none", 1.0): (1.0, 2.0, 0.1),
        ("decode", 0.0): (4.0, 2.0, 0.3),
        ("decode", 1.0): (4.0, 2.0, 0.3),
    }
    assert all("setup_seconds" not in c for c in cells.values())  # only library rows have merges and contexts
    assert all(c["rouge_l_matched"]["mean"] == 1.0 for c in cells.values())  # "r" is a 1-word span of each answer
    margin = next(m for m in summary["margins"] if m["ratio"] == 1.0)
    assert margin["rouge_l_matched"]["diff"] == 0.0 and margin["rouge_l"]["diff"] == pytest.approx(0.55)
    console = Console(record=True, width=200)
    print_table(summary, console)
    table = console.export_text()
    assert "4.0 words (refs 2.0) · 0.30 s" in table and "1.0 words (refs 2.0) · 0.10 s" in table
    assert "len-matched 1.000" in table


def test_single_question_cells_have_no_interval(tmp_path):
    run = hand_made_run(tmp_path)
    rows = [r for r in read_answers(run / ANSWERS) if r["doc_id"] == "d0" and r["question_index"] == 0]
    (run / ANSWERS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_report(run)
    assert all(c["rouge_l"]["low"] is None and c["n"] == 1 for c in summary["cells"])
    assert all(m["rouge_l"]["bootstrap"]["p_value"] is None for m in summary["margins"])
    assert not summary["complete"] and (run / CURVES).exists()


def test_report_needs_a_run_directory(tmp_path):
    with pytest.raises(LoramemError, match="not an eval run directory"):
        write_report(tmp_path)
