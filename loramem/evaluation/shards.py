"""Combining shard runs of one config into one run folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loramem.errors import LoramemError
from loramem.evaluation.report import write_report
from loramem.evaluation.rundir import ANSWERS, CONFIG, cell_key, check_same, read_answers, read_json, writes_run
from loramem.fileio import atomic_write_bytes
from loramem.log import warn


@writes_run("out_dir")
def merge(run_dirs: Sequence[str | Path], out_dir: str | Path, *, allow_mixed: bool = False) -> dict[str, Any]:
    """Combine shard runs of one config into a new run directory (answers deduplicated by cell) and summarize it.
    Shards answered in other precisions or on other devices are refused unless `allow_mixed`.

    The merged config.json covers the whole dataset (shard 0/1), so `--resume` on it fills any gap.
    """
    if not run_dirs:
        raise LoramemError("give at least one run directory to merge")
    dirs = [Path(d) for d in run_dirs]
    headers = [read_json(d / CONFIG, "cannot merge it") for d in dirs]
    for where, header in zip(dirs[1:], headers[1:]):
        check_same(headers[0], header, where, f"merge it with {dirs[0]}", ignore=("shard",), allow_mixed=allow_mixed)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoramemError(f"{out} is not empty; merge into a new directory")
    rows: dict[tuple, dict[str, Any]] = {}
    for where in dirs:
        for row in read_answers(where / ANSWERS):
            rows.setdefault(cell_key(row), row)
    documents: dict[str, int] = {}
    for header in headers:
        documents.update(header["documents"])
    shards = {tuple(h["config"]["shard"]) for h in headers}
    if len({n for _, n in shards}) != 1 or len(shards) != next(iter(shards))[1]:
        warn(
            f"the merged runs are shards {', '.join(f'{i}/{n}' for i, n in sorted(shards))}, not all of one "
            "split; the merge covers only their documents"
        )
    merged = {
        **headers[0],
        "config": {**headers[0]["config"], "shard": [0, 1]},
        "documents": documents,
        "merged_from": [str(d.resolve()) for d in dirs],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoramemError(f"cannot create {out}: {exc.strerror}") from exc
    atomic_write_bytes(out / CONFIG, (json.dumps(merged, indent=2) + "\n").encode())
    atomic_write_bytes(out / ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()).encode())
    return write_report(out)
