"""`loramem chat`: the model loaded once, one question per line, commands that change the memory; from a pipe one
answer line per question (as `ask` answers them), on a terminal a prompt, streamed answers and Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_DOC, REPO, interrupt_once_written, run_cli

QUESTIONS = ["Who designed the lighthouse?", "When was it built?", "Who keeps the lamp?", "Where is it?", "Why?"]


@pytest.fixture(scope="module")
def caches(tiny_dir, other_tiny_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chat")
    made = {"full": folder / "doc.kv", "small": folder / "small.kv", "other": folder / "other.kv"}
    for name, model in (("full", tiny_dir), ("other", other_tiny_dir)):
        result = run_cli("encode", str(DEMO_DOC), "-o", str(made[name]), "--model", str(model))
        assert result.returncode == 0, result.stderr.decode()
    squeezed = run_cli("compress", str(made["full"]), "--press", "snapkv", "--ratio", "0.9", "-o", str(made["small"]))
    assert squeezed.returncode == 0, squeezed.stderr.decode()
    return made


def asked(tiny_dir, cache: Path, questions: list[str], *more: str) -> list[str]:
    """`ask`'s answer lines, each question decoded alone as chat decodes it."""
    result = run_cli(
        "ask", "-c", str(cache), *questions, "-m", str(tiny_dir), "--max-new-tokens", "8", "--batch-size", "1", *more
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()[0] if len(questions) == 1 else result.stdout.decode().splitlines()


def test_chat_from_a_pipe_answers_one_line_per_question_as_ask_does(tiny_dir, caches):
    q = QUESTIONS
    lines = [
        q[0],
        "/mode none",
        q[1],
        "",
        "/compress snapkv 0.9",
        q[2],
        "/nonsense",
        f"/cache {caches['other']}",
        "/mode decode",
        "/compress snapkv 2",
        q[3],
        "/compress snapkv 0",
        "/info",
        q[4],
        "/quit",
        "not a question: the session ended",
    ]
    result = run_cli(
        "chat",
        "--cache",
        str(caches["full"]),
        "--model",
        str(tiny_dir),
        "--max-new-tokens",
        "8",
        input=("\n".join(lines) + "\n").encode(),
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err  # the answers are written; the failed lines say so
    expected = asked(tiny_dir, caches["full"], [q[0], q[1], q[4]])
    small = asked(tiny_dir, caches["small"], [q[2], q[3]])
    assert result.stdout.decode().splitlines() == [expected[0], expected[1], small[0], small[1], expected[2]]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "Traceback" not in err, err
    assert "unknown command /nonsense" in errors[0]
    assert "made by another model" in errors[1]
    assert "needs an adapter" in errors[2] and "ratio: must be in [0, 1]" in errors[3]
    info = err.splitlines()[-1]  # /info after /compress snapkv 0: the whole cache again
    assert info.endswith("(367 of 367 tokens kept); adapter: none; mode: none")


def test_chat_refuses_its_memory_from_stdin(tiny_dir):
    result = run_cli("chat", "--cache", "-", "--model", str(tiny_dir), input=b"Who?\n")
    assert result.returncode == 2 and "reads its questions from stdin" in result.stderr.decode()


def test_chat_with_a_bad_adapter_goes_on(tiny_dir, caches, tmp_path):
    lines = ["/adapter", f"/adapter {tmp_path / 'missing'}", "/adapter none", "/mode all", QUESTIONS[0]]
    result = run_cli(
        "chat", "-c", str(caches["full"]), "-m", str(tiny_dir), "--max-new-tokens", "8", input="\n".join(lines).encode()
    )
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("error")] == ["error"] * 3, err
    assert result.stdout.decode().splitlines() == [asked(tiny_dir, caches["full"], [QUESTIONS[0]])]


def test_chat_switches_adapters_and_modes_as_ask_takes_them(tiny, tiny_dir, caches, doc_text, tmp_path):
    from loramem.adapters.train import train_adapter
    from loramem.specs import TrainSpec

    adapter = tmp_path / "doc.lora"
    qa = [("Who designed the lighthouse?", "Orla Quenby"), ("Who was the first keeper?", "Hobart Fennick")]
    train_adapter(tiny, doc_text, qa, adapter, TrainSpec(rank=2, alpha=4.0, steps=2, batch_size=2))
    q = QUESTIONS
    lines = [f"/adapter {adapter}", q[0], "/mode none", q[1], "/mode decode", "/adapter none", q[2], "/info"]
    result = run_cli(
        "chat", "-c", str(caches["full"]), "-m", str(tiny_dir), "--max-new-tokens", "8", input="\n".join(lines).encode()
    )
    assert result.returncode == 0, result.stderr.decode()
    full = caches["full"]
    assert result.stdout.decode().splitlines() == [
        asked(tiny_dir, full, [q[0]], "--adapter", str(adapter)),
        asked(tiny_dir, full, [q[1]], "--adapter", str(adapter), "--adapter-mode", "none"),
        asked(tiny_dir, full, [q[2]]),
    ]
    shown = result.stderr.decode().splitlines()
    assert shown[0].endswith(f"adapter: {adapter}; mode: decode") and shown[-1].endswith("adapter: none; mode: none")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_an_answer_from_a_pipe_ends_the_run(tiny_dir, tmp_path, signum, code):
    """From a pipe there is no prompt to return to: Ctrl-C ends the run as it ends `ask` (SIGTERM too)."""
    args = ["chat", "--model", str(tiny_dir), "--max-new-tokens", "1000", "--stream"]
    result = interrupt_once_written(args, signum, tmp_path / "out.txt", input=b"Tell me everything.\n")
    err = result.stderr.decode()
    assert result.returncode == code and err.strip().splitlines()[-1] == "interrupted", err


@pytest.mark.real
def test_chat_answers_as_ask_does_with_the_default_model(tmp_path):
    """ask --cache answers with the transformers-free default model, chat with transformers' (an adapter may come):
    the same answers, streamed or not."""
    kv = tmp_path / "doc.kv"
    assert run_cli("encode", str(DEMO_DOC), "-o", str(kv)).returncode == 0
    questions = ["Who designed the lighthouse?", "When was it first lit?"]
    plain = run_cli("ask", "-c", str(kv), *questions, "--max-new-tokens", "24", "--batch-size", "1")
    streamed = run_cli("ask", "-c", str(kv), *questions, "--max-new-tokens", "24", "--batch-size", "1", "--stream")
    chat = run_cli("chat", "-c", str(kv), "--max-new-tokens", "24", "--stream", input="\n".join(questions).encode())
    assert plain.returncode == streamed.returncode == chat.returncode == 0, chat.stderr.decode()
    assert chat.stdout == streamed.stdout == plain.stdout and len(plain.stdout.splitlines()) == 2


class Terminal:
    """`loramem ARGS` on a pseudo-terminal: what it writes, read until a text shows up (bounded in time)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        pty = pytest.importorskip("pty")
        try:
            self.pid, self.fd = pty.fork()
        except OSError as exc:
            pytest.skip(f"no pseudo-terminal here: {exc}")
        if self.pid == 0:  # the child: the command, with the terminal as stdin, stdout and stderr
            try:
                os.execve(sys.executable, [sys.executable, "-m", "loramem", *args], env)
            finally:
                os._exit(127)
        self.seen = ""

    def until(self, text: str, timeout: float = 120) -> str:
        """Everything written from the last match up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                self.close()
                raise AssertionError(f"{text!r} did not show up; the terminal shows: {self.seen[-2000:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child ended: its side of the terminal is closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"{text!r} did not show up before the end: {self.seen[-2000:]!r}")
            self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        before, _, self.seen = self.seen.partition(text)
        return before + text

    def answer_begins(self, question: str) -> None:
        """Ask `question` and wait for its answer's first words."""
        self.send(question + "\r")
        self.until(question + "\n")
        deadline = time.monotonic() + 60
        while not self.seen.strip() and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.05)[0]:
                self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    os.read(self.fd, 4096)  # (what it writes last is not looked at)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        self.close()
        raise AssertionError("the session did not end")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_chat_in_a_terminal_streams_stops_an_answer_and_keeps_history(tiny_dir, caches, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "LORAMEM_QUIET": "1", "PYTHONPATH": str(REPO), "LORAMEM_HOME": str(home), "TERM": "dumb"}
    args = ["chat", "--cache", str(caches["full"]), "--model", str(tiny_dir), "--max-new-tokens", "8"]
    term = Terminal(args, env)
    assert "earlier questions and answers are not context" in term.until("> ")
    term.send(QUESTIONS[0] + "\r")
    shown = term.until("\n> ")
    assert asked(tiny_dir, caches["full"], [QUESTIONS[0]]) in shown
    term.send("/cache none\r")
    assert "memory: none (closed-book)" in term.until("\n> ")
    term.send("/help\r")
    assert "/compress PRESS RATIO" in term.until("\n> ")
    term.close()
    # a long closed-book answer, stopped by Ctrl-C once it has begun: back at the prompt; Ctrl-C there ends (exit 0)
    term = Terminal([*args[:1], *args[3:-1], "1000"], env)
    term.until("> ")
    term.answer_begins("Tell me everything you know.")
    term.send("\x03")
    assert "(stopped)" in term.until("\n> ", timeout=60)
    time.sleep(0.5)  # a Ctrl-C within microseconds of the prompt waits for the next key (Python's readline loop)
    term.send("\x03")
    assert term.exit_code() == 0
    assert "Tell me everything you know." in (home / "chat_history").read_text()
    # SIGTERM is no Ctrl-C: it ends the session, in an answer too (143)
    term = Terminal([*args[:1], *args[3:-1], "1000"], env)
    term.until("> ")
    term.answer_begins("And then?")
    os.kill(term.pid, signal.SIGTERM)
    assert term.exit_code() == 143
