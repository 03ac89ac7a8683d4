"""The eval grid: the cells an EvalSpec asks of each document, budget points, and the run's settings as given.

The settings themselves are `loramem.specs.EvalSpec` (one source of every default and check); this module turns a
spec into cells, and combines settings given as flags, a TOML file and a run's record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from loramem.errors import LoramemError
from loramem.log import warn
from loramem.model.loading import sha256_text
from loramem.sizes import format_size
from loramem.specs import CompressSpec, EvalSpec
from loramem.specs.base import flatten, merged
from loramem.specs.eval import RESIZABLE, upgrade
from loramem.vocab import LIBRARY_MODES, MERGE_MODES

if TYPE_CHECKING:
    from loramem.data.formats import DocRecord
    from loramem.model.loading import LoadedModel

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def resumed_spec(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[EvalSpec, list[str]]:
    """A run's recorded spec (config.json's "config", any version) with the settings given again, and the field
    paths of those that disagree with the record (all but RESIZABLE, which a resume may widen or narrow)."""
    before = EvalSpec.from_record(recorded, "config.json")
    spec = EvalSpec.parse(merged(before.model_dump(), upgrade(given)))
    again, was = flatten(spec.record()), flatten(before.record())
    asked = flatten(upgrade(given))
    return spec, [name for name in asked if name not in RESIZABLE and again.get(name) != was.get(name)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Eval settings from a TOML file: EvalSpec's fields as keys, nested settings as tables (`[train]`, `rank = 8`)
    or by loramem 0.1's flat names (`rank = 8`)."""
    import tomllib

    from loramem.fileio import read_text

    try:
        return upgrade(tomllib.loads(read_text(path, what="config file")))
    except tomllib.TOMLDecodeError as exc:
        raise LoramemError(f"{path}: not valid TOML ({exc})") from exc


def select_documents(records: list[DocRecord], limit: int | None, shard: tuple[int, int]) -> list[DocRecord]:
    """The first `limit` documents, then every N-th from I (so shards split the same limited set)."""
    index, count = shard
    return [r for i, r in enumerate(records[:limit]) if i % count == index]


def with_instruction(records: list[DocRecord], instruction: str | None) -> list[DocRecord]:
    """The records with `instruction` after each held-out question, as every mode then asks it (and the answers
    record it); training pairs are left as they are."""
    if instruction is None:
        return records
    return [replace(r, qa=[replace(qa, question=f"{qa.question} {instruction}") for qa in r.qa]) for r in records]


def file_name(doc_id: str) -> str:
    """A document id usable as a file name; ids that are not get a readable slug and a hash (stays unique)."""
    if _SAFE_ID.fullmatch(doc_id):
        return doc_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._")[:60]
    return f"{slug}-{sha256_text(doc_id)[:10]}"


@dataclass(frozen=True)
class Cell:
    """One answer to produce for a document."""

    question_index: int
    press: str
    ratio: float | None  # None: a budget point, whose kept share depends on the document's length
    mode: str
    format: str | None
    granularity: str = "token"
    store: str = "native"
    budget: int | None = None  # budget points: bytes for kept KV plus the adapter of rank `rank`
    rank: int = 0
    merge: str | None = None  # routed-merge, hybrid: the merge method and how the routed adapters weigh
    merge_weights: str | None = None

    def variant(self, groups: int) -> str:
        """How the kept KV is cut and stored, as answers.jsonl names it: e.g. token, value-group/4 int8,
        budget 16000000 r8."""
        if self.budget is not None:
            name = f"budget {self.budget} r{self.rank}"
            return name if self.store == "native" else f"{name} {self.store}"
        return variant_name(self.granularity, groups, self.store)

    def compress_spec(self, groups: int) -> CompressSpec:
        """How a ratio cell's cache is compressed: tokens evicted at its ratio, or value groups at budget 1 - ratio
        (at ratio 1.0 no document KV remains either way), stored as its store dtype."""
        assert self.ratio is not None  # budget points are compressed within their bytes instead
        store = None if self.store == "native" else self.store
        settings: dict[str, Any] = {"press": self.press, "store_dtype": store}
        if self.granularity == "value-group" and self.ratio < 1.0:
            return CompressSpec.parse(
                {**settings, "granularity": "value-group", "groups": groups, "budget": 1 - self.ratio}
            )
        return CompressSpec.parse({**settings, "ratio": self.ratio})


