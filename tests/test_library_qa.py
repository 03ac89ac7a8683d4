"""Library questions: routing to adapters, a merge made once, retrieved chunks or stored caches in context; and
eval's library modes (oracle, routed, routed-merge, hybrid, rag) with routing recall, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TIMINGS, flat_spec, run_cli
from rich.console import Console
from test_cli import one_line_error
from test_library import DOCS, PARAPHRASES

import loramem.evaluation.doc_adapters as doc_adapters
import loramem.evaluation.library_modes as library_modes
import loramem.evaluation.runner as runner
import loramem.library.qa as qa_module
from loramem.adapters.attach import ADAPTER_WEIGHTS, attach_adapter, detach_adapter
from loramem.adapters.merge import merge_adapters
from loramem.answer import generate
from loramem.data.formats import QA, DocRecord, TrainQA, write_dataset
from loramem.errors import LoramemError
from loramem.evaluation.rundir import ANSWERS, CONFIG, cell_key, read_answers
from loramem.evaluation.runner import run_eval
from loramem.evaluation.summary import routing_recall, summarize
from loramem.evaluation.tables import print_table
from loramem.kv.encode import encode
from loramem.library.embed import load_embedder
from loramem.library.qa import ask_library, ask_library_batch, merged_folder, parallel_cache, stored_cache
from loramem.library.store import AddOptions, add_documents, open_library, retrieve_chunks
from loramem.specs import EvalSpec, MergeSpec, TrainSpec

NAMES = ("bees", "glass", "railway")
FAST = TrainSpec(format="ntp", rank=2, steps=1)
TOKENS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def clean_model(tiny):
    """Every test starts and leaves the session's tiny model without an adapter."""
    detach_adapter(tiny)
    yield
    detach_adapter(tiny)


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def library(tiny, embedder, tmp_path_factory) -> Path:
    """Three documents with rank-2 adapters (one step) and stored caches."""
    folder = tmp_path_factory.mktemp("docs")
    for name in NAMES:
        (folder / f"{name}.txt").write_text(DOCS[name])
    lib = tmp_path_factory.mktemp("lib") / "library"
    add_documents(
        lib, tiny, [str(folder / f"{n}.txt") for n in NAMES], AddOptions(train=FAST, with_cache=True), embedder
    )
    return lib


