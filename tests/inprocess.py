"""The real entry point (`loramem.cli.app.main`, with its exit-code mapping) called in this process: hundreds of
fuzz cases fit in seconds where a subprocess per case would take minutes."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
from conftest import entry_point_state, exit_code


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def invoke(capsys: pytest.CaptureFixture, *args: str) -> Result:
    """Run `loramem ARGS` as `python -m loramem` would, returning the exit code and what it printed."""
    import loramem.cli  # noqa: F401  (registers the commands)
    from loramem.cli.app import main

    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["loramem", *args]
    with entry_point_state():
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exit_code(exc)
        finally:
            sys.argv = argv
    out, err = capsys.readouterr()
    return Result(code, out, err)


def assert_refused(result: Result, codes: tuple[int, ...] = (2, 3)) -> str:
    """Exit 2 or 3 with exactly one line on stderr and no traceback; returns that line."""
    assert result.code in codes, (result.code, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]
