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
    LAYOUT_FIELDS,
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
    config: dict[str, Any] = field(default_factory=dict)  # its adapter_config.json

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

    The first adapter wraps the model (PEFT); later ones are loaded beside it and activated (`set_adapter`), and
    one loaded before (same weights) is activated without reading it again. When MAX_LOADED_ADAPTERS are loaded,
    the least recently used makes room: its layers get the new weights where the two adapters' layers agree
    (`_overwrite`: a copy, where PEFT's delete and load would build and initialise every layer anew), else it
    is deleted and the new one loaded.
    """
    from peft import PeftModel

    config, meta = read_adapter_meta(path)
    check_base_model(config, meta, lm, path)
    if meta.get("base_model"):
        check_template_record(meta["base_model"], lm.fingerprint, f"adapter {path}")
    sha = adapter_sha256(path)
    current = lm.adapter
    known = {a.sha256: a for a in current.others.values()} if current else {}
    try:
        if current is None:
            name = _SLOT.format(0)
            peft_model = PeftModel.from_pretrained(lm.model, str(path), adapter_name=name, is_trainable=False)
        else:
            peft_model = current.peft_model
            if sha in known and known[sha].name in peft_model.peft_config:
                name = known[sha].name
            else:
                name = _make_room(peft_model, current, config, path)
            peft_model.set_adapter(name)
    except (ValueError, RuntimeError, KeyError) as exc:
        detach_adapter(lm)
        raise IncompatibleArtifactError(f"adapter {path} does not fit this model: {str(exc).splitlines()[0]}") from exc
    peft_model.eval()
    used = [n for n in (current.loaded if current else []) if n != name and n in peft_model.peft_config] + [name]
    others = {n: a for n, a in (current.others if current else {}).items() if n in used and n != name}
    lm.adapter = Adapter(
        path=Path(path), sha256=sha, peft_model=peft_model, meta=meta, name=name, loaded=used, config=config
    )
    others[name] = lm.adapter
    lm.adapter.others = others
    return lm.adapter


_SLOT = "slot{}"  # PEFT's name for a loaded adapter: slots, since one adapter's layers may hold another's weights


def activate_loaded(lm: LoadedModel, sha256: str) -> bool:
    """Make the adapter with these weights active again if it is still loaded beside the active one (no file is
    read): a server switching between the adapters of its requests. False when it must be attached anew."""
    current = lm.adapter
    if current is None:
        return False
    if current.sha256 == sha256:
        return True
    known = next((a for a in current.others.values() if a.sha256 == sha256), None)
    if known is None or known.name not in current.peft_model.peft_config:
        return False
    current.peft_model.set_adapter(known.name)
    used = [n for n in current.loaded if n != known.name] + [known.name]
    lm.adapter = Adapter(
        known.path, known.sha256, current.peft_model, known.meta, known.name, used, current.others, known.config
    )
    return True


def _make_room(peft_model: Any, current: Adapter, config: dict[str, Any], path: str | Path) -> str:
    """The slot for a new adapter: a free one it is loaded into, or the least recently used one (never the active
    one) given its weights, or deleted and loaded anew when the layers differ."""
    if len(peft_model.peft_config) < MAX_LOADED_ADAPTERS:
        name = next(
            _SLOT.format(i) for i in range(MAX_LOADED_ADAPTERS) if _SLOT.format(i) not in peft_model.peft_config
        )
        peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        return name
    slots = [*current.loaded, *peft_model.peft_config]
    oldest = next(n for n in slots if n != current.name and n in peft_model.peft_config)
    previous = current.others.get(oldest)
    if previous is not None and _layout(previous.config) == _layout(config) and _overwrite(peft_model, oldest, path):
        return oldest
    peft_model.delete_adapter(oldest)
    peft_model.load_adapter(str(path), adapter_name=oldest, is_trainable=False)
    return oldest


def _layout(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of an adapter_config.json that decide its layers, lists of targets as sets (PEFT's own)."""
    targets = config.get("target_modules")
    return {
        **{key: config.get(key) for key in LAYOUT_FIELDS},
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
    }


def _overwrite(peft_model: Any, slot: str, path: str | Path) -> bool:
    """The adapter's weights copied into a loaded slot's LoRA layers, as load_adapter would set them (cast to the
    layers' dtype); False, touching nothing, unless its pairs are exactly the slot's modules with their shapes."""
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    targets: dict[str, torch.Tensor] = {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and slot in module.lora_A:
            targets[f"{module_name}.lora_A.weight"] = cast(torch.Tensor, module.lora_A[slot].weight)
            targets[f"{module_name}.lora_B.weight"] = cast(torch.Tensor, module.lora_B[slot].weight)
    if weights.keys() != targets.keys() or any(weights[k].shape != t.shape for k, t in targets.items()):
        return False
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(weights[key])
    return True


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
