"""eval (run, merge, report): the paper's experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from loramem.cli.app import PARTIAL_EXIT, app
from loramem.cli.options import (
    AnswerBatchOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LayersOpt,
    LrOpt,
    MaxBatchTokensOpt,
    ModelOpt,
    RankOpt,
    StepsOpt,
    SynthModelOpt,
    TargetsOpt,
    TemplateKwargsOpt,
    integers,
    load,
    parse_ratio,
    print_json,
    split_list,
    stdout_console,
)
from loramem.errors import LoramemError


class _EvalGroup(TyperGroup):
    """`loramem eval DATA ...` runs an evaluation; `eval merge` and `eval report` are the other subcommands."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
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


@eval_app.command("run")
def eval_run(
    dataset: str = typer.Argument(..., metavar="DATA", help="Dataset JSONL (see `loramem data`)"),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: answers.jsonl, summary.json, curves.png"),
    ratios: Optional[str] = typer.Option(
        None, "--ratios", help="Compression ratios", show_default="0,0.25,0.5,0.75,0.9,1.0; none with --budget-bytes"
    ),
    press: str = typer.Option("snapkv,knorm", "--press", help="Presses (comma-separated)"),
    mode: str = typer.Option(
        "none,decode,all",
        "--mode",
        help="Inference modes: none, decode, all, base_scores; "
        "library modes: oracle, routed, routed-merge, hybrid, rag",
    ),
    fmt: str = typer.Option("qa,ntp", "--format", help="Adapter training formats: qa, ntp, mixed"),
    granularity: str = typer.Option(
        "token", "--granularity", help="KV eviction: token, value-group (budget = 1 - ratio of value bytes), or both"
    ),
    groups: int = typer.Option(4, "--groups", help="value-group: groups per value head vector"),
    store_dtype: str = typer.Option(
        "native",
        "--store-dtype",
        help="KV storage: native, fp16, bf16, int8, int4 (comma-separated: one curve each; bytes.png compares them)",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out"),
    allow_mixed: bool = AllowMixedOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N documents"),
    shard: str = typer.Option("0/1", "--shard", help="I/N: this process takes documents i with i % N == I"),
    adapters: Optional[Path] = typer.Option(
        None,
        "--adapters",
        help="Reuse adapters from this directory (DOCID-FORMAT subfolders, e.g. another run's adapters/)",
    ),
    library: Optional[Path] = typer.Option(
        None,
        "--library",
        help="Library modes: route over this library "
        "(holding every document of the run) instead of building RUN_DIR/library",
    ),
    library_top_k: int = typer.Option(3, "--library-top-k", help="routed-merge, hybrid: documents routed and merged"),
    merge: str = typer.Option("ties", "--merge", help="routed-merge, hybrid: ties, linear, cat, dare_ties or svd"),
    context_chunks: int = typer.Option(2, "--context-chunks", help="hybrid, rag: retrieved chunks in context"),
    budget_bytes: Optional[str] = typer.Option(
        None,
        "--budget-bytes",
        help="Byte budgets (e.g. 8MB,32MiB), each split between kept KV and an adapter at every --budget-ranks point",
    ),
    budget_ranks: str = typer.Option(
        "0,2,8,32",
        "--budget-ranks",
        help="Adapter ranks of the budget split "
        "(0: the whole budget on KV); a rank whose adapter exceeds a budget is left out",
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    batch_size: Optional[int] = AnswerBatchOpt,
    max_batch_tokens: int = MaxBatchTokensOpt,
    synth: int = typer.Option(16, "--synth", help="Training pairs synthesized for documents without train_qa"),
    synth_model: Optional[str] = SynthModelOpt,
    rank: int = RankOpt,
    targets: str = TargetsOpt,
    layers: Optional[str] = LayersOpt,
    lr: Optional[float] = LrOpt,
    epochs: int = typer.Option(8, "--epochs"),
    steps: Optional[int] = StepsOpt,
    seed: int = typer.Option(0, "--seed"),
    ray: Optional[str] = typer.Option(
        None,
        "--ray",
        help="Run documents as Ray tasks: local (start Ray here), "
        "auto or HOST:PORT (join a cluster; RUN_DIR must be shared)",
    ),
    cpus_per_worker: float = typer.Option(1, "--cpus-per-worker", help="--ray: CPUs per worker slot"),
    gpus_per_worker: float = typer.Option(0, "--gpus-per-worker", help="--ray: GPUs per worker slot"),
    max_retries: int = typer.Option(
        2, "--max-retries", help="--ray: retries of a document whose worker died or ran out of memory"
    ),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Answer every question under every press, ratio, mode and format; score, summarize and plot."""
    from loramem.evaluation.config import EvalConfig, parse_shard
    from loramem.evaluation.runner import run_eval
    from loramem.sizes import parse_size

    extra = {"lr": lr} if lr is not None else {}
    budgets = [parse_size(b) for b in split_list(budget_bytes or "")]
    if ratios is None:
        ratios = "" if budgets else "0,0.25,0.5,0.75,0.9,1.0"
    config = EvalConfig(
        ratios=[parse_ratio(r) for r in split_list(ratios)],
        presses=split_list(press),
        modes=split_list(mode),
        formats=split_list(fmt),
        granularities=split_list(granularity),
        store_dtypes=split_list(store_dtype),
        groups=groups,
        max_new_tokens=max_new_tokens,
        limit=limit,
        shard=parse_shard(shard),
        seed=seed,
        synth_pairs=synth,
        synth_model=synth_model,
        adapters=str(adapters) if adapters else None,
        rank=rank,
        targets=targets,
        layers=layers,
        epochs=epochs,
        steps=steps,
        library=str(library) if library else None,
        library_top_k=library_top_k,
        merge=merge,
        context_chunks=context_chunks,
        budget_bytes=budgets,
        budget_ranks=integers(budget_ranks, "--budget-ranks"),
        answer_batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        **extra,
    )
    if ray is not None:
        from loramem.evaluation.ray import run_eval_ray

        summary = run_eval_ray(
            model,
            dataset,
            out,
            config,
            address=ray,
            device=device,
            dtype=dtype,
            resume=resume,
            allow_mixed=allow_mixed,
            chat_template_kwargs=chat_template_kwargs,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            max_retries=max_retries,
        )
    else:
        lm = load(model, device, dtype, chat_template_kwargs=chat_template_kwargs)
        summary = run_eval(lm, dataset, out, config, resume=resume, allow_mixed=allow_mixed)
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


@eval_app.command("report")
def eval_report(
    run: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory"),
    metric: str = typer.Option("rouge_l", "--metric", help="Table metric: rouge_l, exact_match, token_f1, contains"),
    as_json: bool = JsonOpt,
) -> None:
    """Recompute summary.json and the plots from answers.jsonl and print the table."""
    from loramem.evaluation.config import METRICS
    from loramem.evaluation.report import write_report

    if metric not in METRICS:
        raise LoramemError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    _show_summary(write_report(run), as_json, metric)


def _show_summary(summary: dict[str, Any], as_json: bool, metric: str = "rouge_l") -> None:
    """The summary as JSON on stdout, or as the rich table (also on stdout: it is the result)."""
    if as_json:
        print_json(summary)
        return
    from loramem.evaluation.tables import print_table

    print_table(summary, stdout_console(), metric)
