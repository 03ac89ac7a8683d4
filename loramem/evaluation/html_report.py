"""A run's report as one self-contained HTML page to browse: the summary tables, the plots and every answer.

Nothing is fetched when the page opens (its Content-Security-Policy forbids it): the plots are inline PNGs, the
answers JSON in a `<script type="application/json">` and the filters vanilla JavaScript. Everything the page shows
is text: the tables are escaped here, the answers are put in the DOM as text nodes, and the data's `<`, `>` and `&`
are JSON escapes, so no answer can close its script element. The filters (document, ratio, press, mode, format, a
text search, the view, the sort, the page) live in the URL fragment (`report.html#mode=decode&ratio=0.5`), so a
filtered view can be shared as a link. Answers are shown a page at a time (`PAGE_ROWS` rows), so a run of many
thousands of answers stays quick to browse.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from loramem.evaluation.config import LIBRARY_SERIES
from loramem.evaluation.html_page import SCRIPT, STYLE, TEMPLATE
from loramem.evaluation.plots import METRIC_NAMES, MODE_LABELS, merge_label, series_label
from loramem.evaluation.rundir import (
    ANSWERS,
    BUDGET_PLOT,
    BUDGET_PLOT_CONTAINS,
    BYTES_PLOT,
    CONFIG,
    CURVES,
    CURVES_CONTAINS,
    read_answers,
    read_json,
    series,
)
from loramem.evaluation.summary import fill_later_metrics
from loramem.evaluation.tables import Cell, GridTable, budget_tables, grid_tables
from loramem.fileio import atomic_write_bytes, check_output_path, write_stdout
from loramem.sizes import format_size
from loramem.vocab import METRICS, MODES

PAGE_ROWS = 100  # answers (or questions, side by side) shown at once

GENERATOR = '<meta name="generator" content="loramem eval report">'  # how a page this module wrote is recognized

PLOTS = {  # the plots `write_report` draws, in the order the page shows them
    CURVES: "ROUGE-L against the compression ratio",
    CURVES_CONTAINS: "answers containing a reference against the compression ratio",
    BYTES_PLOT: "ROUGE-L against the stored KV bytes",
    BUDGET_PLOT: "ROUGE-L within byte budgets",
    BUDGET_PLOT_CONTAINS: "answers containing a reference within byte budgets",
}

SHORT_NAMES = {"exact_match": "EM", "token_f1": "F1", "contains": "contains"}  # beside each answer; else METRIC_NAMES

NO_FORMAT = "none"  # the filter value of answers made without an adapter (format null)


def is_report_page(path: Path) -> bool:
    """Whether a file is a page this module wrote: `--html` replaces only those."""
    with path.open("rb") as handle:
        return GENERATOR.encode() in handle.read(1024)


def check_page_path(path: str | Path) -> None:
    """Refuse an --html target before any work: a missing folder, a directory, a file loramem did not write."""
    check_output_path(path, force=True, what="eval report page", ours=is_report_page)


def write_page(run_dir: str | Path, summary: dict[str, Any], dest: str | Path, metric: str = "rouge_l") -> None:
    """The page of a run whose report (summary and plots) `write_report` has just written, to a file or '-'."""
    page = render_page(run_dir, summary, metric).encode()
    if str(dest) == "-":
        write_stdout(page)
    else:
        atomic_write_bytes(dest, page)


def render_page(run_dir: str | Path, summary: dict[str, Any], metric: str = "rouge_l") -> str:
    """The whole page: header, summary tables for every metric (`metric` shown first), the plots in the run
    folder, the answers."""
    run = Path(run_dir)
    header = read_json(run / CONFIG, "start one with `loramem eval DATA --out RUN_DIR`")
    data = json.dumps(
        {**page_data(read_answers(run / ANSWERS)), "metric": metric}, ensure_ascii=False, separators=(",", ":")
    )
    # `<`, `>` and `&` only occur inside JSON strings, where their \u escapes read the same to JSON.parse.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = f"loramem eval report · {run.resolve().name}"
    return TEMPLATE.format(
        generator=GENERATOR,
        title=escape(title),
        facts=_facts(summary, header),
        warning=_warning(summary),
        metric_options="".join(f'<option value="{m}">{escape(METRIC_NAMES[m])}</option>' for m in METRICS),
        tables="".join(_metric_tables(summary, m) for m in METRICS),
        plots=_plots(run),
        style=STYLE,
        script=SCRIPT,
        data=data,
    )


def page_data(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What the page's script filters: each question once, each answer with its cell's filter values, and the
    choices of each filter in the run's order (presses as made, library last; modes in the paper's order)."""
    rows = fill_later_metrics(list(rows))
    presses = sorted(dict.fromkeys(_press(r) for r in rows), key=lambda name: name == LIBRARY_SERIES)
    formats = list(dict.fromkeys(r["format"] for r in rows))
    columns = sorted(
        {_column(r) for r in rows}, key=lambda c: (_mode_rank(c[0]), formats.index(c[1]), c[2], c[3] or "")
    )
    settings = sorted({_setting(r) for r in rows})
    docs = sorted({r["doc_id"] for r in rows})
    rows.sort(
        key=lambda r: (
            r["doc_id"],
            int(r["question_index"]),
            presses.index(_press(r)),
            settings.index(_setting(r)),
            columns.index(_column(r)),
        )
    )
    questions: dict[tuple[str, int], int] = {}
    question_list: list[dict[str, Any]] = []
    answers = []
    for r in rows:
        key = (r["doc_id"], int(r["question_index"]))
        if key not in questions:
            questions[key] = len(question_list)
            question_list.append({"question": r["question"], "references": r["references"]})
        answers.append(
            {
                "q": questions[key],
                "doc": r["doc_id"],
                "index": key[1],
                "press": _press(r),
                "ratio": _setting(r)[1],
                "mode": r["mode"],
                "format": r["format"] or NO_FORMAT,
                "column": _column_key(_column(r)),
                "answer": r["answer"],
                "scores": [r[m] for m in METRICS],
                "tokens": r["cache_tokens"],
                "note": _note(r),
            }
        )
    return {
        "per_page": PAGE_ROWS,
        "metrics": [[m, METRIC_NAMES[m], SHORT_NAMES.get(m, METRIC_NAMES[m])] for m in METRICS],
        "questions": question_list,
        "answers": answers,
        "columns": [[_column_key(c), _column_label(c)] for c in columns],
        "options": {
            "doc": [[d, d] for d in docs],
            "ratio": [[s[1], s[1]] for s in settings],
            "press": [[p, p] for p in presses],
            "mode": [[m, f"{m} ({MODE_LABELS.get(m, m)})"] for m in sorted({r["mode"] for r in rows}, key=_mode_rank)],
            "format": [[f or NO_FORMAT, f or f"{NO_FORMAT} (no adapter)"] for f in formats],
        },
    }


