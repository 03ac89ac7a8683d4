"""data: convert datasets, generate invented fiction."""

from __future__ import annotations

from typing import Optional

import typer

from loramem.cli.app import app
from loramem.data import FICTION_DOCS, SEED
from loramem.errors import LoramemError
from loramem.log import log

data_app = typer.Typer(
    help="Datasets for eval: convert known layouts, generate invented fiction.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

LAYOUTS = ("narrativeqa", "narrativeqa-json", "longhealth", "squad")


@data_app.command("convert")
def data_convert(
    layout: str = typer.Argument(
        ...,
        help="narrativeqa (official qaps.csv + summaries.csv repo), "
        "narrativeqa-json (tokenized JSON/zip), longhealth, squad",
    ),
    source: str = typer.Argument(..., help="The dataset file or folder"),
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL (- for stdout)"),
    split: Optional[str] = typer.Option(None, "--split", help="NarrativeQA split: train, valid or test"),
    train_split: float = typer.Option(
        0.0,
        "--train-split",
        help="Move this fraction of each document's "
        "questions into train_qa (adapter supervision), never overlapping qa",
    ),
    seed: int = typer.Option(SEED, "--seed", help="Seed of the --train-split draw"),
) -> None:
    """Convert a QA dataset into loramem's JSONL format (one document per line)."""
    from loramem.data import formats as datasets

    converters = {
        "narrativeqa": lambda: datasets.convert_narrativeqa(source, split=split),
        "narrativeqa-json": lambda: datasets.convert_narrativeqa_json(source),
        "longhealth": lambda: datasets.convert_longhealth(source),
        "squad": lambda: datasets.convert_squad(source),
    }
    if layout not in converters:
        raise LoramemError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    records = converters[layout]()
    if train_split:
        records = datasets.train_split(records, train_split, seed)
    datasets.write_dataset(records, output)
    log(
        f"{len(records)} documents, {sum(len(r.qa) for r in records)} held-out questions, "
        f"{sum(len(r.train_qa) for r in records)} training pairs"
    )


@data_app.command("synth-fiction")
def data_synth_fiction(
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL (- for stdout)"),
    n_docs: int = typer.Option(FICTION_DOCS, "--n-docs", min=1, help="Number of invented documents"),
    seed: int = typer.Option(SEED, "--seed", help="Seed of the invented documents (the same seed, the same ones)"),
) -> None:
    """Generate invented documents (facts no model can know) with training and held-out QA."""
    from loramem.data.fiction import synth_fiction
    from loramem.data.formats import write_dataset

    write_dataset(synth_fiction(n_docs, seed), output)
