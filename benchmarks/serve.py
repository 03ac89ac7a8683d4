"""Benchmark: a warm `loramem serve` against one-off processes and against itself one request at a time, one run.

1. A one-off `loramem ask --server URL --stream` process vs a `loramem ask --cache FILE --stream` process (same
   cache, question and answer): time from the process's start to the first byte of the answer on its stdout, and
   to its end. Targets: the first byte >= 3x sooner, the end >= 1.5x sooner (a 16-token answer).
2. 16 concurrent clients vs the same 16 requests one after another: answers/s, and whether the answers are
   identical. Target >= 3x.
3. The server's peak memory (VmHWM) with one memory loaded and with several (compressed copies and an adapter).

Usage: python benchmarks/serve.py [--tokens 2400] [--repeats 3] [--new 16] [--clients 16]
Runs alone: other work on the machine skews every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo"
QUESTION = "Who designed the lighthouse at Varnaby Point?"


def loramem(*args: str) -> list[str]:
    return [sys.executable, "-m", "loramem", *args]


def document(n_tokens: int, folder: Path) -> Path:
    """The demo document followed by the invented-fiction documents, cut to about n_tokens (4 characters each)."""
    parts = [(DEMO / "lighthouse.txt").read_text()]
    parts += [json.loads(line)["document"] for line in (REPO / "examples/fiction.jsonl").read_text().splitlines()]
    path = folder / "doc.txt"
    path.write_text("\n\n".join(parts)[: 4 * n_tokens])
    return path


def timed_process(args: list[str]) -> tuple[float, float, bytes]:
    """(seconds to the first stdout byte, seconds to the end, stdout) of a process started now."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ)
    assert process.stdout is not None
    first = process.stdout.read(1)
    first_at = time.perf_counter() - started
    rest = process.stdout.read()
    process.wait()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {process.returncode}")
    return first_at, time.perf_counter() - started, first + rest


def post(port: int, body: dict) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    connection.request("POST", "/v1/answers", json.dumps(body).encode())
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise SystemExit(f"server refused: {data}")
    return data


def peak_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2400, help="document length, about")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", type=int, default=16, help="answer length in tokens")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        quiet = {"check": True, "stdout": subprocess.DEVNULL}
        subprocess.run(loramem("encode", str(document(args.tokens, root)), "-o", str(root / "doc.kv")), **quiet)
        subprocess.run(
            loramem(
                "train-adapter",
                str(DEMO / "lighthouse.txt"),
                "--qa",
                str(DEMO / "train_qa.jsonl"),
                "-o",
                str(root / "doc.lora"),
                "--steps",
                "4",
            ),
            **quiet,
        )
        log = root / "serve.err"
        with log.open("wb") as err:
            server = subprocess.Popen(loramem("serve", "--root", str(root), "--port", "0"), stderr=err)
        while not (found := re.search(rb"http://127\.0\.0\.1:(\d+)", log.read_bytes())):
            if server.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.1)
        port = int(found.group(1))
        url = f"http://127.0.0.1:{port}"
        try:
            run(args, root, url, port, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)


def run(args: argparse.Namespace, root: Path, url: str, port: int, pid: int) -> None:
    new = str(args.new)
    post(port, {"cache": "doc.kv", "questions": [QUESTION], "answer": {"max_new_tokens": args.new}})  # loaded, warm
    served_args = loramem("ask", "--server", url, "--cache", "doc.kv", "--stream", "--max-new-tokens", new, QUESTION)
    local_args = loramem("ask", "--cache", str(root / "doc.kv"), "--stream", "--max-new-tokens", new, QUESTION)
    served, local = [], []
    for _ in range(args.repeats):  # taking turns, so a drift in the machine's speed hits both alike
        served.append(timed_process(served_args))
        local.append(timed_process(local_args))
    same = {s[2] for s in served} == {x[2] for x in local} and len({s[2] for s in served}) == 1
    first_s, end_s = statistics.median(s[0] for s in served), statistics.median(s[1] for s in served)
    first_l, end_l = statistics.median(x[0] for x in local), statistics.median(x[1] for x in local)
    print(f"one-off process, {args.new}-token answer, median of {args.repeats} (same answer: {same}):")
    print(f"  ask --server --stream: first byte {first_s:.2f} s, end {end_s:.2f} s")
    print(f"  ask --cache  --stream: first byte {first_l:.2f} s, end {end_l:.2f} s")
    print(f"  first byte {first_l / first_s:.2f}x sooner (target 3x), end {end_l / end_s:.2f}x sooner (target 1.5x)")

    questions = [f"{QUESTION} ({i})" if i else QUESTION for i in range(args.clients)]
    body = {"cache": "doc.kv", "answer": {"max_new_tokens": args.new}}
    started = time.perf_counter()
    alone = [post(port, {**body, "questions": [q]})["answers"][0]["answer"] for q in questions]
    sequential = time.perf_counter() - started
    together: list[str | None] = [None] * len(questions)

    def client(i: int) -> None:
        together[i] = post(port, {**body, "questions": [questions[i]]})["answers"][0]["answer"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    concurrent = time.perf_counter() - started
    rate_s, rate_c = len(questions) / sequential, len(questions) / concurrent
    print(f"{args.clients} requests of one question each (identical answers: {together == alone}):")
    print(
        f"  one after another {rate_s:.2f} answers/s ({sequential:.1f} s), concurrent {rate_c:.2f} answers/s "
        f"({concurrent:.1f} s): {rate_c / rate_s:.2f}x (target 3x)"
    )

    one = peak_kib(pid)
    for ratio in (0.5, 0.9):
        post(port, {**body, "questions": [QUESTION], "compress": {"press": "snapkv", "ratio": ratio}})
    post(port, {**body, "questions": [QUESTION], "adapter": "doc.lora"})
    several = peak_kib(pid)
    print(
        f"server peak memory: {one / 1024:.0f} MiB with one cache loaded, {several / 1024:.0f} MiB with it, two "
        f"compressed copies and an adapter"
    )
    print(
        json.dumps(
            {
                "first_byte_s": [first_s, first_l],
                "end_s": [end_s, end_l],
                "same_answer": same,
                "answers_per_s": [rate_s, rate_c],
                "identical": together == alone,
                "peak_mib": [one / 1024, several / 1024],
            }
        )
    )


if __name__ == "__main__":
    main()
