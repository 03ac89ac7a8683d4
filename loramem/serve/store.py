"""The memories a server answers from, by name under its root: caches loaded on first use and kept under a byte
budget (least recently used dropped first), adapters and libraries located and fingerprinted.

A memory is looked at again on every request: a file whose inode, size, mtime or ctime changed is read again, and
its sha256 is taken from the very bytes loaded, so an answer never comes from a stale cache and always names the
content it came from.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.kv.cache import KVCache, check_compatible, is_cache_file
from loramem.model.loading import LoadedModel, sha256_bytes
from loramem.serve.paths import Refused, confined
from loramem.specs import CompressSpec

Stamp = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def stamp(path: Path) -> Stamp:
    info = path.stat()
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass
class HeldCache:
    """A cache as loaded (or compressed from one), with the name and sha256 of the file it came from."""

    name: str
    sha256: str
    stamp: Stamp
    cache: KVCache
    nbytes: int


@dataclass(frozen=True)
class AdapterRef:
    """An adapter folder under the root and the sha256 of its weights when it was looked at."""

    name: str
    path: Path
    sha256: str


def refused_artifact(exc: LoramemError) -> Refused:
    """An artifact error as a request's refusal: 409 for one made for another model (exit 3), else 422."""
    if isinstance(exc, IncompatibleArtifactError):
        return Refused(409, str(exc), exit_code=3, kind="incompatible_artifact")
    return Refused(422, str(exc))


class Memories:
    """Caches, adapters and libraries under `root`, for the model `lm`. Thread-safe: requests look memories up
    from the server's threads while the engine decodes."""

    def __init__(self, root: Path, lm: LoadedModel, budget_bytes: int) -> None:
        self.root = root.resolve()
        self.lm = lm
        self.budget = budget_bytes
        self._held: OrderedDict[tuple[str, str], HeldCache] = OrderedDict()  # (name, compression) -> cache
        self._adapters: dict[str, tuple[Stamp, str]] = {}
        self._lock = threading.Lock()

    def cache(self, name: str, compress: CompressSpec | None = None) -> HeldCache:
        """The cache `name` names, as its file holds it now (compressed by `compress` from its recorded scores)."""
        path = confined(self.root, name, "cache")
        if not path.is_file():
            raise Refused(422, f"cache {name!r} is not a file")
        key = (name, "" if compress is None else compress.model_dump_json())
        now = stamp(path)
        with self._lock:
            held = self._held.get(key)
            if held is not None and held.stamp == now:
                self._held.move_to_end(key)
                return held
        held = self._load(name, path, now) if compress is None else self._compressed(name, compress)
        with self._lock:
            self._held[key] = held
            self._held.move_to_end(key)
            total = sum(h.nbytes for h in self._held.values())
            while total > self.budget and len(self._held) > 1:
                _, dropped = self._held.popitem(last=False)
                total -= dropped.nbytes
        return held

    def _load(self, name: str, path: Path, now: Stamp) -> HeldCache:
        try:
            data = path.read_bytes()
            if len(data) != now[1]:  # rewritten while being read: what was read is no one version of it
                raise Refused(409, f"cache {name!r} changed while it was read; ask again", kind="changed")
            cache = KVCache.from_bytes(data, name)
            check_compatible(cache, self.lm.fingerprint, name, self.lm)
        except Refused:
            raise
        except LoramemError as exc:
            raise refused_artifact(exc) from None
        except OSError as exc:
            raise Refused(422, f"cache {name!r}: {exc.strerror or exc}") from None
        return HeldCache(name, sha256_bytes(data), now, cache, cache.nbytes_stored)

    def _compressed(self, name: str, spec: CompressSpec) -> HeldCache:
        from loramem.kv.compression import compress_cache

        source = self.cache(name)
        try:
            cache = compress_cache(source.cache, spec)
        except LoramemError as exc:
            raise refused_artifact(exc) from None
        return HeldCache(name, source.sha256, source.stamp, cache, cache.nbytes_stored)

    def adapter(self, name: str) -> AdapterRef:
        """The adapter folder `name` names and the sha256 of its weights now (hashed again when they changed)."""
        from loramem.adapters.attach import ADAPTER_WEIGHTS
        from loramem.adapters.validate import is_adapter_folder

        path = confined(self.root, name, "adapter")
        weights = path / ADAPTER_WEIGHTS
        if not is_adapter_folder(path) or not weights.is_file():
            raise Refused(422, f"adapter {name!r} is not an adapter folder (train-adapter writes one)")
        confined(self.root, f"{name.rstrip('/')}/{ADAPTER_WEIGHTS}", "adapter weights")  # not a symlink out
        now = stamp(weights)
        with self._lock:
            known = self._adapters.get(name)
        if known is None or known[0] != now:
            known = (now, sha256_bytes(weights.read_bytes()))
            with self._lock:
                self._adapters[name] = known
        return AdapterRef(name, path, known[1])

    def library(self, name: str) -> Path:
        from loramem.library.store import MANIFEST

        path = confined(self.root, name, "library")
        if not (path / MANIFEST).is_file():
            raise Refused(422, f"library {name!r} is not a loramem library (no {MANIFEST})")
        return path

    def held_bytes(self) -> int:
        with self._lock:
            return sum(h.nbytes for h in self._held.values())

    def listing(self) -> list[dict[str, Any]]:
        """What the root holds: caches, adapters and libraries by name, with a short summary of each (read from
        headers and metadata; nothing is loaded). Symlinks are not followed."""
        from loramem.adapters.validate import is_adapter_folder
        from loramem.library.store import MANIFEST
        from loramem.tensorfile import read_file_header

        found: list[dict[str, Any]] = []
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
            rel = here.relative_to(self.root).as_posix()
            if here != self.root and (here / MANIFEST).is_file():
                found.append({"name": rel, "kind": "library"})
                dirs[:] = []
                continue
            if here != self.root and is_adapter_folder(here) and files:
                found.append({"name": rel, "kind": "adapter", **_adapter_summary(here)})
                dirs[:] = []
                continue
            for file in sorted(files):
                path = here / file
                if file.startswith(".") or not is_cache_file(path):
                    continue
                header, size = read_file_header(path, "cache")
                meta = json.loads((header.get("__metadata__") or {}).get("loramem", "{}"))
                found.append(
                    {"name": path.relative_to(self.root).as_posix(), "kind": "cache", **_cache_summary(meta, size)}
                )
        return found


def _cache_summary(meta: dict[str, Any], size: int) -> dict[str, Any]:
    compression = meta.get("compression") or {}
    return {
        "model": (meta.get("model") or {}).get("id"),
        "document_preview": (meta.get("document") or {}).get("preview"),
        "tokens_total": meta.get("n_tokens"),
        "press": compression.get("press"),
        "ratio": compression.get("ratio"),
        "adapter_at_prefill": meta.get("adapter"),
        "file_bytes": size,
    }


def _adapter_summary(path: Path) -> dict[str, Any]:
    from loramem.describe import describe_adapter

    try:
        summary = describe_adapter(path)
    except LoramemError as exc:
        return {"error": str(exc)}
    keep = ("base_model", "rank", "alpha", "targets", "layers", "trainable_parameters", "tensor_bytes", "format")
    return {k: summary[k] for k in keep if k in summary}
