"""The `loramem` Typer application and its entry point: one-line errors and the exit-code contract."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import typer

from loramem.errors import LoramemError
from loramem.log import console

app = typer.Typer(
    help="Document memory for language models: KV caches and LoRA adapters as files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PARTIAL_EXIT = 4


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: one-line errors, meaningful exit codes, no tracebacks unless LORAMEM_DEBUG=1."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(standalone_mode=False)
    except LoramemError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if os.environ.get("LORAMEM_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        console.print(f"[red]internal error:[/red] {message} (set LORAMEM_DEBUG=1 for details)", highlight=False)
        sys.exit(1)
