"""The `loramem` command line: a thin Typer layer over the library API, one module per command group.

Results go to stdout, progress and logs to stderr. Exit codes (see `app.main`): 0 success, 1 internal error,
2 usage or bad input (also a bare `loramem`, which prints the help), 3 incompatible artifact (another model,
tokenizer, adapter or format), 4 an eval finished with failed cells (the rest is written; rerun with --resume),
130 on SIGINT, 143 on SIGTERM.
"""

# isort: off
# Commands register on import; this order is the order `loramem --help` lists them (the pipeline's).
from loramem.cli import kv, inspection, adapters, ask, chat, serve, library, evaluation, data, probe, demo  # noqa: F401

# isort: on
# The Typer application is `loramem.cli.app.app`: not re-exported here, where it would hide its module.
from loramem.cli.app import main, run

__all__ = ["main", "run"]
