"""GPU check: the default model on a CUDA device in bf16 and fp32, beside the CPU in fp32.

For each setting: answers to the bundled demo questions from a stored cache, agreement with kvpress's own
compression on that device (share of kept positions equal, per default press, at ratio 0.5), time to first
token, decode tokens/s, and eval answers/s (a small `run_eval` grid on examples/fiction.jsonl). Prints one JSON
line per setting and a table. It needs CUDA and says so (exit 2) when torch sees none.

Usage: python benchmarks/gpu_check.py [--device cuda] [--model ID] [--no-cpu] [--docs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loramem import KVCache, compress, encode, generate, load_model
from loramem.evaluation.metrics import contains
from loramem.evaluation.runner import run_eval
from loramem.specs import EvalSpec
from loramem.vocab import DEFAULT_PRESSES

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from kvpress_reference import kvpress_keep  # noqa: E402


def agreement(lm, cache: KVCache, press: str, ratio: float) -> float:
    """Share of (layer, head, kept slot) positions loramem keeps that kvpress keeps too, on this device."""
    small = compress(cache, press, ratio=ratio)
    same = total = 0
    try:
        reference = kvpress_keep(lm, cache, press, ratio)
    except AssertionError:  # kvpress kept a key that this prefill did not produce bit for bit
        return 0.0
    for layer, (positions, _, _) in enumerate(reference):
        ours = small.positions[layer].long()
        same += int((ours == positions.to(ours.device)).sum())
        total += ours.numel()
    return same / total if total else 1.0


def check(model: str | None, device: str, dtype: str, docs: int, max_new_tokens: int) -> dict:
    lm = load_model(model, device=device, dtype=dtype)
    doc = (REPO / "examples/demo/lighthouse.txt").read_text()
    items = [json.loads(line) for line in (REPO / "examples/demo/questions.jsonl").read_text().splitlines()]
    generate(lm, "warm-up", None, max_new_tokens=2)
    raw = encode(lm, doc, framing="raw")
    agree = {press: round(agreement(lm, raw, press, 0.5), 4) for press in DEFAULT_PRESSES}
    stored = KVCache.from_bytes(encode(lm, doc).to_bytes())
    answers = [generate(lm, item["question"], stored, max_new_tokens=max_new_tokens) for item in items]
    hits = [contains(a.answer, item["answers"]) for a, item in zip(answers, items)]
    with tempfile.TemporaryDirectory() as tmp:
        config = EvalSpec(ratios=[0.0, 0.5], presses=["snapkv"], modes=["none"], formats=["qa"], limit=docs)
        started = time.perf_counter()
        run_eval(lm, REPO / "examples/fiction.jsonl", Path(tmp) / "run", config)
        seconds = time.perf_counter() - started
        n_answers = len((Path(tmp) / "run" / "answers.jsonl").read_text().splitlines())
    return {
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
        "kvpress_agreement": agree,
        "demo_contains": round(sum(hits) / len(hits), 3),
        "answers": [a.answer for a in answers],
        "time_to_first_token_s": round(statistics.median(a.time_to_first_token_seconds for a in answers), 4),
        "decode_tokens_per_s": round(statistics.median(a.decode_tokens_per_second for a in answers), 1),
        "eval_answers_per_s": round(n_answers / seconds, 2),
        "eval_answers": n_answers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--model", default=None)
    parser.add_argument("--docs", type=int, default=2, help="fiction documents in the eval grid")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU fp32 reference")
    args = parser.parse_args()
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (--device cuda or cuda:N) and torch sees none", file=sys.stderr)
        return 2
    settings = [(args.device, "bfloat16"), (args.device, "float32")] + ([] if args.no_cpu else [("cpu", "float32")])
    rows = []
    for device, dtype in settings:
        row = check(args.model, device, dtype, args.docs, args.max_new_tokens)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| device | dtype | TTFT s | decode tok/s | eval answers/s | demo contains | min kvpress agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        low = min(r["kvpress_agreement"].values())
        print(
            f"| {r['device']} | {r['dtype']} | {r['time_to_first_token_s']} | {r['decode_tokens_per_s']} | "
            f"{r['eval_answers_per_s']} | {r['demo_contains']} | {low} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
