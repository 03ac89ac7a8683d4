"""Benchmark: answers per second of `loramem eval` with batched answering and with `--batch-size 1`, one run.

Both runs answer the same grid of the bundled fiction set (mode none, so no adapter training: answering is what
batching changes) as whole `loramem eval` processes; the answers must be identical. The two arms take turns, one
document at a time (`eval --resume` with a wider `--limit` adds the next document), so a machine whose load
changes during the benchmark weighs on both alike. Prints each run's answering rate (the answers' own generation
seconds, as answers.jsonl records them), whole-command time (all its processes) and peak memory (the largest max
RSS of its processes), then projects the answering hours of the paper's NarrativeQA-validation grid.

On a machine whose cores are oversubscribed, wall time measures the contention more than the work: `--cpu` runs
both arms in this one process on one thread (`run_eval`, taking turns per document) and rates each by the CPU
seconds spent answering (model load, prefill and compression left out, as they are the same for both arms).
Usage: python benchmarks/eval_throughput.py [--docs 4] [--ratios 0,0.5,0.9] [--press snapkv] [--model ID] [--cpu]
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


def cpu_arms(args: argparse.Namespace, arms: dict[str, list[str]], tmp: Path) -> dict[str, dict]:
    """Both arms in this process on one thread, taking turns per document, each rated by its CPU seconds inside
    the runner's answering (`iter_answers`)."""
    import resource

    import torch

    import loramem.evaluation.runner as runner
    from loramem import load_model
    from loramem.specs import EvalSpec

    torch.set_num_threads(1)
    lm = load_model(args.model) if args.model else load_model()
    spent = dict.fromkeys(arms, 0.0)
    arm = [next(iter(arms))]
    answering = runner.iter_answers

    def timed(*a: object, **k: object):  # the answering generator, its CPU time counted to the current arm
        replies = answering(*a, **k)  # type: ignore[arg-type]
        while True:
            started = time.process_time()
            item = next(replies, None)
            spent[arm[0]] += time.process_time() - started
            if item is None:
                return
            yield item

    runner.iter_answers = timed  # type: ignore[assignment]
    peaks: dict[str, float] = {}
    for limit in range(1, args.docs + 1):
        for name, batch in arms.items():
            arm[0] = name
            config = EvalSpec.parse(
                {
                    "ratios": args.ratios,
                    "presses": [args.press],
                    "modes": ["none"],
                    "limit": limit,
                    "answer": {"max_new_tokens": args.max_new_tokens, "batch_size": int(batch[1]) if batch else None},
                }
            )
            runner.run_eval(lm, REPO / "examples/fiction.jsonl", tmp / name, config, resume=limit > 1)
            peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = {}
    for name, batch in arms.items():
        rows = [json.loads(line) for line in (tmp / name / "answers.jsonl").read_text().splitlines()]
        results[name] = {
            "batch": " ".join(batch) or "default",
            "answers": len(rows),
            "answering_cpu_seconds": round(spent[name], 2),
            "answers_per_second": round(len(rows) / spent[name], 3),
            "process_peak_rss_mb_so_far": round(peaks[name], 1),
            "by_cell": {(r["doc_id"], r["question_index"], r["press"], r["ratio"]): r["answer"] for r in rows},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--ratios", default="0,0.5,0.9")
    parser.add_argument("--press", default="snapkv")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--cpu", action="store_true", help="one process, one thread, CPU seconds spent answering")
    args = parser.parse_args()
    arms: dict[str, list[str]] = {"batched": [], "single": ["--batch-size", "1"]}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cpu:
            batched, single = cpu_arms(args, arms, Path(tmp)).values()
        else:
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
    unit = "answers per CPU second (1 thread)" if args.cpu else "answers/s"
    print(
        f"{batched['answers']} answers each way, identical: {identical}\n"
        + "".join(
            f"{name}: {run['answers_per_second']:.3f} {unit}"
            + ("" if args.cpu else f", command {run['command_seconds']:.1f} s, peak {run['peak_rss_mb']:.0f} MB")
            + "\n"
            for name, run in (("batched", batched), ("--batch-size 1", single))
        )
        + f"speedup {speedup:.2f}x; the paper's NarrativeQA grid ({paper_answers} answers) would take "
        f"{hours['batched']} h of answering batched vs {hours['batch_size_1']} h one at a time "
        "(at these documents' length, adapter training not included)"
    )
    if not identical:
        raise SystemExit("the answers differ")


if __name__ == "__main__":
    main()
