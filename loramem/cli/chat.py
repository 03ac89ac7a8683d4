"""chat: one question per line over one document memory, the model loaded once, answers streamed.

Each question is answered from the memory alone, as `ask` answers it: earlier questions and answers are not
context (the setting loramem studies is single-turn). Lines starting with `/` are commands that change what is
loaded. On a terminal the session has line editing and a history kept in `$LORAMEM_HOME/chat_history` (where
Python's `readline` is available); Ctrl-C stops the answer being written and returns to the prompt, Ctrl-C at the
prompt or Ctrl-D ends the session (exit 0). From a pipe it answers one line per question (an empty line for a
question it could not answer), prompts nothing, accepts the same commands, and exits 2 if any line failed.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import typer

from loramem.cli.app import app, os_error_message, print_error, take_interrupt
from loramem.cli.ask import streams
from loramem.cli.specopts import FROM_SPEC, Use, with_specs
from loramem.errors import LoramemError
from loramem.fileio import StdoutClosed, stdout_is_terminal, write_stdout
from loramem.log import console, log
from loramem.memory import adapter_on, open_memory
from loramem.specs import AskSpec, ModelSpec
from loramem.specs.base import leaves
from loramem.text import one_line
from loramem.vocab import ASK_MODES, AdapterMode

if TYPE_CHECKING:
    from loramem.kv.cache import KVCache
    from loramem.model.loading import LoadedModel

PROMPT = "> "
HISTORY_FILE = "chat_history"
HISTORY_LINES = 1000
SINGLE_TURN = "each question is answered from the document memory alone: earlier questions and answers are not context"
HELP = f"""Type a question and press Enter; {SINGLE_TURN}.
  /cache PATH           answer from this stored cache (/cache none: closed-book)
  /adapter PATH         attach this LoRA adapter (/adapter none: the base model)
  /mode none|decode|all which passes use the adapter (decode: question and answer; all: also a cache encoded
                        with it)
  /compress PRESS RATIO evict RATIO of the loaded cache's tokens by PRESS's recorded scores (0: all of it kept)
  /info                 what is loaded
  /help                 this help
  /quit                 end the session (also Ctrl-D, or Ctrl-C at the prompt)"""
# ask's settings but the library's (a library routes each question to its own adapters: ask --library) and the
# batches' (a chat answers one question at a time)
NOT_IN_CHAT = frozenset(
    path
    for path, _, _ in leaves(AskSpec)
    if path[0] in ("library", "route") or path in (("answer", "batch_size"), ("answer", "max_batch_tokens"))
)


class CommandError(LoramemError):
    """A command the session does not know, or one given wrongly."""


@dataclass
class Session:
    """What a chat has loaded and answers from: the model, the cache as loaded (or encoded) and as compressed."""

    lm: LoadedModel
    spec: AskSpec
    original: KVCache | None
    memory: str  # what the cache is, for /info
    cache: KVCache | None = None
    compression: str = ""
    mode: AdapterMode | None = None  # as given; None: decode with an adapter, else none
    interactive: bool = False
    stream: bool = False
    failed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.cache, self.mode = self.original, self.spec.adapter_mode

    @property
    def adapter_mode(self) -> AdapterMode:
        return self.mode or ("decode" if self.lm.adapter is not None else "none")

    def line(self, line: str) -> bool:
        """Handle one input line; False once the session should end."""
        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("/"):
                return self.command(text)
            self.answer(text)
        except KeyboardInterrupt:
            if not (self.interactive and take_interrupt()):
                raise
            self.say("(stopped)")
        except StdoutClosed:  # nobody reads the answers any more
            raise
        except (LoramemError, OSError) as exc:
            self.failed = True
            print_error(os_error_message(exc) if isinstance(exc, OSError) else str(exc))
            if not text.startswith("/") and not self.interactive:
                write_stdout("\n")  # one line per question, answered or not
        return True

    def command(self, text: str) -> bool:
        try:
            name, *args = shlex.split(text)
        except ValueError as exc:
            raise CommandError(f"{text}: {exc}") from exc
        if name in ("/quit", "/exit"):
            return False
        handlers: dict[str, Callable[[list[str]], None]] = {
            "/cache": self.use_cache,
            "/adapter": self.use_adapter,
            "/mode": self.use_mode,
            "/compress": self.compress,
            "/info": lambda args: self.say(self.info()),
            "/help": lambda args: self.say(HELP),
        }
        if name not in handlers:
            raise CommandError(f"unknown command {name}; /help lists them")
        handlers[name](args)
        return True

    def say(self, text: str) -> None:
        """A command's reply: on stderr, so stdout holds the answers alone (one line per question from a pipe)."""
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    def use_cache(self, args: list[str]) -> None:
        from loramem.kv.cache import KVCache, check_compatible

        path = _one(args, "/cache PATH")
        cache = None if path == "none" else KVCache.load(path)
        if cache is not None:
            check_compatible(cache, self.lm.fingerprint, path, self.lm)
        adapter_on(self.lm, self.adapter_mode, cache)  # refused now, not at the next question
        self.original = self.cache = cache
        self.memory, self.compression = ("none (closed-book)" if cache is None else f"cache {path}"), ""
        self.say(self.info())

    def use_adapter(self, args: list[str]) -> None:
        from loramem.adapters.attach import attach_adapter, detach_adapter

        path = _one(args, "/adapter PATH")
        if path == "none":
            detach_adapter(self.lm)
            self.mode = "none" if self.mode == "none" else None
        else:
            try:
                attach_adapter(self.lm, path)
            finally:
                if self.lm.adapter is None and self.mode != "none":  # a failed attach leaves the base model
                    self.mode = None
        self.say(self.info())

    def use_mode(self, args: list[str]) -> None:
        mode = _one(args, f"/mode {'|'.join(ASK_MODES)}")
        if mode not in ASK_MODES:
            raise CommandError(f"unknown mode {mode}; use one of {', '.join(ASK_MODES)}")
        if mode != "none" and self.lm.adapter is None:
            raise CommandError(f"mode {mode} needs an adapter: /adapter PATH first")
        adapter_on(self.lm, cast(AdapterMode, mode), self.cache)
        self.mode = cast(AdapterMode, mode)
        self.say(self.info())

    def compress(self, args: list[str]) -> None:
        from loramem.kv.compression import compress_cache
        from loramem.specs import CompressSpec

        if len(args) != 2:
            raise CommandError("usage: /compress PRESS RATIO (e.g. /compress snapkv 0.5)")
        if self.original is None:
            raise CommandError("no cache is loaded: /cache PATH first")
        spec = CompressSpec.parse({"press": args[0], "ratio": args[1]}, source="/compress")
        self.cache = compress_cache(self.original, spec)
        self.compression = f", compressed by {spec.press} at ratio {spec.ratio:g}" if spec.ratio else ""
        self.say(self.info())

    def info(self) -> str:
        kept = ""
        if self.cache is not None:
            held = max(self.cache.kept_per_layer, default=0)
            kept = f" ({held} of {self.cache.n_tokens} tokens kept{self.compression})"
        adapter = self.lm.adapter.path if self.lm.adapter is not None else "none"
        return f"memory: {self.memory}{kept}; adapter: {adapter}; mode: {self.adapter_mode}"

    def answer(self, question: str) -> None:
        from loramem.answer import StreamedAnswers, answer_batch

        streamed = StreamedAnswers(self.lm.tokenizer, 1, write_stdout, not self.interactive) if self.stream else None
        try:
            answer = answer_batch(
                self.lm,
                [question],
                self.cache,
                max_new_tokens=self.spec.answer.max_new_tokens,
                adapter_on=adapter_on(self.lm, self.adapter_mode, self.cache),
                framing=self.spec.framing,
                batch_size=1,
                on_token=streamed,
            )[0]
        except KeyboardInterrupt:
            if self.interactive and streamed is not None and streamed.mid_line:
                write_stdout("\n")  # the prompt on a line of its own (from a pipe, stdout is left as it is)
            raise
        if streamed is None:
            write_stdout((answer.answer if self.interactive else one_line(answer.answer)) + "\n")


