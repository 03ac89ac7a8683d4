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
    return _TEMPLATE.format(
        generator=GENERATOR,
        title=escape(title),
        facts=_facts(summary, header),
        warning=_warning(summary),
        metric_options="".join(f'<option value="{m}">{escape(METRIC_NAMES[m])}</option>' for m in METRICS),
        tables="".join(_metric_tables(summary, m) for m in METRICS),
        plots=_plots(run),
        style=_STYLE,
        script=_SCRIPT,
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


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{generator}
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body data-errors="">
<script>
(function () {{
  // Every script error and every blocked fetch is recorded on <body data-errors>: a test reads it, a person sees it.
  function record(message) {{
    document.body.dataset.errors += message + "\\n";
    document.getElementById("errors").textContent = "Page errors: " + document.body.dataset.errors;
  }}
  window.addEventListener("error", function (e) {{ record("error: " + e.message); }});
  window.addEventListener("unhandledrejection", function (e) {{ record("rejected: " + e.reason); }});
  document.addEventListener("securitypolicyviolation", function (e) {{ record("blocked: " + e.blockedURI); }});
}})();
</script>
<p id="errors" class="warning" role="alert"></p>
<header>
<h1>{title}</h1>
<dl class="facts">{facts}</dl>
{warning}
<nav><a href="#summary" data-jump>Summary</a> · <a href="#curves" data-jump>Curves</a> ·
<a href="#answers" data-jump>Answers</a></nav>
</header>
<section id="summary">
<h2>Summary</h2>
<label>metric <select id="metric">{metric_options}</select></label>
{tables}
</section>
<section id="curves">
<h2>Curves</h2>
{plots}
</section>
<section id="answers">
<h2>Answers</h2>
<form id="filters" class="filters" autocomplete="off">
<label>document <select data-filter="doc"></select></label>
<label>ratio <select data-filter="ratio"></select></label>
<label>press <select data-filter="press"></select></label>
<label>mode <select data-filter="mode"></select></label>
<label>format <select data-filter="format"></select></label>
<label>search <input id="search" type="search" placeholder="question, answer, reference, document"></label>
<label>view <select id="view"><option value="answers">one answer a row</option>
<option value="side">side by side: modes of one question</option></select></label>
<label>sort <select id="sort"><option value="">run order</option><option value="asc">metric, lowest first</option>
<option value="desc">metric, highest first</option></select></label>
<button type="button" id="reset">clear filters</button>
</form>
<p id="count" class="count"></p>
<div id="table"></div>
<p class="pager"><button type="button" id="prev">« previous</button> <span id="pages"></span>
<button type="button" id="next">next »</button></p>
</section>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1b1b1b; }
h1 { font-size: 1.4em; margin: 0 0 .4em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0 1em; margin: 0 0 .6em; }
.facts dt { color: #666; } .facts dd { margin: 0; overflow-wrap: anywhere; }
.warning { background: #fde8e8; border-left: 4px solid #c62828; padding: .4em .8em; white-space: pre-wrap; }
.warning:empty { display: none; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .3em .5em; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
caption { font-weight: 600; text-align: left; padding: .3em 0; }
table.grid td { text-align: right; white-space: nowrap; } table.grid td:nth-child(-n+2) { text-align: left; }
.note { color: #666; font-size: .9em; max-width: 70em; }
.b { font-weight: 700; } .dim { color: #777; }
.up { color: #1b7f2a; font-weight: 600; } .down { color: #c62828; font-weight: 600; }
.metric { display: none; } .metric.shown { display: block; }
figure { display: inline-block; margin: .5em 1em .5em 0; }
figure img { max-width: min(100%, 640px); border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.filters { display: flex; flex-wrap: wrap; gap: .4em 1em; align-items: end; background: #f7f7f7; padding: .6em; }
.filters label { display: flex; flex-direction: column; font-size: .85em; color: #555; }
.filters select, .filters input { font-size: 1rem; max-width: 22em; }
.count { font-weight: 600; }
table.answers td.text { max-width: 36em; overflow-wrap: anywhere; white-space: pre-wrap; }
.refs { color: #1b5e9b; } .refs::before { content: "references: "; color: #777; }
.score { text-align: right; font-variant-numeric: tabular-nums; }
.answer-cell { min-width: 14em; max-width: 30em; overflow-wrap: anywhere; white-space: pre-wrap; }
.answer-cell .scores { display: block; color: #555; font-size: .85em; margin-top: .3em; white-space: normal; }
.extra { display: block; color: #777; font-size: .85em; }
.pager button { font-size: 1rem; }
"""

_SCRIPT = """
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const FILTERS = ["doc", "ratio", "press", "mode", "format"];
  const selects = {};
  const controls = {
    metric: document.getElementById("metric"),
    q: document.getElementById("search"),
    view: document.getElementById("view"),
    sort: document.getElementById("sort"),
  };
  const DEFAULTS = { metric: data.metric, q: "", view: "answers", sort: "" };
  let page = 1;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children || []) node.append(child);  // strings become text nodes: nothing is parsed
    return node;
  }

  for (const select of document.querySelectorAll("select[data-filter]")) {
    const name = select.dataset.filter;
    selects[name] = select;
    select.append(el("option", { value: "" }, ["all (" + data.options[name].length + ")"]));
    for (const [value, label] of data.options[name]) select.append(el("option", { value: value }, [label]));
  }

  function readFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const name of FILTERS) selects[name].value = params.get(name) || "";
    for (const [name, control] of Object.entries(controls)) control.value = params.get(name) || DEFAULTS[name];
    for (const [name, control] of Object.entries({ ...selects, ...controls })) {
      if (control.tagName === "SELECT" && control.selectedIndex < 0) control.value = DEFAULTS[name] || "";
    }
    page = Math.max(1, parseInt(params.get("page"), 10) || 1);
  }

  function state() {
    const params = new URLSearchParams();
    for (const name of FILTERS) if (selects[name].value) params.set(name, selects[name].value);
    for (const [name, control] of Object.entries(controls)) {
      if (control.value !== DEFAULTS[name]) params.set(name, control.value);
    }
    if (page > 1) params.set("page", String(page));
    return params.toString();
  }

  function matching() {
    const needle = controls.q.value.trim().toLowerCase();
    return data.answers.filter(function (a) {
      for (const name of FILTERS) if (selects[name].value && a[name] !== selects[name].value) return false;
      if (!needle) return true;
      const q = data.questions[a.q];
      return [a.doc, a.answer, q.question].concat(q.references).some((t) => t.toLowerCase().includes(needle));
    });
  }

  function metricIndex() {
    return data.metrics.findIndex((m) => m[0] === controls.metric.value);
  }

  function scoreText(a) {
    return data.metrics.map((m, i) => m[2] + " " + a.scores[i].toFixed(2)).join(" · ");
  }

  function questionCell(a) {
    const q = data.questions[a.q];
    const refs = el("span", { class: "refs extra" }, [q.references.join(" | ")]);
    const where = el("span", { class: "extra" }, [a.doc + " · question " + a.index]);
    return el("td", { class: "text" }, [where, el("b", {}, [q.question]), refs]);
  }

  function answerRows(answers) {
    const head = ["question", "press", "ratio", "mode", "format", "answer"];
    const body = answers.map(function (a) {
      const cells = [questionCell(a)];
      for (const name of ["press", "ratio", "mode", "format"]) cells.push(el("td", {}, [a[name]]));
      cells.push(el("td", { class: "text" }, [a.answer, note(a)]));
      for (const s of a.scores) {
        const cell = el("td", { class: "score" }, [s.toFixed(2)]);
        cell.style.background = "rgba(27, 127, 42, " + (0.3 * s).toFixed(3) + ")";  // greener, better
        cells.push(cell);
      }
      cells.push(el("td", { class: "score" }, [String(a.tokens)]));
      const attrs = { class: "answer" };
      for (const name of FILTERS) attrs["data-" + name] = a[name];
      return el("tr", attrs, cells);
    });
    return [head.concat(data.metrics.map((m) => m[2]), ["KV tokens"]), body];
  }

  function note(a) {
    return a.note ? el("span", { class: "extra" }, [a.note]) : "";
  }

  function groups(answers) {
    const byKey = new Map();
    for (const a of answers) {
      const key = [a.q, a.press, a.ratio].join("\\u0000");
      if (!byKey.has(key)) byKey.set(key, { first: a, cells: {} });
      byKey.get(key).cells[a.column] = a;
    }
    return Array.from(byKey.values());
  }

  function sideRows(items, answers) {
    const present = new Set(answers.map((a) => a.column));
    const columns = data.columns.filter((c) => present.has(c[0]));
    const head = ["question", "press", "ratio"].concat(columns.map((c) => c[1]));
    const body = items.map(function (g) {
      const a = g.first;
      const cells = [questionCell(a), el("td", {}, [a.press]), el("td", {}, [a.ratio])];
      for (const [column] of columns) {
        const b = g.cells[column];
        const scores = b ? el("span", { class: "scores" }, [scoreText(b)]) : "";
        const attrs = b ? { class: "answer-cell", "data-mode": b.mode, "data-format": b.format } : { class: "empty" };
        cells.push(el("td", attrs, b ? [b.answer, note(b), scores] : []));
      }
      return el("tr", { class: "group", "data-doc": a.doc, "data-ratio": a.ratio, "data-press": a.press }, cells);
    });
    return [head, body];
  }

  function render() {
    for (const div of document.querySelectorAll(".metric")) {
      div.classList.toggle("shown", div.dataset.metric === controls.metric.value);
    }
    const answers = matching();
    const side = controls.view.value === "side";
    let items = side ? groups(answers) : answers;
    if (controls.sort.value) {
      const i = metricIndex();
      const best = (g) => Math.max.apply(null, Object.values(g.cells).map((b) => b.scores[i]));  // a question's best
      const score = side ? best : (a) => a.scores[i];
      const sign = controls.sort.value === "asc" ? 1 : -1;
      items = items.slice().sort((x, y) => sign * (score(x) - score(y)));
    }
    const pages = Math.max(1, Math.ceil(items.length / data.per_page));
    page = Math.min(page, pages);
    const shown = items.slice((page - 1) * data.per_page, page * data.per_page);
    const [head, body] = side ? sideRows(shown, answers) : answerRows(shown);
    const table = el("table", { class: side ? "side" : "answers" }, [
      el("thead", {}, [el("tr", {}, head.map((h) => el("th", {}, [h])))]), el("tbody", {}, body),
    ]);
    document.getElementById("table").replaceChildren(table);
    const count = document.getElementById("count");
    count.dataset.matching = String(answers.length);
    count.dataset.total = String(data.answers.length);
    count.textContent = answers.length + " of " + data.answers.length + " answers match" +
      (side ? " (" + items.length + " questions side by side)" : "") +
      (pages > 1 ? "; showing " + shown.length + " on page " + page + " of " + pages : "");
    document.getElementById("pages").textContent = "page " + page + " of " + pages;
    document.getElementById("prev").disabled = page <= 1;
    document.getElementById("next").disabled = page >= pages;
    const fragment = state();
    document.body.dataset.state = fragment;
    if (location.hash.slice(1) !== fragment && (fragment || location.hash)) {
      history.replaceState(null, "", "#" + fragment);
    }
  }

  function changed() {
    page = 1;
    render();
  }

  for (const control of Object.values({ ...selects, ...controls })) control.addEventListener("change", changed);
  controls.q.addEventListener("input", changed);
  document.getElementById("prev").addEventListener("click", function () { page -= 1; render(); });
  document.getElementById("next").addEventListener("click", function () { page += 1; render(); });
  document.getElementById("reset").addEventListener("click", function () {
    for (const select of Object.values(selects)) select.value = "";
    controls.q.value = "";
    changed();
  });
  for (const link of document.querySelectorAll("a[data-jump]")) {
    link.addEventListener("click", function (e) {  // a section link scrolls; the fragment keeps the filters
      e.preventDefault();
      document.querySelector(link.getAttribute("href")).scrollIntoView();
    });
  }
  window.addEventListener("hashchange", function () { readFragment(); render(); });
  readFragment();
  render();
  document.body.dataset.ready = "1";
})();
"""
