"""probe capacity: how much a LoRA holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import (
    DeviceOpt,
    DtypeOpt,
    Epochs,
    JsonOpt,
    Layers,
    Lr,
    ModelOpt,
    Targets,
    TemplateKwargsOpt,
    integers,
    load,
    print_json,
    stdout_console,
)
from loramem.evaluation.config import ProbeConfig

probe_app = typer.Typer(help="Probes of what adapters can hold.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")
_DEFAULTS = ProbeConfig()  # the only source of the command's defaults


@probe_app.command("capacity")
def probe_capacity(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for capacity.json, capacity.png and the adapters"),
    ranks: str = typer.Option(",".join(map(str, _DEFAULTS.ranks)), "--ranks", help="LoRA ranks"),
    facts: str = typer.Option(
        ",".join(map(str, _DEFAULTS.facts)), "--facts", help="Fact-set sizes (invented phone numbers)"
    ),
    targets: Targets = ProbeConfig.targets,
    layers: Layers = ProbeConfig.layers,
    epochs: Epochs = ProbeConfig.epochs,
    lr: Lr = ProbeConfig.lr,
    threshold: float = typer.Option(
        ProbeConfig.threshold, "--threshold", help="Recall that counts as stored, for saturation"
    ),
    seed: int = typer.Option(ProbeConfig.seed, "--seed", help="Seed of the phone books and of the training"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train one adapter per (rank, number of facts) on invented facts and measure exact-match recall."""
    from loramem.evaluation.probe import run_probe
    from loramem.log import progress_bar

    config = ProbeConfig(
        ranks=integers(ranks, "--ranks"),
        facts=integers(facts, "--facts"),
        targets=targets,
        layers=layers,
        epochs=epochs,
        threshold=threshold,
        seed=seed,
        lr=lr,
    )
    lm = load(model, device, dtype, chat_template_kwargs=chat_template_kwargs)
    with progress_bar("probing", len(config.ranks) * len(config.facts) * 2) as advance:
        result = run_probe(lm, config, out, on_step=lambda text: advance(1, status=text))
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    from loramem.fileio import write_stdout

    table = Table(
        title=f"LoRA capacity · {result['model']} · targets {targets}" + (f" · layers {layers}" if layers else "")
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
            f"facts (recall >= {threshold}); at most {s['max_facts_stored']:g} stored\n"
        )
