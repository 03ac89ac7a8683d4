"""Benchmark: answering from a stored cache vs re-prefilling the document (`ask --doc`), one run.

Also times a ten-ratio compression sweep against one prefill. Prints a JSON line and a summary.
Usage: python benchmarks/ask_from_cache.py [--tokens 2000] [--questions 3] [--model ID] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from loramem import KVCache, compress, encode, generate, load_model

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Who designed the lighthouse at Varnaby Point?",
    "What was the name of the first keeper?",
    "In which year was the light automated?",
    "Which steamer carried the replacement lens?",
]


def document_of(lm, n_tokens: int) -> str:
    """The demo document followed by invented-fiction documents, cut to about n_tokens tokens."""
    parts = [(REPO / "examples/demo/lighthouse.txt").read_text()]
    parts += [json.loads(line)["document"] for line in (REPO / "examples/fiction.jsonl").read_text().splitlines()]
    ids = lm.tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"][:n_tokens]
    return lm.tokenizer.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    lm = load_model(args.model, device=args.device)
    doc = document_of(lm, args.tokens)
    questions = QUESTIONS[: args.questions]
    generate(lm, "warm-up", None, max_new_tokens=2)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.kv.safetensors"
        started = time.perf_counter()
        cache = encode(lm, doc)
        path.write_bytes(cache.to_bytes())
        encode_s = time.perf_counter() - started

        def ask_cache() -> list[str]:
            stored = KVCache.load(path)
            return [generate(lm, q, stored, max_new_tokens=args.max_new_tokens).answer for q in questions]

        def ask_doc() -> list[str]:
            fresh = encode(lm, doc)
            return [generate(lm, q, fresh, max_new_tokens=args.max_new_tokens).answer for q in questions]

        timings = {}
        for name, fn in (("ask_cache", ask_cache), ("ask_doc", ask_doc)):
            started = time.perf_counter()
            answers = fn()
            timings[name] = time.perf_counter() - started
            timings[name + "_answers"] = answers
        assert timings["ask_cache_answers"] == timings["ask_doc_answers"], "cache and fresh prefill must agree"

        ratios = [i / 10 for i in range(10)]
        started = time.perf_counter()
        stored = KVCache.load(path)
        for ratio in ratios:
            compress(stored, "snapkv", ratio=ratio).to_bytes()
        sweep_s = time.perf_counter() - started

    result = {
        "device": str(lm.device),
        "model": lm.model_id,
        "document_tokens": cache.n_tokens,
        "questions": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "encode_and_save_s": round(encode_s, 2),
        "prefill_s": cache.meta["prefill_seconds"],
        "ask_from_cache_s": round(timings["ask_cache"], 2),
        "ask_doc_s": round(timings["ask_doc"], 2),
        "ask_doc_over_cache": round(timings["ask_doc"] / timings["ask_cache"], 2),
        "compress_sweep_10_ratios_s": round(sweep_s, 2),
        "sweep_over_one_prefill": round(sweep_s / cache.meta["prefill_seconds"], 3),
    }
    print(json.dumps(result))
    print(
        f"ask from cache {result['ask_from_cache_s']} s vs ask --doc {result['ask_doc_s']} s: "
        f"{result['ask_doc_over_cache']}x; 10-ratio compress sweep {result['compress_sweep_10_ratios_s']} s "
        f"= {result['sweep_over_one_prefill']} of one prefill ({result['prefill_s']} s)"
    )


if __name__ == "__main__":
    main()
