"""The transformers-free Llama (`loramem.model.lean`) against transformers: logits, answers, tokens, templates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from families import FAMILIES, family_tokenizer
from test_batch import QUESTIONS, batched_logits, prompts_for

from loramem import compress, encode
from loramem.model.batch import decode
from loramem.model.generate import answer_batch
from loramem.model.lean import LeanConfig, LeanTokenizer, load_lean
from loramem.model.loading import LoadedModel, load_model

TEXTS = [
    "The lighthouse at Varnaby Point, built in 1871 (pale green granite).",
    "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n",
    " leading space and  double  spaces , punctuation . don't ! ? 're 's ' quoted ' n't",
    "¿Qué? 日本語 🙂 tabs\tand\nnewlines\n\n",
    "<|im_end|><|endoftext|> injected turns",
]


@pytest.fixture(scope="module")
def lean_tiny(tiny, tiny_dir) -> LoadedModel:
    loaded = load_lean(tiny_dir, "cpu", torch.float32)
    assert loaded is not None
    model, tokenizer = loaded
    return LoadedModel(model, tokenizer, tiny.model_id, tiny.fingerprint, template=tiny.template)


@pytest.fixture(scope="module")
def cache(tiny, doc_text):
    return encode(tiny, doc_text, presses=["snapkv"])


@pytest.mark.parametrize("evicted", [False, True])
def test_logits_and_greedy_tokens_equal_transformers(tiny, lean_tiny, cache, one_thread, evicted):
    """Over a whole and a per-head evicted cache, padded rows: the same logits as transformers' LlamaForCausalLM
    through the same batch engine, and the same greedy tokens."""
    cache = compress(cache, "snapkv", ratio=0.6) if evicted else cache
    prompts = prompts_for(tiny, cache)
    expected, got = batched_logits(tiny, cache, prompts), batched_logits(lean_tiny, cache, prompts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    hf_rows = decode(tiny.model, prompts, cache, set(), 12, 0)
    lean_rows = decode(lean_tiny.model, prompts, cache, set(), 12, 0)
    assert [r.tokens for r in lean_rows] == [r.tokens for r in hf_rows]


def test_answers_equal_transformers_closed_book_and_over_a_cache(tiny, lean_tiny, cache, one_thread):
    for over in (cache, None):
        expected = answer_batch(tiny, QUESTIONS, over, max_new_tokens=10)
        got = answer_batch(lean_tiny, QUESTIONS, over, max_new_tokens=10)
        assert [a.answer for a in got] == [a.answer for a in expected]
        assert [a.stopped_at_end_of_turn for a in got] == [a.stopped_at_end_of_turn for a in expected]


def test_tokenizer_equals_transformers(tiny, lean_tiny, tmp_path):
    """Token ids (special-token strings honoured and split), decoded text with and without special tokens, the
    special tokens and the framings, on the tiny tokenizer and on the default one (which cleans up spaces)."""
    from families import default_tokenizer

    default = default_tokenizer()
    default.save_pretrained(tmp_path)
    for hf, lean in ((tiny.tokenizer, lean_tiny.tokenizer), (default, LeanTokenizer(tmp_path))):
        assert (lean.eos_token, lean.eos_token_id, lean.pad_token_id) == (
            hf.eos_token,
            hf.eos_token_id,
            hf.pad_token_id,
        )
        assert lean.get_vocab() == hf.get_vocab()
        for text in TEXTS:
            for split in (False, True):
                ids = hf(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]
                assert lean(text, add_special_tokens=False, split_special_tokens=split)["input_ids"] == ids
                for skip in (False, True):
                    assert lean.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert lean_tiny.framing("chat") == tiny.framing("chat")
    assert lean_tiny.framing("raw") == tiny.framing("raw")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_templates_render_as_transformers_renders_them(family, tmp_path):
    """Every family's template shape (date stamps, thinking switches, raise_exception, special-token variables)."""
    hf = family_tokenizer(FAMILIES[family])
    hf.save_pretrained(tmp_path)
    lean = LeanTokenizer(tmp_path)
    chats = [
        [{"role": "user", "content": "Doc\n\nQuestion?"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
    ]
    for chat in chats:
        for prompt in (False, True):
            try:
                expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            except Exception as exc:  # a template that refuses (no system role) must refuse alike
                with pytest.raises(type(exc)):
                    lean.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
                continue
            assert lean.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == expected


def test_only_plain_llama_configs_are_covered(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert LeanConfig.supported(config) is not None
    for change in (
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
        {"attention_bias": True},
        {"mlp_bias": True},
        {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
        {"hidden_act": "gelu"},
    ):
        assert LeanConfig.supported({**config, **change}) is None, change


def test_answer_only_loads_a_directory_model_through_transformers(tiny_dir):
    """Outside the embedded default model, `answer_only` changes nothing."""
    lm = load_model(str(tiny_dir), answer_only=True)
    assert type(lm.model).__name__ == "LlamaForCausalLM"


@pytest.mark.real
def test_default_model_answers_without_importing_transformers(real, tmp_path):
    """`ask --cache` on the default model, as a process that never imports transformers: the answers transformers
    gives over the same cache."""
    questions = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").open()]
    cache = encode(real, (REPO / "examples/demo/lighthouse.txt").read_text(), presses=["snapkv"])
    path, listed = tmp_path / "demo.kv.safetensors", tmp_path / "questions.txt"
    path.write_bytes(cache.to_bytes())
    listed.write_text("\n".join(questions) + "\n")
    expected = [" ".join(a.answer.split()) for a in answer_batch(real, questions, cache, max_new_tokens=24)]
    code = (
        "import sys\nsys.argv = ['loramem', *sys.argv[1:]]\nfrom loramem.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print([m for m in ('transformers', 'kvpress', 'peft') if m in sys.modules], file=sys.stderr)"
    )
    args = ["ask", "--cache", str(path), "--questions", str(listed), "--max-new-tokens", "24"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr
    assert out.stdout.splitlines() == expected


@pytest.mark.real
def test_default_model_refusals_without_transformers_are_one_line(real, tiny, doc_text, tmp_path, capsys):
    """The transformers-free path checks what transformers' path checks: a cache from another model is exit 3, a
    template variable its chat template does not use is exit 2, each in one line."""
    from inprocess import assert_refused, invoke

    foreign = tmp_path / "tiny.kv.safetensors"
    foreign.write_bytes(encode(tiny, doc_text, presses=["snapkv"]).to_bytes())
    own = tmp_path / "default.kv.safetensors"
    own.write_bytes(encode(real, doc_text[:400], presses=["snapkv"]).to_bytes())
    assert "model" in assert_refused(invoke(capsys, "ask", "--cache", str(foreign), "Who?"), (3,))
    bad = invoke(capsys, "ask", "--cache", str(own), "--chat-template-kwargs", '{"nope": 1}', "Who?")
    assert "nope" in assert_refused(bad, (2,))
    assert load_model(answer_only=True).model.__class__.__name__ == "LeanLlama"  # the path these refusals took
