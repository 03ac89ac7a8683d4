"""ask: answer from a cache, a document, an adapter or a library."""

from __future__ import annotations

from typing import Any, Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import JsonOpt, load, print_json, read_questions
from loramem.cli.specopts import FROM_SPEC, with_specs
from loramem.fileio import write_stdout
from loramem.specs import AskSpec, ModelSpec


@app.command()
@with_specs(spec=AskSpec, model=ModelSpec)
def ask(
    questions: list[str] = typer.Argument(None, help="Question(s); or use --questions / stdin"),
    questions_file: Optional[str] = typer.Option(None, "--questions", "-q", help="File of questions: lines or JSONL"),
    spec: AskSpec = FROM_SPEC,
    model: ModelSpec = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Answer questions from a stored cache, a document, an adapter, any mix of them, or an adapter library."""
    if spec.library is not None:
        _ask_library(spec, model, read_questions(questions or [], questions_file, stdin_free=True), as_json)
        return
    from loramem.adapters.attach import check_adapter_mode
    from loramem.answer import answer_batch
    from loramem.fileio import read_text
    from loramem.kv.cache import KVCache, check_compatible
    from loramem.kv.encode import encode as encode_document
    from loramem.model.limits import check_questions

    cache = KVCache.load(spec.cache) if spec.cache else None
    text = read_text(spec.doc) if spec.doc else None
    items = read_questions(questions or [], questions_file, stdin_free="-" not in (spec.cache, spec.doc))
    # answering alone (no adapter, nothing to encode) needs no transformers for the default model
    lm = load(model, spec.adapter, answer_only=spec.adapter is None and text is None)
    if cache is not None:
        check_compatible(cache, lm.fingerprint, spec.cache or "cache", lm)
    doc_seconds = 0.0
    if text is not None:
        if not spec.truncate:  # before the prefill (a cut document leaves the room encode keeps for the question)
            questions = [item["question"] for item in items]
            check_questions(lm, questions, text, spec.framing, "shorten it or use --truncate")
        cache = encode_document(lm, text, framing=spec.framing, truncate=spec.truncate, with_adapter=spec.mode == "all")
        doc_seconds = cache.meta["prefill_seconds"]
    if cache is not None:
        adapter_on = check_adapter_mode(lm, spec.mode, cache.meta.get("adapter"))
    else:
        adapter_on = check_adapter_mode(lm, "decode" if spec.mode == "all" else spec.mode, None)
    results = answer_batch(
        lm,
        [item["question"] for item in items],
        cache,
        max_new_tokens=spec.answer.max_new_tokens,
        adapter_on=adapter_on,
        framing=spec.framing,
        batch_size=spec.answer.batch_size,
        max_batch_tokens=spec.answer.max_batch_tokens,
    )
    for item, result in zip(items, results):
        if as_json:
            data = {
                **{k: v for k, v in item.items() if k != "question"},
                **result.to_dict(),
                "adapter_mode": spec.mode,
                "document_prefill_seconds": doc_seconds,
            }
            if doc_seconds:
                data["time_to_first_token_seconds"] = round(result.time_to_first_token_seconds + doc_seconds, 4)
            print_json(data)
        else:
            answer = result.answer if len(items) == 1 else " ".join(result.answer.split())
            write_stdout(answer + "\n")


def _ask_library(spec: AskSpec, model: ModelSpec, items: list[dict[str, Any]], as_json: bool) -> None:
    """`ask --library`: the library is checked before its base model (or --model, which must match) is loaded;
    questions routed to the same adapter are answered together."""
    from loramem.library.qa import ask_library_batch, open_routed
    from loramem.library.store import library_embedder

    assert spec.library is not None  # only called for a library
    route = spec.route
    library, _ = open_routed(spec.library, route.top_k, route.merge, route.with_context, route.with_caches)
    lm = load(model if model.model else model.replace(model=library.base_model_id))
    results = ask_library_batch(
        lm,
        library,
        [item["question"] for item in items],
        top_k=route.top_k,
        merge=route.merge,
        with_context=route.with_context,
        with_caches=route.with_caches,
        max_new_tokens=spec.answer.max_new_tokens,
        embedder=library_embedder(library),
        batch_size=spec.answer.batch_size,
        max_batch_tokens=spec.answer.max_batch_tokens,
    )
    for item, result in zip(items, results):
        if as_json:
            print_json({**{k: v for k, v in item.items() if k != "question"}, **result.to_dict()})
        else:
            text = result.answer.answer
            write_stdout((text if len(items) == 1 else " ".join(text.split())) + "\n")