def variant_name(granularity: str, groups: int, store: str) -> str:
    name = granularity if granularity == "token" else f"{granularity}/{groups}"
    return name if store == "native" else f"{name} {store}"


def budget_sizes(lm: LoadedModel, config: EvalSpec) -> dict[int, int]:
    """Stored bytes of the run's adapter at each budget rank (0 for rank 0), from the model before any training."""
    from loramem.adapters.train import adapter_element_bytes, lora_parameters

    element = adapter_element_bytes(lm.model)
    return (
        {
            rank: rank and lora_parameters(lm.model, config.train_spec("qa", rank)) * element
            for rank in config.budget_ranks
        }
        if config.budget_bytes
        else {}
    )


def budget_points(config: EvalSpec, sizes: dict[int, int]) -> list[tuple[int, int]]:
    """(budget, rank) points of the trade-off: every budget with every rank whose adapter alone fits in it."""
    points: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    for budget in config.budget_bytes:
        for rank in config.budget_ranks:
            (points if sizes[rank] < budget else dropped).append((budget, rank))
    for budget, rank in dropped:
        warn(
            f"budget {format_size(budget)}: a rank-{rank} adapter alone takes {format_size(sizes[rank])}; "
            "that point is left out"
        )
    if config.budget_bytes and not points:
        raise LoramemError(
            f"no adapter of ranks {', '.join(map(str, config.budget_ranks))} fits in any budget; "
            "add rank 0 (KV only), smaller ranks or larger budgets"
        )
    if config.budget_bytes and not any(rank for _, rank in points) and any(config.budget_ranks):
        warn("no budget holds any of the adapters; only KV-only points remain")
    return points


def grid(record: DocRecord, config: EvalSpec, points: list[tuple[int, int]]) -> list[Cell]:
    """Every cell of a document, grouped by press and ratio so each compressed cache is built once; library modes
    once per question (the merging ones once per merge method and weighting), outside the press and ratio grid;
    budget points (base KV, adapter on for decoding) last."""
    kv_modes = [m for m in config.modes if m not in LIBRARY_MODES]
    library_modes = [m for m in config.modes if m in LIBRARY_MODES]
    merges = [(merge, weights) for merge in config.library.merge for weights in config.library.merge_weights]
    questions = range(min(len(record.qa), config.max_questions or len(record.qa)))
    return (
        [
            Cell(q, press, ratio, mode, fmt, granularity, store)
            for press in config.presses
            for granularity in config.granularities
            for store in config.store_dtypes
            for ratio in config.ratios
            for mode in kv_modes
            for fmt in ([None] if mode == "none" else config.formats)
            for q in questions
        ]
        + [
            Cell(q, LIBRARY_SERIES, 1.0, mode, None, merge=merge, merge_weights=weights)
            for mode in library_modes
            for merge, weights in (merges if mode in MERGE_MODES else [(None, None)])
            for q in questions
        ]
        + [
            Cell(q, press, None, "decode" if rank else "none", fmt, store=store, budget=budget, rank=rank)
            for press in config.presses
            for store in config.store_dtypes
            for budget, rank in points
            for fmt in (config.formats if rank else [None])
            for q in questions
        ]
    )


def key_of(record: DocRecord, cell: Cell, groups: int) -> tuple:
    """The cell's key as report.cell_key reads it from an answer line."""
    return (
        record.id,
        cell.question_index,
        cell.press,
        cell.ratio,
        cell.mode,
        cell.format,
        cell.variant(groups),
        cell.merge,
        cell.merge_weights,
    )


# Library modes answer from the run's adapter library, with no KV of the question's own document: their answers
# carry press LIBRARY_SERIES, ratio 1.0 and format null, and their margin is taken against `none` at ratio 1.0.
LIBRARY_SERIES = "library"


class AnswerRow(BaseModel):
    """One line of answers.jsonl: the cell it answers, the question and its references, the answer and its scores,
    typed, and validated once where a run's answers are read (`rundir.read_answers`); the fields some answers add
    (variant, routing, budgets, runtime) are kept as they are."""

    model_config = ConfigDict(extra="allow")

    doc_id: str
    question_index: int = Field(ge=0)
    press: str
    ratio: float | None = Field(ge=0, le=1)
    mode: str
    format: str | None
    question: str
    references: list[str]
    answer: str
    rouge_l: float
    exact_match: float
    token_f1: float
    cache_tokens: int = Field(ge=0)
    seconds: float = Field(ge=0)
