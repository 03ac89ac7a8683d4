"""The run's tables on the console: the grid, byte budgets, the library caption."""

from __future__ import annotations

from typing import Any

from loramem.evaluation.config import LIBRARY_SERIES
from loramem.evaluation.plots import METRIC_NAMES, budget_series, curve_points, merge_label
from loramem.sizes import format_size

LENGTH_MATCHED = "; len-matched: ROUGE-L of the answer's best span of the reference's length"


def _p(p: float | None) -> str:
    return "p=n/a" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def print_table(summary: dict[str, Any], console: Any, metric: str = "rouge_l") -> None:
    """One table per press: rows are modes/formats, columns ratios; mean ±CI half-width and the LoRA margin."""
    from rich.markup import escape
    from rich.table import Table

    margins = {(m["press"], m["ratio"], m["mode"], m["format"], merge_label(m)): m for m in summary["margins"]}
    kept = {(c["press"], c["ratio"]): c["cache_tokens"] for c in summary["cells"] if c["mode"] == "none"}
    for press, lines in curve_points(summary, metric).items():
        ratios = sorted({p["ratio"] for points in lines.values() for p in points})
        caption = (
            f"mean ±{summary['confidence']:.0%} CI half-width, documents resampled (q: questions as if "
            "independent); n questions / documents; Δ adapter − base, paired by question, documents resampled "
            "(bootstrap p); mean answer words (and references'), seconds per answer (+ merge and context "
            "prefill)" + (LENGTH_MATCHED if metric == "rouge_l" else "")
        )
        if press == LIBRARY_SERIES:
            caption += _library_caption(summary)
        table = Table(
            title=f"{METRIC_NAMES[metric]} · {escape(press)} · {summary['n_documents']} documents, "
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
        for (mode, fmt, merge), points in lines.items():
            by_ratio = {p["ratio"]: p for p in points}
            row = []
            for ratio in ratios:
                cell = by_ratio.get(ratio)
                row.append(_table_cell(cell, margins.get((press, ratio, mode, fmt, merge)), metric) if cell else "")
            table.add_row(mode + (f"\n{escape(merge)}" if merge else ""), fmt or "—", *row)
        console.print(table)
    if summary.get("budget"):
        print_budget_table(summary, console, metric)
    if summary.get("failed"):
        docs = ", ".join(f["doc_id"] for f in summary["failed"])
        console.print(
            f"[red]{summary['n_failed_cells']} cells failed (documents {docs}); see failures.json, "
            "rerun with --resume[/red]"
        )


def print_budget_table(summary: dict[str, Any], console: Any, metric: str = "rouge_l") -> None:
    """One table per press and storage: columns are byte budgets, rows the split (adapter rank, format); each cell
    shows the metric, what the bytes bought and the margin over spending the whole budget on KV; best in bold."""
    from rich.markup import escape
    from rich.table import Table

    for (press, store), points in budget_series(summary).items():
        budgets = sorted({p["budget_bytes"] for p in points})
        best = {
            b: max(
                (p[metric]["mean"] for p in points if p["budget_bytes"] == b and p[metric]["mean"] is not None),
                default=None,
            )
            for b in budgets
        }
        table = Table(
            title=f"{METRIC_NAMES[metric]} within a byte budget · {escape(press)} · KV stored {store} · "
            f"{summary['n_documents']} documents, {summary['n_questions']} questions",
            caption="adapter bytes + kept document KV tokens (mean per document; framing not counted); Δ "
            "against the whole budget on KV (rank 0), paired by question, documents resampled (bootstrap p); the "
            "adapter decodes over base-model KV; mean answer words (and references'), seconds per answer",
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
        f"({format_size(point['document_kv_bytes'])}) n={point['n']}/{point['n_documents']}{_costs_text(point)}[/dim]"
    )
    return text + _margin_text(point.get("versus_kv_only"), metric)


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


def _half(stat: dict[str, Any]) -> str:
    return f"±{(stat['high'] - stat['low']) / 2:.3f}" if stat.get("high") is not None else ""


def _mean_text(stat: dict[str, Any], bold: bool = False) -> str:
    """Mean ±document-level half-width (q ±question-level half-width, when the summary has it)."""
    mean = f"[bold]{stat['mean']:.3f}[/bold]" if bold else f"{stat['mean']:.3f}"
    text = mean + (f" {_half(stat)}" if _half(stat) else "")
    question = _half(stat.get("question") or {})
    return text + (f" [dim](q {question})[/dim]" if question else "")


def _table_cell(cell: dict[str, Any], margin: dict[str, Any] | None, metric: str) -> str:
    text = _mean_text(cell[metric])
    if metric == "rouge_l" and cell.get("rouge_l_matched", {}).get("mean") is not None:
        text += f"\n[dim]len-matched {cell['rouge_l_matched']['mean']:.3f}[/dim]"
    text += f"\n[dim]n={cell['n']}/{cell['n_documents']}" + _costs_text(cell) + "[/dim]"
    return text + _margin_text(margin, metric)


def _costs_text(cell: dict[str, Any]) -> str:
    """Answer length beside the references', and seconds per answer (+ setup), where the summary has them."""
    if "answer_words" not in cell:  # summaries written before lengths were
        return ""
    text = f"\n{cell['answer_words']:.1f} words (refs {cell['reference_words']:.1f}) · {cell['seconds']:.2f} s"
    setup = cell.get("setup_seconds", 0.0)
    return text + (f" +{setup:.2f}" if round(setup, 2) else "")


def _margin_text(margin: dict[str, Any] | None, metric: str) -> str:
    """A paired margin as a table line: green when significantly better, red when significantly worse."""
    if margin is None:
        return ""
    m = margin[metric]
    p = (m.get("documents") or m["bootstrap"])["p_value"]  # summaries from before clustering: by question
    colour = (
        "green" if p is not None and p < 0.05 and m["diff"] > 0 else ("red" if p is not None and p < 0.05 else "dim")
    )
    return f"\n[{colour}]Δ{m['diff']:+.3f} {_p(p)}[/{colour}]"
