"""demo: the paper's story on the bundled example, as one table of answers.

The example document is encoded once and compressed per ratio from the recorded scores, and its
questions are answered at every ratio: answers fade as the cache is evicted. Then a QA adapter is
trained on the document's bundled training pairs (the same facts, worded apart from the questions)
and the questions are answered again at ratio 1.0, where no document token is left. The last line
states the margin the adapter buys there, against no adapter and against the full cache.

The example files ship inside the package (`loramem/demo_data/`), so the demo runs from a wheel too.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, cast

from loramem.adapters.attach import attach_adapter, detach_adapter
from loramem.adapters.train import train_adapter
from loramem.answer import iter_answers
from loramem.data.formats import load_qa_pairs
from loramem.errors import LoramemError
from loramem.evaluation.metrics import contains, rouge_l
from loramem.fileio import CheckedStdout
from loramem.kv.cache import KVCache
from loramem.kv.compress import compress
from loramem.kv.encode import encode
from loramem.log import log, progress_bar
from loramem.model.loading import LoadedModel
from loramem.specs import TrainSpec

DATA = "demo_data"
DOCUMENT, QUESTIONS, TRAIN_QA = "lighthouse.txt", "questions.jsonl", "train_qa.jsonl"
NO_CONTEXT = 1.0
MAX_NEW_TOKENS = 32
# 8 pairs x 8 epochs in batches of 4 = 16 steps of train-adapter's defaults (rank 16, all linear layers):
# the longest stage of the demo, about 25 s on 2 CPU cores with the default model.
DEMO_TRAINING = TrainSpec()


@dataclass
class Example:
    """The bundled document, its questions with reference answers, and the pairs an adapter trains on."""

    document: str
    questions: list[dict[str, Any]]
    train_qa: list[tuple[str, str]]


@dataclass
class Row:
    """One answer of the demo table."""

    ratio: float
    adapter: bool
    press: str
    kept_tokens: int
    question: str
    answer: str
    rouge_l: float
    contains: float


@contextmanager
def example_folder() -> Iterator[Path]:
    """The package's demo_data folder as a real directory (extracted when the package is zipped)."""
    with resources.as_file(resources.files("loramem") / DATA) as folder:
        if not (folder / DOCUMENT).is_file():
            raise LoramemError(f"the demo's example files are missing from {folder}; reinstall loramem")
        yield folder


def load_example() -> Example:
    with example_folder() as folder:
        document = (folder / DOCUMENT).read_text(encoding="utf-8")
        questions = [json.loads(line) for line in (folder / QUESTIONS).read_text().splitlines() if line.strip()]
        pairs, _ = load_qa_pairs(folder / TRAIN_QA)
    return Example(document, questions, [(p.question, p.answer) for p in pairs])


def with_endpoints(ratios: list[float]) -> list[float]:
    """The ratios asked for plus 0 (the full cache) and 1.0 (no document token), which the margin compares."""
    return sorted({0.0, NO_CONTEXT, *ratios})


def _answer_all(
    lm: LoadedModel, example: Example, caches: dict[float, KVCache], press: str, adapter: bool, advance: Callable
) -> list[Row]:
    """Every question over each ratio's cache, all as rows of the same batches."""
    jobs = [(ratio, item) for ratio in caches for item in example.questions]
    rows: list[Row | None] = [None] * len(jobs)
    for index, answer, _ in iter_answers(
        lm,
        [item["question"] for _, item in jobs],
        [caches[ratio] for ratio, _ in jobs],
        max_new_tokens=MAX_NEW_TOKENS,
        adapter_on=adapter,
    ):
        ratio, item = jobs[index]
        rows[index] = Row(
            ratio=ratio,
            adapter=adapter,
            press=press,
            kept_tokens=answer.cache_tokens,
            question=item["question"],
            answer=answer.answer,
            rouge_l=round(rouge_l(answer.answer, item["answers"]), 3),
            contains=contains(answer.answer, item["answers"]),
        )
        advance(1)
    return [row for row in rows if row is not None]


