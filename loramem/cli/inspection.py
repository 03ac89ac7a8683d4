"""inspect: what caches and adapters hold, a cache's kept-token map, and comparisons of two caches of one document
or of several adapters. Reads the files only: no model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import JsonOpt, print_json, stdout_console
from loramem.cli.specopts import FROM_SPEC, with_specs
from loramem.errors import LoramemError
from loramem.log import log
from loramem.specs import InspectSpec


def _summary(info: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    hidden = {"kept_per_layer", "kept_per_head", "history", "update_norms"}
    for key, value in info.items():
        if key in hidden or value is None:
            continue
        if key.endswith("bytes") and isinstance(value, int):
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value) if value else "-"
        table.add_row(key.replace("_", " "), str(value).replace("\n", " "))
    stdout_console().print(table)


def _read_cache(artifact: str) -> tuple[Any, int]:
    from loramem.kv.cache import KVCache
    from loramem.tensorfile import read_safetensors

    data, source = read_safetensors(artifact, what="cache")
    return KVCache.from_bytes(data, source), len(data)


def _name(artifact: str) -> str:
    return "stdin" if artifact == "-" else artifact


def _adapters(paths: list[str], as_json: bool, plot: Path | None) -> None:
    from loramem.inspection import plots, show
    from loramem.inspection.updates import compare_adapters, norm_table, read_updates

    updates = [read_updates(p) for p in paths]
    if len(paths) == 1:
        from loramem.describe import describe_adapter

        info = {**describe_adapter(paths[0]), "update_norms": norm_table(updates[0])}
        if plot is not None:
            plots.plot_norms(info["update_norms"], plot, Path(paths[0]).name)
        if as_json:
            print_json(info)
        else:
            _summary(info)
            show.show_norms(stdout_console(), info["update_norms"])
    else:
        result = compare_adapters(updates)
        if plot is not None:
            plots.plot_adapter_comparison(result, plot)
        if as_json:
            print_json(result)
        else:
            show.show_adapter_comparison(stdout_console(), result)
    if plot is not None:
        log(f"plot -> {plot}")


def _two_caches(artifacts: list[str], as_json: bool, plot: Path | None) -> None:
    from loramem.inspection import plots, show
    from loramem.inspection.kept import compare_caches

    (a, _), (b, _) = (_read_cache(x) for x in artifacts)
    comparison = compare_caches(a, b, (_name(artifacts[0]), _name(artifacts[1])))
    if plot is not None:
        plots.plot_comparison(comparison, plot)
    if as_json:
        print_json(comparison.to_json())
    else:
        show.show_comparison(stdout_console(), comparison)


def _one_cache(artifact: str, spec: InspectSpec, as_json: bool, plot: Path | None) -> None:
    """The summary, or the kept-token map when one is asked for; a --plot draws the map either way."""
    from loramem.inspection import plots, show
    from loramem.inspection.kept import kept_map

    cache, nbytes = _read_cache(artifact)
    mapped = spec.mapped
    kept = kept_map(cache, spec) if mapped or plot is not None else None
    if kept is not None and plot is not None:
        plots.plot_kept(kept, plot, Path(_name(artifact)).name)
    if kept is not None and mapped:
        if as_json:
            print_json(kept.to_json())
        else:
            show.show_kept(stdout_console(), kept, spec.max_tokens)
        return
    from loramem.describe import describe_cache

    info = describe_cache(cache, nbytes=nbytes)
    if as_json:
        print_json(info)
    else:
        _summary(info)


@app.command()
@with_specs(spec=InspectSpec)
def inspect(
    artifacts: list[str] = typer.Argument(
        ...,
        metavar="ARTIFACT",
        help="A cache .safetensors (- for stdin) or an adapter directory (its update norms per layer and module); "
        "two caches of one document, or several adapters, are compared",
    ),
    as_json: bool = JsonOpt,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the kept map or the comparison as this PNG"),
    spec: InspectSpec = FROM_SPEC,
) -> None:
    """Show what a cache or adapter holds, map a cache's kept tokens (--kept), compare two caches or adapters."""
    if artifacts.count("-") > 1:
        raise LoramemError("stdin can carry one cache, not several")
    folders = [a for a in artifacts if a != "-" and Path(a).is_dir()]
    mapped = spec.mapped
    if folders:
        if len(folders) != len(artifacts):
            raise LoramemError("give caches or adapter directories to inspect, not both")
        if mapped:
            raise LoramemError("--kept, --layer and --head map a cache's kept tokens; an adapter has none")
        return _adapters(folders, as_json, plot)
    if len(artifacts) > 2:
        raise LoramemError("compare two caches at a time (several adapters compare at once)")
    if len(artifacts) == 2 and mapped:
        raise LoramemError("--kept, --layer and --head map one cache; two caches are compared whole")
    if len(artifacts) == 2:
        _two_caches(artifacts, as_json, plot)
    else:
        _one_cache(artifacts[0], spec, as_json, plot)
    if plot is not None:
        log(f"plot -> {plot}")
