"""Loading and timing on accelerators: devices, honest hub errors, distinct timings, runtime recorded and not mixed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from conftest import DEMO_DOC, flat_spec, run_cli, run_process
from test_cli import one_line_error

from loramem import IncompatibleArtifactError, LoramemError, encode, generate, load_model
from loramem.data.formats import QA, DocRecord, write_dataset
from loramem.evaluation.rundir import ANSWERS, CONFIG, read_answers
from loramem.evaluation.runner import run_eval
from loramem.evaluation.shards import merge
from loramem.model.hub import hub_error
from loramem.model.loading import resolve_device

GRID = {"ratios": [0.0, 0.5], "presses": ["snapkv"], "modes": ["none"], "formats": ["qa"], "max_new_tokens": 3}


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cudax", "cuda:-1"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(LoramemError, match="device: unknown "):
        resolve_device(device)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message where there is no CUDA")
def test_cuda_without_cuda_says_so():
    for device in ("cuda", "cuda:1"):
        with pytest.raises(LoramemError, match="torch sees no CUDA device"):
            resolve_device(device)


def _http(cls, status: int):
    request = httpx.Request("GET", "https://huggingface.co/org/model/resolve/main/config.json")
    return cls("hub said no", response=httpx.Response(status, request=request))


def _wrapped(cause: BaseException) -> OSError:
    """As transformers raises it: an OSError from the huggingface_hub error."""
    try:
        raise OSError("transformers' wording\nsecond line") from cause
    except OSError as exc:
        return exc


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda e: _http(e.GatedRepoError, 403), "is gated"),
        (lambda e: _http(e.RepositoryNotFoundError, 404), "was not found"),
        (lambda e: _http(e.RevisionNotFoundError, 404), "no such revision"),
        (lambda e: _http(e.HfHubHTTPError, 401), "refused the token"),
        (lambda e: e.LocalEntryNotFoundError("not cached"), "cannot be reached"),
        (lambda e: e.OfflineModeIsEnabled("offline"), "cannot be reached"),
    ],
)
def test_hub_errors_are_told_apart(make, words):
    import huggingface_hub.errors as errors

    message = str(hub_error("org/model", _wrapped(make(errors))))
    assert words in message and "\n" not in message and "org/model" in message


def test_an_uncached_hub_model_offline_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        done = run_process("ask", "--model", "nobody-here/no-such-model", "Who?")  # the hub reads these at import
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert done.returncode == 2
    assert "cannot be reached" in one_line_error(done)


def test_prefill_and_time_to_first_token_are_distinct(tiny, doc_text):
    """The time to the first token counts putting the stored cache on the device; the prefill is the forward only."""
    answer = generate(tiny, "Who designed the lighthouse?", encode(tiny, doc_text), max_new_tokens=3)
    assert 0 < answer.prefill_seconds <= answer.time_to_first_token_seconds


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    parts = DEMO_DOC.read_text().split("\n\n")[1:3]
    qa = [QA("Who designed the lighthouse?", ["Orla Quenby"])]
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    write_dataset([DocRecord(f"doc-{i}", text, qa) for i, text in enumerate(parts)], path)
    return path


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dir):
    return load_model(str(tiny_dir), dtype="bfloat16")


def test_runtime_is_recorded_and_a_mixed_precision_resume_refused(tiny, tiny_bf16, dataset, tmp_path):
    run = tmp_path / "run"
    run_eval(tiny, dataset, run, flat_spec(**GRID, limit=1))
    runtime = json.loads((run / CONFIG).read_text())["model"]["runtime"]
    assert runtime["dtype"] == "float32" and runtime["device"] == "cpu"
    assert set(runtime) == {"dtype", "device", "torch", "transformers", "kvpress", "peft"}
    assert all(row["runtime"] == runtime for row in read_answers(run / ANSWERS))
    with pytest.raises(IncompatibleArtifactError, match="float32 on cpu, this run is bfloat16 on cpu"):
        run_eval(tiny_bf16, dataset, run, flat_spec(**GRID), resume=True)
    run_eval(tiny_bf16, dataset, run, flat_spec(**GRID), resume=True, allow_mixed=True)
    dtypes = [row["runtime"]["dtype"] for row in read_answers(run / ANSWERS)]
    assert dtypes.count("float32") == 2 and dtypes.count("bfloat16") == 2


def test_a_mixed_precision_merge_is_refused(tiny, tiny_bf16, dataset, tmp_path):
    shards = [tmp_path / "s0", tmp_path / "s1"]
    run_eval(tiny, dataset, shards[0], flat_spec(**GRID, shard=(0, 2)))
    run_eval(tiny_bf16, dataset, shards[1], flat_spec(**GRID, shard=(1, 2)))
    with pytest.raises(IncompatibleArtifactError, match="--allow-mixed"):
        merge(shards, tmp_path / "merged")
    done = run_cli("eval", "merge", *map(str, shards), "-o", str(tmp_path / "cli"))
    assert done.returncode == 3 and "--allow-mixed" in one_line_error(done)
    merge(shards, tmp_path / "merged", allow_mixed=True)
    assert len(read_answers(tmp_path / "merged" / ANSWERS)) == 4
