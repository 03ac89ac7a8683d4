"""Benchmark: a library's per-question adapter work, merging and switching, both ways in one run.

A routed library question merges its top-k documents' adapters (one merge per method and weighting) and attaches
each merge. Both were done on the model with PEFT: every source adapter and the result injected as new LoRA layers
(`add_weighted_adapter`), and every new adapter loaded as new layers (`load_adapter`). loramem now merges ties,
linear, cat and svd on the adapters' tensors with PEFT's arithmetic, and copies a new adapter's weights into the
layers of the least recently used loaded one when their layers agree. This script trains `--adapters` real adapters
on the default model (one step each on short invented texts: the speed does not depend on the values), then times

- merges of `--k` adapters, each method both ways (PEFT on the model, loramem on the tensors), checking every tensor
  of the two results equal;
- attaching the adapters one after another, `--rounds` times over (more adapters than stay loaded, so every attach
  after the first MAX_LOADED_ADAPTERS makes room), both ways (delete and load anew, or copy into the freed layers),
  checking each attached adapter's logits equal.

Usage: python benchmarks/library_merge.py [--adapters 12] [--k 3] [--rounds 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from loramem import load_model
from loramem.adapters import attach, merge
from loramem.adapters.attach import ADAPTER_WEIGHTS, attach_adapter, detach_adapter
from loramem.adapters.merge import merge_adapters
from loramem.adapters.train import train_adapter
from loramem.specs import MergeSpec, TrainSpec

TOPICS = ("harbour", "orchard", "foundry", "archive", "glacier", "market", "vineyard", "quarry", "canal", "loom")


@contextmanager
def peft_way() -> Iterator[None]:
    """Merging and attaching as before: every merge on the model, every new adapter loaded as new layers."""
    methods, overwrite = merge.TENSOR_METHODS, attach._overwrite
    merge.TENSOR_METHODS = ()
    attach._overwrite = lambda *args: False  # type: ignore[assignment]
    try:
        yield
    finally:
        merge.TENSOR_METHODS, attach._overwrite = methods, overwrite


def make_adapters(lm, folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        text = f"The {TOPICS[i % len(TOPICS)]} of Velmora number {i} opens at dawn and closes when the bell rings."
        paths.append(folder / f"a{i}")
        train_adapter(lm, text, [], paths[-1], TrainSpec(format="ntp", steps=1, lr=1e-3, seed=i))
    return paths


def time_merges(lm, paths: list[Path], folder: Path, k: int, repeats: int, method: str) -> dict:
    from safetensors.torch import load_file

    sets = [paths[i : i + k] for i in range(0, len(paths) - k + 1, k)][: max(1, repeats)]
    seconds = {}
    for way in ("peft", "tensors"):
        start = time.perf_counter()
        for index, sources in enumerate(sets):
            weights = [1.0 + 0.25 * j for j in range(k)]
            spec = MergeSpec(method=method, weights=weights)  # type: ignore[arg-type]
            if way == "peft":
                with peft_way():
                    merge_adapters(lm, sources, folder / f"{method}-{way}-{index}", spec)
            else:
                merge_adapters(lm, sources, folder / f"{method}-{way}-{index}", spec)
        seconds[way] = (time.perf_counter() - start) / len(sets)
    for index in range(len(sets)):
        a = load_file(str(folder / f"{method}-peft-{index}" / ADAPTER_WEIGHTS))
        b = load_file(str(folder / f"{method}-tensors-{index}" / ADAPTER_WEIGHTS))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), f"{method} merges differ"
    return {"part": "merge", "method": method, "k": k, "merges": len(sets), **seconds}


def time_attaches(lm, paths: list[Path], rounds: int) -> dict:
    ids = torch.tensor([lm.tokenizer("When does the harbour open?")["input_ids"]])
    logits = {}
    seconds = {}
    for way in ("peft", "tensors"):
        detach_adapter(lm)
        attach_adapter(lm, paths[0])  # the first wraps the model either way
        order = [p for _ in range(rounds) for p in paths[1:]]
        elapsed = 0.0
        with peft_way() if way == "peft" else nullcontext():
            for path in order:
                start = time.perf_counter()
                attach_adapter(lm, path)
                elapsed += time.perf_counter() - start
                with torch.inference_mode():
                    out = lm.model(input_ids=ids).logits
                assert logits.setdefault(path, out).equal(out), f"{path} answers differently the {way} way"
        seconds[way] = elapsed / len(order)
    detach_adapter(lm)
    return {"part": "attach", "attaches": len(order), "loaded_at_most": attach.MAX_LOADED_ADAPTERS, **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lm = load_model()
    with tempfile.TemporaryDirectory(prefix="loramem-bench-") as tmp:
        folder = Path(tmp)
        paths = make_adapters(lm, folder, args.adapters)
        rows = [time_merges(lm, paths, folder, args.k, args.repeats, m) for m in ("ties", "linear", "cat")]
        rows.append(time_attaches(lm, paths, args.rounds))
    print("| work | PEFT on the model | loramem | speed-up |")
    print("|---|---|---|---|")
    for row in rows:
        print(json.dumps(row))
    for row in rows:
        what = f"merge of {row['k']} ({row['method']})" if row["part"] == "merge" else "attach a new adapter"
        print(f"| {what} | {row['peft']:.3f} s | {row['tensors']:.3f} s | **{row['peft'] / row['tensors']:.1f}x** |")


if __name__ == "__main__":
    main()
