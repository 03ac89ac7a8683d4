"""Byte sizes as people type and read them: 16MB, 1.5GiB, 20000000."""

from __future__ import annotations

import re

from loramem.errors import LoramemError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def parse_size(text: str) -> int:
    """'16MB' -> 16000000, '16MiB' -> 16777216, '2e6' is refused: decimal (kB, MB, GB) and binary (KiB, MiB, GiB)
    units, or plain bytes; the result is a positive whole number of bytes."""
    match = _SIZE.fullmatch(text.lower())
    if not match or match[2] not in _UNITS:
        raise LoramemError(f"not a byte size: {text!r}; use e.g. 20000000, 16MB or 12.5MiB")
    value = int(float(match[1]) * _UNITS[match[2]])
    if value <= 0:
        raise LoramemError(f"a byte size must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    """Bytes in binary units with three significant digits: 15.3 MiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
