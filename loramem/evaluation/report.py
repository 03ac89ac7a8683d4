"""Eval results from the files of a run: summary statistics, the LoRA margin, a table and the curves.

Everything here reads RUN_DIR/answers.jsonl (and config.json) only, never the model, so a report can
be redrawn at any time, also while a run is still writing or after shards are merged. The unit of
analysis is a question: intervals are over questions, and the LoRA margin (an adapter mode minus the
base model at the same press and ratio) pairs each question's two answers.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loramem.errors import LoramemError
from loramem.evaluation.metrics import contains
from loramem.evaluation.stats import mean_ci, paired_bootstrap, paired_t_test
from loramem.fileio import atomic_write_bytes
from loramem.sizes import format_size

ANSWERS = "answers.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
CURVES = "curves.png"
CURVES_CONTAINS = "curves-contains.png"
BYTES_PLOT = "bytes.png"
BUDGET_PLOT = "budget.png"
BUDGET_PLOT_CONTAINS = "budget-contains.png"
FAILURES = "failures.json"
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
CONFIDENCE = 0.95
_METRIC_NAMES = {
    "rouge_l": "ROUGE-L",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "contains": "answer contains a reference",
}
_MODE_LABELS = {
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

CellKey = tuple[str, int, str, "float | None", str, "str | None", str]
Condition = tuple[str, float, str, "str | None"]  # (series, ratio, mode, format): one point of a curve


def cell_key(row: dict[str, Any]) -> CellKey:
    """What makes an answer unique in a run: one question under one press, ratio, mode, format and KV variant."""
    ratio = None if row["ratio"] is None else float(row["ratio"])  # budget points have no fixed ratio
    return (
        row["doc_id"],
        int(row["question_index"]),
        row["press"],
        ratio,
        row["mode"],
        row["format"],
        row.get("variant", "token"),
    )


def series(row: dict[str, Any]) -> str:
    """The curve family of an answer: its press, plus the KV variant when not plain token eviction."""
    variant = row.get("variant", "token")
    return row["press"] if variant == "token" else f"{row['press']} [{variant}]"


def read_answers(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete answer lines of an answers.jsonl; a trailing line without its newline is ignored.

    Each answer is written as one line ending in a newline, so a last line without one is the
    remainder of an interrupted write. `repair` cuts it off the file, so that appending continues
    on a clean line; a damaged line anywhere else is refused.
    """
    file = Path(path)
    if not file.exists():
        return []
    data = file.read_bytes()
    *lines, tail = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoramemError(f"{file}:{number}: not a valid answer line ({exc.msg})") from exc
        missing = [k for k in ANSWER_FIELDS if not isinstance(row, dict) or k not in row]
        if missing:
            raise LoramemError(f"{file}:{number}: answer line without {', '.join(missing)}")
        rows.append(row)
    if tail and repair:
        with file.open("r+b") as handle:
            handle.truncate(len(data) - len(tail))
            os.fsync(handle.fileno())
    return rows


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a run directory, with a clear error when it is missing or damaged."""
    if not path.is_file():
        raise LoramemError(f"{path.parent} is not an eval run directory (no {path.name}); {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LoramemError(f"{path} is damaged: {exc.msg}") from exc


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undetermined statistic (a single observation) is written as null."""
    return None if math.isnan(x) else round(float(x), 6)


def _order(cond: Condition, presses: list[str], formats: list[str | None]) -> tuple:
    """Presses and formats in the order the run made them, modes in the paper's order, ratios ascending."""
    press, ratio, mode, fmt = cond
    return presses.index(press), MODES.index(mode) if mode in MODES else len(MODES), formats.index(fmt), ratio


