"""inspect: what is inside a KV-cache artifact or an adapter directory, as plain data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loramem.adapters.attach import ADAPTER_WEIGHTS, read_adapter_meta, weights_size
from loramem.kv.cache import KVCache
from loramem.model.loading import local_config


def _ranges(values: list[int]) -> str:
    """[5, 5, 5, 7] -> '5 (layers 0-2), 7 (layer 3)': kept counts per layer, compactly."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            span = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            parts.append(f"{values[start]} ({span})")
            start = i
    return ", ".join(parts)


_ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5, "float32": 4}


def _value_groups(cache: KVCache) -> dict[str, Any] | None:
    """Budget, groups kept per layer, and bytes against a token-level cache at the same budget."""
    if cache.masks is None:
        return None
    step = cache.meta["compression"]
    protected = int(cache.meta.get("n_protected", 0))
    tokens = protected + int(step["budget"] * (cache.n_tokens - protected))
    element = _ELEMENT_BYTES.get(cache.storage.dtype, cache.keys[0].element_size())
    heads, dim = cache.keys[0].shape[0], cache.keys[0].shape[-1]
    return {
        "groups": step["groups"],
        "budget": step["budget"],
        "score_groups": step["score_groups"],
        "query": step.get("query"),
        "groups_kept_per_layer": [int(m.sum()) for m in cache.masks],
        "groups_total_per_layer": int(cache.masks[0].shape[0] * cache.n_tokens * step["groups"]),
        "token_level_bytes_at_same_budget": int(cache.n_layers * heads * tokens * dim * 2 * element),
    }


def describe_cache(cache: KVCache, nbytes: int | None = None) -> dict[str, Any]:
    meta = cache.meta
    kept = cache.kept_per_layer
    per_head = [[int(p.shape[-1])] * int(p.shape[0]) for p in cache.positions]
    return {
        "kind": "kv-cache",
        "model": meta["model"].get("id"),
        "model_fingerprint": meta["model"].get("model"),
        "document_sha256": meta["document"]["sha256"],
        "document_preview": meta["document"]["preview"],
        "tokens_total": cache.n_tokens,
        "framing_tokens": meta.get("n_protected", 0),
        "kept_per_layer": kept,
        "kept_per_head": per_head,
        "kept_summary": _ranges(kept),
        "kept_fraction": round(sum(kept) / (cache.n_tokens * cache.n_layers), 4) if cache.n_layers else 0.0,
        "layers": cache.n_layers,
        "kv_heads": meta.get("n_kv_heads"),
        "head_dim": meta.get("head_dim"),
        "dtype": meta.get("dtype"),
        "kv_bytes": cache.nbytes_stored,
        "storage": cache.storage.to_dict(),
        "value_groups": _value_groups(cache),
        "file_bytes": nbytes,
        "press": (meta.get("compression") or {}).get("press"),
        "ratio": (meta.get("compression") or {}).get("ratio"),
        "keep": (meta.get("compression") or {}).get("keep"),
        "history": meta.get("history", []),
        "scores_recorded": sorted(cache.scores),
        "framing": meta.get("framing", {}).get("style"),
        "adapter_at_prefill": meta.get("adapter"),
        "truncated": meta.get("truncated", False),
        "created": meta.get("created"),
        "loramem_version": meta.get("loramem_version"),
        "format_version": meta.get("format_version"),
    }


def kv_bytes_per_token(config: dict[str, Any]) -> tuple[int, torch.dtype] | None:
    """(bytes, dtype) of one token's keys and values in a model's KV cache, from its config.json:
    layers x KV heads x head_dim x 2 (K and V) x bytes of the checkpoint dtype; None when not stated."""
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    heads, layers = config.get("num_attention_heads"), config.get("num_hidden_layers")
    if not isinstance(dtype, torch.dtype) or not heads or not layers:
        return None
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return (layers * kv_heads * head_dim * 2 * dtype.itemsize, dtype) if head_dim else None


def _equal_memory(base_model: str | None, parameters: int, tensor_bytes: int) -> dict[str, Any]:
    """The adapter's size in KV-cache tokens of its base model: the two memories compared at equal bytes.

    Counted as stored and with the parameters at the KV dtype; null when the base model's config is not
    on this machine (nothing is downloaded).
    """
    config = local_config(base_model) if base_model else None
    kv = kv_bytes_per_token(config) if config else None
    if kv is None:
        return {
            "kv_dtype": None,
            "kv_bytes_per_token": None,
            "kv_token_equivalents": None,
            "kv_token_equivalents_at_kv_dtype": None,
        }
    per_token, dtype = kv
    return {
        "kv_dtype": str(dtype).replace("torch.", ""),
        "kv_bytes_per_token": per_token,
        "kv_token_equivalents": round(tensor_bytes / per_token, 2),
        "kv_token_equivalents_at_kv_dtype": round(parameters * dtype.itemsize / per_token, 2),
    }


def describe_adapter(path: str | Path) -> dict[str, Any]:
    config, meta = read_adapter_meta(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    base_model = meta.get("base_model", {}).get("id") or config.get("base_model_name_or_path")
    parameters, tensor_bytes = weights_size(weights)
    return {
        "kind": "adapter",
        "path": str(path),
        "base_model": base_model,
        "base_model_fingerprint": meta.get("base_model", {}).get("model"),
        "document_sha256": meta.get("document_sha256"),
        "format": meta.get("format"),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "use_rslora": bool(config.get("use_rslora")),
        "targets": config.get("target_modules"),
        "layers": config.get("layers_to_transform"),
        "trainable_parameters": meta.get("trainable_parameters"),
        "bytes": weights.stat().st_size,
        "parameters": parameters,
        "tensor_bytes": tensor_bytes,
        **_equal_memory(base_model, parameters, tensor_bytes),
        "final_loss": meta.get("final_loss"),
        "hyperparameters": meta.get("hyperparameters"),
    }
