"""Runs side by side: an ablation is one run per setting (`--targets attn`, `--layers first-half`), and its reader
needs their cells in one table and one plot, each run named by the settings in which it differs from the others.

Each run's figures are its own summary's (recomputed from its answers, nothing written there): the intervals and
the margins against its own base rows, so a comparison never pairs answers across runs. A run's base rows are
shown once: they are left out where an earlier run's base rows have the same figures (the same questions asked
the same way give the same answers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramem.errors import LoramemError
from loramem.evaluation.plots import merge_label, series_label
from loramem.evaluation.rundir import ANSWERS, CONFIG, read_answers, read_json
from loramem.evaluation.summary import summarize
from loramem.fileio import check_output_path
from loramem.specs import EvalSpec
from loramem.specs.base import flag_of, flatten

# Where a run's documents and adapters came from, and the grid's axes (its rows and columns show those): not labels.
IGNORED = ("shard", "adapters", "presses", "ratios", "modes", "formats", "granularities", "store_dtypes")


@dataclass
class Compared:
    """One run of a comparison: its folder, its label (the settings where it differs) and its summary."""

    run: Path
    label: str
    summary: dict[str, Any]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_plot_path(path: Path, runs: list[Path]) -> None:
    """Refuse a --plot target before any work: a missing folder, a run folder, a file that is not a PNG."""
    check_output_path(path, force=True, what="plot", inputs=runs, ours=_is_png)


def _is_png(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def differing_settings(configs: list[dict[str, Any]]) -> list[str]:
    """The dotted setting names (train.targets) whose values are not the same in every config."""
    flat = [flatten(c) for c in configs]
    names = dict.fromkeys(name for f in flat for name in f)
    return [n for n in names if n.split(".")[0] not in IGNORED and len({repr(f.get(n)) for f in flat}) > 1]


def _label(config: dict[str, Any], names: list[str], run: Path) -> str:
    flat = flatten(config)
    parts = [f"{flag_of(EvalSpec, tuple(n.split('.')))} {_shown(flat.get(n))}" for n in names]
    return "; ".join(parts) if parts else run.name


def _shown(value: Any) -> str:
    if value is None:
        return "(default)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def compare_runs(runs: list[Path]) -> list[Compared]:
    """Each run with its label and its summary; two runs at least, each an eval run folder with answers."""
    if len(runs) < 2:
        raise LoramemError("give two run folders or more to compare")
    if len(set(map(Path.resolve, runs))) < len(runs):
        raise LoramemError("a run folder is given twice")
    configs = [  # as today's record, so that a run of an older record version or defaults compares setting by setting
        EvalSpec.from_record(
            read_json(run / CONFIG, "start one with `loramem eval DATA --out RUN_DIR`")["config"]
        ).record()
        for run in runs
    ]
    names = differing_settings(configs)
    compared = []
    for run, config in zip(runs, configs):
        rows = read_answers(run / ANSWERS)
        if not rows:
            raise LoramemError(f"{run} has no answers yet")
        compared.append(Compared(run, _label(config, names, run), summarize(rows)))
    return compared


@dataclass
class Row:
    """One line of the comparison: a run's mode/format (and merge) of one press, its cells in ratio order, and the
    run's own paired margin at each ratio (None for base rows)."""

    run: str
    series: str
    cells: list[dict[str, Any]]
    margins: dict[float, dict[str, Any]]


def comparison_rows(compared: list[Compared]) -> list[Row]:
    """The rows of every run, press and mode/format (the press named where the runs have several); a run's base
    rows are left out where an earlier run's have the same figures at the same press."""
    presses = list(dict.fromkeys(c["press"] for item in compared for c in item.summary["cells"]))
    shown: list[tuple[Any, ...]] = []
    rows = []
    for item in compared:
        lines: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for cell in item.summary["cells"]:
            lines.setdefault((cell["press"], cell["mode"], cell["format"], merge_label(cell)), []).append(cell)
        margins = {(m["press"], m["ratio"], m["mode"], m["format"], merge_label(m)): m for m in item.summary["margins"]}
        for (press, mode, fmt, merge), cells in lines.items():
            cells.sort(key=lambda c: c["ratio"])
            if mode == "none":
                figures = (press, *((c["ratio"], c["n"], c["rouge_l"]["mean"], c["contains"]["mean"]) for c in cells))
                if figures in shown:
                    continue
                shown.append(figures)
            paired = {
                c["ratio"]: margins[key] for c in cells if (key := (press, c["ratio"], mode, fmt, merge)) in margins
            }
            series = series_label(mode, fmt, merge)
            rows.append(Row(item.label, f"{press} · {series}" if len(presses) > 1 else series, cells, paired))
    return rows
