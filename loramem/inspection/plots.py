"""inspect's maps as PNGs: keep shares over layers x document positions with the document's tokens as the axis,
two caches' overlap and difference, an adapter's update norms, adapters' cosines (matplotlib, on a plain Agg
canvas, imported only when a plot is asked for)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from loramem.fileio import atomic_write_bytes
from loramem.inspection.kept import Comparison, KeptMap

MAX_TICKS = 80  # token labels on a position axis; a longer document labels every k-th token


def _width(tokens: int) -> float:
    """Inches for a position axis: wider for longer documents, within what a screen shows."""
    return min(24.0, max(10.0, 0.06 * tokens + 3))


def _figure(width: float, heights: list[float], share_x: bool = False) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, height_ratios=heights, squeeze=False, sharex=share_x)[:, 0]
    return fig, list(axes)


def _save(fig: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def _token_axis(ax: Any, labels: list[str], start: int) -> None:
    """Document positions labelled by their tokens' text, every k-th one where there are too many to read."""
    step = max(1, math.ceil(len(labels) / MAX_TICKS))
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [f"{labels[t].replace(chr(10), '↵')!s} ·{start + t}" for t in ticks], rotation=90, fontsize=7)
    ax.set_xlabel("document position (token ·index)" + (f", every {step}th labelled" if step > 1 else ""))


def _heatmap(ax: Any, data: Any, cmap: str, low: float, high: float, ylabel: str) -> Any:
    """Rows over document positions; each row labelled by its number (every k-th where there are many)."""
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=low, vmax=high)
    ax.set_ylabel(ylabel)
    step = max(1, math.ceil(data.shape[0] / 16))
    ax.set_yticks(range(0, data.shape[0], step), [str(r) for r in range(0, data.shape[0], step)], fontsize=7)
    return image


def plot_kept(kept: KeptMap, path: str | Path, title: str) -> None:
    """Keep share per layer over document positions; below it, each (layer, head) slot, unless one is chosen."""
    start = kept.framing_tokens
    labels = [kept.label(i) for i in range(start, len(kept.token_ids))]
    layers, heads = kept.grid.shape[:2]
    if kept.layer is not None:
        rows, ylabel = kept.grid[kept.layer, :, start:], f"KV head (layer {kept.layer})"
    else:
        rows, ylabel = kept.per_layer[:, start:], "layer" + (f" (KV head {kept.head})" if kept.head is not None else "")
    panels = [max(2.5, 0.12 * rows.shape[0] + 1.5)]
    per_slot = kept.layer is None and kept.head is None and heads > 1
    if per_slot:
        panels.append(max(2.5, 0.04 * layers * heads + 1.0))
    fig, axes = _figure(_width(len(labels)), panels, share_x=True)
    image = _heatmap(axes[0], rows.numpy(), "RdYlGn", 0.0, 1.0, ylabel)
    fig.colorbar(image, ax=axes[0], label="share kept", fraction=0.03)
    axes[0].set_title(f"{title}: kept over {kept.slots()}", fontsize=10)
    if per_slot:
        slots = kept.grid[:, :, start:].reshape(layers * heads, -1).numpy()
        _heatmap(axes[1], slots, "RdYlGn", 0.0, 1.0, "layer · head")
        step = max(1, math.ceil(layers / 16))
        axes[1].set_yticks(range(0, layers * heads, heads * step), [str(x) for x in range(0, layers, step)], fontsize=7)
    _token_axis(axes[-1], labels, start)
    _save(fig, path)


def plot_comparison(comparison: Comparison, path: str | Path) -> None:
    """Per-layer Jaccard bars over a difference map: the share of heads keeping a token, first minus second."""
    import numpy as np

    start = comparison.framing_tokens
    labels = [comparison.label(i) for i in range(start, len(comparison.token_ids))]
    layers = len(comparison.slot_jaccard)
    fig, axes = _figure(_width(len(labels)), [2.6, max(2.5, 0.12 * layers + 1.5)])
    x = np.arange(layers)
    axes[0].bar(x - 0.2, comparison.slot_jaccard, 0.4, label="(head, position) slots")
    axes[0].bar(x + 0.2, comparison.token_jaccard, 0.4, label="positions kept by any head")
    axes[0].set(xlabel="layer", ylabel="Jaccard", ylim=(0, 1.05), xlim=(-0.6, layers - 0.4))
    step = max(1, math.ceil(layers / 32))
    axes[0].set_xticks(range(0, layers, step))
    axes[0].legend(fontsize=8, loc="lower right")
    a, b = (Path(s).name for s in comparison.sources)
    axes[0].set_title(f"kept slots: {a} vs {b}", fontsize=10)
    image = _heatmap(axes[1], comparison.difference[:, start:].numpy(), "coolwarm", -1.0, 1.0, "layer")
    fig.colorbar(image, ax=axes[1], label=f"heads keeping: {a} − {b}", fraction=0.03)
    _token_axis(axes[1], labels, start)
    _save(fig, path)


def plot_norms(table: dict[str, Any], path: str | Path, title: str) -> None:
    """||dW||_F as a layers x modules heatmap."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in table["frobenius"]], dtype=float)
    layers = ["-" if layer is None else str(layer) for layer in table["layers"]]
    fig, axes = _figure(max(5.0, 0.9 * len(table["modules"]) + 2), [max(3.0, 0.2 * len(layers) + 1.5)])
    image = axes[0].imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
    axes[0].set_xticks(range(len(table["modules"])), table["modules"], rotation=45, ha="right", fontsize=8)
    axes[0].set_yticks(range(len(layers)), layers, fontsize=7)
    axes[0].set_ylabel("layer")
    axes[0].set_title(f"{title}: ||scale · B A||_F", fontsize=10)
    fig.colorbar(image, ax=axes[0], label="Frobenius norm")
    _save(fig, path)


def plot_adapter_comparison(result: dict[str, Any], path: str | Path) -> None:
    """Cosine per layer for each pair of adapters, and the whole-adapter cosine matrix beside it."""
    import numpy as np

    names = [f"#{i}" for i in range(len(result["adapters"]))]
    fig, axes = _figure(9.0, [3.2, max(2.5, 0.5 * len(names) + 1)])
    x = [i for i, _ in enumerate(result["layers"])]
    for pair in result["per_layer"]:
        y = [np.nan if v is None else v for v in pair["cosine"]]
        axes[0].plot(x, y, marker="o", label=" vs ".join(names[i] for i in pair["adapters"]))
    axes[0].set_xticks(x, ["-" if layer is None else str(layer) for layer in result["layers"]], fontsize=7)
    axes[0].set(xlabel="layer", ylabel="cosine of updates", ylim=(-1.05, 1.05))
    axes[0].axhline(0, color="grey", linewidth=0.5)
    axes[0].legend(fontsize=8)
    matrix = np.array([[np.nan if v is None else v for v in row] for row in result["cosine"]], dtype=float)
    image = axes[1].imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1)
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_yticks(range(len(names)), [f"{n} {Path(p).name}" for n, p in zip(names, result["adapters"])])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes[1].text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[1], label="cosine (whole adapter)")
    _save(fig, path)
