"""The run's tables: the grid, byte budgets, the library caption; built once as `GridTable`s, then printed on the
console (rich) here or rendered as HTML (`html_report`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loramem.evaluation.config import LIBRARY_SERIES
from loramem.evaluation.plots import METRIC_NAMES, budget_series, curve_points, merge_label
from loramem.sizes import format_size

LENGTH_MATCHED = "; len-matched: ROUGE-L of the answer's best span of the reference's length"

Span = tuple[str, str]  # (text, style): style "" (plain), "bold", "dim", "green" or "red"
Line = list[Span]
Cell = list[Line]  # a table cell: lines of styled text


@dataclass
class GridTable:
    """A table as both front-ends draw it: plain text in styled spans, so the console and the HTML page show the
    same figures from one construction."""

    title: str
    caption: str
    columns: list[str]  # headers; a newline starts a second header line
    rows: list[list[Cell]]


def _p(p: float | None) -> str:
    return "p=n/a" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def grid_tables(summary: dict[str, Any], metric: str = "rouge_l") -> Iterator[GridTable]:
    """One table per press: rows are modes/formats, columns ratios; mean ±CI half-width and the LoRA margin."""
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
        columns = ["mode", "format"]
        for ratio in ratios:
            tokens = kept.get((press, ratio))
            columns.append(f"ratio {ratio:g}" + (f"\n({tokens:g} tokens)" if tokens is not None else ""))
        rows = []
        for (mode, fmt, merge), points in lines.items():
            by_ratio = {p["ratio"]: p for p in points}
            row = [[[(mode, "")], *([[(merge, "dim")]] if merge else [])], _plain(fmt or "—")]
            for ratio in ratios:
                cell = by_ratio.get(ratio)
                row.append(_table_cell(cell, margins.get((press, ratio, mode, fmt, merge)), metric) if cell else [])
            rows.append(row)
        title = (
            f"{METRIC_NAMES[metric]} · {press} · {summary['n_documents']} documents, {summary['n_questions']} questions"
        )
        yield GridTable(title, caption, columns, rows)


def budget_tables(summary: dict[str, Any], metric: str = "rouge_l") -> Iterator[GridTable]:
    """One table per press and storage: columns are byte budgets, rows the split (adapter rank, format); each cell
    shows the metric, what the bytes bought and the margin over spending the whole budget on KV; best in bold."""
    for (press, store), points in budget_series(summary).items():
        budgets = sorted({p["budget_bytes"] for p in points})
        best = {
            b: max(
                (p[metric]["mean"] for p in points if p["budget_bytes"] == b and p[metric]["mean"] is not None),
                default=None,
            )
            for b in budgets
        }
        by_key = {(p["budget_bytes"], p["adapter_rank"], p["format"]): p for p in points}
        rows = [
            [
                _plain(str(rank) if rank else "0 (KV only)"),
                _plain(fmt or "—"),
                *(
                    _budget_cell(by_key[(b, rank, fmt)], metric, best[b]) if (b, rank, fmt) in by_key else []
                    for b in budgets
                ),
            ]
            for rank, fmt in dict.fromkeys((p["adapter_rank"], p["format"]) for p in points)
        ]
        yield GridTable(
            title=f"{METRIC_NAMES[metric]} within a byte budget · {press} · KV stored {store} · "
            f"{summary['n_documents']} documents, {summary['n_questions']} questions",
            caption="adapter bytes + kept document KV tokens (mean per document; framing not counted); Δ "
            "against the whole budget on KV (rank 0), paired by question, documents resampled (bootstrap p); the "
            "adapter decodes over base-model KV; mean answer words (and references'), seconds per answer",
            columns=["adapter rank", "format", *(f"budget {format_size(b)}" for b in budgets)],
            rows=rows,
        )


def compare_table(rows: list[Any], metric: str, title: str) -> GridTable:
    """Runs side by side (`compare.comparison_rows`): one row per run and mode/format, columns the ratios, each cell
    as a run's table shows it, its margin against its own run's base rows."""
    ratios = sorted({cell["ratio"] for row in rows for cell in row.cells})
    table_rows = []
    for row in rows:
        by_ratio = {cell["ratio"]: cell for cell in row.cells}
        cells = [_table_cell(by_ratio[r], row.margins.get(r), metric) if r in by_ratio else [] for r in ratios]
        table_rows.append([_plain(row.run), _plain(row.series), *cells])
    caption = (
        "each run's own figures: mean ±95% CI half-width, documents resampled (q: questions as if independent); n "
        "questions / documents; Δ against the same run's base rows, paired by question, documents resampled "
        "(bootstrap p); a run's base rows are shown once where runs share them; mean answer words (and "
        "references'), seconds per answer" + (LENGTH_MATCHED if metric == "rouge_l" else "")
    )
    columns = ["run", "mode · format", *(f"ratio {r:g}" for r in ratios)]
    return GridTable(f"{METRIC_NAMES[metric]} · {title}", caption, columns, table_rows)


def print_table(summary: dict[str, Any], console: Any, metric: str = "rouge_l") -> None:
    """The grid's tables, then the budget tables and the failed cells, on a rich console."""
    for table in grid_tables(summary, metric):
        console.print(rich_table(table))
    if summary.get("budget"):
        for table in budget_tables(summary, metric):
            console.print(rich_table(table))
    if summary.get("failed"):
        docs = ", ".join(f["doc_id"] for f in summary["failed"])
        console.print(
            f"[red]{summary['n_failed_cells']} cells failed (documents {docs}); see failures.json, "
            "rerun with --resume[/red]"
        )