def summarize(rows: Iterable[dict[str, Any]], n_resamples: int = 10000) -> dict[str, Any]:
    """Per condition: n and mean with a 95% CI of every metric; per adapter condition: the paired LoRA margin.

    A condition's "press" is its series (press, plus the KV variant when not plain token eviction).
    The margin of (press, ratio, mode, format) is mode minus `none` at the same press and ratio over
    the questions answered in both, with a paired bootstrap and a paired t-test (two-sided p-values).
    """
    # Question order fixes the bootstrap's resamples: sorted, the summary is the same however the answers
    # were interleaved (one process, shards merged, Ray workers); the sort is stable, so presses keep their order.
    rows = sorted(rows, key=lambda r: (r["doc_id"], int(r["question_index"])))
    for r in rows:  # answers written before the metric existed
        r.setdefault("contains", contains(r["answer"], r["references"]))
    if not rows:
        raise LoramemError("no answers to summarize yet")
    budget_rows = [r for r in rows if r.get("budget_bytes") is not None]
    counts = {
        "n_documents": len({r["doc_id"] for r in rows}),
        "n_questions": len({(r["doc_id"], int(r["question_index"])) for r in rows}),
        "n_answers": len(rows),
    }
    rows = [r for r in rows if r.get("budget_bytes") is None]
    presses = sorted(dict.fromkeys(series(r) for r in rows), key=lambda name: name == LIBRARY_SERIES)  # library last
    formats = list(dict.fromkeys(r["format"] for r in rows))
    by_condition: dict[Condition, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        question = (r["doc_id"], int(r["question_index"]))
        by_condition[(series(r), float(r["ratio"]), r["mode"], r["format"])][question] = r
    conditions = sorted(by_condition, key=lambda c: _order(c, presses, formats))
    # Library modes have no own-document KV: their baseline is the base model with none either (ratio 1.0).
    closed_book = next((c for c in conditions if c[2] == "none" and c[1] == 1.0), None)
    cells, margins = [], []
    for cond in conditions:
        answers = list(by_condition[cond].values())
        cell = _condition_fields(cond)
        cell.update(
            n=len(answers),
            n_documents=len({a["doc_id"] for a in answers}),
            variant=answers[0].get("variant", "token"),
            cache_tokens=round(sum(a["cache_tokens"] for a in answers) / len(answers), 1),
        )
        if all("kv_bytes" in a for a in answers):
            cell["kv_bytes"] = round(sum(a["kv_bytes"] for a in answers) / len(answers), 1)
        for metric in METRICS:
            mean, low, high = mean_ci([a[metric] for a in answers], CONFIDENCE)
            cell[metric] = {"mean": _finite(mean), "low": _finite(low), "high": _finite(high)}
        cells.append(cell)
        versus = closed_book if cond[2] in LIBRARY_MODES else (cond[0], cond[1], "none", None)
        base = by_condition.get(versus) if versus else None
        if cond[2] != "none" and base:
            margin = _margin(by_condition[cond], base, n_resamples)
            if margin is not None:
                extra = {"versus": versus[0]} if cond[2] in LIBRARY_MODES else {}
                margins.append({**_condition_fields(cond), **extra, **margin})
    summary = {
        **counts,
        "confidence": CONFIDENCE,
        "unit": "question",
        "metrics": list(METRICS),
        "cells": cells,
        "margins": margins,
    }
    routing = routing_recall(rows)
    if routing is not None:
        summary["routing"] = routing
    if budget_rows:
        summary["budget"] = summarize_budget(budget_rows, n_resamples)
    return summary


def summarize_budget(rows: list[dict[str, Any]], n_resamples: int) -> list[dict[str, Any]]:
    """Per budget point (press, storage, budget, adapter rank, format): bytes spent on each memory, tokens kept,
    every metric with its CI, and the paired margin against spending the same budget on KV alone (rank 0)."""
    points: dict[tuple, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        key = (r["press"], r["store"], int(r["budget_bytes"]), int(r["adapter_rank"]), r["mode"], r["format"])
        points[key][(r["doc_id"], int(r["question_index"]))] = r
    result = []
    for key in sorted(points, key=lambda k: (k[:4], str(k[5]))):
        press, store, budget, rank, mode, fmt = key
        answers = list(points[key].values())

        def mean(name: str) -> float:
            return round(sum(a[name] for a in answers) / len(answers), 1)

        point: dict[str, Any] = {
            "press": press,
            "store": store,
            "budget_bytes": budget,
            "adapter_rank": rank,
            "mode": mode,
            "format": fmt,
            "n": len(answers),
            "n_documents": len({a["doc_id"] for a in answers}),
            "adapter_bytes": mean("adapter_bytes"),
            "document_kv_bytes": mean("document_kv_bytes"),
            "total_bytes": mean("total_bytes"),
            "kv_tokens_kept": mean("kv_tokens_kept"),
            "document_tokens": mean("document_tokens"),
            "adapter_share": round(mean("adapter_bytes") / budget, 4),
        }
        for metric in METRICS:
            m, low, high = mean_ci([a[metric] for a in answers], CONFIDENCE)
            point[metric] = {"mean": _finite(m), "low": _finite(low), "high": _finite(high)}
        kv_only = points.get((press, store, budget, 0, "none", None))
        if rank and kv_only:
            point["versus_kv_only"] = _margin(points[key], kv_only, n_resamples)
        result.append(point)
    return result


def routing_recall(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """How often routing found the question's own document: first (recall@1) or among the top k (recall@k), over
    the questions that library modes answered (every library answer of a question carries the same routing)."""
    routed: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if "gold_rank" in r:
            routed.setdefault((r["doc_id"], int(r["question_index"])), r)
    if not routed:
        return None
    ranks = [r["gold_rank"] for r in routed.values()]
    return {
        "k": max(len(r["routed"]) for r in routed.values()),
        "n": len(ranks),
        "recall_at_1": round(sum(rank == 1 for rank in ranks) / len(ranks), 6),
        "recall_at_k": round(sum(rank is not None for rank in ranks) / len(ranks), 6),
    }


def _condition_fields(cond: Condition) -> dict[str, Any]:
    return dict(zip(("press", "ratio", "mode", "format"), cond))


def _margin(
    adapted: dict[tuple[str, int], dict[str, Any]], base: dict[tuple[str, int], dict[str, Any]], n_resamples: int
) -> dict[str, Any] | None:
    """Adapter minus base per metric over the questions both answered; None when they share none."""
    shared = [q for q in adapted if q in base]
    if not shared:
        return None
    result: dict[str, Any] = {"n": len(shared)}
    for metric in METRICS:
        a, b = [base[q][metric] for q in shared], [adapted[q][metric] for q in shared]
        boot = paired_bootstrap(a, b, n_resamples=n_resamples, confidence=CONFIDENCE)
        t = paired_t_test(a, b, confidence=CONFIDENCE)
        result[metric] = {
            "diff": _finite(boot["diff"]),
            "bootstrap": {k: _finite(boot[k]) for k in ("low", "high", "p_value")},
            "t_test": {k: _finite(t[k]) for k in ("low", "high", "p_value")},
        }
    return result


def _label(mode: str, fmt: str | None) -> str:
    return _MODE_LABELS.get(mode, mode) + (f" · {fmt}" if fmt else "")


def _curves(summary: dict[str, Any], metric: str) -> dict[str, dict[tuple[str, str | None], list[dict[str, Any]]]]:
    """press -> (mode, format) -> cells in ratio order."""
    curves: dict[str, dict[tuple[str, str | None], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for cell in summary["cells"]:
        if cell[metric]["mean"] is not None:
            curves[cell["press"]][(cell["mode"], cell["format"])].append(cell)
    return curves


def plot(summary: dict[str, Any], path: str | Path, metric: str = "rouge_l") -> None:
    """Metric vs compression ratio, one panel per press and one line (with its 95% CI band) per mode and format.

    Drawn on a plain Agg canvas, without pyplot, so the caller's matplotlib backend is left alone.
    """
    curves = _curves(summary, metric)
    fig, axes = _panels(len(curves))
    for ax, (press, lines) in zip(axes, curves.items()):
        for (mode, fmt), points in lines.items():
            x = [p["ratio"] for p in points]
            y = [p[metric]["mean"] for p in points]
            style = {"color": "black", "linestyle": "--"} if mode == "none" else {}
            (line,) = ax.plot(x, y, marker="o", label=_label(mode, fmt), **style)
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
    axes[0].set_ylabel(_METRIC_NAMES[metric])
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

    lines: dict[tuple[str, str, str | None], list[dict[str, Any]]] = defaultdict(list)
    for cell in summary["cells"]:
        if cell.get("kv_bytes") is not None and cell[metric]["mean"] is not None:
            lines[(cell["press"], cell["mode"], cell["format"])].append(cell)
    if not lines:
        return False
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (name, mode, fmt), points in lines.items():
        points = sorted(points, key=lambda p: p["kv_bytes"])
        style = {"linestyle": "--"} if mode == "none" else {}
        ax.plot(
            [p["kv_bytes"] / 2**20 for p in points],
            [p[metric]["mean"] for p in points],
            marker="o",
            label=f"{name} · {_label(mode, fmt)}",
            **style,
        )
    ax.set_xlabel("stored KV bytes per document (MiB, framing included)")
    ax.set_ylabel(_METRIC_NAMES[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title(
        f"{_METRIC_NAMES[metric]} vs bytes kept · {summary['n_documents']} documents, "
        f"{summary['n_questions']} questions",
        fontsize="medium",
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _p(p: float | None) -> str:
    return "p=n/a" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def print_table(summary: dict[str, Any], console: Any, metric: str = "rouge_l") -> None:
    """One table per press: rows are modes/formats, columns ratios; mean ±CI half-width and the LoRA margin."""
    from rich.markup import escape
    from rich.table import Table

    margins = {(m["press"], m["ratio"], m["mode"], m["format"]): m for m in summary["margins"]}
    kept = {(c["press"], c["ratio"]): c["cache_tokens"] for c in summary["cells"] if c["mode"] == "none"}
    for press, lines in _curves(summary, metric).items():
        ratios = sorted({p["ratio"] for points in lines.values() for p in points})
        caption = (
            f"mean ±{summary['confidence']:.0%} CI half-width over questions; Δ adapter − base, paired by "
            "question (bootstrap p)"
        )
        if press == LIBRARY_SERIES:
            caption += _library_caption(summary)
        table = Table(
            title=f"{_METRIC_NAMES[metric]} · {escape(press)} · {summary['n_documents']} documents, "
            f"{summary['n_questions']} questions",
            caption=caption,
            show_lines=True,
        )
        table.add_column("mode")
        table.add_column("format")
        for ratio in ratios:
            tokens = kept.get((press, ratio))
            table.add_column(
                f"ratio {ratio:g}" + (f"\n({tokens:g} tokens)" if tokens is not None else ""), justify="right"
            )
        for (mode, fmt), points in lines.items():
            by_ratio = {p["ratio"]: p for p in points}
            row = []
            for ratio in ratios:
                cell = by_ratio.get(ratio)
                row.append(_table_cell(cell, margins.get((press, ratio, mode, fmt)), metric) if cell else "")
            table.add_row(mode, fmt or "—", *row)
        console.print(table)
    if summary.get("budget"):
        print_budget_table(summary, console, metric)
    if summary.get("failed"):
        docs = ", ".join(f["doc_id"] for f in summary["failed"])
        console.print(
            f"[red]{summary['n_failed_cells']} cells failed (documents {docs}); see failures.json, "
            "rerun with --resume[/red]"
        )


def _budget_series(summary: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(press, storage) -> budget points."""
    series_: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for point in summary["budget"]:
        series_[(point["press"], point["store"])].append(point)
    return series_


def print_budget_table(summary: dict[str, Any], console: Any, metric: str = "rouge_l") -> None:
    """One table per press and storage: columns are byte budgets, rows the split (adapter rank, format); each cell
    shows the metric, what the bytes bought and the margin over spending the whole budget on KV; best in bold."""
    from rich.markup import escape
    from rich.table import Table

    for (press, store), points in _budget_series(summary).items():
        budgets = sorted({p["budget_bytes"] for p in points})
        best = {
            b: max(
                (p[metric]["mean"] for p in points if p["budget_bytes"] == b and p[metric]["mean"] is not None),
                default=None,
            )
            for b in budgets
        }
        table = Table(
            title=f"{_METRIC_NAMES[metric]} within a byte budget · {escape(press)} · KV stored {store} · "
            f"{summary['n_documents']} documents, {summary['n_questions']} questions",
            caption="adapter bytes + kept document KV tokens (mean per document; framing not counted); Δ "
            "against the whole budget on KV (rank 0), paired by question (bootstrap p); the adapter "
            "decodes over base-model KV",
            show_lines=True,
        )
        table.add_column("adapter rank")
        table.add_column("format")
        for budget in budgets:
            table.add_column(f"budget {format_size(budget)}", justify="right")
        by_key = {(p["budget_bytes"], p["adapter_rank"], p["format"]): p for p in points}
        for rank, fmt in dict.fromkeys((p["adapter_rank"], p["format"]) for p in points):
            row = [
                _budget_cell(by_key[(b, rank, fmt)], metric, best[b]) if (b, rank, fmt) in by_key else ""
                for b in budgets
            ]
            table.add_row(str(rank) if rank else "0 (KV only)", fmt or "—", *row)
        console.print(table)


def _budget_cell(point: dict[str, Any], metric: str, best: float | None) -> str:
    text = _mean_text(point[metric], bold=point[metric]["mean"] == best)
    text += (
        f"\n[dim]{format_size(point['adapter_bytes'])} + {point['kv_tokens_kept']:g} tok "
        f"({format_size(point['document_kv_bytes'])}) n={point['n']}[/dim]"
    )
    return text + _margin_text(point.get("versus_kv_only"), metric)


def plot_budget(summary: dict[str, Any], path: str | Path, metric: str = "rouge_l") -> None:
    """Metric vs the share of each byte budget spent on the adapter (0: all on KV), one panel per press and storage,
    one line per budget and format: where on the trade-off each budget is best served."""
    panels = _budget_series(summary)
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
        f"{_METRIC_NAMES[metric]} within byte budgets · {summary['n_documents']} documents, "
        f"{summary['n_questions']} questions",
        path,
    )


def _library_caption(summary: dict[str, Any]) -> str:
    """Library modes: their baseline, and how often routing found the question's document."""
    from rich.markup import escape

    versus = next((m["versus"] for m in summary["margins"] if "versus" in m), None)
    text = f"; base = mode none at ratio 1 ({escape(versus)})" if versus else ""
    routing = summary.get("routing")
    if routing:
        text += (
            f"; routing recall@1 {routing['recall_at_1']:.3f}, recall@{routing['k']} "
            f"{routing['recall_at_k']:.3f} ({routing['n']} questions)"
        )
    return text


def _mean_text(stat: dict[str, Any], bold: bool = False) -> str:
    mean = f"[bold]{stat['mean']:.3f}[/bold]" if bold else f"{stat['mean']:.3f}"
    return mean + (f" ±{(stat['high'] - stat['low']) / 2:.3f}" if stat["high"] is not None else "")


def _table_cell(cell: dict[str, Any], margin: dict[str, Any] | None, metric: str) -> str:
    text = _mean_text(cell[metric])
    text += f"\n[dim]n={cell['n']}[/dim]"
    return text + _margin_text(margin, metric)


def _margin_text(margin: dict[str, Any] | None, metric: str) -> str:
    """A paired margin as a table line: green when significantly better, red when significantly worse."""
    if margin is None:
        return ""
    m = margin[metric]
    p = m["bootstrap"]["p_value"]
    colour = (
        "green" if p is not None and p < 0.05 and m["diff"] > 0 else ("red" if p is not None and p < 0.05 else "dim")
    )
    return f"\n[{colour}]Δ{m['diff']:+.3f} {_p(p)}[/{colour}]"


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Summarize a run's answers into summary.json and curves.png; returns the summary."""
    run = Path(run_dir)
    header = read_json(run / CONFIG, "start one with `loramem eval DATA --out RUN_DIR`")
    summary = summarize(read_answers(run / ANSWERS))
    expected = sum(header.get("documents", {}).values())
    failed = json.loads((run / FAILURES).read_text()) if (run / FAILURES).exists() else []
    summary["n_cells_planned"] = expected
    summary["complete"] = summary["n_answers"] >= expected and not failed
    summary["failed"] = failed
    summary["n_failed_cells"] = sum(f["cells"] for f in failed)
    summary["model"] = header.get("model", {}).get("id")
    summary["dataset"] = header.get("dataset", {}).get("path")
    atomic_write_bytes(run / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    if summary["cells"]:
        plot(summary, run / CURVES)
        plot(summary, run / CURVES_CONTAINS, metric="contains")
    if len({c["variant"] for c in summary["cells"]}) > 1:
        plot_bytes(summary, run / BYTES_PLOT)
    if summary.get("budget"):
        plot_budget(summary, run / BUDGET_PLOT)
        plot_budget(summary, run / BUDGET_PLOT_CONTAINS, metric="contains")
    return summary
