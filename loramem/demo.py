"""demo: the whole pipeline on the example document, as one table of answers per ratio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramem.errors import LoramemError
from loramem.evaluation.metrics import rouge_l
from loramem.fileio import CheckedStdout
from loramem.kv.compress import compress
from loramem.kv.encode import encode
from loramem.log import log, progress_bar
from loramem.model.generate import generate
from loramem.model.loading import LoadedModel

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "demo"


def load_example(folder: Path = EXAMPLE_DIR) -> tuple[str, list[dict[str, Any]]]:
    doc, questions = folder / "lighthouse.txt", folder / "questions.jsonl"
    if not doc.exists() or not questions.exists():
        raise LoramemError(f"example files not found in {folder}; run the demo from a loramem checkout")
    qa = [json.loads(line) for line in questions.read_text().splitlines() if line.strip()]
    return doc.read_text(), qa


def run_demo(lm: LoadedModel, ratios: list[float], press: str) -> list[dict[str, Any]]:
    """Encode once, compress per ratio from the recorded scores, answer every question."""
    document, qa = load_example()
    cache = encode(lm, document, presses=[press])
    log(f"encoded the example document: {cache.n_tokens} tokens in {cache.meta['prefill_seconds']:.1f} s")
    rows = []
    with progress_bar("answering", len(ratios) * len(qa)) as advance:
        for ratio in ratios:
            small = compress(cache, press, ratio=ratio)
            for item in qa:
                answer = generate(lm, item["question"], small, max_new_tokens=32)
                rows.append(
                    {
                        "ratio": ratio,
                        "press": press,
                        "kept_tokens": answer.cache_tokens,
                        "question": item["question"],
                        "answer": answer.answer,
                        "rouge_l": round(rouge_l(answer.answer, item["answers"]), 3),
                    }
                )
                advance()
    return rows


def print_table(rows: list[dict[str, Any]], ratios: list[float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Answers per compression ratio ({rows[0]['press']})", show_lines=True)
    table.add_column("question", overflow="fold", max_width=34)
    for ratio in ratios:
        kept = next(r["kept_tokens"] for r in rows if r["ratio"] == ratio)
        table.add_column(f"ratio {ratio:g}\n({kept} tokens)", overflow="fold")
    for question in dict.fromkeys(r["question"] for r in rows):
        cells = [r for r in rows if r["question"] == question]
        table.add_row(question, *[f"{c['answer']}\n[dim]ROUGE-L {c['rouge_l']:.2f}[/dim]" for c in cells])
    means = [
        sum(r["rouge_l"] for r in rows if r["ratio"] == ratio) / max(1, sum(r["ratio"] == ratio for r in rows))
        for ratio in ratios
    ]
    table.add_row("[bold]mean ROUGE-L[/bold]", *[f"[bold]{m:.2f}[/bold]" for m in means])
    Console(file=CheckedStdout(), width=160).print(table)
