"""encode, compress: the KV-cache artifact's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import ForceCacheOpt, read_questions
from loramem.cli.specopts import FROM_SPEC, Use, with_specs
from loramem.errors import LoramemError
from loramem.log import log
from loramem.memory import load
from loramem.specs import CompressSpec, EncodeSpec, ModelSpec


@app.command()
@with_specs(spec=EncodeSpec, model=ModelSpec)
def encode(
    document: str = typer.Argument(..., help="Document text file, or - for stdin"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output .safetensors (- or a pipe: stdout)"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Encode with this LoRA on (adapter-prefill modes)"),
    force: bool = ForceCacheOpt,
    spec: EncodeSpec = FROM_SPEC,
    model: ModelSpec = FROM_SPEC,
) -> None:
    """Prefill a document once and store its KV cache (with press scores) as safetensors."""
    from loramem.fileio import check_output_path, read_text, stdout_is_terminal, write_output
    from loramem.kv.cache import is_cache_file
    from loramem.kv.encode import encode as encode_document
    from loramem.log import progress_bar

    text = read_text(document)
    if output is None and stdout_is_terminal():
        raise LoramemError("refusing to write a binary cache to the terminal; give -o FILE or pipe it")
    check_output_path(output or "-", force, "cache", inputs=[document], ours=is_cache_file)
    lm = load(model, adapter)
    with progress_bar("prefill", lm.config.num_hidden_layers) as advance:
        cache = encode_document(
            lm,
            text,
            presses=spec.score,
            framing=spec.framing,
            truncate=spec.truncate,
            with_adapter=adapter is not None,
            on_layer=lambda _: advance(),
        )
    where = write_output(output, cache.to_bytes(), "cache")
    log(f"encoded {cache.n_tokens} tokens in {cache.meta['prefill_seconds']:.1f} s -> {where}")


@app.command()
@with_specs(spec=Use(CompressSpec, exclude=frozenset({("query",)})), model=ModelSpec)
def compress(
    cache_file: str = typer.Argument(..., metavar="IN", help="Cache .safetensors, or - for stdin"),
    scores_from: Optional[str] = typer.Option(
        None,
        "--scores-from",
        help="Take the eviction choice from another encoding of the same document (e.g. the base model's)",
    ),
    query: Optional[list[str]] = typer.Option(
        None,
        "--query",
        help="value-group: score groups by this question's attention to the document (repeatable; loads --model)",
    ),
    questions_file: Optional[str] = typer.Option(
        None,
        "--questions",
        help='value-group: as --query, from a file of lines or JSONL {"question"}; relevance averaged',
    ),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output .safetensors (- or a pipe: stdout)"),
    force: bool = ForceCacheOpt,
    spec: CompressSpec = FROM_SPEC,
    model: ModelSpec = FROM_SPEC,
) -> None:
    """Evict KV states by recorded press scores; tensor work on the file, no model is loaded
    (except for query-aware value groups: --query/--questions run the model that made the cache)."""
    from loramem.fileio import check_output_path, stdout_is_terminal, write_output
    from loramem.kv.cache import KVCache, is_cache_file
    from loramem.kv.compression import compress_cache, query_scores

    if cache_file == "-" and questions_file == "-":
        raise LoramemError("stdin can carry the cache or the questions, not both")
    if query or questions_file:
        items = read_questions(query or [], questions_file, stdin_free=False)
        spec = spec.replace(query=[item["question"] for item in items])
    if output is None and stdout_is_terminal():
        raise LoramemError("refusing to write a binary cache to the terminal; give -o FILE or pipe it")
    check_output_path(
        output or "-", force, "cache", inputs=[cache_file, scores_from, questions_file], ours=is_cache_file
    )
    cache = KVCache.load(cache_file)
    scores = None
    if spec.query:
        from loramem.kv.cache import check_compatible
        from loramem.kv.value_groups import check_groups

        check_groups(cache, spec.press, spec.groups, spec.rule, query=True)  # before the model loads
        lm = load(model)
        check_compatible(cache, lm.fingerprint, cache_file, lm)
        scores = query_scores(lm, cache, spec)
    small = compress_cache(cache, spec, scores_from=KVCache.load(scores_from) if scores_from else None, scores=scores)
    chosen_by = f"{len(spec.query)} question(s)" if spec.query else spec.press
    where = write_output(output, small.to_bytes(), "cache")
    log(f"kept {max(small.kept_per_layer)} of {cache.n_tokens} tokens per head ({chosen_by}) -> {where}")
