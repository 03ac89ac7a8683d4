"""Benchmark: `train_adapter` vs a plain PEFT + transformers loop and the HF Trainer, same data, one run.

All three train the same LoRA (TrainSpec defaults) on the same examples for the same number of
steps: the demo document's rule-synthesized QA pairs (plus its text chunks with --format mixed).
Methods run interleaved --repeats times and the fastest run of each counts, so that other load on
the machine does not decide the ratio.
Throughput counts real (non-padding) tokens per second of training; wall seconds include setup
(wrapping the model, for the Trainer its own start-up) but not loading the base model again.
`train_adapter_one_call` is train_adapter with every batch in one padded call, which shows what its length
groups save (`--format ntp`: a document's short last chunk no longer pads to full length).
Prints a JSON line and a summary.
Usage: python benchmarks/train_throughput.py [--pairs 16] [--steps 16] [--repeats 2] [--format qa] [--model ID]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from loramem import load_model
from loramem.adapters.train import build_examples, collate, resolve_targets, schedule, train_adapter
from loramem.data.synth import rule_qa
from loramem.specs import TrainSpec

REPO = Path(__file__).resolve().parent.parent


def base_copy(lm):
    """The base model loaded again, as a plain PEFT script would start (not timed)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lm.model.config._name_or_path, dtype=lm.dtype).to(lm.device)


def wrap(model, config: TrainSpec):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=resolve_targets(model, config.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def plain_loop(lm, examples, config: TrainSpec) -> tuple[float, float, int]:
    """(training seconds, wall seconds, tokens): AdamW over the same batches, HF's own loss on full logits."""
    base = base_copy(lm)
    started = time.perf_counter()
    model = wrap(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    pad = lm.tokenizer.pad_token_id or 0
    tokens, loop_start = 0, time.perf_counter()
    for batch in schedule(len(examples), config):
        ids, mask, labels = collate([examples[i] for i in batch], pad, lm.device)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    done = time.perf_counter()
    return done - loop_start, done - started, tokens


def hf_trainer(lm, examples, config: TrainSpec, steps: int) -> tuple[float, float, int]:
    """(training seconds, wall seconds, tokens) of transformers.Trainer on the same examples and step count."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    base = base_copy(lm)
    tokens = [0]

    def collate_and_count(batch):
        ids, mask, labels = collate(batch, lm.tokenizer.pad_token_id or 0, "cpu")
        tokens[0] += int(mask.sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=config.batch_size,
            max_steps=steps,
            learning_rate=config.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            seed=config.seed,
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=str(lm.device) == "cpu",
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=wrap(base, config), args=args, train_dataset=examples, data_collator=collate_and_count)
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics to stdout
        loop_start = time.perf_counter()
        trainer.train()
        done = time.perf_counter()
    return done - loop_start, done - started, tokens[0]


def ours(lm, document, qa, examples, config: TrainSpec) -> tuple[float, float, int]:
    """(training seconds, wall seconds, tokens) of train_adapter, writing and unloading included in the wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = train_adapter(lm, document, qa, Path(tmp) / "a", config)
        wall = time.perf_counter() - started
    tokens = sum(len(examples[i].ids) for batch in schedule(len(examples), config) for i in batch)
    return summary["seconds"], wall, tokens


def ours_one_call(lm, document, qa, examples, config: TrainSpec) -> tuple[float, float, int]:
    """train_adapter with every batch in one padded forward call (no length groups), for the groups' own gain."""
    from loramem.adapters import train

    kept, train.PAD_SLACK = train.PAD_SLACK, math.inf
    try:
        return ours(lm, document, qa, examples, config)
    finally:
        train.PAD_SLACK = kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--format", default="qa")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per method; the fastest counts")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    lm = load_model(args.model, device=args.device)
    document = (REPO / "examples/demo/lighthouse.txt").read_text()
    qa = rule_qa(document, args.pairs)
    config = TrainSpec(format=args.format, steps=args.steps)
    examples = build_examples(lm.tokenizer, document, qa, config)
    methods = {
        "train_adapter": lambda: ours(lm, document, qa, examples, config),
        "plain_peft_loop": lambda: plain_loop(lm, examples, config),
        "hf_trainer": lambda: hf_trainer(lm, examples, config, args.steps),
        "train_adapter_one_call": lambda: ours_one_call(lm, document, qa, examples, config),
    }
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in methods}
    for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits every method alike
        for name, run in methods.items():
            runs[name].append(run())
    result = {"examples": len(examples), "steps": args.steps, "format": args.format, "device": str(lm.device)}
    for name, measured in runs.items():
        train_s, wall_s, tokens = min(measured)
        result[name] = {
            "tokens_per_second": round(tokens / train_s, 1),
            "train_seconds": round(train_s, 2),
            "wall_seconds": round(wall_s, 2),
            "all_train_seconds": [round(m[0], 2) for m in measured],
        }
    print(json.dumps(result))
    best = result["train_adapter"]
    for name in ("plain_peft_loop", "hf_trainer", "train_adapter_one_call"):
        ratio = best["tokens_per_second"] / result[name]["tokens_per_second"]
        print(
            f"train_adapter vs {name}: {ratio:.2f}x the tokens/s; wall {best['wall_seconds']} s vs "
            f"{result[name]['wall_seconds']} s"
        )


if __name__ == "__main__":
    main()
