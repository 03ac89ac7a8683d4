"""Serving specs: how `loramem serve` runs and what it allows, what a client names, and the body of a request for
answers, which is `ask`'s own memory settings plus the questions (its JSON Schema is the server's contract)."""

from __future__ import annotations

from pydantic import model_validator

from loramem.specs.answer import MAX_BATCH_TOKENS, MAX_NEW_TOKENS, MemorySpec
from loramem.specs.base import Spec, refuse, setting
from loramem.specs.kv import CompressSpec
from loramem.vocab import StreamEvents

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_QUESTIONS = 16  # per request: one full decoding batch
MAX_QUESTION_CHARS = 4000


class ServeSpec(Spec):
    """Where the server listens, what it serves, and the limits that keep it up whatever clients send."""

    root: str | None = setting(None, "Folder whose caches, adapters and libraries are served, named relative to it")
    host: str = setting(LOOPBACK, "Address to listen on; anything but loopback needs --token-file")
    port: int = setting(DEFAULT_PORT, "Port to listen on (0: any free port, printed at start)", ge=0, le=65535)
    token_file: str | None = setting(
        None, "File holding the bearer token every request must carry (Authorization: Bearer TOKEN)"
    )
    memory_budget: int = setting(
        4096, "Megabytes of loaded caches kept in memory; the least recently used are dropped beyond it", ge=1
    )
    max_queue: int = setting(
        64, "Questions waiting or being decoded at once; a request beyond it gets 503 with Retry-After", ge=1
    )
    max_questions: int = setting(MAX_QUESTIONS, "Questions in one request", ge=1)
    max_question_chars: int = setting(MAX_QUESTION_CHARS, "Characters in one question", ge=1)
    max_new_tokens: int = setting(4 * MAX_NEW_TOKENS, "Longest answer a request may ask for, in tokens", ge=1)
    max_body_bytes: int = setting(1 << 20, "Largest request body, in bytes", ge=1024)
    max_batch_tokens: int = setting(
        MAX_BATCH_TOKENS, "Memory budget of one decoding batch, in cached tokens (as ask's --max-batch-tokens)", ge=1
    )
    timeout: float = setting(600.0, "Seconds a request may wait and decode before it is cancelled", gt=0)
    grace: float = setting(10.0, "Seconds in-flight requests get to finish after SIGTERM before they are cut", ge=0)

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ServeSpec:
        if self.root is None:
            refuse("give the folder to serve", "root")
        if self.host not in (LOOPBACK, "localhost", "::1") and self.token_file is None:
            refuse("listening beyond loopback needs a bearer token: give --token-file", "host", "token_file")
        return self


class ClientSpec(Spec):
    """Which running server answers instead of a model loaded here (`ask --server`)."""

    server: str | None = setting(
        None, "URL of a running `loramem serve` to ask (env LORAMEM_SERVER); names are relative to its root"
    )
    token_file: str | None = setting(None, "File holding the server's bearer token (env LORAMEM_TOKEN: the token)")


class AnswersRequest(MemorySpec):
    """`POST /v1/answers`: questions answered from a memory under the server's root, as `ask` would answer them
    (each question from the memory alone; earlier requests are never context)."""

    questions: list[str] = setting(..., "Questions, each answered from the memory alone", min_length=1)
    compress: CompressSpec | None = setting(
        None, "Answer from the cache compressed from its recorded scores (press, ratio or keep)"
    )
    stream: bool = setting(False, "Stream each answer's text as it is decoded")
    events: StreamEvents = setting("ndjson", "Streamed as JSON lines (ndjson) or server-sent events (sse)")

    @model_validator(mode="after")
    def _servable(self) -> AnswersRequest:
        if self.library is not None and self.stream:
            refuse("a library's answers are returned whole, not streamed", "stream")
        if self.compress is not None and self.cache is None:
            refuse("compression needs a cache", "compress")
        given = sorted(self.answer.model_fields_set - {"max_new_tokens"})
        if given:
            refuse("the server sizes its decoding batches; leave these out", *(f"answer.{n}" for n in given))
        return self
