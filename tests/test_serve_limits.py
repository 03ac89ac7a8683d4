"""`loramem serve`'s limits and lifecycle on a tiny random model (fast to load, so each test may start its own
server): a full queue answers 503 with Retry-After, a token guards a server, beyond loopback a token is required,
and SIGTERM lets an answer in flight finish, then exits 143."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess

import pytest
from conftest import DEMO_DOC, run_cli
from test_serve import start, stop


@pytest.fixture(scope="module")
def tiny_root(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_root")
    made = run_cli("encode", str(DEMO_DOC), "-o", str(folder / "doc.kv"), "--model", str(tiny_dir))
    assert made.returncode == 0, made.stderr.decode()
    return folder


def streaming(port: int, tokens: int, headers: dict | None = None) -> tuple[http.client.HTTPConnection, object]:
    """A streamed request whose first piece has arrived (its row is decoding)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {
        "cache": "doc.kv",
        "questions": ["Who keeps the lamp?"],
        "stream": True,
        "answer": {"max_new_tokens": tokens},
    }
    connection.request("POST", "/v1/answers", json.dumps(body).encode(), headers or {})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert "text" in json.loads(response.readline())
    return connection, response


def post(port: int, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/v1/answers", json.dumps(body).encode(), headers or {})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def test_a_full_queue_answers_503_with_retry_after(tiny_dir, tiny_root, tmp_path):
    server = start(
        tiny_root, "--model", str(tiny_dir), "--max-queue", "1", "--max-new-tokens", "400", log=tmp_path / "e"
    )
    try:
        connection, _ = streaming(server.port, 400)
        status, headers, payload = post(server.port, {"cache": "doc.kv", "questions": ["Where?"]})
        assert status == 503 and int(headers["retry-after"]) >= 1 and payload["error"]["type"] == "busy"
        connection.close()
    finally:
        assert stop(server) == 128 + signal.SIGTERM


def test_a_token_guards_the_server(tiny_dir, tiny_root, tmp_path):
    secret = "s3cret-token-of-32-characters-xx"
    (tmp_path / "token").write_text(secret + "\n")
    server = start(tiny_root, "--model", str(tiny_dir), "--token-file", str(tmp_path / "token"), log=tmp_path / "e")
    body = {"cache": "doc.kv", "questions": ["Where?"], "answer": {"max_new_tokens": 4}}
    try:
        assert post(server.port, body)[0] == 401
        assert post(server.port, body, {"Authorization": "Bearer wrong"})[0] == 401
        status, _, payload = post(server.port, body, {"Authorization": f"Bearer {secret}"})
        assert status == 200 and payload["answers"][0]["new_tokens"] >= 1
        asked = subprocess.run(
            ["python", "-m", "loramem", "ask", "--cache", "doc.kv", "--max-new-tokens", "4", "Where?"],
            env={**os.environ, "LORAMEM_SERVER": server.url, "LORAMEM_TOKEN": secret},
            capture_output=True,
            timeout=120,
        )
        assert asked.returncode == 0 and asked.stdout.decode().strip() == payload["answers"][0]["answer"]
        refused = run_cli("ask", "--server", server.url, "--cache", "doc.kv", "Where?")
        assert refused.returncode == 2 and b"bearer token" in refused.stderr
    finally:
        stop(server)


def test_beyond_loopback_a_token_is_required(tiny_root):
    result = run_cli("serve", "--root", str(tiny_root), "--host", "0.0.0.0")
    assert result.returncode == 2 and b"--token-file" in result.stderr
    assert len(result.stderr.decode().strip().splitlines()) == 1


def test_sigterm_lets_an_answer_in_flight_finish_then_exits_143(tiny_dir, tiny_root, tmp_path):
    server = start(tiny_root, "--model", str(tiny_dir), "--max-new-tokens", "300", log=tmp_path / "e")
    connection, response = streaming(server.port, 300)
    server.process.send_signal(signal.SIGTERM)
    events = [json.loads(line) for line in response if line.strip()]  # the rest of the stream
    assert events[-1] == {"done": True} and events[-2]["answer"]["new_tokens"] >= 1
    connection.close()
    assert server.process.wait(timeout=60) == 128 + signal.SIGTERM
