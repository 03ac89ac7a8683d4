"""Quantized storage of keys and values: fp16/bf16 casts and int8/int4 with scales stored alongside.

Symmetric absmax quantization, either per token in groups of `group` channels (scales
[H, n, D/group]) or per channel (one scale per head and channel over the kept tokens, [H, 1, D]).
int4 packs two values per byte. Quantizing dequantized values again reproduces the same integers,
so a cache can be reloaded, compressed further and saved without drifting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from loramem.specs.base import refuse
from loramem.vocab import QUANT_AXES, STORE_DTYPES

_FLOATS = {"float32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QMAX = {"int8": 127, "int4": 7}


@dataclass(frozen=True)
class Storage:
    """How a cache's keys and values are stored on disk (recorded in its metadata)."""

    dtype: str = "native"  # native: as the model computed them
    axis: str = "token"
    group: int = 0  # channels per scale along head_dim for axis=token; 0 means the whole head

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def quantized(self) -> bool:
        return self.dtype in _QMAX

    def for_rows(self) -> Storage:
        """Packed value-group rows are narrower than a head: one scale per row (or per channel)."""
        return Storage(self.dtype, self.axis, 0)


def make_storage(dtype: str, axis: str = "token", group: int = 0, head_dim: int | None = None) -> Storage:
    """Validate a storage request against the cache's head dimension; one-line errors otherwise."""
    aliases = {"float16": "fp16", "bfloat16": "bf16", "fp32": "float32"}
    dtype = aliases.get(dtype, dtype)
    if dtype not in STORE_DTYPES:
        refuse(f"unknown {dtype!r}; use one of {', '.join(STORE_DTYPES)}", "store_dtype")
    if axis not in QUANT_AXES:
        refuse(f"unknown {axis!r}; use one of {', '.join(QUANT_AXES)}", "quant_axis")
    if head_dim is not None:
        if group < 0 or (group and head_dim % group):
            refuse(f"{group} does not divide the head dimension {head_dim}", "quant_group")
        if dtype == "int4" and (head_dim % 2 or (group and group % 2)):
            refuse(
                f"int4 packs two values per byte and needs an even dimension (head_dim {head_dim}, group {group})",
                "store_dtype",
            )
    return Storage(dtype, axis, group)


def _token_groups(x: torch.Tensor, storage: Storage) -> torch.Tensor:
    """x [H, n, D] viewed as [H, n, groups, channels] for per-token group scales."""
    h, n, d = x.shape
    group = storage.group or d
    return x.reshape(h, n, d // group, group)


def quantize(x: torch.Tensor, storage: Storage) -> dict[str, torch.Tensor]:
    """Tensors to store for x [H, n, D]: {'q', 'scale'} when quantized, {'data'} for float dtypes."""
    if not storage.quantized:
        return {"data": x if storage.dtype == "native" else x.to(_FLOATS[storage.dtype])}
    xf, qmax = x.float(), _QMAX[storage.dtype]
    if storage.axis == "channel":
        amax = xf.abs().amax(dim=1, keepdim=True) if xf.shape[1] else torch.ones_like(xf[:, :1])
        scale = (amax / qmax).clamp(min=1e-8)  # [H, 1, D]
        q = torch.round(xf / scale)
    else:
        grouped = _token_groups(xf, storage)
        scale = (grouped.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-8)  # [H, n, G, 1]
        q = torch.round(grouped / scale).reshape(xf.shape)
        scale = scale.squeeze(-1)
    q = q.clamp(-qmax - 1, qmax).to(torch.int8)
    if storage.dtype == "int4":
        nibbles = (q & 0x0F).to(torch.uint8)
        q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return {"q": q.contiguous(), "scale": scale.to(torch.float32).contiguous()}


def dequantize(parts: dict[str, torch.Tensor], storage: Storage, dtype: torch.dtype) -> torch.Tensor:
    """The float tensor [H, n, D] that `quantize` stored."""
    if not storage.quantized:
        return parts["data"].to(dtype)
    q, scale = parts["q"], parts["scale"]
    if storage.dtype == "int4":
        low = (q & 0x0F).to(torch.int8)
        high = (q >> 4).to(torch.int8)
        low = torch.where(low > 7, low - 16, low)
        high = torch.where(high > 7, high - 16, high)
        q = torch.stack([low, high], dim=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)
    values = q.float()
    if storage.axis == "channel":
        return (values * scale).to(dtype)
    h, n, d = values.shape
    groups = scale.shape[-1]
    return (values.reshape(h, n, groups, d // groups) * scale.unsqueeze(-1)).reshape(h, n, d).to(dtype)


def round_trip(x: torch.Tensor, storage: Storage) -> torch.Tensor:
    """What x becomes after being stored and loaded: used so in-memory caches equal reloaded ones."""
    return dequantize(quantize(x, storage), storage, x.dtype)
