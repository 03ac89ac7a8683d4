"""encode, compress, inspect: the KV-cache artifact's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import (
    DeviceOpt,
    DtypeOpt,
    ForceCacheOpt,
    JsonOpt,
    ModelOpt,
    TemplateKwargsOpt,
    flags_named,
    load,
    print_json,
    read_questions,
    stdout_console,
)
from loramem.errors import LoramemError
from loramem.kv.presses import DEFAULT_PRESSES, EVICTION_PRESS
from loramem.log import log
from loramem.model.prompt import DEFAULT_FRAMING


@app.command()
def encode(
    document: str = typer.Argument(..., help="Document text file, or - for stdin"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output .safetensors (- or a pipe: stdout)"),
    score: str = typer.Option(
        ",".join(DEFAULT_PRESSES),
        "--score",
        help="Presses whose scores are recorded during the prefill ('all' for every one)",
    ),
    framing: str = typer.Option(
        DEFAULT_FRAMING, "--framing", help="chat (the model's chat template) or raw (plain text)"
    ),
    truncate: bool = typer.Option(False, "--truncate", help="Cut a document longer than the context, with a warning"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Encode with this LoRA on (adapter-prefill modes)"),
    force: bool = ForceCacheOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
) -> None:
    """Prefill a document once and store its KV cache (with press scores) as safetensors."""
    from loramem.fileio import check_output_path, read_text, stdout_is_terminal, write_output
    from loramem.kv.encode import encode as encode_document
    from loramem.kv.presses import parse_presses
    from loramem.log import progress_bar

    presses = parse_presses(score)
    text = read_text(document)
    if output is None and stdout_is_terminal():
        raise LoramemError("refusing to write a binary cache to the terminal; give -o FILE or pipe it")
    check_output_path(output or "-", force, "cache", inputs=[document])
    lm = load(model, device, dtype, adapter, chat_template_kwargs)
    with progress_bar("prefill", lm.config.num_hidden_layers) as advance:
        cache = encode_document(
            lm,
            text,
            presses=presses,
            framing=framing,
            truncate=truncate,
            with_adapter=adapter is not None,
            on_layer=lambda _: advance(),
        )
    where = write_output(output, cache.to_bytes(), "cache")
    log(f"encoded {cache.n_tokens} tokens in {cache.meta['prefill_seconds']:.1f} s -> {where}")


@app.command()
def compress(
    cache_file: str = typer.Argument(..., metavar="IN", help="Cache .safetensors, or - for stdin"),
    press: str = typer.Option(EVICTION_PRESS, "--press", "-p", help="Press whose recorded scores pick the tokens"),
    ratio: Optional[float] = typer.Option(
        None, "--ratio", "-r", help="Fraction of document tokens to evict, in [0, 1]; 1.0 evicts the whole document"
    ),
    keep: Optional[int] = typer.Option(None, "--keep", help="Keep this many document tokens instead of a ratio"),
    scores_from: Optional[str] = typer.Option(
        None,
        "--scores-from",
        help="Take the eviction choice from another encoding of the same document (e.g. the base model's)",
    ),
    granularity: str = typer.Option(
        "token", "--granularity", help="token (whole tokens) or value-group (channel groups inside each value vector)"
    ),
    groups: int = typer.Option(4, "--groups", help="value-group: groups per value head vector"),
    budget: Optional[float] = typer.Option(
        None, "--budget", help="value-group: fraction of document value bytes kept, in (0, 1]"
    ),
    score_groups: Optional[str] = typer.Option(
        None,
        "--score-groups",
        help="value-group rule: norm (token "
        "score x group's share of the value norm), uniform, or query "
        "(question attention x group value norm)",
        show_default="query with --query/--questions, else norm",
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
    store_dtype: Optional[str] = typer.Option(
        None,
        "--store-dtype",
        help="Store keys/values as fp16, bf16, int8 or int4 (scales alongside); loaded back dequantized",
    ),
    quant_axis: str = typer.Option(
        "token", "--quant-axis", help="int8/int4 scales per token (groups of channels) or per channel"
    ),
    quant_group: int = typer.Option(
        0, "--quant-group", help="Channels per scale for --quant-axis token (0: the whole head)"
    ),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output .safetensors (- or a pipe: stdout)"),
    force: bool = ForceCacheOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
) -> None:
    """Evict KV states by recorded press scores; tensor work on the file, no model is loaded
    (except for query-aware value groups: --query/--questions run the model that made the cache)."""
    from loramem.fileio import check_output_path, stdout_is_terminal, write_output
    from loramem.kv.cache import KVCache
    from loramem.kv.compress import check_compress_request
    from loramem.kv.compress import compress as compress_cache
    from loramem.kv.quantize import make_storage

    asked = bool(query or questions_file)
    with flags_named({"granularity": "--granularity"}):
        check_compress_request(
            ratio, keep, store=store_dtype is not None, granularity=granularity, budget=budget, query=asked
        )
    if cache_file == "-" and questions_file == "-":
        raise LoramemError("stdin can carry the cache or the questions, not both")
    if output is None and stdout_is_terminal():
        raise LoramemError("refusing to write a binary cache to the terminal; give -o FILE or pipe it")
    check_output_path(output or "-", force, "cache", inputs=[cache_file, scores_from, questions_file])
    cache = KVCache.load(cache_file)
    storage = make_storage(store_dtype, quant_axis, quant_group, cache.meta["head_dim"]) if store_dtype else None
    press = chosen_by = press.replace("-", "_").lower()
    if granularity == "value-group":
        assert budget is not None  # refused above
        from loramem.kv.cache import check_compatible
        from loramem.kv.compress import restore
        from loramem.kv.value_groups import check_request, compress_value_groups, query_group_scores

        rule = score_groups or ("query" if asked else "norm")
        check_request(cache, press, groups, budget, rule, query=asked)
        scores = None
        if asked:
            items = read_questions(query or [], questions_file, stdin_free=False)
            lm = load(model, device, dtype, chat_template_kwargs=chat_template_kwargs)
            check_compatible(cache, lm.fingerprint, cache_file, lm)
            scores = query_group_scores(lm, cache, [item["question"] for item in items], groups)
            chosen_by = f"{len(items)} question(s)"
        small = compress_value_groups(cache, press, groups, budget, rule, scores)
        small = restore(small, storage) if storage else small
    else:
        base = KVCache.load(scores_from) if scores_from else None
        small = compress_cache(cache, press, ratio=ratio, keep=keep, scores_from=base, storage=storage)
    where = write_output(output, small.to_bytes(), "cache")
    log(f"kept {max(small.kept_per_layer)} of {cache.n_tokens} tokens per head ({chosen_by}) -> {where}")


@app.command()
def inspect(
    artifact: str = typer.Argument(..., help="A cache .safetensors (- for stdin) or an adapter directory"),
    as_json: bool = JsonOpt,
) -> None:
    """Show what a cache or an adapter holds: model, document, tokens kept, bytes, press, ratio."""
    from loramem.describe import describe_adapter, describe_cache

    if artifact != "-" and Path(artifact).is_dir():
        info = describe_adapter(artifact)
    else:
        from loramem.kv.cache import KVCache
        from loramem.tensorfile import read_safetensors

        data, source = read_safetensors(artifact, what="cache")
        info = describe_cache(KVCache.from_bytes(data, source), nbytes=len(data))
    if as_json:
        print_json(info)
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    hidden = {"kept_per_layer", "kept_per_head", "history"}
    for key, value in info.items():
        if key in hidden or value is None:
            continue
        if key.endswith("bytes") and isinstance(value, int):
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value) if value else "-"
        table.add_row(key.replace("_", " "), str(value).replace("\n", " "))
    stdout_console().print(table)