def markdown_tables(summary: dict[str, Any], metric: str = "rouge_l") -> str:
    """The tables `print_table` shows, as GitHub Markdown to paste into a results page."""
    tables = [*grid_tables(summary, metric), *(budget_tables(summary, metric) if summary.get("budget") else [])]
    return "\n".join(markdown_table(table) for table in tables)


def markdown_table(table: GridTable) -> str:
    """A GridTable as GitHub Markdown: a cell's lines joined by `<br>`, bold kept, the caption under the table."""

    def text(cell: Cell) -> str:
        lines = ("".join(f"**{t}**" if s == "bold" else t for t, s in line) for line in cell)
        return "<br>".join(lines).replace("|", "\\|")

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    header = [column.replace("\n", " ") for column in table.columns]
    lines = [f"**{table.title}**", "", row(header), row(["---"] * len(header))]
    lines += [row([text(cell) for cell in cells]) for cells in table.rows]
    return "\n".join([*lines, "", table.caption, ""])


def rich_table(table: GridTable) -> Any:
    """A GridTable as a rich Table: the first two columns left, the figures right-aligned."""
    from rich.markup import escape
    from rich.table import Table

    def markup(cell: Cell) -> str:
        return "\n".join("".join(f"[{s}]{escape(t)}[/{s}]" if s else escape(t) for t, s in line) for line in cell)

    shown = Table(title=escape(table.title), caption=escape(table.caption), show_lines=True)
    for i, column in enumerate(table.columns):
        shown.add_column(escape(column), justify="right" if i >= 2 else "left")
    for row in table.rows:
        shown.add_row(*map(markup, row))
    return shown


def _plain(text: str) -> Cell:
    return [[(text, "")]]


def _budget_cell(point: dict[str, Any], metric: str, best: float | None) -> Cell:
    bought = (
        f"{format_size(point['adapter_bytes'])} + {point['kv_tokens_kept']:g} tok "
        f"({format_size(point['document_kv_bytes'])}) n={point['n']}/{point['n_documents']}"
    )
    mean = _mean_line(point[metric], bold=point[metric]["mean"] == best)
    return [mean, [(bought, "dim")], *_costs_lines(point), *_margin_lines(point.get("versus_kv_only"), metric)]


def _library_caption(summary: dict[str, Any]) -> str:
    """Library modes: their baseline, and how often routing found the question's document."""
    versus = next((m["versus"] for m in summary["margins"] if "versus" in m), None)
    text = f"; base = mode none at ratio 1 ({versus})" if versus else ""
    routing = summary.get("routing")
    if routing:
        text += (
            f"; routing recall@1 {routing['recall_at_1']:.3f}, recall@{routing['k']} "
            f"{routing['recall_at_k']:.3f} ({routing['n']} questions)"
        )
    return text


def _half(stat: dict[str, Any]) -> str:
    return f"±{(stat['high'] - stat['low']) / 2:.3f}" if stat.get("high") is not None else ""


def _mean_line(stat: dict[str, Any], bold: bool = False) -> Line:
    """Mean ±document-level half-width (q ±question-level half-width, when the summary has it)."""
    line: Line = [(f"{stat['mean']:.3f}", "bold" if bold else "")]
    if _half(stat):
        line.append((f" {_half(stat)}", ""))
    question = _half(stat.get("question") or {})
    if question:
        line += [(" ", ""), (f"(q {question})", "dim")]
    return line


def _table_cell(cell: dict[str, Any], margin: dict[str, Any] | None, metric: str) -> Cell:
    counts = f"n={cell['n']}/{cell['n_documents']}"
    matched: Cell = []
    if metric == "rouge_l" and cell.get("rouge_l_matched", {}).get("mean") is not None:
        matched = [[(f"len-matched {cell['rouge_l_matched']['mean']:.3f}", "dim")]]
    return [_mean_line(cell[metric]), *matched, [(counts, "dim")], *_costs_lines(cell), *_margin_lines(margin, metric)]


def _costs_lines(cell: dict[str, Any]) -> Cell:
    """Answer length beside the references', and seconds per answer (+ setup), where the summary has them."""
    if "answer_words" not in cell:  # summaries written before lengths were
        return []
    text = f"{cell['answer_words']:.1f} words (refs {cell['reference_words']:.1f}) · {cell['seconds']:.2f} s"
    setup = cell.get("setup_seconds", 0.0)
    return [[(text + (f" +{setup:.2f}" if round(setup, 2) else ""), "dim")]]


def _margin_lines(margin: dict[str, Any] | None, metric: str) -> Cell:
    """A paired margin as a table line: green when significantly better, red when significantly worse."""
    if margin is None:
        return []
    m = margin[metric]
    p = (m.get("documents") or m["bootstrap"])["p_value"]  # summaries from before clustering: by question
    colour = (
        "green" if p is not None and p < 0.05 and m["diff"] > 0 else ("red" if p is not None and p < 0.05 else "dim")
    )
    return [[(f"Δ{m['diff']:+.3f} {_p(p)}", colour)]]
