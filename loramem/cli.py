"""The `loramem` command line: a thin Typer layer over the library API.

Results go to stdout, progress and logs to stderr. Exit codes: 0 success, 1 internal error,
2 bad input, 3 incompatible artifact (another model, tokenizer, adapter or format), 4 an eval finished
with failed cells (the rest is written; rerun with --resume), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from loramem.errors import LoramemError
from loramem.log import console, log

app = typer.Typer(
    help="Document memory for language models: KV caches and LoRA adapters as files.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

ModelOpt = typer.Option(None, "--model", "-m", help="Hugging Face id, local model directory or .gguf file "
                        "[default: embedded SmolLM2-135M-Instruct]")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output on stdout")
# Adapter-training options shared by train-adapter, library add, eval and probe capacity.
RankOpt = typer.Option(16, "--rank", help="LoRA rank")
TargetsOpt = typer.Option("all", "--targets", help="attn, mlp, all, or module names (comma-separated)")
LayersOpt = typer.Option(None, "--layers", help="e.g. 0-14, 0,3,5, first-half, second-half")
LrOpt = typer.Option(None, "--lr", help="Learning rate [default: train-adapter's, 1.5e-3]")
StepsOpt = typer.Option(None, "--steps", help="Train this many steps instead of --epochs")
PARTIAL_EXIT = 4


def _load(model: Optional[str], device: str, dtype: str, adapter: Optional[Path] = None) -> Any:
    from loramem.adapters import attach_adapter
    from loramem.models import load_model

    lm = load_model(model, device=device, dtype=dtype)
    if adapter is not None:
        attach_adapter(lm, adapter)
    return lm


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@app.command()
def encode(
    document: str = typer.Argument(..., help="Document text file, or - for stdin"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output .safetensors (- or a pipe: stdout)"),
    score: str = typer.Option("snapkv,expected_attention,knorm,streaming_llm,tova,random", "--score",
                              help="Presses whose scores are recorded during the prefill ('all' for every one)"),
    framing: str = typer.Option("chat", "--framing", help="chat (the model's chat template) or raw (plain text)"),
    truncate: bool = typer.Option(False, "--truncate", help="Cut a document longer than the context, with a warning"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Encode with this LoRA on (adapter-prefill modes)"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
) -> None:
    """Prefill a document once and store its KV cache (with press scores) as safetensors."""
    from loramem.encode import encode as encode_document
    from loramem.fileio import read_text, write_output
    from loramem.log import progress_bar
    from loramem.presses import parse_presses

    presses = parse_presses(score)
    text = read_text(document)
    if output is None and sys.stdout.isatty():
        raise LoramemError("refusing to write a binary cache to the terminal; give -o FILE or pipe it")
    lm = _load(model, device, dtype, adapter)
    with progress_bar("prefill", lm.config.num_hidden_layers) as advance:
        cache = encode_document(lm, text, presses=presses, framing=framing, truncate=truncate,
                                with_adapter=adapter is not None, on_layer=lambda _: advance())
    where = write_output(output, cache.to_bytes(), "cache")
    log(f"encoded {cache.n_tokens} tokens in {cache.meta['prefill_seconds']:.1f} s -> {where}")


@app.command()
def compress(
    cache_file: str = typer.Argument(..., metavar="IN", help="Cache .safetensors, or - for stdin"),
    press: str = typer.Option("snapkv", "--press", "-p", help="Press whose recorded scores pick the tokens"),
    ratio: Optional[float] = typer.Option(None, "--ratio", "-r", help="Fraction of document tokens to evict, "
                                          "in [0, 1]; 1.0 evicts the whole document"),
    keep: Optional[int] = typer.Option(None, "--keep", help="Keep this many document tokens instead of a ratio"),
    scores_from: Optional[str] = typer.Option(None, "--scores-from", help="Take the eviction choice from "
                                              "another encoding of the same document (e.g. the base model's)"),
    granularity: str = typer.Option("token", "--granularity", help="token (whole tokens) or value-group "
                                    "(channel groups inside each value vector)"),
    groups: int = typer.Option(4, "--groups", help="value-group: groups per value head vector"),
    budget: Optional[float] = typer.Option(None, "--budget", help="value-group: fraction of document value "
                                           "bytes kept, in (0, 1]"),
    score_groups: Optional[str] = typer.Option(None, "--score-groups", help="value-group rule: norm (token "
                                               "score x group's share of the value norm), uniform, or query "
                                               "(question attention x group value norm) [default: query with "
                                               "--query/--questions, else norm]"),
    query: Optional[list[str]] = typer.Option(None, "--query", help="value-group: score groups by this "
                                              "question's attention to the document (repeatable; loads --model)"),
    questions_file: Optional[str] = typer.Option(None, "--questions", help="value-group: as --query, from a "
                                                 "file of lines or JSONL {\"question\"}; relevance averaged"),
    store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="Store keys/values as fp16, bf16, "
                                              "int8 or int4 (scales alongside); loaded back dequantized"),
    quant_axis: str = typer.Option("token", "--quant-axis", help="int8/int4 scales per token (groups of "
                                   "channels) or per channel"),
    quant_group: int = typer.Option(0, "--quant-group", help="Channels per scale for --quant-axis token "
                                    "(0: the whole head)"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output .safetensors (- or a pipe: stdout)"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
) -> None:
    """Evict KV states by recorded press scores; tensor work on the file, no model is loaded
    (except for query-aware value groups: --query/--questions run the model that made the cache)."""
    from loramem.cache import KVCache
    from loramem.compress import compress as compress_cache
    from loramem.fileio import write_output
    from loramem.quantize import make_storage

    asked = bool(query or questions_file)
    if granularity not in ("token", "value-group"):
        raise LoramemError(f"unknown --granularity {granularity!r}; use token or value-group")
    if asked and granularity != "value-group":
        raise LoramemError("--query/--questions score value groups; add --granularity value-group --budget B")
    if cache_file == "-" and questions_file == "-":
        raise LoramemError("stdin can carry the cache or the questions, not both")
    if granularity == "value-group" and budget is None:
        raise LoramemError("--granularity value-group needs --budget B in (0, 1]")
    if granularity == "token" and ratio is None and keep is None and store_dtype is None:
        raise LoramemError("give --ratio R (in [0, 1]), --keep N or --store-dtype")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise LoramemError(f"--ratio must be in [0, 1], got {ratio}")
    if output is None and sys.stdout.isatty():
        raise LoramemError("refusing to write a binary cache to the terminal; give -o FILE or pipe it")
    cache = KVCache.load(cache_file)
    storage = make_storage(store_dtype, quant_axis, quant_group, cache.meta["head_dim"]) if store_dtype else None
    press = chosen_by = press.replace("-", "_").lower()
    if granularity == "value-group":
        from loramem.cache import check_compatible
        from loramem.compress import restore
        from loramem.value_groups import check_request, compress_value_groups, query_group_scores

        rule = score_groups or ("query" if asked else "norm")
        check_request(cache, press, groups, float(budget), rule, query=asked)
        scores = None
        if asked:
            items = _read_questions(query or [], questions_file, stdin_free=False)
            lm = _load(model, device, dtype)
            check_compatible(cache, lm.fingerprint, cache_file)
            scores = query_group_scores(lm, cache, [item["question"] for item in items], groups)
            chosen_by = f"{len(items)} question(s)"
        small = compress_value_groups(cache, press, groups, float(budget), rule, scores)
        small = restore(small, storage) if storage else small
    else:
        base = KVCache.load(scores_from) if scores_from else None
        small = compress_cache(cache, press, ratio=ratio, keep=keep, scores_from=base, storage=storage)
    where = write_output(output, small.to_bytes(), "cache")
    log(f"kept {max(small.kept_per_layer)} of {cache.n_tokens} tokens per head ({chosen_by}) -> {where}")


@app.command("train-adapter")
def train_adapter(
    document: str = typer.Argument(..., help="Document text file, or - for stdin"),
    output: Path = typer.Option(..., "-o", "--output", help="Output adapter directory (PEFT layout)"),
    qa: Optional[str] = typer.Option(None, "--qa", help="JSONL of {question, answer} training pairs"),
    synth: int = typer.Option(16, "--synth", help="Without --qa: synthesize this many pairs from the document"),
    fmt: str = typer.Option("qa", "--format", help="qa (closed-book QA), ntp (raw text) or mixed"),
    rank: int = RankOpt,
    alpha: float = typer.Option(32.0, "--alpha"),
    dropout: float = typer.Option(0.0, "--dropout"),
    targets: str = TargetsOpt,
    layers: Optional[str] = LayersOpt,
    lr: Optional[float] = LrOpt,
    epochs: int = typer.Option(8, "--epochs"),
    steps: Optional[int] = StepsOpt,
    batch_size: int = typer.Option(4, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    max_length: int = typer.Option(512, "--max-length"),
    chunk_size: int = typer.Option(128, "--chunk-size", help="ntp: tokens per training chunk"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, as_json: bool = JsonOpt,
) -> None:
    """Train a document LoRA (QA-supervised, raw-text or mixed) as a standard PEFT adapter directory."""
    from dataclasses import replace

    from loramem.datasets import load_qa_pairs
    from loramem.fileio import read_text
    from loramem.log import progress_bar
    from loramem.train import TrainConfig, train_adapter as train

    text = read_text(document)
    if output.exists() and not force:
        raise LoramemError(f"{output} already exists; use --force to replace it")
    config = TrainConfig(format=fmt, rank=rank, alpha=alpha, dropout=dropout, targets=targets, layers=layers,
                         epochs=epochs, steps=steps, batch_size=batch_size, seed=seed, max_length=max_length,
                         chunk_size=chunk_size)
    if lr is not None:
        config = replace(config, lr=lr)
    pairs, qa_sha = load_qa_pairs(qa) if qa else (None, None)
    lm = _load(model, device, dtype)
    if fmt == "ntp":
        qa_pairs = []
    elif pairs is None:
        from loramem.synth import synthesize

        log(f"no --qa given: synthesizing {synth} question-answer pairs from the document")
        qa_pairs = synthesize(lm, text, synth, seed)
    else:
        qa_pairs = [(p.question, p.answer) for p in pairs]
    with progress_bar("training", None) as advance:
        summary = train(lm, text, qa_pairs, output, config, force=force, qa_file_sha256=qa_sha,
                        on_step=lambda step, total, loss: advance(1, total=total, status=f"loss {loss:.3f}"))
    if as_json:
        _print_json(summary)
    else:
        log(f"adapter written to {output}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")


def _read_questions(questions: list[str], questions_file: Optional[str], stdin_free: bool) -> list[dict[str, Any]]:
    """Questions from arguments, a file of lines or JSONL ({"question": ...}), or stdin."""
    from loramem.fileio import read_text

    items = [{"question": q} for q in questions]
    text = None
    if questions_file:
        text = read_text(questions_file, what="questions file")
    elif not items and stdin_free and not sys.stdin.isatty():
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


@app.command()
def ask(
    questions: list[str] = typer.Argument(None, help="Question(s); or use --questions / stdin"),
    cache_file: Optional[str] = typer.Option(None, "--cache", "-c", help="Stored cache (- for stdin)"),
    doc: Optional[str] = typer.Option(None, "--doc", help="Encode this document on the fly (nothing is written)"),
    questions_file: Optional[str] = typer.Option(None, "--questions", "-q", help="File of questions: lines or JSONL"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="PEFT LoRA adapter directory"),
    adapter_mode: Optional[str] = typer.Option(None, "--adapter-mode", help="none, decode (default with "
                                               "--adapter) or all"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    framing: str = typer.Option("chat", "--framing", help="Framing for --doc and closed-book questions"),
    truncate: bool = typer.Option(False, "--truncate", help="With --doc: cut a document longer than the context"),
    library: Optional[Path] = typer.Option(None, "--library", help="Answer from an adapter library: route "
                                           "the question, decode with the routed documents' (merged) adapter"),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="--library: documents routed to; 1 uses that "
                                        "document's adapter as is [default: 3]"),
    merge: Optional[str] = typer.Option(None, "--merge", help="--library: how the top-k adapters merge: ties, "
                                        "linear, cat, dare_ties or svd [default: ties]"),
    with_context: Optional[int] = typer.Option(None, "--with-context", help="--library: also put the N best "
                                               "retrieved chunks in context (base-model cache)"),
    with_caches: bool = typer.Option(False, "--with-caches", help="--library: put the routed documents' stored KV "
                                     "caches in context, side by side (library add --with-cache)"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, as_json: bool = JsonOpt,
) -> None:
    """Answer questions from a stored cache, a document, an adapter, any mix of them, or an adapter library."""
    from loramem.adapters import check_adapter_mode
    from loramem.cache import KVCache, check_compatible
    from loramem.encode import encode as encode_document
    from loramem.fileio import read_text
    from loramem.generate import generate

    if library is not None:
        if cache_file or doc or adapter or adapter_mode:
            raise LoramemError("--library answers with the library's adapters; leave out --cache, --doc, --adapter "
                               "and --adapter-mode")
        _ask_library(library, _read_questions(questions or [], questions_file, stdin_free=True),
                     3 if top_k is None else top_k, merge or "ties", with_context or 0, with_caches, max_new_tokens,
                     model, device, dtype, as_json)
        return
    if top_k is not None or merge is not None or with_context is not None or with_caches:
        raise LoramemError("--top-k, --merge, --with-context and --with-caches need --library")
    if cache_file and doc:
        raise LoramemError("give --cache or --doc, not both")
    mode = adapter_mode or ("decode" if adapter else "none")
    cache = KVCache.load(cache_file) if cache_file else None
    text = read_text(doc) if doc else None
    items = _read_questions(questions or [], questions_file, stdin_free="-" not in (cache_file, doc))
    lm = _load(model, device, dtype, adapter)
    if cache is not None:
        check_compatible(cache, lm.fingerprint, cache_file or "cache")
    doc_seconds = 0.0
    if text is not None:
        cache = encode_document(lm, text, framing=framing, truncate=truncate, with_adapter=mode == "all")
        doc_seconds = cache.meta["prefill_seconds"]
    if cache is not None:
        adapter_on = check_adapter_mode(lm, mode, cache.meta.get("adapter"))
    else:
        adapter_on = check_adapter_mode(lm, "decode" if mode == "all" else mode, None)
    for item in items:
        result = generate(lm, item["question"], cache, max_new_tokens=max_new_tokens,
                          adapter_on=adapter_on, framing=framing)
        if as_json:
            data = {**{k: v for k, v in item.items() if k != "question"}, **result.to_dict(),
                    "adapter_mode": mode, "document_prefill_seconds": doc_seconds}
            if doc_seconds:
                data["time_to_first_token_seconds"] = round(result.time_to_first_token_seconds + doc_seconds, 4)
            _print_json(data)
        else:
            answer = result.answer if len(items) == 1 else " ".join(result.answer.split())
            sys.stdout.write(answer + "\n")
            sys.stdout.flush()


def _ask_library(lib: Path, items: list[dict[str, Any]], top_k: int, merge: str, with_context: int,
                 with_caches: bool, max_new_tokens: int, model: Optional[str], device: str, dtype: str,
                 as_json: bool) -> None:
    """`ask --library`: the library is checked before its base model (or --model, which must match) is loaded."""
    from loramem.library import library_embedder
    from loramem.library_qa import ask_library, check_request

    lib, _ = check_request(lib, top_k, merge, with_context, with_caches)
    lm = _load(model or lib.base_model_id, device, dtype)
    embedder = library_embedder(lib)
    for item in items:
        result = ask_library(lm, lib, item["question"], top_k=top_k, merge=merge, with_context=with_context,
                             with_caches=with_caches, max_new_tokens=max_new_tokens, embedder=embedder)
        if as_json:
            _print_json({**{k: v for k, v in item.items() if k != "question"}, **result.to_dict()})
        else:
            text = result.answer.answer
            sys.stdout.write((text if len(items) == 1 else " ".join(text.split())) + "\n")
            sys.stdout.flush()


@app.command()
def inspect(
    artifact: str = typer.Argument(..., help="A cache .safetensors (- for stdin) or an adapter directory"),
    as_json: bool = JsonOpt,
) -> None:
    """Show what a cache or an adapter holds: model, document, tokens kept, bytes, press, ratio."""
    from loramem.describe import describe_adapter, describe_cache

    if artifact != "-" and Path(artifact).is_dir():
        info = describe_adapter(artifact)
    else:
        from loramem.cache import KVCache
        from loramem.fileio import read_input_bytes

        data, source = read_input_bytes(artifact, what="cache")
        info = describe_cache(KVCache.from_bytes(data, source), nbytes=len(data))
    if as_json:
        _print_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    hidden = {"kept_per_layer", "kept_per_head", "history"}
    for key, value in info.items():
        if key in hidden or value is None:
            continue
        if key.endswith("bytes") and isinstance(value, int):
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value) if value else "-"
        table.add_row(key.replace("_", " "), str(value).replace("\n", " "))
    Console(soft_wrap=False).print(table)


@app.command()
def demo(
    ratios: str = typer.Option("0,0.5,0.9,1.0", "--ratios", help="Compression ratios to compare"),
    press: str = typer.Option("snapkv", "--press", help="Press used for every ratio"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, as_json: bool = JsonOpt,
) -> None:
    """Encode the example document, compress it at several ratios and answer its questions."""
    from loramem.demo import print_table, run_demo

    values = [_parse_ratio(r) for r in ratios.split(",") if r.strip()]
    rows = run_demo(_load(model, device, dtype), values, press)
    if as_json:
        for row in rows:
            _print_json(row)
    else:
        print_table(rows, values)


data_app = typer.Typer(help="Datasets for eval: convert known layouts, generate invented fiction.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

LAYOUTS = ("narrativeqa", "narrativeqa-json", "longhealth", "squad")


@data_app.command("convert")
def data_convert(
    layout: str = typer.Argument(..., help="narrativeqa (official qaps.csv + summaries.csv repo), "
                                 "narrativeqa-json (tokenized JSON/zip), longhealth, squad"),
    source: str = typer.Argument(..., help="The dataset file or folder"),
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL (- for stdout)"),
    split: Optional[str] = typer.Option(None, "--split", help="NarrativeQA split: train, valid or test"),
    train_split: float = typer.Option(0.0, "--train-split", help="Move this fraction of each document's "
                                      "questions into train_qa (adapter supervision), never overlapping qa"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Convert a QA dataset into loramem's JSONL format (one document per line)."""
    from loramem import datasets

    converters = {
        "narrativeqa": lambda: datasets.convert_narrativeqa(source, split=split),
        "narrativeqa-json": lambda: datasets.convert_narrativeqa_json(source),
        "longhealth": lambda: datasets.convert_longhealth(source),
        "squad": lambda: datasets.convert_squad(source),
    }
    if layout not in converters:
        raise LoramemError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    records = converters[layout]()
    if train_split:
        records = datasets.train_split(records, train_split, seed)
    datasets.write_dataset(records, output)
    log(f"{len(records)} documents, {sum(len(r.qa) for r in records)} held-out questions, "
        f"{sum(len(r.train_qa) for r in records)} training pairs")


