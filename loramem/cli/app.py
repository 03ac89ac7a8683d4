"""The `loramem` Typer application and its entry point: one-line errors and the exit-code contract.

0 success; 1 internal error (a bug: LORAMEM_DEBUG=1 shows the traceback); 2 usage or bad input, including a
bare `loramem` (it prints the help, but no command is a usage error to a script: git exits 1, click >= 8.2 2);
3 incompatible artifact; 4 an eval finished with failed cells; 128 + N on signal N (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any, NoReturn, Optional

import typer
from rich.markup import escape

from loramem.errors import LoramemError
from loramem.fileio import EXIT_BROKEN_PIPE, check_working_directory, flush_stdout
from loramem.log import console

HELP_NAMES = ["-h", "--help"]
app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_NAMES},
)

PARTIAL_EXIT = 4
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# typer bundles its own click in recent versions, plain click in older ones: take the classes it really raises.
_click_errors = sys.modules[typer.BadParameter.__module__]
_received: list[int] = []  # the first interrupting signal, which decides the exit code
_exiting: list[bool] = []  # set once the interrupt is reported: a late re-delivery must not replace the exit


def _show_version(value: bool) -> None:
    if value:
        from loramem._version import __version__

        sys.stdout.write(f"loramem {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_show_version, is_eager=True, help="Print the version and exit"
    ),
) -> None:
    """Document memory for language models: KV caches and LoRA adapters as files."""


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM unwind like Ctrl-C, so the `finally` blocks remove half-written outputs."""
    if not _received:
        _received.append(signum)
    if not _exiting:
        raise KeyboardInterrupt


def _redeliver(signum: int, frame: Any) -> None:
    if _received and not _exiting:
        raise KeyboardInterrupt


def _swallowed_interrupt(unraisable: Any) -> None:
    """Python ignores an exception raised in a finalizer (`__del__`), so a signal landing there would be lost
    (with an "Exception ignored" traceback): deliver the interrupt again from a timer a moment later."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _received:
        if _exiting:
            return
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    sys.__unraisablehook__(unraisable)


def print_error(message: str) -> None:
    """An error as the one line on stderr that every command prints (`chat` goes on after it)."""
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def os_error_message(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _fail(message: str, code: int) -> NoReturn:
    print_error(message)
    sys.exit(code)


def take_interrupt() -> bool:
    """For a command that handles Ctrl-C itself (`chat` stops one answer and goes on): True for a SIGINT (or a
    KeyboardInterrupt no signal caused), which is then forgotten, so the command's own exit code stands; False for
    SIGTERM, which must still end the command (143)."""
    if _received and _received[0] != signal.SIGINT:
        return False
    _received.clear()
    signal.setitimer(signal.ITIMER_REAL, 0)  # no re-delivery of the interrupt just handled
    return True


def _interrupted() -> NoReturn:
    _exiting.append(True)
    signal.setitimer(signal.ITIMER_REAL, 0)  # a pending re-delivery would turn the exit into a death by SIGINT
    console.print("[red]interrupted[/red]", highlight=False)
    # CPython marks a KeyboardInterrupt raised inside string-`exec`'d code (dataclasses builds `__init__` that
    # way) as "unhandled" even when caught, and then ends the process by SIGINT whatever the exit code; the next
    # string exec clears that mark, so the exit is 128 + the signal received.
    exec("None")
    sys.exit(128 + (_received[0] if _received else signal.SIGINT))


def _usage_error(exc: Any) -> NoReturn:
    """A click usage error as one line: the message and where to find the command's help."""
    if isinstance(exc, _click_errors.NoArgsIsHelpError):
        if exc.format_message():  # rich help is printed while the error is made; plain help is its message
            sys.stderr.write(exc.format_message().rstrip("\n") + "\n")
        sys.exit(exc.exit_code)
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and isinstance(exc, _click_errors.UsageError):
        message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
    _fail(message, exc.exit_code)


_built: dict[tuple[int, int], Any] = {}


