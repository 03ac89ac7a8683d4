"""Summary statistics of a run's answers: cells, intervals, the LoRA margin, budgets, routing recall."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from loramem.errors import LoramemError
from loramem.evaluation.config import LIBRARY_SERIES
from loramem.evaluation.metrics import contains, rouge_l_matched, words
from loramem.evaluation.rundir import series
from loramem.evaluation.stats import (
    cluster_bootstrap_mean,
    mean_ci,
    paired_bootstrap,
    paired_cluster_bootstrap,
    paired_t_test,
)
from loramem.text import strip_thinking
from loramem.vocab import LIBRARY_MODES, MERGE_METHODS, MERGE_WEIGHTINGS, METRICS, MODES

CONFIDENCE = 0.95


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undetermined statistic (a single observation) is written as null."""
    return None if math.isnan(x) else round(float(x), 6)


def _order(cond: Condition, presses: list[str], formats: list[str | None]) -> tuple:
    """Presses and formats in the order the run made them, modes in the paper's order, ratios ascending, merges in
    their vocabulary's order."""
    press, ratio, mode, fmt, merge, weights = cond
    merge_order = (
        (MERGE_METHODS.index(merge), MERGE_WEIGHTINGS.index(weights))
        if merge in MERGE_METHODS and weights in MERGE_WEIGHTINGS
        else (-1, -1)  # no merge, or rows written before rows recorded theirs
    )
    mode_order = MODES.index(mode) if mode in MODES else len(MODES)
    return presses.index(press), mode_order, merge_order, formats.index(fmt), ratio


