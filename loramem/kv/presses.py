"""Press scores: which presses loramem can record, and the press that records them in one prefill.

kvpress presses pick tokens in `compress` by `score(...)` then top-k. Scores of a ScorerPress do
not depend on the ratio, so encode records them once per (layer, KV head, token) and compress
later takes top-k for any ratio without the model. StreamingLLM's kvpress score does depend on
the ratio, so it gets an equivalent ratio-free score here (sinks first, then recency).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loramem.errors import LoramemError
from loramem.vocab import PRESSES

if TYPE_CHECKING:
    import torch


STREAMING_SINKS = 4


def _kvpress_factories() -> dict[str, Callable[[], Any]]:
    from kvpress import (
        ExpectedAttentionPress,
        KeyDiffPress,
        KnormPress,
        RandomPress,
        SnapKVPress,
        TOVAPress,
    )

    return {
        "snapkv": SnapKVPress,
        "expected_attention": ExpectedAttentionPress,
        "knorm": KnormPress,
        "tova": TOVAPress,
        "random": lambda: RandomPress(seed=0),
        "keydiff": KeyDiffPress,
    }


def check_recorded(press: str, recorded: Iterable[str]) -> None:
    """Refuse evicting by a press whose scores the cache does not hold: an unknown name with the known ones, a
    known one with the `encode --score` that records it."""
    if press not in PRESSES:
        raise LoramemError(f"unknown press {press!r}; known: {', '.join(PRESSES)}")
    if press not in recorded:
        have = sorted(recorded)
        raise LoramemError(
            f"press {press!r} was not recorded at encode time (recorded: {', '.join(have) or 'none'}); "
            f"re-encode with: loramem encode DOC --score {','.join(sorted({*have, press}))}"
        )


def make_kvpress(name: str, compression_ratio: float = 0.0) -> Any:
    """The kvpress object for a name, as kvpress itself would compress with it."""
    if name == "streaming_llm":
        from kvpress import StreamingLLMPress

        return StreamingLLMPress(compression_ratio=compression_ratio, n_sink=STREAMING_SINKS)
    press = _kvpress_factories()[name]()
    press.compression_ratio = compression_ratio
    return press


def streaming_scores(n_heads: int, n_tokens: int) -> torch.Tensor:
    """StreamingLLM as a ratio-free score: the sink tokens rank first, then the most recent."""
    import torch

    score = torch.arange(n_tokens, dtype=torch.float32)
    score[: min(STREAMING_SINKS, n_tokens)] += n_tokens + 1
    return score.expand(n_heads, n_tokens).clone()


def _recorder_base() -> type:
    from kvpress.presses.base_press import BasePress

    return BasePress


def _shorter_window(scorer: Any, n_tokens: int) -> Any | None:
    """A windowed scorer (SnapKV) for an input shorter than its window: a quarter of the input as the window.

    kvpress refuses such inputs outright; a short SQuAD paragraph would then have no SnapKV scores at all.
    """
    import dataclasses

    window = getattr(scorer, "window_size", None)
    if window is None or n_tokens < 2 or window < n_tokens or not dataclasses.is_dataclass(scorer):
        return None
    return dataclasses.replace(scorer, window_size=max(1, n_tokens // 4))  # type: ignore[type-var]


def make_recorder(names: list[str]) -> Any:
    """A kvpress press that leaves the cache intact and records every scorer's scores per layer."""
    import torch

    base = _recorder_base()

    @dataclass
    class RecordingPress(base):  # type: ignore[misc, valid-type]
        scorers: dict[str, Any] = field(default_factory=dict)
        scores: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
        skipped: dict[str, str] = field(default_factory=dict)
        adjusted: dict[str, str] = field(default_factory=dict)
        on_layer: Callable[[int], None] | None = None

        def post_init_from_model(self, model: Any) -> None:
            for scorer in self.scorers.values():
                scorer.post_init_from_model(model)

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            layer = int(module.layer_idx)
            for name, scorer in self.scorers.items():
                if name in self.skipped:
                    continue
                try:
                    s = scorer.score(module, hidden_states, keys, values, attentions, kwargs)
                except AssertionError as exc:  # kvpress asserts on inputs it cannot score (too short)
                    shorter = _shorter_window(scorer, keys.shape[2])
                    if shorter is None:
                        self.skipped[name] = str(exc) or "input too short"
                        continue
                    self.adjusted[name] = (
                        f"window_size {scorer.window_size} -> {shorter.window_size} for a {keys.shape[2]}-token input"
                    )
                    self.scorers[name] = scorer = shorter
                    s = scorer.score(module, hidden_states, keys, values, attentions, kwargs)
                self.scores.setdefault(name, {})[layer] = s[0].detach().to("cpu", torch.float32)
            if self.on_layer is not None:
                self.on_layer(layer)
            return keys, values

    scorers = {n: make_kvpress(n) for n in names if n != "streaming_llm"}
    return RecordingPress(scorers=scorers)
