"""data: convert datasets, generate invented fiction."""

from __future__ import annotations

import typer

from loramem.cli.app import app
from loramem.cli.specopts import FROM_SPEC, with_specs
from loramem.errors import LoramemError
from loramem.log import log
from loramem.specs.data import ConvertSpec, FictionSpec
from loramem.vocab import DATASET_LAYOUTS

data_app = typer.Typer(
    help="Datasets for eval: convert known layouts, generate invented fiction.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("convert")
@with_specs(spec=ConvertSpec)
def data_convert(
    layout: str = typer.Argument(
        ...,
        help="narrativeqa (official qaps.csv + summaries.csv repo), "
        "narrativeqa-json (tokenized JSON/zip), longhealth, squad",
    ),
    source: str = typer.Argument(..., help="The dataset file or folder"),
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL (- for stdout)"),
    spec: ConvertSpec = FROM_SPEC,
) -> None:
    """Convert a QA dataset into loramem's JSONL format (one document per line)."""
    from loramem.data import formats as datasets

    converters = {
        "narrativeqa": lambda: datasets.convert_narrativeqa(source, split=spec.split),
        "narrativeqa-json": lambda: datasets.convert_narrativeqa_json(source),
        "longhealth": lambda: datasets.convert_longhealth(source),
        "squad": lambda: datasets.convert_squad(source),
    }
    if layout not in converters:
        raise LoramemError(f"unknown layout {layout!r}; use one of {', '.join(DATASET_LAYOUTS)}")
    records = converters[layout]()
    if spec.train_split:
        records = datasets.train_split(records, spec.train_split, spec.seed)
    datasets.write_dataset(records, output)
    log(
        f"{len(records)} documents, {sum(len(r.qa) for r in records)} held-out questions, "
        f"{sum(len(r.train_qa) for r in records)} training pairs"
    )


@data_app.command("synth-fiction")
@with_specs(spec=FictionSpec)
def data_synth_fiction(
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL (- for stdout)"),
    spec: FictionSpec = FROM_SPEC,
) -> None:
    """Generate invented documents (facts no model can know) with training and held-out QA."""
    from loramem.data.fiction import synth_fiction
    from loramem.data.formats import write_dataset

    write_dataset(synth_fiction(spec.n_docs, spec.seed), output)
