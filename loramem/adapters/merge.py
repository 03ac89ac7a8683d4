"""merge: several document adapters combined into one PEFT LoRA, exactly as PEFT's add_weighted_adapter does.

The arithmetic is PEFT's (`peft.utils.merge_utils`), so a merged adapter is exactly what PEFT users would get
(tests compare every tensor). ties, linear, cat and svd are computed on the adapters' tensors as read from their
files, module by module as add_weighted_adapter does, without loading them onto the model: PEFT's way injects
every source and the result into the model first, which took most of a library study's time (a merge per
routed question). dare_ties goes through add_weighted_adapter on the model, because its random drop follows
the random numbers that PEFT's injection draws first. This module also checks the inputs first (PEFT's own
errors are long or, for mismatched layers, absent) and records where the result came from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loramem._version import __version__
from loramem.adapters.attach import (
    ADAPTER_WEIGHTS,
    LORAMEM_META,
    adapter_sha256,
    detach_adapter,
    read_adapter_meta,
)
from loramem.adapters.validate import is_adapter_folder, module_scale
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.fileio import atomic_directory
from loramem.model.loading import LoadedModel
from loramem.model.prompt import check_template_record
from loramem.specs.train import MergeSpec
from loramem.vocab import DENSITY_METHODS, EQUAL_RANK_METHODS

_MERGED = "default"  # PEFT saves the adapter named "default" at the top of the output folder
TENSOR_METHODS = ("ties", "linear", "cat", "svd")  # merged on the tensors; the others on the model
_PAIR = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


@dataclass
class Source:
    """One input adapter with what the checks and the record need."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank in the adapter, as PEFT counts it for merging."""
        return max([int(self.config.get("r", 8)), *map(int, (self.config.get("rank_pattern") or {}).values())])

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("base_model", {}).get("model")


def check_sources(paths: Sequence[str | Path], config: MergeSpec) -> list[Source]:
    """Read and check the adapters before any model is loaded: count, weights, base model, ranks, layers."""
    if len(paths) < 2:
        raise LoramemError(f"merging needs at least 2 adapters, got {len(paths)}")
    if config.weights is not None and len(config.weights) != len(paths):
        raise LoramemError(f"{len(config.weights)} weights for {len(paths)} adapters; give one weight per adapter")
    sources = [Source(Path(p), *read_adapter_meta(p)) for p in paths]
    for source in sources:
        if source.config.get("peft_type", "LORA") != "LORA":
            raise LoramemError(f"{source.path} is a {source.config.get('peft_type')} adapter; only LoRA adapters merge")
    known = [s for s in sources if s.fingerprint]
    for source in known[1:]:
        if source.fingerprint != known[0].fingerprint:
            raise IncompatibleArtifactError(
                f"{source.path} and {known[0].path} were trained on different base models "
                f"({source.meta['base_model'].get('id', '?')} vs {known[0].meta['base_model'].get('id', '?')})"
            )
    ranks = [s.rank for s in sources]
    if config.method in EQUAL_RANK_METHODS and len(set(ranks)) > 1:
        raise LoramemError(
            f"--method {config.method} needs adapters of equal rank, got ranks "
            f"{', '.join(map(str, ranks))}; use --method cat or svd"
        )
    layers = {json.dumps(s.config.get("layers_to_transform")) for s in sources}
    if len(layers) > 1:  # PEFT gives the merged adapter the first one's layers and drops the others' silently
        raise LoramemError(
            "the adapters were trained on different layers (layers_to_transform); PEFT can only "
            "merge adapters of the same layers"
        )
    return sources


def base_model_id(sources: list[Source]) -> str | None:
    """The base model the adapters name: loramem's record, else PEFT's base_model_name_or_path."""
    for source in sources:
        name = source.meta.get("base_model", {}).get("id") or source.config.get("base_model_name_or_path")
        if name:
            return str(name)
    return None


def merge_adapters(
    lm: LoadedModel, paths: Sequence[str | Path], out_dir: str | Path, config: MergeSpec, *, force: bool = False
) -> dict[str, Any]:
    """Combine the adapters as PEFT does and write the result; `lm`'s attached adapter, if any, is left as it was
    except by dare_ties (which detaches it)."""
    sources = check_sources(paths, config)
    for source in sources:
        if source.fingerprint and source.fingerprint != lm.fingerprint["model"]:
            raise IncompatibleArtifactError(
                f"adapter {source.path} was trained on another base model "
                f"({source.meta['base_model'].get('id', '?')}) than {lm.model_id}"
            )
        if source.meta.get("base_model"):
            check_template_record(source.meta["base_model"], lm.fingerprint, f"adapter {source.path}")
    weights = [float(w) for w in config.weights] if config.weights is not None else [1.0] * len(sources)
    density = config.density if config.method in DENSITY_METHODS else None
    with atomic_directory(out_dir, force=force, ours=is_adapter_folder) as tmp:
        state = _read_pairs(sources) if config.method in TENSOR_METHODS else None
        try:
            if state is not None:
                _merge_tensors(lm, sources, state, weights, config.method, density, tmp)
            else:
                _merge_on_model(lm, sources, weights, config, density, tmp)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LoramemError(f"PEFT could not merge these adapters: {str(exc).splitlines()[0]}") from exc
        meta = {
            "loramem_version": __version__,
            "base_model": {"id": lm.model_id, **lm.fingerprint},
            "merge": {
                "method": config.method,
                "weights": weights,
                "density": density,
                "seed": config.seed if config.method == "dare_ties" else None,
                "sources": [
                    {
                        "path": str(s.path),
                        "adapter_sha256": adapter_sha256(s.path),
                        "document_sha256": s.meta.get("document_sha256"),
                        "rank": s.rank,
                    }
                    for s in sources
                ],
            },
        }
        (tmp / LORAMEM_META).write_text(json.dumps(meta, indent=2) + "\n")
        rank = read_adapter_meta(tmp)[0]["r"]  # what is written must be an adapter that loramem itself accepts
    return {"path": str(out_dir), "method": config.method, "rank": rank, "n_sources": len(sources)}


Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (lora_A, lora_B)