def click_command() -> Any:
    """`app` as the click command typer builds from it (~20 ms: every command's signature), once per set of
    registered commands; called directly rather than through `app()`, which also replaces `sys.excepthook`."""
    key = (len(app.registered_commands), len(app.registered_groups))
    if key not in _built:
        _built[key] = _plain_help(typer.main.get_command(app))
    return _built[key]


def _plain_help(command: Any) -> Any:
    """--help as click tools show it: a flag with no type beside it, values as TEXT, INTEGER, FLOAT or PATH, and
    arguments by name; typer >= 0.2x would otherwise print `<bool>`, `<str>` and `{document}`. Applied to this
    command tree's own option objects (nothing global changes)."""
    context = typer.Context(command, help_option_names=HELP_NAMES)
    help_option = command.get_help_option(context) if hasattr(command, "get_help_option") else None
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper() + ("..." if param.nargs != 1 else "")
            param.display_type_rich = lambda ctx: None
        elif param.metavar is not None:
            continue
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        else:
            param.metavar = _value_name(param)
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)
    return command


def _value_name(param: Any) -> str:
    """TEXT, INTEGER, FLOAT or PATH for an option: from click's type, or typer's own annotation where it has one."""
    name = getattr(getattr(param, "type", None), "name", None)
    if name is None:
        described = getattr(param, "type_descriptor", None)
        name = "path" if getattr(described, "is_path", False) else getattr(described, "annotation", str).__name__
    return {"int": "INTEGER", "integer": "INTEGER", "float": "FLOAT", "path": "PATH"}.get(str(name).lower(), "TEXT")


def main(args: Optional[list[str]] = None) -> NoReturn:
    """Entry point: one-line errors, meaningful exit codes, no tracebacks unless LORAMEM_DEBUG=1."""
    for signum in INTERRUPT_SIGNALS:
        signal.signal(signum, _on_signal)
    signal.signal(signal.SIGALRM, _redeliver)
    sys.unraisablehook = _swallowed_interrupt
    _received.clear()
    _exiting.clear()
    try:
        check_working_directory()
        # Not standalone, so that errors reach the mapping below; the return value is the exit code that
        # `typer.Exit(n)` asked for (4 for failed eval cells), or 130 for a KeyboardInterrupt typer caught.
        code = click_command()(args=args, prog_name="loramem", standalone_mode=False)
        flush_stdout()  # a full disk or closed pipe is reported here, not at interpreter exit
    except LoramemError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except BrokenPipeError:  # a write that bypassed fileio.write_stdout: the same exit, 128 + SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    except _click_errors.ClickException as exc:
        _usage_error(exc)
    except typer.Abort:
        _interrupted()
    except typer.Exit as exc:
        code = exc.exit_code
    except OSError as exc:
        if os.environ.get("LORAMEM_DEBUG"):
            raise
        _fail(os_error_message(exc), 2)
    except Exception as exc:
        if os.environ.get("LORAMEM_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        console.print(
            f"[red]internal error:[/red] {escape(message)} (set LORAMEM_DEBUG=1 for details)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if _received or code == 130:
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def run() -> NoReturn:
    """The `loramem` command (console script and `python -m loramem`): `main`, then an exit that skips CPython's
    interpreter teardown, which with torch loaded costs every one-off command ~0.5 s (module and library
    finalizers). Nothing is pending by then (outputs are written atomically and stdout is flushed by `main`), and
    the atexit handlers (Ray's shutdown, logging) still run. `main` alone keeps normal exits for in-process use."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # a signal that landed as `main` was exiting: an interrupt all the same, no traceback
        code = 128 + (_received[0] if _received else signal.SIGINT)
    for signum in INTERRUPT_SIGNALS:  # the work is done and its exit code decided
        signal.signal(signum, signal.SIG_IGN)
    if not isinstance(code, int):  # sys.exit("message") semantics
        if code is not None:
            sys.stderr.write(f"{code}\n")
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None when the process started with it closed
                stream.flush()
        except (OSError, ValueError):  # stdout was already checked; nothing more can be reported
            pass
    os._exit(code)
