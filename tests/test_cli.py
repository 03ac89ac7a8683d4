"""The CLI as a shell user meets it: pipes, stdout/stderr discipline, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import DEMO_DOC, REPO, run_cli, run_process


def one_line_error(result) -> str:
    err = result.stderr.decode()
    assert result.returncode != 0, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def cache_file(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "doc.kv.safetensors"
    result = run_cli("encode", str(DEMO_DOC), "-o", str(out), "--model", str(tiny_dir))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    return out


def test_pipeline_through_pipes(tiny_dir):
    """encode | compress | ask as separate processes, each reading the one before from its stdin."""
    model = ["--model", str(tiny_dir)]
    encoded = run_process("encode", "-", *model, input=DEMO_DOC.read_bytes())
    assert encoded.returncode == 0, encoded.stderr.decode()
    compressed = run_process("compress", "-", "--ratio", "0.8", input=encoded.stdout)
    assert compressed.returncode == 0, compressed.stderr.decode()
    assert len(compressed.stdout) < len(encoded.stdout)
    answered = run_process(
        "ask", "--cache", "-", "Who designed it?", "--max-new-tokens", "4", *model, input=compressed.stdout
    )
    assert answered.returncode == 0, answered.stderr.decode()
    assert len(answered.stdout.decode().splitlines()) == 1


def test_ask_json_and_many_questions(tiny_dir, cache_file, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Who?", "id": 1}\n\n{"question": "When?", "id": 2}\n')
    result = run_cli(
        "ask",
        "--cache",
        str(cache_file),
        "--questions",
        str(questions),
        "--json",
        "--max-new-tokens",
        "3",
        "--model",
        str(tiny_dir),
    )
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    for key in ("answer", "prefill_seconds", "time_to_first_token_seconds", "decode_tokens_per_second", "cache_tokens"):
        assert key in rows[0]


def test_questions_from_stdin(tiny_dir, cache_file):
    result = run_cli(
        "ask",
        "--cache",
        str(cache_file),
        "--max-new-tokens",
        "2",
        "--model",
        str(tiny_dir),
        input=b"Who?\nWhen?\nWhere?\n",
    )
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout.decode().splitlines()) == 3


def test_inspect_json(cache_file):
    result = run_cli("inspect", str(cache_file), "--json")
    assert result.returncode == 0, result.stderr.decode()
    info = json.loads(result.stdout)
    assert info["tokens_total"] == info["kept_per_layer"][0]
    assert "snapkv" in info["scores_recorded"]
    human = run_cli("inspect", str(cache_file))
    assert b"document preview" in human.stdout


def test_compress_sweep_writes_smaller_files(cache_file, tmp_path):
    sizes = []
    for ratio in ("0", "0.5", "0.9", "1.0"):
        out = tmp_path / f"r{ratio}.safetensors"
        result = run_cli("compress", str(cache_file), "--press", "knorm", "--ratio", ratio, "-o", str(out))
        assert result.returncode == 0, result.stderr.decode()
        sizes.append(out.stat().st_size)
    assert sizes == sorted(sizes, reverse=True)


def test_missing_file(tmp_path):
    assert "not found" in one_line_error(
        run_cli("compress", str(tmp_path / "nope"), "--ratio", "0.5", "-o", str(tmp_path / "x"))
    )
    assert not (tmp_path / "x").exists()


def test_empty_document(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "out.safetensors"
    assert "empty" in one_line_error(run_cli("encode", str(empty), "-o", str(out), "--model", str(tiny_dir)))
    assert not out.exists()


def test_not_safetensors(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("definitely not tensors")
    assert "not a safetensors" in one_line_error(run_cli("inspect", str(bogus)))


def test_truncated_artifact(cache_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(cache_file.read_bytes()[:5000])
    assert "truncated" in one_line_error(run_cli("compress", str(cut), "--ratio", "0.5", "-o", str(tmp_path / "o")))


def test_unknown_format_version(cache_file, tmp_path):
    data = cache_file.read_bytes().replace(b'\\"format_version\\": 1', b'\\"format_version\\": 7', 1)
    future = tmp_path / "future.safetensors"
    future.write_bytes(data)
    result = run_cli("inspect", str(future))
    assert "version 7" in one_line_error(result) and result.returncode == 3


def test_cache_from_another_model(other_tiny_dir, cache_file):
    result = run_cli("ask", "--cache", str(cache_file), "Who?", "--model", str(other_tiny_dir))
    assert "another model" in one_line_error(result) and result.returncode == 3


@pytest.mark.parametrize("ratio", ["1.5", "-0.2"])
def test_ratio_out_of_range(cache_file, tmp_path, ratio):
    assert "[0, 1]" in one_line_error(
        run_cli("compress", str(cache_file), f"--ratio={ratio}", "-o", str(tmp_path / "o"))
    )


def test_unknown_press(cache_file, tmp_path):
    unknown = one_line_error(
        run_cli("compress", str(cache_file), "--press", "nosuch", "--ratio", "0.5", "-o", str(tmp_path / "o"))
    )
    assert "--press: input should be 'snapkv', 'expected_attention'" in unknown and "encode" not in unknown
    assert "not recorded" in one_line_error(
        run_cli("compress", str(cache_file), "--press", "keydiff", "--ratio", "0.5", "-o", str(tmp_path / "o"))
    )


def test_unknown_press_at_encode(tiny_dir, tmp_path):
    assert "--score: input should be 'snapkv'" in one_line_error(
        run_cli("encode", str(DEMO_DOC), "--score", "snapkv,bogus", "-o", str(tmp_path / "o"), "--model", str(tiny_dir))
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_path_as_user(cache_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "cannot" in one_line_error(
        run_cli("compress", str(cache_file), "--ratio", "0.5", "-o", str(locked / "o.safetensors"))
    )


def test_unwritable_path(cache_file, tmp_path):
    assert "does not exist" in one_line_error(
        run_cli("compress", str(cache_file), "--ratio", "0.5", "-o", str(tmp_path / "no" / "dir" / "o.safetensors"))
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot" in one_line_error(
        run_cli("compress", str(cache_file), "--ratio", "0.5", "-o", str(blocker / "o.safetensors"))
    )


def test_interrupted_write_leaves_nothing(cache_file, tmp_path, monkeypatch):
    """A failure mid-write (here: the rename) removes the temporary file and leaves no output."""
    from loramem import fileio

    def broken_replace(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_bytes(tmp_path / "out.bin", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_data_convert_and_synth_fiction(tmp_path):
    out = tmp_path / "squad.jsonl"
    result = run_cli(
        "data",
        "convert",
        "squad",
        str(REPO / "tests" / "fixtures" / "squad_dev.json"),
        "--train-split",
        "0.5",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr.decode()
    from loramem.data.formats import load_dataset

    records = load_dataset(out)
    assert records and all(r.qa for r in records)
    fiction = run_cli("data", "synth-fiction", "--n-docs", "3", "--seed", "0")
    assert [json.loads(line)["id"] for line in fiction.stdout.decode().splitlines()] == [
        "fiction-000",
        "fiction-001",
        "fiction-002",
    ]
    assert "unknown layout" in one_line_error(run_cli("data", "convert", "bogus", "x"))


def test_value_groups_and_quantized_storage(tiny_dir, cache_file, tmp_path):
    out = tmp_path / "vg.safetensors"
    result = run_cli(
        "compress",
        str(cache_file),
        "--granularity",
        "value-group",
        "--groups",
        "4",
        "--budget",
        "0.3",
        "--press",
        "knorm",
        "--store-dtype",
        "int8",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr.decode()
    info = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert info["value_groups"]["budget"] == 0.3 and info["storage"]["dtype"] == "int8"
    assert info["kv_bytes"] > 0 and info["value_groups"]["token_level_bytes_at_same_budget"] > 0
    asked = run_cli("ask", "--cache", str(out), "Who?", "--max-new-tokens", "3", "--model", str(tiny_dir))
    assert asked.returncode == 0, asked.stderr.decode()
    for bad, message in (
        (["--groups", "5", "--budget", "0.5"], "does not divide"),
        (["--groups", "4", "--budget", "0"], "(0, 1]"),
        (["--groups", "4"], "--budget"),
    ):
        err = one_line_error(
            run_cli("compress", str(cache_file), "--granularity", "value-group", *bad, "-o", str(tmp_path / "bad"))
        )
        assert message in err
    assert "int3" in one_line_error(
        run_cli("compress", str(cache_file), "--store-dtype", "int3", "-o", str(tmp_path / "bad"))
    )


def test_query_aware_value_groups(tiny_dir, cache_file, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Who designed it?"}\n{"question": "When was it built?"}\n')
    out = tmp_path / "query.safetensors"
    result = run_cli(
        "compress",
        str(cache_file),
        "--granularity",
        "value-group",
        "--budget",
        "0.3",
        "--questions",
        str(questions),
        "--query",
        "Who kept it?",
        "--model",
        str(tiny_dir),
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr.decode()
    groups = json.loads(run_cli("inspect", str(out), "--json").stdout)["value_groups"]
    assert groups["score_groups"] == "query" and groups["query"]["n_questions"] == 3
    asked = run_cli("ask", "--cache", str(out), "Who designed it?", "--max-new-tokens", "3", "--model", str(tiny_dir))
    assert asked.returncode == 0, asked.stderr.decode()
    value_group = ["compress", str(cache_file), "--granularity", "value-group", "--budget", "0.3"]
    no_query = run_cli(*value_group, "--score-groups", "query", "-o", str(tmp_path / "bad"))
    assert "--score-groups, --query: query needs questions" in one_line_error(no_query) and no_query.returncode == 2
    assert "does not use a question" in one_line_error(
        run_cli(*value_group, "--score-groups", "uniform", "--query", "Who?", "-o", str(tmp_path / "bad"))
    )
    assert "value-group" in one_line_error(
        run_cli("compress", str(cache_file), "--ratio", "0.5", "--query", "Who?", "-o", str(tmp_path / "bad"))
    )
    assert not (tmp_path / "bad").exists()
