"""Safetensors files read defensively: bounded sizes, the header checked before any byte of data is trusted.

A header is read first (8-byte length, then JSON), and only the bytes it describes are read after it, so a
device such as /dev/zero or a header claiming 2**62 bytes is refused at once instead of filling memory.
Each entry must name a known dtype, a shape of non-negative integers and data offsets that match the shape
and tile the data without gaps or overlap. Caches and adapter weights both read through here.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import IO, Any

from loramem.errors import LoramemError
from loramem.fileio import open_input, read_upto

MAX_HEADER_BYTES = 100 * 1024 * 1024
# The largest tensor file loramem reads: far above any cache or adapter it makes (a 128k-token cache of a 70B
# model is ~40 GB), low enough that a bogus length is refused rather than attempted.
MAX_FILE_BYTES = 256 * 1024**3
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def parse_header(raw: bytes, source: str) -> tuple[dict[str, Any], int]:
    """The header JSON (tensor entries and `__metadata__`), checked entry by entry, and the data length it implies."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LoramemError(f"{source} is not a safetensors file (unreadable header)") from exc
    if not isinstance(header, dict):
        raise LoramemError(f"{source} is not a safetensors file (header is not an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise LoramemError(f"{source} is not a safetensors file (__metadata__ must map strings to strings)")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"{source} is not a safetensors file (bad header entry for tensor {name!r}"
        if not isinstance(entry, dict) or entry.get("dtype") not in ITEMSIZE:
            raise LoramemError(f"{bad}: unknown dtype)")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise LoramemError(f"{bad}: shape must be a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise LoramemError(f"{bad}: data_offsets must be two integers)")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * ITEMSIZE[entry["dtype"]]:
            raise LoramemError(f"{bad}: data_offsets do not match its shape and dtype)")
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise LoramemError(f"{source} is not a safetensors file (tensor data overlaps or leaves gaps)")
        position = end
    return header, position


def read_header_bytes(stream: IO[bytes], source: str, size: int | None) -> tuple[bytes, dict[str, Any], int]:
    """(the 8 + n header bytes, the parsed header, the data length) from the start of a stream of `size` bytes."""
    head = read_upto(stream, 8)
    if len(head) < 8:
        raise LoramemError(f"{source} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER_BYTES:
        raise LoramemError(f"{source} is not a safetensors file")
    raw = read_upto(stream, n)
    if len(raw) < n or (size is not None and 8 + n > size):
        if raw[:1] == b"{":
            raise LoramemError(f"{source} is truncated (header runs past the end of the file)")
        raise LoramemError(f"{source} is not a safetensors file")
    header, data_len = parse_header(raw, source)
    total = 8 + n + data_len
    if total > MAX_FILE_BYTES:
        raise LoramemError(f"{source} claims {total} bytes, more than loramem reads ({MAX_FILE_BYTES})")
    if size is not None and size < total:
        raise LoramemError(f"{source} is truncated ({size} bytes, expected {total})")
    return head + raw, header, data_len


def read_safetensors(path: str | Path, what: str) -> tuple[bytes, str]:
    """All bytes of a safetensors file (or stdin for '-'), reading no more than its checked header describes."""
    stream, source, size = open_input(path, what)
    extra = b""
    try:
        head, _, data_len = read_header_bytes(stream, source, size)
        if size is not None:  # a regular file: one read, not pieces joined and copied again (a 100 MB cache)
            stream.seek(0)
            whole = stream.read(len(head) + data_len)
        else:
            whole = head + read_upto(stream, data_len)
            extra = read_upto(stream, 1)
    except OSError as exc:
        raise LoramemError(f"cannot read {source}: {(exc.strerror or str(exc)).lower()}") from exc
    finally:
        if source != "stdin":
            stream.close()
    if len(whole) < len(head) + data_len:
        raise LoramemError(f"{source} is truncated ({len(whole)} bytes, expected {len(head) + data_len})")
    if extra or (size is not None and size > len(head) + data_len):
        raise LoramemError(f"{source} has bytes after its last tensor; it is not a file loramem wrote")
    return whole, source


def all_finite(tensor: Any) -> bool:
    """Whether a tensor holds no NaN or infinity. Its sum is finite only if every element is (an infinity or a NaN
    carries through a sum), and summing reads the tensor once without the boolean copy `isfinite` makes: about 5x
    faster, which a one-off `ask` from a 100 MB cache notices. A sum that overflows is checked element by element."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    total = tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_bytes(data: bytes, source: str) -> dict[str, Any]:
    """The checked header of a safetensors file already in memory."""
    import io

    header_bytes, header, data_len = read_header_bytes(io.BytesIO(data), source, len(data))
    if len(data) > len(header_bytes) + data_len:
        raise LoramemError(f"{source} has bytes after its last tensor; it is not a file loramem wrote")
    return header


def read_file_header(path: str | Path, what: str) -> tuple[dict[str, Any], int]:
    """The checked header of a safetensors file and the file's size, without reading its tensors."""
    stream, source, size = open_input(path, what)
    try:
        _, header, _ = read_header_bytes(stream, source, size)
    finally:
        if source != "stdin":
            stream.close()
    return header, size or 0
