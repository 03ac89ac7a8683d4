"""ask: answer from a cache, a document, an adapter or a library."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import (
    AnswerBatchOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxBatchTokensOpt,
    ModelOpt,
    TemplateKwargsOpt,
    load,
    print_json,
    read_questions,
)
from loramem.errors import LoramemError
from loramem.fileio import write_stdout
from loramem.library import MERGE, TOP_K
from loramem.model import MAX_NEW_TOKENS
from loramem.model.prompt import DEFAULT_FRAMING


@app.command()
def ask(
    questions: list[str] = typer.Argument(None, help="Question(s); or use --questions / stdin"),
    cache_file: Optional[str] = typer.Option(None, "--cache", "-c", help="Stored cache (- for stdin)"),
    doc: Optional[str] = typer.Option(None, "--doc", help="Encode this document on the fly (nothing is written)"),
    questions_file: Optional[str] = typer.Option(None, "--questions", "-q", help="File of questions: lines or JSONL"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="PEFT LoRA adapter directory"),
    adapter_mode: Optional[str] = typer.Option(
        None, "--adapter-mode", help="none, decode (default with --adapter) or all"
    ),
    max_new_tokens: int = typer.Option(MAX_NEW_TOKENS, "--max-new-tokens", min=1),
    batch_size: Optional[int] = AnswerBatchOpt,
    max_batch_tokens: int = MaxBatchTokensOpt,
    framing: str = typer.Option(DEFAULT_FRAMING, "--framing", help="Framing for --doc and closed-book questions"),
    truncate: bool = typer.Option(False, "--truncate", help="With --doc: cut a document longer than the context"),
    library: Optional[Path] = typer.Option(
        None,
        "--library",
        help="Answer from an adapter library: route the question, decode with the routed documents' (merged) adapter",
    ),
    top_k: Optional[int] = typer.Option(
        None,
        "--top-k",
        "-k",
        help="--library: documents routed to; 1 uses that document's adapter as is",
        show_default=str(TOP_K),
    ),
    merge: Optional[str] = typer.Option(
        None,
        "--merge",
        help="--library: how the top-k adapters merge: ties, linear, cat, dare_ties or svd",
        show_default=MERGE,
    ),
    with_context: Optional[int] = typer.Option(
        None, "--with-context", help="--library: also put the N best retrieved chunks in context (base-model cache)"
    ),
    with_caches: bool = typer.Option(
        False,
        "--with-caches",
        help="--library: put the routed documents' stored KV "
        "caches in context, side by side (library add --with-cache)",
    ),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Answer questions from a stored cache, a document, an adapter, any mix of them, or an adapter library."""
    from loramem.adapters.attach import check_adapter_mode
    from loramem.fileio import read_text
    from loramem.kv.cache import KVCache, check_compatible
    from loramem.kv.encode import encode as encode_document
    from loramem.model.generate import answer_batch
    from loramem.model.limits import check_questions

    if library is not None:
        if cache_file or doc or adapter or adapter_mode:
            raise LoramemError(
                "--library answers with the library's adapters; leave out --cache, --doc, --adapter and --adapter-mode"
            )
        _ask_library(
            library,
            read_questions(questions or [], questions_file, stdin_free=True),
            TOP_K if top_k is None else top_k,
            merge or MERGE,
            with_context or 0,
            with_caches,
            max_new_tokens,
            (batch_size, max_batch_tokens),
            model,
            device,
            dtype,
            as_json,
            chat_template_kwargs,
        )
        return
    if top_k is not None or merge is not None or with_context is not None or with_caches:
        raise LoramemError("--top-k, --merge, --with-context and --with-caches need --library")
    if cache_file and doc:
        raise LoramemError("give --cache or --doc, not both")
    mode = adapter_mode or ("decode" if adapter else "none")
    cache = KVCache.load(cache_file) if cache_file else None
    text = read_text(doc) if doc else None
    items = read_questions(questions or [], questions_file, stdin_free="-" not in (cache_file, doc))
    # answering alone (no adapter, nothing to encode) needs no transformers for the default model
    lm = load(model, device, dtype, adapter, chat_template_kwargs, answer_only=adapter is None and text is None)
    if cache is not None:
        check_compatible(cache, lm.fingerprint, cache_file or "cache", lm)
    doc_seconds = 0.0
    if text is not None:
        if not truncate:  # before the prefill (a cut document leaves the room encode keeps for the question)
            check_questions(lm, [item["question"] for item in items], text, framing, "shorten it or use --truncate")
        cache = encode_document(lm, text, framing=framing, truncate=truncate, with_adapter=mode == "all")
        doc_seconds = cache.meta["prefill_seconds"]
    if cache is not None:
        adapter_on = check_adapter_mode(lm, mode, cache.meta.get("adapter"))
    else:
        adapter_on = check_adapter_mode(lm, "decode" if mode == "all" else mode, None)
    results = answer_batch(
        lm,
        [item["question"] for item in items],
        cache,
        max_new_tokens=max_new_tokens,
        adapter_on=adapter_on,
        framing=framing,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
    )
    for item, result in zip(items, results):
        if as_json:
            data = {
                **{k: v for k, v in item.items() if k != "question"},
                **result.to_dict(),
                "adapter_mode": mode,
                "document_prefill_seconds": doc_seconds,
            }
            if doc_seconds:
                data["time_to_first_token_seconds"] = round(result.time_to_first_token_seconds + doc_seconds, 4)
            print_json(data)
        else:
            answer = result.answer if len(items) == 1 else " ".join(result.answer.split())
            write_stdout(answer + "\n")


def _ask_library(
    lib: Path,
    items: list[dict[str, Any]],
    top_k: int,
    merge: str,
    with_context: int,
    with_caches: bool,
    max_new_tokens: int,
    batching: tuple[Optional[int], int],
    model: Optional[str],
    device: str,
    dtype: str,
    as_json: bool,
    chat_template_kwargs: Optional[str],
) -> None:
    """`ask --library`: the library is checked before its base model (or --model, which must match) is loaded;
    questions routed to the same adapter are answered together (`batching`: batch size, max batch tokens)."""
    from loramem.library.qa import ask_library_batch, check_request
    from loramem.library.store import library_embedder

    library, _ = check_request(lib, top_k, merge, with_context, with_caches)
    lm = load(model or library.base_model_id, device, dtype, chat_template_kwargs=chat_template_kwargs)
    results = ask_library_batch(
        lm,
        library,
        [item["question"] for item in items],
        top_k=top_k,
        merge=merge,
        with_context=with_context,
        with_caches=with_caches,
        max_new_tokens=max_new_tokens,
        embedder=library_embedder(library),
        batch_size=batching[0],
        max_batch_tokens=batching[1],
    )
    for item, result in zip(items, results):
        if as_json:
            print_json({**{k: v for k, v in item.items() if k != "question"}, **result.to_dict()})
        else:
            text = result.answer.answer
            write_stdout((text if len(items) == 1 else " ".join(text.split())) + "\n")
