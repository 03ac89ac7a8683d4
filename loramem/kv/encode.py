"""encode: one prefill of a framed document into a KV-cache artifact, with press scores recorded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import torch

from loramem._version import __version__
from loramem.errors import LoramemError
from loramem.kv.cache import KVCache
from loramem.kv.presses import make_recorder, streaming_scores
from loramem.kv.validate import FORMAT_VERSION
from loramem.log import warn
from loramem.model.limits import QUESTION_RESERVE
from loramem.model.loading import LoadedModel, adapter_scope, clock, sha256_text
from loramem.model.prompt import DEFAULT_FRAMING, document_ids, prefix_ids
from loramem.specs import EncodeSpec
from loramem.vocab import DEFAULT_PRESSES


def _rope_config(config: Any) -> dict[str, Any]:
    cfg = config.to_dict()
    keys = ("rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings", "head_dim")
    return {k: cfg[k] for k in keys if k in cfg}


def _fit(lm: LoadedModel, prefix: list[int], doc: list[int], truncate: bool) -> list[int]:
    room = lm.max_length - QUESTION_RESERVE - len(prefix)
    if len(doc) <= room:
        return doc
    if not truncate:
        raise LoramemError(
            f"document has {len(doc)} tokens; the model's context leaves room for {room} "
            f"(context {lm.max_length}, {QUESTION_RESERVE} kept for the question); use --truncate"
        )
    warn(f"document truncated from {len(doc)} to {room} tokens to fit the model's context")
    return doc[:room]


def prefill(
    lm: LoadedModel,
    input_ids: list[int],
    presses: list[str],
    on_layer: Callable[[int], None] | None = None,
) -> tuple[Any, dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Run the model once over `input_ids`: its DynamicCache, per-press scores [L, H, N], presses skipped and
    presses whose settings had to be adjusted to the input (name -> reason)."""
    from transformers import DynamicCache

    recorder = make_recorder(presses)
    recorder.on_layer = on_layer
    ids = torch.tensor([input_ids], device=lm.device)
    cache = DynamicCache()
    with torch.inference_mode(), recorder(lm.model):
        lm.model.model(input_ids=ids, past_key_values=cache, use_cache=True)
    n_layers = lm.config.num_hidden_layers
    scores = {
        name: torch.stack([per_layer[i] for i in range(n_layers)])
        for name, per_layer in recorder.scores.items()
        if len(per_layer) == n_layers
    }
    if "streaming_llm" in presses:
        first_keys = cache.layers[0].keys
        assert first_keys is not None  # filled by the prefill above
        n_heads = first_keys.shape[1]
        scores["streaming_llm"] = streaming_scores(n_heads, len(input_ids)).expand(n_layers, -1, -1).clone()
    return cache, scores, dict(recorder.skipped), dict(recorder.adjusted)


def encode(
    lm: LoadedModel,
    document: str,
    *,
    presses: Sequence[str] | None = None,
    framing: str = DEFAULT_FRAMING,
    truncate: bool = False,
    with_adapter: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> KVCache:
    """Prefill a document once and keep its KV cache, framed so a question can follow.

    `with_adapter` encodes with the attached adapter switched on (the paper's adapter-prefill
    controls); otherwise the base model encodes even when an adapter is attached.
    """
    if not document.strip():
        raise LoramemError("document is empty")
    chosen: list[str] = list(EncodeSpec.parse({"score": list(presses)}).score if presses else DEFAULT_PRESSES)
    frame = lm.framing(framing)
    head = prefix_ids(lm.tokenizer, frame)
    full = document_ids(lm.tokenizer, document)
    doc = _fit(lm, head, full, truncate)
    if not doc:
        raise LoramemError("document is empty after tokenization")
    input_ids = head + doc
    started = clock(lm.device)
    with adapter_scope(lm, with_adapter):
        kv, scores, skipped, adjusted = prefill(lm, input_ids, chosen, on_layer)
    elapsed = clock(lm.device) - started  # synchronized: CUDA runs the prefill asynchronously
    for name, reason in skipped.items():
        warn(f"press {name} not recorded: {reason}")
    for name, change in adjusted.items():
        warn(f"press {name}: {change} (shorter than kvpress accepts)")
    n = len(input_ids)
    positions = torch.arange(n, dtype=torch.int32)
    keys = [layer.keys[0].to("cpu") for layer in kv.layers]
    values = [layer.values[0].to("cpu") for layer in kv.layers]
    meta = {
        "format_version": FORMAT_VERSION,
        "loramem_version": __version__,
        "model": {"id": lm.model_id, **lm.fingerprint},
        "rope": _rope_config(lm.config),
        "document": {"sha256": sha256_text(document), "chars": len(document), "preview": document[:200]},
        "n_tokens": n,
        "n_layers": len(keys),
        "n_kv_heads": int(keys[0].shape[0]),
        "head_dim": int(keys[0].shape[2]),
        "n_protected": len(head),
        "truncated": len(doc) < len(full),
        "dtype": str(keys[0].dtype).replace("torch.", ""),
        "framing": frame.to_dict(),
        "adapter": lm.adapter.identity() if with_adapter and lm.adapter else None,
        "scores": sorted(scores),
        "score_adjustments": adjusted,
        "compression": None,
        "prefill_seconds": round(elapsed, 4),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return KVCache(
        keys=keys,
        values=values,
        positions=[positions.expand(k.shape[0], -1).clone() for k in keys],
        token_ids=torch.tensor(input_ids, dtype=torch.int32),
        scores=scores,
        meta=meta,
    )
