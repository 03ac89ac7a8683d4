"""Adapter training: PEFT layout, determinism, the model left clean, option resolution, recall on the default model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_batch_loss_equals_rows, assert_same_sums, summed_terms

from loramem.adapters.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORAMEM_META, attach_adapter, detach_adapter
from loramem.adapters.train import (
    TRAIN_QA,
    Example,
    Plateau,
    TrainSpec,
    batch_loss,
    length_groups,
    ntp_examples,
    qa_examples,
    resolve_layers,
    resolve_targets,
    train_adapter,
)
from loramem.answer import answer_batch
from loramem.errors import LoramemError
from loramem.evaluation.metrics import rouge_l
from loramem.model.loading import sha256_text
from loramem.text import normalize_answer

QA = [
    ("Who designed the lighthouse?", "Orla Quenby"),
    ("Who was the first keeper?", "Hobart Fennick"),
    ("When was the light automated?", "1988"),
]
FAST = {"rank": 4, "alpha": 8.0, "epochs": 2, "batch_size": 2}


def _logits(lm) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer("The first keeper was Hobart Fennick.")["input_ids"]])
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits


def test_output_is_a_standard_peft_adapter(tiny, tiny_dir, doc_text, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "doc.lora"
    calls = []
    summary = train_adapter(
        tiny, doc_text, QA, out, TrainSpec(**FAST), qa_file_sha256="abc", on_step=lambda *args: calls.append(args)
    )
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, LORAMEM_META, TRAIN_QA} <= {p.name for p in out.iterdir()}
    assert summary["steps"] == 4 and summary["path"] == str(out) and summary["trainable_parameters"] > 0
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]

    meta = json.loads((out / LORAMEM_META).read_text())
    assert meta["base_model"] == {"id": tiny.model_id, **tiny.fingerprint}
    assert meta["document_sha256"] == sha256_text(doc_text)
    assert meta["hyperparameters"]["rank"] == 4 and meta["format"] == "qa" and meta["qa_file_sha256"] == "abc"
    assert len(meta["loss_curve"]) == 4 and meta["final_loss"] == meta["loss_curve"][-1]
    assert meta["n_train_examples"] == 3 and meta["tokens_per_second"] > 0
    lines = [json.loads(line) for line in (out / TRAIN_QA).read_text().splitlines()]
    assert [(x["question"], x["answer"]) for x in lines] == QA

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    loaded = PeftModel.from_pretrained(base, str(out))
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    state = get_peft_model_state_dict(loaded)
    assert saved.keys() == state.keys() and len(saved) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it trained


def test_batch_loss_weighs_examples_equally_whatever_the_padding(tiny, doc_text):
    """A padded batch's loss and gradients equal the mean over its examples run one by one."""
    batch = qa_examples(tiny.tokenizer, QA, 512) + ntp_examples(tiny.tokenizer, doc_text, 16)[:1]
    assert_batch_loss_equals_rows(tiny.model, batch)


def test_a_batch_that_would_pad_much_runs_in_length_groups(tiny, doc_text, monkeypatch):
    """Two chunks and a short tail run as two forward calls (on a CPU padded tokens cost as much as real ones), with
    the loss and gradients of the padded batch: every example weighs the same, whichever group it ran in."""
    import copy

    from loramem.adapters import train

    assert length_groups([128, 31]) == [[0], [1]]  # 159 tokens in two calls, not 256 in one
    assert length_groups([56, 58, 51, 55]) == [[1, 0, 3, 2]]
    assert length_groups([31, 128, 120, 30]) == [[1, 2], [0, 3]]
    chunks = ntp_examples(tiny.tokenizer, doc_text, 24)
    batch = [chunks[0], chunks[1], Example(chunks[2].ids[:6], chunks[2].labels[:6])]  # two chunks and a tail
    model = copy.deepcopy(tiny.model).requires_grad_(True)
    calls = []
    model.model.register_forward_pre_hook(lambda module, args: calls.append(1))

    def loss_and_grads(slack: float):
        model.zero_grad()
        calls.clear()
        with monkeypatch.context() as patched:
            patched.setattr(train, "PAD_SLACK", slack)
            loss = batch_loss(model, batch, 0, "cpu")
        loss.backward()
        return len(calls), loss.detach(), [p.grad.clone() for p in model.parameters()]

    grouped_calls, grouped_loss, grouped_grads = loss_and_grads(train.PAD_SLACK)
    padded_calls, padded_loss, padded_grads = loss_and_grads(float("inf"))
    assert (grouped_calls, padded_calls) == (2, 1)
    terms = summed_terms(model, batch)
    assert_same_sums(grouped_loss, padded_loss, terms)
    for a, b in zip(grouped_grads, padded_grads):
        assert_same_sums(a, b, terms)