def _read_pairs(sources: list[Source]) -> list[Pairs] | None:
    """Each source's LoRA pairs by module, in float32 as PEFT holds loaded adapter weights; None when a source
    has weights other than linear layers' pairs (embedding LoRA), which the model path merges."""
    from safetensors.torch import load_file

    read = []
    for source in sources:
        tensors = load_file(str(source.path / ADAPTER_WEIGHTS))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _PAIR.fullmatch(key)
            if match is None:
                return None
            parts.setdefault(match["module"], {})[match["part"]] = tensor.to(torch.float32)
        read.append({module: (p["A"], p["B"]) for module, p in parts.items()})
    return read


def _merge_tensors(
    lm: LoadedModel,
    sources: list[Source],
    state: list[Pairs],
    weights: list[float],
    method: str,
    density: float | None,
    out: Path,
) -> None:
    """add_weighted_adapter's arithmetic, module by module, on the sources' tensors, written as PEFT saves it."""
    from peft import LoraConfig
    from peft.utils.merge_utils import task_arithmetic, ties
    from safetensors.torch import save_file

    configs = [LoraConfig.from_pretrained(str(s.path)) for s in sources]
    ranks = [s.rank for s in sources]
    new_rank = sum(ranks) if method == "cat" else ranks[0] if method in EQUAL_RANK_METHODS else max(ranks)
    merged: dict[str, torch.Tensor] = {}
    for module in sorted(set().union(*state), key=_module_order(lm)):
        # Only the adapters with this module, each with its own scaling (alpha over rank, rank_pattern, rslora)
        held = [
            (pairs[module], w, module_scale(s.config, module))
            for pairs, w, s in zip(state, weights, sources)
            if module in pairs
        ]
        if method == "cat":
            a_parts = [a * w * scale for (a, _), w, scale in held]
            b_parts = [b for (_, b), _, _ in held]
            a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
            lora_a = torch.zeros(new_rank, a_cat.shape[1])
            lora_b = torch.zeros(b_cat.shape[0], new_rank)
            lora_a[: a_cat.shape[0], :] = a_cat
            lora_b[:, : b_cat.shape[1]] = b_cat
        elif method == "svd":
            deltas = [(b @ a) * scale for (a, b), _, scale in held]
            delta = task_arithmetic(deltas, torch.tensor([w for _, w, _ in held]))
            u, s, vh = torch.linalg.svd(delta, full_matrices=True)
            lora_a, lora_b = vh[:new_rank, :], u[:, :new_rank] @ torch.diag(s[:new_rank])
        else:
            scaled = [w * scale for _, w, scale in held]
            # The sign on one side only, so that a negative weight negates the update once
            weights_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
            weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
            sides = []
            for side, side_weights in ((0, weights_a), (1, weights_b)):
                tensors = [pair[side] for pair, _, _ in held]
                if method == "linear":
                    sides.append(task_arithmetic(tensors, side_weights))
                else:
                    assert density is not None
                    sides.append(ties(tensors, side_weights, density, "total"))
            lora_a, lora_b = sides
        merged[f"{module}.lora_A.weight"] = lora_a.contiguous()
        merged[f"{module}.lora_B.weight"] = lora_b.contiguous()
    first = configs[0]
    targets: list[Any] = [c.target_modules for c in configs]  # a set (PEFT's for a list) or a pattern
    if len({type(t) for t in targets}) > 1:
        raise ValueError("the adapters name their target modules in different ways (a list and a pattern)")
    union: Any = "|".join(f"({t})" for t in targets) if isinstance(targets[0], str) else set().union(*targets)
    result = replace(first, r=new_rank, lora_alpha=new_rank, target_modules=union, alpha_pattern={}, rank_pattern={})
    result.inference_mode = True
    result.save_pretrained(str(out))
    save_file(merged, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _module_order(lm: LoadedModel) -> Any:
    """Sort key: a module's place in the model, as PEFT walks them (names not in the model last, by name)."""
    order = {f"base_model.model.{name}": i for i, name in enumerate(n for n, _ in lm.model.named_modules())}
    return lambda module: (order.get(module, len(order)), module)


def _merge_on_model(
    lm: LoadedModel, sources: list[Source], weights: list[float], config: MergeSpec, density: float | None, out: Path
) -> None:
    """add_weighted_adapter itself, the sources loaded onto the model and removed after (`lm` ends detached)."""
    from peft import PeftModel

    names = [f"source{i}" for i in range(len(sources))]
    detach_adapter(lm)
    peft_model = None
    try:
        peft_model = PeftModel.from_pretrained(lm.model, str(sources[0].path), adapter_name=names[0])
        for name, source in zip(names[1:], sources[1:]):
            peft_model.load_adapter(str(source.path), adapter_name=name)
        torch.manual_seed(config.seed)
        peft_model.add_weighted_adapter(names, weights, _MERGED, combination_type=config.method, density=density)
        peft_model.save_pretrained(str(out), selected_adapters=[_MERGED])
    finally:  # the caller's model must not keep any LoRA layers
        if peft_model is not None:
            lm.model = peft_model.unload()
            lm.model.eval()
