"""Benchmark: a one-off `loramem ask --cache` as a process, stage by stage, and `ask --doc` / `ask --cache`.

A user who asks one question from a stored cache pays for a whole process: imports, model load, cache load,
the question's prefill and the decode. This prints those stages (timed inside one fresh process), then the
wall time of the real commands `loramem ask --doc DOC` and `loramem ask --cache DOC.kv` on the same document
(fastest of --repeats interleaved runs each; the answers must agree) and their ratio, in wall time and in the
processes' CPU time (which a busy machine disturbs less). It also times, as a process, the import no torch-based
`ask` can avoid (torch itself), and from it the best ratio any start-up work in loramem could reach: `ask --cache`
with nothing but that import, the cache load, the question and the decode, against the same plus the document's
prefill.
`ask --cache` on the embedded default model loads it without transformers (`loramem.model.lean`), as timed here.
Usage: python benchmarks/startup.py [--tokens 2700] [--max-new-tokens 32] [--repeats 2] [--model ID]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "Who designed the lighthouse at Varnaby Point?"
# What any `ask` that runs a torch model imports before its own work, ended as `loramem` ends (no teardown).
FLOOR = "import os, torch; os._exit(0)"


def stages(cache_path: str, model: str | None, max_new_tokens: int) -> None:
    """Run in a fresh process: time each stage of what `ask --cache` does, print them as JSON."""
    started = time.perf_counter()
    import loramem.cli  # noqa: F401  (what the command imports before any work)
    from loramem.answer import generate
    from loramem.kv.cache import KVCache, check_compatible
    from loramem.model.loading import load_model

    imported = time.perf_counter()
    lm = load_model(model, answer_only=True)  # as `ask --cache` loads it
    loaded = time.perf_counter()
    cache = KVCache.load(cache_path)
    check_compatible(cache, lm.fingerprint, cache_path)
    cache_loaded = time.perf_counter()
    answer = generate(lm, QUESTION, cache, max_new_tokens=max_new_tokens)
    done = time.perf_counter()
    question = answer.time_to_first_token_seconds
    print(
        json.dumps(
            {
                "imports_s": round(imported - started, 3),
                "model_load_s": round(loaded - imported, 3),
                "cache_load_s": round(cache_loaded - loaded, 3),
                "question_s": round(question, 3),
                "decode_s": round(done - cache_loaded - question, 3),
                "new_tokens": answer.new_tokens,
                "document_tokens": cache.n_tokens,
                "in_process_total_s": round(done - started, 3),
            }
        )
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(*args: str, python: tuple[str, ...] = ("-m", "loramem")) -> tuple[float, float, str]:
    """Wall time and CPU time of `python -m loramem ARGS` (CPU time moves less on a busy machine), and its stdout."""
    cpu = _children_cpu()
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *python, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "LORAMEM_QUIET": "1"},
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"loramem {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed, _children_cpu() - cpu, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2700, help="document length in the model's tokens")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--stages-of", help=argparse.SUPPRESS)  # internal: the stage-timing child process
    args = parser.parse_args()
    if args.stages_of:
        stages(args.stages_of, args.model, args.max_new_tokens)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ask_from_cache import document_of

    from loramem import load_model

    lm = load_model(args.model)  # also converts the default model once, outside the timings
    doc = document_of(lm, args.tokens)
    del lm
    model = ["--model", args.model] if args.model else []
    asked = ["--max-new-tokens", str(args.max_new_tokens), *model, QUESTION]
    with tempfile.TemporaryDirectory() as tmp:
        doc_path, cache_path = Path(tmp) / "doc.txt", Path(tmp) / "doc.kv.safetensors"
        doc_path.write_text(doc)
        run("encode", str(doc_path), "-o", str(cache_path), "--score", "snapkv", *model)
        child = [sys.executable, __file__, "--stages-of", str(cache_path), "--max-new-tokens", str(args.max_new_tokens)]
        shown = subprocess.run([*child, *model], capture_output=True, text=True, check=True)
        result = json.loads(shown.stdout)
        times: dict[str, list[float]] = {"cache": [], "doc": [], "floor": []}
        cpu: dict[str, list[float]] = {"cache": [], "doc": [], "floor": []}
        answers: dict[str, str] = {}
        for _ in range(args.repeats):
            for kind, source in (("cache", ["--cache", str(cache_path)]), ("doc", ["--doc", str(doc_path)])):
                elapsed, spent, answers[kind] = run("ask", *source, *asked)
                times[kind].append(elapsed)
                cpu[kind].append(spent)
            elapsed, spent, _ = run(python=("-c", FLOOR))
            times["floor"].append(elapsed)
            cpu["floor"].append(spent)
    if answers["cache"] != answers["doc"]:
        raise SystemExit(f"answers differ: cache {answers['cache']!r} vs doc {answers['doc']!r}")
    result["ask_cache_process_s"] = round(min(times["cache"]), 2)
    result["ask_doc_process_s"] = round(min(times["doc"]), 2)
    result["ask_doc_over_ask_cache"] = round(min(times["doc"]) / min(times["cache"]), 2)
    result["ask_cache_process_cpu_s"] = round(min(cpu["cache"]), 2)
    result["ask_doc_process_cpu_s"] = round(min(cpu["doc"]), 2)
    result["cpu_ask_doc_over_ask_cache"] = round(min(cpu["doc"]) / min(cpu["cache"]), 2)
    floor = min(times["floor"])
    best_cache = floor + result["cache_load_s"] + result["question_s"] + result["decode_s"]
    result["import_floor_process_s"] = round(floor, 2)
    result["best_possible_ratio"] = round((best_cache + min(times["doc"]) - min(times["cache"])) / best_cache, 2)
    result["load_average_1min"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))
    print(
        f"one-off ask --cache on {result['document_tokens']} tokens: imports {result['imports_s']} s, model load "
        f"{result['model_load_s']} s, cache load {result['cache_load_s']} s, question {result['question_s']} s, "
        f"decode {result['decode_s']} s ({result['new_tokens']} tokens); as processes: ask --doc "
        f"{result['ask_doc_process_s']} s / ask --cache {result['ask_cache_process_s']} s = "
        f"{result['ask_doc_over_ask_cache']}x (CPU time: {result['ask_doc_process_cpu_s']} s / "
        f"{result['ask_cache_process_cpu_s']} s = {result['cpu_ask_doc_over_ask_cache']}x; load average "
        f"{result['load_average_1min']}); a process importing only torch: "
        f"{result['import_floor_process_s']} s, so start-up work in loramem could reach at most "
        f"{result['best_possible_ratio']}x"
    )


if __name__ == "__main__":
    main()
