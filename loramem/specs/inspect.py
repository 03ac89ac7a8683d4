"""What `inspect` shows of a cache beyond its summary: the kept-token map, for all slots or one layer or head."""

from __future__ import annotations

from loramem.specs.base import Spec, setting


class InspectSpec(Spec):
    """The kept-token map of a cache: which (layer, KV head) slots it reads, and how much of the document it prints."""

    kept: bool = setting(
        False, "Show the document with each token shaded by the share of (layer, head) slots that kept it"
    )
    layer: int | None = setting(None, "Map one layer only (0-based)", ge=0)
    head: int | None = setting(None, "Map one KV head only (0-based)", ge=0)
    max_tokens: int = setting(
        1000, "Document tokens the terminal map prints (a longer document is cut, with a note)", ge=1
    )

    @property
    def mapped(self) -> bool:
        """Whether a kept-token map is asked for (any of its settings given)."""
        return self.kept or self.layer is not None or self.head is not None
