"""Answering: greedy decoding over a stored (possibly compressed) KV cache, or with no document.

Stored keys are post-RoPE at their original positions, so the question continues at position
`n_tokens` of the original prefill whatever was evicted: RoPE stays consistent after eviction.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loramem.adapters.attach import adapter_scope
from loramem.kv.cache import KVCache
from loramem.kv.value_groups import head_masks
from loramem.model.loading import LoadedModel
from loramem.model.prompt import Framing, closed_book_ids, question_ids, stop_token_ids


@dataclass
class Answer:
    """An answer with the timings and cache use that `ask --json` reports."""

    question: str
    answer: str
    new_tokens: int
    stopped_at_end_of_turn: bool
    cache_tokens: int
    document_tokens: int
    question_tokens: int
    prefill_seconds: float
    time_to_first_token_seconds: float
    decode_tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clock(device: Any) -> float:
    """perf_counter once the device has finished its queued work (CUDA runs asynchronously)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def generate(
    lm: LoadedModel,
    question: str,
    cache: KVCache | None = None,
    *,
    max_new_tokens: int = 64,
    adapter_on: bool = False,
    framing: str | Framing = "chat",
) -> Answer:
    """Answer `question` from `cache` (None: closed-book, framed as `framing`: a style or a Framing), greedily,
    stopping at the end of the turn."""
    from transformers import DynamicCache

    started = clock(lm.device)  # time to first token counts putting the stored cache on the device
    tok = lm.tokenizer
    if cache is not None:
        frame = Framing.from_dict(cache.meta["framing"])
        ids = question_ids(tok, frame, question, after_document=True)
        past, start = cache.to_dynamic_cache(lm.device, lm.dtype), cache.n_tokens
        cache_tokens = max(cache.kept_per_layer)
    else:
        frame = framing if isinstance(framing, Framing) else lm.framing(framing)
        ids = closed_book_ids(tok, frame, question)
        past, start, cache_tokens = DynamicCache(), 0, 0
    stops = stop_token_ids(tok, frame, lm.model.generation_config)
    generated: list[int] = []
    stopped = False
    present = [m.any(-1) for m in cache.masks] if cache is not None and cache.masks is not None else None
    with torch.inference_mode(), adapter_scope(lm, adapter_on), head_masks(lm.model, present):
        input_ids = torch.tensor([ids], device=lm.device)
        position = torch.arange(start, start + len(ids), device=lm.device).unsqueeze(0)
        prefill_started = clock(lm.device)
        out = lm.model(
            input_ids=input_ids, past_key_values=past, position_ids=position, use_cache=True, logits_to_keep=1
        )
        prefilled = clock(lm.device)
        next_id = int(out.logits[0, -1].argmax())
        first = clock(lm.device)
        position = position[:, -1:]
        while True:
            if next_id in stops:
                stopped = True
                break
            generated.append(next_id)
            if len(generated) >= max_new_tokens:
                break
            position = position + 1
            out = lm.model(
                input_ids=torch.tensor([[next_id]], device=lm.device),
                past_key_values=past,
                position_ids=position,
                use_cache=True,
            )
            next_id = int(out.logits[0, -1].argmax())
    done = clock(lm.device)
    decode_time = done - first
    return Answer(
        question=question,
        answer=tok.decode(generated, skip_special_tokens=True).strip(),
        new_tokens=len(generated),
        stopped_at_end_of_turn=stopped,
        cache_tokens=cache_tokens,
        document_tokens=cache.n_tokens if cache is not None else 0,
        question_tokens=len(ids),
        prefill_seconds=round(prefilled - prefill_started, 4),
        time_to_first_token_seconds=round(first - started, 4),
        decode_tokens_per_second=round((len(generated) - 1) / decode_time, 2)
        if len(generated) > 1 and decode_time > 0
        else 0.0,
    )
