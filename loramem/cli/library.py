"""library add, library ls, route: many documents' adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loramem.adapters.config import SYNTH_PAIRS, TrainConfig
from loramem.cli.app import app
from loramem.cli.options import (
    DeviceOpt,
    DtypeOpt,
    Epochs,
    Format,
    JsonOpt,
    Lr,
    Rank,
    Seed,
    Steps,
    SynthModelOpt,
    TemplateKwargsOpt,
    field_flags,
    flags_named,
    load,
    print_json,
    stdout_console,
)
from loramem.fileio import check_output_path, write_stdout
from loramem.library import TOP_K
from loramem.log import log

library_app = typer.Typer(
    help="Adapter libraries: many documents, each with its adapter (and cache), routed by embeddings.",
    no_args_is_help=True,
)
app.add_typer(library_app, name="library")


@library_app.command("add")
def library_add(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder (created by the first add)"),
    documents: list[str] = typer.Argument(..., metavar="DOC...", help="Document text files"),
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", help="Copy this adapter instead of training one (one DOC)"
    ),
    doc_id: Optional[str] = typer.Option(None, "--id", help="Document id (one DOC)", show_default="the file name"),
    with_cache: bool = typer.Option(False, "--with-cache", help="Also store each document's KV cache"),
    truncate: bool = typer.Option(False, "--truncate", help="--with-cache: cut a document longer than the context"),
    embedder: Optional[Path] = typer.Option(
        None,
        "--embedder",
        help="Local sentence-embedding model directory (mean-pooled)",
        show_default="all-MiniLM-L6-v2",
    ),
    qa: Optional[str] = typer.Option(None, "--qa", help="JSONL of {question, answer} training pairs (one DOC)"),
    synth: int = typer.Option(SYNTH_PAIRS, "--synth", help="Without --qa: synthesize this many pairs per document"),
    synth_model: Optional[str] = SynthModelOpt,
    fmt: Format = TrainConfig.format,
    rank: Rank = TrainConfig.rank,
    lr: Lr = TrainConfig.lr,
    epochs: Epochs = TrainConfig.epochs,
    steps: Steps = TrainConfig.steps,
    seed: Seed = TrainConfig.seed,
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Base model", show_default="the library's, else the embedded SmolLM2-135M-Instruct"
    ),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Add documents to a library: train (or copy) each one's adapter and index its chunks; known ones are skipped."""
    from loramem.library.store import AddOptions, add_documents, open_library

    with flags_named(field_flags(["format", "rank", "lr", "epochs", "steps", "seed"])):
        config = TrainConfig(format=fmt, rank=rank, lr=lr, epochs=epochs, steps=steps, seed=seed)
    options = AddOptions(
        train=config,
        synth=synth,
        synth_model=synth_model,
        qa=qa,
        adapter=str(adapter) if adapter else None,
        doc_id=doc_id,
        with_cache=with_cache,
        truncate=truncate,
        embedder=str(embedder) if embedder else None,
    )
    if not lib.exists():
        check_output_path(lib, what="directory")  # before the model loads, not after
    recorded = open_library(lib).base_model_id if lib.exists() else None
    added = add_documents(
        lib, load(model or recorded, device, dtype, chat_template_kwargs=chat_template_kwargs), documents, options
    )
    if as_json:
        print_json(added)
    else:
        log(f"added {len(added)} document(s) to {lib}" + (f": {', '.join(d['id'] for d in added)}" if added else ""))


@library_app.command("ls")
def library_ls(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder"),
    as_json: bool = JsonOpt,
) -> None:
    """List a library's documents: id, words, adapter, cache, chunks."""
    from loramem.library.store import open_library

    documents = open_library(lib).documents
    if as_json:
        print_json(documents)
        return
    from rich.table import Table

    table = Table("id", "words", "adapter", "cache", "chunks")
    for doc in documents:
        adapter = f"rank {doc['adapter']['rank']}, {doc['adapter']['format'] or '-'}"
        table.add_row(doc["id"], str(doc["words"]), adapter, "yes" if doc["cache"] else "no", str(doc["chunks"]))
    stdout_console().print(table)


@app.command()
def route(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder"),
    question: str = typer.Argument(..., help="The question to route"),
    top_k: int = typer.Option(TOP_K, "--top-k", "-k", help="How many documents to return"),
    as_json: bool = JsonOpt,
) -> None:
    """Rank a library's documents for a question by their best chunk's cosine similarity."""
    from loramem.library.store import route as route_question

    ranked = route_question(lib, question, top_k)
    if as_json:
        print_json({"question": question, "documents": [{"id": i, "score": round(s, 6)} for i, s in ranked]})
        return
    write_stdout("".join(f"{doc_id}\t{score:.4f}\n" for doc_id, score in ranked))