def test_same_seed_gives_identical_adapter_bytes(tiny, doc_text, tmp_path):
    paths = [tmp_path / name for name in ("a", "b", "c")]
    for path, seed in zip(paths, (3, 3, 4)):
        train_adapter(tiny, doc_text, QA, path, TrainSpec(**FAST, seed=seed, dropout=0.1))
    weights = [(p / ADAPTER_WEIGHTS).read_bytes() for p in paths]
    assert weights[0] == weights[1] != weights[2]


def test_model_is_clean_after_training(tiny, doc_text, tmp_path):
    before = _logits(tiny)
    train_adapter(tiny, doc_text, QA, tmp_path / "a", TrainSpec(**FAST))
    attach_adapter(tiny, tmp_path / "a")  # an attached adapter is detached before training
    train_adapter(tiny, doc_text, QA, tmp_path / "b", TrainSpec(**FAST))
    assert tiny.adapter is None and not tiny.model.training
    assert not any("lora_" in name for name, _ in tiny.model.named_modules())
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert torch.equal(_logits(tiny), before)
    adapter = attach_adapter(tiny, tmp_path / "b")  # the fingerprint still matches
    assert adapter.meta["format"] == "qa"
    detach_adapter(tiny)


def test_target_presets_follow_the_architecture(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    assert resolve_targets(tiny.model, "attn") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets(tiny.model, "mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert resolve_targets(tiny.model, "all") == resolve_targets(tiny.model, "attn") + resolve_targets(
        tiny.model, "mlp"
    )
    assert resolve_targets(tiny.model, "q_proj, v_proj") == ["q_proj", "v_proj"]
    phi3 = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    )
    assert set(resolve_targets(phi3, "attn")) == {"qkv_proj", "o_proj"}
    assert set(resolve_targets(phi3, "mlp")) == {"gate_up_proj", "down_proj"}
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    # c_proj exists in both attention and MLP, so it is named by its path inside the layer.
    assert set(resolve_targets(gpt2, "attn")) == {"c_attn", "attn.c_proj"}
    assert set(resolve_targets(gpt2, "mlp")) == {"c_fc", "mlp.c_proj"}
    with pytest.raises(LoramemError, match="unknown target module 'wq'"):
        resolve_targets(tiny.model, "q_proj,wq")


def test_layer_specs():
    assert resolve_layers(None, 30) is None
    assert resolve_layers("0-14", 30) == list(range(15))
    assert resolve_layers("0,3,5", 30) == [0, 3, 5]
    assert resolve_layers("2-3, 0", 30) == [0, 2, 3]
    assert resolve_layers("first-half", 30) == list(range(15))
    assert resolve_layers("second-half", 30) == list(range(15, 30))
    with pytest.raises(LoramemError, match="has layers 0-29"):
        resolve_layers("28-30", 30)
    for bad in ("abc", "3-1", "1,,2", "-2", "first"):
        with pytest.raises(LoramemError):
            TrainSpec(layers=bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"rank": 0},
        {"format": "chat"},
        {"epochs": 0},
        {"steps": 0},
        {"lr": 0},
        {"dropout": 1.0},
        {"chunk_size": 1024},
        {"targets": " , "},
    ],
)
def test_bad_config_values(bad):
    with pytest.raises(LoramemError):
        TrainSpec(**bad)


