"""loramem: a document's memory as a stored KV cache (context) and a LoRA adapter (parameters).

The library API behind the `loramem` CLI; scripts can use it without the CLI:

    from loramem import load_model, encode, compress, generate
    lm = load_model()                      # embedded SmolLM2-135M-Instruct
    cache = encode(lm, open("doc.txt").read())
    small = compress(cache, "snapkv", ratio=0.9)
    print(generate(lm, "Who is the keeper?", small).answer)

Names are imported on first use, so `import loramem` (and the CLI's start) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loramem._version import __version__

# Public name -> module that defines it.
_API = {
    "Adapter": "loramem.adapters.attach",
    "adapter_scope": "loramem.model.loading",
    "attach_adapter": "loramem.adapters.attach",
    "detach_adapter": "loramem.adapters.attach",
    "KVCache": "loramem.kv.cache",
    "check_compatible": "loramem.kv.cache",
    "compress": "loramem.kv.compress",
    "encode": "loramem.kv.encode",
    "IncompatibleArtifactError": "loramem.errors",
    "LoramemError": "loramem.errors",
    "Answer": "loramem.answer",
    "generate": "loramem.answer",
    "DEFAULT_MODEL": "loramem.model.loading",
    "LoadedModel": "loramem.model.loading",
    "load_model": "loramem.model.loading",
    "train_adapter": "loramem.adapters.train",
    "run_eval": "loramem.evaluation.runner",
    "AnswerSpec": "loramem.specs",
    "AskSpec": "loramem.specs",
    "CompressSpec": "loramem.specs",
    "EncodeSpec": "loramem.specs",
    "EvalSpec": "loramem.specs",
    "MergeSpec": "loramem.specs",
    "ModelSpec": "loramem.specs",
    "ProbeSpec": "loramem.specs",
    "RouteSpec": "loramem.specs",
    "SpecError": "loramem.specs",
    "TrainSpec": "loramem.specs",
    "compress_cache": "loramem.kv.compression",
}

__all__ = ["__version__", *sorted(_API)]

if TYPE_CHECKING:
    from loramem.adapters.attach import Adapter, attach_adapter, detach_adapter
    from loramem.adapters.train import train_adapter
    from loramem.answer import Answer, generate
    from loramem.errors import IncompatibleArtifactError, LoramemError
    from loramem.evaluation.runner import run_eval
    from loramem.kv.cache import KVCache, check_compatible
    from loramem.kv.compress import compress
    from loramem.kv.compression import compress_cache
    from loramem.kv.encode import encode
    from loramem.model.loading import DEFAULT_MODEL, LoadedModel, load_model
    from loramem.specs import (
        AnswerSpec,
        AskSpec,
        CompressSpec,
        EncodeSpec,
        EvalSpec,
        MergeSpec,
        ModelSpec,
        ProbeSpec,
        RouteSpec,
        SpecError,
        TrainSpec,
    )


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'loramem' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
