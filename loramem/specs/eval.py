"""Evaluation specs: the eval grid (nesting the training, answering and library specs), and the capacity probe.

A run records its EvalSpec in RUN_DIR/config.json (`EvalSpec.record`, versioned); `EvalSpec.from_record` reads
today's records and those of loramem 0.1, whose settings were one flat mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, field_validator, model_validator

from loramem.sizes import parse_size
from loramem.specs.answer import MERGE, TOP_K, AnswerSpec
from loramem.specs.base import CommaList, Spec, comma_separated, leaves, refuse, setting, unique
from loramem.specs.kv import PressList, PressName
from loramem.specs.train import SynthSpec, TrainSpec
from loramem.vocab import (
    ADAPTER_MODES,
    EVICTION_PRESS,
    LIBRARY_MODES,
    Format,
    Granularity,
    MergeMethod,
    MergeWeighting,
    Mode,
    StoreDtype,
)

RECORD_VERSION = 3  # 3: library.merge a list (2 recorded one method, which reads as a list of one)
# The settings a resume may widen or narrow: which documents and questions, not how each is answered.
RESIZABLE = ("limit", "max_questions")
# loramem 0.1 recorded the grid as one flat mapping: its names of the nested settings.
_FLAT_V1 = {
    **{name: ("train", name) for name in TrainSpec.model_fields if name != "format"},
    "synth_pairs": ("synth", "pairs"),
    "synth_model": ("synth", "model"),
    "max_new_tokens": ("answer", "max_new_tokens"),
    "answer_batch_size": ("answer", "batch_size"),
    "max_batch_tokens": ("answer", "max_batch_tokens"),
    "library": ("library", "path"),
    "library_top_k": ("library", "top_k"),
    "merge": ("library", "merge"),
    "context_chunks": ("library", "context_chunks"),
}


def parse_shard(value: Any) -> Any:
    """'I/N' (or [I, N]) -> (I, N): this process takes the documents whose index modulo N is I."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        if not match:
            raise ValueError(f"bad shard {value!r}; use I/N with 0 <= I < N, e.g. 0/4")
        return int(match[1]), int(match[2])
    return value


