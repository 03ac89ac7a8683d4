"""Adapter libraries: merging equals PEFT, routing finds the right document, adds are atomic and checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_cli import one_line_error

from loramem.adapters.attach import ADAPTER_WEIGHTS, LORAMEM_META
from loramem.adapters.merge import check_sources, merge_adapters
from loramem.adapters.train import train_adapter
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.library.embed import chunk_text, load_embedder
from loramem.library.store import MANIFEST, AddOptions, add_documents, open_library, retrieve_chunks, route
from loramem.model.loading import load_model
from loramem.specs import MergeSpec, TrainSpec
from loramem.text import sentences

# Invented documents on distinct topics, each sentence naming its topic (a sentence like "the dome turns on
# wheels" alone is ambiguous at chunk level); nothing in them comes from pretraining.
DOCS = {
    "bees": "The apiary of Velmora Hollow keeps forty-two hives of black island bees. Beekeeper Ansel Marrow "
    "harvests the heather honey every September. The bees forage on wild thyme along the cliffs. "
    "Each hive is painted a different shade of blue. A copper smoker calms the bee colonies before "
    "the honey frames are lifted.",
    "glass": "The Tessaly glassworks blows green bottles in a furnace that never cools. Master gaffer Ilse Brannock "
    "shapes molten glass on a long iron blowpipe. Sand for the glass batch comes from the dunes at Corrin "
    "Bay. Finished vases rest overnight in the annealing oven. Apprentices learn to gather glass for three "
    "years before blowing alone.",
    "railway": "The Skarde mountain railway climbs nine hundred metres through seven tunnels. Its steam locomotive, "
    "the Old Kestrel, burns coal from the valley mine. Driver Pell Amundsen checks the boiler pressure at "
    "every station. Snow ploughs clear the track above the glacier in winter. The summit station sells "
    "hot chestnuts to passengers.",
    "stars": "The Orrin Peak observatory houses a reflecting telescope with a two metre mirror. Astronomer Dalia "
    "Venn catalogues variable stars in the northern sky. The observatory dome rotates on forty steel "
    "wheels. Clear nights above the cloud layer make the site ideal for photographing comets. Visitors may "
    "look through the eyepiece on the first Friday of each month.",
}
# Questions worded unlike the documents.
PARAPHRASES = {
    "bees": "Who collects the honey?",
    "glass": "Where does the sand for making bottles come from?",
    "railway": "What is the name of the steam engine?",
    "stars": "How big is the telescope mirror?",
}
FAST = TrainSpec(format="ntp", rank=2, steps=1)


@pytest.fixture(scope="module")
def doc_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("docs")
    files = {}
    for name, text in DOCS.items():
        files[name] = folder / f"{name}.txt"
        files[name].write_text(text)
    return files


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def library(tiny, doc_files, embedder, tmp_path_factory) -> Path:
    lib = tmp_path_factory.mktemp("lib") / "library"
    added = add_documents(lib, tiny, [str(p) for p in doc_files.values()], AddOptions(train=FAST), embedder)
    assert [d["id"] for d in added] == list(DOCS)
    return lib


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    """Rank-2 adapters of three documents, and a rank-4 one."""
    folder = tmp_path_factory.mktemp("adapters")
    made = {}
    for (name, text), rank in zip(DOCS.items(), (2, 2, 2, 4)):
        made[name] = folder / name
        train_adapter(tiny, text, [], made[name], TrainSpec(format="ntp", rank=rank, steps=2, lr=1e-2))
    return made


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under the folder (hidden ones included) with its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- merge -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "ties", "cat", "dare_ties", "svd"])
def test_merge_equals_peft_add_weighted_adapter(tiny, tiny_dir, adapters, tmp_path, method):
    """The merged adapter holds exactly the tensors that PEFT's add_weighted_adapter gives for the same inputs."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sources = [adapters["bees"], adapters["glass"], adapters["railway"]]
    weights = [1.0, 0.5, -0.7]
    out = tmp_path / "merged"
    merge_adapters(tiny, sources, out, MergeSpec(method=method, weights=weights, density=0.6, seed=3))

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(sources[0]), adapter_name="a"
    )
    peft_model.load_adapter(str(sources[1]), adapter_name="b")
    peft_model.load_adapter(str(sources[2]), adapter_name="c")
    torch.manual_seed(3)
    peft_model.add_weighted_adapter(
        ["a", "b", "c"], weights, "m", combination_type=method, density=0.6 if method in ("ties", "dare_ties") else None
    )
    expected = get_peft_model_state_dict(peft_model, adapter_name="m")
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    assert saved.keys() == expected.keys() and len(saved) == 2 * 7 * 2
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    peft_model.save_pretrained(str(tmp_path / "peft"), selected_adapters=["m"])  # the config PEFT writes, too
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (out, tmp_path / "peft" / "m")]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])  # a set, written in any order
    assert configs[0] == configs[1] and configs[0]["r"] == configs[0]["lora_alpha"]

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(out))
    state = get_peft_model_state_dict(loaded)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    meta = json.loads((out / LORAMEM_META).read_text())
    assert meta["base_model"] == {"id": tiny.model_id, **tiny.fingerprint}
    assert meta["merge"]["method"] == method and meta["merge"]["weights"] == weights
    assert meta["merge"]["density"] == (0.6 if method in ("ties", "dare_ties") else None)
    assert [s["path"] for s in meta["merge"]["sources"]] == [str(s) for s in sources]
    assert meta["merge"]["sources"][0]["document_sha256"] == hashlib.sha256(DOCS["bees"].encode()).hexdigest()
    assert not any("lora_" in name for name, _ in tiny.model.named_modules())  # the loaded model is left clean


