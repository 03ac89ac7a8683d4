"""The exit-code contract, as a shell sees it: 0 ok, 1 a bug, 2 usage or bad input, 3 incompatible artifact,
4 an eval with failed cells, 130/143 interrupted. Subprocesses where the process boundary is the point."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_process as run_cli
from inprocess import assert_refused, invoke

from loramem._version import __version__


@pytest.fixture(scope="module")
def cache_file(tiny, doc_text, tmp_path_factory) -> Path:
    from loramem.kv.encode import encode

    out = tmp_path_factory.mktemp("exit") / "doc.kv.safetensors"
    out.write_bytes(encode(tiny, doc_text).to_bytes())
    return out


def one_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert "internal error" not in err and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ask", "--no-such-option", "x"], "No such option: --no-such-option"),
        (["ask", "--max-new-tokens", "zero", "x"], "'--max-new-tokens'"),
        (["encode"], "Missing argument"),
        (["nonsense-command"], "No such command"),
        (["eval", "run", "data.jsonl", "--ratios"], "'--ratios' requires an argument"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr.decode()
    line = one_line(result)
    assert line.startswith("error: ") and expected in line, line
    assert result.stdout == b""


def test_usage_error_points_to_the_commands_help():
    line = one_line(run_cli("ask", "--no-such-option", "x"))
    assert "loramem ask --help" in line


def test_bare_loramem_shows_help_and_exits_2():
    """Like git (exit 1) and click >= 8.2 (exit 2): the help, but no command is a usage error to a script."""
    for args in ([], ["eval"], ["library"]):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert "Usage: loramem" in result.stdout.decode() and "--help" in result.stdout.decode(), args
        assert "error" not in result.stderr.decode(), args


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.decode() == f"loramem {__version__}\n"


def test_bad_input_exits_2_and_incompatible_artifact_3(tmp_path, cache_file, other_tiny_dir):
    missing = run_cli("inspect", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and one_line(missing).startswith("error: ")
    other = run_cli("ask", "--cache", str(cache_file), "--model", str(other_tiny_dir), "q?")
    assert other.returncode == 3 and "another model" in one_line(other)


def test_full_disk_on_stdout_is_an_error_not_a_success(cache_file):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full", "wb") as full:
        env = {**os.environ, "LORAMEM_QUIET": "1"}
        cmd = [sys.executable, "-m", "loramem", "compress", str(cache_file), "--ratio", "0.5", "-o", "-"]
        result = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, env=env, timeout=600)
    assert result.returncode != 0
    assert "internal error" not in result.stderr.decode() and "Traceback" not in result.stderr.decode()


def _wait_until_reading(fifo: Path, proc: subprocess.Popen) -> int:
    """Open the FIFO's writing end once the command has opened it for reading: it is then inside `encode`."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            time.sleep(0.05)
    raise AssertionError("the command never opened the document")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_encode_exits_128_plus_signal_and_writes_nothing(tiny_dir, tmp_path, signum, code):
    fifo = tmp_path / "doc.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "LORAMEM_QUIET": "1"}
    cmd = [sys.executable, "-m", "loramem", "encode", str(fifo), "-o", str(out), "--model", str(tiny_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    writer = _wait_until_reading(fifo, proc)
    try:
        os.write(writer, b"The keeper of the lighthouse ")  # half a document: the command is mid-read
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        os.close(writer)
    assert proc.returncode == code, stderr.decode()
    assert stderr.decode().strip() == "interrupted" and stdout == b""
    assert not out.exists() and list(tmp_path.iterdir()) == [fifo]


SIGNAL_IN_FINALIZER = """
import os, signal, time
import loramem.cli
from loramem.cli.app import app, main

class Finalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, inside __del__, where Python ignores what it raises

@app.command("spin")
def spin() -> None:
    Finalizer()
    time.sleep(30)
    print("finished")

main(["spin"])
"""


def test_a_signal_landing_in_a_finalizer_still_interrupts():
    """Python swallows an exception raised in `__del__`; the CLI must deliver the interrupt again, not lose it."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_IN_FINALIZER], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stderr
    assert result.stdout == ""
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted"


def test_a_bug_is_exit_1_with_one_line_and_a_traceback_under_debug(capsys, monkeypatch, cache_file):
    import loramem.describe

    message = "division by zero, in a message longer than a terminal line " * 3

    def broken(*args, **kwargs):
        raise ZeroDivisionError(message)

    monkeypatch.setattr(loramem.describe, "describe_cache", broken)
    monkeypatch.delenv("LORAMEM_DEBUG", raising=False)
    result = invoke(capsys, "inspect", str(cache_file))
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [f"internal error: {message} (set LORAMEM_DEBUG=1 for details)"]
    monkeypatch.setenv("LORAMEM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        invoke(capsys, "inspect", str(cache_file))


def test_eval_with_failed_cells_exits_4(capsys, monkeypatch, tmp_path):
    """The exit code `eval` asks for reaches the shell (it used to be dropped, so failed cells exited 0)."""
    import loramem.cli.evaluation as cli_eval
    import loramem.evaluation.runner as runner

    summary = {"complete": False, "n_failed_cells": 8, "failed": [{"doc_id": "d", "cells": 8, "error": "died"}]}
    monkeypatch.setattr(cli_eval, "load", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "run_eval", lambda *args, **kwargs: summary)
    result = invoke(capsys, "eval", "data.jsonl", "--out", str(tmp_path / "run"), "--json")
    assert result.code == 4 and '"n_failed_cells": 8' in result.stdout
    monkeypatch.setattr(runner, "run_eval", lambda *args, **kwargs: {**summary, "n_failed_cells": 0})
    assert invoke(capsys, "eval", "data.jsonl", "--out", str(tmp_path / "run"), "--json").code == 0


def test_dash_h_is_help_everywhere(capsys):
    for args in ([], ["ask"], ["eval"], ["eval", "report"], ["library"], ["library", "add"]):
        result = invoke(capsys, *args, "-h")
        assert result.code == 0 and "Usage: loramem" in result.stdout, args


def test_usage_error_in_process_is_refused_in_one_line(capsys):
    hook = sys.excepthook
    assert "requires an argument" in assert_refused(invoke(capsys, "compress", "x", "--ratio"), codes=(2,))
    assert sys.excepthook is hook  # run in-process, the command leaves the interpreter's hooks alone


def test_shell_completion_is_enabled(capsys, monkeypatch):
    assert "--install-completion" in invoke(capsys, "--help").stdout
    monkeypatch.setenv("_LORAMEM_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "loramem enc")
    monkeypatch.setenv("COMP_CWORD", "1")
    result = invoke(capsys, "enc")
    assert result.code == 0 and result.stdout.split() == ["encode"]


def test_every_help_text_and_default_is_visible(capsys, monkeypatch):
    """Rich markup used to swallow `[default: ...]` written into help strings; a literal `%%` showed as is."""
    import typer.main
    import typer.rich_utils

    from loramem.cli.app import app

    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None)  # the docs/cli.md test sets a fixed width

    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    for path, command in walk(typer.main.get_command(app), []):
        shown = " ".join(invoke(capsys, *path, "--help").stdout.replace("│", " ").split())
        assert "%%" not in shown, path
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            help_text = " ".join((getattr(param, "help", None) or "").split())
            assert help_text in shown, (path, param.name)
            if isinstance(param.show_default, str):
                assert f"{help_text} [default: ({param.show_default})]" in shown, (path, param.name)
            elif param.default not in (None, False, ()) and not getattr(param, "is_flag", False):
                assert f"[default: {param.default}]" in shown, (path, param.name)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["train-adapter", "DOC", "-o", "OUT", "--epochs", "0"],
            "--epochs: must be at least 1",
        ),
        (["train-adapter", "DOC", "-o", "OUT", "--chunk-size", "600"], "--chunk-size, --max-length: 600 exceeds"),
        (["library", "add", "OUT", "DOC", "--epochs", "0"], "--epochs: must be at least 1"),
        (["eval", "DOC", "--out", "OUT", "--limit", "0"], "--limit: must be at least 1"),
        (["eval", "DOC", "--out", "OUT", "--max-questions", "0"], "--max-questions: must be at least 1"),
        (["eval", "DOC", "--out", "OUT", "--chunk-size", "600"], "--chunk-size, --max-length: 600 exceeds"),
        (["eval", "DOC", "--out", "OUT", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
        (["eval", "DOC", "--out", "OUT", "--mode", "decoder"], "--mode: input should be 'none', 'decode'"),
        (["ask", "--top-k", "2", "Q?"], "--top-k: routing settings need a library"),
        (["ask", "--cache", "C", "--doc", "D", "Q?"], "--cache, --doc: give one, not both"),
    ],
)
def test_library_errors_name_the_flags(capsys, tmp_path, args, expected):
    """The specs check values and name their fields; the command line names its flags (nested settings too)."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse was designed by Mara Quell.")
    args = [str(doc) if a == "DOC" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert expected in assert_refused(invoke(capsys, *args), codes=(2,))


@pytest.mark.parametrize(("ending", "code"), [("raise SystemExit(4)", 4), ("raise KeyboardInterrupt", 130)])
def test_the_command_keeps_the_exit_code_it_ends_with(ending, code):
    """`loramem` ends by `os._exit` after `main` (no interpreter teardown): the code `main` decided, 130 without a
    traceback for an interrupt that lands as it exits, and the atexit handlers run first."""
    script = (
        "import atexit, sys\nfrom loramem.cli import app\n"
        "atexit.register(lambda: sys.stderr.write('atexit ran\\n'))\n"
        f"def main():\n    print('result')\n    {ending}\n"
        "app.main = main\napp.run()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == code and done.stdout == "result\n"
    assert done.stderr == "atexit ran\n", done.stderr


def test_messages_say_what_is_wrong_and_what_works(capsys, tmp_path, tiny_dir, cache_file):
    folder = tmp_path / "adir"
    folder.mkdir()
    cases = [
        (["ask", "--model", str(tmp_path / "nonexistent"), "Who?"], "no such model directory or file"),
        (["ask", "--model", "./nonexistent", "Who?"], "no such model directory or file: ./nonexistent"),
        (["compress", str(cache_file), "--press", "nosuch", "--ratio", "0.5", "-o", str(tmp_path / "c.kv")], None),
        (
            ["data", "convert", "squad", str(folder), "-o", str(tmp_path / "d.jsonl")],
            "is a directory, expected a JSON file",
        ),
    ]
    for args, expected in cases:
        line = assert_refused(invoke(capsys, *args), (2,))
        if expected is None:  # the known presses, not an encode command that would refuse the name too
            assert "--press: input should be 'snapkv', 'expected_attention'" in line and "encode" not in line
        else:
            assert expected in line and "file file" not in line


def test_a_cache_of_another_precision_names_the_dtype(capsys, tmp_path, tiny_dir, doc_text):
    from loramem import encode, load_model

    half = tmp_path / "f16.kv"
    half.write_bytes(encode(load_model(str(tiny_dir), dtype="float16"), doc_text[:400]).to_bytes())
    line = assert_refused(
        invoke(capsys, "ask", "--cache", str(half), "--model", str(tiny_dir), "--dtype", "float32", "Who?"), (3,)
    )
    assert "encoded with the model in float16, and it is loaded in float32; load it with --dtype float16" in line


def test_a_negative_zero_ratio_is_zero(capsys, tmp_path, cache_file):
    from loramem.specs import CompressSpec, EvalSpec
    from loramem.specs.eval import DemoSpec

    assert str(CompressSpec(ratio=-0.0).ratio) == "0.0" and str(EvalSpec(ratios=[-0.0, 0.5]).ratios) == "[0.0, 0.5]"
    assert str(DemoSpec.parse({"ratios": "-0.0,0.5"}).ratios) == "[0.0, 0.5]"
    out = tmp_path / "zero.kv"
    assert invoke(capsys, "compress", str(cache_file), "--ratio", "-0.0", "-o", str(out)).code == 0
    assert str(json.loads(invoke(capsys, "inspect", str(out), "--json").stdout)["ratio"]) == "0.0"


def test_an_eval_document_longer_than_the_context_is_refused_without_a_flag_eval_lacks(capsys, tmp_path, tiny_dir):
    data = tmp_path / "long.jsonl"
    record = {
        "id": "long",
        "document": "The keeper lit the lamp. " * 400,
        "qa": [{"question": "Who?", "answers": ["x"]}],
    }
    data.write_text(json.dumps(record) + "\n")
    args = [
        "eval",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--ratios",
        "0",
        "--mode",
        "none",
        "--model",
        str(tiny_dir),
    ]
    line = assert_refused(invoke(capsys, *args), (2,))
    assert "document is" in line and "shorten it" in line and "--truncate" not in line
    assert not (tmp_path / "run").exists()  # refused before the run folder is written


def test_ask_doc_refuses_a_question_the_context_cannot_hold_before_the_prefill(capsys, tmp_path, tiny_dir, monkeypatch):
    from loramem.kv import encode

    def no_prefill(*args, **kwargs):
        raise AssertionError("prefilled a document whose question cannot be answered")

    monkeypatch.setattr(encode, "encode", no_prefill)
    doc, questions = tmp_path / "doc.txt", tmp_path / "q.txt"
    doc.write_text("The keeper lit the lamp.\n")
    questions.write_text("Who kept the light on the northern rock? " * 200 + "\n")
    args = ["ask", "--doc", str(doc), "--questions", str(questions), "--model", str(tiny_dir)]
    assert "does not fit the model's 1024-token context" in assert_refused(invoke(capsys, *args), (2,))
    doc.write_text("The keeper lit the lamp. " * 400)
    line = assert_refused(invoke(capsys, "ask", "--doc", str(doc), "--model", str(tiny_dir), "Who?"), (2,))
    assert "shorten it or use --truncate" in line
