"""probe capacity: how many invented facts a LoRA of a given rank stores (PhoneBook-style), and where it saturates.

For each fact-set size, a seeded phone book of invented people and invented numbers is generated;
for each rank an adapter is trained on "What is NAME's phone number?" -> "NUMBER" (QA format, closed
book, as train-adapter trains) until its loss stops falling (`adapters.train.Plateau`; the epochs are the cap),
and then asked every trained question closed-book. Recall is exact match of the number. A fixed epoch count
cannot tell capacity from optimisation: a larger adapter that trained worse in 10 epochs looks as if it held less.

The grid is walked size by size, smallest first, every rank at one size before the next; a rank tries no larger
size once one is recalled below `stop_below`. A rank's saturation point is the largest size it still recalls at or
above `threshold`; facts stored per trainable parameter show where capacity is used best (the second seed study
reports low ranks, 4-16, as the most parameter-efficient).

The output folder is the study: config.json holds what decides a point's result (model, training, stopping rule),
points.jsonl one line per finished (rank, size), appended as each finishes; a rerun skips finished points, so a
study can be resumed or continued with more ranks or sizes, and refuses a folder trained otherwise.
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from loramem._version import __version__
from loramem.adapters.attach import attach_adapter, detach_adapter
from loramem.adapters.train import Plateau, train_adapter
from loramem.answer import answer_batch
from loramem.data.fiction import Names
from loramem.errors import LoramemError
from loramem.evaluation.rundir import AnswerLog, output_folder, read_lines
from loramem.fileio import atomic_write_bytes, locked_folder
from loramem.model.loading import LoadedModel
from loramem.specs import ProbeSpec
from loramem.specs.base import flatten

RESULTS, PLOT, CONFIG, POINTS = "capacity.json", "capacity.png", "config.json", "points.jsonl"


class Point(BaseModel):
    """One line of points.jsonl: a trained and asked (rank, size)."""

    model_config = ConfigDict(extra="forbid")

    rank: int
    facts: int
    trainable_parameters: int
    recall: float
    facts_stored: float
    facts_per_million_parameters: float
    final_loss: float
    steps: int
    epochs: float
    converged: bool  # the loss stopped falling before the epoch cap
    train_seconds: float


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
    lm: LoadedModel,
    config: ProbeSpec,
    out_dir: str | Path,
    on_step: Callable[[str], None] = lambda text: None,
    *,
    keep_adapters: bool = False,
    train: bool = True,
) -> dict[str, Any]:
    """Train and test the points of the grid not yet in out_dir, appending each to points.jsonl and rewriting
    capacity.json and capacity.png after each; returns capacity.json's content. `keep_adapters` keeps each
    point's adapter in out_dir/adapters (each is deleted once asked otherwise: they are large); without `train`
    only the points there are read and reported (a study stopped early, or shards' points.jsonl put together)."""
    out = Path(out_dir)
    if not train and not out.is_file() and not (out / CONFIG).is_file():
        raise LoramemError(f"{out} is not a probe study (no {CONFIG}); nothing to report")
    output_folder(out, "a folder")
    with locked_folder(out, "probe folder", committed=CONFIG, wait=False):
        points = open_study(out, _header(lm, config))
        log = AnswerLog(out / POINTS)
        try:
            for n in config.facts:
                book = phonebook(n, config.train.seed)
                for rank in config.ranks:
                    if train and growing(points, rank, n, config.stop_below):
                        on_step(f"rank {rank}, {n} facts")
                        row = probe_point(lm, config, rank, book, out, keep_adapters)
                        log.write(row)
                        points.append(row)
                        write_results(out, lm.model_id, config, points)
                    on_step("")
        finally:
            log.close()
        return write_results(out, lm.model_id, config, points)


def _header(lm: LoadedModel, config: ProbeSpec) -> dict[str, Any]:
    return {
        "loramem_version": __version__,
        "model": {"id": lm.model_id, **lm.fingerprint},
        "settings": json.loads(json.dumps(config.point_settings())),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def open_study(out: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The points already in a study folder whose config.json matches `header` (a new folder gets it written);
    a folder whose points were trained otherwise is refused, naming the settings that differ."""
    config = out / CONFIG
    if not config.exists():
        if (out / POINTS).exists():
            raise LoramemError(f"{out} has {POINTS} but no {CONFIG}; it is not a probe folder loramem wrote")
        atomic_write_bytes(config, (json.dumps(header, indent=2) + "\n").encode())
        return []
    try:
        old = json.loads(config.read_text())
        recorded = {"model": old["model"], "settings": old["settings"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LoramemError(f"{config} is not a probe study's config ({exc})") from None
    was, now = flatten(recorded), flatten({"model": header["model"], "settings": header["settings"]})
    differ = [
        f"{key}: {was.get(key)!r} there, {now.get(key)!r} now" for key in was | now if was.get(key) != now.get(key)
    ]
    if differ:
        raise LoramemError(f"{out} holds points trained otherwise ({'; '.join(sorted(differ))}); choose another --out")
    return read_lines(out / POINTS, "probe point", Point.model_validate, repair=True)


def growing(points: list[dict[str, Any]], rank: int, n: int, stop_below: float) -> bool:
    """Whether (rank, n) is still to train: not done, and no smaller size at this rank recalled below stop_below."""
    mine = [p for p in points if p["rank"] == rank]
    return all(p["facts"] != n for p in mine) and all(p["recall"] >= stop_below for p in mine if p["facts"] < n)


def probe_point(
    lm: LoadedModel, config: ProbeSpec, rank: int, book: list[tuple[str, str]], out: Path, keep: bool
) -> dict[str, Any]:
    """Train one rank on one phone book until its loss stops falling, ask it every number: a points.jsonl line."""
    spec, n = config.train_spec(rank), len(book)
    stop = Plateau(config.patience, config.min_delta, config.loss_floor)
    with tempfile.TemporaryDirectory(prefix="loramem-probe-") as scratch:
        path = out / "adapters" / f"r{rank}-n{n}" if keep else Path(scratch) / "adapter"
        path.parent.mkdir(exist_ok=True)
        document = "\n".join(f"{q} {a}" for q, a in book)
        summary = train_adapter(lm, document, book, path, spec, force=True, stop=stop)
        attach_adapter(lm, path)
        try:
            share = recall(lm, book)
        finally:
            detach_adapter(lm)
    params = summary["trainable_parameters"]
    return Point(
        rank=rank,
        facts=n,
        trainable_parameters=params,
        recall=round(share, 4),
        facts_stored=round(share * n, 1),
        facts_per_million_parameters=round(share * n / params * 1e6, 3),
        final_loss=summary["final_loss"],
        steps=summary["steps"],
        epochs=round(summary["steps"] / math.ceil(n / spec.batch_size), 2),
        converged=summary["stopped_early"],
        train_seconds=round(summary["seconds"], 1),
    ).model_dump()


def write_results(out: Path, model_id: str, config: ProbeSpec, points: list[dict[str, Any]]) -> dict[str, Any]:
    """capacity.json (every point in the folder, and each rank's saturation) and capacity.png."""
    rows = sorted(points, key=lambda p: (p["rank"], p["facts"]))
    result = {
        "config": config.model_dump(),
        "model": model_id,
        "rows": rows,
        "saturation": saturation(rows, config.threshold, config.stop_below),
    }
    atomic_write_bytes(out / RESULTS, (json.dumps(result, indent=2) + "\n").encode())
    plot(result, out / PLOT)
    return result


def saturation(rows: list[dict[str, Any]], threshold: float, stop_below: float) -> list[dict[str, Any]]:
    """Per rank: the largest size still recalled at >= threshold (None: not even the smallest tried), those facts
    per million trainable parameters, the most facts stored, and the smallest size recalled below stop_below (None:
    the rank held every size tried, so its walk is not finished)."""
    found = []
    for rank in sorted({r["rank"] for r in rows}):
        mine = [r for r in rows if r["rank"] == rank]
        held = [r["facts"] for r in mine if r["recall"] >= threshold]
        below = [r["facts"] for r in mine if r["recall"] < stop_below]
        params = mine[0]["trainable_parameters"]
        found.append(
            {
                "rank": rank,
                "trainable_parameters": params,
                "saturation_facts": max(held) if held else None,
                "saturation_facts_per_million_parameters": round(max(held) / params * 1e6, 3) if held else None,
                "max_facts_stored": max(r["facts_stored"] for r in mine),
                "collapsed_at": min(below) if below else None,
            }
        )
    return found


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: recall against the number of facts, one line per rank (log x). Right: each rank's saturation point
    (hollow where the rank held every size tried: a lower bound) and its facts per million parameters."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    curves, points = fig.subplots(1, 2)
    for s in result["saturation"]:
        mine = [r for r in result["rows"] if r["rank"] == s["rank"]]
        curves.plot([r["facts"] for r in mine], [r["recall"] for r in mine], marker="o", label=f"rank {s['rank']}")
    curves.axhline(result["config"]["threshold"], color="grey", linestyle=":", linewidth=1)
    curves.set_xscale("log", base=2)
    curves.set_xlabel("facts trained (invented phone numbers)")
    curves.set_ylabel("exact-match recall")
    curves.set_ylim(-0.02, 1.02)
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")
    held = [s for s in result["saturation"] if s["saturation_facts"]]
    points.set_xlabel("LoRA rank")
    points.set_ylabel(f"saturation point: most facts at recall >= {result['config']['threshold']:g}", color="C0")
    points.grid(alpha=0.3)
    if not held:
        points.text(0.5, 0.5, "no rank held any size", ha="center", transform=points.transAxes)
    else:
        points.plot([s["rank"] for s in held], [s["saturation_facts"] for s in held], color="C0")
        for s in held:  # hollow: the rank held every size tried, so its saturation point is only a lower bound
            face = "C0" if s["collapsed_at"] else "white"
            points.plot(s["rank"], s["saturation_facts"], marker="o", color="C0", markerfacecolor=face)
        points.set_xscale("log", base=2)
        points.set_yscale("log", base=2)
        per_param = points.twinx()
        per_param.plot(
            [s["rank"] for s in held],
            [s["saturation_facts_per_million_parameters"] for s in held],
            marker="s",
            linestyle="--",
            color="C3",
        )
        per_param.set_yscale("log")
        per_param.set_ylabel("facts per million trainable parameters at saturation", color="C3")
    fig.suptitle(
        f"LoRA capacity · {result['model']} · targets {result['config']['train']['targets']}", fontsize="medium"
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
