"""What `ask --server` sends and reads: the native `/v1/answers` over the standard library's HTTP client, so a
one-off question to a warm server imports no torch, transformers or server stack.

Refusals come back as the exit codes `ask` gives for them (the error body's `code`: 2 bad input, 3 incompatible
artifact); a server that cannot be reached, or answers something that is not loramem's, is one line, exit 2.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from loramem.errors import LoramemError

SERVER_ENV, TOKEN_ENV = "LORAMEM_SERVER", "LORAMEM_TOKEN"
CONNECT_SECONDS = 10.0


class ServerError(LoramemError):
    """A request the server refused, with the exit code it gives."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def server_url(given: str | None) -> str | None:
    """The server to ask: --server, else $LORAMEM_SERVER, else None (answer here)."""
    return given or os.environ.get(SERVER_ENV) or None


def token(token_file: str | None) -> str | None:
    if token_file is not None:
        from loramem.fileio import read_text

        return read_text(token_file).strip()
    return os.environ.get(TOKEN_ENV) or None


def ask_server(url: str, body: dict[str, Any], bearer: str | None, timeout: float = 3600.0) -> Iterator[dict[str, Any]]:
    """POST `body` to the server's /v1/answers: the whole reply, or with body["stream"] each streamed event, as
    JSON objects. Refusals raise ServerError."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoramemError(f"--server {url}: give an http:// or https:// URL")
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.hostname, parts.port, timeout=CONNECT_SECONDS)
    headers = {"Content-Type": "application/json", "Accept": "application/json, application/x-ndjson"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    path = parts.path.rstrip("/") + "/v1/answers"
    try:
        connection.connect()
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        connection.request("POST", path, json.dumps(body).encode(), headers)
        response = connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise LoramemError(f"cannot reach the server at {url}: {reason}") from None
    try:
        if response.status != 200:
            raise _refused(response, url)
        if not body.get("stream"):
            yield _json(response.read(), url)
            return
        for line in response:
            if line.strip():
                yield _json(line, url)
    except (OSError, http.client.HTTPException) as exc:
        raise LoramemError(f"the server at {url} broke off: {exc or type(exc).__name__}") from None
    finally:
        connection.close()


def _refused(response: http.client.HTTPResponse, url: str) -> LoramemError:
    data = response.read(1 << 16)
    try:
        error = json.loads(data)["error"]
        message, code = str(error["message"]), int(error.get("code", 2))
    except (ValueError, KeyError, TypeError):
        return LoramemError(f"the server at {url} answered HTTP {response.status}, not a loramem reply")
    if response.status == 503:
        retry = response.getheader("Retry-After")
        message += f" (retry after {retry} s)" if retry else ""
    return ServerError(message, code if code in (1, 2, 3) else 2)


def _json(data: bytes, url: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise LoramemError(f"the server at {url} sent something that is not JSON") from None
    if not isinstance(value, dict):
        raise LoramemError(f"the server at {url} sent something that is not a loramem reply")
    if "error" in value:
        error = value["error"] if isinstance(value["error"], dict) else {"message": str(value["error"])}
        raise ServerError(str(error.get("message")), int(error.get("code", 2)) if error.get("code") in (1, 2, 3) else 2)
    return value
