"""Redraw a run's report from its files: summary.json, the plots and the table; never loads the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramem.evaluation.plots import plot, plot_budget, plot_bytes, plot_library
from loramem.evaluation.rundir import (
    ANSWERS,
    BUDGET_PLOT,
    BUDGET_PLOT_CONTAINS,
    BYTES_PLOT,
    CONFIG,
    CURVES,
    CURVES_CONTAINS,
    FAILURES,
    LIBRARY_PLOT,
    SUMMARY,
    read_answers,
    read_json,
)
from loramem.evaluation.summary import summarize
from loramem.fileio import atomic_write_bytes


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Summarize a run's answers into summary.json and its plots (curves.png; library.png for library modes);
    returns the summary."""
    run = Path(run_dir)
    header = read_json(run / CONFIG, "start one with `loramem eval DATA --out RUN_DIR`")
    summary = summarize(read_answers(run / ANSWERS))
    expected = sum(header.get("documents", {}).values())
    failed = json.loads((run / FAILURES).read_text()) if (run / FAILURES).exists() else []
    summary["n_cells_planned"] = expected
    summary["complete"] = summary["n_answers"] >= expected and not failed
    summary["failed"] = failed
    summary["n_failed_cells"] = sum(f["cells"] for f in failed)
    summary["model"] = header.get("model", {}).get("id")
    summary["dataset"] = header.get("dataset", {}).get("path")
    atomic_write_bytes(run / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    if summary["cells"]:
        plot(summary, run / CURVES)
        plot(summary, run / CURVES_CONTAINS, metric="contains")
    if len({c["variant"] for c in summary["cells"]}) > 1:
        plot_bytes(summary, run / BYTES_PLOT)
    plot_library(summary, run / LIBRARY_PLOT)
    if summary.get("budget"):
        plot_budget(summary, run / BUDGET_PLOT)
        plot_budget(summary, run / BUDGET_PLOT_CONTAINS, metric="contains")
    return summary