def _mode_rank(mode: str) -> int:
    return MODES.index(mode) if mode in MODES else len(MODES)


def _press(row: dict[str, Any]) -> str:
    """An answer's press as the tables name it: its series (press and KV variant), a budget point's press alone
    (its budget and rank are its ratio and column)."""
    return row["press"] if row.get("budget_bytes") is not None else series(row)


def _setting(row: dict[str, Any]) -> tuple[tuple[int, float, str], str]:
    """(order, label) of an answer's compression: its ratio, or its byte budget and storage (ratio null)."""
    if row.get("budget_bytes") is None:
        return (0, float(row["ratio"]), ""), f"{float(row['ratio']):g}"
    budget = int(row["budget_bytes"])
    return (1, budget, row["store"]), f"budget {format_size(budget)} · KV {row['store']}"


Column = tuple[str, "str | None", int, "str | None"]  # mode, format, adapter rank, merge label


def _column(row: dict[str, Any]) -> Column:
    """Which side-by-side column an answer fills: its mode and format (and adapter rank, within a budget; and its
    merge, for a merging library mode)."""
    return row["mode"], row["format"], int(row.get("adapter_rank") or 0), merge_label(row)


def _column_key(column: Column) -> str:
    mode, fmt, rank, merge = column
    return "·".join([mode, fmt or NO_FORMAT, *([f"r{rank}"] if rank else []), *([merge] if merge else [])])


def _column_label(column: Column) -> str:
    mode, fmt, rank, merge = column
    return series_label(mode, fmt, merge) + (f" · rank {rank}" if rank else "")


def _note(row: dict[str, Any]) -> str:
    """What else an answer's cell says: where routing put its document, or what a byte budget bought."""
    if "routed" in row:
        routed = ", ".join(r["id"] for r in row["routed"])
        rank = row.get("gold_rank")
        return f"routed to {routed} ({'gold rank ' + str(rank) if rank else 'gold not routed'})"
    if row.get("budget_bytes") is not None:
        return (
            f"{format_size(row['adapter_bytes'])} adapter + {row['kv_tokens_kept']} of {row['document_tokens']} "
            f"document tokens ({format_size(row['document_kv_bytes'])})"
        )
    return ""


def _facts(summary: dict[str, Any], header: dict[str, Any]) -> str:
    facts = [
        ("model", summary.get("model") or "?"),
        ("dataset", summary.get("dataset") or "?"),
        ("documents", str(summary["n_documents"])),
        ("questions", str(summary["n_questions"])),
        ("answers", f"{summary['n_answers']} of {summary['n_cells_planned']} planned"),
        ("loramem", str(header.get("loramem_version", "?"))),
        ("created", str(header.get("created", "?"))),
    ]
    return "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts)


def _warning(summary: dict[str, Any]) -> str:
    if summary.get("failed"):
        docs = ", ".join(f["doc_id"] for f in summary["failed"])
        return (
            f'<p class="warning">{summary["n_failed_cells"]} cells failed (documents {escape(docs)}); see '
            "failures.json, rerun with --resume</p>"
        )
    if not summary["complete"]:
        return '<p class="warning">The run is not complete: some planned answers are missing.</p>'
    return ""


_STYLES = {"bold": "b", "dim": "dim", "green": "up", "red": "down"}


def _cell_html(cell: Cell) -> str:
    def span(text: str, style: str) -> str:
        return f'<span class="{_STYLES[style]}">{escape(text)}</span>' if style else escape(text)

    return "<br>".join("".join(span(t, s) for t, s in line) for line in cell)


def _table_html(table: GridTable) -> str:
    head = "".join(f"<th>{escape(c).replace(chr(10), '<br>')}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return (
        f'<table class="grid"><caption>{escape(table.title)}</caption><thead><tr>{head}</tr></thead>'
        f'<tbody>{body}</tbody></table><p class="note">{escape(table.caption)}</p>'
    )


def _metric_tables(summary: dict[str, Any], metric: str) -> str:
    tables = [*grid_tables(summary, metric), *(budget_tables(summary, metric) if summary.get("budget") else [])]
    return f'<div class="metric" data-metric="{metric}">{"".join(map(_table_html, tables))}</div>'


def _plots(run: Path) -> str:
    figures = []
    for name, caption in PLOTS.items():
        if (run / name).is_file():
            png = base64.b64encode((run / name).read_bytes()).decode()
            figures.append(
                f'<figure><img src="data:image/png;base64,{png}" alt="{escape(caption)}">'
                f"<figcaption>{escape(caption)} ({escape(name)})</figcaption></figure>"
            )
    return "".join(figures) or "<p>No plots.</p>"