class Count:
    """Counts calls of a module's function (patched in place) and passes them on."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        module: object,
        name: str,
        fail_after: int | None = None,
        items: bool = False,
    ):
        self.calls = 0
        self.real = getattr(module, name)
        self.fail_after = fail_after
        if items:
            self.per_item(monkeypatch, module, name)
        else:
            monkeypatch.setattr(module, name, self)

    def tick(self) -> None:
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1

    def __call__(self, *args, **kwargs):
        self.tick()
        return self.real(*args, **kwargs)

    def per_item(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        """Also count the items a generator function of `module` yields (iter_answers: one per answer)."""
        real = getattr(module, name)

        def items(*args, **kwargs):
            for item in real(*args, **kwargs):
                self.tick()
                yield item

        monkeypatch.setattr(module, name, items)


# --- ask_library ----------------------------------------------------------------------------------------------


def test_top_1_uses_the_documents_own_adapter(tiny, library, embedder):
    question = PARAPHRASES["bees"]
    result = ask_library(tiny, library, question, top_k=1, max_new_tokens=TOKENS, embedder=embedder)
    assert [i for i, _ in result.routed] == ["bees"]
    assert result.adapter == open_library(library).adapter_dir("bees") == tiny.adapter.path
    assert result.context_chunks == [] and result.context_caches == []
    assert result.answer.answer == generate(tiny, question, max_new_tokens=TOKENS, adapter_on=True).answer
    assert not (library / qa_module.MERGED).exists()


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_k": 1, "with_caches": True}, {"top_k": 2, "with_context": 1}])
def test_batched_questions_answer_as_one_at_a_time(tiny, library, embedder, options, monkeypatch):
    """Questions routed to alternating adapters, answered in groups, give each question's own answer and routing;
    questions that retrieve the same chunks share one context prefill."""
    questions = [PARAPHRASES[name] for name in ("bees", "railway", "bees", "glass", "railway")]
    prefills = Count(monkeypatch, qa_module, "encode")
    together = ask_library_batch(tiny, library, questions, max_new_tokens=TOKENS, embedder=embedder, **options)
    chunk_lists = [tuple((c.doc_id, c.index) for c in r.context_chunks) for r in together if r.context_chunks]
    assert prefills.calls == len(set(chunk_lists))
    assert len(chunk_lists) == (len(questions) if "with_context" in options else 0)
    assert len(set(chunk_lists)) < len(chunk_lists) or not chunk_lists  # "bees" is asked twice
    for question, batched in zip(questions, together):
        alone = ask_library(tiny, library, question, max_new_tokens=TOKENS, embedder=embedder, **options)
        for field in ("routed", "adapter", "context_chunks", "context_caches"):
            assert getattr(batched, field) == getattr(alone, field)
        assert batched.answer.answer == alone.answer.answer


def test_merged_adapter_is_the_merge_of_the_routed_set_made_once(tiny, library, embedder, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    shutil.rmtree(library / qa_module.MERGED, ignore_errors=True)
    merges = Count(monkeypatch, qa_module, "merge_adapters")
    question = PARAPHRASES["glass"]
    first = ask_library(tiny, library, question, top_k=2, merge="ties", max_new_tokens=TOKENS, embedder=embedder)
    assert merges.calls == 1 and first.adapter.parent == library / qa_module.MERGED
    assert tiny.adapter.path == first.adapter
    attaches = Count(monkeypatch, qa_module, "attach_adapter")
    second = ask_library(tiny, library, question, top_k=2, merge="ties", max_new_tokens=TOKENS, embedder=embedder)
    assert merges.calls == 1 and attaches.calls == 0  # the kept merge, already attached
    assert second.adapter == first.adapter and second.answer.answer == first.answer.answer

    lib = open_library(library)
    sha = {d["id"]: d["adapter"]["sha256"] for d in lib.documents}
    routed = sorted((i for i, _ in first.routed), key=sha.get)  # merged in adapter-hash order
    merge_adapters(tiny, [lib.adapter_dir(i) for i in routed], tmp_path / "m", MergeSpec(method="ties"))
    mine, reference = load_file(str(first.adapter / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "m" / ADAPTER_WEIGHTS))
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)

    # The same documents in another routing order share the merge; another method or weights do not.
    ids = [i for i, _ in first.routed]
    same, _, _ = merged_folder(lib, ids[::-1], MergeSpec(method="ties"))
    assert same == first.adapter
    assert merged_folder(lib, ids, MergeSpec(method="linear"))[0] != same
    swapped = merged_folder(lib, ids, MergeSpec(method="ties", weights=[1.0, 0.5]))
    assert swapped[0] != same
    assert merged_folder(lib, ids[::-1], MergeSpec(method="ties", weights=[0.5, 1.0])) == swapped  # weights follow


def test_with_context_answers_over_exactly_the_retrieved_chunks(tiny, library, embedder):
    question = PARAPHRASES["railway"]
    result = ask_library(tiny, library, question, top_k=1, with_context=2, max_new_tokens=TOKENS, embedder=embedder)
    chunks = retrieve_chunks(library, question, 2, embedder)
    assert result.context_chunks == chunks and len(chunks) == 2
    cache = encode(tiny, "\n\n".join(c.text for c in chunks), presses=["knorm"])
    assert result.answer.document_tokens == cache.n_tokens
    assert tiny.adapter.path == result.adapter  # the adapter decodes over the base-model context cache
    assert result.answer.answer == generate(tiny, question, cache, max_new_tokens=TOKENS, adapter_on=True).answer


def test_stored_caches_side_by_side(tiny, library, embedder):
    lib = open_library(library)
    a, b = stored_cache(tiny, lib, "bees"), stored_cache(tiny, lib, "railway")
    n_p = a.meta["n_protected"]
    both = parallel_cache([a, b])
    assert both.n_tokens == max(a.n_tokens, b.n_tokens)  # the question continues after the longest document
    assert both.kept_per_layer == [a.n_tokens + b.n_tokens - n_p] * a.n_layers  # b's framing prefix is dropped
    for layer in range(a.n_layers):
        assert torch.equal(both.keys[layer], torch.cat([a.keys[layer], b.keys[layer][:, n_p:]], 1))
        assert torch.equal(both.values[layer][:, a.n_tokens :], b.values[layer][:, n_p:])
        assert torch.equal(
            both.positions[layer][0], torch.cat([torch.arange(a.n_tokens), torch.arange(n_p, b.n_tokens)])
        )
    result = ask_library(
        tiny, library, PARAPHRASES["bees"], top_k=2, with_caches=True, max_new_tokens=TOKENS, embedder=embedder
    )
    routed = [i for i, _ in result.routed]
    assert result.context_caches == routed
    caches = [stored_cache(tiny, lib, i) for i in routed]
    assert result.answer.cache_tokens == sum(c.n_tokens for c in caches) - n_p
    assert result.answer.document_tokens == max(c.n_tokens for c in caches)
    assert parallel_cache([a]).n_tokens == a.n_tokens and torch.equal(parallel_cache([a]).keys[0], a.keys[0])


def test_unequal_ranks_are_refused_for_ties(tiny, library, embedder, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    (tmp_path / "stars.txt").write_text(DOCS["stars"])
    rank_4 = AddOptions(train=TrainSpec(format="ntp", rank=4, steps=1))
    add_documents(lib, tiny, [str(tmp_path / "stars.txt")], rank_4, embedder)
    with pytest.raises(
        LoramemError, match=r"--merge ties needs adapters of equal rank.*stars 4; use --merge cat"
    ) as caught:
        ask_library(tiny, lib, PARAPHRASES["stars"], top_k=4, max_new_tokens=TOKENS, embedder=embedder)
    assert "\n" not in str(caught.value)
    with pytest.raises(LoramemError, match="not both"):
        ask_library(tiny, lib, "honey?", with_context=1, with_caches=True, embedder=embedder)


# --- ask --library ----------------------------------------------------------------------------------------------


def test_cli_with_caches_of_one_document_answers_as_ask_cache(library, tiny_dir, tmp_path):
    """The library's base model is loaded (no --model); one routed document's stored cache answers as ask --cache."""
    question = PARAPHRASES["railway"]
    routed = run_cli(
        "ask", "--library", str(library), "--top-k", "1", "--with-caches", question, "--max-new-tokens", "6", "--json"
    )
    assert routed.returncode == 0, routed.stderr.decode()
    data = json.loads(routed.stdout)
    doc = library / "docs" / "railway"
    assert data["routed"][0]["id"] == "railway" and len(data["routed"]) == 1
    assert data["adapter"] == str(doc / "adapter") and data["context_caches"] == ["railway"]
    assert data["context_chunks"] == []
    direct = run_cli(
        "ask",
        "--cache",
        str(doc / "cache.safetensors"),
        "--adapter",
        str(doc / "adapter"),
        question,
        "--max-new-tokens",
        "6",
        "--model",
        str(tiny_dir),
        "--json",
    )
    assert direct.returncode == 0, direct.stderr.decode()
    expected = json.loads(direct.stdout)
    assert data["answer"] == expected["answer"] and data["cache_tokens"] == expected["cache_tokens"]

    (tmp_path / "q.txt").write_text(f"{PARAPHRASES['bees']}\n{question}\n")
    hybrid = run_cli(
        "ask",
        "--library",
        str(library),
        "--top-k",
        "2",
        "--with-context",
        "1",
        "--questions",
        str(tmp_path / "q.txt"),
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert hybrid.returncode == 0, hybrid.stderr.decode()
    lines = [json.loads(line) for line in hybrid.stdout.decode().splitlines()]
    assert [len(d["routed"]) for d in lines] == [2, 2] and [len(d["context_chunks"]) for d in lines] == [1, 1]
    assert all(Path(d["adapter"]).parent == library / "merged" for d in lines)


def test_cli_library_errors(library, other_tiny_dir, tmp_path):
    lib = str(library)
    assert "--library, --cache: a library answers with its own adapters" in one_line_error(
        run_cli("ask", "--library", lib, "--cache", "x.safetensors", "q?")
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in one_line_error(run_cli("ask", "--library", str(empty), "q?"))
    assert "between 1 and the library's 3" in one_line_error(run_cli("ask", "--library", lib, "--top-k", "4", "q?"))
    assert "--top-k: routing settings need a library" in one_line_error(run_cli("ask", "--top-k", "2", "q?"))
    assert "not both" in one_line_error(run_cli("ask", "--library", lib, "--with-context", "1", "--with-caches", "q?"))
    assert "--merge: input should be 'ties', 'linear'" in one_line_error(
        run_cli("ask", "--library", lib, "--merge", "mean", "q?")
    )
    other = run_cli("ask", "--library", lib, "--model", str(other_tiny_dir), "q?")
    assert "another base model" in one_line_error(other) and other.returncode == 3


# --- eval library modes -----------------------------------------------------------------------------------------

LIBRARY_MODES = ["oracle", "routed", "routed-merge", "hybrid", "rag"]
N_QUESTIONS = 2
N_ANSWERS = len(NAMES) * N_QUESTIONS * (1 + len(LIBRARY_MODES))


def eval_config(**changes) -> EvalSpec:
    settings = {
        "ratios": [1.0],
        "presses": ["knorm"],
        "modes": ["none", *LIBRARY_MODES],
        "formats": ["qa"],
        "max_new_tokens": TOKENS,
        "steps": 1,
        "rank": 2,
        "alpha": 4.0,
        "batch_size": 2,
        "chunk_size": 32,
        "max_length": 256,
        "library_top_k": 2,
        "context_chunks": 2,
    }
    return flat_spec(**{**settings, **changes})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three short documents on distinct topics, two held-out questions and two training pairs each."""
    questions = {
        "bees": [("Who collects the honey?", "Ansel Marrow"), ("How many hives are there?", "forty-two")],
        "glass": [("Who shapes the molten glass?", "Ilse Brannock"), ("Where does the sand come from?", "Corrin Bay")],
        "railway": [
            ("What is the steam engine called?", "the Old Kestrel"),
            ("How many tunnels does the railway pass?", "seven"),
        ],
    }
    records = [
        DocRecord(
            name,
            DOCS[name],
            [QA(q, [a]) for q, a in questions[name]],
            [TrainQA(f"In a few words: {q}", a) for q, a in questions[name]],
        )
        for name in NAMES
    ]
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    write_dataset(records, path)
    return path