def _sizes(value: Any) -> Any:
    """Byte budgets as sizes (8MB, 32MiB) or numbers."""
    value = comma_separated(value)
    try:
        return [parse_size(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value
    except Exception as exc:  # parse_size names the bad size
        raise ValueError(str(exc)) from exc


def ratios(value: list[float]) -> list[float]:
    """Compression ratios in [0, 1], each once, ascending (-0.0 read as 0.0)."""
    for ratio in value:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"a ratio must be in [0, 1], got {ratio}")
    return sorted({r + 0.0 for r in value})


def _resolved(value: str | None) -> str | None:
    return None if value is None else str(Path(value).resolve())


class LibraryModesSpec(Spec):
    """The eval's library modes: which library questions are routed over, and what a routed set gives."""

    path: str | None = setting(
        None,
        "Route over this library (holding every document of the run) instead of building RUN_DIR/library",
        flag="--library",
    )
    top_k: int = setting(TOP_K, "routed-merge, hybrid: documents routed and merged", flag="--library-top-k", ge=1)
    merge: Annotated[list[MergeMethod], CommaList] = setting(
        factory=lambda: [MERGE],
        help="routed-merge, hybrid: how the routed adapters merge; several (ties,linear,cat): each its own cells",
    )
    merge_weights: Annotated[list[MergeWeighting], CommaList] = setting(
        factory=lambda: ["equal"],
        help="routed-merge, hybrid: each routed adapter weighs 1 (equal), or by its routing score (routing: "
        "top_k x softmax(score / --merge-temperature), summing to top_k as equal weights do); both: each its own "
        "cells",
    )
    merge_temperature: float = setting(
        0.1,
        "--merge-weights routing: softmax temperature over the routing scores (cosine similarities; at 0.1 a lead "
        "of 0.1 weighs e times as much)",
        gt=0,
    )
    context_chunks: int = setting(2, "hybrid, rag: retrieved chunks in context", ge=1)

    _absolute = field_validator("path")(_resolved)

    @field_validator("merge", "merge_weights")
    @classmethod
    def _some_once_each(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one")
        return unique(value)


class EvalSpec(Spec):
    """The grid of a run (ratios x presses x modes x formats, storage, budgets) and how its adapters are trained and
    its questions answered; recorded in RUN_DIR/config.json."""

    ratios: Annotated[list[float], CommaList] = setting(
        factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9, 1.0],
        help="Compression ratios",
        shown="0,0.25,0.5,0.75,0.9,1.0; none with --budget-bytes",
    )
    presses: PressList = setting(factory=lambda: ["snapkv", "knorm"], help="Presses", flag="--press")
    modes: Annotated[list[Mode], CommaList] = setting(
        factory=lambda: ["none", "decode", "all"],
        help="Inference modes; library modes oracle, routed, routed-merge, hybrid, rag route over a library",
        flag="--mode",
    )
    formats: Annotated[list[Format], CommaList] = setting(
        factory=lambda: ["qa", "ntp"], help="Adapter training formats", flag="--format"
    )
    granularities: Annotated[list[Granularity], CommaList] = setting(
        factory=lambda: ["token"],
        help="KV eviction: token, value-group (budget = 1 - ratio of value bytes), or both",
        flag="--granularity",
    )
    store_dtypes: Annotated[list[StoreDtype], CommaList] = setting(
        factory=lambda: ["native"], help="KV storage: one curve each; bytes.png compares them", flag="--store-dtype"
    )
    groups: int = setting(4, "value-group: groups per value head vector", ge=1)
    limit: int | None = setting(None, "Only the first N documents", ge=1)
    max_questions: int | None = setting(
        None, "Only the first N questions of each document (a wide study at a smaller cost per document)", ge=1
    )
    instruction: str | None = setting(
        None,
        "Appended to every question after a space, the same in every mode (e.g. 'Answer in at most five words.'): "
        "a control for answer style and length",
    )
    shard: Annotated[tuple[int, int], BeforeValidator(parse_shard)] = setting(
        (0, 1), "I/N: this process takes documents i with i % N == I", shown="0/1"
    )
    adapters: str | None = setting(
        None, "Reuse adapters from this directory (DOCID-FORMAT subfolders, e.g. another run's adapters/)"
    )
    budget_bytes: Annotated[list[int], BeforeValidator(_sizes)] = setting(
        factory=list,
        help="Byte budgets (e.g. 8MB,32MiB), each split between kept KV and an adapter at every --budget-ranks point",
    )
    budget_ranks: Annotated[list[int], CommaList] = setting(
        factory=lambda: [0, 2, 8, 32],
        help="Adapter ranks of the budget split (0: the whole budget on KV); a rank whose adapter exceeds a budget is "
        "left out",
    )
    answer: AnswerSpec = setting(factory=lambda: AnswerSpec(max_new_tokens=32))
    train: TrainSpec = setting(factory=TrainSpec)
    synth: SynthSpec = setting(factory=SynthSpec)
    library: LibraryModesSpec = setting(factory=LibraryModesSpec)

    _absolute = field_validator("adapters")(_resolved)

    @model_validator(mode="before")
    @classmethod
    def _budget_replaces_ratios(cls, data: Any) -> Any:
        """A budget sweep replaces the ratio curves unless both are asked for."""
        if isinstance(data, Mapping) and data.get("budget_bytes") and "ratios" not in data:
            return {**data, "ratios": []}
        return data

    _ratios = field_validator("ratios")(lambda value: ratios(value))

    @field_validator("presses", "modes", "formats", "granularities", "store_dtypes")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        return unique(value)

    @field_validator("instruction")
    @classmethod
    def _instruction(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; give the words every question ends with, or leave it out")
        return None if value is None else value.strip()

    @field_validator("budget_bytes", "budget_ranks")
    @classmethod
    def _budgets(cls, value: list[int]) -> list[int]:
        if any(v < 0 for v in value):
            raise ValueError("must be >= 0 (budgets > 0)")
        return sorted(set(value))

    @model_validator(mode="after")
    def _a_grid(self) -> EvalSpec:
        if "value-group" in self.granularities and "base_scores" in self.modes:
            refuse("mode base_scores works with token granularity only", "modes", "granularities")
        if not self.budget_bytes and (not self.ratios or not self.modes):
            refuse("give at least one ratio and one mode", "ratios", "modes")
        if 0 in self.budget_bytes:
            refuse("byte budgets must be positive", "budget_bytes")
        if self.budget_bytes and not self.budget_ranks:
            refuse("give at least one budget rank (0: all bytes to kept KV)", "budget_ranks")
        if self.budget_bytes and any(self.budget_ranks) and not self.formats:
            refuse("budget ranks above 0 need a training format (qa)", "budget_ranks", "formats")
        if any(m in ADAPTER_MODES for m in self.modes) and not self.formats:
            refuse("adapter modes need at least one training format (qa, ntp)", "modes", "formats")
        index, count = self.shard
        if not 0 <= index < count:
            refuse(f"bad shard {index}/{count}; use I/N with 0 <= I < N", "shard")
        return self

    def train_spec(self, fmt: str, rank: int | None = None) -> TrainSpec:
        """The adapter hyperparameters for one training format (and a budget point's rank)."""
        return self.train.replace(format=fmt, rank=self.train.rank if rank is None else rank)

    @property
    def uses_library(self) -> bool:
        return any(m in LIBRARY_MODES for m in self.modes)

    def record(self) -> dict[str, Any]:
        """As config.json stores it: JSON types, versioned, without runtime settings (a decoding batch changes no
        answer) or the training format (each adapter's own)."""
        data = self.model_dump(mode="json", exclude=_excluded(EvalSpec))
        return {"version": RECORD_VERSION, **data}

    @classmethod
    def from_record(cls, data: Mapping[str, Any], source: str = "config") -> EvalSpec:
        """A spec from a record or a config file: today's nested settings, or loramem 0.1's flat ones; names may
        use dashes."""
        return cls.parse(upgrade(data), source)


def upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
    """Settings of any record version as today's nested mapping (dashes in names read as underscores)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "version":
            continue
        if isinstance(value, Mapping):
            value = {str(k).replace("-", "_"): v for k, v in value.items()}
        where = _FLAT_V1.get(name)
        if where is None or (name == "library" and isinstance(value, Mapping)):
            out[name] = {**out.get(name, {}), **value} if isinstance(value, Mapping) else value
        else:
            out.setdefault(where[0], {})[where[1]] = value
    return out


def _excluded(spec: type[Spec]) -> dict[str, Any]:
    """pydantic's `exclude` for a spec's runtime settings and the eval's training format."""
    exclude: dict[str, Any] = {"train": {"format": True}}
    for path, holder, name in leaves(spec):
        extra = holder.model_fields[name].json_schema_extra
        if isinstance(extra, dict) and extra.get("runtime"):
            exclude.setdefault(path[0], {})[path[1]] = True
    return exclude


class RaySpec(Spec):
    """Where an eval's documents run as Ray tasks: the cluster and each worker slot's resources."""

    address: str | None = setting(
        None,
        "Run documents as Ray tasks: local (start Ray here), auto or HOST:PORT (join a cluster; RUN_DIR must be "
        "shared)",
        flag="--ray",
    )
    cpus_per_worker: float = setting(1.0, "--ray: CPUs per worker slot", gt=0)
    gpus_per_worker: float = setting(0.0, "--ray: GPUs per worker slot", ge=0)
    max_retries: int = setting(2, "--ray: retries of a document whose worker died or ran out of memory", ge=0)


class DemoSpec(Spec):
    """`loramem demo`: the bundled document answered at several ratios, then with its adapter and no document."""

    ratios: Annotated[list[float], CommaList] = setting(
        factory=lambda: [0.0, 0.5, 0.9, 1.0], help="Compression ratios to compare (0 and 1.0 are always included)"
    )
    press: PressName = setting(EVICTION_PRESS, "Press used for every ratio")
    adapter: bool = setting(True, "Train a QA adapter on the example's pairs and answer at ratio 1.0")

    _ratios = field_validator("ratios")(lambda value: ratios(value))


PROBE_TRAIN: dict[str, Any] = {"epochs": 40, "batch_size": 8}  # the probe's training defaults unlike TrainSpec's


class ProbeSpec(Spec):
    """`probe capacity`'s grid, how far it walks it, and how each point's adapter trains (recorded in the run
    folder); at each rank the adapter's alpha is twice the rank, and training runs until the loss stops falling
    (`patience`, `min_delta`, `loss_floor`), the epochs being the cap."""

    ranks: Annotated[list[int], CommaList] = setting(factory=lambda: [1, 2, 4, 8, 16, 32, 64], help="LoRA ranks")
    facts: Annotated[list[int], CommaList] = setting(
        factory=lambda: [8, 16, 32, 64, 128, 256, 512],
        help="Fact-set sizes (invented phone numbers), tried smallest first at each rank until one is recalled "
        "below --stop-below",
    )
    threshold: float = setting(0.9, "Recall that counts as stored, for saturation", gt=0, le=1)
    stop_below: float = setting(
        0.5, "A rank tries no larger fact sets once one is recalled below this (0: try every size)", ge=0, le=1
    )
    patience: int = setting(
        3,
        "Training ends once the epoch's mean loss has not fallen by --min-delta for this many epochs "
        "(or is under --loss-floor); --epochs is the cap",
        ge=1,
    )
    min_delta: float = setting(0.05, "Relative fall of the epoch loss that counts as still falling", ge=0, lt=1)
    loss_floor: float = setting(0.02, "Epoch loss at which training counts as converged", ge=0)
    train: TrainSpec = setting(factory=lambda: TrainSpec.model_validate(PROBE_TRAIN))

    @field_validator("train", mode="before")
    @classmethod
    def _probe_training(cls, value: Any) -> Any:
        """Training settings given (`--lr`) replace the probe's own defaults one by one: built from TrainSpec's
        alone, giving any one would also reset the epochs and batch size to train-adapter's."""
        return {**PROBE_TRAIN, **value} if isinstance(value, Mapping) else value

    @field_validator("ranks", "facts")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one")
        if min(value) < 1:
            raise ValueError("must be positive")
        return sorted(set(value))

    def train_spec(self, rank: int) -> TrainSpec:
        return self.train.replace(format="qa", rank=rank, alpha=2.0 * rank)

    def point_settings(self) -> dict[str, Any]:
        """What decides a point's result, which a run folder's points must share: the training and when it stops
        (not which ranks and sizes are asked, nor how recall is read)."""
        return {
            "train": self.train.model_dump(exclude={"format", "rank", "alpha"}),
            "patience": self.patience,
            "min_delta": self.min_delta,
            "loss_floor": self.loss_floor,
        }
