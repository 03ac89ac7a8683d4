"""KV-cache specs: encoding a document once, and compressing a stored cache (evicting, value groups, storage)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, field_validator, model_validator

from loramem.specs.base import Spec, comma_separated, refuse, setting, unique
from loramem.vocab import (
    DEFAULT_PRESSES,
    EVICTION_PRESS,
    PRESSES,
    Framing,
    Granularity,
    GroupRule,
    Press,
    QuantAxis,
    StoreDtype,
)


def _press_name(value: Any) -> Any:
    """A press as users write it (SnapKV, expected-attention)."""
    return value.strip().replace("-", "_").lower() if isinstance(value, str) else value


def _press_names(value: Any) -> Any:
    """Comma-separated press names; `all` for every known press."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return list(PRESSES)
    value = comma_separated(value)
    return [_press_name(v) for v in value] if isinstance(value, list) else value


PressName = Annotated[Press, BeforeValidator(_press_name)]
PressList = Annotated[list[Press], BeforeValidator(_press_names)]
_STORE_ALIASES = {"float16": "fp16", "bfloat16": "bf16", "fp32": "float32"}


def _ratio(value: float | None) -> float | None:
    return None if value is None else value + 0.0  # -0.0 is 0.0 (a ratio printed as "-0" is no ratio)


class EncodeSpec(Spec):
    """One prefill of a document: what is recorded with its KV cache."""

    score: PressList = setting(
        factory=lambda: list(DEFAULT_PRESSES),
        help="Presses whose scores are recorded during the prefill (all: every one)",
    )
    framing: Framing = setting("chat", "chat (the model's chat template) or raw (plain text)")
    truncate: bool = setting(False, "Cut a document longer than the context, with a warning")

    @field_validator("score")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one press")
        return unique(value)


class CompressSpec(Spec):
    """What a compressed cache keeps and how it is stored: tokens by a press's recorded scores (a ratio evicted or
    a count kept), or value groups inside tokens under a byte budget, optionally re-stored in another dtype."""

    press: PressName = setting(EVICTION_PRESS, "Press whose recorded scores pick the tokens", short="-p")
    ratio: float | None = setting(
        None, "Fraction of document tokens to evict, in [0, 1]; 1.0 evicts the whole document", short="-r", ge=0, le=1
    )
    keep: int | None = setting(None, "Keep this many document tokens instead of a ratio", ge=0)
    granularity: Granularity = setting(
        "token", "token (whole tokens) or value-group (channel groups inside each value vector)"
    )
    groups: int = setting(4, "value-group: groups per value head vector", ge=1)
    budget: float | None = setting(None, "value-group: fraction of document value bytes kept, in (0, 1]", gt=0, le=1)
    score_groups: GroupRule | None = setting(
        None,
        "value-group rule: norm (token score x group's share of the value norm), uniform, or query "
        "(question attention x group value norm)",
        shown="query with --query/--questions, else norm",
    )
    query: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = setting(
        factory=list,
        help="value-group: score groups by these questions' attention to the document (loads the model)",
    )
    store_dtype: Annotated[StoreDtype | None, BeforeValidator(lambda v: _STORE_ALIASES.get(v, v))] = setting(
        None, "Store keys/values as fp16, bf16, int8 or int4 (scales alongside); loaded back dequantized"
    )
    quant_axis: QuantAxis = setting("token", "int8/int4 scales per token (groups of channels) or per channel")
    quant_group: int = setting(0, "Channels per scale for --quant-axis token (0: the whole head)", ge=0)

    _ratio_sign = field_validator("ratio")(_ratio)

    @model_validator(mode="after")
    def _one_request(self) -> CompressSpec:
        """One way of choosing what to keep, refused before any cache is read."""
        if self.query and self.granularity != "value-group":
            refuse("questions score value groups; add granularity value-group and a budget", "query", "granularity")
        if self.granularity == "value-group":
            if self.budget is None:
                refuse("value-group compression needs a budget in (0, 1]", "budget")
            if self.ratio is not None or self.keep is not None:
                refuse("value-group compression keeps a budget of value bytes; leave them out", "ratio", "keep")
            return self
        stray = [name for name in ("budget", "score_groups") if getattr(self, name) is not None]
        if stray:
            refuse("value-group settings; add granularity value-group", *stray)
        if self.ratio is not None and self.keep is not None:
            refuse("give one, not both", "ratio", "keep")
        if self.ratio is None and self.keep is None and self.store_dtype is None:
            refuse(
                "give a ratio in [0, 1], a number of tokens to keep, or a store dtype", "ratio", "keep", "store_dtype"
            )
        return self

    @property
    def rule(self) -> GroupRule:
        """How value groups are scored: the query rule when questions are given, else by value norm."""
        return self.score_groups or ("query" if self.query else "norm")

    @property
    def evicts(self) -> bool:
        return self.ratio is not None or self.keep is not None or self.granularity == "value-group"