def test_a_merge_leaves_the_attached_adapter_as_it_was(tiny, adapters, tmp_path):
    """ties, linear, cat and svd merge on the files' tensors: the model's attached adapter stays attached and
    answers exactly as before; dare_ties merges on the model (PEFT's random drop) and leaves it detached."""
    from loramem.adapters.attach import attach_adapter, detach_adapter

    ids = torch.tensor([tiny.tokenizer("The bees forage on wild thyme.")["input_ids"]])

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return tiny.model(input_ids=ids).logits

    sources = [adapters["bees"], adapters["glass"]]
    attach_adapter(tiny, adapters["railway"])
    try:
        before = logits()
        for method in ("ties", "linear", "cat", "svd"):
            merge_adapters(tiny, sources, tmp_path / method, MergeSpec(method=method))
            assert tiny.adapter is not None and tiny.adapter.path == adapters["railway"]
            assert torch.equal(logits(), before)
        merge_adapters(tiny, sources, tmp_path / "dare", MergeSpec(method="dare_ties"))
        assert tiny.adapter is None and not any("lora_" in name for name, _ in tiny.model.named_modules())
    finally:
        detach_adapter(tiny)


def test_merge_refusals(tiny, other_tiny_dir, adapters, tmp_path):
    two = [adapters["bees"], adapters["glass"]]
    for config, paths, message in (
        (MergeSpec(), two[:1], "at least 2 adapters"),
        (MergeSpec(weights=[1.0, 1.0, 1.0]), two, "3 weights for 2 adapters"),
        (MergeSpec(method="linear"), [adapters["bees"], adapters["stars"]], "equal rank"),
        (MergeSpec(method="ties"), [adapters["bees"], adapters["stars"]], "equal rank"),
        (MergeSpec(method="dare_ties"), [adapters["bees"], adapters["stars"]], "equal rank"),
    ):
        with pytest.raises(LoramemError, match=message) as caught:
            check_sources(paths, config)
        assert "\n" not in str(caught.value)
    assert len(check_sources([adapters["bees"], adapters["stars"]], MergeSpec(method="cat"))) == 2
    assert len(check_sources([adapters["bees"], adapters["stars"]], MergeSpec(method="svd"))) == 2
    for bad in ({"density": 0}, {"density": 1.5}, {"method": "average"}):
        with pytest.raises(LoramemError):
            MergeSpec(**bad)

    other = load_model(str(other_tiny_dir))
    train_adapter(other, DOCS["bees"], [], tmp_path / "other", FAST)
    with pytest.raises(IncompatibleArtifactError, match="different base models"):
        check_sources([adapters["bees"], tmp_path / "other"], MergeSpec())
    train_adapter(tiny, DOCS["bees"], [], tmp_path / "layer1", TrainSpec(format="ntp", rank=2, steps=1, layers="1"))
    with pytest.raises(LoramemError, match="different layers"):
        check_sources([adapters["bees"], tmp_path / "layer1"], MergeSpec())
    with pytest.raises(IncompatibleArtifactError, match="another base model"):
        merge_adapters(other, two, tmp_path / "out", MergeSpec())
    assert not (tmp_path / "out").exists()


