"""Benchmark: greedy decoding speed over a stored cache as the document grows, one run.

For each document length: batch-1 decode tokens/s of loramem's pre-sized cache against the plain transformers loop
that grows a DynamicCache by concatenation (what `generate` did before), both forced to run `--new` tokens with the
same greedy tokens, and the engine on the transformers-free model `ask --cache` uses for the default model
(`loramem.model.lean`); then the batched engine's aggregate tokens/s at larger batches. Beside them, the memory floor of
one batch-1 token: the bare matrix-vector products over every weight the step reads (each linear layer and the
output head), plus the products over the document's keys and values, timed alone in the same run; what the engine
spends above it is per-step overhead. `--bf16` adds the engine on a bf16 copy of the model (information only: the
default stays fp32; its tokens are compared with fp32's, not asserted). Prints JSON lines and a table.
Usage: python benchmarks/decode_speed.py [--tokens 600,2700] [--new 48] [--batches 8,16] [--repeats 3] [--bf16]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from ask_from_cache import QUESTIONS, document_of

from loramem import encode, load_model
from loramem.model.decode import decode
from loramem.model.prompt import Framing, question_ids


def dynamic_cache_tokens(lm, cache, prompt: list[int], new: int) -> tuple[list[int], float]:
    """The plain transformers loop: DynamicCache grown token by token; (tokens, decode tokens/s after the first)."""
    past = cache.to_dynamic_cache(lm.device, lm.dtype)
    position = torch.arange(cache.n_tokens, cache.n_tokens + len(prompt))[None]
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([prompt]), past_key_values=past, position_ids=position, logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        first = time.perf_counter()
        for _ in range(new - 1):
            position = position[:, -1:] + 1
            out = lm.model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=past, position_ids=position)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, (new - 1) / (time.perf_counter() - first)


def engine_rate(lm, cache, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    """loramem's batched engine: (tokens per row, aggregate decode tokens/s after the first token)."""
    rows = decode(lm.model, prompts, cache, set(), new, 0)
    return [r.tokens for r in rows], len(rows) * (new - 1) / max(r.decode_seconds for r in rows)


def weight_floor(model) -> Callable[[], float]:
    """Seconds of one batch-1 pass of bare `linear` over every 2-D weight a decoding step reads (the input
    embedding's row lookup aside: tied to the output head, it is read there)."""
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    distinct = {id(w): w for w in model.parameters()}.values()
    weights = [w for w in distinct if w.dim() == 2 and (w is not embed or w is head)]
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights]

    def run() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for x, w in zip(inputs, weights):
                torch.nn.functional.linear(x, w)
        return time.perf_counter() - started

    return run


def kv_floor(model, cache) -> Callable[[], float]:
    """Seconds of the bare products of one token's grouped queries with every layer's stored keys and values."""
    config = model.config
    rep = config.num_attention_heads // config.num_key_value_heads
    layers = [(k.to(model.dtype), v.to(model.dtype)) for k, v in zip(cache.keys, cache.values)]
    queries = [torch.randn(k.shape[0], rep, k.shape[-1], dtype=model.dtype) for k, _ in layers]

    def run() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for q, (k, v) in zip(queries, layers):
                torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="600,2700")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--repeats", type=int, default=3, help="best of N interleaved runs of each side")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--bf16", action="store_true", help="also time the engine on a bf16 copy of the model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model) if args.model else load_model()
    # what `ask --cache` answers with: the transformers-free model where it covers the model (the default)
    lean = load_model(args.model, answer_only=True)
    lean = lean if type(lean.model) is not type(lm.model) else None
    results = []
    for n_tokens in [int(t) for t in args.tokens.split(",")]:
        cache = encode(lm, document_of(lm, n_tokens))
        frame = Framing.from_dict(cache.meta["framing"])
        prompts = [question_ids(lm.tokenizer, frame, q, after_document=True) for q in QUESTIONS]
        old, new, floor, lean_rates = [], [], [], []
        weights, keys_values = weight_floor(lm.model), kv_floor(lm.model, cache)
        for _ in range(args.repeats):  # interleaved, so a busy moment slows both sides alike
            old_tokens, old_rate = dynamic_cache_tokens(lm, cache, prompts[0], args.new)
            new_tokens, new_rate = engine_rate(lm, cache, prompts[:1], args.new)
            assert new_tokens[0] == old_tokens, "the engine's greedy tokens differ from the plain loop's"
            old.append(old_rate)
            new.append(new_rate)
            if lean is not None:
                lean_tokens, lean_rate = engine_rate(lean, cache, prompts[:1], args.new)
                assert lean_tokens == new_tokens, "the transformers-free model's greedy tokens differ"
                lean_rates.append(lean_rate)
            floor.append((min(weights() for _ in range(5)), min(keys_values() for _ in range(5))))
        best_weights, best_kv = min(f[0] for f in floor), min(f[1] for f in floor)
        row = {
            "document_tokens": cache.n_tokens,
            "batch1_dynamic_cache_tok_s": round(max(old), 1),
            "batch1_presized_tok_s": round(max(new), 1),
            "floor_weights_ms": round(best_weights * 1000, 1),
            "floor_kv_ms": round(best_kv * 1000, 1),
            "batch1_floor_tok_s": round(1 / (best_weights + best_kv), 1),
            "batch1_ms": round(1000 / max(new), 1),
        }
        if lean_rates:
            row["batch1_lean_tok_s"] = round(max(lean_rates), 1)
        if args.bf16:
            half = copy.deepcopy(lm.model).to(torch.bfloat16)
            rates = [engine_rate(SimpleNamespace(model=half), cache, prompts[:1], args.new) for _ in range(2)]
            row["batch1_bf16_tok_s"] = round(max(r[1] for r in rates), 1)
            row["bf16_tokens_equal_fp32"] = rates[0][0][0] == new_tokens[0]
            row["floor_weights_bf16_ms"] = round(min(weight_floor(half)() for _ in range(5)) * 1000, 1)
            del half
        for batch in [int(b) for b in args.batches.split(",")]:
            rows = [prompts[i % len(prompts)] for i in range(batch)]
            row[f"batch{batch}_tok_s"] = round(max(engine_rate(lm, cache, rows, args.new)[1] for _ in range(2)), 1)
        row.update(threads=torch.get_num_threads(), load_average=[round(x, 2) for x in os.getloadavg()])
        results.append(row)
        print(json.dumps(row), flush=True)
    for row in results:
        batched = [f"{k.split('_')[0]} {v} tok/s" for k, v in row.items() if k.startswith("batch") and "1_" not in k]
        print(
            f"{row['document_tokens']:>6} tokens: batch 1 {row['batch1_presized_tok_s']} tok/s pre-sized vs "
            f"{row['batch1_dynamic_cache_tok_s']} DynamicCache, {row.get('batch1_lean_tok_s', '-')} without "
            f"transformers (floor {row['batch1_floor_tok_s']} tok/s: weights "
            f"{row['floor_weights_ms']} ms + keys/values {row['floor_kv_ms']} ms); " + ", ".join(batched)
        )


if __name__ == "__main__":
    main()
