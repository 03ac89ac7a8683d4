"""The run's plots: curves against ratio, bytes kept, byte budgets (matplotlib, imported lazily)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from loramem.evaluation.config import LIBRARY_SERIES
from loramem.fileio import atomic_write_bytes
from loramem.sizes import format_size


def series_label(mode: str, fmt: str | None, merge: str | None = None) -> str:
    return MODE_LABELS.get(mode, mode) + (f" · {merge}" if merge else "") + (f" · {fmt}" if fmt else "")


def merge_label(cell: dict[str, Any]) -> str | None:
    """A merging library mode's merge as tables and legends name it: ties, or ties · routing weights."""
    merge = cell.get("merge")
    if merge is None:
        return None
    return merge if cell.get("merge_weights") in (None, "equal") else f"{merge} · {cell['merge_weights']} weights"


Line = tuple[str, "str | None", "str | None"]  # (mode, format, merge label): one line of a curve panel


def curve_points(summary: dict[str, Any], metric: str) -> dict[str, dict[Line, list[dict[str, Any]]]]:
    """press -> (mode, format, merge) -> cells in ratio order."""
    curves: dict[str, dict[Line, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for cell in summary["cells"]:
        if cell[metric]["mean"] is not None:
            curves[cell["press"]][(cell["mode"], cell["format"], merge_label(cell))].append(cell)
    return curves


def plot(summary: dict[str, Any], path: str | Path, metric: str = "rouge_l") -> None:
    """Metric vs compression ratio, one panel per press and one line (with its 95% CI band) per mode and format.

    Drawn on a plain Agg canvas, without pyplot, so the caller's matplotlib backend is left alone.
    """
    curves = curve_points(summary, metric)
    fig, axes = _panels(len(curves))
    for ax, (press, lines) in zip(axes, curves.items()):
        for (mode, fmt, merge), points in lines.items():
            x = [p["ratio"] for p in points]
            y = [p[metric]["mean"] for p in points]
            style = {"color": "black", "linestyle": "--"} if mode == "none" else {}
            (line,) = ax.plot(x, y, marker="o", label=series_label(mode, fmt, merge), **style)
            lows, highs = [p[metric]["low"] for p in points], [p[metric]["high"] for p in points]
            if None not in lows and None not in highs:
                ax.fill_between(x, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(press)
        ax.set_xlabel("compression ratio (share of document KV evicted)")
    _save(
        fig,
        axes,
        metric,
        f"{summary['n_documents']} documents, {summary['n_questions']} questions "
        f"(bands: {summary['confidence']:.0%} CI)",
        path,
    )


def _panels(n: int) -> tuple[Any, Any]:
    """A figure of n side-by-side panels sharing the y axis, on a plain Agg canvas (the caller's pyplot backend is
    left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * n, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n, squeeze=False, sharey=True)[0]


def _save(fig: Any, axes: Any, metric: str, title: str, path: str | Path) -> None:
    """Grid, metric label, legend and title, then the PNG written atomically."""
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(METRIC_NAMES[metric])
    axes[-1].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def plot_bytes(summary: dict[str, Any], path: str | Path, metric: str = "rouge_l") -> bool:
    """Metric vs stored KV bytes, one line per series (press and variant) and mode/format: equal bytes compared.

    Returns False (and draws nothing) when the answers carry no byte counts.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines: dict[tuple[str, str, str | None, str | None], list[dict[str, Any]]] = defaultdict(list)
    for cell in summary["cells"]:
        if cell.get("kv_bytes") is not None and cell[metric]["mean"] is not None:
            lines[(cell["press"], cell["mode"], cell["format"], merge_label(cell))].append(cell)
    if not lines:
        return False
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (name, mode, fmt, merge), points in lines.items():
        points = sorted(points, key=lambda p: p["kv_bytes"])
        style: dict[str, Any] = {"linestyle": "--"} if mode == "none" else {}
        ax.plot(
            [p["kv_bytes"] / 2**20 for p in points],
            [p[metric]["mean"] for p in points],
            marker="o",
            label=f"{name} · {series_label(mode, fmt, merge)}",
            **style,
        )
    ax.set_xlabel("stored KV bytes per document (MiB, framing included)")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title(
        f"{METRIC_NAMES[metric]} vs bytes kept · {summary['n_documents']} documents, "
        f"{summary['n_questions']} questions",
        fontsize="medium",
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return True


LIBRARY_METRICS = ("rouge_l", "rouge_l_matched", "token_f1", "contains")


def library_conditions(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A library run's conditions as its plot and tables show them: the base model and the adapters over the whole
    document and over none (the reference rows), then each library mode (and merge), in the summary's order."""
    labels = []
    for cell in summary["cells"]:
        if cell["press"] == LIBRARY_SERIES:
            labels.append((series_label(cell["mode"], None, merge_label(cell)), cell))
        elif cell["ratio"] in (0.0, 1.0) and cell["mode"] in ("none", "decode"):
            context = "whole document in context" if cell["ratio"] == 0.0 else "no context"
            labels.append((f"{series_label(cell['mode'], cell['format'])}, {context}", cell))
    return labels


def plot_library(summary: dict[str, Any], path: str | Path) -> bool:
    """A library run at a glance: each condition's scores with their clustered intervals, its mean answer length
    against the references', and its seconds per answer (decoding, and the merge and context prefill it needed).
    False (nothing drawn) when the run has no library rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conditions = library_conditions(summary)
    if not any(cell["press"] == LIBRARY_SERIES for _, cell in conditions):
        return False
    fig = Figure(figsize=(15, 1.2 + 0.42 * len(conditions)), layout="constrained")
    FigureCanvasAgg(fig)
    scores, lengths, seconds = fig.subplots(1, 3, sharey=True, width_ratios=[2.2, 1, 1])
    rows = list(range(len(conditions)))[::-1]  # the first condition on top
    metrics = [m for m in LIBRARY_METRICS if m in summary.get("metrics", LIBRARY_METRICS)]  # older runs lack some
    cells = [cell for _, cell in conditions]
    _score_bars(scores, cells, metrics, rows)
    scores.set_yticks(rows, [label for label, _ in conditions], fontsize="small")
    scores.set_xlabel(f"mean ({summary['confidence']:.0%} CI, clustered by document)")
    _length_bars(lengths, cells, rows)
    decoding = [cell.get("seconds", 0.0) for _, cell in conditions]
    setup = [cell.get("setup_seconds", 0.0) for _, cell in conditions]
    seconds.barh(rows, decoding, 0.6, label="decoding")
    seconds.barh(rows, setup, 0.6, left=decoding, label="merge and context prefill")
    seconds.set_xlabel("seconds per answer")
    seconds.legend(fontsize="x-small")
    for ax in (scores, lengths, seconds):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{summary['n_documents']} documents, {summary['n_questions']} questions", fontsize="medium")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _score_bars(ax: Any, cells: list[dict[str, Any]], metrics: list[str], rows: list[int]) -> None:
    """Each cell's metrics as horizontal bars with their clustered intervals, one group per row position."""
    height = 0.8 / len(metrics)
    for offset, metric in enumerate(metrics):
        means = [cell[metric]["mean"] or 0.0 for cell in cells]
        low = [m - (c[metric]["low"] if c[metric]["low"] is not None else m) for m, c in zip(means, cells)]
        high = [(c[metric]["high"] if c[metric]["high"] is not None else m) - m for m, c in zip(means, cells)]
        y = [r + 0.4 - height * (offset + 0.5) for r in rows]
        ax.barh(y, means, height, xerr=[low, high], label=METRIC_NAMES[metric], capsize=2)
    ax.legend(fontsize="x-small", loc="best")


def _length_bars(ax: Any, cells: list[dict[str, Any]], rows: list[int]) -> None:
    """Each cell's mean answer length, the references' mean as a dashed line."""
    ax.barh(rows, [cell.get("answer_words", 0.0) for cell in cells], 0.6, color="tab:gray")
    references = [cell["reference_words"] for cell in cells if "reference_words" in cell]
    if references:
        ax.axvline(sum(references) / len(references), color="black", linestyle="--", label="references")
        ax.legend(fontsize="x-small")
    ax.set_xlabel("mean answer length (words)")


COMPARE_METRICS = ["rouge_l", "rouge_l_matched", "contains"]


def plot_compare(rows: list[Any], path: str | Path, title: str) -> None:
    """Runs side by side (`compare.comparison_rows`): per ratio, each row's scores with their clustered intervals
    and its mean answer length; a row without a cell at a ratio is left empty there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratios = sorted({cell["ratio"] for row in rows for cell in row.cells})
    fig = Figure(figsize=(5.5 * len(ratios) + 2.5, 1.4 + 0.5 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 * len(ratios), sharey=True, width_ratios=[2.2, 0.8] * len(ratios), squeeze=False)[0]
    positions = list(range(len(rows)))[::-1]  # the first row on top
    for i, ratio in enumerate(ratios):
        kept = [(p, c) for p, row in zip(positions, rows) for c in row.cells if c["ratio"] == ratio]
        scores, lengths = axes[2 * i], axes[2 * i + 1]
        _score_bars(scores, [c for _, c in kept], COMPARE_METRICS, [p for p, _ in kept])
        scores.set_title(f"ratio {ratio:g}", fontsize="medium")
        scores.set_xlabel("mean (95% CI, clustered by document)")
        _length_bars(lengths, [c for _, c in kept], [p for p, _ in kept])
        for ax in (scores, lengths):
            ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(positions, [f"{row.run}\n{row.series}" for row in rows], fontsize="small")
    fig.suptitle(title, fontsize="medium")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def budget_series(summary: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(press, storage) -> budget points."""
    series_: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for point in summary["budget"]:
        series_[(point["press"], point["store"])].append(point)
    return series_


def plot_budget(summary: dict[str, Any], path: str | Path, metric: str = "rouge_l") -> None:
    """Metric vs the share of each byte budget spent on the adapter (0: all on KV), one panel per press and storage,
    one line per budget and format: where on the trade-off each budget is best served."""
    panels = budget_series(summary)
    fig, axes = _panels(len(panels))
    for ax, ((press, store), points) in zip(axes, panels.items()):
        for budget in sorted({p["budget_bytes"] for p in points}):
            mine = [p for p in points if p["budget_bytes"] == budget and p[metric]["mean"] is not None]
            kv_only = [p for p in mine if p["adapter_rank"] == 0]
            for fmt in dict.fromkeys(p["format"] for p in mine if p["adapter_rank"]):
                line = sorted(kv_only + [p for p in mine if p["format"] == fmt], key=lambda p: p["adapter_share"])
                ax.plot(
                    [p["adapter_share"] for p in line],
                    [p[metric]["mean"] for p in line],
                    marker="o",
                    label=f"{format_size(budget)} · {fmt}",
                )
                for p in line:
                    ax.annotate(
                        f"r{p['adapter_rank']}",
                        (p["adapter_share"], p[metric]["mean"]),
                        textcoords="offset points",
                        xytext=(3, 3),
                        fontsize="x-small",
                    )
            if not any(p["adapter_rank"] for p in mine):
                ax.plot(
                    [p["adapter_share"] for p in kv_only],
                    [p[metric]["mean"] for p in kv_only],
                    marker="o",
                    label=f"{format_size(budget)} · KV only",
                )
        ax.set_title(f"{press} · KV {store}")
        ax.set_xlabel("share of the budget spent on the adapter")
    _save(
        fig,
        axes,
        metric,
        f"{METRIC_NAMES[metric]} within byte budgets · {summary['n_documents']} documents, "
        f"{summary['n_questions']} questions",
        path,
    )


MODE_LABELS = {
    "none": "base (no adapter)",
    "decode": "base KV + adapter decode",
    "all": "adapter prefill + scores + decode",
    "base_scores": "base scores + adapter prefill",
    "oracle": "gold document's adapter",
    "routed": "top-1 routed adapter",
    "routed-merge": "top-k routed, merged adapter",
    "hybrid": "merged adapter + retrieved chunks",
    "rag": "retrieved chunks, no adapter",
}


METRIC_NAMES = {
    "rouge_l": "ROUGE-L",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "contains": "answer contains a reference",
    "rouge_l_matched": "ROUGE-L, length-matched",
}
