"""Options and helpers shared by the commands: each option is declared once here."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, Optional, cast

import typer

from loramem.errors import LoramemError
from loramem.model import MAX_BATCH_TOKENS

ModelOpt = typer.Option(
    None,
    "--model",
    "-m",
    help="Hugging Face id, local model directory or .gguf file",
    show_default="embedded SmolLM2-135M-Instruct",
)
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output on stdout")
ForceCacheOpt = typer.Option(False, "--force", help="Replace an existing cache file (one that loramem wrote)")
AnswerBatchOpt = typer.Option(
    None,
    "--batch-size",
    help="Questions over one cache decoded together (answers do not change)",
    show_default="as many as --max-batch-tokens allows, at most 16",
)
MaxBatchTokensOpt = typer.Option(
    MAX_BATCH_TOKENS, "--max-batch-tokens", help="Memory budget of a decoding batch, in cached tokens over all rows"
)
TemplateKwargsOpt = typer.Option(
    None,
    "--chat-template-kwargs",
    help="JSON object of chat-template variables, e.g. '{\"enable_thinking\": true}' (thinking is off by default "
    "where the template has the switch); recorded in caches and adapters, which then need the same",
)
# Adapter-training options of train-adapter, library add and probe capacity, declared once; each command gives its
# settings dataclass's default (`rank: Rank = TrainConfig.rank`). eval's, which tell given flags from defaults for
# --resume and --config, are made from the same EvalConfig fields in cli/evaluation.py.
Rank = Annotated[int, typer.Option("--rank", help="LoRA rank")]
Alpha = Annotated[float, typer.Option("--alpha", help="LoRA alpha (the update is scaled by alpha / rank)")]
Dropout = Annotated[float, typer.Option("--dropout", help="LoRA dropout")]
Targets = Annotated[str, typer.Option("--targets", help="attn, mlp, all, or module names (comma-separated)")]
Layers = Annotated[Optional[str], typer.Option("--layers", help="e.g. 0-14, 0,3,5, first-half, second-half")]
Lr = Annotated[float, typer.Option("--lr", help="Learning rate")]
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the training examples")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Train this many steps instead of --epochs")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Training examples per step")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the training and of synthesized pairs")]
Format = Annotated[str, typer.Option("--format", help="qa (closed-book QA), ntp (raw text) or mixed")]
SynthModelOpt = typer.Option(
    None,
    "--synth-model",
    help="Model that writes the synthesized QA pairs: any Hugging Face id or local model directory "
    "(the paper writes its QA with a strong model) (default: the model being trained)",
)


def load(
    model: Optional[str],
    device: str,
    dtype: str,
    adapter: Optional[Path] = None,
    chat_template_kwargs: Optional[str] = None,
    *,
    answer_only: bool = False,
) -> Any:
    from loramem.adapters.attach import attach_adapter
    from loramem.model.loading import load_model

    lm = load_model(
        model, device=device, dtype=dtype, chat_template_kwargs=chat_template_kwargs, answer_only=answer_only
    )
    if adapter is not None:
        attach_adapter(lm, adapter)
    return lm


@contextmanager
def flags_named(flags: Mapping[str, str]) -> Iterator[None]:
    """Library errors name a setting by its field (`epochs must be positive`); on the command line it is a flag
    (`--epochs must be positive`). `flags` maps field names to flags."""
    try:
        yield
    except LoramemError as exc:
        message = str(exc)
        for field in sorted(flags, key=len, reverse=True):
            message = re.sub(rf"(?<![\w-]){re.escape(field)}(?![\w-])", flags[field], message)
        exc.args = (message,)
        raise


def field_flags(names: Iterator[str] | list[str]) -> dict[str, str]:
    """Field names to the flags spelled after them (batch_size -> --batch-size)."""
    return {name: "--" + name.replace("_", "-") for name in names}


def print_json(data: Any) -> None:
    from loramem.fileio import write_stdout

    write_stdout(json.dumps(data, ensure_ascii=False) + "\n")


def stdout_console() -> Any:
    """A rich Console for results on stdout whose every write is checked (`fileio.write_stdout`)."""
    from rich.console import Console

    from loramem.fileio import CheckedStdout

    return Console(file=cast(IO[str], CheckedStdout()), soft_wrap=False)


def read_questions(questions: list[str], questions_file: Optional[str], stdin_free: bool) -> list[dict[str, Any]]:
    """Questions from arguments, a file of lines or JSONL ({"question": ...}), or stdin."""
    from loramem.fileio import read_text
    from loramem.questions import parse_questions

    items = [{"question": q} for q in questions]
    text = None
    if questions_file:
        text = read_text(questions_file, what="questions file")
    elif not items and stdin_free and sys.stdin is not None and not sys.stdin.isatty():
        text = read_text("-", what="questions")
    items += parse_questions(text or "", "questions file" if questions_file else "stdin")
    if not items:
        raise LoramemError("no question given (argument, --questions FILE, or stdin)")
    return items


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def integers(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in split_list(text)]
    except ValueError as exc:
        raise LoramemError(f"{what} must be comma-separated integers, got {text!r}") from exc


def parse_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise LoramemError(f"not a ratio: {text!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise LoramemError(f"ratio must be in [0, 1], got {value}")
    return value + 0.0  # -0.0 is 0.0
