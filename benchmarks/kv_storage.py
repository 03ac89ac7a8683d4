"""Benchmark: what quantized storage and value-group eviction cost in error and save in bytes, one run.

Encodes the demo document once on the default model, then for each storage (fp16, bf16, int8 and
int4 per token or per channel) reports the stored KV bytes against the native cache and the max and
mean absolute error of keys and values after a store/load round trip (`compress --store-dtype`).
Value-group eviction (4 groups, norm rule) at a few budgets reports its bytes against token-level
eviction at the same nominal budget. Prints a JSON line and a table.
Usage: python benchmarks/kv_storage.py [--model ID] [--device auto]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from loramem import compress, encode, load_model
from loramem.kv.quantize import make_storage
from loramem.kv.value_groups import compress_value_groups

REPO = Path(__file__).resolve().parent.parent
STORAGES = [
    ("fp16", "token", 0),
    ("bf16", "token", 0),
    ("int8", "token", 0),
    ("int8", "channel", 0),
    ("int4", "token", 32),
    ("int4", "token", 0),
    ("int4", "channel", 0),
]


def errors(reference: list[torch.Tensor], stored: list[torch.Tensor]) -> dict[str, float]:
    diff = torch.cat([(a.float() - b.float()).abs().flatten() for a, b in zip(reference, stored)])
    scale = torch.cat([a.float().abs().flatten() for a in reference]).mean()
    return {
        "max": round(diff.max().item(), 5),
        "mean": round(diff.mean().item(), 6),
        "mean_relative": round((diff.mean() / scale).item(), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    lm = load_model(args.model, device=args.device)
    cache = encode(lm, (REPO / "examples/demo/lighthouse.txt").read_text(), presses=["snapkv"])
    native = cache.nbytes_stored
    rows = []
    for dtype, axis, group in STORAGES:
        stored = compress(cache, storage=make_storage(dtype, axis, group, cache.meta["head_dim"]))
        rows.append(
            {
                "storage": f"{dtype} {axis}" + (f" g{group}" if group else ""),
                "bytes_vs_native": round(stored.nbytes_stored / native, 4),
                "keys": errors(cache.keys, stored.keys),
                "values": errors(cache.values, stored.values),
            }
        )
    groups = []
    for budget in (0.5, 0.25, 0.1):
        token = compress(cache, "snapkv", ratio=1 - budget).nbytes_stored
        grouped = compress_value_groups(cache, "snapkv", 4, budget).nbytes_stored
        groups.append(
            {
                "budget": budget,
                "token_bytes_vs_native": round(token / native, 4),
                "value_group_bytes_vs_native": round(grouped / native, 4),
            }
        )
    print(
        json.dumps(
            {
                "model": lm.model_id,
                "tokens": cache.n_tokens,
                "native_dtype": cache.meta["dtype"],
                "native_bytes": native,
                "storage": rows,
                "value_groups": groups,
            }
        )
    )
    print(f"{'storage':<18}{'bytes':>8}{'K max':>10}{'K mean rel':>12}{'V max':>10}{'V mean rel':>12}")
    for r in rows:
        print(
            f"{r['storage']:<18}{r['bytes_vs_native']:>8.3f}{r['keys']['max']:>10.4f}"
            f"{r['keys']['mean_relative']:>12.5f}{r['values']['max']:>10.4f}{r['values']['mean_relative']:>12.5f}"
        )
    for g in groups:
        print(
            f"budget {g['budget']}: token-level {g['token_bytes_vs_native']:.3f}, "
            f"value-group/4 {g['value_group_bytes_vs_native']:.3f} of native bytes"
        )


if __name__ == "__main__":
    main()
