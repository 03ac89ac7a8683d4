"""`loramem serve` tested as a real server on a free loopback port, asked by real HTTP clients (`ask --server`, the
standard library, OpenAI-format bodies): the same answers as `ask`, alone and 16 clients at once; names confined to
the root; refusals as one line of JSON; an adapter replaced on disk answered from its new weights; a client that
goes away and SIGTERM. Load here is bounded: at most 16 concurrent requests, each test bounded in time."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEMO_DOC, REPO, run_cli

pytestmark = pytest.mark.real
DEMO = REPO / "loramem" / "demo_data"
QUESTIONS = [json.loads(line)["question"] for line in (DEMO / "questions.jsonl").read_text().splitlines()]
TOKENS = "16"  # answer length in these tests: long enough to differ, short enough to stay quick
LISTENING = re.compile(rb"loramem serve: (http://127\.0\.0\.1:\d+)")


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log
        self.port = int(url.rsplit(":", 1)[1])

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
    ) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.request(method, path, data, headers or {})
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

    def answers(self, body: dict) -> list[dict]:
        status, _, payload = self.request("POST", "/v1/answers", body)
        assert status == 200, payload
        return json.loads(payload)["answers"]


def start(root: Path, *args: str, log: Path) -> Server:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "loramem", "serve", "--root", str(root), "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_bytes())
        if found:
            return Server(process, found.group(1).decode(), log)
        if process.poll() is not None:
            raise AssertionError(log.read_text())
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not start")


def stop(server: Server) -> int:
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise AssertionError("SIGTERM did not stop the server") from None


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("root")
    encoded = run_cli("encode", str(DEMO_DOC), "-o", str(folder / "doc.kv"))
    assert encoded.returncode == 0, encoded.stderr.decode()
    trained = run_cli(
        "train-adapter",
        str(DEMO_DOC),
        "--qa",
        str(DEMO / "train_qa.jsonl"),
        "-o",
        str(folder / "doc.lora"),
        "--steps",
        "6",
    )
    assert trained.returncode == 0, trained.stderr.decode()
    return folder


@pytest.fixture(scope="module")
def server(root, tmp_path_factory) -> Iterator[Server]:
    running = start(root, "--max-queue", "48", log=tmp_path_factory.mktemp("log") / "serve.err")
    yield running
    assert stop(running) == 128 + signal.SIGTERM, running.log.read_text()


def ask_lines(*args: str) -> list[str]:
    result = run_cli(
        "ask", *args, "--max-new-tokens", TOKENS, *([] if {"--json", "--stream"} & set(args) else ["--no-stream"])
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


@pytest.mark.parametrize("adapter", [False, True])
def test_ask_server_prints_what_ask_prints(server, root, adapter):
    more = ["--adapter", "doc.lora"] if adapter else []
    here = ["--adapter", str(root / "doc.lora")] if adapter else []
    served = ask_lines("--server", server.url, "--cache", "doc.kv", *QUESTIONS, *more)
    local = ask_lines("--cache", str(root / "doc.kv"), *QUESTIONS, *here)
    assert served == local and len(served) == len(QUESTIONS)
    one = ask_lines("--server", server.url, "--cache", "doc.kv", QUESTIONS[0], *more, "--stream")  # streamed
    assert one == ask_lines("--cache", str(root / "doc.kv"), QUESTIONS[0], *here)
    if not adapter:  # --json: every key ask writes, the same answers
        served_json = [
            json.loads(line)
            for line in ask_lines("--server", server.url, "--cache", "doc.kv", *QUESTIONS[:2], "--json")
        ]
        local_json = [json.loads(line) for line in ask_lines("--cache", str(root / "doc.kv"), *QUESTIONS[:2], "--json")]
        assert [s["answer"] for s in served_json] == [x["answer"] for x in local_json]
        assert all(set(x) <= set(s) for s, x in zip(served_json, local_json))


def test_every_answer_names_the_memory_it_came_from(server, root):
    import hashlib

    (answer,) = server.answers({"cache": "doc.kv", "adapter": "doc.lora", "questions": [QUESTIONS[1]]})
    assert answer["cache_sha256"] == hashlib.sha256((root / "doc.kv").read_bytes()).hexdigest()
    weights = (root / "doc.lora" / "adapter_model.safetensors").read_bytes()
    assert answer["adapter_sha256"] == hashlib.sha256(weights).hexdigest()
    assert answer["adapter_mode"] == "decode"


def test_sixteen_concurrent_clients_get_the_answers_one_at_a_time_gets(server):
    questions = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})") for i in range(16)]
    body = {"cache": "doc.kv", "answer": {"max_new_tokens": int(TOKENS)}}
    alone = [server.answers({**body, "questions": [q]})[0]["answer"] for q in questions]
    together: list[str | None] = [None] * len(questions)

    def client(i: int) -> None:
        together[i] = server.answers({**body, "questions": [questions[i]]})[0]["answer"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert together == alone


def test_openai_chat_completions_whole_and_streamed(server):
    status, _, payload = server.request("GET", "/v1/models")
    assert status == 200 and "doc.kv" in [m["id"] for m in json.loads(payload)["data"]]
    body = {"model": "doc.kv", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": int(TOKENS)}
    limit = {"max_new_tokens": int(TOKENS)}
    expected = server.answers({"cache": "doc.kv", "questions": [QUESTIONS[0]], "answer": limit})
    status, _, payload = server.request("POST", "/v1/chat/completions", body)
    reply = json.loads(payload)
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == expected[0]["answer"]
    status, headers, payload = server.request("POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in payload.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected[0]["answer"] and chunks[0]["object"] == "chat.completion.chunk"


def test_names_outside_the_root_are_refused_and_nothing_there_is_read(server, root, tmp_path):
    fifo = tmp_path / "outside.fifo"  # opened, it would block the request: a refusal proves it was not
    os.mkfifo(fifo)
    (root / "escape.kv").symlink_to(fifo)
    (root / "escape_dir").symlink_to(tmp_path, target_is_directory=True)
    try:
        for name in ("../doc.kv", str(root / "doc.kv"), "escape.kv", "escape_dir/outside.fifo", "a/../../doc.kv"):
            status, _, payload = server.request("POST", "/v1/answers", {"cache": name, "questions": ["q"]})
            assert status == 403, (name, payload)
            assert len(payload.splitlines()) == 1 and json.loads(payload)["error"]["message"]
        status, _, payload = server.request(
            "POST", "/v1/answers", {"cache": "doc.kv", "adapter": "..", "questions": ["q"]}
        )
        assert status == 403
    finally:
        (root / "escape.kv").unlink()
        (root / "escape_dir").unlink()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"cache": "doc.kv"}', 400),
        (b'{"cache": "doc.kv", "questions": ["q"], "answer": {"max_new_tokens": 0}}', 400),
        (b'{"cache": "doc.kv", "questions": ["q"], "answer": {"batch_size": 4}}', 400),
        (json.dumps({"cache": "doc.kv", "questions": ["q"] * 17}).encode(), 400),
        (json.dumps({"cache": "doc.kv", "questions": ["x" * 4001]}).encode(), 400),
        (json.dumps({"cache": "doc.kv", "questions": ["q" * 100] * 12000}).encode(), 413),
        (b'{"cache": "missing.kv", "questions": ["q"]}', 404),
        (b'{"cache": "doc.lora", "questions": ["q"]}', 422),
        (b'{"cache": "doc.kv", "adapter_mode": "all", "adapter": "doc.lora", "questions": ["q"]}', 409),
    ],
)
def test_bad_requests_get_one_line_of_json(server, body, status):
    got, _, payload = server.request("POST", "/v1/answers", body, {"Content-Type": "application/json"})
    assert got == status, payload
    assert len(payload.splitlines()) == 1 and json.loads(payload)["error"]["message"]
    assert server.request("GET", "/health")[0] == 200  # and the server is still up


def test_unknown_paths_and_methods_are_json_too(server):
    for method, path in (("GET", "/nope"), ("GET", "/v1/answers")):
        status, _, payload = server.request(method, path)
        assert status in (404, 405) and "error" in json.loads(payload)


def test_an_adapter_replaced_on_disk_answers_from_its_new_weights(server, root):
    import torch
    from safetensors.torch import load_file, save_file

    swap = root / "swap.lora"
    shutil.copytree(root / "doc.lora", swap)
    limit = {"max_new_tokens": int(TOKENS)}
    body = {"cache": "doc.kv", "adapter": "swap.lora", "questions": [QUESTIONS[0]], "answer": limit}
    before = server.answers(body)[0]
    weights = swap / "adapter_model.safetensors"
    tensors = {k: (v * -4.0 if "lora_B" in k else v) for k, v in load_file(weights).items()}
    save_file(tensors, str(swap / "new.safetensors"), metadata={"format": "pt"})
    os.replace(swap / "new.safetensors", weights)  # as an atomic writer replaces it
    after = server.answers(body)[0]
    assert after["adapter_sha256"] != before["adapter_sha256"]
    local = ask_lines("--cache", str(root / "doc.kv"), "--adapter", str(swap), QUESTIONS[0])
    assert [after["answer"]] == local and after["answer"] != before["answer"]
    assert torch.is_tensor(next(iter(tensors.values())))


def test_a_client_that_goes_away_frees_its_rows(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"cache": "doc.kv", "questions": QUESTIONS, "stream": True, "answer": {"max_new_tokens": 256}}
    connection.request("POST", "/v1/answers", json.dumps(body).encode())
    response = connection.getresponse()
    assert response.status == 200 and "text" in json.loads(response.readline())  # one piece of an answer
    connection.sock.shutdown(2)  # gone mid-stream
    connection.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = json.loads(server.request("GET", "/health")[2])
        if health["questions_in_flight"] == 0:
            break
        time.sleep(0.2)
    assert health["questions_in_flight"] == 0


def test_ask_server_imports_no_torch(server):
    script = (
        "import sys\nfrom loramem.cli.app import main\nimport loramem.cli\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, code, file=sys.stderr)\n"
    )
    args = ["ask", "--server", server.url, "--cache", "doc.kv", "--max-new-tokens", "4", QUESTIONS[0]]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, cwd=REPO, timeout=300)
    assert result.stderr.decode().split()[-3:] == ["False", "False", "0"], result.stderr.decode()
    assert result.stdout.strip()


def test_ask_server_exit_codes(server, root):
    refused = run_cli("ask", "--server", server.url, "--cache", "../doc.kv", "q")
    assert refused.returncode == 2 and b"leaves the server's root" in refused.stderr
    incompatible = run_cli(
        "ask", "--server", server.url, "--cache", "doc.kv", "--adapter", "doc.lora", "--adapter-mode", "all", "q"
    )
    assert incompatible.returncode == 3, incompatible.stderr
    with_model = run_cli("ask", "--server", server.url, "--cache", "doc.kv", "--model", "x", "q")
    assert with_model.returncode == 2 and b"--model" in with_model.stderr
    unreachable = run_cli("ask", "--server", "http://127.0.0.1:9", "--cache", "doc.kv", "q")
    assert unreachable.returncode == 2 and b"cannot reach the server" in unreachable.stderr
    assert len(unreachable.stderr.decode().strip().splitlines()) == 1


def test_the_listing_and_the_schema(server):
    status, _, payload = server.request("GET", "/v1/memories")
    listed = {m["name"]: m for m in json.loads(payload)["memories"]}
    assert status == 200 and listed["doc.kv"]["kind"] == "cache" and listed["doc.lora"]["kind"] == "adapter"
    assert listed["doc.kv"]["tokens_total"] > 100 and listed["doc.lora"]["rank"] >= 1
    status, _, payload = server.request("GET", "/v1/schema")
    schema = json.loads(payload)
    assert (
        status == 200 and "questions" in schema["request"]["properties"] and "answer" in schema["answer"]["properties"]
    )


def test_a_cache_compressed_on_request_or_replaced_on_disk_answers_as_its_content(server, root):
    squeezed = root / "squeezed.kv"
    made = run_cli("compress", str(root / "doc.kv"), "--press", "snapkv", "--ratio", "0.9", "-o", str(squeezed))
    assert made.returncode == 0, made.stderr.decode()
    limit = {"max_new_tokens": int(TOKENS)}
    compress = {"press": "snapkv", "ratio": 0.9}
    (asked,) = server.answers({"cache": "doc.kv", "compress": compress, "questions": [QUESTIONS[2]], "answer": limit})
    assert [asked["answer"]] == ask_lines("--cache", str(squeezed), QUESTIONS[2])
    assert asked["cache_tokens"] < asked["document_tokens"]
    swap = root / "swap.kv"
    shutil.copy(squeezed, swap)
    before = server.answers({"cache": "swap.kv", "questions": [QUESTIONS[2]], "answer": limit})[0]
    shutil.copy(root / "doc.kv", root / "swap.new")
    os.replace(root / "swap.new", swap)
    after = server.answers({"cache": "swap.kv", "questions": [QUESTIONS[2]], "answer": limit})[0]
    assert before["cache_tokens"] < after["cache_tokens"] == after["document_tokens"]
    assert [after["answer"]] == ask_lines("--cache", str(root / "doc.kv"), QUESTIONS[2])
    assert after["cache_sha256"] != before["cache_sha256"]
