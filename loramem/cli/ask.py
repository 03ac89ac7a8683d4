"""ask: answer from a cache, a document, an adapter or a library."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import JsonOpt, print_json, read_questions
from loramem.cli.specopts import FROM_SPEC, with_specs
from loramem.errors import LoramemError
from loramem.fileio import stdout_is_terminal, write_stdout
from loramem.memory import adapter_on, load, open_memory
from loramem.specs import AskSpec, ModelSpec
from loramem.specs.serve import ClientSpec
from loramem.text import InOrder, one_line

if TYPE_CHECKING:
    from loramem.answer import StreamedAnswers


@app.command()
@with_specs(spec=AskSpec, model=ModelSpec, client=ClientSpec)
def ask(
    questions: list[str] = typer.Argument(None, help="Question(s); or use --questions / stdin"),
    questions_file: Optional[str] = typer.Option(None, "--questions", "-q", help="File of questions: lines or JSONL"),
    spec: AskSpec = FROM_SPEC,
    model: ModelSpec = FROM_SPEC,
    client: ClientSpec = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Answer questions from a stored cache, a document, an adapter, any mix of them, or an adapter library."""
    from loramem.serve.client import server_url

    url = server_url(client.server)
    if url is not None:
        _ask_server(url, client, spec, model, read_questions(questions or [], questions_file, stdin_free=True), as_json)
        return
    if spec.library is not None:
        _ask_library(spec, model, read_questions(questions or [], questions_file, stdin_free=True), as_json)
        return
    from loramem.answer import StreamedAnswers, answer_batch
    from loramem.fileio import read_text
    from loramem.kv.cache import KVCache

    stream = streams(spec, as_json)
    cache = KVCache.load(spec.cache) if spec.cache else None
    text = read_text(spec.doc) if spec.doc else None
    items = read_questions(questions or [], questions_file, stdin_free="-" not in (spec.cache, spec.doc))
    questions = [item["question"] for item in items]
    lm, cache, doc_seconds = open_memory(spec, model, cache, text, questions, answer_only=True)
    streamed = None
    if stream:
        streamed = StreamedAnswers(lm.tokenizer, len(items), write_stdout, one_line=len(items) > 1)
    with line_ended(streamed):
        results = answer_batch(
            lm,
            questions,
            cache,
            max_new_tokens=spec.answer.max_new_tokens,
            adapter_on=adapter_on(lm, spec.mode, cache),
            framing=spec.framing,
            batch_size=spec.answer.batch_size,
            max_batch_tokens=spec.answer.max_batch_tokens,
            on_token=streamed,
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
        elif streamed is None:
            write_stdout((result.answer if len(items) == 1 else one_line(result.answer)) + "\n")


def streams(spec: AskSpec, as_json: bool) -> bool:
    """Whether answers are written as they are decoded: --stream, else when stdout is a terminal; never with
    --json (one whole object per answer)."""
    if as_json and spec.stream:
        raise LoramemError("--stream writes text as it is decoded, --json one object per answer: give one")
    return not as_json and (spec.stream if spec.stream is not None else stdout_is_terminal())


@contextmanager
def line_ended(streamed: StreamedAnswers | InOrder | None) -> Iterator[None]:
    """An interrupt in the middle of a streamed answer leaves stdout as it is (nothing more is written there) and,
    on a terminal, starts stderr's message on a line of its own."""
    try:
        yield
    except KeyboardInterrupt:
        if streamed is not None and streamed.mid_line and stdout_is_terminal():
            sys.stderr.write("\n")
        raise


def _ask_library(spec: AskSpec, model: ModelSpec, items: list[dict[str, Any]], as_json: bool) -> None:
    """`ask --library`: the library is checked before its base model (or --model, which must match) is loaded;
    questions routed to the same adapter are answered together."""
    from loramem.library.qa import answer_routed, open_routed

    assert spec.library is not None  # only called for a library
    route = spec.route
    library, _ = open_routed(spec.library, route.top_k, route.merge, route.with_context, route.with_caches)
    lm = load(model if model.model else model.replace(model=library.base_model_id))
    results = answer_routed(lm, library, [item["question"] for item in items], route, spec.answer)
    for item, result in zip(items, results):
        if as_json:
            print_json({**{k: v for k, v in item.items() if k != "question"}, **result.to_dict()})
        else:
            text = result.answer.answer
            write_stdout((text if len(items) == 1 else one_line(text)) + "\n")


def _ask_server(
    url: str, client: ClientSpec, spec: AskSpec, model: ModelSpec, items: list[dict[str, Any]], as_json: bool
) -> None:
    """`ask --server`: the same request answered by a running `loramem serve` (names relative to its root), written
    as `ask` writes its answers. Nothing heavier than the standard library's HTTP client is imported."""
    from loramem.serve.client import ask_server, token
    from loramem.specs.base import refuse

    if model.model_fields_set:
        refuse("the server's model answers; leave these out", *sorted(model.model_fields_set))
    for name in ("doc", "truncate"):
        if name in spec.model_fields_set:
            refuse("the server answers from stored caches: encode the document under its root", name)
    if spec.cache == "-":
        refuse("name a cache under the server's root (stdin is not sent)", "cache")
    if spec.answer.model_fields_set - {"max_new_tokens"}:
        refuse("the server sizes its decoding batches", *(f"answer.{n}" for n in sorted(spec.answer.model_fields_set)))
    stream = streams(spec, as_json)
    body = spec.model_dump(exclude_unset=True, exclude={"doc", "truncate", "stream"})
    body |= {"questions": [item["question"] for item in items], "stream": stream}
    order = InOrder(len(items), write_stdout)
    shown = [""] * len(items)
    raw = [""] * len(items)
    with line_ended(order):
        for event in ask_server(url, body, token(client.token_file)):
            _write_event(event, items, order, shown, raw, as_json)


def _write_event(
    event: dict[str, Any], items: list[dict[str, Any]], order: InOrder, shown: list[str], raw: list[str], as_json: bool
) -> None:
    """One reply from the server written as `ask` writes it: streamed pieces in question order, or whole answers."""
    several = len(items) > 1
    if "text" in event:  # a piece of answer `index`, as the server decoded it
        index = event["index"]
        raw[index] += event["text"]
        now = one_line(raw[index]) if several else raw[index]
        if now.startswith(shown[index]):
            order.add(index, now[len(shown[index]) :])
            shown[index] = now
    elif "answer" in event:
        index, record = event["index"], event["answer"]
        text = one_line(record["answer"]) if several else record["answer"]
        order.add(index, text[len(shown[index]) :] + "\n", ended=True)
    elif "answers" in event:
        for item, record in zip(items, event["answers"]):
            if as_json:
                print_json({**{k: v for k, v in item.items() if k != "question"}, **record})
            else:
                write_stdout((one_line(record["answer"]) if several else record["answer"]) + "\n")
