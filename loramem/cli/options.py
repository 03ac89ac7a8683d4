"""Options and helpers shared by the commands that are not settings of a spec (output format, --force), and the
model a command's ModelSpec names."""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Optional, cast

import typer

from loramem.errors import LoramemError

JsonOpt = typer.Option(False, "--json", help="Machine-readable output on stdout")
ForceOpt = typer.Option(False, "--force", help="Replace an existing adapter folder (one that loramem wrote)")
ForceCacheOpt = typer.Option(False, "--force", help="Replace an existing cache file (one that loramem wrote)")


def print_json(data: Any) -> None:
    from loramem.fileio import write_stdout

    write_stdout(json.dumps(data, ensure_ascii=False) + "\n")


def stdout_console() -> Any:
    """A rich Console for results on stdout whose every write is checked (`fileio.write_stdout`)."""
    from rich.console import Console

    from loramem.fileio import CheckedStdout

    return Console(file=cast(IO[str], CheckedStdout()), soft_wrap=False)


def read_questions(questions: list[str], questions_file: Optional[str], stdin_free: bool) -> list[dict[str, Any]]:
    """Questions from arguments, a file of lines or JSONL ({"question": ...}), or stdin."""
    from loramem.fileio import read_text
    from loramem.questions import parse_questions

    items = [{"question": q} for q in questions]
    text = None
    if questions_file:
        text = read_text(questions_file, what="questions file")
    elif not items and stdin_free and sys.stdin is not None and not sys.stdin.isatty():
        text = read_text("-", what="questions")
    items += parse_questions(text or "", "questions file" if questions_file else "stdin")
    if not items:
        raise LoramemError("no question given (argument, --questions FILE, or stdin)")
    return items
