"""Document adapters by training: a LoRA that holds a document in parameters, saved as a PEFT directory.

A plain AdamW loop runs directly on the already loaded model and computes logits only where a
target is predicted (benchmarks/train_throughput.py compares it with a PEFT loop and the HF Trainer).
Afterwards the LoRA layers are removed again, so the same loaded model serves the next command unchanged.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramem._version import __version__
from loramem.adapters.attach import LORAMEM_META, detach_adapter, read_adapter_meta
from loramem.adapters.validate import TRAIN_QA, TRAIN_VIEWS, is_adapter_folder
from loramem.errors import LoramemError
from loramem.fileio import atomic_directory
from loramem.model.loading import LoadedModel, sha256_text
from loramem.model.prompt import Framing, answer_ids, closed_book_ids, common_prefix, document_ids
from loramem.specs.train import TrainSpec, layer_ranges
from loramem.vocab import TARGET_PRESETS

IGNORE = -100
# A module path inside a decoder layer is classified by its parent modules' names, which covers
# Llama/Qwen/Mistral (self_attn, mlp), Phi-3 (qkv_proj, gate_up_proj), GPT-2 (attn, mlp), Falcon
# (self_attention) and MoE experts alike.
_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn", "moe", "expert")
# The first numbered segment is the layer index (lazy match: MoE experts are numbered inside layers).
_LAYER_KEY = re.compile(r"^(?:.*?\.)?(?P<pattern>[^.]+)\.(?P<index>\d+)\.(?P<inner>.+)$")

StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class View:
    """Another text of the document that format mixed trains on as raw text (`loramem.data.views` writes them):
    what kind, from which passage, by whom."""

    kind: str
    passage: int
    text: str
    written_by: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "passage": self.passage, "text": self.text, "written_by": self.written_by}


@dataclass(frozen=True)
class LayerModule:
    """A Linear (or GPT-2 Conv1D) inside a numbered decoder layer, e.g. model.layers.3 + self_attn.q_proj."""

    pattern: str
    index: int
    inner: str
    features: int = field(default=0, compare=False)  # in + out features: a rank-r LoRA on it has r x this

    def matches(self, target: str) -> bool:
        """Whether a PEFT target name selects this module (its path inside the layer, or a suffix of it)."""
        return self.inner == target or self.inner.endswith("." + target)

    @property
    def leaf(self) -> str:
        return self.inner.rsplit(".", 1)[-1]

    @property
    def group(self) -> str | None:
        parents = self.inner.lower().split(".")[:-1]
        for group, words in (("attn", _ATTN_WORDS), ("mlp", _MLP_WORDS)):
            if any(word in part for part in parents for word in words):
                return group
        return None


def layer_modules(model: Any) -> list[LayerModule]:
    """The model's LoRA-able modules inside its decoder layers, in model order."""
    from transformers.pytorch_utils import Conv1D

    found = []
    for name, module in model.named_modules():
        match = _LAYER_KEY.match(name)
        if match and isinstance(module, (torch.nn.Linear, Conv1D)) and "lora_" not in name:
            found.append(LayerModule(match["pattern"], int(match["index"]), match["inner"], sum(module.weight.shape)))
    if not found:
        raise LoramemError("this model has no linear layers inside numbered decoder layers; cannot train a LoRA")
    return found


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _target_names(modules: list[LayerModule], chosen: list[LayerModule]) -> list[str]:
    """PEFT target names: the short module name, or the path inside the layer where the short name is ambiguous."""
    chosen_paths = {m.inner for m in chosen}
    names = []
    for m in chosen:
        shared = any(o.leaf == m.leaf and o.inner not in chosen_paths for o in modules)
        names.append(m.inner if shared else m.leaf)
    return _unique(names)


def resolve_targets(model: Any, targets: str) -> list[str]:
    """PEFT target_modules for a preset (attn, mlp, all) or a comma-separated list of module names."""
    modules = layer_modules(model)
    available = ", ".join(_unique([m.leaf for m in modules]))
    spec = targets.strip().lower()
    if spec in TARGET_PRESETS:
        chosen = [m for m in modules if m.group in ((spec,) if spec != "all" else ("attn", "mlp"))]
        if not chosen:
            raise LoramemError(
                f"cannot tell this model's {spec} projections apart; name them with --targets "
                f"(its layer modules: {available})"
            )
        return _target_names(modules, chosen)
    names = [n.strip() for n in targets.split(",") if n.strip()]
    for name in names:
        if not any(m.matches(name) for m in modules):
            raise LoramemError(
                f"unknown target module {name!r} for this model; use attn, mlp, all or some of: {available}"
            )
    return _unique(names)


