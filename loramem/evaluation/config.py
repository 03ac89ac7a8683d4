"""The eval grid: EvalConfig (the one source of a run's settings), its vocabularies and cells."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramem.adapters.config import FORMATS, SYNTH_PAIRS, MergeConfig, TrainConfig
from loramem.errors import LoramemError
from loramem.kv.presses import parse_presses
from loramem.library import MERGE, TOP_K
from loramem.log import warn
from loramem.model import MAX_BATCH_TOKENS
from loramem.model.loading import sha256_text
from loramem.sizes import format_size, parse_size

if TYPE_CHECKING:
    from loramem.data.formats import DocRecord
    from loramem.model.loading import LoadedModel

ADAPTER_MODES = ("decode", "all", "base_scores")


GRANULARITIES = ("token", "value-group")


STORE_DTYPES = ("native", "fp16", "bf16", "int8", "int4")


LIBRARY_SETTINGS = ("library", "library_top_k", "merge", "context_chunks")


BUDGET_SETTINGS = ("budget_bytes", "budget_ranks")
RUNTIME_SETTINGS = ("answer_batch_size", "max_batch_tokens")


_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class EvalConfig:
    """The grid and the adapter hyperparameters of a run; recorded in RUN_DIR/config.json."""

    ratios: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    presses: list[str] = field(default_factory=lambda: ["snapkv", "knorm"])
    modes: list[str] = field(default_factory=lambda: ["none", "decode", "all"])
    formats: list[str] = field(default_factory=lambda: ["qa", "ntp"])
    granularities: list[str] = field(default_factory=lambda: ["token"])
    store_dtypes: list[str] = field(default_factory=lambda: ["native"])
    groups: int = 4
    max_new_tokens: int = 32
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    seed: int = 0
    synth_pairs: int = SYNTH_PAIRS
    synth_model: str | None = None  # writes the synthesized pairs (id or directory); default: the model evaluated
    adapters: str | None = None
    rank: int = TrainConfig.rank
    alpha: float = TrainConfig.alpha
    dropout: float = TrainConfig.dropout
    targets: str = TrainConfig.targets
    layers: str | None = TrainConfig.layers
    lr: float = TrainConfig.lr
    epochs: int = TrainConfig.epochs
    steps: int | None = TrainConfig.steps
    batch_size: int = TrainConfig.batch_size
    max_length: int = TrainConfig.max_length
    chunk_size: int = TrainConfig.chunk_size
    library: str | None = None  # library modes: route over this library instead of building RUN_DIR/library
    library_top_k: int = TOP_K  # routed-merge, hybrid: documents routed to and merged
    merge: str = MERGE
    context_chunks: int = 2  # hybrid, rag: retrieved chunks in context
    budget_bytes: list[int] = field(default_factory=list)  # byte budgets split between kept KV and an adapter
    budget_ranks: list[int] = field(default_factory=lambda: [0, 2, 8, 32])  # the split's points; 0: KV only
    # Decoding batches: how answers are computed, not what they are, so config.json leaves them out (RUNTIME_SETTINGS).
    answer_batch_size: int | None = None  # questions of a cell decoded together; None: what max_batch_tokens allows
    max_batch_tokens: int = MAX_BATCH_TOKENS

    def __post_init__(self) -> None:
        """Refuse a bad grid before the model does any work; ratios are deduplicated and sorted."""
        for ratio in self.ratios:
            if not 0.0 <= float(ratio) <= 1.0:
                raise LoramemError(f"ratio must be in [0, 1], got {ratio}")
        self.ratios = sorted({float(r) + 0.0 for r in self.ratios})  # + 0.0: -0.0 is 0.0
        self.presses = parse_presses(",".join(self.presses))
        self.modes = known(self.modes, MODES, "mode")
        self.formats = known(self.formats, FORMATS, "format")
        self.granularities = known(self.granularities, GRANULARITIES, "granularity")
        self.store_dtypes = known(self.store_dtypes, STORE_DTYPES, "store dtype")
        if "value-group" in self.granularities and "base_scores" in self.modes:
            raise LoramemError("mode base_scores works with token granularity only")
        if self.groups < 1:
            raise LoramemError(f"groups must be at least 1, got {self.groups}")
        if not self.budget_bytes and (not self.ratios or not self.modes):
            raise LoramemError("give at least one ratio and one mode")
        if any(b <= 0 for b in self.budget_bytes) or any(r < 0 for r in self.budget_ranks):
            raise LoramemError("byte budgets must be positive and budget ranks >= 0")
        self.budget_bytes = sorted(set(self.budget_bytes))
        self.budget_ranks = sorted(set(self.budget_ranks))
        if self.budget_bytes and not self.budget_ranks:
            raise LoramemError("give at least one budget rank (0: all bytes to kept KV)")
        if self.budget_bytes and any(self.budget_ranks) and not self.formats:
            raise LoramemError("budget ranks above 0 need a training format (--format qa)")
        if any(m in ADAPTER_MODES for m in self.modes) and not self.formats:
            raise LoramemError("adapter modes need at least one training format (--format qa,ntp)")
        index, count = self.shard = (int(self.shard[0]), int(self.shard[1]))
        if not 0 <= index < count:
            raise LoramemError(f"bad shard {index}/{count}; use I/N with 0 <= I < N")
        for name in (
            "limit",
            "max_new_tokens",
            "synth_pairs",
            "library_top_k",
            "context_chunks",
            "answer_batch_size",
            "max_batch_tokens",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LoramemError(f"{name} must be at least 1, got {value}")
        if self.adapters is not None:
            self.adapters = str(Path(self.adapters).resolve())
        if self.library is not None:
            self.library = str(Path(self.library).resolve())
        MergeConfig(method=self.merge)
        for fmt in self.formats:
            self.train_config(fmt)

    def train_config(self, fmt: str, rank: int | None = None) -> TrainConfig:
        """The adapter hyperparameters for one training format (and a budget point's rank)."""
        return TrainConfig(
            format=fmt,
            rank=self.rank if rank is None else rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=self.targets,
            layers=self.layers,
            lr=self.lr,
            epochs=self.epochs,
            steps=self.steps,
            batch_size=self.batch_size,
            seed=self.seed,
            max_length=self.max_length,
            chunk_size=self.chunk_size,
        )

    @property
    def uses_library(self) -> bool:
        return any(m in LIBRARY_MODES for m in self.modes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> EvalConfig:
        """A config from settings named as its fields (dashes allowed), as config.json or an --config TOML file
        holds them: lists as lists or comma-separated text, shard as [I, N] or "I/N", byte budgets as sizes."""
        kinds = {f.name: str(f.type) for f in fields(cls)}
        values = {str(key).replace("-", "_"): value for key, value in data.items()}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise LoramemError(f"{source}: unknown setting {unknown[0]!r}; known: {', '.join(kinds)}")
        for name, value in values.items():
            kind = kinds[name].removesuffix(" | None")
            if kind.startswith("list[") and isinstance(value, str):
                value = values[name] = [_scalar(part, kind[5:-1], f"{source}: {name}") for part in value.split(",")]
            if name == "shard":
                values[name] = parse_shard(value if isinstance(value, str) else "/".join(map(str, value)))
            elif name == "budget_bytes":
                values[name] = [parse_size(v) if isinstance(v, str) else v for v in value]
            elif not _is_a(value, kind):
                raise LoramemError(f"{source}: {name} must be {kind}, got {value!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """As config.json stores it (JSON types), so a stored config compares equal to a fresh one. Runs without
        library modes or budgets leave those settings out, so runs made before they existed still resume and merge."""
        data = json.loads(json.dumps(asdict(self)))
        unused = (() if self.uses_library else LIBRARY_SETTINGS) + (() if self.budget_bytes else BUDGET_SETTINGS)
        unused += (() if self.synth_model else ("synth_model",)) + RUNTIME_SETTINGS
        return {k: v for k, v in data.items() if k not in unused}


def resumed_config(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[EvalConfig, list[str]]:
    """A run's recorded config (config.json's "config") with the settings given again, and the names of those
    that disagree with the record (all but `limit`, which a resume may widen or narrow)."""
    config = EvalConfig.from_dict({**recorded, **given}, "config.json")
    again, before = config.to_dict(), EvalConfig.from_dict(recorded, "config.json").to_dict()
    return config, [name for name in given if name != "limit" and again.get(name) != before.get(name)]


def _is_a(value: Any, kind: str) -> bool:
    """Whether a setting read from a file has the type its field declares (`kind` as annotated, e.g. list[float])."""
    if value is None:
        return True  # fields that may not be None refuse it in __post_init__
    if kind.startswith("list["):
        return isinstance(value, list) and all(_is_a(v, kind[5:-1]) for v in value)
    allowed = {"int": (int,), "float": (int, float), "str": (str,)}.get(kind)
    return allowed is None or (isinstance(value, allowed) and not isinstance(value, bool))


def _scalar(text: str, kind: str, what: str) -> Any:
    try:
        return {"int": int, "float": float}.get(kind, str)(text.strip())
    except ValueError as exc:
        raise LoramemError(f"{what}: {text.strip()!r} is not {kind}") from exc


def read_config_file(path: str | Path) -> dict[str, Any]:
    """An eval grid from a TOML file: EvalConfig's fields as keys (e.g. `ratios = [0, 0.5]`, `presses = "snapkv"`)."""
    import tomllib

    from loramem.fileio import read_text

    try:
        return tomllib.loads(read_text(path, what="config file"))
    except tomllib.TOMLDecodeError as exc:
        raise LoramemError(f"{path}: not valid TOML ({exc})") from exc


def known(names: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise LoramemError(f"unknown {what} {unknown[0]!r}; use some of {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N): this process takes the documents whose index modulo N is I."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise LoramemError(f"bad shard {text!r}; use I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def select_documents(records: list[DocRecord], limit: int | None, shard: tuple[int, int]) -> list[DocRecord]:
    """The first `limit` documents, then every N-th from I (so shards split the same limited set)."""
    index, count = shard
    return [r for i, r in enumerate(records[:limit]) if i % count == index]


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

    def variant(self, groups: int) -> str:
        """How the kept KV is cut and stored, as answers.jsonl names it: e.g. token, value-group/4 int8,
        budget 16000000 r8."""
        if self.budget is not None:
            name = f"budget {self.budget} r{self.rank}"
            return name if self.store == "native" else f"{name} {self.store}"
        return variant_name(self.granularity, groups, self.store)


def variant_name(granularity: str, groups: int, store: str) -> str:
    name = granularity if granularity == "token" else f"{granularity}/{groups}"
    return name if store == "native" else f"{name} {store}"


def budget_sizes(lm: LoadedModel, config: EvalConfig) -> dict[int, int]:
    """Stored bytes of the run's adapter at each budget rank (0 for rank 0), from the model before any training."""
    from loramem.adapters.train import adapter_element_bytes, lora_parameters

    element = adapter_element_bytes(lm.model)
    return (
        {
            rank: rank and lora_parameters(lm.model, config.train_config("qa", rank)) * element
            for rank in config.budget_ranks
        }
        if config.budget_bytes
        else {}
    )


def budget_points(config: EvalConfig, sizes: dict[int, int]) -> list[tuple[int, int]]:
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


def grid(record: DocRecord, config: EvalConfig, points: list[tuple[int, int]]) -> list[Cell]:
    """Every cell of a document, grouped by press and ratio so each compressed cache is built once; library modes
    once per question, outside the press and ratio grid; budget points (base KV, adapter on for decoding) last."""
    kv_modes = [m for m in config.modes if m not in LIBRARY_MODES]
    library_modes = [m for m in config.modes if m in LIBRARY_MODES]
    questions = range(len(record.qa))
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
        + [Cell(q, LIBRARY_SERIES, 1.0, mode, None) for mode in library_modes for q in questions]
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
    return (record.id, cell.question_index, cell.press, cell.ratio, cell.mode, cell.format, cell.variant(groups))


METRICS = ("rouge_l", "exact_match", "token_f1", "contains")


KV_MODES = ("none", "decode", "all", "base_scores")


# Library modes answer from the run's adapter library, with no KV of the question's own document: their answers
# carry press LIBRARY_SERIES, ratio 1.0 and format null, and their margin is taken against `none` at ratio 1.0.
LIBRARY_MODES = ("oracle", "routed", "routed-merge", "hybrid", "rag")


MODES = (*KV_MODES, *LIBRARY_MODES)


LIBRARY_SERIES = "library"


CELL_FIELDS = ("doc_id", "question_index", "press", "ratio", "mode", "format")


ANSWER_FIELDS = (
    *CELL_FIELDS,
    "question",
    "references",
    "answer",
    "rouge_l",
    "exact_match",
    "token_f1",
    "cache_tokens",
    "seconds",
)


@dataclass
class ProbeConfig:
    """`probe capacity`'s grid and the adapters' training settings (recorded in capacity.json); the command's
    defaults are these."""

    ranks: list[int] = field(default_factory=lambda: [4, 16, 64])
    facts: list[int] = field(default_factory=lambda: [50, 200, 800])
    targets: str = "all"
    layers: str | None = None
    epochs: int = 10
    lr: float = TrainConfig.lr
    batch_size: int = 8
    seed: int = 0
    threshold: float = 0.9

    def __post_init__(self) -> None:
        if not self.ranks or not self.facts:
            raise LoramemError("give at least one rank and one fact-set size")
        if min(self.ranks) < 1 or min(self.facts) < 1:
            raise LoramemError("ranks and fact-set sizes must be positive")
        if not 0 < self.threshold <= 1:
            raise LoramemError(f"threshold must be in (0, 1], got {self.threshold}")
        self.ranks, self.facts = sorted(set(self.ranks)), sorted(set(self.facts))
        self.train_config(self.ranks[0])  # validates targets, layers, lr, epochs, batch size

    def train_config(self, rank: int) -> TrainConfig:
        return TrainConfig(
            format="qa",
            rank=rank,
            alpha=2.0 * rank,
            targets=self.targets,
            layers=self.layers,
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
        )