def _one(args: list[str], usage: str) -> str:
    if len(args) != 1:
        raise CommandError(f"usage: {usage}")
    return args[0]


@app.command()
@with_specs(spec=Use(AskSpec, exclude=NOT_IN_CHAT), model=ModelSpec)
def chat(spec: AskSpec = FROM_SPEC, model: ModelSpec = FROM_SPEC) -> None:
    """Ask question after question over one memory (a cache, a document, an adapter, or none), the model loaded
    once: each answered from the memory alone, earlier turns are not context. /help lists the commands."""
    from loramem.fileio import read_text
    from loramem.kv.cache import KVCache

    if "-" in (spec.cache, spec.doc):
        raise LoramemError("chat reads its questions from stdin; give the cache or document as a file")
    interactive = sys.stdin is not None and sys.stdin.isatty()
    cache = KVCache.load(spec.cache) if spec.cache else None
    text = read_text(spec.doc) if spec.doc else None
    # an adapter may be attached later (/adapter): the model loads with transformers
    lm, cache, _ = open_memory(spec, model, cache, text, [], answer_only=False)
    memory = f"cache {spec.cache}" if spec.cache else f"document {spec.doc}" if spec.doc else "none (closed-book)"
    session = Session(lm, spec, cache, memory, interactive=interactive, stream=streams(spec, False))
    adapter_on(lm, session.adapter_mode, cache)
    start = f"{session.info()}\n{SINGLE_TURN[:1].upper()}{SINGLE_TURN[1:]}. /help lists the commands."
    if interactive:
        session.say(start)
    else:
        for line in start.splitlines():
            log(line)
    for line in _lines(interactive):
        if not session.line(line):
            break
    if session.failed and not interactive:
        raise typer.Exit(2)  # each failed line was reported as it came


def _lines(interactive: bool) -> Iterator[str]:
    """The session's input lines: from a pipe as they come; on a terminal with a prompt, history and line editing,
    until EOF, /quit or Ctrl-C at the prompt."""
    if not interactive:
        yield from sys.stdin
        return
    with _history():
        while True:
            try:
                yield input(PROMPT) if stdout_is_terminal() else _input_prompted_on_stderr()
            except EOFError:
                write_stdout("\n")
                return
            except KeyboardInterrupt:
                if not take_interrupt():
                    raise
                write_stdout("\n")
                return


def _input_prompted_on_stderr() -> str:
    """stdout is not the terminal (it is a file or a pipe): the prompt goes to stderr, the answers alone to stdout."""
    sys.stderr.write(PROMPT)
    sys.stderr.flush()
    return input()


@contextmanager
def _history() -> Iterator[None]:
    """readline's line editing, with the history of earlier sessions in $LORAMEM_HOME/chat_history (not kept where
    it cannot be read or written)."""
    try:
        import readline
    except ImportError:  # (Windows, some minimal Pythons): plain input()
        yield
        return
    from loramem.model.loading import loramem_home

    path = loramem_home() / HISTORY_FILE
    with suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LINES)
    try:
        yield
    finally:
        with suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
