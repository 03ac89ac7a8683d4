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
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Study folder (config.json, points.jsonl, capacity.json, capacity.png); a rerun continues it",
    ),
    keep_adapters: bool = typer.Option(False, "--keep-adapters", help="Keep each point's adapter in OUT/adapters"),
    report: bool = typer.Option(False, "--report", help="Train nothing: report the points already in OUT"),
    config: ProbeSpec = FROM_SPEC,
    model: ModelSpec = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Train one adapter per (rank, number of facts) on invented facts until its loss stops falling and measure
    exact-match recall (each rank's alpha is twice the rank); each rank grows its facts until recall falls below
    --stop-below. Points already in OUT are kept, so the same command resumes an interrupted study."""
    from loramem.evaluation.probe import run_probe
    from loramem.log import progress_bar

    lm = load(model)
    with progress_bar("probing", len(config.ranks) * len(config.facts)) as advance:
        result = run_probe(
            lm,
            config,
            out,
            on_step=lambda text: advance(0 if text else 1, status=text),
            keep_adapters=keep_adapters,
            train=not report,
        )
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    from loramem.fileio import write_stdout

    table = Table(
        title=f"LoRA capacity · {result['model']} · targets {config.train.targets}"
        + (f" · layers {config.train.layers}" if config.train.layers else "")
    )
    columns = ("rank", "facts", "trainable params", "recall", "facts stored", "facts / M params", "epochs", "loss")
    for column in columns:
        table.add_column(column, justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["rank"]),
            str(r["facts"]),
            f"{r['trainable_parameters']:,}",
            f"{r['recall']:.3f}",
            f"{r['facts_stored']:g}",
            f"{r['facts_per_million_parameters']:.2f}",
            f"{r['epochs']:g}" + ("" if r["converged"] else " (cap)"),
            f"{r['final_loss']:.3f}",
        )
    stdout_console().print(table)
    for s in result["saturation"]:
        held = s["saturation_facts"]
        write_stdout(
            f"rank {s['rank']}: "
            + (
                f"saturates at {held} facts ({s['saturation_facts_per_million_parameters']:g} per M params)"
                if held
                else "no size held"
            )
            + f" at recall >= {config.threshold}; at most {s['max_facts_stored']:g} stored; "
            + (
                f"below {config.stop_below} from {s['collapsed_at']} facts\n"
                if s["collapsed_at"]
                else f"no size fell below {config.stop_below} yet\n"
            )
        )
