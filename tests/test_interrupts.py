"""Interrupted or refused runs leave nothing half-written (issue 13, defects 2 and 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import DEMO_DOC, REPO
from inprocess import assert_refused, invoke

ENV = {**os.environ, "LORAMEM_QUIET": "1", "PYTHONPATH": str(REPO)}


def interrupt_when(args: list[str], started: callable, signum: int) -> subprocess.CompletedProcess:
    """Run `loramem ARGS`, send `signum` once `started()` holds (the long work is under way), wait for the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loramem", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    deadline = time.monotonic() + 300
    while not started() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1].decode()
    time.sleep(0.3)
    process.send_signal(signum)  # once: a signal that lands in a finalizer must not be lost (it is re-delivered)
    try:
        out, err = process.communicate(timeout=180)  # a loaded machine can take long to unwind and exit
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"one signal did not stop the run: {err.decode()[-2000:]}") from None
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def last_line(result: subprocess.CompletedProcess) -> str:
    """The run's own last word."""
    return result.stderr.decode().strip().splitlines()[-1]


def test_interrupted_training_leaves_no_adapter(tiny_dir, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Who designed it?", "answer": "Orla Quenby"}) + "\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["train-adapter", str(DEMO_DOC), "--qa", str(qa), "-o", str(out_dir / "a.lora"), "--steps", "100000"]
    result = interrupt_when(
        [*args, "--rank", "2", "--model", str(tiny_dir)], lambda: any(out_dir.iterdir()), signal.SIGINT
    )
    assert result.returncode == 130 and last_line(result) == "interrupted"
    assert list(out_dir.iterdir()) == []


def test_interrupted_first_library_add_leaves_no_library(tiny_dir, tmp_path):
    lib = tmp_path / "lib"
    args = ["library", "add", str(lib), str(DEMO_DOC), "--format", "ntp", "--steps", "100000", "--rank", "2"]
    result = interrupt_when(
        [*args, "--model", str(tiny_dir)], lambda: lib.is_dir() and any(lib.glob(".add-*")), signal.SIGTERM
    )
    assert result.returncode == 143 and last_line(result) == "interrupted"
    assert not lib.exists()


def test_empty_qa_list_is_refused_without_a_run_folder(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "d", "document": DEMO_DOC.read_text(), "qa": []}) + "\n")
    run = tmp_path / "run"
    result = invoke(capsys, "eval", str(data), "--out", str(run), "--ratios", "0", "--model", str(tiny_dir))
    assert "qa" in assert_refused(result, (2,))
    assert not run.exists()


def test_signal_inside_exec_code_still_exits_128_plus_signal(tmp_path):
    """CPython ends a `python -m` process by SIGINT (returncode -2) when a KeyboardInterrupt was raised in
    string-`exec`'d code (as dataclasses' generated `__init__` is), even though loramem caught it: the exit must
    stay 143, as for `python -m loramem`."""
    (tmp_path / "selfterm.py").write_text(
        "from loramem.cli.app import app, main\n"
        "@app.command('selfterm')\n"
        "def selfterm() -> None:\n"
        "    exec('import os, signal, time\\nos.kill(os.getpid(), signal.SIGTERM)\\ntime.sleep(30)')\n"
        "main(['selfterm'])\n"
    )
    env = {**ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    result = subprocess.run([sys.executable, "-m", "selfterm"], capture_output=True, env=env, timeout=120)
    assert result.returncode == 143 and last_line(result) == "interrupted", (result.returncode, result.stderr)
