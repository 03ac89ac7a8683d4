"""End to end on the embedded default model (SmolLM2-135M-Instruct): encode, compress, ask, kvpress."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_DOC, REPO, run_cli, run_process
from kvpress_reference import assert_keeps_what_kvpress_keeps, kvpress_prefills

from loramem import KVCache, compress, encode, generate
from loramem.vocab import DEFAULT_PRESSES

pytestmark = pytest.mark.real

RATIOS = (0.25, 0.5, 0.9)
# Long enough (> 700 tokens) that at ratio 0.9 SnapKV keeps more than its 64-token window.
LONG_DOC = "\n\n".join(
    [DEMO_DOC.read_text()]
    + [json.loads(line)["document"] for line in (REPO / "examples" / "fiction.jsonl").read_text().splitlines()[:3]]
)


@pytest.fixture(scope="module")
def raw_cache(real):
    return encode(real, LONG_DOC, framing="raw")


@pytest.fixture(scope="module")
def kvpress_caches(real, raw_cache):
    """kvpress's own compressed prefill for each default press at each ratio (one forward pass feeds them all)."""
    settings = [(press, ratio) for press in DEFAULT_PRESSES for ratio in RATIOS]
    return dict(zip(settings, kvpress_prefills(real, raw_cache, settings)))


@pytest.mark.parametrize("press", DEFAULT_PRESSES)
def test_agrees_with_kvpress_on_default_model(raw_cache, kvpress_caches, press):
    assert raw_cache.n_tokens > 700
    for ratio in RATIOS:
        assert_keeps_what_kvpress_keeps(raw_cache, press, ratio, kvpress_caches[(press, ratio)])


def test_pipeline_answers_from_the_document(tmp_path):
    """encode, compress, ask: with the cache the model finds the keeper; then compress | ask through real processes."""
    kv, small = tmp_path / "doc.kv.safetensors", tmp_path / "doc.r0.safetensors"
    assert run_cli("encode", str(DEMO_DOC), "-o", str(kv)).returncode == 0
    assert run_cli("compress", str(kv), "--ratio", "0", "-o", str(small)).returncode == 0
    result = run_cli("ask", "--cache", str(small), "What was the name of the first keeper?", "--json")
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    assert "Fennick" in answer["answer"]
    assert answer["stopped_at_end_of_turn"]

    piped = run_process("compress", str(kv), "--press", "knorm", "--ratio", "0.9")
    asked = run_process("ask", "--cache", "-", "Who designed the lighthouse?", input=piped.stdout)
    assert asked.returncode == 0 and asked.stdout.strip()


def test_ask_doc_equals_ask_cache(real, tmp_path):
    """The cache goes through its file, as `ask --cache` reads it, and answers as a fresh prefill does."""
    document = DEMO_DOC.read_text()
    stored = tmp_path / "doc.kv.safetensors"
    stored.write_bytes(encode(real, document).to_bytes())
    question = "In which year was the light automated?"
    from_cache = generate(real, question, KVCache.load(stored), max_new_tokens=16)
    fresh = generate(real, question, encode(real, document), max_new_tokens=16)
    assert from_cache.answer == fresh.answer
    assert "1988" in from_cache.answer


def test_no_context_endpoint_loses_the_fact(real):
    cache = encode(real, DEMO_DOC.read_text(), presses=["snapkv"])
    empty = compress(cache, "snapkv", ratio=1.0)
    assert empty.kept_per_layer[0] == cache.meta["n_protected"]
    answer = generate(real, "What was the name of the first keeper?", empty, max_new_tokens=16)
    assert "Fennick" not in answer.answer


def test_tiny_cache_refused_by_default_model(tiny_dir, tmp_path):
    kv = tmp_path / "tiny.safetensors"
    assert run_cli("encode", str(DEMO_DOC), "-o", str(kv), "--model", str(tiny_dir)).returncode == 0
    result = run_cli("ask", "--cache", str(kv), "Who?")
    assert result.returncode == 3 and b"another model" in result.stderr


def test_new_options_on_default_model_refuse_bad_input_in_one_line(tmp_path):
    """The default model's template takes no `enable_thinking`; batch settings must be positive."""
    kv = tmp_path / "doc.safetensors"
    assert run_cli("encode", str(DEMO_DOC), "-o", str(kv)).returncode == 0
    unused = run_cli("ask", "--cache", str(kv), "--chat-template-kwargs", '{"enable_thinking": false}', "Who?")
    assert unused.returncode == 2 and unused.stderr.decode().count("\n") == 1
    assert b"does not use 'enable_thinking'" in unused.stderr
    for flag in ("--batch-size", "--max-batch-tokens"):
        bad = run_cli("ask", "--cache", str(kv), flag, "0", "Who?")
        assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1, bad.stderr
    answer = run_cli("ask", "--cache", str(kv), "--batch-size", "2", "--max-batch-tokens", "100000", "Who?")
    assert answer.returncode == 0 and answer.stdout.strip()


def test_probe_capacity_stores_invented_facts_on_default_model(tmp_path):
    """probe capacity on the default model: a rank-8 adapter learns five invented phone numbers it cannot know."""
    result = run_cli(
        "probe",
        "capacity",
        "--out",
        str(tmp_path / "probe"),
        "--ranks",
        "8",
        "--facts",
        "5",
        "--epochs",
        "15",
        "--json",
    )
    assert result.returncode == 0, result.stderr.decode()
    (row,) = json.loads(result.stdout)["rows"]
    assert row["trainable_parameters"] == 8 * 305_280  # all linear layers: 30 x 10,176 per rank
    assert row["recall"] >= 0.6, row  # measured 1.0 (5 of 5); the numbers are drawn at random
    assert (tmp_path / "probe" / "capacity.png").read_bytes().startswith(b"\x89PNG")
