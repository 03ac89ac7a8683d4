"""probe capacity: how much a LoRA holds."""

from __future__ import annotations

from pathlib import Path

import typer

from loramem.cli.app import app
from loramem.cli.options import JsonOpt, print_json, stdout_console
from loramem.cli.specopts import FROM_SPEC, Use, with_specs
from loramem.memory import load
from loramem.specs import ModelSpec, ProbeSpec

probe_app = typer.Typer(help="Probes of what adapters can hold.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")


@probe_app.command("capacity")
@with_specs(
    config=Use(ProbeSpec, exclude=frozenset({("train", "format"), ("train", "rank"), ("train", "alpha")})),
    model=ModelSpec,
)
def probe_capacity(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for capacity.json, capacity.png and the adapters"),
    config: ProbeSpec = FROM_SPEC,
    model: ModelSpec = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Train one adapter per (rank, number of facts) on invented facts and measure exact-match recall (each rank's
    alpha is twice the rank)."""
    from loramem.evaluation.probe import run_probe
    from loramem.log import progress_bar

    lm = load(model)
    with progress_bar("probing", len(config.ranks) * len(config.facts) * 2) as advance:
        result = run_probe(lm, config, out, on_step=lambda text: advance(1, status=text))
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    from loramem.fileio import write_stdout

    table = Table(
        title=f"LoRA capacity · {result['model']} · targets {config.train.targets}"
        + (f" · layers {config.train.layers}" if config.train.layers else "")
    )
    for column in ("rank", "facts", "trainable params", "recall", "facts stored", "facts / M params"):
        table.add_column(column, justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["rank"]),
            str(r["facts"]),
            f"{r['trainable_parameters']:,}",
            f"{r['recall']:.3f}",
            f"{r['facts_stored']:g}",
            f"{r['facts_per_million_parameters']:.2f}",
        )
    stdout_console().print(table)
    for s in result["saturation"]:
        write_stdout(
            f"rank {s['rank']}: saturates at {s['saturation_facts'] or '<' + str(config.facts[0])} "
            f"facts (recall >= {config.threshold}); at most {s['max_facts_stored']:g} stored\n"
        )