def test_merge_cli(adapters, tmp_path):
    """No --model: the base model is the one the adapters name."""
    out = tmp_path / "merged"
    result = run_cli(
        "merge",
        str(adapters["bees"]),
        str(adapters["glass"]),
        "-o",
        str(out),
        "--method",
        "ties",
        "--weights",
        "1,0.5",
        "--json",
    )
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == {"path": str(out), "method": "ties", "rank": 2, "n_sources": 2}
    assert "3 weights" in one_line_error(
        run_cli("merge", str(adapters["bees"]), str(adapters["glass"]), "-o", str(tmp_path / "x"), "--weights", "1,1,1")
    )
    assert "(0, 1]" in one_line_error(
        run_cli("merge", str(adapters["bees"]), str(adapters["glass"]), "-o", str(tmp_path / "x"), "--density", "0")
    )
    assert not (tmp_path / "x").exists()


# --- embeddings and chunks --------------------------------------------------------------------------------------


def test_chunks_are_whole_sentences_of_100_to_200_words():
    text = " ".join(
        f"Sentence number {i} tells of " + "the long grey harbour wall " * (i % 5 + 1) + "today." for i in range(80)
    )
    chunks = chunk_text(text)
    assert len(chunks) > 3 and " ".join(chunks) == " ".join(sentences(text))
    assert all(c.endswith("today.") for c in chunks)
    assert all(100 <= len(c.split()) <= 200 for c in chunks[:-1]) and len(chunks[-1].split()) <= 200
    long_sentence = "word " * 450 + "end."
    assert [len(c.split()) for c in chunk_text(long_sentence)] == [200, 200, 51]


