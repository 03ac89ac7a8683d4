"""merge: several document adapters combined into one PEFT LoRA by PEFT's own add_weighted_adapter.

The arithmetic is PEFT's, untouched, so a merged adapter is exactly what PEFT users would get; this
module only checks the inputs first (PEFT's own errors are long or, for mismatched layers, absent)
and records where the result came from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramem._version import __version__
from loramem.adapters.attach import LORAMEM_META, adapter_sha256, detach_adapter, read_adapter_meta
from loramem.adapters.validate import is_adapter_folder
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.fileio import atomic_directory
from loramem.model.loading import LoadedModel
from loramem.model.prompt import check_template_record
from loramem.specs.train import MergeSpec
from loramem.vocab import DENSITY_METHODS, EQUAL_RANK_METHODS

_MERGED = "default"  # PEFT saves the adapter named "default" at the top of the output folder


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
    """Load the adapters onto `lm`, combine them with PEFT and write the result; `lm` is left as it was."""
    from peft import PeftModel

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
    names = [f"source{i}" for i in range(len(sources))]
    detach_adapter(lm)
    with atomic_directory(out_dir, force=force, ours=is_adapter_folder) as tmp:
        peft_model = None
        try:
            peft_model = PeftModel.from_pretrained(lm.model, str(sources[0].path), adapter_name=names[0])
            for name, source in zip(names[1:], sources[1:]):
                peft_model.load_adapter(str(source.path), adapter_name=name)
            torch.manual_seed(config.seed)
            peft_model.add_weighted_adapter(names, weights, _MERGED, combination_type=config.method, density=density)
            peft_model.save_pretrained(str(tmp), selected_adapters=[_MERGED])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LoramemError(f"PEFT could not merge these adapters: {str(exc).splitlines()[0]}") from exc
        finally:  # the caller's model must not keep any LoRA layers
            if peft_model is not None:
                lm.model = peft_model.unload()
                lm.model.eval()
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