def run_demo(
    lm: LoadedModel, ratios: list[float], press: str, *, adapter: bool = True, training: TrainSpec = DEMO_TRAINING
) -> list[Row]:
    """Encode once, answer at every ratio; with `adapter`, train one on the bundled pairs and answer at ratio 1.0."""
    example = load_example()
    with progress_bar("encoding", lm.config.num_hidden_layers) as advance:
        cache = encode(lm, example.document, presses=[press], on_layer=lambda _: advance())
    log(f"encoded the example document: {cache.n_tokens} tokens in {cache.meta['prefill_seconds']:.1f} s")
    rows: list[Row] = []
    compressed = {ratio: compress(cache, press, ratio=ratio) for ratio in ratios}
    with progress_bar("answering", len(ratios) * len(example.questions)) as advance:
        rows += _answer_all(lm, example, compressed, press, False, advance)
    if not adapter:
        return rows
    with tempfile.TemporaryDirectory(prefix="loramem-demo-") as tmp:
        with progress_bar("training the adapter", None) as advance:
            summary = train_adapter(
                lm,
                example.document,
                example.train_qa,
                Path(tmp) / "adapter",
                training,
                on_step=lambda step, total, loss: advance(1, total=total, status=f"loss {loss:.3f}"),
            )
        log(
            f"trained a rank-{training.rank} QA adapter on {len(example.train_qa)} pairs: "
            f"{summary['steps']} steps in {summary['seconds']:.1f} s, final loss {summary['final_loss']:.3f}"
        )
        attach_adapter(lm, Path(tmp) / "adapter")
        try:
            empty = compressed.get(NO_CONTEXT) or compress(cache, press, ratio=NO_CONTEXT)
            with progress_bar("answering with the adapter", len(example.questions)) as advance:
                rows += _answer_all(lm, example, {NO_CONTEXT: empty}, press, True, advance)
        finally:
            detach_adapter(lm)
    return rows


@dataclass
class Score:
    """Mean ROUGE-L and the number of answers that contain a reference, over one column."""

    rouge_l: float
    correct: int
    total: int

    def __str__(self) -> str:
        return f"{self.correct}/{self.total} answers (ROUGE-L {self.rouge_l:.2f})"


def column_score(rows: list[Row], ratio: float, adapter: bool) -> Score:
    cells = [r for r in rows if r.ratio == ratio and r.adapter == adapter]
    if not cells:
        raise LoramemError(f"no answers at ratio {ratio:g}{' with the adapter' if adapter else ''}")
    return Score(sum(r.rouge_l for r in cells) / len(cells), int(sum(r.contains for r in cells)), len(cells))


def endpoints(rows: list[Row]) -> dict[str, Score]:
    """The three columns the margin compares: the adapter at ratio 1.0, no adapter at 1.0, the full cache."""
    return {
        "adapter_at_ratio_1": column_score(rows, NO_CONTEXT, True),
        "no_adapter_at_ratio_1": column_score(rows, NO_CONTEXT, False),
        "full_cache": column_score(rows, 0.0, False),
    }


def _gain(ours: Score, other: Score) -> dict[str, float]:
    return {"correct": ours.correct - other.correct, "rouge_l": round(ours.rouge_l - other.rouge_l, 3)}


def margin_line(rows: list[Row]) -> str:
    """The adapter at ratio 1.0 against no adapter at 1.0 and against the full cache (ratio 0), in words."""
    scores = endpoints(rows)
    ours = scores["adapter_at_ratio_1"]
    parts = []
    for key, label in (("no_adapter_at_ratio_1", "without it"), ("full_cache", "the full cache (ratio 0)")):
        gain = _gain(ours, scores[key])
        parts.append(f"{gain['correct']:+d} answers and {gain['rouge_l']:+.2f} ROUGE-L vs {label}: {scores[key]}")
    return f"Margin at ratio 1.0 (no document token left): the adapter gives {ours}; " + "; ".join(parts) + "."


def summary(rows: list[Row]) -> dict[str, Any]:
    """The margin as data, for `demo --json`."""
    scores = endpoints(rows)
    ours = scores["adapter_at_ratio_1"]
    return {
        **{key: asdict(score) for key, score in scores.items()},
        "margin_vs_no_adapter": _gain(ours, scores["no_adapter_at_ratio_1"]),
        "margin_vs_full_cache": _gain(ours, scores["full_cache"]),
    }


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = list(dict.fromkeys((r.ratio, r.adapter) for r in rows))
    table = Table(title=f"Answers per compression ratio ({rows[0].press})", show_lines=True)
    table.add_column("question", overflow="fold", max_width=30)
    for ratio, adapter in columns:
        kept = next(r.kept_tokens for r in rows if (r.ratio, r.adapter) == (ratio, adapter))
        label = f"ratio {ratio:g} + adapter" if adapter else f"ratio {ratio:g}"
        table.add_column(f"{label}\n({kept} tokens)", overflow="fold")
    for question in dict.fromkeys(r.question for r in rows):
        cells = {(r.ratio, r.adapter): r for r in rows if r.question == question}
        answers = [cells[k] for k in columns]
        table.add_row(question, *[f"{c.answer}\n[dim]ROUGE-L {c.rouge_l:.2f}[/dim]" for c in answers])
    scores = [column_score(rows, ratio, adapter) for ratio, adapter in columns]
    means = [f"[bold]{s.rouge_l:.2f}\n{s.correct}/{s.total}[/bold]" for s in scores]
    table.add_row("[bold]mean ROUGE-L\nanswers with a reference[/bold]", *means)
    console = Console(file=cast(IO[str], CheckedStdout()), width=160)
    console.print(table)
    if any(r.adapter for r in rows):
        console.print(margin_line(rows), highlight=False, soft_wrap=True)
