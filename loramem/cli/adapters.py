"""train-adapter and merge: the document LoRA's commands."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from loramem.adapters.config import SYNTH_PAIRS, MergeConfig, TrainConfig
from loramem.cli.app import app
from loramem.cli.options import (
    Alpha,
    BatchSize,
    DeviceOpt,
    Dropout,
    DtypeOpt,
    Epochs,
    Format,
    JsonOpt,
    Layers,
    Lr,
    ModelOpt,
    Rank,
    Seed,
    Steps,
    SynthModelOpt,
    Targets,
    TemplateKwargsOpt,
    field_flags,
    flags_named,
    load,
    print_json,
    split_list,
)
from loramem.errors import LoramemError
from loramem.fileio import check_output_path
from loramem.log import log


@app.command("train-adapter")
def train_adapter(
    document: str = typer.Argument(..., help="Document text file, or - for stdin"),
    output: Path = typer.Option(..., "-o", "--output", help="Output adapter directory (PEFT layout)"),
    qa: Optional[str] = typer.Option(None, "--qa", help="JSONL of {question, answer} training pairs"),
    synth: int = typer.Option(
        SYNTH_PAIRS, "--synth", help="Without --qa: synthesize this many pairs from the document"
    ),
    synth_model: Optional[str] = SynthModelOpt,
    fmt: Format = TrainConfig.format,
    rank: Rank = TrainConfig.rank,
    alpha: Alpha = TrainConfig.alpha,
    dropout: Dropout = TrainConfig.dropout,
    targets: Targets = TrainConfig.targets,
    layers: Layers = TrainConfig.layers,
    lr: Lr = TrainConfig.lr,
    epochs: Epochs = TrainConfig.epochs,
    steps: Steps = TrainConfig.steps,
    batch_size: BatchSize = TrainConfig.batch_size,
    seed: Seed = TrainConfig.seed,
    max_length: int = typer.Option(TrainConfig.max_length, "--max-length", help="Tokens per training example"),
    chunk_size: int = typer.Option(TrainConfig.chunk_size, "--chunk-size", help="ntp: tokens per training chunk"),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter folder (one that loramem wrote)"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a document LoRA (QA-supervised, raw-text or mixed) as a standard PEFT adapter directory."""
    from loramem.adapters.synth import check_synth_request, training_pairs
    from loramem.adapters.train import train_adapter as train
    from loramem.data.formats import load_qa_pairs
    from loramem.fileio import read_text
    from loramem.log import progress_bar

    text = read_text(document)
    check_output_path(output, force, "adapter", inputs=[document, qa])
    with flags_named(field_flags([f.name for f in fields(TrainConfig)])):
        config = TrainConfig(
            format=fmt,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            targets=targets,
            layers=layers,
            lr=lr,
            epochs=epochs,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            max_length=max_length,
            chunk_size=chunk_size,
        )
    pairs, qa_sha = load_qa_pairs(qa) if qa else (None, None)
    given = None if pairs is None else [(p.question, p.answer) for p in pairs]
    check_synth_request(fmt, synth_model, given is not None)
    lm = load(model, device, dtype, chat_template_kwargs=chat_template_kwargs)
    qa_pairs, written_by = training_pairs(lm, text, fmt, given, synth, seed, synth_model)
    with progress_bar("training", None) as advance:
        summary = train(
            lm,
            text,
            qa_pairs,
            output,
            config,
            force=force,
            qa_file_sha256=qa_sha,
            qa_written_by=written_by,
            on_step=lambda step, total, loss: advance(1, total=total, status=f"loss {loss:.3f}"),
        )
    if as_json:
        print_json(summary)
    else:
        log(f"adapter written to {output}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")


@app.command("merge")
def merge_cmd(
    adapters: list[Path] = typer.Argument(..., metavar="ADAPTER...", help="PEFT LoRA adapter directories (2 or more)"),
    output: Path = typer.Option(..., "-o", "--output", help="Output adapter directory (PEFT layout)"),
    method: str = typer.Option(
        MergeConfig.method,
        "--method",
        help="ties, linear, cat, dare_ties or svd (PEFT's "
        "add_weighted_adapter; cat keeps every adapter's update exactly, rank = sum)",
    ),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="One weight per adapter, e.g. 1,1,0.5", show_default="1 each"
    ),
    density: float = typer.Option(
        MergeConfig.density, "--density", help="ties, dare_ties: fraction of entries kept, in (0, 1]"
    ),
    seed: int = typer.Option(MergeConfig.seed, "--seed", help="dare_ties: seed of the random drop"),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter folder (one that loramem wrote)"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Base model to load the adapters onto", show_default="the one the adapters name"
    ),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Combine document adapters into one PEFT LoRA adapter, recording its sources."""
    from loramem.adapters.merge import base_model_id, check_sources, merge_adapters

    try:
        parsed = [float(w) for w in split_list(weights)] if weights is not None else None
    except ValueError as exc:
        raise LoramemError(f"--weights must be numbers separated by commas, got {weights!r}") from exc
    config = MergeConfig(method=method, weights=parsed, density=density, seed=seed)
    check_output_path(output, force, "adapter", inputs=adapters)
    sources = check_sources(adapters, config)
    lm = load(model or base_model_id(sources), device, dtype, chat_template_kwargs=chat_template_kwargs)
    summary = merge_adapters(lm, adapters, output, config, force=force)
    if as_json:
        print_json(summary)
    else:
        log(f"merged {summary['n_sources']} adapters ({method}, rank {summary['rank']}) -> {output}")
