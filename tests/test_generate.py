"""Answering from a cache: equal to a fresh full-prompt generation, and equal to kvpress's own decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from loramem import compress, encode, generate
from loramem.kv.presses import make_kvpress
from loramem.model.prompt import Framing, question_ids, stop_token_ids

QUESTION = "Who designed the lighthouse?"


def reference_tokens(lm, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from transformers' own generate over the whole prompt (no stored cache)."""
    with torch.inference_mode():
        out = lm.model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt_ids) :].tolist()


def test_stored_cache_answers_like_a_fresh_prefill(tiny, doc_text):
    cache = encode(tiny, doc_text)
    answer = generate(tiny, QUESTION, cache, max_new_tokens=12)
    frame = Framing.from_dict(cache.meta["framing"])
    prompt = cache.token_ids.tolist() + question_ids(tiny.tokenizer, frame, QUESTION, after_document=True)
    expected = reference_tokens(tiny, prompt, 12)
    n = answer.new_tokens
    assert answer.answer == tiny.tokenizer.decode(expected[:n], skip_special_tokens=True).strip()
    if answer.stopped_at_end_of_turn:
        assert expected[n] in stop_token_ids(tiny.tokenizer, frame, tiny.model.generation_config)
    assert answer.cache_tokens == cache.n_tokens


def test_compressed_cache_decodes_like_kvpress(tiny, doc_text):
    """Same kept states and the question at the original positions: kvpress's pipeline logits."""
    cache = encode(tiny, doc_text, framing="raw")
    small = compress(cache, "snapkv", ratio=0.75)
    frame = Framing.from_dict(cache.meta["framing"])
    q = question_ids(tiny.tokenizer, frame, QUESTION, after_document=True)
    kv = DynamicCache()
    with torch.inference_mode():
        with make_kvpress("snapkv", 0.75)(tiny.model):
            tiny.model.model(input_ids=cache.token_ids[None], past_key_values=kv, use_cache=True)
        position = torch.arange(cache.n_tokens, cache.n_tokens + len(q))[None]
        expected = tiny.model(input_ids=torch.tensor([q]), past_key_values=kv, position_ids=position).logits[0, -1]
        ours = tiny.model(
            input_ids=torch.tensor([q]), past_key_values=small.to_dynamic_cache(), position_ids=position
        ).logits[0, -1]
    assert torch.allclose(ours, expected, atol=1e-5)
    assert small.kept_per_layer[0] < cache.n_tokens


def test_answer_stops_and_reports_timings(tiny, doc_text):
    answer = generate(tiny, QUESTION, encode(tiny, doc_text), max_new_tokens=5)
    assert answer.new_tokens <= 5
    assert answer.time_to_first_token_seconds > 0 and answer.question_tokens > 0


def test_closed_book_question_needs_no_cache(tiny):
    answer = generate(tiny, QUESTION, None, max_new_tokens=4)
    assert answer.cache_tokens == 0 and answer.document_tokens == 0


def test_a_question_the_context_cannot_hold_is_refused_before_decoding(tiny, doc_text):
    from loramem.answer import answer_batch
    from loramem.errors import LoramemError

    cache = encode(tiny, doc_text[:400])
    long = "Who kept the light on the northern rock? " * 200
    with pytest.raises(LoramemError, match=r"question 'Who kept.*' is \d+ tokens after a \d+-token cache"):
        answer_batch(tiny, ["Who?", long], cache, max_new_tokens=2)
    with pytest.raises(LoramemError, match="does not fit the model's 1024-token context"):
        answer_batch(tiny, [long], None, max_new_tokens=2)


def test_max_new_tokens_is_cut_to_the_room_left_in_the_context(tiny, doc_text, capsys):
    from loramem.answer import answer_batch
    from loramem.model.limits import answer_budgets

    assert answer_budgets(100, [("a", 40, 10), ("b", 0, 10)], 64) == [50, 64]
    capsys.readouterr()
    cache = encode(tiny, doc_text, truncate=True)  # as long as encode allows: little room left
    answers = answer_batch(tiny, ["Who?", "Who kept the light?"], cache, max_new_tokens=10**9)
    for answer in answers:
        assert (
            answer.stopped_at_end_of_turn or answer.document_tokens + answer.question_tokens + answer.new_tokens == 1024
        )
    assert "max new tokens 1000000000 cut to the room left" in capsys.readouterr().err


def test_a_decoding_batch_larger_than_memory_is_refused(tiny, doc_text, monkeypatch):
    from loramem.answer import answer_batch
    from loramem.errors import LoramemError
    from loramem.model import limits

    monkeypatch.setattr(limits, "available_memory", lambda device: 10**4)
    with pytest.raises(LoramemError, match=r"needs .* for its cache, more than the 9.77 KiB available"):
        answer_batch(tiny, ["Who?"], encode(tiny, doc_text[:400]), max_new_tokens=8)
