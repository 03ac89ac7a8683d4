"""`python -m loramem` runs the CLI."""

from loramem.cli import run

run()
