"""Document adapters: loading a PEFT LoRA directory onto a model and switching it on or off.

The paper's inference modes need one model with the adapter on for some forward passes and off
for others (base-model prefill, adapter-only decoding), so an adapter is attached once and scoped.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from loramem.adapters.validate import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORAMEM_META,
    check_adapter,
    check_base_model,
)
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.model.loading import LoadedModel, sha256_bytes
from loramem.model.prompt import check_template_record
from loramem.specs.base import refuse
from loramem.vocab import ASK_MODES

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LORAMEM_META",
    "Adapter",
    "attach_adapter",
    "detach_adapter",
    "read_adapter_meta",
]


@dataclass
class Adapter:
    """An attached adapter: where it came from, the hash that caches record, its loramem metadata."""

    path: Path
    sha256: str
    peft_model: Any
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = "default"  # its PEFT adapter name
    loaded: list[str] = field(default_factory=list)  # adapter names loaded on peft_model, least recently used first
    others: dict[str, Adapter] = field(default_factory=dict)  # the loaded ones by name, to switch back without a read

    def identity(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}

    def disabled(self) -> AbstractContextManager[Any]:
        """A block run by the base model alone (`loramem.model.loading.adapter_scope`)."""
        return cast(AbstractContextManager[Any], self.peft_model.disable_adapter())


def read_adapter_meta(path: str | Path, values: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(peft config, loramem metadata) of an adapter directory, validated whole (`adapters.validate`);
    `values=False` skips reading the weights' values (their header is still checked)."""
    return check_adapter(path, values)


def weights_size(path: str | Path) -> tuple[int, int]:
    """(parameters, tensor bytes) of a safetensors file, from its checked header alone (adapters can be large)."""
    from loramem.tensorfile import read_file_header

    header, _ = read_file_header(path, "adapter weights")
    tensors = [t for name, t in header.items() if name != "__metadata__"]
    return (
        sum(math.prod(t["shape"]) for t in tensors),
        sum(t["data_offsets"][1] - t["data_offsets"][0] for t in tensors),
    )


def adapter_tensor_bytes(path: str | Path) -> int:
    """Bytes of an adapter directory's weights as stored: its side of an equal-memory comparison with KV."""
    return weights_size(Path(path) / ADAPTER_WEIGHTS)[1]


def adapter_sha256(path: str | Path) -> str:
    return sha256_bytes((Path(path) / ADAPTER_WEIGHTS).read_bytes())


# Adapters kept loaded beside the active one, so switching back to one (routed libraries, alternating formats)
# is a `set_adapter` instead of reading and injecting it again; the least recently used goes first.
MAX_LOADED_ADAPTERS = 8


def attach_adapter(lm: LoadedModel, path: str | Path) -> Adapter:
    """Switch `lm` to a LoRA, replacing the active one; refuses another base model's.

    The first adapter wraps the model (PEFT); later ones are loaded beside it (`load_adapter`) and activated
    (`set_adapter`), and one loaded before (same weights) is activated without reading it again.
    """
    from peft import PeftModel

    config, meta = read_adapter_meta(path)
    check_base_model(config, meta, lm, path)
    if meta.get("base_model"):
        check_template_record(meta["base_model"], lm.fingerprint, f"adapter {path}")
    sha = adapter_sha256(path)
    name = f"doc_{sha[:16]}"
    current = lm.adapter
    try:
        if current is None:
            peft_model = PeftModel.from_pretrained(lm.model, str(path), adapter_name=name, is_trainable=False)
        else:
            peft_model = current.peft_model
            if name not in peft_model.peft_config:
                _make_room(peft_model, current.loaded, keep=current.name)
                peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            peft_model.set_adapter(name)
    except (ValueError, RuntimeError, KeyError) as exc:
        detach_adapter(lm)
        raise IncompatibleArtifactError(f"adapter {path} does not fit this model: {str(exc).splitlines()[0]}") from exc
    peft_model.eval()
    used = [n for n in (current.loaded if current else []) if n != name and n in peft_model.peft_config] + [name]
    others = {n: a for n, a in (current.others if current else {}).items() if n in used}
    lm.adapter = Adapter(path=Path(path), sha256=sha, peft_model=peft_model, meta=meta, name=name, loaded=used)
    others[name] = lm.adapter
    lm.adapter.others = others
    return lm.adapter


def activate_loaded(lm: LoadedModel, sha256: str) -> bool:
    """Make the adapter with these weights active again if it is still loaded beside the active one (no file is
    read): a server switching between the adapters of its requests. False when it must be attached anew."""
    current = lm.adapter
    if current is None:
        return False
    name = f"doc_{sha256[:16]}"
    if current.name == name:
        return True
    known = current.others.get(name)
    if known is None or name not in current.peft_model.peft_config:
        return False
    current.peft_model.set_adapter(name)
    used = [n for n in current.loaded if n != name] + [name]
    lm.adapter = Adapter(known.path, known.sha256, current.peft_model, known.meta, name, used, current.others)
    return True


def _make_room(peft_model: Any, loaded: list[str], keep: str) -> None:
    """Delete the least recently used adapters (never the active `keep`) while MAX_LOADED_ADAPTERS are loaded."""
    while len(peft_model.peft_config) >= MAX_LOADED_ADAPTERS:
        oldest = next(n for n in [*loaded, *peft_model.peft_config] if n != keep and n in peft_model.peft_config)
        peft_model.delete_adapter(oldest)


def detach_adapter(lm: LoadedModel) -> None:
    """Remove the attached LoRA layers, leaving the base model exactly as loaded."""
    if lm.adapter is not None:
        lm.model = lm.adapter.peft_model.unload()
        lm.adapter = None


def check_adapter_mode(lm: LoadedModel, mode: str, cache_adapter: dict[str, Any] | None) -> bool:
    """Validate an inference mode against the cache's recorded adapter; True when decoding uses it.

    none: base model throughout. decode: base-model cache, adapter on only for question and answer.
    all: cache encoded with this same adapter, adapter on for decoding too.
    """
    if mode not in ASK_MODES:
        raise LoramemError(f"unknown adapter mode {mode!r}; use one of {', '.join(ASK_MODES)}")
    if mode != "none" and lm.adapter is None:
        refuse(f"{mode} needs an adapter", "adapter_mode", "adapter")
    if mode in ("none", "decode") and cache_adapter is not None:
        raise IncompatibleArtifactError(
            f"this cache was encoded with adapter {cache_adapter.get('path')}; --adapter-mode {mode} needs a "
            "base-model cache (encode without --adapter), or use --adapter-mode all"
        )
    if mode == "all" and cache_adapter is not None and cache_adapter.get("sha256") != lm.adapter.sha256:
        raise IncompatibleArtifactError(
            f"this cache was encoded with another adapter ({cache_adapter.get('path')}); "
            "--adapter-mode all needs the cache encoded with the same adapter"
        )
    if mode == "all" and cache_adapter is None:
        raise IncompatibleArtifactError(
            "--adapter-mode all needs a cache encoded with the adapter (loramem encode DOC --adapter DIR)"
        )
    return mode != "none"
