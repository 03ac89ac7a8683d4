"""train-adapter and merge: the document LoRA's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import ForceOpt, JsonOpt, print_json
from loramem.cli.specopts import FROM_SPEC, Use, with_specs
from loramem.fileio import check_output_path
from loramem.log import log
from loramem.memory import load
from loramem.specs import MergeSpec, ModelSpec, SynthSpec, TrainSpec

# One release accepts the old spelling of the training batch (`--batch-size` now means a decoding batch).
OLD_TRAIN_BATCH: dict[tuple[str, ...], str] = {("batch_size",): "--batch-size"}


@app.command("train-adapter")
@with_specs(train=Use(TrainSpec, old=OLD_TRAIN_BATCH), synth=SynthSpec, model=ModelSpec)
def train_adapter(
    document: str = typer.Argument(..., help="Document text file, or - for stdin"),
    output: Path = typer.Option(..., "-o", "--output", help="Output adapter directory (PEFT layout)"),
    qa: Optional[str] = typer.Option(None, "--qa", help="JSONL of {question, answer} training pairs"),
    train: TrainSpec = FROM_SPEC,
    synth: SynthSpec = FROM_SPEC,
    force: bool = ForceOpt,
    model: ModelSpec = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Train a document LoRA (QA-supervised, raw-text or mixed) as a standard PEFT adapter directory."""
    from loramem.adapters.train import train_adapter as train_document
    from loramem.adapters.validate import is_adapter_folder
    from loramem.data.formats import load_qa_pairs
    from loramem.data.synth import check_synth_request, training_pairs
    from loramem.data.views import training_views
    from loramem.fileio import read_text
    from loramem.log import progress_bar

    text = read_text(document)
    check_output_path(output, force, "adapter", inputs=[document, qa], ours=is_adapter_folder)
    pairs, qa_sha = load_qa_pairs(qa) if qa else (None, None)
    given = None if pairs is None else [(p.question, p.answer) for p in pairs]
    check_synth_request(train.format, synth.model, given is not None)
    lm = load(model)
    qa_pairs, written_by = training_pairs(lm, text, train.format, given, synth.pairs, train.seed, synth.model)
    views = training_views(lm, text, train.format, synth.model)
    with progress_bar("training", None) as advance:
        summary = train_document(
            lm,
            text,
            qa_pairs,
            output,
            train,
            force=force,
            qa_file_sha256=qa_sha,
            qa_written_by=written_by,
            on_step=lambda step, total, loss: advance(1, total=total, status=f"loss {loss:.3f}"),
            views=views,
        )
    if as_json:
        print_json(summary)
    else:
        log(f"adapter written to {output}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")


@app.command("merge")
@with_specs(
    spec=MergeSpec,
    model=Use(ModelSpec, given=True),
)
def merge_cmd(
    adapters: list[Path] = typer.Argument(..., metavar="ADAPTER...", help="PEFT LoRA adapter directories (2 or more)"),
    output: Path = typer.Option(..., "-o", "--output", help="Output adapter directory (PEFT layout)"),
    spec: MergeSpec = FROM_SPEC,
    force: bool = ForceOpt,
    model: dict[str, Any] = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Combine document adapters into one PEFT LoRA adapter (PEFT's add_weighted_adapter), recording its sources;
    the base model is the one the adapters name unless --model says otherwise."""
    from loramem.adapters.merge import base_model_id, check_sources, merge_adapters
    from loramem.adapters.validate import is_adapter_folder

    check_output_path(output, force, "adapter", inputs=adapters, ours=is_adapter_folder)
    sources = check_sources(adapters, spec)
    lm = load(ModelSpec.parse({"model": base_model_id(sources), **model}))
    summary = merge_adapters(lm, adapters, output, spec, force=force)
    if as_json:
        print_json(summary)
    else:
        log(f"merged {summary['n_sources']} adapters ({spec.method}, rank {summary['rank']}) -> {output}")