def counted(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> dict[str, Count]:
    counts = {"train_adapter": Count(monkeypatch, doc_adapters, "train_adapter")}
    counts["add_documents"] = Count(monkeypatch, library_modes, "add_documents")
    # Answers as iter_answers yields them: library modes in library_modes, the others in the runner.
    counts["generate"] = Count(monkeypatch, library_modes, "iter_answers", fail_after, items=True)
    counts["generate"].per_item(monkeypatch, runner, "iter_answers")
    counts["merge_adapters"] = Count(monkeypatch, qa_module, "merge_adapters")
    counts["context_prefills"] = Count(monkeypatch, qa_module, "encode")
    return counts


@pytest.fixture(scope="module")
def reference(tiny, dataset, tmp_path_factory) -> tuple[Path, dict[str, Count], dict]:
    run = tmp_path_factory.mktemp("runs") / "reference"
    with pytest.MonkeyPatch.context() as mp:
        counts = counted(mp)
        summary = run_eval(tiny, dataset, run, eval_config())
    return run, counts, summary


def rows_by_cell(run: Path) -> dict[tuple, dict]:
    """A run's answers by cell, without their timings."""
    return {cell_key(r): {k: v for k, v in r.items() if k not in TIMINGS} for r in read_answers(run / ANSWERS)}


def test_the_library_plot_shows_every_condition(reference):
    """library.png: one row per library mode and merge, beside the base model's rows with and without context,
    each named once."""
    from loramem.evaluation.plots import library_conditions
    from loramem.evaluation.rundir import LIBRARY_PLOT

    run, _, summary = reference
    assert (run / LIBRARY_PLOT).read_bytes().startswith(b"\x89PNG")
    conditions = library_conditions(summary)
    labels = [label for label, _ in conditions]
    library = [c for c in summary["cells"] if c["press"] == "library"]
    assert len(labels) == len(set(labels)) and [c for _, c in conditions if c["press"] == "library"] == library
    assert {c["mode"] for _, c in conditions if c["press"] != "library"} <= {"none", "decode"}


def test_every_library_mode_answers_every_question(tiny, dataset, reference, embedder):
    run, counts, summary = reference
    rows = read_answers(run / ANSWERS)
    assert len(rows) == len({cell_key(r) for r in rows}) == N_ANSWERS == counts["generate"].calls
    library = [r for r in rows if r["mode"] in LIBRARY_MODES]
    assert {(r["press"], r["ratio"], r["format"]) for r in library} == {("library", 1.0, None)}
    for mode in LIBRARY_MODES:
        assert sorted((r["doc_id"], r["question_index"]) for r in library if r["mode"] == mode) == sorted(
            (name, q) for name in NAMES for q in range(N_QUESTIONS)
        )
    # The library reuses the run's own qa adapters: one training per document, and one add each.
    assert counts["train_adapter"].calls == counts["add_documents"].calls == len(NAMES)
    lib = open_library(run / "library")
    assert [d["id"] for d in lib.documents] == list(NAMES)
    assert all(d["adapter"]["origin"] == str(run / "adapters" / f"{d['id']}-qa") for d in lib.documents)
    merged = {(r["doc_id"], r["adapter"]) for r in library if r["mode"] == "routed-merge"}
    assert counts["merge_adapters"].calls == len(merged)  # one merge per document and routed set
    assert not (run / "library" / "merged").exists()  # made in a scratch folder, not kept
    for r in library:
        ids = [d["id"] for d in r["routed"]]
        assert len(ids) == 2 and r["gold_rank"] == (ids.index(r["doc_id"]) + 1 if r["doc_id"] in ids else None)
        assert r["routed_gold"] == (r["doc_id"] in ids) and r["library_documents"] == len(NAMES)
        expected = {"oracle": f"docs/{r['doc_id']}/adapter", "routed": f"docs/{ids[0]}/adapter", "rag": None}
        if r["mode"] in expected:
            assert r["adapter"] == expected[r["mode"]]
        else:
            assert r["adapter"].startswith("merged/")
        assert len(r["context_chunks"]) == (2 if r["mode"] in ("hybrid", "rag") else 0)
    by_cell = {(r["doc_id"], r["question_index"], r["mode"]): r for r in library}
    for name in NAMES:
        assert by_cell[(name, 0, "hybrid")]["adapter"] == by_cell[(name, 0, "routed-merge")]["adapter"]
        assert by_cell[(name, 0, "hybrid")]["context_chunks"] == by_cell[(name, 0, "rag")]["context_chunks"]
    # One context prefill per document and chunk list: a question's hybrid and rag rows share it.
    in_context = [(r["doc_id"], json.dumps(r["context_chunks"])) for r in library if r["context_chunks"]]
    assert counts["context_prefills"].calls == len(set(in_context)) < len(in_context)

    # Answers as ask would give them: oracle with the gold adapter closed-book, rag over the chunks without one.
    question = by_cell[("glass", 1, "oracle")]["question"]
    attach_adapter(tiny, lib.adapter_dir("glass"))
    assert (
        by_cell[("glass", 1, "oracle")]["answer"]
        == generate(tiny, question, max_new_tokens=TOKENS, adapter_on=True).answer
    )
    detach_adapter(tiny)
    chunks = retrieve_chunks(lib, question, 2, embedder)
    assert by_cell[("glass", 1, "rag")]["context_chunks"] == [[c.doc_id, c.index] for c in chunks]
    context = encode(tiny, "\n\n".join(c.text for c in chunks), presses=["knorm"])
    assert by_cell[("glass", 1, "rag")]["answer"] == generate(tiny, question, context, max_new_tokens=TOKENS).answer

    ranks = [by_cell[(n, q, "oracle")]["gold_rank"] for n in NAMES for q in range(N_QUESTIONS)]
    assert summary["routing"] == {
        "k": 2,
        "n": 6,
        "recall_at_1": round(ranks.count(1) / 6, 6),
        "recall_at_k": round(sum(r is not None for r in ranks) / 6, 6),
    }
    margins = {m["mode"]: m for m in summary["margins"]}
    assert set(margins) == set(LIBRARY_MODES) and all(m["versus"] == "knorm" and m["n"] == 6 for m in margins.values())
    config = json.loads((run / CONFIG).read_text())["config"]
    assert config["library"] == {
        "path": None,
        "top_k": 2,
        "merge": ["ties"],
        "merge_weights": ["equal"],
        "merge_temperature": 0.1,
        "context_chunks": 2,
    }


MERGES = ["ties", "linear", "cat"]


@pytest.fixture(scope="module")
def merges(tiny, dataset, reference, tmp_path_factory) -> tuple[Path, dict[str, Count], dict]:
    """The reference grid with three merges, each with equal and routing weights."""
    run = tmp_path_factory.mktemp("runs") / "merges"
    with pytest.MonkeyPatch.context() as mp:
        counts = counted(mp)
        summary = run_eval(tiny, dataset, run, eval_config(merge=MERGES, library={"merge_weights": "equal,routing"}))
    return run, counts, summary


def test_each_merge_and_weighting_is_its_own_cells(tiny, tiny_dir, merges, reference, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run, _, summary = merges
    rows = read_answers(run / ANSWERS)
    merging = [r for r in rows if r["mode"] in ("routed-merge", "hybrid")]
    per_question = 3 + 2 * len(MERGES) * 2  # oracle, routed, rag; routed-merge and hybrid per merge and weighting
    assert len(rows) == len({cell_key(r) for r in rows}) == len(NAMES) * N_QUESTIONS * (1 + per_question)
    assert {(r["merge"], r["merge_weights"]) for r in merging} == {(m, w) for m in MERGES for w in ("equal", "routing")}
    assert not any("merge" in r for r in rows if r not in merging)
    # The reference run (ties, equal weights) is this run's ties/equal cells, answer for answer.
    again = rows_by_cell(run)
    assert all(again[key] == row for key, row in rows_by_cell(reference[0]).items())
    lib = open_library(run / "library")
    for r in merging:
        scores = [d["score"] for d in r["routed"]]
        if r["merge_weights"] == "equal":
            assert r["weights"] == [1.0, 1.0]
        else:
            shares = torch.softmax(torch.tensor(scores, dtype=torch.float64) / 0.1, 0)
            assert r["weights"] == pytest.approx((2 * shares).tolist(), abs=1e-6) and sum(
                r["weights"]
            ) == pytest.approx(2)
            assert (r["weights"][0] > r["weights"][1]) == (scores[0] > scores[1])  # the better routed weighs more
    # A routing-weighted merge is PEFT's add_weighted_adapter of the routed adapters, each with its own weight. Not
    # kept in LIB/merged/, it is named there by its row, and remade from it answers as the row did.
    assert not (lib.path / "merged").exists()
    for method in MERGES:
        row = next(
            r for r in merging if (r["mode"], r["merge"], r["merge_weights"]) == ("routed-merge", method, "routing")
        )
        ids = [d["id"] for d in row["routed"]]
        weight = dict(zip(ids, row["weights"]))
        spec = MergeSpec(method=method, weights=row["weights"])
        remade = qa_module.routed_adapter(tiny, lib, ids, spec, tmp_path)
        assert f"merged/{remade.name}" == row["adapter"]
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(lib.adapter_dir(ids[0])), adapter_name=ids[0]
        )
        peft_model.load_adapter(str(lib.adapter_dir(ids[1])), adapter_name=ids[1])
        _, order, _ = merged_folder(lib, ids, spec)
        peft_model.add_weighted_adapter(
            order, [weight[i] for i in order], "m", combination_type=method, density=0.5 if method == "ties" else None
        )
        expected = get_peft_model_state_dict(peft_model, adapter_name="m")
        saved = load_file(str(remade / ADAPTER_WEIGHTS))
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
        attach_adapter(tiny, remade)
        assert row["answer"] == generate(tiny, row["question"], max_new_tokens=TOKENS, adapter_on=True).answer
        detach_adapter(tiny)

    cells = [c for c in summary["cells"] if c["mode"] in ("routed-merge", "hybrid")]
    assert [(c["mode"], c["merge"], c["merge_weights"]) for c in cells] == [
        (mode, m, w) for mode in ("routed-merge", "hybrid") for m in MERGES for w in ("equal", "routing")
    ]
    assert all(c["n"] == len(NAMES) * N_QUESTIONS for c in cells)
    assert len([m for m in summary["margins"] if m["mode"] == "hybrid"]) == 2 * len(MERGES)
    console = Console(record=True, width=400)
    print_table(summary, console)
    text = console.export_text()
    assert all(f"{m} · routing weights" in text for m in MERGES) and "words (refs" in text


def test_a_resume_with_other_merges_is_refused_and_with_the_same_redoes_nothing(tiny, dataset, merges):
    from loramem.specs import SpecError

    run = merges[0]
    for other in ({"merge": ["ties", "linear"]}, {"merge": MERGES, "library": {"merge_weights": "routing"}}):
        with pytest.raises(SpecError, match="disagree with the run being resumed"):
            run_eval(
                tiny,
                dataset,
                run,
                eval_config(**{**{"library": {"merge_weights": "equal,routing"}}, **other}),
                resume=True,
            )
    with pytest.MonkeyPatch.context() as mp:
        counts = counted(mp)
        run_eval(tiny, dataset, run, None, resume=True)
    assert all(c.calls == 0 for c in counts.values())


def test_a_run_recorded_before_merges_were_lists_resumes_as_done(tiny, dataset, reference, tmp_path):
    """Version 2 recorded one merge method and its merging rows no merge: a resume gives them the run's, redoes
    nothing and records version 3."""
    run = tmp_path / "old"
    shutil.copytree(reference[0], run)
    header = json.loads((run / CONFIG).read_text())
    library = {k: v for k, v in header["config"]["library"].items() if not k.startswith("merge_")}
    header["config"] = {**header["config"], "version": 2, "library": {**library, "merge": "ties"}}
    (run / CONFIG).write_text(json.dumps(header))
    rows = read_answers(run / ANSWERS)
    old = [{k: v for k, v in r.items() if k not in ("merge", "merge_weights")} for r in rows]
    (run / ANSWERS).write_text("".join(json.dumps(r) + "\n" for r in old))
    with pytest.MonkeyPatch.context() as mp:
        counts = counted(mp)
        run_eval(tiny, dataset, run, None, resume=True)
    assert all(c.calls == 0 for c in counts.values())
    assert rows_by_cell(run) == rows_by_cell(reference[0])
    assert json.loads((run / CONFIG).read_text())["config"]["version"] == 3


def test_resume_redoes_nothing(tiny, dataset, reference, tmp_path):
    run, k = tmp_path / "run", 8  # stops inside the first document's library answers
    with pytest.MonkeyPatch.context() as mp:
        counted(mp, fail_after=k)
        with pytest.raises(KeyboardInterrupt):
            run_eval(tiny, dataset, run, eval_config())
    assert len(read_answers(run / ANSWERS)) == k and tiny.adapter is None
    with pytest.MonkeyPatch.context() as mp:
        counts = counted(mp)
        run_eval(tiny, dataset, run, eval_config(), resume=True)
    assert counts["generate"].calls == N_ANSWERS - k
    assert counts["train_adapter"].calls == counts["add_documents"].calls == 0  # the library was complete
    assert rows_by_cell(run) == rows_by_cell(reference[0])
    with pytest.MonkeyPatch.context() as mp:
        counts = counted(mp)
        run_eval(tiny, dataset, run, eval_config(), resume=True)
    assert all(c.calls == 0 for c in counts.values())


def test_a_documents_adapter_is_read_once_for_all_its_modes(tiny, dataset, tmp_path, monkeypatch):
    """oracle (the library's copy of the run's adapter), a budget point at --rank and decode use the same weights:
    each document's are read once for all of them (and once when the library checks they fit), and the base-model
    rows answered meanwhile with the adapter switched off are those of a run that never attaches one."""
    from collections import Counter as Tally

    from peft import PeftModel

    from loramem.adapters.attach import adapter_sha256

    reads: list[str] = []  # from_pretrained reads through load_adapter too
    real_load = PeftModel.load_adapter
    monkeypatch.setattr(
        PeftModel, "load_adapter", lambda self, path, *a, **k: reads.append(path) or real_load(self, path, *a, **k)
    )
    grid = {"ratios": [0.0, 1.0], "budget_bytes": [200_000], "steps": 4, "lr": 0.05}  # an adapter that shows
    run_eval(
        tiny, dataset, tmp_path / "all", eval_config(modes=["none", "decode", "oracle"], budget_ranks=[0, 2], **grid)
    )
    per_weights = Tally(adapter_sha256(path) for path in reads)
    assert sorted(per_weights.values()) == [2] * len(NAMES), reads
    rows = [r for r in read_answers(tmp_path / "all" / ANSWERS) if r["ratio"] is not None]
    decoded = {(r["doc_id"], r["question_index"], r["ratio"]): r["answer"] for r in rows if r["mode"] == "decode"}
    base = {(r["doc_id"], r["question_index"], r["ratio"]): r["answer"] for r in rows if r["mode"] == "none"}
    assert decoded != base  # the adapter changes answers, so base rows would show it left on

    reads.clear()
    run_eval(tiny, dataset, tmp_path / "base", eval_config(modes=["none"], budget_ranks=[0], **grid))
    assert not reads
    without = rows_by_cell(tmp_path / "base")
    within = {k: v for k, v in rows_by_cell(tmp_path / "all").items() if k in without}
    assert len(within) == len(without) and within == without


def test_library_config_is_checked_before_the_run(tiny, dataset, reference, tmp_path):
    for bad in ({"merge": "mean"}, {"library_top_k": 0}, {"context_chunks": 0}):
        with pytest.raises(LoramemError):
            eval_config(**bad)
    with pytest.raises(LoramemError, match="more than the library's 3 documents"):
        run_eval(tiny, dataset, tmp_path / "a", eval_config(library_top_k=4))
    partial = tmp_path / "partial"
    shutil.copytree(reference[0] / "library", partial)
    manifest = json.loads((partial / "library.json").read_text())
    manifest["documents"] = manifest["documents"][:2]
    (partial / "library.json").write_text(json.dumps(manifest))
    with pytest.raises(LoramemError, match="lacks 1 of the run's documents"):
        run_eval(tiny, dataset, tmp_path / "b", eval_config(library=str(partial)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_routing_recall_on_known_rows():
    def row(doc: str, q: int, mode: str, rank: int | None, rouge: float) -> dict:
        routed = [{"id": f"x{i}", "score": 0.5} for i in range(3)]
        return {
            "doc_id": doc,
            "question_index": q,
            "question": "q",
            "references": ["r"],
            "press": "library",
            "ratio": 1.0,
            "mode": mode,
            "format": None,
            "answer": "a",
            "rouge_l": rouge,
            "exact_match": 0.0,
            "token_f1": rouge,
            "cache_tokens": 0,
            "seconds": 0.1,
            "routed": routed,
            "routed_gold": rank is not None,
            "gold_rank": rank,
        }

    ranks = {("d0", 0): 1, ("d0", 1): 2, ("d1", 0): None, ("d1", 1): 1}
    rows = [row(d, q, mode, rank, 0.5) for (d, q), rank in ranks.items() for mode in ("routed", "oracle")]
    setup = {("routed", "d0", 0): 1.0, ("oracle", "d0", 0): 0.002}  # a merge made by the first answer, a cached one
    for r in rows:
        r["setup_seconds"] = setup.get((r["mode"], r["doc_id"], r["question_index"]), 0.0)
    assert routing_recall(rows) == {"k": 3, "n": 4, "recall_at_1": 0.5, "recall_at_k": 0.75}
    base = [{**row(d, q, "none", None, 0.25), "press": "snapkv"} for d, q in ranks]
    for r in base:
        del r["routed"], r["routed_gold"], r["gold_rank"]
    assert routing_recall(base) is None
    summary = summarize(rows + base, n_resamples=200)
    assert summary["routing"]["recall_at_k"] == 0.75
    margin = next(m for m in summary["margins"] if m["mode"] == "routed")
    assert margin["versus"] == "snapkv" and margin["rouge_l"]["diff"] == pytest.approx(0.25)
    console = Console(record=True, width=240)
    print_table(summary, console)
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "recall@1 0.500, recall@3 0.750 (4 questions)" in text and "base = mode none at ratio 1 (snapkv)" in text
    # Seconds per answer: the decoding share, plus the mode's setup spread over its answers (none under 0.005 s).
    cells = {c["mode"]: c for c in summary["cells"]}
    assert (cells["routed"]["setup_seconds"], cells["oracle"]["setup_seconds"]) == (0.25, 0.0005)
    assert "setup_seconds" not in cells["none"]
    assert text.count("1.0 words (refs 1.0) · 0.10 s +0.25") == 1 and "+0.00" not in text


def test_cli_eval_library_options(dataset, tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "eval",
        str(dataset),
        "--out",
        str(out),
        "--mode",
        "routed-merge,rag",
        "--library-top-k",
        "3",
        "--merge",
        "cat,linear",
        "--merge-weights",
        "routing",
        "--merge-temperature",
        "0.5",
        "--context-chunks",
        "1",
        "--steps",
        "1",
        "--rank",
        "2",
        "--max-new-tokens",
        "2",
        "--model",
        str(tiny_dir),
        "--json",
    )
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["routing"]["k"] == 3 and summary["routing"]["recall_at_k"] == 1.0
    config = json.loads((out / CONFIG).read_text())["config"]
    library = config["library"]
    assert (library["top_k"], library["merge"], library["merge_weights"], library["merge_temperature"]) == (
        3,
        ["cat", "linear"],
        ["routing"],
        0.5,
    )
    assert library["context_chunks"] == 1
    rows = read_answers(out / ANSWERS)
    assert len(rows) == len(NAMES) * N_QUESTIONS * 3 and all(
        len(r["context_chunks"]) == 1 for r in rows if r["mode"] == "rag"
    )
    assert {(r["merge"], r["merge_weights"]) for r in rows if r["mode"] == "routed-merge"} == {
        ("cat", "routing"),
        ("linear", "routing"),
    }
    cells = {(c["mode"], c.get("merge")): c for c in summary["cells"]}
    assert set(cells) == {("routed-merge", "cat"), ("routed-merge", "linear"), ("rag", None)}
    assert all(c["answer_words"] <= 2 and c["reference_words"] > 0 and c["seconds"] > 0 for c in cells.values())
    assert "more than the library's 3" in one_line_error(
        run_cli(
            "eval",
            str(dataset),
            "--out",
            str(tmp_path / "x"),
            "--mode",
            "rag",
            "--library-top-k",
            "4",
            "--model",
            str(tiny_dir),
        )
    )


def test_a_server_answers_from_a_library_as_ask_does(library, tiny_dir, tmp_path):
    """`ask --server --library NAME` (the name relative to the server's root) prints what `ask --library` prints."""
    from test_serve import start, stop

    questions = [PARAPHRASES["railway"], PARAPHRASES[NAMES[0]]]
    local = run_cli("ask", "--library", str(library), "--top-k", "2", *questions, "--max-new-tokens", "6", "--json")
    assert local.returncode == 0, local.stderr.decode()
    server = start(library.parent, "--model", str(tiny_dir), log=tmp_path / "serve.err")
    try:
        served = run_cli(
            "ask", "--server", server.url, "--library", library.name, "--top-k", "2", *questions,
            "--max-new-tokens", "6", "--json",
        )  # fmt: skip
        assert served.returncode == 0, served.stderr.decode()
    finally:
        stop(server)
    mine, theirs = (
        [json.loads(line) for line in served.stdout.splitlines()],
        [json.loads(line) for line in local.stdout.splitlines()],
    )
    assert [m["answer"] for m in mine] == [t["answer"] for t in theirs]
    assert [m["routed"] for m in mine] == [t["routed"] for t in theirs]
    assert all(m["library"] == library.name and not Path(m["adapter"]).is_absolute() for m in mine)
