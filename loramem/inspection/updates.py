"""What an adapter changes, per layer and module: the Frobenius norm of its update dW = scale * B @ A, and the
cosine between two adapters' updates, each from r x r Gram matrices (no out x in matrix is ever formed)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramem.adapters.validate import check_adapter, layer_index, lora_pairs, module_scale, short_model_name
from loramem.errors import IncompatibleArtifactError


@dataclass(frozen=True)
class Factor:
    """One module's update as its factors: dW = scale * b @ a, in float64."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    def inner(self, other: Factor) -> float:
        """<dW1, dW2>_F = s1 s2 trace((B1^T B2)(A2 A1^T)): two r x r products instead of two out x in matrices."""
        left, right = self.b.T @ other.b, other.a @ self.a.T
        return self.scale * other.scale * float((left * right.T).sum())

    def norm(self) -> float:
        """||dW||_F = |s| sqrt(trace((B^T B)(A A^T))), clamped at 0 against rounding."""
        return math.sqrt(max(self.inner(self), 0.0))


@dataclass
class Updates:
    """An adapter's factors by (layer, module), with what identifies its base model."""

    path: str
    factors: dict[tuple[int | None, str], Factor]
    base_fingerprint: str | None  # loramem.json's record of the base model, when the adapter has one
    base_name: str | None  # the last part of adapter_config's base_model_name_or_path

    @property
    def layers(self) -> list[int | None]:
        return sorted({layer for layer, _ in self.factors}, key=lambda x: (x is None, x or 0))

    @property
    def modules(self) -> list[str]:
        return sorted({module for _, module in self.factors})

    def shapes(self) -> dict[tuple[int | None, str], tuple[int, int]]:
        return {key: (int(f.b.shape[0]), int(f.a.shape[1])) for key, f in self.factors.items()}


def _module_tail(module: str, layer: int | None) -> str:
    """The module's name within its layer (self_attn.q_proj), or its whole name outside any layer (lm_head)."""
    if layer is None:
        return module
    return re.split(rf"\.{layer}\.", module, maxsplit=1)[-1]


def read_updates(path: str | Path) -> Updates:
    """A checked adapter's LoRA factors in float64, each with the scaling PEFT applies to its module."""
    config, meta = check_adapter(path)
    factors = {}
    for module, (a, b) in lora_pairs(path).items():
        layer = layer_index(module, config.get("layers_pattern"))
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # a convolution's kernel as columns of A
        factors[(layer, _module_tail(module, layer))] = Factor(
            a.to(torch.float64), b.to(torch.float64), module_scale(config, module)
        )
    named = short_model_name(str(config.get("base_model_name_or_path") or ""))
    return Updates(str(path), factors, (meta.get("base_model") or {}).get("model"), named or None)


def norm_table(updates: Updates) -> dict[str, Any]:
    """||dW||_F per layer (rows) and module (columns); null where the adapter has no such module."""
    modules = updates.modules
    rows = [
        [round(f.norm(), 8) if (f := updates.factors.get((layer, m))) is not None else None for m in modules]
        for layer in updates.layers
    ]
    return {"layers": updates.layers, "modules": modules, "frobenius": rows}


def check_comparable(all_updates: list[Updates]) -> None:
    """Adapters compare only when they change the same modules, of the same shapes, of one base model."""
    first = all_updates[0]
    for other in all_updates[1:]:
        by_fingerprint = first.base_fingerprint and other.base_fingerprint
        same = (
            first.base_fingerprint == other.base_fingerprint
            if by_fingerprint
            else not (first.base_name and other.base_name) or first.base_name == other.base_name
        )
        if not same:
            raise IncompatibleArtifactError(
                f"adapters {first.path} and {other.path} were made for different base models"
            )
        if first.shapes() != other.shapes():
            raise IncompatibleArtifactError(
                f"adapters {first.path} and {other.path} change different modules or shapes; they do not compare"
            )


def _cosine(a: Updates, b: Updates, keys: list[tuple[int | None, str]]) -> float | None:
    """cos(dW_a, dW_b) over the modules `keys` taken as one vector; null when either update is zero."""
    dot = sum(a.factors[k].inner(b.factors[k]) for k in keys)
    norms = math.sqrt(
        sum(a.factors[k].inner(a.factors[k]) for k in keys) * sum(b.factors[k].inner(b.factors[k]) for k in keys)
    )
    return round(dot / norms, 8) if norms > 0 else None


def compare_adapters(all_updates: list[Updates]) -> dict[str, Any]:
    """Cosine similarity of the adapters' updates: the whole adapter as one vector (a matrix) and layer by layer."""
    check_comparable(all_updates)
    keys = list(all_updates[0].factors)
    layers = all_updates[0].layers
    pairs = [(i, j) for i in range(len(all_updates)) for j in range(i + 1, len(all_updates))]
    matrix = [[1.0 if i == j else None for j in range(len(all_updates))] for i in range(len(all_updates))]
    per_layer = []
    for i, j in pairs:
        matrix[i][j] = matrix[j][i] = _cosine(all_updates[i], all_updates[j], keys)
        per_layer.append(
            {
                "adapters": [i, j],
                "cosine": [
                    _cosine(all_updates[i], all_updates[j], [k for k in keys if k[0] == layer]) for layer in layers
                ],
            }
        )
    return {
        "kind": "adapter-comparison",
        "adapters": [u.path for u in all_updates],
        "layers": layers,
        "cosine": matrix,
        "per_layer": per_layer,
    }
