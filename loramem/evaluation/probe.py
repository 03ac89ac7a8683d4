"""probe capacity: how many invented facts a LoRA of a given rank stores (PhoneBook-style), and where it saturates.

For each fact-set size, a seeded phone book of invented people and invented numbers is generated;
for each rank an adapter is trained on "What is NAME's phone number?" -> "NUMBER" (QA format, closed
book, as train-adapter trains) and then asked every trained question closed-book. Recall is exact
match of the number. A rank's saturation point is the largest size it still recalls at or above
`threshold`; facts stored per trainable parameter show where capacity is used best (the second seed
study reports low ranks, 4-16, as the most parameter-efficient).
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramem.adapters.attach import attach_adapter, detach_adapter
from loramem.adapters.train import train_adapter
from loramem.answer import answer_batch
from loramem.data.fiction import Names
from loramem.errors import LoramemError
from loramem.fileio import atomic_write_bytes
from loramem.model.loading import LoadedModel
from loramem.specs import ProbeSpec

RESULTS, PLOT = "capacity.json", "capacity.png"


def phonebook(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (question, answer) pairs: invented full names, each with a distinct invented 7-digit number."""
    rng = random.Random(seed)
    names = Names(rng)
    numbers: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        number = f"{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
        if number in numbers:
            continue
        numbers.add(number)
        pairs.append((f"What is {names.person()}'s phone number?", number))
    return pairs


def recall(lm: LoadedModel, pairs: list[tuple[str, str]]) -> float:
    """Share of questions answered with exactly the number (closed book, adapter on), asked in batches."""
    replies = answer_batch(lm, [q for q, _ in pairs], None, max_new_tokens=12, adapter_on=True)
    return sum(reply.answer.strip() == a for reply, (_, a) in zip(replies, pairs)) / len(pairs)


def run_probe(
    lm: LoadedModel, config: ProbeSpec, out_dir: str | Path, on_step: Callable[[str], None] = lambda text: None
) -> dict[str, Any]:
    """Train and test one adapter per (rank, size); write capacity.json and capacity.png into out_dir."""
    out = Path(out_dir)
    try:
        (out / "adapters").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoramemError(f"cannot create {out}: {exc.strerror}") from exc
    books = {n: phonebook(n, config.train.seed) for n in config.facts}
    rows = []
    for rank in config.ranks:
        for n in config.facts:
            on_step(f"rank {rank}, {n} facts: training")
            path = out / "adapters" / f"r{rank}-n{n}"
            started = time.perf_counter()
            summary = train_adapter(
                lm, "\n".join(f"{q} {a}" for q, a in books[n]), books[n], path, config.train_spec(rank), force=True
            )
            train_s = time.perf_counter() - started
            attach_adapter(lm, path)
            try:
                on_step(f"rank {rank}, {n} facts: asking")
                share = recall(lm, books[n])
            finally:
                detach_adapter(lm)
            params = summary["trainable_parameters"]
            rows.append(
                {
                    "rank": rank,
                    "facts": n,
                    "trainable_parameters": params,
                    "recall": round(share, 4),
                    "facts_stored": round(share * n, 1),
                    "facts_per_million_parameters": round(share * n / params * 1e6, 3),
                    "final_loss": summary["final_loss"],
                    "train_seconds": round(train_s, 1),
                }
            )
    result = {"config": config.model_dump(), "model": lm.model_id, "rows": rows, "saturation": saturation(rows, config)}
    atomic_write_bytes(out / RESULTS, (json.dumps(result, indent=2) + "\n").encode())
    plot(result, out / PLOT)
    return result


def saturation(rows: list[dict[str, Any]], config: ProbeSpec) -> list[dict[str, Any]]:
    """Per rank: the largest size still recalled at >= threshold (None: not even the smallest) and the most stored."""
    found = []
    for rank in config.ranks:
        mine = [r for r in rows if r["rank"] == rank]
        held = [r["facts"] for r in mine if r["recall"] >= config.threshold]
        found.append(
            {
                "rank": rank,
                "saturation_facts": max(held) if held else None,
                "max_facts_stored": max(r["facts_stored"] for r in mine),
            }
        )
    return found


def plot(result: dict[str, Any], path: Path) -> None:
    """Recall against the number of facts, one line per rank (log x)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for rank in result["config"]["ranks"]:
        mine = [r for r in result["rows"] if r["rank"] == rank]
        ax.plot([r["facts"] for r in mine], [r["recall"] for r in mine], marker="o", label=f"rank {rank}")
    ax.axhline(result["config"]["threshold"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("facts trained (invented phone numbers)")
    ax.set_ylabel("exact-match recall")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(
        f"LoRA capacity · {result['model']} · targets {result['config']['train']['targets']}", fontsize="medium"
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
