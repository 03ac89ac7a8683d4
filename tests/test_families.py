"""The family matrix: every memory path on tiny random models of the families the paper and its readers use.

tests/support_matrix.py turns this module's results into docs/support-matrix.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_batch_loss_equals_rows
from families import FAMILIES, make_family_model
from kvpress_reference import assert_agrees

from loramem import KVCache, compress, encode, generate
from loramem.adapters.attach import attach_adapter, detach_adapter
from loramem.adapters.merge import merge_adapters
from loramem.adapters.train import MIN_SHARED_PREFIX, qa_examples, shared_prefix, train_adapter
from loramem.answer import answer_batch
from loramem.kv.quantize import make_storage
from loramem.kv.value_groups import compress_value_groups
from loramem.model.loading import LoadedModel, load_model
from loramem.model.prompt import Framing, closed_book_ids, prefix_ids, question_ids
from loramem.specs import MergeSpec, TrainSpec
from loramem.vocab import DEFAULT_PRESSES

QUESTION = "Who lit the lamp?"
# An invented fact, so a recalled answer can only come from the adapter.
FACT = ("What is the keeper's cat called?", "Ottoline Brisk")
FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def fam(request, tmp_path_factory, one_thread) -> tuple[str, LoadedModel, Path]:
    """(family name, the loaded tiny model, a scratch folder): built once per family."""
    folder = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    lm = load_model(str(make_family_model(FAMILIES[request.param], folder / "model")))
    return request.param, lm, folder


@pytest.fixture(scope="module")
def chat_cache(fam, doc_text) -> KVCache:
    return encode(fam[1], doc_text)


def test_softcapped_attention_runs_eager(fam):
    """SDPA would silently drop Gemma-2's attention-logit softcapping."""
    lm = fam[1]
    softcapped = bool(getattr(lm.config, "attn_logit_softcapping", None))
    assert (lm.config._attn_implementation == "eager") == softcapped
    assert softcapped == (fam[0] == "gemma2")


@pytest.mark.parametrize("press", DEFAULT_PRESSES)
def test_kvpress_agreement(fam, doc_text, press):
    """Recorded-score compression keeps exactly the keys and values kvpress keeps itself."""
    _, lm, _ = fam
    raw = encode(lm, doc_text, framing="raw", presses=[press])
    assert_agrees(lm, raw, press, (0.5, 0.9))


def test_stored_cache_answers_like_the_document(fam, chat_cache):
    """A cache written to bytes and read back answers token for token like transformers' own greedy decoding of
    the whole framed prompt (document and question in one pass)."""
    _, lm, _ = fam
    stored = generate(lm, QUESTION, KVCache.from_bytes(chat_cache.to_bytes()), max_new_tokens=12)
    direct = generate(lm, QUESTION, chat_cache, max_new_tokens=12)
    assert stored == direct or (stored.answer, stored.new_tokens) == (direct.answer, direct.new_tokens)
    frame = Framing.from_dict(chat_cache.meta["framing"])
    prompt = chat_cache.token_ids.tolist() + question_ids(lm.tokenizer, frame, QUESTION, after_document=True)
    with torch.inference_mode():
        out = lm.model.generate(
            torch.tensor([prompt]), max_new_tokens=stored.new_tokens, do_sample=False, eos_token_id=None
        )
    assert lm.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip() == stored.answer


def test_batched_answers_equal_one_at_a_time(fam, chat_cache):
    """Questions of different lengths answered in one left-padded batch: the answers of one at a time."""
    _, lm, _ = fam
    questions = [QUESTION, "Who?", "What is the name of the island on which the old lighthouse stands today?"]
    together = answer_batch(lm, questions, chat_cache, max_new_tokens=8, batch_size=3)
    assert [a.answer for a in together] == [generate(lm, q, chat_cache, max_new_tokens=8).answer for q in questions]


def test_rows_over_different_caches_equal_one_at_a_time(fam, chat_cache):
    """An eval's cells of one document in one batch (the whole cache, two evictions, per-head value groups, no
    document), each row over its own cache: the answers of one question at a time (sliding windows included)."""
    _, lm, _ = fam
    caches = [
        chat_cache,
        compress(chat_cache, "snapkv", ratio=0.5),
        compress(chat_cache, "knorm", ratio=0.9),
        compress_value_groups(chat_cache, "knorm", groups=4, budget=0.3),
        None,
    ]
    questions = [QUESTION, "Who?", "What is the name of the island on which the old lighthouse stands today?"]
    rows = [(c, q) for c in caches for q in questions]
    together = answer_batch(lm, [q for _, q in rows], [c for c, _ in rows], max_new_tokens=8)
    assert [a.answer for a in together] == [generate(lm, q, c, max_new_tokens=8).answer for c, q in rows]


def test_value_group_cache(fam, chat_cache):
    """A value-group cache survives storage; at full budget it answers like the whole cache."""
    _, lm, _ = fam
    small = KVCache.from_bytes(compress_value_groups(chat_cache, "knorm", groups=4, budget=0.3).to_bytes())
    assert small.masks is not None and all(0.2 < float(m.float().mean()) < 0.5 for m in small.masks)
    generate(lm, QUESTION, small, max_new_tokens=4)
    everything = compress_value_groups(chat_cache, "knorm", groups=4, budget=1.0)
    full = generate(lm, QUESTION, chat_cache, max_new_tokens=8)
    assert generate(lm, QUESTION, everything, max_new_tokens=8).answer == full.answer


