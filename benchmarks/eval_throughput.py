"""Benchmark: answers per second of `loramem eval` with batched answering and with `--batch-size 1`, one run.

Both runs answer the same grid of the bundled fiction set (mode none, so no adapter training: answering is what
batching changes) as whole `loramem eval` processes; the answers must be identical. The two arms take turns, one
document at a time (`eval --resume` with a wider `--limit` adds the next document), so a machine whose load
changes during the benchmark weighs on both alike. Prints each run's answering rate (the answers' own generation
seconds, as answers.jsonl records them), whole-command time (all its processes) and peak memory (the largest max
RSS of its processes), then projects the answering hours of the paper's NarrativeQA-validation grid.
Usage: python benchmarks/eval_throughput.py [--docs 4] [--ratios 0,0.5,0.9] [--press snapkv] [--model ID]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The paper's grid on NarrativeQA validation: 115 documents, 3,461 questions, 6 ratios, 2 presses, 3 modes.
PAPER_QUESTIONS, PAPER_RATIOS, PAPER_PRESSES, PAPER_MODES = 3461, 6, 2, 3


def run_eval(args: argparse.Namespace, out: Path, batch: list[str], limit: int) -> tuple[float, float]:
    """One `loramem eval` process over the first `limit` documents (resuming `out` past the first): its wall
    seconds and peak RSS in MB (from wait4)."""
    command = [sys.executable, "-m", "loramem", "eval", str(REPO / "examples/fiction.jsonl"), "--out", str(out)]
    command += ["--limit", str(limit), "--mode", "none", "--press", args.press, "--ratios", args.ratios]
    command += ["--max-new-tokens", str(args.max_new_tokens), *batch, *(["--resume"] if limit > 1 else [])]
    command += ["--model", args.model] if args.model else []
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env={**os.environ, "LORAMEM_QUIET": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"eval failed ({status}): {' '.join(command)}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def results(out: Path, batch: list[str], runs: list[tuple[float, float]]) -> dict:
    """An arm's answering rate (the answers' own generation seconds), command time, peak RSS and answers."""
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    answering = sum(r["seconds"] for r in rows)
    return {
        "batch": " ".join(batch) or "default",
        "answers": len(rows),
        "answering_seconds": round(answering, 2),
        "answers_per_second": round(len(rows) / answering, 3),
        "command_seconds": round(sum(seconds for seconds, _ in runs), 2),
        "peak_rss_mb": round(max(rss for _, rss in runs), 1),
        "by_cell": {(r["doc_id"], r["question_index"], r["press"], r["ratio"]): r["answer"] for r in rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--ratios", default="0,0.5,0.9")
    parser.add_argument("--press", default="snapkv")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    arms = {"batched": [], "single": ["--batch-size", "1"]}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for limit in range(1, args.docs + 1):  # the arms take turns, one document at a time
            for name, batch in arms.items():
                runs[name].append(run_eval(args, Path(tmp) / name, batch, limit))
        batched, single = (results(Path(tmp) / name, batch, runs[name]) for name, batch in arms.items())
    identical = batched.pop("by_cell") == single.pop("by_cell")
    speedup = batched["answers_per_second"] / single["answers_per_second"]
    paper_answers = PAPER_QUESTIONS * PAPER_RATIOS * PAPER_PRESSES * PAPER_MODES
    hours = {
        name: round(paper_answers / run["answers_per_second"] / 3600, 1)
        for name, run in (("batched", batched), ("batch_size_1", single))
    }
    print(
        json.dumps(
            {
                "batched": batched,
                "batch_size_1": single,
                "identical_answers": identical,
                "speedup": round(speedup, 2),
                "paper_grid_answers": paper_answers,
                "paper_grid_answering_hours": hours,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            }
        )
    )
    print(
        f"{batched['answers']} answers each way, identical: {identical}\n"
        f"batched:      {batched['answers_per_second']:.2f} answers/s, command {batched['command_seconds']:.1f} s, "
        f"peak {batched['peak_rss_mb']:.0f} MB\n"
        f"--batch-size 1: {single['answers_per_second']:.2f} answers/s, command {single['command_seconds']:.1f} s, "
        f"peak {single['peak_rss_mb']:.0f} MB\n"
        f"speedup {speedup:.2f}x; the paper's NarrativeQA grid ({paper_answers} answers) would take "
        f"{hours['batched']} h of answering batched vs {hours['batch_size_1']} h one at a time "
        "(at these documents' length, adapter training not included)"
    )
    if not identical:
        raise SystemExit("the answers differ")


if __name__ == "__main__":
    main()
