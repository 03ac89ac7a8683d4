"""The HTTP front of `loramem serve` (FastAPI on uvicorn): the native `POST /v1/answers`, OpenAI's
`POST /v1/chat/completions` and `GET /v1/models`, a listing of the root, the request schema, and health.

Every body is read with a size bound and parsed by the library's own spec (`specs.serve.AnswersRequest`); every
refusal is one line of JSON, `{"error": {"message", "type", "code"}}`, `code` being the exit code `ask` gives for
it. Answers come from the engine thread; a request whose client goes away, or whose time runs out, is cancelled
and its rows leave the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException

from loramem.answer import Answer
from loramem.errors import LoramemError
from loramem.fileio import read_text
from loramem.log import console
from loramem.model.loading import LoadedModel
from loramem.serve.engine import Busy, Engine, Event, Job
from loramem.serve.paths import Refused, confined
from loramem.serve.store import Memories
from loramem.specs import ModelSpec, SpecError
from loramem.specs.serve import AnswersRequest, ServeSpec


@dataclass
class Served:
    """What the app serves: its settings, the model, the memories under the root and the engine."""

    spec: ServeSpec
    lm: LoadedModel
    memories: Memories
    engine: Engine
    token: str | None

    @property
    def model_id(self) -> str:
        return self.lm.model_id


def error_body(exc: Refused) -> dict[str, Any]:
    return {"error": {"message": str(exc), "type": exc.kind, "code": exc.exit_code}}


def refusal(exc: Refused, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def make_app(served: Served) -> FastAPI:
    """The ASGI app over `served` (docs pages off: they would load scripts from a CDN)."""
    app = FastAPI(title="loramem", docs_url=None, redoc_url=None)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return refusal(exc)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return refusal(Refused(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        console.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        return refusal(Refused(500, f"internal error: {type(exc).__name__}", exit_code=1, kind="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": served.model_id,
            "questions_in_flight": served.engine.load,
            "max_queue": served.spec.max_queue,
            "cache_bytes_held": served.memories.held_bytes(),
        }

    @app.get("/v1/schema")
    async def schema(request: Request) -> dict[str, Any]:
        authorize(served, request)
        return {"request": AnswersRequest.model_json_schema(), "answer": TypeAdapter(Answer).json_schema()}

    @app.get("/v1/memories")
    async def memories(request: Request) -> dict[str, Any]:
        authorize(served, request)
        return {"root": "/", "memories": await asyncio.to_thread(served.memories.listing)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(served, request)
        listed = await asyncio.to_thread(served.memories.listing)
        ids = [served.model_id] + [m["name"] for m in listed if m["kind"] in ("cache", "library")]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "loramem"} for i in ids]}

    @app.post("/v1/answers")
    async def answers(request: Request) -> Response:
        authorize(served, request)
        try:
            spec = AnswersRequest.parse(await read_json(served, request), source="request")
        except SpecError as exc:
            raise Refused(400, str(exc)) from None
        media = "text/event-stream" if spec.events == "sse" else "application/x-ndjson"
        return await answer(served, request, spec, _native(spec), media)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(served, request)
        body = await read_json(served, request)
        spec = await asyncio.to_thread(chat_request, served, body)
        return await answer(served, request, spec, _openai(str(body.get("model")), body), "text/event-stream")

    return app


def authorize(served: Served, request: Request) -> None:
    if served.token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), served.token.encode()):
        raise HTTPException(
            401, "a bearer token is required (Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"}
        )


async def read_json(served: Served, request: Request) -> dict[str, Any]:
    """The request's JSON object, refused beyond `max_body_bytes` (by its Content-Length, or as it arrives)."""
    limit = served.spec.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refused(413, f"body: larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(413, f"body: larger than {limit} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise Refused(400, f"body: not JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise Refused(400, "body: a JSON object is expected")
    return data


def check_limits(served: Served, spec: AnswersRequest) -> None:
    limits = served.spec
    if len(spec.questions) > limits.max_questions:
        raise Refused(400, f"questions: at most {limits.max_questions} in one request (got {len(spec.questions)})")
    for question in spec.questions:
        if not question.strip():
            raise Refused(400, "questions: an empty question")
        if len(question) > limits.max_question_chars:
            raise Refused(400, f"questions: at most {limits.max_question_chars} characters each")
    if spec.answer.max_new_tokens > limits.max_new_tokens:
        raise Refused(400, f"answer.max_new_tokens: at most {limits.max_new_tokens} on this server")


def prepare(served: Served, spec: AnswersRequest, emit: Callable[[Event], None]) -> Job:
    """The job for a request: its memories looked up under the root (loaded, checked, compressed)."""
    check_limits(served, spec)
    if spec.library is not None:
        return Job(spec, None, None, served.memories.library(spec.library), emit)
    cache = None if spec.cache is None else served.memories.cache(spec.cache, spec.compress)
    adapter = None if spec.adapter is None else served.memories.adapter(spec.adapter)
    return Job(spec, cache, adapter, None, emit)


def identity(job: Job) -> dict[str, Any]:
    """The memory an answer came from: names under the root and the sha256 of their content."""
    return {
        "cache": job.request.cache,
        "cache_sha256": None if job.cache is None else job.cache.sha256,
        "adapter": job.request.adapter,
        "adapter_sha256": None if job.adapter is None else job.adapter.sha256,
        "adapter_mode": job.request.mode,
        "library": job.request.library,
    }


def answer_record(job: Job, event: Event, root: Path) -> dict[str, Any]:
    """An answer as `ask --json` writes it, with the memory it came from."""
    if event[0] == "library":
        data = event[2].to_dict()
        adapter = Path(data["adapter"])
        data["adapter"] = adapter.relative_to(root).as_posix() if adapter.is_relative_to(root) else adapter.name
        return {**data, "library": job.request.library}
    return {**event[2].to_dict(), **identity(job), "document_prefill_seconds": 0.0}


Shape = Callable[[str, Any], Any]  # how a response is written: ("answers", records) or a streamed event


async def answer(served: Served, request: Request, spec: AnswersRequest, shape: Shape, media: str) -> Response:
    """Queue a request's job and answer it whole or streamed; cancelled when the client leaves or time runs out."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop has closed (shutdown): no one is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = await asyncio.to_thread(prepare, served, spec, emit)
    try:
        served.engine.submit(job)
    except Busy as exc:
        return refusal(
            Refused(503, "the server is busy; retry later", kind="busy"), {"Retry-After": str(exc.retry_after)}
        )
    deadline = loop.time() + served.spec.timeout

    async def next_event() -> Event:
        try:
            return await asyncio.wait_for(events.get(), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            served.engine.cancel(job)
            return ("error", Refused(504, f"not answered within {served.spec.timeout:g} s", kind="timeout"))

    first = await next_event()
    if first[0] == "error":
        return refusal(first[1])
    pending = [] if first[0] == "admitted" else [first]
    if not spec.stream:
        watch = asyncio.create_task(_cancel_on_disconnect(served, request, job))
        try:
            records: list[Any] = [None] * len(spec.questions)
            for event in pending:
                records[event[1]] = answer_record(job, event, served.memories.root)
            while (event := await next_event())[0] != "done":
                if event[0] == "error":
                    return refusal(event[1])
                if event[0] in ("answer", "library"):
                    records[event[1]] = answer_record(job, event, served.memories.root)
        finally:
            watch.cancel()
        return JSONResponse(shape("answers", records))

    async def streamed() -> AsyncIterator[str]:
        done = False
        try:
            for event in pending:
                yield shape("event", (event, answer_record(job, event, served.memories.root)))
            while (event := await next_event())[0] != "done":
                record = answer_record(job, event, served.memories.root) if event[0] in ("answer", "library") else None
                yield shape("event", (event, record))
            done = True
            yield shape("event", (("done",), None))
        finally:
            if not done:
                served.engine.cancel(job)

    return StreamingResponse(streamed(), media_type=media, headers={"Cache-Control": "no-cache"})


async def _cancel_on_disconnect(served: Served, request: Request, job: Job) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    served.engine.cancel(job)


def _native(spec: AnswersRequest) -> Shape:
    """The native shapes: {"answers": [...]} whole; streamed, JSON lines (or SSE events) of text, answer, error and
    done."""
    sse = spec.events == "sse"

    def shape(kind: str, value: Any) -> Any:
        if kind == "answers":
            return {"answers": value}
        (event, record) = value
        name = event[0]
        if name == "text":
            data: dict[str, Any] = {"index": event[1], "text": event[2]}
        elif name in ("answer", "library"):
            name, data = "answer", {"index": event[1], "answer": record}
        elif name == "error":
            data = error_body(event[1])
        else:
            data = {"done": True}
        line = json.dumps(data, ensure_ascii=False)
        return f"event: {name}\ndata: {line}\n\n" if sse else line + "\n"

    return shape


def chat_request(served: Served, body: dict[str, Any]) -> AnswersRequest:
    """An OpenAI chat-completions body as the native request: `model` names a cache or library under the root (or
    the server's model: no document), the last user message is the question (earlier turns are not context), and
    the extra fields adapter, adapter_mode and compress name the rest."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Refused(400, "model: name a cache or library under the server's root (GET /v1/models lists them)")
    if body.get("n", 1) != 1:
        raise Refused(400, "n: one answer per request (decoding is greedy)")
    for unsupported in ("tools", "functions", "response_format"):
        if body.get(unsupported):
            raise Refused(400, f"{unsupported}: not supported by loramem serve")
    question = _last_user_message(body.get("messages"))
    fields: dict[str, Any] = {"questions": [question], "stream": bool(body.get("stream", False)), "events": "sse"}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        fields["answer"] = {"max_new_tokens": limit}
    for extra in ("adapter", "adapter_mode", "compress", "framing"):
        if body.get(extra) is not None:
            fields[extra] = body[extra]
    if model != served.model_id:
        path = confined(served.memories.root, model, "model")
        fields["library" if path.is_dir() else "cache"] = model
    try:
        return AnswersRequest.parse(fields, source="request")
    except SpecError as exc:
        raise Refused(400, str(exc)) from None


def _last_user_message(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "messages: a list of chat messages is expected")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise Refused(400, "messages: no user message to answer")
    content = users[-1].get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str) or not content.strip():
        raise Refused(400, "messages: the last user message has no text")
    return content


def _openai(model: str, body: dict[str, Any]) -> Shape:
    """OpenAI's shapes: a chat.completion, or chat.completion.chunk events ending with `data: [DONE]`."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))

    def usage(record: dict[str, Any]) -> dict[str, int]:
        prompt, completion = record.get("question_tokens", 0), record.get("new_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> str:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **(extra or {}),
        }
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def finish(record: dict[str, Any]) -> str:
        return "stop" if record.get("stopped_at_end_of_turn") else "length"

    started = [False]

    def shape(kind: str, value: Any) -> Any:
        if kind == "answers":
            record = value[0]
            return {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": record["answer"]},
                        "finish_reason": finish(record),
                    }
                ],
                "usage": usage(record),
                "loramem": record,
            }
        (event, record) = value
        out = "" if started[0] else chunk({"role": "assistant", "content": ""})
        started[0] = True
        if event[0] == "text":
            return out + chunk({"content": event[2]})
        if event[0] in ("answer", "library"):
            extra = {"loramem": record}
            return (
                out
                + chunk({}, finish(record), extra)
                + (chunk({}, None, {"choices": [], "usage": usage(record)}) if usage_wanted else "")
            )
        if event[0] == "error":
            return out + f"data: {json.dumps(error_body(event[1]))}\n\n"
        return out + "data: [DONE]\n\n"

    return shape


def run_server(spec: ServeSpec, model: ModelSpec) -> None:
    """Load the model, listen, and serve until SIGINT or SIGTERM (then in-flight work gets `grace` seconds)."""
    import uvicorn

    from loramem.memory import load

    assert spec.root is not None  # (ServeSpec requires it)
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise LoramemError(f"--root {spec.root}: not a folder")
    token = None
    if spec.token_file is not None:
        token = read_text(spec.token_file).strip()
        if len(token) < 16:
            raise LoramemError(f"--token-file {spec.token_file}: the token must be at least 16 characters")
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((spec.host, spec.port))
        sock.listen(spec.max_queue + 32)  # before the address is printed: a client may connect at once
    except OSError as exc:
        sock.close()
        raise LoramemError(f"cannot listen on {spec.host}:{spec.port}: {exc.strerror or exc}") from None
    lm = load(model)
    engine = Engine(lm, spec.max_queue, spec.max_batch_tokens, spec.max_new_tokens)
    served = Served(spec, lm, Memories(root, lm, spec.memory_budget << 20), engine, token)
    config = uvicorn.Config(
        make_app(served),
        log_level="warning",
        timeout_graceful_shutdown=int(spec.grace) if spec.grace else None,
        limit_concurrency=spec.max_queue + 32,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    listening = f"loramem serve: http://{shown}:{port} (root {root}, model {served.model_id})"
    console.print(listening, highlight=False, soft_wrap=True)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
