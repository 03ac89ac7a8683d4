"""eval (run, merge, report): the paper's experiment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from loramem.cli.app import PARTIAL_EXIT, app
from loramem.cli.options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    TemplateKwargsOpt,
    flags_named,
    integers,
    load,
    parse_ratio,
    print_json,
    split_list,
    stdout_console,
)
from loramem.errors import LoramemError
from loramem.evaluation.config import EvalConfig, parse_shard, read_config_file, resumed_config
from loramem.sizes import parse_size


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


def _shown(name: str) -> str:
    """EvalConfig's default for a setting, as its flag takes it (comma-separated lists, I/N shard)."""
    value = getattr(_EVAL_DEFAULTS, name)
    if value is None:
        return ""
    if name == "shard":
        return "/".join(map(str, value))
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


_EVAL_DEFAULTS = EvalConfig()
# Each eval option that sets an EvalConfig field: its flag and how the flag's text becomes the field's value.
_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "ratios": ("--ratios", lambda v: [parse_ratio(r) for r in split_list(v)]),
    "presses": ("--press", split_list),
    "modes": ("--mode", split_list),
    "formats": ("--format", split_list),
    "granularities": ("--granularity", split_list),
    "store_dtypes": ("--store-dtype", split_list),
    "groups": ("--groups", int),
    "limit": ("--limit", int),
    "shard": ("--shard", parse_shard),
    "adapters": ("--adapters", str),
    "library": ("--library", str),
    "library_top_k": ("--library-top-k", int),
    "merge": ("--merge", str),
    "context_chunks": ("--context-chunks", int),
    "budget_bytes": ("--budget-bytes", lambda v: [parse_size(b) for b in split_list(v)]),
    "budget_ranks": ("--budget-ranks", lambda v: integers(v, "--budget-ranks")),
    "max_new_tokens": ("--max-new-tokens", int),
    "answer_batch_size": ("--batch-size", int),
    "max_batch_tokens": ("--max-batch-tokens", int),
    "synth_pairs": ("--synth", int),
    "synth_model": ("--synth-model", str),
    "rank": ("--rank", int),
    "targets": ("--targets", str),
    "layers": ("--layers", str),
    "lr": ("--lr", float),
    "epochs": ("--epochs", int),
    "steps": ("--steps", int),
    "seed": ("--seed", int),
}


def _setting(name: str, help: str = "", show_default: str = "") -> Any:
    """An eval option whose default is EvalConfig's (None in the signature: given flags are told apart)."""
    default = show_default or (_shown(name) if name != "ratios" else f"{_shown(name)}; none with --budget-bytes")
    return typer.Option(None, _SETTINGS[name][0], help=help, show_default=default or False)


