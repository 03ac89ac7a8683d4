"""Benchmark: preparing the eval's compressed caches by sweep vs naively, on the same documents, one run.

Sweep (what `loramem eval` does): one prefill per document recording every press's scores, then one
`compress` per (press, ratio). Naive: a fresh prefill under kvpress's own press for every (press,
ratio). Only cache preparation is timed; answering costs the same both ways. Prints a JSON line and
the ratio. Usage: python benchmarks/eval_sweep.py [--docs 4] [--presses snapkv,knorm]
[--ratios 0.25,0.5,0.75,0.9] [--model ID] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from loramem import compress, encode, load_model
from loramem.data.formats import load_dataset
from loramem.kv.presses import make_kvpress
from loramem.specs import EncodeSpec

REPO = Path(__file__).resolve().parent.parent


def naive_prefill(lm, token_ids: torch.Tensor, press: str, ratio: float) -> DynamicCache:
    """The cache kvpress itself leaves after one prefill compressed at `ratio`."""
    cache = DynamicCache()
    with torch.inference_mode(), make_kvpress(press, ratio)(lm.model):
        lm.model.model(input_ids=token_ids[None].to(lm.device), past_key_values=cache, use_cache=True)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--presses", default="snapkv,knorm")
    parser.add_argument("--ratios", default="0.25,0.5,0.75,0.9")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    presses = EncodeSpec(score=args.presses).score
    ratios = [float(r) for r in args.ratios.split(",")]
    lm = load_model(args.model, device=args.device)
    documents = [r.document for r in load_dataset(REPO / "examples/fiction.jsonl")[: args.docs]]
    encode(lm, documents[0], presses=presses)  # warm-up, untimed

    started = time.perf_counter()
    caches, compressing = [], 0.0
    for document in documents:
        cache = encode(lm, document, presses=presses)
        caches.append(cache)
        compress_start = time.perf_counter()
        for press in presses:
            for ratio in ratios:
                compress(cache, press, ratio=ratio)
        compressing += time.perf_counter() - compress_start
    sweep = time.perf_counter() - started

    started = time.perf_counter()
    for cache in caches:
        for press in presses:
            for ratio in ratios:
                naive_prefill(lm, cache.token_ids, press, ratio)
    naive = time.perf_counter() - started

    result = {
        "documents": len(documents),
        "mean_tokens": round(sum(c.n_tokens for c in caches) / len(caches), 1),
        "presses": presses,
        "ratios": ratios,
        "device": str(lm.device),
        "torch_threads": torch.get_num_threads(),
        "sweep_seconds": round(sweep, 3),
        "sweep_compress_seconds": round(compressing, 3),
        "naive_seconds": round(naive, 3),
        "prefills": {"sweep": len(documents), "naive": len(documents) * len(presses) * len(ratios)},
    }
    print(json.dumps(result))
    print(
        f"naive / sweep: {naive / sweep:.2f}x ({len(presses) * len(ratios)} caches per document from "
        f"{result['prefills']['sweep'] // len(documents)} prefill instead of {len(presses) * len(ratios)})"
    )


if __name__ == "__main__":
    main()