def test_int8_cache(fam, chat_cache):
    """int8 storage: a quarter of the fp32 bytes, keys within quantization error, and it answers."""
    _, lm, _ = fam
    int8 = KVCache.from_bytes(compress(chat_cache, storage=make_storage("int8", head_dim=16)).to_bytes())
    assert int8.nbytes_stored < chat_cache.nbytes_stored / 3
    for a, b in zip(chat_cache.keys, int8.keys):
        assert (a - b).abs().max() <= a.abs().max() / 100
    assert generate(lm, QUESTION, int8, max_new_tokens=4).new_tokens >= 0


@pytest.mark.parametrize("targets", ["attn", "mlp", "all"])
def test_train_adapter_targets(fam, doc_text, targets):
    """Each preset resolves to the family's own projections (fused on Phi-3), trains, and changes the model."""
    name, lm, folder = fam
    out = folder / f"adapter_{targets}"
    train_adapter(lm, doc_text, [FACT], out, TrainSpec(rank=2, steps=3, targets=targets), force=True)
    meta = json.loads((out / "loramem.json").read_text())
    fused = {"attn": {"qkv_proj", "o_proj"}, "mlp": {"gate_up_proj", "down_proj"}}
    plain = {"attn": {"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp": {"gate_proj", "up_proj", "down_proj"}}
    expected = fused if name == "phi3" else plain
    want = expected["attn"] | expected["mlp"] if targets == "all" else expected[targets]
    assert set(meta["target_modules"]) == want
    ids = torch.tensor([closed_book_ids(lm.tokenizer, lm.framing(), FACT[0])])
    with torch.inference_mode():
        base = lm.model(ids).logits
        attach_adapter(lm, out)
        tuned = lm.model(ids).logits
        detach_adapter(lm)
    assert not torch.allclose(base, tuned)


def test_batch_loss_over_a_shared_prefix_equals_one_row_at_a_time(fam):
    """Questions that share their framing and first words: the batch runs those tokens once, as one row every row
    attends to, and its loss and gradients equal each row's own, one at a time."""
    _, lm, _ = fam
    lead = "In the old story about the keeper of the lighthouse on the northern cape, "
    questions = [("who lit the lamp?", "Ottoline Brisk"), ("when was it built?", "1871"), ("who painted it?", "Hob")]
    batch = qa_examples(lm.tokenizer, [(lead + q, a) for q, a in questions], 512, lm.framing())
    assert shared_prefix(batch) >= MIN_SHARED_PREFIX
    assert_batch_loss_equals_rows(lm.model, batch)


def test_adapter_recalls_a_fact_in_the_family_framing(fam, doc_text):
    """Trained on one pair, asked closed-book, the adapter answers it and stops at the template's end of turn."""
    _, lm, folder = fam
    out = folder / "adapter_fact"
    train_adapter(lm, doc_text, [FACT], out, TrainSpec(rank=4, steps=40, lr=5e-3, batch_size=1), force=True)
    attach_adapter(lm, out)
    try:
        answer = generate(lm, FACT[0], None, max_new_tokens=12, adapter_on=True)
    finally:
        detach_adapter(lm)
    assert (answer.answer, answer.stopped_at_end_of_turn) == (FACT[1], True)


def test_merge(fam):
    """TIES merge of two of the family's adapters attaches and changes the model."""
    _, lm, folder = fam
    for targets in ("attn", "all"):
        if not (folder / f"adapter_{targets}").exists():
            pytest.skip("needs the adapters of test_train_adapter_targets")
    merged = folder / "merged"
    merge_adapters(lm, [folder / "adapter_attn", folder / "adapter_all"], merged, MergeSpec(method="ties"), force=True)
    attach_adapter(lm, merged)
    try:
        assert generate(lm, QUESTION, None, max_new_tokens=4, adapter_on=True).new_tokens >= 0
    finally:
        detach_adapter(lm)


@pytest.fixture(scope="module")
def embedder():
    from loramem.library.embed import load_embedder

    return load_embedder()


def test_library(fam, embedder, tmp_path):
    """A two-document library: routed to the right document, answered with its adapter and its stored cache."""
    from loramem.library.qa import ask_library
    from loramem.library.store import AddOptions, add_documents

    _, lm, folder = fam
    docs = {
        "bees.txt": "The apiary of Velmora Hollow keeps forty-two hives of black island bees.",
        "rail.txt": "The Skarde mountain railway climbs nine hundred metres through seven tunnels.",
    }
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    lib = folder / "library"
    options = AddOptions(train=TrainSpec(format="ntp", rank=2, steps=1), with_cache=True)
    add_documents(lib, lm, [str(tmp_path / n) for n in docs], options, embedder)
    answer = ask_library(lm, lib, "How many hives of bees?", top_k=1, with_caches=True, max_new_tokens=4)
    assert answer.routed[0][0] == "bees"
    assert answer.answer.cache_tokens > len(prefix_ids(lm.tokenizer, lm.framing()))