@eval_app.command("run")
def eval_run(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Argument(
        None, metavar="DATA", help="Dataset JSONL (see `loramem data`); with --resume, the run's own by default"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: answers.jsonl, summary.json, curves.png"),
    config_file: Optional[Path] = typer.Option(
        None,
        "--config",
        help='TOML file of settings named as EvalConfig\'s fields (e.g. ratios = [0, 0.5], presses = "snapkv"); '
        "flags given as well override it",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out with the settings, dataset and model it recorded; "
        "settings given again must agree (--limit may change)",
    ),
    allow_mixed: bool = AllowMixedOpt,
    ratios: Optional[str] = _setting("ratios", "Compression ratios"),
    press: Optional[str] = _setting("presses", "Presses (comma-separated)"),
    mode: Optional[str] = _setting(
        "modes",
        "Inference modes: none, decode, all, base_scores; library modes: oracle, routed, routed-merge, hybrid, rag",
    ),
    fmt: Optional[str] = _setting("formats", "Adapter training formats: qa, ntp, mixed"),
    granularity: Optional[str] = _setting(
        "granularities", "KV eviction: token, value-group (budget = 1 - ratio of value bytes), or both"
    ),
    groups: Optional[int] = _setting("groups", "value-group: groups per value head vector"),
    store_dtype: Optional[str] = _setting(
        "store_dtypes",
        "KV storage: native, fp16, bf16, int8, int4 (comma-separated: one curve each; bytes.png compares them)",
    ),
    limit: Optional[int] = _setting("limit", "Only the first N documents"),
    shard: Optional[str] = _setting("shard", "I/N: this process takes documents i with i % N == I"),
    adapters: Optional[str] = _setting(
        "adapters", "Reuse adapters from this directory (DOCID-FORMAT subfolders, e.g. another run's adapters/)"
    ),
    library: Optional[str] = _setting(
        "library",
        "Library modes: route over this library (holding every document of the run) instead of building "
        "RUN_DIR/library",
    ),
    library_top_k: Optional[int] = _setting("library_top_k", "routed-merge, hybrid: documents routed and merged"),
    merge: Optional[str] = _setting("merge", "routed-merge, hybrid: ties, linear, cat, dare_ties or svd"),
    context_chunks: Optional[int] = _setting("context_chunks", "hybrid, rag: retrieved chunks in context"),
    budget_bytes: Optional[str] = _setting(
        "budget_bytes",
        "Byte budgets (e.g. 8MB,32MiB), each split between kept KV and an adapter at every --budget-ranks point",
    ),
    budget_ranks: Optional[str] = _setting(
        "budget_ranks",
        "Adapter ranks of the budget split (0: the whole budget on KV); a rank whose adapter exceeds a budget is "
        "left out",
    ),
    max_new_tokens: Optional[int] = _setting("max_new_tokens", "Answer length limit"),
    batch_size: Optional[int] = _setting(
        "answer_batch_size",
        "Questions decoded together: one document's cells share batches, each row over its own cache (answers do "
        "not change; not recorded)",
        show_default="as many as --max-batch-tokens allows, at most 16",
    ),
    max_batch_tokens: Optional[int] = _setting(
        "max_batch_tokens",
        "Memory budget of a decoding batch, in cached tokens: a document shared by the rows once, else one per row "
        "at the batch's largest, plus each row's question and answer (not recorded)",
    ),
    synth: Optional[int] = _setting("synth_pairs", "Training pairs synthesized for documents without train_qa"),
    synth_model: Optional[str] = _setting(
        "synth_model", "Model that writes the synthesized QA pairs (default: the model being trained)"
    ),
    rank: Optional[int] = _setting("rank", "LoRA rank"),
    targets: Optional[str] = _setting("targets", "attn, mlp, all, or module names (comma-separated)"),
    layers: Optional[str] = _setting("layers", "e.g. 0-14, 0,3,5, first-half, second-half"),
    lr: Optional[float] = _setting("lr", "Learning rate"),
    epochs: Optional[int] = _setting("epochs", "Training epochs"),
    steps: Optional[int] = _setting("steps", "Train this many steps instead of --epochs"),
    seed: Optional[int] = _setting("seed", "Seed of the synthesized pairs and the training"),
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
    from loramem.evaluation.rundir import CONFIG, read_json
    from loramem.evaluation.runner import run_eval

    names = {"presses": "press", "modes": "mode", "formats": "fmt", "granularities": "granularity"}
    names |= {"store_dtypes": "store_dtype", "synth_pairs": "synth", "answer_batch_size": "batch_size"}
    given = {
        field: parse(ctx.params[names.get(field, field)])
        for field, (_, parse) in _SETTINGS.items()
        if ctx.params[names.get(field, field)] is not None
    }
    settings = {**(read_config_file(config_file) if config_file else {}), **given}
    if resume and (out / CONFIG).is_file():
        header = read_json(out / CONFIG, "cannot resume")
        config, disagree = resumed_config(header["config"], settings)
        if disagree:
            flags = ", ".join(_SETTINGS[name][0] if name in given else f"{name} in {config_file}" for name in disagree)
            raise LoramemError(
                f"{flags} disagree with the run being resumed in {out}; leave them out to resume it as recorded "
                "(see its config.json), or choose another --out"
            )
        dataset = dataset or header["dataset"]["path"]
        model = model or header["model"].get("id")
        if chat_template_kwargs is None:
            chat_template_kwargs = header["model"].get("chat_template_kwargs")
    else:
        if "budget_bytes" in settings and "ratios" not in settings:
            settings["ratios"] = []  # a budget sweep replaces the ratio curves unless both are asked for
        with flags_named({} if config_file else {field: flag for field, (flag, _) in _SETTINGS.items()}):
            config = EvalConfig.from_dict(settings, str(config_file) if config_file else "flags")
    if dataset is None:
        raise LoramemError("give DATA (a dataset JSONL), or --resume a run in --out that recorded one")
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
