"""The KV-cache artifact: a document's prefilled keys and values as one safetensors file.

Layout (tensors):
  layers.{i}.keys / layers.{i}.values   [kv_heads, kept, head_dim], post-RoPE, model dtype or the
                                        storage dtype; int8/int4 storage writes `.q` and `.scale` instead
  layers.{i}.positions                  [kv_heads, kept] int32, original token positions, ascending
  token_ids                             [n_tokens] int32, the whole prefill (framing prefix + document)
  scores.{press}                        [layers, kv_heads, n_tokens] float32 importance per token
and one metadata entry, "loramem", holding JSON (checked field by field by `kv.validate.check_meta`;
docs/FORMAT.md lists the fields). Never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.kv.quantize import Storage, dequantize, quantize
from loramem.kv.validate import InvalidCache, check_fits, check_meta, check_tensors
from loramem.model.prompt import check_template_record
from loramem.tensorfile import check_bytes, read_safetensors

FORMAT = "loramem.kvcache"


@dataclass
class KVCache:
    """Per-layer kept keys/values with their original positions, scores and provenance."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    token_ids: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    masks: list[torch.Tensor] | None = None  # value-group caches: [H, n, groups] kept groups per layer
    _stored: tuple[Any, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        """Tokens in the original prefill; questions continue at this position."""
        return int(self.token_ids.numel())

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def kept_per_layer(self) -> list[int]:
        return [int(k.shape[1]) for k in self.keys]

    @property
    def storage(self) -> Storage:
        return Storage(**self.meta.get("storage", {}))

    @property
    def nbytes_stored(self) -> int:
        """Bytes of keys and values as stored on disk (quantized data and scales included).

        Computed once per layout: the bytes depend on the shapes, the storage and the kept groups, not on the values.
        """
        layout = (
            self.storage,
            [(tuple(k.shape), tuple(v.shape), k.dtype) for k, v in zip(self.keys, self.values)],
            [id(m) for m in self.masks] if self.masks is not None else None,
        )
        if self._stored is None or self._stored[0] != layout:
            nbytes = sum(
                t.numel() * t.element_size()
                for name, t in self.to_tensors().items()
                if ".keys" in name or ".values" in name
            )
            self._stored = (layout, nbytes)
        return self._stored[1]

    def to_dynamic_cache(self, device: Any = None, dtype: torch.dtype | None = None) -> Any:
        """The kept keys and values as a transformers DynamicCache, dequantized (fresh tensors on each call).

        Position rule: the kept entries sit at their original positions, so the next input token goes at
        position `n_tokens` (pass `position_ids` starting there), whatever was evicted. A value-group cache
        (`masks` set) also needs each head restricted to the tokens it kept (`loramem.kv.value_groups.head_masks`).
        """
        from transformers import DynamicCache

        past = DynamicCache()
        if sum(self.kept_per_layer) == 0:
            return past
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            past.update(k.to(device, dtype).unsqueeze(0), v.to(device, dtype).unsqueeze(0), layer)
        return past

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {"token_ids": self.token_ids.to(torch.int32)}
        storage = self.storage.for_rows() if self.masks is not None else self.storage
        for i, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions)):
            rows = (k, v)
            if self.masks is not None:  # value groups: only kept keys and kept groups, packed as rows
                mask = self.masks[i]
                h, n, groups = mask.shape
                rows = (k[mask.any(-1)][None], v.reshape(h, n, groups, -1)[mask][None])
                tensors[f"layers.{i}.group_mask"] = mask.to(torch.uint8)
            for kind, x in zip(("keys", "values"), rows):
                for part, t in quantize(x, storage).items():
                    tensors[f"layers.{i}.{kind}" + ("" if part == "data" else f".{part}")] = t
            tensors[f"layers.{i}.positions"] = p.to(torch.int32)
        for name, s in self.scores.items():
            tensors[f"scores.{name}"] = s.to(torch.float32)
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = {"format": FORMAT, "loramem": json.dumps(self.meta, sort_keys=True)}
        return save(self.to_tensors(), metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> KVCache:
        """A cache from its file bytes, validated whole before use (`loramem.kv.validate`)."""
        header = check_bytes(data, source)
        meta_raw = header.get("__metadata__") or {}
        if meta_raw.get("format") != FORMAT:
            raise LoramemError(f"{source} is a safetensors file but not a loramem KV cache")
        try:
            meta = json.loads(meta_raw.get("loramem", "{}"))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidCache(f"{source} is not a valid loramem cache: its metadata is not JSON") from exc
        check_meta(meta, source)
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error type for corrupt payloads
            raise LoramemError(f"{source} is corrupt: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        check_tensors(tensors, meta, source)
        n_layers = meta["n_layers"]
        storage = Storage(**meta.get("storage", {}))
        if "layers.0.group_mask" in tensors:
            storage = storage.for_rows()
        dtype = getattr(torch, meta["dtype"])

        def load_kv(name: str) -> torch.Tensor:
            if not storage.quantized:
                return dequantize({"data": tensors[name]}, storage, dtype)
            return dequantize({"q": tensors[f"{name}.q"], "scale": tensors[f"{name}.scale"]}, storage, dtype)

        keys = [load_kv(f"layers.{i}.keys") for i in range(n_layers)]
        values = [load_kv(f"layers.{i}.values") for i in range(n_layers)]
        masks = None
        if "layers.0.group_mask" in tensors:
            masks = [tensors[f"layers.{i}.group_mask"].bool() for i in range(n_layers)]
            unpacked = [_unpack_groups(k, v, m) for k, v, m in zip(keys, values, masks)]
            keys, values = [k for k, _ in unpacked], [v for _, v in unpacked]
        return cls(
            keys=list(keys),
            values=list(values),
            positions=[tensors[f"layers.{i}.positions"].long() for i in range(n_layers)],
            token_ids=tensors["token_ids"].long(),
            scores={k[len("scores.") :]: v for k, v in tensors.items() if k.startswith("scores.")},
            meta=meta,
            masks=masks,
        )

    @classmethod
    def load(cls, path: str | Path) -> KVCache:
        """Read a cache from a path, or from stdin when path is '-' (no more bytes than its header describes)."""
        data, source = read_safetensors(path, what="cache")
        return cls.from_bytes(data, source)


def _unpack_groups(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [H, n, D] keys and values from packed kept rows; dropped groups and tokens are zero."""
    h, n, groups = mask.shape
    dense_keys = keys.new_zeros(h, n, keys.shape[-1])
    dense_keys[mask.any(-1)] = keys[0]
    dense_values = values.new_zeros(h, n, groups, values.shape[-1])
    dense_values[mask] = values[0]
    return dense_keys, dense_values.reshape(h, n, -1)


def _check_dtype(cache: KVCache, made: dict[str, Any], fingerprint: dict[str, Any], source: str, lm: Any) -> None:
    """The same model loaded in another precision rounds its weights differently, so its fingerprint differs:
    say so (and how to match it) rather than that another model made the cache."""
    loaded = str(getattr(lm, "dtype", "")).removeprefix("torch.")
    encoded = cache.meta.get("dtype")
    if lm is not None and made.get("config_sha256") == fingerprint.get("config_sha256") and encoded != loaded:
        raise IncompatibleArtifactError(
            f"{source} was encoded with the model in {encoded}, and it is loaded in {loaded}; "
            f"load it with --dtype {encoded} (or re-encode the cache in {loaded})"
        )


def check_compatible(cache: KVCache, fingerprint: dict[str, str], source: str = "cache", lm: Any = None) -> None:
    """Refuse a cache made by another model or tokenizer before anything is generated; given the loaded model
    `lm`, also one whose shape or framing does not fit it (`kv.validate.check_fits`)."""
    made = cache.meta.get("model", {})
    for key, what in (("model", "model"), ("tokenizer_sha256", "tokenizer"), ("chat_template_sha256", "chat template")):
        if made.get(key) != fingerprint.get(key):
            _check_dtype(cache, made, fingerprint, source, lm)
            raise IncompatibleArtifactError(
                f"{source} was made by another {what} ({made.get('id', '?')}); re-encode it with this model"
            )
    check_template_record(made, fingerprint, source)
    if lm is not None:
        check_fits(cache.meta, cache.token_ids, lm, source)


def is_cache_file(path: Path) -> bool:
    """A KV-cache file that loramem wrote (by its safetensors header, the tensors are not read)."""
    from loramem.tensorfile import read_file_header

    if not path.is_file() or path.is_symlink():
        return False
    try:
        header, _ = read_file_header(path, "cache")
    except LoramemError:
        return False
    return (header.get("__metadata__") or {}).get("format") == FORMAT
