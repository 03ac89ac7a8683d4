"""Logging and progress on stderr, so that stdout carries results only."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


def log(message: str) -> None:
    if not os.environ.get("LORAMEM_QUIET"):
        console.print(f"[dim]loramem:[/dim] {message}", highlight=False)


def warn(message: str) -> None:
    """One line on stderr whatever its length (not wrapped to the terminal's width), so scripts can grep it."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Silence the progress bars and advice that transformers and friends print to stdout/stderr."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kvpress").setLevel(logging.ERROR)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (hidden when LORAMEM_QUIET is set); yields `advance(n, **fields)`."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=True, disable=bool(os.environ.get("LORAMEM_QUIET"))) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields: Any) -> None:
            progress.update(task, advance=n, **fields)

        yield advance
