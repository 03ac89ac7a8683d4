"""`eval report RUN --html PAGE`: one self-contained page, checked in a real headless Chromium (its DOM after the
scripts ran): every answer row, the filters read from the URL fragment, the side-by-side view, no script error and
no fetch; a broken script and a fetch are shown to be caught; and, driven over the DevTools protocol, typing in the
search box and choosing with the keyboard in a select narrow the rows and update the link. Without chromium the
browser tests skip, except under CI (the env var CI set), where they fail."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import DEMO_DOC, REPO, run_cli
from test_cli import one_line_error

from loramem.data.formats import QA, DocRecord, TrainQA, write_dataset
from loramem.evaluation.html_report import PAGE_ROWS, page_data
from loramem.evaluation.metrics import score_answer
from loramem.evaluation.rundir import ANSWERS, CONFIG, read_answers

HOSTILE_ANSWER = (
    '</script><script>document.body.dataset.pwned = "script"</script>'
    "<img src=x onerror=\"document.body.dataset.pwned = 'img'\"> Orla Quenby"
)
HOSTILE_DOC = 'doc <b>&amp; "3"'
DOCS = ["d0", "d1", HOSTILE_DOC]
QUESTIONS = [("Who designed the <lighthouse>?", ["Orla Quenby"]), ("Who was the first keeper?", ["Hobart Fennick"])]
ANSWERS_BY_MODE = {"none": "The lighthouse keeper was a man.", "decode": "Hobart Fennick"}


def make_run(folder: Path) -> Path:
    """A run folder as `loramem eval` leaves it (config.json, answers.jsonl), its answers scored for real: three
    documents (one with a hostile id), two questions, two presses, two ratios, base and a `decode` QA adapter."""
    folder.mkdir()
    rows = []
    for doc in DOCS:
        for index, (question, references) in enumerate(QUESTIONS):
            for press in ("snapkv", "knorm"):
                for ratio in (0.0, 0.5):
                    for mode, fmt in (("none", None), ("decode", "qa")):
                        answer = ANSWERS_BY_MODE[mode]
                        if (doc, index, press, ratio, mode) == ("d1", 0, "knorm", 0.5, "decode"):
                            answer = HOSTILE_ANSWER
                        rows.append(
                            {
                                "doc_id": doc,
                                "question_index": index,
                                "question": question,
                                "references": references,
                                "press": press,
                                "ratio": ratio,
                                "mode": mode,
                                "format": fmt,
                                "variant": "token",
                                "answer": answer,
                                **score_answer(answer, references),
                                "cache_tokens": 40 if ratio == 0 else 20,
                                "kv_bytes": 1000,
                                "seconds": 0.1,
                            }
                        )
    header = {
        "model": {"id": "tiny", "model": "x"},
        "dataset": {"path": "data.jsonl", "sha256": "s"},
        "config": {},
        "documents": {doc: 16 for doc in DOCS},
        "created": "2026-12-04T00:00:00+00:00",
    }
    (folder / CONFIG).write_text(json.dumps(header))
    (folder / ANSWERS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """The page `loramem eval report RUN --html` writes (also printing the table, as without --html)."""
    run = make_run(tmp_path_factory.mktemp("html") / "run")
    result = run_cli("eval", "report", str(run), "--html", str(run / "report.html"))
    assert result.returncode == 0, result.stderr.decode()
    assert "3 documents, 6 questions" in result.stdout.decode()
    return run / "report.html"


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install -y --no-install-recommends chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the browser tests")
        pytest.skip(message)
    return found


class Dom(HTMLParser):
    """The elements of a dumped DOM as (tag, attributes), and the text of the whole page."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def one(self, tag: str, **attrs: str) -> dict[str, str]:
        (found,) = self.find(tag, **attrs)
        return found


FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI's container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browse(chromium: str, page: Path, fragment: str = "", tmp: Path | None = None) -> Dom:
    """The page's DOM once its scripts ran, as headless Chromium loads it from disk (the fragment given)."""
    profile = (tmp or page.parent) / "chromium-profile"
    flags = [*FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom"]
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    done = subprocess.run([chromium, *flags, url], capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return Dom(done.stdout.decode())


class DevTools:
    """One page in headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
    messages ended by NUL, commands on the child's fd 3, replies on its fd 4), with nothing but the standard
    library: keys and text reach the page as a user's input does, so its own event handlers run."""

    def __init__(self, commands: int, replies: int) -> None:
        self.commands, self.replies = commands, replies
        self.pending, self.last_id, self.session = b"", 0, ""

    def send(self, method: str, **params: object) -> dict:
        self.last_id += 1
        message: dict = {"id": self.last_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.pending:
                ready, _, _ = select.select([self.replies], [], [], 60)
                chunk = os.read(self.replies, 1 << 16) if ready else b""
                assert chunk, f"no reply from chromium to {method}"
                self.pending += chunk
            line, self.pending = self.pending.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.last_id:  # events (no id) are not waited for
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def value(self, expression: str) -> object:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.monotonic() + 60
        while self.value("document.body && document.body.dataset.ready") != "1":
            assert time.monotonic() < deadline, "the page never finished its script"
            time.sleep(0.05)

    def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def click(self, selector: str) -> None:
        """A mouse click at the middle of the element (scrolled into view)."""
        box = self.value(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        assert isinstance(box, list)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def rows(self) -> int:
        count = self.value("document.querySelectorAll('tr.answer').length")
        assert isinstance(count, int)
        return count


@contextmanager
def devtools(chromium: str, profile: Path) -> Iterator[DevTools]:
    to_child, from_us = os.pipe()
    to_us, from_child = os.pipe()

    def wire() -> None:  # in the child: its fd 3 reads our commands, its fd 4 writes the replies
        os.dup2(to_child, 3)
        os.dup2(from_child, 4)

    process = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
        pass_fds=(3, 4),
        preexec_fn=wire,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_child)
    os.close(from_child)
    try:
        yield DevTools(from_us, to_us)
    finally:
        process.kill()
        process.wait(timeout=60)
        os.close(from_us)
        os.close(to_us)


def loaded(dom: Dom) -> dict[str, str]:
    """The body of a page whose script ran to its end without an error or a blocked fetch."""
    body = dom.one("body")
    assert body.get("data-errors") == "", body.get("data-errors")
    assert body.get("data-ready") == "1"
    return body


def answer_rows(dom: Dom) -> list[dict[str, str]]:
    return dom.find("tr", **{"class": "answer"})


def test_the_page_holds_every_answer_and_loads_without_errors(chromium, page):
    dom = browse(chromium, page)
    body = loaded(dom)
    rows = read_answers(page.parent / ANSWERS)
    shown = answer_rows(dom)
    assert len(shown) == len(rows) == 48 < PAGE_ROWS
    expected = sorted((r["doc_id"], r["press"], f"{r['ratio']:g}", r["mode"], r["format"] or "none") for r in rows)
    got = sorted((a["data-doc"], a["data-press"], a["data-ratio"], a["data-mode"], a["data-format"]) for a in shown)
    assert got == expected
    assert dom.one("p", id="count")["data-matching"] == "48"
    # The hostile answer and document id are text on the page; nothing of them ran or became an element.
    assert "pwned" not in body and not dom.find("img", src="x")
    text = "".join(dom.text)
    assert HOSTILE_ANSWER in text and HOSTILE_DOC in text and "Who designed the <lighthouse>?" in text
    # The summary tables (every metric) and the curves are on the page, the plots inline.
    assert "ROUGE-L · snapkv · 3 documents, 6 questions" in text and "Δ+" in text
    assert len(dom.find("div", **{"class": "metric shown"})) == 1 and len(dom.find("div")) >= 4
    assert all(img["src"].startswith("data:image/png;base64,") for img in dom.find("img"))
    assert len(dom.find("img")) == 2  # curves.png, curves-contains.png


def test_filters_from_the_fragment_narrow_the_rows(chromium, page):
    rows = read_answers(page.parent / ANSWERS)
    dom = browse(chromium, page, "mode=decode&ratio=0.5&press=knorm")
    body = loaded(dom)
    shown = answer_rows(dom)
    expected = [r for r in rows if r["mode"] == "decode" and r["ratio"] == 0.5 and r["press"] == "knorm"]
    assert len(shown) == len(expected) == 6
    assert all((a["data-mode"], a["data-ratio"], a["data-press"]) == ("decode", "0.5", "knorm") for a in shown)
    assert body["data-state"] == "ratio=0.5&press=knorm&mode=decode"  # the controls took the values

    dom = browse(chromium, page, f"doc={quote(HOSTILE_DOC)}&format=none")
    loaded(dom)
    assert {(a["data-doc"], a["data-mode"]) for a in answer_rows(dom)} == {(HOSTILE_DOC, "none")}
    assert len(answer_rows(dom)) == 8

    dom = browse(chromium, page, "q=" + quote("FENNICK"))  # the search reads answers and references alike
    loaded(dom)
    hits = [r for r in rows if "fennick" in (r["answer"] + " ".join(r["references"])).lower()]
    assert len(answer_rows(dom)) == len(hits) and 0 < len(hits) < len(rows)

    dom = browse(chromium, page, "mode=magic")  # a value the run has not: the filter stays open
    assert len(answer_rows(dom)) == len(rows) and loaded(dom)["data-state"] == ""


def test_typing_and_choosing_in_the_controls_narrow_the_rows_and_update_the_link(chromium, page, tmp_path):
    rows = read_answers(page.parent / ANSWERS)
    with devtools(chromium, tmp_path / "profile") as browser:
        browser.open(page.resolve().as_uri())
        assert browser.rows() == len(rows) and browser.value("location.hash") == ""
        browser.value("document.getElementById('search').focus()")
        browser.send("Input.insertText", text="fennick")
        hits = [r for r in rows if "fennick" in (r["answer"] + " ".join(r["references"])).lower()]
        assert browser.rows() == len(hits) and browser.value("location.hash") == "#q=fennick"
        browser.value("document.querySelector('select[data-filter=mode]').focus()")
        for _ in range(2):  # from "all" past "none" to "decode", as a user's arrow keys do
            browser.press("ArrowDown", 40)
        decoded = [r for r in hits if r["mode"] == "decode"]
        assert browser.rows() == len(decoded) < len(hits)
        assert browser.value("location.hash") == "#mode=decode&q=fennick"
        browser.click("#reset")
        assert browser.rows() == len(rows) and browser.value("location.hash") == ""
        browser.value("location.hash = 'mode=none&press=knorm'")  # a link edited by hand is followed
        deadline = time.monotonic() + 30
        while browser.rows() == len(rows) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert browser.rows() == sum(r["mode"] == "none" and r["press"] == "knorm" for r in rows)
        assert browser.value("document.body.dataset.errors") == ""


def test_side_by_side_puts_base_and_adapter_answers_to_one_question_together(chromium, page):
    dom = browse(chromium, page, "view=side")
    loaded(dom)
    groups = dom.find("tr", **{"class": "group"})
    assert len(groups) == 3 * 2 * 2 * 2  # documents x questions x presses x ratios
    cells = dom.find("td", **{"class": "answer-cell"})
    assert len(cells) == 48 and {(c["data-mode"], c["data-format"]) for c in cells} == {
        ("none", "none"),
        ("decode", "qa"),
    }
    dom = browse(chromium, page, "view=side&mode=decode")
    loaded(dom)
    assert len(dom.find("tr", **{"class": "group"})) == 24
    assert {c["data-mode"] for c in dom.find("td", **{"class": "answer-cell"})} == {"decode"}


def test_a_script_error_or_a_fetch_would_be_caught(chromium, page, tmp_path):
    """The checks above could not pass on a broken page: a damaged script or a network fetch is recorded."""
    markup = page.read_text()
    start = markup.index('<script type="application/json" id="report-data">')
    broken = tmp_path / "broken.html"
    broken.write_text(markup[: start + 60] + "{damaged" + markup[start + 60 :])
    body = browse(chromium, broken, tmp=tmp_path).one("body")
    assert "SyntaxError" in body["data-errors"] and "data-ready" not in body
    fetching = tmp_path / "fetching.html"
    fetching.write_text(
        markup.replace('<section id="curves">', '<img src="http://127.0.0.1:9/x.png"><section id="curves">')
    )
    body = browse(chromium, fetching, tmp=tmp_path).one("body")
    assert "blocked: http://127.0.0.1:9/x.png" in body["data-errors"]


def test_a_large_run_is_shown_a_page_at_a_time(chromium, tmp_path):
    """The committed NarrativeQA run (5,484 answers of the default model): filtered, paged, every page reachable."""
    run = tmp_path / "narrativeqa"
    shutil.copytree(REPO / "docs" / "results" / "narrativeqa", run)
    result = run_cli("eval", "report", str(run), "--html", str(run / "report.html"), "--metric", "contains")
    assert result.returncode == 0, result.stderr.decode()
    dom = browse(chromium, run / "report.html", "mode=decode&ratio=0.5")
    loaded(dom)
    assert dom.one("p", id="count")["data-matching"] == "457"
    assert len(answer_rows(dom)) == PAGE_ROWS
    dom = browse(chromium, run / "report.html", "mode=decode&ratio=0.5&page=99")  # past the end: the last page
    body = loaded(dom)
    assert len(answer_rows(dom)) == 457 - 4 * PAGE_ROWS and "page=5" in body["data-state"]
    assert dom.one("div", **{"class": "metric shown"})["data-metric"] == "contains"  # --metric is shown first
    with devtools(chromium, tmp_path / "profile") as browser:
        browser.open((run / "report.html").resolve().as_uri() + "#mode=decode&ratio=0.5")
        for page in range(2, 6):
            browser.click("#next")
            assert browser.value("location.hash") == f"#ratio=0.5&mode=decode&page={page}"
        assert browser.rows() == 457 - 4 * PAGE_ROWS and browser.value("document.getElementById('next').disabled")


def test_a_tiny_model_run_with_budgets_and_a_library(chromium, tiny_dir, tmp_path):
    """A run of the real pipeline (a tiny random model): ratio cells, byte-budget points (adapter rank 0 and 2) and
    library modes all reach the page, each with what its cell bought or where routing went."""
    paragraphs = DEMO_DOC.read_text().split("\n\n")[1:3]
    qa = [QA("Who designed the lighthouse?", ["Orla Quenby"])]
    train = [TrainQA("Which engineer built the light?", "Orla Quenby")]
    data = tmp_path / "data.jsonl"
    write_dataset([DocRecord(f"doc-{i}", text, qa, train) for i, text in enumerate(paragraphs)], data)
    run = tmp_path / "run"
    grid = "--ratios 0,1 --press snapkv --mode none,decode,oracle --format qa --budget-bytes 20KB --budget-ranks 0,2"
    fast = "--rank 2 --steps 1 --max-new-tokens 3 --library-top-k 1"
    made = run_cli("eval", str(data), "--out", str(run), *grid.split(), *fast.split(), "--model", str(tiny_dir))
    assert made.returncode == 0, made.stderr.decode()
    result = run_cli("eval", "report", str(run), "--html", str(run / "report.html"))
    assert result.returncode == 0, result.stderr.decode()

    rows = read_answers(run / ANSWERS)
    dom = browse(chromium, run / "report.html")
    loaded(dom)
    assert len(answer_rows(dom)) == len(rows) == 2 * (2 * 2 + 1 + 2)  # (ratios x modes) + oracle + budget ranks
    budget = "budget 19.5 KiB · KV native"
    assert {a["data-ratio"] for a in answer_rows(dom)} == {"0", "1", budget}
    text = "".join(dom.text)
    assert "within a byte budget" in text and "routed to doc-" in text and "document tokens" in text

    dom = browse(chromium, run / "report.html", f"view=side&ratio={quote(budget)}")
    loaded(dom)
    assert len(dom.find("tr", **{"class": "group"})) == 2  # one per question: rank 0 and rank 2 side by side
    cells = dom.find("td", **{"class": "answer-cell"})
    assert sorted((c["data-mode"], c["data-format"]) for c in cells) == [("decode", "qa")] * 2 + [("none", "none")] * 2


def test_the_data_cannot_break_out_of_its_script(page):
    markup = page.read_text()
    assert "</script><script>document.body" not in markup and "<img src=x" not in markup
    start = markup.index('id="report-data">') + len('id="report-data">')
    embedded = json.loads(markup[start : markup.index("</script>", start)])
    assert {k: v for k, v in embedded.items() if k != "metric"} == page_data(read_answers(page.parent / ANSWERS))
    assert "http://" not in markup and "https://" not in markup  # nothing to fetch


def test_html_to_stdout_and_bad_targets(tmp_path, page):
    run = page.parent
    result = run_cli("eval", "report", str(run), "--html", "-")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith("<!DOCTYPE html>") and "ROUGE-L · snapkv" in result.stdout.decode()
    assert "┃" not in result.stdout.decode()  # the page instead of the table
    again = run_cli("eval", "report", str(run), "--html", str(page))  # a page it wrote is replaced
    assert again.returncode == 0, again.stderr.decode()

    other = tmp_path / "notes.html"
    other.write_text("my notes")
    refused = run_cli("eval", "report", str(run), "--html", str(other))
    assert refused.returncode == 2 and "not an eval report page loramem wrote" in one_line_error(refused)
    assert other.read_text() == "my notes"
    assert run_cli("eval", "report", str(run), "--html", "-", "--json").returncode == 2
    assert "does not exist" in one_line_error(
        run_cli("eval", "report", str(run), "--html", str(tmp_path / "no/r.html"))
    )

    not_a_run = run_cli("eval", "report", str(tmp_path), "--html", str(tmp_path / "r.html"))
    assert not_a_run.returncode == 2 and "not an eval run directory" in one_line_error(not_a_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / CONFIG).write_text((run / CONFIG).read_text())
    (empty / ANSWERS).write_text("")
    nothing = run_cli("eval", "report", str(empty), "--html", str(tmp_path / "r.html"))
    assert nothing.returncode == 2 and "no answers" in one_line_error(nothing)
    assert not (tmp_path / "r.html").exists()


def test_an_incomplete_or_failed_run_says_so(tmp_path):
    run = make_run(tmp_path / "run")
    rows = read_answers(run / ANSWERS)
    (run / ANSWERS).write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    assert run_cli("eval", "report", str(run), "--html", str(run / "r.html")).returncode == 0
    assert "The run is not complete" in (run / "r.html").read_text()
    (run / "failures.json").write_text(json.dumps([{"doc_id": HOSTILE_DOC, "cells": 1, "error": "boom"}]))
    assert run_cli("eval", "report", str(run), "--html", str(run / "r.html")).returncode == 0
    page = (run / "r.html").read_text()
    assert "1 cells failed (documents doc &lt;b&gt;&amp;amp; &quot;3&quot;)" in page
