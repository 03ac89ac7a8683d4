"""Shared fixtures: a tiny randomly initialised Llama (fast) and the real default model (slow, `real`)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loramem.specs import EvalSpec

os.environ.setdefault("LORAMEM_QUIET", "1")


def _pin_threads() -> None:
    """One xdist worker per core, each with torch's default of one thread per core, oversubscribes the machine (and
    the subprocesses a worker starts inherit it): OpenMP threads then spin-wait on each other's cores. Each worker
    gets its share of the cores, for itself and (through OMP_NUM_THREADS) for the processes it runs."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, threads)
    if "torch" in sys.modules:  # read at torch's import; set it too if something imported torch already
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_pin_threads()

# The slowest files, slowest first (measured on 2 cores). `--dist loadfile` keeps a file on one worker and, with
# `--no-loadscope-reorder`, hands out files in collection order: the long ones start first, and the many short
# files fill in around them, so the workers end together instead of one finishing a long file alone.
SLOWEST_FIRST = (
    "test_serve.py",
    "test_real_eval.py",
    "test_demo.py",
    "test_train.py",
    "test_real_model.py",
    "test_cli_train_eval.py",
    "test_ray_eval.py",
    "test_batch.py",
    "test_library_qa.py",
    "test_cli.py",
    "test_library.py",
    "test_chat_template.py",
    "test_html_report.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: number for number, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


REPO = Path(__file__).resolve().parent.parent
DEMO_DOC = REPO / "examples" / "demo" / "lighthouse.txt"

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_model(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """A 2-layer Llama with a ChatML template and a byte-level BPE tokenizer trained on the demo text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([DEMO_DOC.read_text()] * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small to share out: a second thread only adds waiting (worse on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer, other weights: a cache from it must be refused."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_other"), seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from loramem import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def real():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per session."""
    from loramem import load_model

    return load_model()


@pytest.fixture(scope="session")
def doc_text() -> str:
    return DEMO_DOC.read_text()


def run_process(*args: str, input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `loramem` entry point in a subprocess, as a user's shell would: for tests where the process
    boundary is the point (pipes between processes, signals, a closed stdout, the interpreter's exit status)."""
    env = {**os.environ, "LORAMEM_QUIET": "1"}
    return subprocess.run(
        [sys.executable, "-m", "loramem", *args], input=input, capture_output=True, env=env, cwd=cwd, timeout=600
    )


def interrupt_once_written(
    args: list[str], signum: int, out: Path, input: bytes | None = None
) -> subprocess.CompletedProcess:
    """Run `loramem ARGS` with stdout to the file `out`, send `signum` once something is written there (an answer
    is being streamed), and wait for the end (bounded in time); stderr is returned."""
    env = {**os.environ, "LORAMEM_QUIET": "1", "PYTHONPATH": str(REPO)}
    with out.open("wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "loramem", *args],
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
        )
        if input is not None:
            assert process.stdin is not None
            process.stdin.write(input)
            process.stdin.flush()  # left open: the session is still reading when the signal comes
        deadline = time.monotonic() + 120
        while out.stat().st_size == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()[1].decode()
        process.send_signal(signum)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise AssertionError(f"signal {signum} did not stop the run") from None
    return subprocess.CompletedProcess(args, process.returncode, b"", err)


@contextlib.contextmanager
def entry_point_state() -> Iterator[None]:
    """What `loramem.cli.app.main` changes in the process it runs in (signal handlers, the unraisable hook, the
    working directory), put back afterwards so in-process CLI calls do not leak into later tests."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    hook, folder = sys.unraisablehook, os.getcwd()
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sys.unraisablehook = hook
        os.chdir(folder)


def exit_code(exc: SystemExit) -> int:
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def run_cli(*args: str, input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `loramem ARGS` through the real entry point (`loramem.cli.app.main`, its exit-code mapping included) in
    this process, with stdin, stdout and stderr as byte streams: what `run_process` returns, without starting an
    interpreter that imports torch, transformers and loramem again for each command (seconds each)."""
    import loramem.cli  # noqa: F401  (registers the commands)
    from loramem.cli.app import main

    streams = sys.stdin, sys.stdout, sys.stderr
    stdout, stderr = io.BytesIO(), io.BytesIO()
    # Held here: a text stream closes its bytes when collected, and the bytes are read after the streams are put back.
    mine = (
        io.TextIOWrapper(io.BytesIO(input or b""), encoding="utf-8"),
        io.TextIOWrapper(stdout, encoding="utf-8", write_through=True),
        io.TextIOWrapper(stderr, encoding="utf-8", write_through=True),
    )
    with entry_point_state():
        sys.stdin, sys.stdout, sys.stderr = mine
        try:
            if cwd is not None:
                os.chdir(cwd)
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exit_code(exc)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdin, sys.stdout, sys.stderr = streams
    return subprocess.CompletedProcess(["loramem", *args], code, stdout.getvalue(), stderr.getvalue())


def assert_same_sums(a, b, terms: int) -> None:
    """`a` and `b` are the same float computation with its sums taken in other orders (a batch against its rows one
    at a time, one padded call against length groups): they may differ by rounding only.

    Rounding a sum of n terms in some order errs like a random walk of n steps of at most u = eps / 2 times each
    partial sum: about u * sqrt(n) * max|terms| (Higham's statistical estimate; the worst case n * u is never met
    by real data). Two orders differ by sqrt(2) times that; `terms` is the longest reduction behind a value (the
    softmax over the vocabulary, then a sum over the batch's tokens of products over the hidden width) and max|a, b|
    stands for max|terms|. The bound, 4 * eps * sqrt(terms) * max|a, b|, is over 5 times that standard deviation and
    depends on the dtype and the sizes only, not on the order one CPU's kernels sum in (AVX-512 ones sum the
    49157 x 64 embedding gradient otherwise than AVX2 ones, 2.7e-6 apart). On an AVX-512 CPU it is 12 times
    the largest difference seen; a masking or padding error moves gradients by orders of magnitude more."""
    import torch

    scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=0.0, atol=4 * torch.finfo(a.dtype).eps * terms**0.5 * scale)


def summed_terms(model, examples) -> int:
    """The longest reductions behind a loss or gradient of `examples` (`assert_same_sums`)."""
    config = model.config
    return config.vocab_size + sum(len(e.ids) for e in examples) * config.hidden_size


def assert_batch_loss_equals_rows(model, batch) -> None:
    """`batch_loss` over a padded batch (a shared prefix run once, where there is one) has the loss and gradients of
    its examples run one at a time (up to the rounding of sums taken in another order: `assert_same_sums`)."""
    import copy

    from loramem.adapters.train import batch_loss

    model = copy.deepcopy(model).requires_grad_(True)

    def loss_and_grads(batches):
        model.zero_grad()
        loss = sum(batch_loss(model, b, 0, "cpu") for b in batches) / len(batches)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    batched_loss, batched_grads = loss_and_grads([batch])
    single_loss, single_grads = loss_and_grads([[e] for e in batch])
    terms = summed_terms(model, batch)
    assert_same_sums(batched_loss, single_loss, terms)
    for a, b in zip(batched_grads, single_grads):
        assert_same_sums(a, b, terms)


def flat_spec(**settings) -> EvalSpec:
    """An EvalSpec from settings named as loramem 0.1's flat config named them (rank=, answer_batch_size=, ...),
    read the way an old run's config.json is read."""
    return EvalSpec.from_record(settings)


TIMINGS = ("seconds", "setup_seconds")


def untimed(summary: dict) -> dict:
    """A summary without its cells' and budget points' mean seconds, which differ from run to run."""

    def strip(items: list[dict]) -> list[dict]:
        return [{k: v for k, v in item.items() if k not in TIMINGS} for item in items]

    return {
        **summary,
        "cells": strip(summary["cells"]),
        **({"budget": strip(summary["budget"])} if "budget" in summary else {}),
    }
