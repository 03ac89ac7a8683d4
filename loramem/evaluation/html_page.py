"""The eval report page's HTML template, style sheet and script (`html_report` fills them in): plain strings,
so the page needs no file beside the package's modules and fetches nothing."""

TEMPLATE = """<!DOCTYPE html>
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

STYLE = """
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

SCRIPT = """
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