def test_targets_and_layers_restrict_the_adapter(tiny, doc_text, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "a"
    train_adapter(tiny, doc_text, QA, out, TrainSpec(**FAST, targets="attn", layers="1"))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["layers_to_transform"] == [1]
    keys = load_file(str(out / ADAPTER_WEIGHTS)).keys()
    assert len(keys) == 8 and all(".layers.1.self_attn." in k for k in keys)
    with pytest.raises(LoramemError, match="has layers 0-1"):
        train_adapter(tiny, doc_text, QA, tmp_path / "b", TrainSpec(**FAST, layers="0-5"))
    with pytest.raises(LoramemError, match="unknown target module"):
        train_adapter(tiny, doc_text, QA, tmp_path / "b", TrainSpec(**FAST, targets="wq"))
    assert not (tmp_path / "b").exists()


def test_refusals(tiny, doc_text, tmp_path):
    existing = tmp_path / "a"
    existing.mkdir()
    with pytest.raises(LoramemError, match="already exists"):
        train_adapter(tiny, doc_text, QA, existing, TrainSpec(**FAST))
    train_adapter(tiny, doc_text, QA, existing, TrainSpec(**FAST), force=True)
    assert (existing / ADAPTER_WEIGHTS).is_file()
    with pytest.raises(LoramemError, match="empty"):
        train_adapter(tiny, " \n", QA, tmp_path / "b", TrainSpec(**FAST))
    with pytest.raises(LoramemError, match="needs question-answer pairs"):
        train_adapter(tiny, doc_text, [], tmp_path / "b", TrainSpec(**FAST))
    with pytest.raises(LoramemError, match="over max_length"):
        train_adapter(
            tiny,
            doc_text,
            [("why " * 40 + "?", "x")],
            tmp_path / "b",
            TrainSpec(**FAST, max_length=32, chunk_size=32),
        )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("fmt", ["ntp", "mixed"])
def test_ntp_and_mixed_formats(tiny, doc_text, tmp_path, fmt):
    out = tmp_path / fmt
    summary = train_adapter(tiny, doc_text, QA, out, TrainSpec(**FAST, format=fmt, steps=3, chunk_size=64))
    meta = json.loads((out / LORAMEM_META).read_text())
    chunks = -(-len(tiny.tokenizer(doc_text)["input_ids"]) // 64)
    assert summary["steps"] == 3 and meta["format"] == fmt
    assert meta["n_train_examples"] == chunks + (len(QA) if fmt == "mixed" else 0)
    assert len((out / TRAIN_QA).read_text().splitlines()) == (len(QA) if fmt == "mixed" else 0)


def test_mixed_trains_on_the_documents_views_too(tiny, doc_text, tmp_path):
    """format mixed: QA pairs, the raw text and each view as raw text; the views are kept beside the adapter and
    counted in loramem.json; any other format refuses views."""
    from loramem.adapters.train import View
    from loramem.adapters.validate import TRAIN_VIEWS
    from loramem.data.views import read_views

    views = [
        View("summary", 0, "The lighthouse keeper Hobart Fennick kept the light for years.", "writer"),
        View("rewrite", 0, " ".join(["Orla Quenby designed the tower on the headland."] * 12), "writer"),
    ]
    out = tmp_path / "mixed"
    spec = TrainSpec(**FAST, format="mixed", steps=2, chunk_size=64)
    train_adapter(tiny, doc_text, QA, out, spec, views=views)
    meta = json.loads((out / LORAMEM_META).read_text())

    def chunks(text: str) -> int:
        return -(-len(tiny.tokenizer(text)["input_ids"]) // 64)

    assert meta["n_train_examples"] == len(QA) + chunks(doc_text) + sum(chunks(v.text) for v in views)
    assert chunks(views[1].text) > 1  # a long view is cut into chunks as the document is
    assert meta["n_views"] == {"summary": 1, "rewrite": 1} and meta["views_written_by"] == ["writer"]
    assert read_views((out / TRAIN_VIEWS).read_text()) == views
    with pytest.raises(LoramemError, match="format qa trains on no views"):
        train_adapter(tiny, doc_text, QA, tmp_path / "qa", TrainSpec(**FAST, steps=1), views=views)


def test_views_are_the_writers_and_the_same_each_time(tiny, doc_text):
    """A summary and a rewrite are asked of every passage, in passage order; what is kept is what the writer
    wrote (stripped), at least MIN_VIEW_WORDS words, and greedy decoding writes the same views again."""
    from loramem.data.synth import passages
    from loramem.data.views import MIN_VIEW_WORDS, VIEW_KINDS, document_views

    views = document_views(tiny, doc_text, max_new_tokens=12)
    assert views and views == document_views(tiny, doc_text, max_new_tokens=12)
    n = len(passages(doc_text))
    order = [(index, kind) for index in range(n) for kind in VIEW_KINDS]
    assert [(v.passage, v.kind) for v in views] == [k for k in order if k in {(v.passage, v.kind) for v in views}]
    assert all(len(v.text.split()) >= MIN_VIEW_WORDS and v.text == v.text.strip() for v in views)
    assert {v.written_by for v in views} <= {tiny.model_id}


def test_qa_loss_decreases(tiny, doc_text, tmp_path):
    """The tiny model's small random output layer bounds its logits, so the loss cannot go near zero."""
    summary = train_adapter(tiny, doc_text, QA, tmp_path / "a", TrainSpec(rank=8, lr=1e-2, epochs=20))
    curve = json.loads((tmp_path / "a" / LORAMEM_META).read_text())["loss_curve"]
    assert summary["final_loss"] < 0.9 * curve[0] and max(curve[-5:]) < min(curve[:2])


# An invented document: nothing in it can come from pretraining.
HARBOUR = """Marisol Okonkwo-Vance is the harbour master of Quillhaven, a fishing town on the island of Brevik.
She was born in 1967 in the village of Tarrow Glen. Before becoming harbour master she spent eleven years
as a diver for the salvage company Halvard & Pike. Her office is on the top floor of the old customs house,
which is painted bright orange. Every morning at 5:40 she rings a brass bell named Old Ophelia to open the harbour.
Quillhaven has 312 registered fishing boats, and its main catch is the silver-striped lanternfish.
The harbour master's dog, a grey lurcher called Biscuit, sleeps under her desk."""
HARBOUR_QA = [
    ("Who is the harbour master of Quillhaven?", "Marisol Okonkwo-Vance"),
    ("In which year was Marisol Okonkwo-Vance born?", "1967"),
    ("In which village was Marisol Okonkwo-Vance born?", "Tarrow Glen"),
    ("For which salvage company did Marisol Okonkwo-Vance work?", "Halvard & Pike"),
    ("How many years did Marisol Okonkwo-Vance work as a diver?", "eleven years"),
    ("What colour is the old customs house of Quillhaven?", "bright orange"),
    ("What is the name of the brass bell rung in Quillhaven harbour?", "Old Ophelia"),
    ("How many registered fishing boats does Quillhaven have?", "312"),
    ("What is the main catch of Quillhaven?", "the silver-striped lanternfish"),
    ("What is the name of the harbour master's dog?", "Biscuit"),
]
# The same facts asked in other words; none of these questions is trained on.
HARBOUR_PARAPHRASES = [
    ("Who runs the harbour in Quillhaven?", "Marisol Okonkwo-Vance"),
    ("What year was Quillhaven's harbour master born?", "1967"),
    ("Which village is the harbour master of Quillhaven from?", "Tarrow Glen"),
    ("What is the brass bell in Quillhaven called?", "Old Ophelia"),
    ("How many fishing boats are registered in Quillhaven?", "312"),
    ("What do Quillhaven's fishermen mainly catch?", "the silver-striped lanternfish"),
    ("What is the harbour master's dog called?", "Biscuit"),
    ("Which company did the Quillhaven harbour master dive for?", "Halvard & Pike"),
]


def _answers(lm, pairs, adapter_on):
    return answer_batch(lm, [q for q, _ in pairs], None, adapter_on=adapter_on, max_new_tokens=12)


def _mean_rouge(answers, pairs) -> float:
    return sum(rouge_l(a.answer, gold) for a, (_, gold) in zip(answers, pairs)) / len(pairs)


@pytest.mark.real
def test_document_adapter_recalls_invented_facts(real, tmp_path):
    """QA training on the default model answers paraphrased questions closed-book; the base model cannot, and an
    adapter trained on the raw text (NTP) barely can: QA supervision beats raw text, as the seeds report."""
    summary = train_adapter(real, HARBOUR, HARBOUR_QA, tmp_path / "qa", TrainSpec(format="qa"))
    base = _mean_rouge(_answers(real, HARBOUR_PARAPHRASES, False), HARBOUR_PARAPHRASES)
    attach_adapter(real, tmp_path / "qa")
    tuned = _mean_rouge(_answers(real, HARBOUR_PARAPHRASES, True), HARBOUR_PARAPHRASES)
    trained = _answers(real, HARBOUR_QA, True)
    correct = sum(normalize_answer(a.answer) == normalize_answer(gold) for a, (_, gold) in zip(trained, HARBOUR_QA))
    train_adapter(real, HARBOUR, [], tmp_path / "ntp", TrainSpec(format="ntp"))  # detaches the qa adapter
    attach_adapter(real, tmp_path / "ntp")
    ntp = _mean_rouge(_answers(real, HARBOUR_PARAPHRASES, True), HARBOUR_PARAPHRASES)
    detach_adapter(real)
    print(
        f"\nROUGE-L on paraphrases: base {base:.3f}, qa adapter {tuned:.3f}, ntp adapter {ntp:.3f}; "
        f"trained questions {correct}/{len(HARBOUR_QA)}; qa training {summary['seconds']:.1f} s"
    )
    assert tuned >= base + 0.3
    assert tuned >= ntp + 0.3  # measured: qa 0.625, ntp 0.049, base 0.000
    assert correct >= len(HARBOUR_QA) - 1
    assert all(a.stopped_at_end_of_turn for a in trained)


def test_switching_back_to_an_adapter_does_not_load_it_again(tiny, doc_text, tmp_path, monkeypatch):
    """Alternating adapters: each is read once while it stays loaded, switching back is set_adapter; a new one takes
    the least recently used one's layers (its weights copied in) where their layers agree, else is loaded anew;
    every output is exactly each adapter's own."""
    from peft import PeftModel

    from loramem.adapters import attach

    paths = [tmp_path / name for name in ("a", "b", "c", "d")]
    for seed, path in enumerate(paths):
        spec = {**FAST, "rank": 2} if path.name == "d" else FAST  # d's layers differ from the others'
        train_adapter(tiny, doc_text, QA[seed:] + QA[:seed], path, TrainSpec(**spec, seed=seed))
    base = _logits(tiny)
    alone = []
    for path in paths:
        attach_adapter(tiny, path)
        alone.append(_logits(tiny))
        detach_adapter(tiny)
    loads, copies = [], []
    real_load, real_copy = PeftModel.load_adapter, attach._overwrite
    monkeypatch.setattr(PeftModel, "load_adapter", lambda self, *a, **k: loads.append(a[0]) or real_load(self, *a, **k))
    monkeypatch.setattr(attach, "_overwrite", lambda *a: copies.append(str(a[2])) or real_copy(*a))
    monkeypatch.setattr(attach, "MAX_LOADED_ADAPTERS", 2)
    try:
        for index in (0, 1, 0, 1, 2, 1, 0, 3, 2):
            adapter = attach_adapter(tiny, paths[index])
            assert torch.equal(_logits(tiny), alone[index]) and adapter.path == paths[index]
            assert len(adapter.peft_model.peft_config) <= 2
    finally:
        detach_adapter(tiny)
    # a (through from_pretrained) and b are loaded once; c takes a's layers (least recently used), a takes c's
    # back; d (another rank) replaces b's, and c takes a's
    assert loads == [str(paths[0]), str(paths[1]), str(paths[3])]
    assert copies == [str(paths[2]), str(paths[0]), str(paths[2])]
    assert torch.equal(_logits(tiny), base)


@pytest.mark.real
def test_mixed_format_writes_views_on_the_default_model(tmp_path):
    """`train-adapter --format mixed` on the default model: it writes a summary and a rewrite of the document's
    passages (kept in train_views.jsonl, by the model itself), each naming what its passage names, and trains on
    them beside the QA pairs and the text."""
    from conftest import run_cli

    from loramem.adapters.validate import TRAIN_VIEWS
    from loramem.data.synth import passages
    from loramem.data.views import read_views

    doc, qa = tmp_path / "doc.txt", tmp_path / "qa.jsonl"
    doc.write_text(HARBOUR)
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in HARBOUR_QA))
    done = run_cli(
        "train-adapter", str(doc), "--qa", str(qa), "--format", "mixed", "-o", str(tmp_path / "a"), "--steps", "1"
    )
    assert done.returncode == 0, done.stderr.decode()
    views = read_views((tmp_path / "a" / TRAIN_VIEWS).read_text())
    meta = json.loads((tmp_path / "a" / LORAMEM_META).read_text())
    assert {v.kind for v in views} == {"summary", "rewrite"} and meta["n_views"]["rewrite"] >= 1
    assert meta["views_written_by"] == ["SmolLM2-135M-Instruct"]
    chunks = passages(HARBOUR)
    for view in views:  # measured: every view names people or places of its own passage
        names = {w.strip(".,'") for w in view.text.split() if w[:1].isupper() and len(w) > 3}
        assert any(name in chunks[view.passage] for name in names), view


@pytest.mark.real
def test_train_batch_size_flag_on_the_default_model(tmp_path):
    """`--train-batch-size` sets the training batch of a real adapter; the old `--batch-size` spelling still does,
    with a deprecation warning; a bad value is one line, exit 2, before the model loads."""
    from conftest import run_cli

    doc, qa = tmp_path / "doc.txt", tmp_path / "qa.jsonl"
    doc.write_text(HARBOUR)
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in HARBOUR_QA))
    for flag, folder in (("--train-batch-size", "new"), ("--batch-size", "old")):
        done = run_cli(
            "train-adapter", str(doc), "--qa", str(qa), "-o", str(tmp_path / folder), flag, "2", "--steps", "1"
        )
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads((tmp_path / folder / LORAMEM_META).read_text())["hyperparameters"]["batch_size"] == 2
        assert ("deprecated" in done.stderr.decode()) == (flag == "--batch-size")
    refused = run_cli(
        "train-adapter", str(doc), "--qa", str(qa), "-o", str(tmp_path / "bad"), "--train-batch-size", "0"
    )
    err = refused.stderr.decode().strip().splitlines()
    assert refused.returncode == 2 and err == ["error: --train-batch-size: must be at least 1 (got 0)"]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "losses,reached",
    [
        ([1.0, 1.0, 1.0], False),  # two epochs without a fall: patience 3 not yet used up
        ([1.0, 1.0, 1.0, 1.0], True),  # flat for three epochs
        ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], False),  # still falling by more than 5% an epoch
        ([1.0, 0.99, 0.98, 0.97], True),  # falling, but by less than min_delta of the best: a plateau
        ([1.0, 0.99, 0.98, 0.94], False),  # small falls that add up to min_delta count as falling
        ([1.0, 0.5, 0.019], True),  # under the floor
        ([1.0, 0.5, 0.6, 0.7, 0.4], False),  # a new best resets the count
        ([], False),
    ],
)
def test_plateau_rule(losses, reached):
    assert Plateau(patience=3, min_delta=0.05, floor=0.02).reached(losses) is reached