def resolve_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """Layer indices for PEFT's layers_to_transform; None trains every layer."""
    if spec is None:
        return None
    parsed = layer_ranges(spec)
    if parsed == "first-half":
        return list(range(n_layers // 2))
    if parsed == "second-half":
        return list(range(n_layers // 2, n_layers))
    assert not isinstance(parsed, str)  # the half keywords are handled above
    indices = sorted({i for low, high in parsed for i in range(low, high + 1)})
    if indices[-1] >= n_layers:
        raise LoramemError(f"layers {spec!r} names layer {indices[-1]}, but the model has layers 0-{n_layers - 1}")
    return indices


def lora_parameters(model: Any, config: TrainSpec) -> int:
    """Parameters of the LoRA that `train_adapter` would add with this config (A: r x in and B: out x r for each
    targeted module, as PEFT builds them): eval plans byte budgets with it before any adapter is trained."""
    modules = layer_modules(model)
    targets = resolve_targets(model, config.targets)
    layers = resolve_layers(config.layers, max(m.index for m in modules) + 1)
    return sum(
        config.rank * m.features
        for m in modules
        if (layers is None or m.index in layers) and any(m.matches(t) for t in targets)
    )


def adapter_element_bytes(model: Any) -> int:
    """Bytes per stored adapter parameter: PEFT keeps LoRA weights of fp16/bf16 models in float32."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32).itemsize


@dataclass
class Example:
    """One training sequence; labels are IGNORE where no loss is taken."""

    ids: list[int]
    labels: list[int]


def qa_examples(
    tokenizer: Any, qa: list[tuple[str, str]], max_length: int, framing: Framing | None = None
) -> list[Example]:
    """Closed-book prompts exactly as `ask` sends them (`framing`: the model's, LoadedModel.framing()), with loss
    on the answer and its end-of-turn token."""
    framing = framing or Framing.for_tokenizer(tokenizer)
    examples = []
    for number, (question, answer) in enumerate(qa, 1):
        prompt, target = closed_book_ids(tokenizer, framing, question), answer_ids(tokenizer, framing, answer)
        if not target:
            raise LoramemError(f"QA pair {number} has an empty answer")
        if len(prompt) + len(target) > max_length:
            raise LoramemError(f"QA pair {number} is {len(prompt) + len(target)} tokens, over max_length {max_length}")
        examples.append(Example(prompt + target, [IGNORE] * len(prompt) + target))
    return examples


def ntp_examples(tokenizer: Any, document: str, chunk_size: int) -> list[Example]:
    """The raw document cut into chunks of chunk_size tokens, every token a target."""
    ids = document_ids(tokenizer, document)
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    return [Example(chunk, list(chunk)) for chunk in chunks if len(chunk) > 1]


def build_examples(
    tokenizer: Any,
    document: str,
    qa: list[tuple[str, str]],
    config: TrainSpec,
    framing: Framing | None = None,
    views: Sequence[str] = (),
) -> list[Example]:
    """The training set that config.format asks for: QA pairs (qa), the raw text (ntp), or both and the document's
    other views, each a raw text too (mixed; `loramem.data.views`)."""
    if config.format in ("qa", "mixed") and not qa:
        raise LoramemError(f"format {config.format} needs question-answer pairs (give a QA file or synthesize some)")
    if views and config.format != "mixed":
        raise LoramemError(f"format {config.format} trains on no views of the document; only mixed does")
    examples = []
    if config.format in ("qa", "mixed"):
        examples += qa_examples(tokenizer, qa, config.max_length, framing)
    if config.format in ("ntp", "mixed"):
        examples += ntp_examples(tokenizer, document, config.chunk_size)
    for view in views:
        examples += ntp_examples(tokenizer, view, config.chunk_size)
    if not examples:
        raise LoramemError("the document is too short to train on (fewer than 2 tokens)")
    return examples


def schedule(n_examples: int, config: TrainSpec) -> list[list[int]]:
    """Batches of example indices: seeded reshuffles per epoch, cut to config.steps when given."""
    rng = random.Random(config.seed)
    per_epoch = math.ceil(n_examples / config.batch_size)
    total = config.steps if config.steps is not None else config.epochs * per_epoch
    batches: list[list[int]] = []
    while len(batches) < total:
        order = list(range(n_examples))
        rng.shuffle(order)
        batches += [order[i : i + config.batch_size] for i in range(0, n_examples, config.batch_size)]
    return batches[:total]


def collate(examples: list[Example], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) for one batch."""
    width = max(len(e.ids) for e in examples)
    ids = [e.ids + [pad_id] * (width - len(e.ids)) for e in examples]
    mask = [[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in examples]
    labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]
    return (torch.tensor(ids, device=device), torch.tensor(mask, device=device), torch.tensor(labels, device=device))


# A shared prefix shorter than this is not worth a second forward call.
MIN_SHARED_PREFIX = 8


def shared_prefix(examples: list[Example]) -> int:
    """Leading tokens every example of a batch shares and no target is predicted from (for QA, the chat framing
    before each question): `batch_loss` runs them once for the whole batch. 0 when not worth it."""
    if len(examples) < 2:
        return 0
    # Position p predicts token p + 1: the prefix ends before the position predicting the first target.
    first_target = min(next((i for i, label in enumerate(e.labels) if label != IGNORE), 0) for e in examples)
    length = common_prefix([e.ids for e in examples], first_target - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


# On a CPU a step's time grows with its tokens, padding included: a batch that would pad more than this share of its
# real tokens runs as groups of similar length (one forward call each) instead. An accelerator pads almost for free
# and pays for each extra call, so there a batch stays one call.
PAD_SLACK = 0.25


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices in groups of similar length, longest first; padded to its longest row, no group's tokens exceed
    its real tokens by more than PAD_SLACK (a 128-token chunk and a 31-token tail: two groups, 159 tokens, not 256)."""
    groups: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        if group and lengths[group[0]] * (len(group) + 1) <= (1 + PAD_SLACK) * sum(lengths[i] for i in [*group, row]):
            group.append(row)
        else:
            groups.append([row])
    return groups


def batch_loss(model: Any, examples: list[Example], pad_id: int, device: Any) -> torch.Tensor:
    """Mean over examples of each example's mean next-token loss, so short answers weigh as much as long chunks.

    Logits are computed only at positions that predict a target (logits_to_keep): for QA that skips
    the vocabulary projection over the prompt (1.1-1.25x HF's own loss on CPU, more for short answers).
    The batch's shared prefix (`shared_prefix`) runs once, as one row whose keys and values every row attends to
    (gradients flow back through them), unless dropout is on: its masks must differ per row. On a CPU, a batch
    without one runs in `length_groups`.
    """
    shared = 0 if model.training else shared_prefix(examples)
    if shared or torch.device(device).type != "cpu":
        groups = [list(range(len(examples)))]
    else:
        groups = length_groups([len(e.ids) for e in examples])
    rows = [_row_losses(model, [examples[i] for i in group], pad_id, device, shared) for group in groups]
    return torch.cat(rows).mean()


def _row_losses(model: Any, examples: list[Example], pad_id: int, device: Any, shared: int) -> torch.Tensor:
    """Each example's mean next-token loss, in one padded forward call (its first `shared` tokens run once)."""
    ids, mask, labels = collate(examples, pad_id, device)
    targets = labels[:, 1:]
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    if shared:
        cache = model(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(len(examples))
        logits = model(
            input_ids=ids[:, shared:], attention_mask=mask, past_key_values=cache, logits_to_keep=keep - shared
        ).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
    picked = targets[:, keep]
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), picked, ignore_index=IGNORE, reduction="none"
    )
    return token_loss.sum(1) / (picked != IGNORE).sum(1)


@dataclass(frozen=True)
class Plateau:
    """When training has converged, judged at the end of each epoch by its mean loss: once the loss is at or under
    `floor`, or has not fallen below (1 - `min_delta`) x the best earlier epoch's for `patience` epochs in a row.
    A fixed epoch count cannot tell capacity from optimisation (a larger adapter may simply need longer), so the
    capacity probe trains each point until this holds, with the epoch count as the cap."""

    patience: int
    min_delta: float
    floor: float = 0.0

    def reached(self, epoch_losses: list[float]) -> bool:
        best, stale = math.inf, 0
        for loss in epoch_losses:
            if loss < best * (1 - self.min_delta):
                best, stale = loss, 0
            else:
                stale += 1
        return bool(epoch_losses) and (stale >= self.patience or epoch_losses[-1] <= self.floor)


@dataclass
class FitResult:
    """Loss per step, seconds spent in the loop, tokens trained on, and whether `stop` ended it before the cap."""

    loss_curve: list[float]
    seconds: float
    tokens: int
    stopped_early: bool = False


def fit(
    model: Any,
    examples: list[Example],
    config: TrainSpec,
    pad_id: int,
    device: Any,
    on_step: StepCallback | None = None,
    stop: Plateau | None = None,
) -> FitResult:
    """Train the model's trainable parameters with AdamW at a constant learning rate, for the steps `schedule`
    gives or, with `stop`, until it says the loss has converged (checked at each epoch's end)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # decay would only pull toward the base
    batches = schedule(len(examples), config)
    model.train(config.dropout > 0)  # as loaded the model is in eval mode: no dropout unless asked for
    per_epoch = math.ceil(len(examples) / config.batch_size)
    curve, epoch_losses, tokens, started = [], [], 0, time.perf_counter()
    for step, batch in enumerate(batches, 1):
        loss = batch_loss(model, [examples[i] for i in batch], pad_id, device)
        if not torch.isfinite(loss):  # an adapter trained on from here would hold NaN or infinite weights
            raise LoramemError(
                f"training diverged at step {step}: the loss became {loss.item()}; nothing was written (lower --lr)"
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 6))
        tokens += sum(len(examples[i].ids) for i in batch)
        if on_step is not None:
            on_step(step, len(batches), curve[-1])
        if stop is not None and step % per_epoch == 0 and step < len(batches):
            epoch_losses.append(sum(curve[-per_epoch:]) / per_epoch)
            if stop.reached(epoch_losses):
                break
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise LoramemError(
            "training diverged: the adapter's weights are no longer finite; nothing was written (lower --lr)"
        )
    return FitResult(curve, time.perf_counter() - started, tokens, len(curve) < len(batches))


def _lora_config(config: TrainSpec, targets: list[str], layers: list[int] | None, pattern: str, base_id: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # PEFT scales by alpha / r: a float works
        lora_dropout=config.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern=pattern if layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_id,
    )


def _write_metadata(
    folder: Path, meta: dict[str, Any], qa: list[tuple[str, str]], written_by: list[str] | None
) -> None:
    (folder / LORAMEM_META).write_text(json.dumps(meta, indent=2) + "\n")
    records = [{"question": q, "answer": a} for q, a in qa]
    for record, writer in zip(records, written_by or []):
        record["written_by"] = writer
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    (folder / TRAIN_QA).write_text("".join(lines))


def train_adapter(
    lm: LoadedModel,
    document: str,
    qa: list[tuple[str, str]],
    out_dir: str | Path,
    config: TrainSpec,
    *,
    force: bool = False,
    qa_file_sha256: str | None = None,
    qa_written_by: list[str] | None = None,
    on_step: StepCallback | None = None,
    stop: Plateau | None = None,
    views: Sequence[View] = (),
) -> dict[str, Any]:
    """Train a document LoRA on `lm` and write it as a PEFT adapter directory; `lm` is left as it was.

    `qa_written_by` names who wrote each synthesized pair (synthesize_pairs); it is kept with the pairs. `stop`
    ends training once the loss has converged (`Plateau`), the configured epochs or steps being the cap. `views`
    (format mixed: `loramem.data.views.document_views`) are kept beside the adapter in train_views.jsonl."""
    from peft import get_peft_model

    if not document.strip():
        raise LoramemError("the document is empty; nothing to train on")
    if qa_written_by is not None and len(qa_written_by) != len(qa):
        raise LoramemError(f"{len(qa_written_by)} writers named for {len(qa)} QA pairs")
    detach_adapter(lm)
    examples = build_examples(lm.tokenizer, document, qa, config, lm.framing(), [v.text for v in views])
    modules = layer_modules(lm.model)
    targets = resolve_targets(lm.model, config.targets)
    layers = resolve_layers(config.layers, max(m.index for m in modules) + 1)
    trained_qa = qa if config.format in ("qa", "mixed") else []
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    with atomic_directory(out_dir, force=force, ours=is_adapter_folder) as tmp:
        torch.manual_seed(config.seed)  # LoRA A matrices are drawn from torch's generator
        peft_model = get_peft_model(lm.model, _lora_config(config, targets, layers, modules[0].pattern, lm.model_id))
        try:
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            result = fit(peft_model, examples, config, pad_id, lm.device, on_step, stop)
            peft_model.save_pretrained(tmp)
        finally:  # also on failure or Ctrl-C: the caller's model must not keep LoRA layers or train mode
            lm.model = peft_model.unload()
            lm.model.eval()
        summary = {
            "trainable_parameters": trainable,
            "steps": len(result.loss_curve),
            "final_loss": result.loss_curve[-1],
            "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 3),
            "tokens_per_second": round(result.tokens / result.seconds, 1) if result.seconds > 0 else 0.0,
        }
        meta = {
            "loramem_version": __version__,
            "base_model": {"id": lm.model_id, **lm.fingerprint},
            "document_sha256": sha256_text(document),
            "format": config.format,
            "hyperparameters": config.model_dump(),
            "target_modules": targets,
            "layers_to_transform": layers,
            **summary,
            "loss_curve": result.loss_curve,
            "qa_file_sha256": qa_file_sha256,
            "n_train_examples": len(examples),
            "n_train_qa": len(trained_qa),
            "qa_written_by": dict(Counter(qa_written_by)) if qa_written_by and trained_qa else None,
            "n_views": dict(Counter(v.kind for v in views)) if views else None,
            "views_written_by": sorted({v.written_by for v in views}) if views else None,
        }
        _write_metadata(tmp, meta, trained_qa, qa_written_by)
        if views:
            lines = [json.dumps(v.to_dict(), ensure_ascii=False) + "\n" for v in views]
            (tmp / TRAIN_VIEWS).write_text("".join(lines))
        read_adapter_meta(tmp)  # what is written must be an adapter that loramem itself accepts
    return {**summary, "path": str(out_dir)}
