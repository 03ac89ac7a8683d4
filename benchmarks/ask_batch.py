"""Benchmark: `loramem ask --cache C --questions q16.txt --batch-size 16` against `--batch-size 1`, as whole commands.

Builds a ~2.7k-token cache (the demo document followed by fiction documents, as `decode_speed.py` does) and a file
of 16 questions about it (the demo's, then the fiction documents'), runs both commands exactly so spelled
(fastest of --repeats interleaved runs each), checks that they print the same 16 answers, and prints the ratio of
their wall times (target: at most 0.40) and of their CPU times (which a busy machine disturbs less).
Usage: python benchmarks/ask_batch.py [--tokens 2700] [--repeats 1] [--model ID] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from ask_from_cache import REPO, document_of
from startup import run

from loramem import load_model


def questions_about(n: int) -> list[str]:
    """The demo's questions, then the fiction documents' in order (the document holds the demo text first)."""
    found = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").open()]
    for line in (REPO / "examples/fiction.jsonl").open():
        found += [qa["question"] for qa in json.loads(line)["qa"]]
    return found[:n]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2700, help="document length in the model's tokens")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="fastest of N interleaved runs of each command")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the commands (default: unset)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the commands inherit the environment
    lm = load_model(args.model)  # also converts the default model once, outside the timings
    doc = document_of(lm, args.tokens)
    del lm
    model = ["--model", args.model] if args.model else []
    arms = (str(args.questions), "1")
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    printed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        doc_path, cache_path, questions = Path(tmp) / "doc.txt", Path(tmp) / "c.safetensors", Path(tmp) / "q16.txt"
        doc_path.write_text(doc)
        questions.write_text("\n".join(questions_about(args.questions)) + "\n")
        run("encode", str(doc_path), "-o", str(cache_path), *model)
        for _ in range(args.repeats):
            for arm in arms:
                elapsed, spent, printed[arm] = run(
                    "ask", "--cache", str(cache_path), "--questions", str(questions), "--batch-size", arm, *model
                )
                times[arm].append(elapsed)
                cpu[arm].append(spent)
    batched, single = arms
    if printed[batched] != printed[single]:
        raise SystemExit(f"answers differ:\n{printed[batched]}\n---- --batch-size 1:\n{printed[single]}")
    result = {
        "document_tokens": args.tokens,
        "questions": args.questions,
        f"batch{batched}_s": round(min(times[batched]), 2),
        "batch1_s": round(min(times[single]), 2),
        "wall_ratio": round(min(times[batched]) / min(times[single]), 3),
        f"batch{batched}_cpu_s": round(min(cpu[batched]), 2),
        "batch1_cpu_s": round(min(cpu[single]), 2),
        "cpu_ratio": round(min(cpu[batched]) / min(cpu[single]), 3),
        "same_answers": True,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result))
    print(
        f"ask --questions ({args.questions}) over {args.tokens} tokens: --batch-size {batched} "
        f"{result[f'batch{batched}_s']} s vs --batch-size 1 {result['batch1_s']} s = {result['wall_ratio']} of its "
        f"time (CPU {result['cpu_ratio']}),"
        f" same answers; load average {result['load_average_1min']}"
    )


if __name__ == "__main__":
    main()
