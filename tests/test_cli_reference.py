"""docs/cli.md is the `--help` of every command as it is now; regenerate it when an option or help text changes."""

from __future__ import annotations

from pathlib import Path

from loramem.cli.reference import COMMAND, WIDTH, reference

CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_cli_reference_is_current():
    current = reference()
    assert CLI_MD.read_text() == current, f"docs/cli.md is stale; regenerate it with: {COMMAND}"


def test_cli_reference_is_plain_fixed_width_and_names_its_command(monkeypatch):
    monkeypatch.setenv("COLUMNS", "37")
    monkeypatch.setenv("FORCE_COLOR", "1")
    text = reference()
    assert COMMAND in text.split("\n\n")[1]
    assert "\x1b" not in text
    assert max(len(line) for line in text.splitlines() if line.startswith(("│", "╭", "╰"))) == WIDTH
    for command in ("encode", "compress", "ask", "train-adapter", "eval run", "library add", "data convert", "demo"):
        assert f"## loramem {command}\n" in text
