"""Fast start: what a one-off `ask --cache` or `compress` process pays for before its work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def test_the_default_models_fingerprint_is_kept_beside_its_copy(tiny, tiny_dir, tmp_path, monkeypatch):
    from loramem.model import loading

    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    first = loading._kept_fingerprint(copy, tiny.model, tiny.tokenizer)
    assert first == loading.model_fingerprint(tiny.model, tiny.tokenizer)
    assert (copy / "loramem-fingerprint.json").is_file()

    def recomputed(*args):
        raise AssertionError("the kept fingerprint was not used")

    monkeypatch.setattr(loading, "model_fingerprint", recomputed)
    assert loading._kept_fingerprint(copy, tiny.model, tiny.tokenizer) == first
    stat = (copy / "model.safetensors").stat()
    os.utime(copy / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the weights changed
    with pytest.raises(AssertionError, match="not used"):
        loading._kept_fingerprint(copy, tiny.model, tiny.tokenizer)


@pytest.mark.parametrize(
    ("command", "unwanted"),
    [
        (["ask", "--help"], ("torch", "transformers", "kvpress", "peft", "scipy", "matplotlib")),
        (["compress", "--help"], ("torch", "transformers", "kvpress", "peft", "scipy", "matplotlib")),
        (["chat", "--help"], ("torch", "transformers", "kvpress", "peft", "scipy", "matplotlib")),
        (["eval", "run", "--help"], ("torch", "transformers", "kvpress", "peft", "scipy", "matplotlib")),
    ],
)
def test_help_imports_no_heavy_library(command, unwanted):
    code = (
        "import sys\nsys.argv = ['loramem', *sys.argv[1:]]\nfrom loramem.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {unwanted!r} if m in sys.modules], file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr


def test_ask_and_compress_from_a_cache_do_not_import_kvpress_or_peft(tiny_dir, tmp_path, doc_text):
    from conftest import run_cli

    cache = tmp_path / "doc.kv"
    assert run_cli("encode", "-", "-o", str(cache), "--model", str(tiny_dir), input=doc_text.encode()).returncode == 0
    code = (
        "import sys\nsys.argv = ['loramem', *sys.argv[1:]]\nfrom loramem.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print([m for m in ('kvpress', 'peft', 'matplotlib') if m in sys.modules], file=sys.stderr)"
    )
    env = {**os.environ, "LORAMEM_QUIET": "1"}
    for args in (
        ["ask", "--cache", str(cache), "--model", str(tiny_dir), "--max-new-tokens", "2", "Who?"],
        ["compress", str(cache), "--ratio", "0.5", "-o", str(tmp_path / "half.kv")],
    ):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
        assert result.stderr.strip().splitlines()[-1] == "[]", (args, result.stderr)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_all_finite_agrees_with_isfinite_even_where_the_sum_overflows(dtype):
    import torch

    from loramem.tensorfile import all_finite

    kind = getattr(torch, dtype)
    big = torch.finfo(kind).max
    cases = {
        "small": torch.randn(3, 50, 8).to(kind),
        "sum overflows": torch.full((4, 16), big, dtype=kind),  # finite, but its sum is not
        "opposite overflows": torch.tensor([big, big, -big, -big], dtype=kind),
        "empty": torch.zeros(0, 4, dtype=kind),
    }
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(2, 30, 8).to(kind)
        t[1, 7, 3] = bad
        cases[f"holds {bad}"] = t
    both = torch.randn(10).to(kind)
    both[2], both[5] = float("inf"), float("-inf")
    cases["inf and -inf"] = both
    for name, t in cases.items():
        assert all_finite(t) == bool(torch.isfinite(t).all()), name
    assert all_finite(torch.tensor([2**31 - 1, 5], dtype=torch.int32))


def test_a_ray_worker_imports_no_plotting_or_statistics():
    """A Ray actor imports loramem.evaluation.ray before it loads a model; only the driver summarizes and plots."""
    code = "import sys, loramem.evaluation.ray\nprint([m for m in ('scipy', 'matplotlib') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