def fill_later_metrics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answers written before a metric existed get it, computed as it is for new answers."""
    for r in rows:
        r.setdefault("contains", contains(r["answer"], r["references"]))
        r.setdefault("rouge_l_matched", rouge_l_matched(strip_thinking(r["answer"]), r["references"]))
    return rows


def summarize(rows: Iterable[dict[str, Any]], n_resamples: int = 10000) -> dict[str, Any]:
    """Per condition: questions and documents, and the mean with a 95% CI of every metric; per adapter condition:
    the paired LoRA margin.

    Questions are nested in documents, so intervals and tests resample documents (cluster bootstrap: `low`/`high`,
    `documents`); the question-level figures, as if questions were independent, stand beside them (`question`:
    Student-t interval; margins' `bootstrap` and `t_test`). A condition's "press" is its series (press, plus the KV
    variant when not plain token eviction). The margin of (press, ratio, mode, format) is mode minus `none` at the
    same press and ratio over the questions answered in both (two-sided p-values).
    """
    # Question order fixes the bootstrap's resamples: sorted, the summary is the same however the answers
    # were interleaved (one process, shards merged, Ray workers); the sort is stable, so presses keep their order.
    rows = sorted(rows, key=lambda r: (r["doc_id"], int(r["question_index"])))
    fill_later_metrics(rows)
    if not rows:
        raise LoramemError("no answers to summarize yet")
    budget_rows = [r for r in rows if r.get("budget_bytes") is not None]
    counts = {
        "n_documents": len({r["doc_id"] for r in rows}),
        "n_questions": len({(r["doc_id"], int(r["question_index"])) for r in rows}),
        "n_answers": len(rows),
    }
    rows = [r for r in rows if r.get("budget_bytes") is None]
    presses = sorted(dict.fromkeys(series(r) for r in rows), key=lambda name: name == LIBRARY_SERIES)  # library last
    formats = list(dict.fromkeys(r["format"] for r in rows))
    by_condition: dict[Condition, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        question = (r["doc_id"], int(r["question_index"]))
        key = (series(r), float(r["ratio"]), r["mode"], r["format"], r.get("merge"), r.get("merge_weights"))
        by_condition[key][question] = r
    conditions = sorted(by_condition, key=lambda c: _order(c, presses, formats))
    # Library modes have no own-document KV: their baseline is the base model with none either (ratio 1.0).
    closed_book = next((c for c in conditions if c[2] == "none" and c[1] == 1.0), None)
    cells, margins = [], []
    for cond in conditions:
        answers = list(by_condition[cond].values())
        cell = _condition_fields(cond)
        cell.update(
            n=len(answers),
            n_questions=len(answers),
            n_documents=len({a["doc_id"] for a in answers}),
            variant=answers[0].get("variant", "token"),
            cache_tokens=round(sum(a["cache_tokens"] for a in answers) / len(answers), 1),
        )
        if all("kv_bytes" in a for a in answers):
            cell["kv_bytes"] = round(sum(a["kv_bytes"] for a in answers) / len(answers), 1)
        cell.update(_costs(answers))
        for metric in METRICS:
            cell[metric] = _interval(answers, metric, n_resamples)
        cells.append(cell)
        versus = closed_book if cond[2] in LIBRARY_MODES else (cond[0], cond[1], "none", None, None, None)
        base = by_condition.get(versus) if versus else None
        if cond[2] != "none" and base:
            margin = _margin(by_condition[cond], base, n_resamples)
            if margin is not None:
                extra = {"versus": versus[0]} if versus and cond[2] in LIBRARY_MODES else {}
                margins.append({**_condition_fields(cond), **extra, **margin})
    summary = {
        **counts,
        "confidence": CONFIDENCE,
        "unit": "document",  # what intervals and tests resample; question-level figures stand beside
        "metrics": list(METRICS),
        "cells": cells,
        "margins": margins,
    }
    routing = routing_recall(rows)
    if routing is not None:
        summary["routing"] = routing
    if budget_rows:
        summary["budget"] = summarize_budget(budget_rows, n_resamples)
    return summary


def summarize_budget(rows: list[dict[str, Any]], n_resamples: int) -> list[dict[str, Any]]:
    """Per budget point (press, storage, budget, adapter rank, format): bytes spent on each memory, tokens kept,
    every metric with its CI, and the paired margin against spending the same budget on KV alone (rank 0)."""
    points: dict[tuple, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        key = (r["press"], r["store"], int(r["budget_bytes"]), int(r["adapter_rank"]), r["mode"], r["format"])
        points[key][(r["doc_id"], int(r["question_index"]))] = r
    result = []
    for key in sorted(points, key=lambda k: (k[:4], str(k[5]))):
        press, store, budget, rank, mode, fmt = key
        answers = list(points[key].values())

        def mean(name: str) -> float:
            return round(sum(a[name] for a in answers) / len(answers), 1)

        point: dict[str, Any] = {
            "press": press,
            "store": store,
            "budget_bytes": budget,
            "adapter_rank": rank,
            "mode": mode,
            "format": fmt,
            "n": len(answers),
            "n_documents": len({a["doc_id"] for a in answers}),
            "adapter_bytes": mean("adapter_bytes"),
            "document_kv_bytes": mean("document_kv_bytes"),
            "total_bytes": mean("total_bytes"),
            "kv_tokens_kept": mean("kv_tokens_kept"),
            "document_tokens": mean("document_tokens"),
            "adapter_share": round(mean("adapter_bytes") / budget, 4),
            **_costs(answers),
        }
        for metric in METRICS:
            point[metric] = _interval(answers, metric, n_resamples)
        kv_only = points.get((press, store, budget, 0, "none", None))
        if rank and kv_only:
            point["versus_kv_only"] = _margin(points[key], kv_only, n_resamples)
        result.append(point)
    return result


def routing_recall(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """How often routing found the question's own document: first (recall@1) or among the top k (recall@k), over
    the questions that library modes answered (every library answer of a question carries the same routing)."""
    routed: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if "gold_rank" in r:
            routed.setdefault((r["doc_id"], int(r["question_index"])), r)
    if not routed:
        return None
    ranks = [r["gold_rank"] for r in routed.values()]
    return {
        "k": max(len(r["routed"]) for r in routed.values()),
        "n": len(ranks),
        "recall_at_1": round(sum(rank == 1 for rank in ranks) / len(ranks), 6),
        "recall_at_k": round(sum(rank is not None for rank in ranks) / len(ranks), 6),
    }


def _condition_fields(cond: Condition) -> dict[str, Any]:
    """A condition as a cell's fields; a merge and its weighting only where the mode merges."""
    fields = dict(zip(("press", "ratio", "mode", "format", "merge", "merge_weights"), cond))
    if fields["merge"] is None:
        del fields["merge"], fields["merge_weights"]
    return fields


def _costs(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean seconds per answer (its share of its batch's decoding; library rows add `setup_seconds`, their merge
    and context prefill), and mean answer and reference lengths in words (a question's references averaged), so
    a score is read beside the length it was made at."""

    def mean(values: list[float], places: int) -> float:
        return round(sum(values) / len(values), places)

    costs = {
        "seconds": mean([a["seconds"] for a in answers], 4),
        "answer_words": mean([words(a["answer"]) for a in answers], 2),
        "reference_words": mean([mean([words(r) for r in a["references"]], 6) for a in answers], 2),
    }
    if all("setup_seconds" in a for a in answers):
        costs["setup_seconds"] = mean([a["setup_seconds"] for a in answers], 4)
    return costs


def _interval(answers: list[dict[str, Any]], metric: str, n_resamples: int) -> dict[str, Any]:
    """Mean with the document-clustered bootstrap interval, and the question-level t interval beside it."""
    values = [a[metric] for a in answers]
    mean, low, high = cluster_bootstrap_mean(
        values, [a["doc_id"] for a in answers], n_resamples=n_resamples, confidence=CONFIDENCE
    )
    _, q_low, q_high = mean_ci(values, CONFIDENCE)
    return {
        "mean": _finite(mean),
        "low": _finite(low),
        "high": _finite(high),
        "question": {"low": _finite(q_low), "high": _finite(q_high)},
    }


def _margin(
    adapted: dict[tuple[str, int], dict[str, Any]], base: dict[tuple[str, int], dict[str, Any]], n_resamples: int
) -> dict[str, Any] | None:
    """Adapter minus base per metric over the questions both answered; None when they share none. `documents`
    resamples documents (the test to read); `bootstrap` and `t_test` treat questions as independent."""
    shared = [q for q in adapted if q in base]
    if not shared:
        return None
    docs = [doc for doc, _ in shared]
    result: dict[str, Any] = {"n": len(shared), "n_questions": len(shared), "n_documents": len(set(docs))}
    for metric in METRICS:
        a, b = [base[q][metric] for q in shared], [adapted[q][metric] for q in shared]
        clustered = paired_cluster_bootstrap(a, b, docs, n_resamples=n_resamples, confidence=CONFIDENCE)
        boot = paired_bootstrap(a, b, n_resamples=n_resamples, confidence=CONFIDENCE)
        t = paired_t_test(a, b, confidence=CONFIDENCE)
        result[metric] = {
            "diff": _finite(boot["diff"]),
            "documents": {k: _finite(clustered[k]) for k in ("low", "high", "p_value")},
            "bootstrap": {k: _finite(boot[k]) for k in ("low", "high", "p_value")},
            "t_test": {k: _finite(t[k]) for k in ("low", "high", "p_value")},
        }
    return result


# (series, ratio, mode, format, merge, merge weighting): one point of a curve
Condition = tuple[str, float, str, "str | None", "str | None", "str | None"]