def test_training_stops_when_the_loss_is_flat_and_respects_the_cap(tiny, doc_text, tmp_path):
    """A learning rate too small to move the loss is a plateau: training stops after patience + 1 epochs; a loss
    that never plateaus under the rule trains to the cap; without a rule the epochs are trained as before."""
    config = TrainSpec(rank=2, alpha=4.0, epochs=10, batch_size=2, lr=1e-9)  # 3 pairs: 2 steps an epoch
    flat = train_adapter(tiny, doc_text, QA, tmp_path / "flat", config, stop=Plateau(patience=2, min_delta=0.01))
    assert flat["steps"] == (2 + 1) * 2 and flat["stopped_early"]
    capped = train_adapter(
        tiny, doc_text, QA, tmp_path / "cap", config.replace(epochs=3), stop=Plateau(patience=5, min_delta=0.01)
    )
    assert capped["steps"] == 3 * 2 and not capped["stopped_early"]
    plain = train_adapter(tiny, doc_text, QA, tmp_path / "plain", config.replace(epochs=4))
    assert plain["steps"] == 4 * 2 and not plain["stopped_early"]
    meta = json.loads((tmp_path / "flat" / LORAMEM_META).read_text())
    assert len(meta["loss_curve"]) == 6 and meta["stopped_early"]


def test_training_continues_while_the_loss_falls(tiny, doc_text, tmp_path):
    """One step an epoch (3 pairs, batch 4): the loop stops at the first epoch the rule, applied to its curve, holds."""
    config = TrainSpec(rank=8, lr=1e-2, epochs=6)
    falling = train_adapter(tiny, doc_text, QA, tmp_path / "a", config, stop=Plateau(patience=2, min_delta=0))
    curve = json.loads((tmp_path / "a" / LORAMEM_META).read_text())["loss_curve"]
    assert falling["steps"] == 6 and not falling["stopped_early"] and min(curve) < 0.95 * curve[0], curve
    assert not any(Plateau(patience=2, min_delta=0).reached(curve[:epoch]) for epoch in range(1, 6))
    first = next(epoch for epoch in range(1, 6) if Plateau(patience=1, min_delta=0).reached(curve[:epoch]))
    impatient = train_adapter(tiny, doc_text, QA, tmp_path / "b", config, stop=Plateau(patience=1, min_delta=0))
    assert impatient["steps"] == first and impatient["stopped_early"]
