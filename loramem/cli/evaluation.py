"""eval (run, merge, report): the paper's experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from loramem.cli.app import PARTIAL_EXIT, app
from loramem.cli.options import JsonOpt, print_json, stdout_console
from loramem.cli.specopts import FROM_SPEC, Use, named_as_flags, with_specs
from loramem.errors import LoramemError
from loramem.evaluation.config import read_config_file
from loramem.fileio import write_stdout
from loramem.log import log
from loramem.memory import load
from loramem.specs import EvalSpec, ModelSpec
from loramem.specs.base import flatten, merged
from loramem.specs.eval import RaySpec
from loramem.vocab import METRICS


class _EvalGroup(TyperGroup):
    """`loramem eval DATA ...` runs an evaluation; `eval merge` and `eval report` are the other subcommands."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """`eval --help` is run's help (the settings), which names the other subcommands."""
        if args and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_EvalGroup,
    no_args_is_help=True,
    help="The paper's experiment over a dataset: `loramem eval DATA --out RUN_DIR ...`, "
    "`loramem eval merge RUN_DIR... -o OUT`, `loramem eval report RUN_DIR`.",
)
app.add_typer(eval_app, name="eval")


AllowMixedOpt = typer.Option(
    False,
    "--allow-mixed",
    help="Combine answers made in another precision (dtype) or on another kind of device; each answer keeps its "
    "runtime",
)


@eval_app.command("run", epilog="Also: loramem eval merge RUN_DIR... -o OUT; loramem eval report RUN_DIR.")
@with_specs(
    settings=Use(EvalSpec, exclude=frozenset({("train", "format")}), given=True),
    workers=RaySpec,
    model=Use(ModelSpec, given=True),
)
def eval_run(
    dataset: Optional[str] = typer.Argument(
        None, metavar="DATA", help="Dataset JSONL (see `loramem data`); with --resume, the run's own by default"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: answers.jsonl, summary.json, curves.png"),
    config_file: Optional[Path] = typer.Option(
        None,
        "--config",
        help='TOML file of eval settings: EvalSpec\'s fields (ratios = [0, 0.5], presses = "snapkv", a train '
        "table for the adapters); flags given as well override it",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out with the settings, dataset and model it recorded; "
        "settings given again must agree (--limit may change)",
    ),
    allow_mixed: bool = AllowMixedOpt,
    settings: dict[str, Any] = FROM_SPEC,
    workers: RaySpec = FROM_SPEC,
    model: dict[str, Any] = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Answer every question under every press, ratio, mode and format; score, summarize and plot."""
    from loramem.evaluation.rundir import run_settings
    from loramem.evaluation.runner import run_eval

    from_file = read_config_file(config_file) if config_file else {}
    in_file = set(flatten(from_file)) - set(flatten(settings))
    with named_as_flags(EvalSpec, in_file=in_file, file=config_file):
        run = run_settings(out, dataset, merged(from_file, settings), resume=resume)
    recorded = {"model": run.model, "chat_template_kwargs": run.chat_template_kwargs}
    loading = ModelSpec.parse({**{k: v for k, v in recorded.items() if v is not None}, **model})
    if workers.address is not None:
        from loramem.evaluation.ray import run_eval_ray

        summary = run_eval_ray(
            loading.model,
            run.dataset,
            out,
            run.spec,
            workers=workers,
            device=loading.device,
            dtype=loading.dtype,
            resume=resume,
            allow_mixed=allow_mixed,
            chat_template_kwargs=loading.chat_template_kwargs,
        )
    else:
        summary = run_eval(load(loading), run.dataset, out, run.spec, resume=resume, allow_mixed=allow_mixed)
    _show_summary(summary, as_json)
    if summary.get("n_failed_cells"):
        raise typer.Exit(PARTIAL_EXIT)


@eval_app.command("merge")
def eval_merge(
    runs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run directories of one config (shards)"),
    out: Path = typer.Option(..., "--out", "-o", help="New run directory for the merged answers"),
    allow_mixed: bool = AllowMixedOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Combine shard runs into one run directory, then summarize and plot it."""
    from loramem.evaluation.shards import merge

    _show_summary(merge(runs, out, allow_mixed=allow_mixed), as_json)


@eval_app.command("compare")
def eval_compare(
    runs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR...", help="Run directories to set side by side (an ablation: one run per setting)"
    ),
    metric: str = typer.Option("rouge_l", "--metric", help="Table metric", metavar=f"[{'|'.join(METRICS)}]"),
    plot: Optional[Path] = typer.Option(
        None, "--plot", metavar="FILE.png", help="Also draw each row's scores and answer length per ratio"
    ),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as GitHub Markdown"),
    as_json: bool = JsonOpt,
) -> None:
    """Set runs side by side, each named by the settings in which it differs from the others (reads them only)."""
    from loramem.evaluation.compare import check_plot_path, compare_runs, comparison_rows
    from loramem.evaluation.plots import plot_compare
    from loramem.evaluation.tables import compare_table, markdown_table, rich_table

    if metric not in METRICS:
        raise LoramemError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    if markdown and as_json:
        raise LoramemError("give --markdown or --json, not both")
    if plot is not None:
        check_plot_path(plot, runs)
    compared = compare_runs(runs)
    rows = comparison_rows(compared)
    first = compared[0].summary
    title = f"{first['n_documents']} documents, {first['n_questions']} questions (first run)"
    if plot is not None:
        plot_compare(rows, plot, title)
        log(f"wrote {plot}")
    if as_json:
        print_json({"runs": [{"run": str(c.run), "label": c.label} for c in compared], "rows": [vars(r) for r in rows]})
    elif markdown:
        write_stdout(markdown_table(compare_table(rows, metric, title)))
    else:
        stdout_console().print(rich_table(compare_table(rows, metric, title)))


@eval_app.command("report")
def eval_report(
    run: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory"),
    metric: str = typer.Option("rouge_l", "--metric", help="Table metric", metavar=f"[{'|'.join(METRICS)}]"),
    html: Optional[Path] = typer.Option(
        None,
        "--html",
        metavar="FILE",
        help="Also write the report as one self-contained HTML page to open in a browser: the tables, the plots and "
        "every answer, filterable, base and adapter answers side by side (- for stdout, instead of the table)",
    ),
    markdown: bool = typer.Option(
        False, "--markdown", help="Print the tables as GitHub Markdown (for a results page) instead of the console's"
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Recompute summary.json and the plots from answers.jsonl and print the table (or write a page to browse)."""
    from loramem.evaluation.report import write_report

    if metric not in METRICS:
        raise LoramemError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    to_stdout = html is not None and str(html) == "-"
    if to_stdout and as_json:
        raise LoramemError("--html - writes the page to stdout; --json cannot go there too (give --html FILE)")
    if markdown and (as_json or to_stdout):
        raise LoramemError("--markdown prints the tables on stdout; give it without --json and --html -")
    if html is not None:
        from loramem.evaluation.html_report import check_page_path, write_page

        check_page_path(html)
    summary = write_report(run)
    if html is not None:
        write_page(run, summary, html, metric)
        if not to_stdout:
            log(f"wrote {html}")
    if markdown:
        from loramem.evaluation.tables import markdown_tables

        write_stdout(markdown_tables(summary, metric))
    elif not to_stdout:
        _show_summary(summary, as_json, metric)


def _show_summary(summary: dict[str, Any], as_json: bool, metric: str = "rouge_l") -> None:
    """The summary as JSON on stdout, or as the rich table (also on stdout: it is the result)."""
    if as_json:
        print_json(summary)
        return
    from loramem.evaluation.tables import print_table

    print_table(summary, stdout_console(), metric)