def test_embedder_matches_sentence_transformers(embedder):
    """Mean pooling and normalisation as sentence-transformers does for all-MiniLM-L6-v2."""
    st = pytest.importorskip("sentence_transformers")
    from loramem.library.embed import default_embedder_dir

    texts = [DOCS["bees"], "Who collects the honey?", "short"]
    reference = st.SentenceTransformer(str(default_embedder_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    ours = embedder.encode(texts)
    assert ours.shape == (3, 384) and torch.allclose(ours.norm(dim=-1), torch.ones(3))
    assert torch.allclose(ours, reference.cpu(), atol=1e-5)


# --- library and routing ----------------------------------------------------------------------------------------


def test_routing_finds_the_gold_document(library, embedder):
    questions = [
        (name, f"What is said about this: {s.rstrip('.')}?") for name, text in DOCS.items() for s in sentences(text)
    ]
    questions += [(name, q) for name, q in PARAPHRASES.items()]
    for gold, question in questions:
        ranked = route(library, question, 3, embedder)
        assert ranked[0][0] == gold, (question, ranked)
        assert len(ranked) == 3 and [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    everything = route(library, "honey", len(DOCS), embedder)
    assert sorted(i for i, _ in everything) == sorted(DOCS)
    chunks = retrieve_chunks(library, PARAPHRASES["railway"], 2, embedder)
    assert chunks[0].doc_id == "railway" and chunks[0].text == DOCS["railway"] and chunks[0].score >= chunks[1].score
    with pytest.raises(LoramemError, match="between 1 and"):
        route(library, "honey", len(DOCS) + 1, embedder)


def test_library_records_and_incremental_add(tiny, doc_files, embedder, library, tmp_path):
    lib = open_library(library)
    assert lib.manifest["base_model"] == {"id": tiny.model_id, **tiny.fingerprint}
    assert lib.manifest["embedder"]["name"] == "all-MiniLM-L6-v2" and lib.manifest["embedder"]["dim"] == 384
    doc = lib.documents[0]
    assert doc["adapter"]["rank"] == 2 and doc["adapter"]["format"] == "ntp" and doc["adapter"]["origin"] == "trained"
    assert (lib.adapter_dir("bees") / ADAPTER_WEIGHTS).is_file() and doc["cache"] is False
    assert lib.index()["embeddings"].shape == (sum(d["chunks"] for d in lib.documents), 384)

    small = tmp_path / "small"
    first = add_documents(small, tiny, [str(doc_files["bees"])], AddOptions(train=FAST, with_cache=True), embedder)
    assert first[0]["cache"] and (small / "docs" / "bees" / "cache.safetensors").is_file()
    before = (small / MANIFEST).read_bytes()
    assert add_documents(small, tiny, [str(doc_files["bees"])], AddOptions(train=FAST), embedder) == []
    assert (small / MANIFEST).read_bytes() == before  # a known document is skipped, nothing rewritten
    copy = tmp_path / "bees-copy.txt"
    copy.write_text(DOCS["bees"])
    added = add_documents(
        small, tiny, [str(copy), str(doc_files["glass"]), str(doc_files["glass"])], AddOptions(train=FAST), embedder
    )
    assert [d["id"] for d in added] == ["glass"]
    grown = open_library(small)
    assert [d["id"] for d in grown.documents] == ["bees", "glass"]
    assert len(list(small.glob("index-*.safetensors"))) == 1  # the previous index is gone
    assert route(grown, PARAPHRASES["glass"], 2, embedder)[0][0] == "glass"


@pytest.mark.parametrize("where", ["embedding", "commit"])
def test_interrupted_add_leaves_the_library_as_it_was(tiny, doc_files, embedder, tmp_path, monkeypatch, where):
    """Ctrl-C after the adapter is trained (while embedding, or while committing the manifest) changes nothing."""
    from loramem.library import store as library_module

    lib = tmp_path / "lib"
    add_documents(lib, tiny, [str(doc_files["bees"])], AddOptions(train=FAST), embedder)
    before = _snapshot(lib)
    trained = []

    def counting_train(*args, **kwargs):
        trained.append(args[4])
        return train_adapter(*args, **kwargs)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(library_module, "train_adapter", counting_train)
    if where == "embedding":
        monkeypatch.setattr(type(embedder), "encode", interrupt)
    else:
        monkeypatch.setattr(library_module, "_write_manifest", interrupt)
    with pytest.raises(KeyboardInterrupt):
        add_documents(lib, tiny, [str(doc_files["glass"]), str(doc_files["stars"])], AddOptions(train=FAST), embedder)
    assert len(trained) == (1 if where == "embedding" else 2)  # it was interrupted after training
    assert _snapshot(lib) == before
    assert not [p for p in lib.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()

    # A killed add leaves unreferenced files; the next add sweeps them away.
    (lib / ".add-killed.tmp" / "x").mkdir(parents=True)
    (lib / "docs" / "orphan").mkdir()
    (lib / "index-0000000000000000.safetensors").write_bytes(b"x")
    add_documents(lib, tiny, [str(doc_files["glass"])], AddOptions(train=FAST), embedder)
    assert sorted(p.name for p in (lib / "docs").iterdir()) == ["bees", "glass"]
    assert sorted(p.name for p in lib.iterdir()) == sorted(["docs", MANIFEST, open_library(lib).manifest["index"]])


def test_refuses_another_base_model(tiny, other_tiny_dir, doc_files, embedder, tmp_path):
    lib = tmp_path / "lib"
    add_documents(lib, tiny, [str(doc_files["bees"])], AddOptions(train=FAST), embedder)
    before = _snapshot(lib)
    other = load_model(str(other_tiny_dir))
    train_adapter(other, DOCS["glass"], [], tmp_path / "other", FAST)
    with pytest.raises(IncompatibleArtifactError, match="another base model"):
        add_documents(lib, tiny, [str(doc_files["glass"])], AddOptions(adapter=str(tmp_path / "other")), embedder)
    with pytest.raises(IncompatibleArtifactError, match="another base model"):
        add_documents(lib, other, [str(doc_files["glass"])], AddOptions(train=FAST), embedder)
    assert _snapshot(lib) == before

    result = run_cli("library", "add", str(lib), str(doc_files["glass"]), "--adapter", str(tmp_path / "other"))
    assert "another base model" in one_line_error(result) and result.returncode == 3
    result = run_cli("library", "add", str(lib), str(doc_files["glass"]), "--model", str(other_tiny_dir))
    assert "another base model" in one_line_error(result) and result.returncode == 3
    assert _snapshot(lib) == before

    train_adapter(tiny, DOCS["glass"], [], tmp_path / "same", FAST)  # an adapter of the library's model is copied
    added = add_documents(
        lib, tiny, [str(doc_files["glass"])], AddOptions(adapter=str(tmp_path / "same"), doc_id="glassworks"), embedder
    )
    assert added[0]["id"] == "glassworks" and added[0]["adapter"]["origin"] == str(tmp_path / "same")
    with pytest.raises(LoramemError, match="another document"):
        add_documents(lib, tiny, [str(doc_files["stars"])], AddOptions(adapter=str(tmp_path / "same")), embedder)


def test_cli_library_and_route(tiny_dir, doc_files, tmp_path):
    lib = tmp_path / "lib"
    added = run_cli(
        "library",
        "add",
        str(lib),
        str(doc_files["bees"]),
        str(doc_files["railway"]),
        "--format",
        "ntp",
        "--steps",
        "1",
        "--rank",
        "2",
        "--with-cache",
        "--model",
        str(tiny_dir),
        "--json",
    )
    assert added.returncode == 0, added.stderr.decode()
    listed = run_cli("library", "ls", str(lib), "--json")
    records = json.loads(listed.stdout)
    assert [r["id"] for r in records] == ["bees", "railway"] and all(r["cache"] for r in records)
    assert json.loads(added.stdout) == records
    table = run_cli("library", "ls", str(lib)).stdout.decode()
    assert "railway" in table and "rank 2, ntp" in table
    routed = run_cli("route", str(lib), PARAPHRASES["railway"], "--top-k", "2", "--json")
    assert routed.returncode == 0, routed.stderr.decode()
    assert [d["id"] for d in json.loads(routed.stdout)["documents"]] == ["railway", "bees"]
    plain = run_cli("route", str(lib), PARAPHRASES["bees"], "-k", "1")
    assert plain.stdout.decode().split("\t")[0] == "bees"

    assert "between 1 and the library's 2" in one_line_error(run_cli("route", str(lib), "honey?", "--top-k", "3"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in one_line_error(run_cli("route", str(empty), "honey?"))
    assert "not found" in one_line_error(run_cli("route", str(tmp_path / "nowhere"), "honey?"))


def test_adding_a_document_already_in_the_library_says_so(library, tiny, doc_files, embedder, capsys, monkeypatch):
    monkeypatch.setenv("LORAMEM_QUIET", "1")  # the reason is a warning, shown even when the log is quiet
    capsys.readouterr()
    source = next(iter(doc_files.values()))
    assert add_documents(library, tiny, [str(source)], AddOptions(train=FAST), embedder) == []
    err = " ".join(capsys.readouterr().err.split())
    assert f"{source} is already in the library (as {next(iter(doc_files))}); not added again" in err


def test_a_question_the_context_cannot_hold_is_refused_before_routing(library, tiny, embedder, monkeypatch):
    from loramem.library import qa

    def no_routing(*args, **kwargs):
        raise AssertionError("routed a question that cannot be answered")

    monkeypatch.setattr(qa, "route", no_routing)
    with pytest.raises(LoramemError, match="does not fit the model's 1024-token context"):
        qa.ask_library_batch(tiny, library, ["Who?", "Who keeps the bees? " * 300], embedder=embedder)
