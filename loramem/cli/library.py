"""library add, library ls, route: many documents' adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import JsonOpt, print_json, stdout_console
from loramem.cli.specopts import FROM_SPEC, Use, with_specs
from loramem.fileio import check_output_path, write_stdout
from loramem.log import log
from loramem.memory import load
from loramem.specs import EncodeSpec, ModelSpec, RouteSpec, SynthSpec, TrainSpec

library_app = typer.Typer(
    help="Adapter libraries: many documents, each with its adapter (and cache), routed by embeddings.",
    no_args_is_help=True,
)
app.add_typer(library_app, name="library")


@library_app.command("add")
@with_specs(
    train=TrainSpec,
    synth=SynthSpec,
    encoding=Use(EncodeSpec, exclude=frozenset({("score",), ("framing",)})),
    model=Use(ModelSpec, given=True),
)
def library_add(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder (created by the first add)"),
    documents: list[str] = typer.Argument(..., metavar="DOC...", help="Document text files"),
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", help="Copy this adapter instead of training one (one DOC)"
    ),
    doc_id: Optional[str] = typer.Option(None, "--id", help="Document id (one DOC)", show_default="the file name"),
    with_cache: bool = typer.Option(False, "--with-cache", help="Also store each document's KV cache"),
    embedder: Optional[Path] = typer.Option(
        None,
        "--embedder",
        help="Local sentence-embedding model directory (mean-pooled)",
        show_default="all-MiniLM-L6-v2",
    ),
    qa: Optional[str] = typer.Option(None, "--qa", help="JSONL of {question, answer} training pairs (one DOC)"),
    train: TrainSpec = FROM_SPEC,
    synth: SynthSpec = FROM_SPEC,
    encoding: EncodeSpec = FROM_SPEC,
    model: dict[str, Any] = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Add documents to a library: train (or copy) each one's adapter and index its chunks; known ones are skipped.
    The base model is the library's, else --model (the embedded SmolLM2-135M-Instruct by default)."""
    from loramem.library.store import AddOptions, add_documents, open_library

    options = AddOptions(
        train=train,
        synth=synth,
        qa=qa,
        adapter=str(adapter) if adapter else None,
        doc_id=doc_id,
        with_cache=with_cache,
        truncate=encoding.truncate,
        embedder=str(embedder) if embedder else None,
    )
    if not lib.exists():
        check_output_path(lib, what="directory")  # before the model loads, not after
    recorded = {"model": open_library(lib).base_model_id} if lib.exists() else {}
    added = add_documents(lib, load(ModelSpec.parse({**recorded, **model})), documents, options)
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
@with_specs(spec=Use(RouteSpec, exclude=frozenset({("merge",), ("with_context",), ("with_caches",)})))
def route(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder"),
    question: str = typer.Argument(..., help="The question to route"),
    spec: RouteSpec = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Rank a library's documents for a question by their best chunk's cosine similarity."""
    from loramem.library.store import route as route_question

    ranked = route_question(lib, question, spec.top_k)
    if as_json:
        print_json({"question": question, "documents": [{"id": i, "score": round(s, 6)} for i, s in ranked]})
        return
    write_stdout("".join(f"{doc_id}\t{score:.4f}\n" for doc_id, score in ranked))