@data_app.command("synth-fiction")
def data_synth_fiction(
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL (- for stdout)"),
    n_docs: int = typer.Option(36, "--n-docs", min=1, help="Number of invented documents"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate invented documents (facts no model can know) with training and held-out QA."""
    from loramem.datasets import write_dataset
    from loramem.fiction import synth_fiction

    write_dataset(synth_fiction(n_docs, seed), output)


@app.command("merge")
def merge_cmd(
    adapters: list[Path] = typer.Argument(..., metavar="ADAPTER...", help="PEFT LoRA adapter directories (2 or more)"),
    output: Path = typer.Option(..., "-o", "--output", help="Output adapter directory (PEFT layout)"),
    method: str = typer.Option("cat", "--method", help="ties, linear, cat, dare_ties or svd (PEFT's "
                               "add_weighted_adapter; cat keeps every adapter's update exactly, rank = sum)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per adapter, e.g. 1,1,0.5 "
                                          "[default: 1 each]"),
    density: float = typer.Option(0.5, "--density", help="ties, dare_ties: fraction of entries kept, in (0, 1]"),
    seed: int = typer.Option(0, "--seed", help="dare_ties: seed of the random drop"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model to load the adapters onto "
                                        "[default: the one the adapters name]"),
    device: str = DeviceOpt, dtype: str = DtypeOpt, as_json: bool = JsonOpt,
) -> None:
    """Combine document adapters into one PEFT LoRA adapter, recording its sources."""
    from loramem.merge import MergeConfig, base_model_id, check_sources, merge_adapters

    try:
        parsed = [float(w) for w in _split(weights)] if weights is not None else None
    except ValueError as exc:
        raise LoramemError(f"--weights must be numbers separated by commas, got {weights!r}") from exc
    config = MergeConfig(method=method, weights=parsed, density=density, seed=seed)
    if output.exists() and not force:
        raise LoramemError(f"{output} already exists; use --force to replace it")
    sources = check_sources(adapters, config)
    lm = _load(model or base_model_id(sources), device, dtype)
    summary = merge_adapters(lm, adapters, output, config, force=force)
    if as_json:
        _print_json(summary)
    else:
        log(f"merged {summary['n_sources']} adapters ({method}, rank {summary['rank']}) -> {output}")


library_app = typer.Typer(help="Adapter libraries: many documents, each with its adapter (and cache), routed by "
                          "embeddings.", no_args_is_help=True)
app.add_typer(library_app, name="library")


@library_app.command("add")
def library_add(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder (created by the first add)"),
    documents: list[str] = typer.Argument(..., metavar="DOC...", help="Document text files"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Copy this adapter instead of training one "
                                           "(one DOC)"),
    doc_id: Optional[str] = typer.Option(None, "--id", help="Document id (one DOC) [default: the file name]"),
    with_cache: bool = typer.Option(False, "--with-cache", help="Also store each document's KV cache"),
    truncate: bool = typer.Option(False, "--truncate", help="--with-cache: cut a document longer than the context"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Local sentence-embedding model directory "
                                            "(mean-pooled) [default: all-MiniLM-L6-v2]"),
    qa: Optional[str] = typer.Option(None, "--qa", help="JSONL of {question, answer} training pairs (one DOC)"),
    synth: int = typer.Option(16, "--synth", help="Without --qa: synthesize this many pairs per document"),
    fmt: str = typer.Option("qa", "--format", help="qa (closed-book QA), ntp (raw text) or mixed"),
    rank: int = RankOpt,
    lr: Optional[float] = LrOpt,
    epochs: int = typer.Option(8, "--epochs"),
    steps: Optional[int] = StepsOpt,
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model [default: the library's, else the "
                                        "embedded SmolLM2-135M-Instruct]"),
    device: str = DeviceOpt, dtype: str = DtypeOpt, as_json: bool = JsonOpt,
) -> None:
    """Add documents to a library: train (or copy) each one's adapter and index its chunks; known ones are skipped."""
    from dataclasses import replace

    from loramem.library import AddOptions, add_documents, open_library
    from loramem.train import TrainConfig

    config = TrainConfig(format=fmt, rank=rank, epochs=epochs, steps=steps, seed=seed)
    if lr is not None:
        config = replace(config, lr=lr)
    options = AddOptions(train=config, synth=synth, qa=qa, adapter=str(adapter) if adapter else None, doc_id=doc_id,
                         with_cache=with_cache, truncate=truncate, embedder=str(embedder) if embedder else None)
    recorded = open_library(lib).base_model_id if lib.exists() else None
    added = add_documents(lib, _load(model or recorded, device, dtype), documents, options)
    if as_json:
        _print_json(added)
    else:
        log(f"added {len(added)} document(s) to {lib}" + (f": {', '.join(d['id'] for d in added)}" if added else ""))


@library_app.command("ls")
def library_ls(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder"),
    as_json: bool = JsonOpt,
) -> None:
    """List a library's documents: id, words, adapter, cache, chunks."""
    from loramem.library import open_library

    documents = open_library(lib).documents
    if as_json:
        _print_json(documents)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "words", "adapter", "cache", "chunks")
    for doc in documents:
        adapter = f"rank {doc['adapter']['rank']}, {doc['adapter']['format'] or '-'}"
        table.add_row(doc["id"], str(doc["words"]), adapter, "yes" if doc["cache"] else "no", str(doc["chunks"]))
    Console(soft_wrap=False).print(table)


@app.command()
def route(
    lib: Path = typer.Argument(..., metavar="LIB", help="Library folder"),
    question: str = typer.Argument(..., help="The question to route"),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many documents to return"),
    as_json: bool = JsonOpt,
) -> None:
    """Rank a library's documents for a question by their best chunk's cosine similarity."""
    from loramem.library import route as route_question

    ranked = route_question(lib, question, top_k)
    if as_json:
        _print_json({"question": question, "documents": [{"id": i, "score": round(s, 6)} for i, s in ranked]})
        return
    sys.stdout.write("".join(f"{doc_id}\t{score:.4f}\n" for doc_id, score in ranked))
    sys.stdout.flush()


class _EvalGroup(TyperGroup):
    """`loramem eval DATA ...` runs an evaluation; `eval merge` and `eval report` are the other subcommands."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(cls=_EvalGroup, no_args_is_help=True,
                       help="The paper's experiment over a dataset: `loramem eval DATA --out RUN_DIR ...`, "
                            "`loramem eval merge RUN_DIR... -o OUT`, `loramem eval report RUN_DIR`.")
app.add_typer(eval_app, name="eval")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@eval_app.command("run")
def eval_run(
    dataset: str = typer.Argument(..., metavar="DATA", help="Dataset JSONL (see `loramem data`)"),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: answers.jsonl, summary.json, curves.png"),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="Compression ratios [default: 0,0.25,0.5,0.75,0.9,1.0; "
                                         "none with --budget-bytes]"),
    press: str = typer.Option("snapkv,knorm", "--press", help="Presses (comma-separated)"),
    mode: str = typer.Option("none,decode,all", "--mode", help="Inference modes: none, decode, all, base_scores; "
                             "library modes: oracle, routed, routed-merge, hybrid, rag"),
    fmt: str = typer.Option("qa,ntp", "--format", help="Adapter training formats: qa, ntp, mixed"),
    granularity: str = typer.Option("token", "--granularity", help="KV eviction: token, value-group "
                                    "(budget = 1 - ratio of value bytes), or both"),
    groups: int = typer.Option(4, "--groups", help="value-group: groups per value head vector"),
    store_dtype: str = typer.Option("native", "--store-dtype", help="KV storage: native, fp16, bf16, int8, "
                                    "int4 (comma-separated: one curve each; bytes.png compares them)"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N documents"),
    shard: str = typer.Option("0/1", "--shard", help="I/N: this process takes documents i with i %% N == I"),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="Reuse adapters from this directory "
                                            "(DOCID-FORMAT subfolders, e.g. another run's adapters/)"),
    library: Optional[Path] = typer.Option(None, "--library", help="Library modes: route over this library "
                                           "(holding every document of the run) instead of building RUN_DIR/library"),
    library_top_k: int = typer.Option(3, "--library-top-k", help="routed-merge, hybrid: documents routed and merged"),
    merge: str = typer.Option("ties", "--merge", help="routed-merge, hybrid: ties, linear, cat, dare_ties or svd"),
    context_chunks: int = typer.Option(2, "--context-chunks", help="hybrid, rag: retrieved chunks in context"),
    budget_bytes: Optional[str] = typer.Option(None, "--budget-bytes", help="Byte budgets (e.g. 8MB,32MiB), each "
                                               "split between kept KV and an adapter at every --budget-ranks point"),
    budget_ranks: str = typer.Option("0,2,8,32", "--budget-ranks", help="Adapter ranks of the budget split "
                                     "(0: the whole budget on KV); a rank whose adapter exceeds a budget is left out"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    synth: int = typer.Option(16, "--synth", help="Training pairs synthesized for documents without train_qa"),
    rank: int = RankOpt,
    targets: str = TargetsOpt,
    layers: Optional[str] = LayersOpt,
    lr: Optional[float] = LrOpt,
    epochs: int = typer.Option(8, "--epochs"),
    steps: Optional[int] = StepsOpt,
    seed: int = typer.Option(0, "--seed"),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run documents as Ray tasks: local (start Ray here), "
                                      "auto or HOST:PORT (join a cluster; RUN_DIR must be shared)"),
    cpus_per_worker: float = typer.Option(1, "--cpus-per-worker", help="--ray: CPUs per task"),
    gpus_per_worker: float = typer.Option(0, "--gpus-per-worker", help="--ray: GPUs per task"),
    max_retries: int = typer.Option(2, "--max-retries", help="--ray: retries of a task whose worker died"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, as_json: bool = JsonOpt,
) -> None:
    """Answer every question under every press, ratio, mode and format; score, summarize and plot."""
    from loramem.evaluate import EvalConfig, parse_shard, run_eval

    from loramem.sizes import parse_size

    extra = {"lr": lr} if lr is not None else {}
    budgets = [parse_size(b) for b in _split(budget_bytes or "")]
    if ratios is None:
        ratios = "" if budgets else "0,0.25,0.5,0.75,0.9,1.0"
    config = EvalConfig(ratios=[_parse_ratio(r) for r in _split(ratios)], presses=_split(press),
                        modes=_split(mode), formats=_split(fmt), granularities=_split(granularity),
                        store_dtypes=_split(store_dtype), groups=groups, max_new_tokens=max_new_tokens, limit=limit,
                        shard=parse_shard(shard), seed=seed, synth_pairs=synth,
                        adapters=str(adapters) if adapters else None, rank=rank, targets=targets, layers=layers,
                        epochs=epochs, steps=steps, library=str(library) if library else None,
                        library_top_k=library_top_k, merge=merge, context_chunks=context_chunks,
                        budget_bytes=budgets, budget_ranks=_integers(budget_ranks, "--budget-ranks"), **extra)
    if ray is not None:
        from loramem.ray_eval import run_eval_ray

        summary = run_eval_ray(model, dataset, out, config, address=ray, device=device, dtype=dtype,
                               resume=resume, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                               max_retries=max_retries)
    else:
        summary = run_eval(_load(model, device, dtype), dataset, out, config, resume=resume)
    _show_summary(summary, as_json)
    if summary.get("n_failed_cells"):
        raise typer.Exit(PARTIAL_EXIT)


@eval_app.command("merge")
def eval_merge(
    runs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run directories of one config (shards)"),
    out: Path = typer.Option(..., "--out", "-o", help="New run directory for the merged answers"),
    as_json: bool = JsonOpt,
) -> None:
    """Combine shard runs into one run directory, then summarize and plot it."""
    from loramem.evaluate import merge

    _show_summary(merge(runs, out), as_json)


@eval_app.command("report")
def eval_report(
    run: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory"),
    metric: str = typer.Option("rouge_l", "--metric", help="Table metric: rouge_l, exact_match, token_f1, contains"),
    as_json: bool = JsonOpt,
) -> None:
    """Recompute summary.json and the plots from answers.jsonl and print the table."""
    from loramem.report import METRICS, write_report

    if metric not in METRICS:
        raise LoramemError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    _show_summary(write_report(run), as_json, metric)


def _show_summary(summary: dict[str, Any], as_json: bool, metric: str = "rouge_l") -> None:
    """The summary as JSON on stdout, or as the rich table (also on stdout: it is the result)."""
    if as_json:
        _print_json(summary)
        return
    from rich.console import Console

    from loramem.report import print_table

    print_table(summary, Console(soft_wrap=False), metric)


probe_app = typer.Typer(help="Probes of what adapters can hold.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")


@probe_app.command("capacity")
def probe_capacity(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for capacity.json, capacity.png and the adapters"),
    ranks: str = typer.Option("4,16,64", "--ranks", help="LoRA ranks"),
    facts: str = typer.Option("50,200,800", "--facts", help="Fact-set sizes (invented phone numbers)"),
    targets: str = TargetsOpt,
    layers: Optional[str] = LayersOpt,
    epochs: int = typer.Option(10, "--epochs"),
    lr: Optional[float] = LrOpt,
    threshold: float = typer.Option(0.9, "--threshold", help="Recall that counts as stored, for saturation"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, as_json: bool = JsonOpt,
) -> None:
    """Train one adapter per (rank, number of facts) on invented facts and measure exact-match recall."""
    from loramem.log import progress_bar
    from loramem.probe import ProbeConfig, run_probe

    config = ProbeConfig(ranks=_integers(ranks, "--ranks"), facts=_integers(facts, "--facts"), targets=targets,
                         layers=layers, epochs=epochs, threshold=threshold, seed=seed,
                         **({"lr": lr} if lr is not None else {}))
    lm = _load(model, device, dtype)
    with progress_bar("probing", len(config.ranks) * len(config.facts) * 2) as advance:
        result = run_probe(lm, config, out, on_step=lambda text: advance(1, status=text))
    if as_json:
        _print_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LoRA capacity · {result['model']} · targets {targets}" + (f" · layers {layers}" if layers else ""))
    for column in ("rank", "facts", "trainable params", "recall", "facts stored", "facts / M params"):
        table.add_column(column, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["rank"]), str(r["facts"]), f"{r['trainable_parameters']:,}", f"{r['recall']:.3f}",
                      f"{r['facts_stored']:g}", f"{r['facts_per_million_parameters']:.2f}")
    Console(soft_wrap=False).print(table)
    for s in result["saturation"]:
        sys.stdout.write(f"rank {s['rank']}: saturates at {s['saturation_facts'] or '<' + str(config.facts[0])} "
                         f"facts (recall >= {threshold}); at most {s['max_facts_stored']:g} stored\n")


def _integers(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in _split(text)]
    except ValueError as exc:
        raise LoramemError(f"{what} must be comma-separated integers, got {text!r}") from exc


def _parse_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise LoramemError(f"not a ratio: {text!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise LoramemError(f"ratio must be in [0, 1], got {value}")
    return value


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: one-line errors, meaningful exit codes, no tracebacks unless LORAMEM_DEBUG=1."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(standalone_mode=False)
    except LoramemError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if os.environ.get("LORAMEM_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        console.print(f"[red]internal error:[/red] {message} (set LORAMEM_DEBUG=1 for details)", highlight=False)
        sys.exit(1)
