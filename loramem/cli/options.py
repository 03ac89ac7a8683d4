"""Options and helpers shared by the commands: each option is declared once here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

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
# Adapter-training options shared by train-adapter, library add, eval and probe capacity.
RankOpt = typer.Option(16, "--rank", help="LoRA rank")
TargetsOpt = typer.Option("all", "--targets", help="attn, mlp, all, or module names (comma-separated)")
SynthModelOpt = typer.Option(
    None,
    "--synth-model",
    help="Model that writes the synthesized QA pairs: any Hugging Face id or local model directory "
    "(the paper writes its QA with a strong model) (default: the model being trained)",
)
LayersOpt = typer.Option(None, "--layers", help="e.g. 0-14, 0,3,5, first-half, second-half")
LrOpt = typer.Option(None, "--lr", help="Learning rate", show_default="train-adapter's, 1.5e-3")
StepsOpt = typer.Option(None, "--steps", help="Train this many steps instead of --epochs")


def load(
    model: Optional[str],
    device: str,
    dtype: str,
    adapter: Optional[Path] = None,
    chat_template_kwargs: Optional[str] = None,
) -> Any:
    from loramem.adapters.attach import attach_adapter
    from loramem.model.loading import load_model

    lm = load_model(model, device=device, dtype=dtype, chat_template_kwargs=chat_template_kwargs)
    if adapter is not None:
        attach_adapter(lm, adapter)
    return lm


def print_json(data: Any) -> None:
    from loramem.fileio import write_stdout

    write_stdout(json.dumps(data, ensure_ascii=False) + "\n")


def stdout_console() -> Any:
    """A rich Console for results on stdout whose every write is checked (`fileio.write_stdout`)."""
    from rich.console import Console

    from loramem.fileio import CheckedStdout

    return Console(file=CheckedStdout(), soft_wrap=False)


def read_questions(questions: list[str], questions_file: Optional[str], stdin_free: bool) -> list[dict[str, Any]]:
    """Questions from arguments, a file of lines or JSONL ({"question": ...}), or stdin."""
    from loramem.fileio import read_text

    items = [{"question": q} for q in questions]
    text = None
    if questions_file:
        text = read_text(questions_file, what="questions file")
    elif not items and stdin_free and sys.stdin is not None and not sys.stdin.isatty():
        text = read_text("-", what="questions")
    for number, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LoramemError(f"questions line {number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise LoramemError(f"questions line {number}: expected an object with a 'question' string")
            items.append(record)
        else:
            items.append({"question": line})
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
    return value
