"""Checked writes (issue 13, defects 1 and 8): nothing is lost on stdout without a non-zero exit, outputs are
checked before long work, killed writes leave nothing behind, folders follow the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_DOC, REPO
from inprocess import assert_refused, invoke

from loramem import encode
from loramem.fileio import atomic_directory, atomic_write_bytes, write_stdout

ENV = {**os.environ, "LORAMEM_QUIET": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def cache_file(tiny, doc_text, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("io") / "c.safetensors"
    path.write_bytes(encode(tiny, doc_text, presses=["knorm"]).to_bytes())
    return path


def loramem(*args: str, stdout, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loramem", *args], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=ENV
    )


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_device_fails_loudly(cache_file):
    with open("/dev/full", "wb") as full:
        compress = loramem("compress", str(cache_file), "-p", "knorm", "--ratio", "0.5", "-o", "-", stdout=full)
        fiction = loramem("data", "synth-fiction", "-o", "-", stdout=full)
        results = [(p, p.communicate()[1]) for p in (compress, fiction)]
    for process, err in results:
        assert process.returncode == 2 and "no space left" in one_line(err)


def test_reader_closing_the_pipe_early_is_exit_141(cache_file):
    process = loramem("compress", str(cache_file), "-p", "knorm", "--ratio", "0.1", "-o", "-", stdout=subprocess.PIPE)
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait() == 141 and "broken pipe" in one_line(err)


def test_closed_stdout_and_stdin_are_one_line_errors(cache_file, tmp_path):
    def shell(line: str) -> subprocess.CompletedProcess:
        command = f"{sys.executable} -m loramem {line}"
        return subprocess.run(["bash", "-c", command], capture_output=True, env=ENV, timeout=300)

    closed_out = shell(f"inspect {cache_file} --json >&-")
    assert closed_out.returncode == 2 and "stdout is closed" in one_line(closed_out.stderr)
    closed_in = shell("inspect - <&-")
    assert closed_in.returncode == 2 and "stdin is closed" in one_line(closed_in.stderr)


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    target = tmp_path / "out.bin"
    with target.open("wb") as handle:
        monkeypatch.setattr(sys, "stdout", open(handle.fileno(), "w", closefd=False))  # noqa: SIM115
        write_stdout(b"x" * 1000 + b"end")
    assert target.read_bytes() == b"x" * 1000 + b"end"


def test_write_that_makes_no_progress_is_an_error(tmp_path, monkeypatch):
    from loramem import LoramemError

    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with (tmp_path / "out.bin").open("wb") as handle:
        monkeypatch.setattr(sys, "stdout", open(handle.fileno(), "w", closefd=False))  # noqa: SIM115
        with pytest.raises(LoramemError, match="short write"):
            write_stdout(b"data")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "out.safetensors"
    stale = tmp_path / f".out.safetensors.{dead_pid()}.abcd1234.tmp"
    stale.write_bytes(b"half")
    stale_dir = tmp_path / f".out.safetensors.{dead_pid()}.zz99.tmp"
    stale_dir.mkdir()
    live = tmp_path / f".out.safetensors.{os.getppid()}.efgh5678.tmp"  # a running process's write
    live.write_bytes(b"busy")
    other = tmp_path / ".notes.txt.1.abc.tmp"  # not this target's
    other.write_bytes(b"keep")
    atomic_write_bytes(target, b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


def test_output_folder_is_checked_before_the_prefill(tmp_path, capsys):
    missing = tmp_path / "missing" / "dir" / "x.safetensors"
    # The model does not exist either: the folder must be refused first, before any loading.
    result = invoke(capsys, "encode", str(DEMO_DOC), "-o", str(missing), "--model", str(tmp_path / "no-model"))
    assert "does not exist" in assert_refused(result, (2,)) and "folder" in result.stderr
    out = invoke(capsys, "train-adapter", str(DEMO_DOC), "-o", str(missing), "--model", str(tmp_path / "no-model"))
    assert "folder" in assert_refused(out, (2,))


def test_adapter_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "adapter") as tmp:
            (tmp / "weights").write_bytes(b"w")
            (tmp / "weights").chmod(0o600)
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    folder = tmp_path / "adapter"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "weights").stat().st_mode) == 0o644


def test_device_as_document_is_refused(capsys, tmp_path):
    result = invoke(capsys, "encode", "/dev/zero", "-o", str(tmp_path / "x"))
    assert "not a regular file" in assert_refused(result, (2,))


def test_a_closed_stdout_does_not_fail_a_command_that_wrote_a_file(tiny_dir, tmp_path):
    out = tmp_path / "so.kv"
    command = f"{sys.executable} -m loramem encode {DEMO_DOC} --model {tiny_dir} -o {out} >&-"
    result = subprocess.run(["bash", "-c", command], capture_output=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert out.is_file() and b"error" not in result.stderr


def test_a_deleted_working_directory_is_named_before_torch_loads(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    command = f"cd {gone} && rmdir {gone} && {sys.executable} -m loramem ask --cache x.kv hello"
    result = subprocess.run(["bash", "-c", command], capture_output=True, env=ENV, timeout=300)
    assert result.returncode == 2 and "working directory no longer exists" in one_line(result.stderr)


def test_a_full_disk_while_writing_an_adapter_is_exit_2_with_the_path(tiny_dir, tmp_path):
    import resource

    def small_files() -> None:  # writes past 20 KiB fail with EFBIG (Python ignores SIGXFSZ), as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, 20 * 1024))

    out = tmp_path / "adapter"
    args = ["train-adapter", str(DEMO_DOC), "--format", "ntp", "--steps", "1", "--model", str(tiny_dir), "-o", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "loramem", *args], capture_output=True, env=ENV, timeout=300, preexec_fn=small_files
    )
    assert result.returncode == 2 and f"cannot write {out}: file too large" in one_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_what_loramem_made_and_never_an_input(tiny_dir, cache_file, tmp_path):
    from conftest import run_cli

    data = tmp_path / "data"
    data.mkdir()
    doc, notes = data / "doc.txt", data / "notes.csv"
    doc.write_text(DEMO_DOC.read_text())
    notes.write_text("a,b\n")
    train = ["train-adapter", "--model", str(tiny_dir), "--steps", "1", "--format", "ntp", "--force"]
    cases = [
        ([*train, str(doc), "-o", str(data)], None, f"output {data} holds the input {doc}"),
        ([*train, str(DEMO_DOC), "-o", str(data)], None, f"{data} is not an adapter loramem wrote"),
        ([*train, str(DEMO_DOC), "-o", "."], data, ". is not an adapter loramem wrote"),
        (["compress", str(cache_file), "--ratio", "0.5", "-o", str(cache_file), "--force"], None, "is the input"),
        (["compress", str(cache_file), "--ratio", "0.5", "-o", str(notes), "--force"], None, "is not a cache loramem"),
        (["encode", str(doc), "--model", str(tiny_dir), "-o", str(cache_file)], None, "already exists; use --force"),
        (["encode", str(doc), "--model", str(tiny_dir), "-o", str(doc), "--force"], None, "is the input"),
    ]
    for args, cwd, message in cases:
        result = run_cli(*args, cwd=cwd)
        assert result.returncode == 2 and message in one_line(result.stderr), (args, result.stderr)
    assert sorted(p.name for p in data.iterdir()) == ["doc.txt", "notes.csv"] and notes.read_text() == "a,b\n"
    replaced = tmp_path / "again.kv"
    for force in ([], ["--force"]):
        result = run_cli("compress", str(cache_file), "-p", "knorm", "--ratio", "0.5", "-o", str(replaced), *force)
        assert result.returncode == 0, result.stderr.decode()
