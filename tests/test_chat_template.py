"""Chat-template control: thinking off by default, --chat-template-kwargs recorded and checked, dates pinned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from families import CHATML_TEMPLATE, FAMILIES, family_tokenizer, make_family_model
from test_cli import one_line_error

from loramem import IncompatibleArtifactError, LoramemError, encode, load_model
from loramem.adapters.attach import attach_adapter
from loramem.adapters.train import train_adapter
from loramem.evaluation.metrics import score_answer
from loramem.kv.cache import check_compatible
from loramem.model.prompt import PINNED_DATE
from loramem.specs import TrainSpec
from loramem.text import strip_thinking

THINK_ON = '{"enable_thinking": true}'


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return make_family_model(FAMILIES["qwen3"], tmp_path_factory.mktemp("qwen3") / "model")


@pytest.fixture(scope="module")
def chatml_dir(qwen3_dir, tmp_path_factory) -> Path:
    """The same weights and tokenizer with a plain ChatML template (no thinking switch)."""
    folder = tmp_path_factory.mktemp("chatml") / "model"
    shutil.copytree(qwen3_dir, folder)
    family_tokenizer(FAMILIES["qwen3"], template=CHATML_TEMPLATE).save_pretrained(folder)
    return folder


def _question_tokens(model: Path, doc: Path, *extra: str) -> int:
    done = run_cli("ask", "--json", "--doc", str(doc), "--max-new-tokens", "2", "--model", str(model), *extra, "Who?")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)["question_tokens"]


def test_thinking_template_frames_an_empty_think_block_by_default(qwen3_dir, chatml_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lamp was lit by Ada Marr in 1871.")
    think = len(family_tokenizer(FAMILIES["qwen3"])("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"])
    plain = _question_tokens(chatml_dir, doc)
    assert _question_tokens(qwen3_dir, doc) == plain + think
    assert _question_tokens(qwen3_dir, doc, "--chat-template-kwargs", THINK_ON) == plain


def test_kwargs_are_recorded_and_checked(qwen3_dir, doc_text, tmp_path):
    lm = load_model(str(qwen3_dir))
    cache = encode(lm, doc_text)
    assert cache.meta["model"]["chat_template_kwargs"] == '{"enable_thinking": false}'
    thinking = load_model(str(qwen3_dir), chat_template_kwargs=THINK_ON)
    with pytest.raises(IncompatibleArtifactError, match="chat-template kwargs"):
        check_compatible(cache, thinking.fingerprint)
    out = tmp_path / "adapter"
    train_adapter(lm, doc_text, [("Who lit the lamp?", "Ada")], out, TrainSpec(rank=2, steps=1))
    assert json.loads((out / "loramem.json").read_text())["base_model"]["chat_template_kwargs"] == (
        '{"enable_thinking": false}'
    )
    with pytest.raises(IncompatibleArtifactError, match="enable_thinking"):
        attach_adapter(thinking, out)
    path = tmp_path / "c.safetensors"
    path.write_bytes(cache.to_bytes())
    done = run_cli("ask", "--cache", str(path), "--model", str(qwen3_dir), "--chat-template-kwargs", THINK_ON, "Who?")
    assert done.returncode == 3
    one_line_error(done)


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"enable_thinkng": false}', "does not use 'enable_thinkng'"),
        ("[true]", "must be a JSON object"),
        ("{oops", "not valid JSON"),
        ('{"add_generation_prompt": false}', "cannot set add_generation_prompt"),
    ],
)
def test_bad_kwargs_are_refused(qwen3_dir, bad, message):
    with pytest.raises(LoramemError, match=message):
        load_model(str(qwen3_dir), chat_template_kwargs=bad)


def test_bad_kwargs_on_the_command_line(tiny_dir, tmp_path):
    """A template without the variable (the tiny ChatML model has no thinking switch): exit 2, one line."""
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text.")
    done = run_cli("encode", str(doc), "-o", str(tmp_path / "c.safetensors"), "--model", str(tiny_dir),
                   "--chat-template-kwargs", THINK_ON)  # fmt: skip
    assert done.returncode == 2
    assert "enable_thinking" in one_line_error(done)


def test_date_stamped_template_is_pinned(tmp_path, doc_text):
    lm = load_model(str(make_family_model(FAMILIES["llama3"], tmp_path / "llama3")))
    assert "Today Date: 26 Jul 2024\n" in lm.framing().prefix
    cache = encode(lm, doc_text)
    assert cache.meta["model"]["chat_template_date"] == PINNED_DATE
    assert cache.meta["framing"]["prefix"] == lm.framing().prefix
    dated = load_model(str(tmp_path / "llama3"), chat_template_kwargs='{"date_string": "01 Jan 2025"}')
    assert "Today Date: 01 Jan 2025\n" in dated.framing().prefix
    with pytest.raises(IncompatibleArtifactError, match="date_string"):
        check_compatible(cache, dated.fingerprint)


def test_old_artifacts_without_a_record_still_load(tiny):
    """Made before template variables were recorded, on a template without any: accepted."""
    from loramem.model.prompt import check_template_record

    check_template_record({"model": tiny.fingerprint["model"]}, tiny.fingerprint, "old cache")


@pytest.mark.parametrize(
    "raw, answer",
    [
        ("<think>\nThe keeper... maybe Ada.\n</think>\n\nAda Marr", "Ada Marr"),
        ("<think>still reasoning about Ada Marr", ""),
        ("Ada Marr", "Ada Marr"),
    ],
)
def test_think_blocks_are_not_scored(raw, answer):
    assert strip_thinking(raw) == answer
    assert score_answer(raw, "Ada Marr")["exact_match"] == float(answer == "Ada Marr")


@pytest.mark.parametrize(
    "template, words",
    [
        ("{{ raise_exception('Conversation roles must alternate system/user') }}", "cannot frame a question"),
        ("{% for m in messages %}{{ m['content'] | lower }}{% endfor %}", "rewrites or repeats"),
        ("{% for m in messages %}{{ m['content'] ~ m['content'] }}{% endfor %}", "rewrites or repeats"),
        ("{% for m in messages %}{{ m['content'].split('\\n\\n') | reverse | join('\\n\\n') }}{% endfor %}",
         "question before the document"),
    ],
)  # fmt: skip
def test_templates_that_cannot_frame_are_refused(template, words):
    """A combination that cannot work says so in one line and points to the raw framing (the CLI names the flag)."""
    from loramem.model.prompt import Framing

    tok = family_tokenizer(FAMILIES["mistral"], template=template)
    with pytest.raises(LoramemError, match=words) as caught:
        Framing.for_tokenizer(tok)
    assert str(caught.value).startswith("framing: ") and "use raw" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert Framing.for_tokenizer(tok, "raw").style == "raw"
