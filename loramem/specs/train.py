"""Adapter specs: training one document LoRA, the pairs it is trained on, and merging adapters."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import field_validator, model_validator

from loramem.specs.base import CommaList, Spec, refuse, setting
from loramem.vocab import Format, MergeMethod

_LAYER_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_HALVES = ("first-half", "second-half")
_LAYERS_HINT = "use e.g. 0-14, 0,3,5, first-half or second-half"
SYNTH_PAIRS = 16  # QA pairs synthesized from a document when none are given
# The largest LoRA scaling (alpha / r, or alpha / sqrt(r) with use_rslora) accepted: far above any trained one
# (loramem's default is 2), far below one that overflows the activations.
MAX_SCALE = 1024.0


def layer_ranges(spec: str) -> list[tuple[int, int]] | str:
    """A layers setting parsed into inclusive ranges, or one of the half keywords."""
    text = spec.strip().lower().replace(" ", "")
    if text in _HALVES:
        return text
    ranges = []
    for part in text.split(","):
        match = _LAYER_RANGE.fullmatch(part)
        if not match:
            raise ValueError(f"bad layers {spec!r}; {_LAYERS_HINT}")
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high:
            raise ValueError(f"bad layers {spec!r}: range {part} runs backwards")
        ranges.append((low, high))
    return ranges


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


class TrainSpec(Spec):
    """Hyperparameters of one document adapter; recorded in the adapter's loramem.json."""

    format: Format = setting(
        "qa",
        "qa (closed-book QA), ntp (raw text) or mixed (QA, the raw text, a summary and a rewrite of each passage)",
    )
    rank: int = setting(16, "LoRA rank", ge=1)
    alpha: float = setting(32.0, "LoRA alpha (the update is scaled by alpha / rank)", gt=0)
    dropout: float = setting(0.0, "LoRA dropout", ge=0, lt=1)
    targets: str = setting("all", "attn, mlp, all, or module names (comma-separated)")
    layers: str | None = setting(None, "Layers to adapt, e.g. 0-14, 0,3,5, first-half, second-half", shown="all")
    # On SmolLM2-135M with 10-20 QA pairs and 8 epochs: 5e-4 leaves trained questions wrong and 3e-3 is
    # unstable across seeds; 1.5e-3 recalled every trained answer in each run tried, and paraphrases too.
    lr: float = setting(1.5e-3, "Learning rate", gt=0, le=1)  # AdamW steps overflow float32 far above 1
    epochs: int = setting(8, "Passes over the training examples", ge=1)
    steps: int | None = setting(None, "Train this many steps instead of --epochs", ge=1)
    batch_size: int = setting(4, "Training examples per step", flag="--train-batch-size", ge=1)
    seed: int = setting(0, "Seed of the training and of synthesized pairs")
    max_length: int = setting(512, "Tokens per training example", ge=1)
    chunk_size: int = setting(128, "ntp: tokens per training chunk", ge=1)

    _finite_floats = field_validator("alpha", "dropout", "lr")(_finite)

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: str) -> str:
        if not value.strip(" ,"):
            raise ValueError("is empty; use attn, mlp, all or module names")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: str | None) -> str | None:
        if value is not None:
            layer_ranges(value)
        return value

    @model_validator(mode="after")
    def _fits(self) -> TrainSpec:
        if self.alpha / self.rank > MAX_SCALE:  # an adapter that loramem would then refuse to load
            refuse(f"alpha / rank must be at most {MAX_SCALE:g}, got {self.alpha / self.rank:g}", "alpha", "rank")
        if self.chunk_size > self.max_length:
            refuse(f"{self.chunk_size} exceeds the {self.max_length} of max_length", "chunk_size", "max_length")
        return self


class SynthSpec(Spec):
    """What a model writes from a document to train on: QA pairs when no pairs are given, and mixed's views."""

    pairs: int = setting(
        SYNTH_PAIRS, "Without --qa: synthesize this many pairs from the document", flag="--synth", ge=1
    )
    model: str | None = setting(
        None,
        "Model that writes the synthesized QA pairs and mixed's summaries and rewrites: any Hugging Face id or "
        "local model directory (the paper writes its QA with a strong model)",
        flag="--synth-model",
        shown="the model being trained",
    )


class MergeSpec(Spec):
    """How adapters are combined (PEFT's add_weighted_adapter); recorded in the merged adapter's loramem.json."""

    method: MergeMethod = setting(
        "cat", "How the adapters combine (cat keeps every adapter's update exactly, rank = sum)"
    )
    weights: Annotated[list[float] | None, CommaList] = setting(
        None, "One weight per adapter, e.g. 1,1,0.5", shown="1 each"
    )
    density: float = setting(0.5, "ties, dare_ties: fraction of entries kept, in (0, 1]", gt=0, le=1)
    seed: int = setting(0, "dare_ties: seed of the random drop")

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, value: list[float] | None) -> Any:
        if value is not None and not all(math.isfinite(w) for w in value):
            raise ValueError(f"must be finite numbers, got {', '.join(map(str, value))}")
        return value
