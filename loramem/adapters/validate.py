"""An adapter directory checked before any use: its config, its weights and loramem.json agree.

adapter_config.json must be a UTF-8 JSON object with a positive integer rank, finite alpha and dropout, targets
and layers of the right types, and every LoRA scaling it implies (rank_pattern, alpha_pattern, use_rslora) in
range. Every other LoraConfig field that changes the computation (use_dora, bias, modules_to_save, lora_bias,
target_parameters, ...) must be unset: an adapter that uses one is refused by name (exit 3), not half-applied.
The weights' header is read within bounds and must describe the whole file; every LoRA pair must have the rank
the config gives its module, sit in a targeted module and (when the config names layers) in one of those layers,
because PEFT silently drops weights that its config does not select. Weights are finite floats.
loramem.json, when present, must agree with the config (rank, targets, layers). When it is absent, the base model
named in adapter_config is compared with the loaded model (`check_base_model`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.fileio import read_input_bytes
from loramem.specs.train import MAX_SCALE

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORAMEM_META = "loramem.json"
TRAIN_QA = "train_qa.jsonl"  # the pairs an adapter was trained on, beside it
TRAIN_VIEWS = "train_views.jsonl"  # format mixed: the other views of the document it was trained on
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_RANK = 65536
_LORA = re.compile(r"(?P<module>.+)\.lora_(?:embedding_)?(?P<part>[AB])(?:\.weight)?")
# LoraConfig fields that do not change what a loaded adapter computes: identity, training-only settings, placement.
_INERT = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}
# The fields loramem checks and computes with (`check_config`); any other field that is set (not null, false,
# empty or PEFT's "none") changes the computation in a way loramem does not check (use_dora, modules_to_save,
# bias, lora_bias, target_parameters, layer_replication, alora_invocation_tokens, ...) and is refused by name.
_SUPPORTED = {
    "r",
    "lora_alpha",
    "target_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "fan_in_fan_out",
    "init_lora_weights",
}
# The fields that decide the LoRA layers PEFT injects for an adapter: two adapters that agree on them fit the
# same layers (`attach` copies one's weights into the other's).
LAYOUT_FIELDS = tuple(sorted((_SUPPORTED - {"init_lora_weights"}) | {"lora_dropout"}))
# init_lora_weights values whose only effect is the random start that the stored weights replace (PiSSA, OLoRA,
# LoftQ and the like also rewrite the base weights when the adapter loads).
_PLAIN_INIT = (True, False, "gaussian")
_PREFIX = "base_model.model."
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class InvalidAdapter(LoramemError):
    """An adapter directory whose files are wrong or disagree with each other."""


def _fail(path: str | Path, what: str) -> InvalidAdapter:
    return InvalidAdapter(f"{path} is not a valid adapter: {what}")


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file read within bounds as UTF-8; any other content is a one-line error."""
    data, source = read_input_bytes(path, what, limit=MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LoramemError(f"{source} is not UTF-8 text") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LoramemError(f"{source} is not readable JSON") from exc


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(value: Any) -> list[str] | str | None:
    """target_modules as PEFT accepts it: a list of names, a regular expression, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError


def check_config(config: Any, path: str | Path) -> dict[str, Any]:
    """adapter_config.json with the fields PEFT and loramem read of the right type and range."""
    if not isinstance(config, dict):
        raise _fail(path, f"{ADAPTER_CONFIG} is {type(config).__name__}, expected an object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoramemError(f"{path} is a {config.get('peft_type')} adapter; loramem uses LoRA adapters")
    rank = config.get("r", 8)
    if type(rank) is not int or not 1 <= rank <= MAX_RANK:
        raise _fail(path, f"rank r is {rank!r}, expected an integer from 1 to {MAX_RANK}")
    alpha, dropout = config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    if not _finite(alpha) or alpha <= 0:
        raise _fail(path, f"lora_alpha is {alpha!r}, expected a finite number > 0")
    if not _finite(dropout) or not 0 <= dropout < 1:
        raise _fail(path, f"lora_dropout is {dropout!r}, expected a finite number in [0, 1)")
    try:
        targets = _names(config.get("target_modules"))
        if isinstance(targets, str):
            re.compile(targets)
    except (ValueError, re.error) as exc:
        raise _fail(path, "target_modules must be a list of module names or a regular expression") from exc
    layers = config.get("layers_to_transform")
    listed = isinstance(layers, list) and all(type(i) is int and i >= 0 for i in layers)
    if not (layers is None or (type(layers) is int and layers >= 0) or listed):
        raise _fail(path, "layers_to_transform must be null, an integer or a list of integers")
    _check_scaling(config, path)
    pattern = config.get("layers_pattern")
    if not (
        pattern is None
        or isinstance(pattern, str)
        or (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))
    ):
        raise _fail(path, "layers_pattern must be null, a name or a list of names")
    for key in ("use_rslora", "fan_in_fan_out"):
        if type(config.get(key, False)) is not bool:
            raise _fail(path, f"{key} is {config[key]!r}, expected true or false")
    if config.get("init_lora_weights", True) not in _PLAIN_INIT or type(config.get("init_lora_weights", True)) is int:
        raise IncompatibleArtifactError(
            f"adapter {path} uses init_lora_weights {config['init_lora_weights']!r}, which loramem does not support"
        )
    unsupported = sorted(
        k
        for k, v in config.items()
        if k not in _INERT | _SUPPORTED and v not in (None, False, "none") and v != {} and v != []
    )
    if unsupported:
        raise IncompatibleArtifactError(
            f"adapter {path} uses {', '.join(unsupported)}, which loramem does not support (plain LoRA only)"
        )
    if not isinstance(config.get("base_model_name_or_path") or "", str):
        raise _fail(path, "base_model_name_or_path must be a string")
    return config


def _check_scaling(config: dict[str, Any], path: str | Path) -> None:
    """rank_pattern and alpha_pattern map module names to integer ranks and finite alphas; every scaling the
    adapter applies (alpha over rank, or over its root with use_rslora) is in (0, MAX_SCALE]."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for key, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if not isinstance(pattern, dict) or not all(
            _finite(v) and v > 0 and (key == "alpha_pattern" or (type(v) is int and v <= MAX_RANK))
            for v in pattern.values()
        ):
            raise _fail(path, f"{key} must map module names to positive numbers")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = config.get("use_rslora") is True
    pairs = [("lora_alpha", alpha, rank)] + [(f"alpha_pattern {k!r}", a, ranks.get(k, rank)) for k, a in alphas.items()]
    pairs += [(f"rank_pattern {k!r}", alphas.get(k, alpha), r) for k, r in ranks.items()]
    for where, a, r in pairs:
        scale = lora_scale(a, r, rslora)
        if not 0 < scale <= MAX_SCALE:
            raise _fail(path, f"{where} gives a LoRA scaling of {scale:g}, expected at most {MAX_SCALE:g}")


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """The factor PEFT multiplies B @ A by: alpha over the rank, or over its root with use_rslora."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def module_scale(config: dict[str, Any], module: str) -> float:
    """The LoRA scaling of one module, its rank and alpha looked up in rank_pattern and alpha_pattern as PEFT does."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return lora_scale(alpha, rank, config.get("use_rslora") is True)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?(?:{key})", module):
                return value
        except re.error:
            continue
    return default


def _targeted(module: str, targets: list[str] | str | None) -> bool:
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def layer_index(module: str, pattern: Any) -> int | None:
    """The decoder-layer number PEFT reads from a module name (its own default regex, or layers_pattern)."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    for p in patterns or [None]:
        match = re.match(rf".*\.{re.escape(p)}\.(\d+)\." if p else r".*\.[^.]*\.(\d+)\.", module)
        if match:
            return int(match[1])
    return None


def check_weights(path: str | Path, config: dict[str, Any], values: bool = True) -> dict[str, Any]:
    """The weights file's checked header; every LoRA pair of the config's rank, in targeted layers; finite."""
    from loramem.tensorfile import read_file_header

    weights = Path(path) / ADAPTER_WEIGHTS
    header, _ = read_file_header(weights, "adapter weights")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if not entries:
        raise _fail(path, f"{ADAPTER_WEIGHTS} holds no tensors")
    targets, layers = config.get("target_modules"), config.get("layers_to_transform")
    layer_set = {layers} if type(layers) is int else set(layers) if layers is not None else None
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, entry in entries.items():
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise _fail(path, f"tensor {name} is {entry['dtype']}, expected floating point")
        match = _LORA.fullmatch(name)
        if match is None:
            raise _fail(path, f"unexpected tensor {name} in {ADAPTER_WEIGHTS}")
        module = match["module"].removeprefix(_PREFIX)
        if len(entry["shape"]) < 2:
            raise _fail(path, f"tensor {name} has shape {entry['shape']}, expected a matrix")
        pairs.setdefault(module, {})[match["part"]] = entry["shape"]
        if not _targeted(module, targets):
            raise _fail(path, f"weights for {module} are not in target_modules {targets}")
        if layer_set is not None and layer_index(module, config.get("layers_pattern")) not in layer_set:
            raise _fail(path, f"weights for {module} are outside layers_to_transform {sorted(layer_set)}")
    for module, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise _fail(path, f"{module} has lora_{next(iter(parts))} without its other half")
        rank = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
        a_rank, b_rank = parts["A"][0], parts["B"][1]
        if a_rank != rank or b_rank != rank:
            raise _fail(path, f"{module} has rank {a_rank}/{b_rank} in its weights, but adapter_config says {rank}")
    if values:
        _check_finite(path)
    return header


def read_weights(path: str | Path) -> dict[str, Any]:
    """An adapter directory's tensors by name, read within the bounds of their checked header (never unpickled)."""
    from safetensors.torch import load

    from loramem.tensorfile import read_safetensors

    data, _ = read_safetensors(Path(path) / ADAPTER_WEIGHTS, "adapter weights")
    try:
        return dict(load(data))
    except Exception as exc:  # safetensors raises its own error type for corrupt payloads
        raise _fail(path, f"{ADAPTER_WEIGHTS} is corrupt") from exc


def lora_pairs(path: str | Path) -> dict[str, tuple[Any, Any]]:
    """module name (without PEFT's prefix) -> (A, B) of a checked adapter's weights."""
    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in read_weights(path).items():
        match = _LORA.fullmatch(name)
        if match is not None:
            pairs.setdefault(match["module"].removeprefix(_PREFIX), {})[match["part"]] = tensor
    return {module: (parts["A"], parts["B"]) for module, parts in pairs.items()}


def _check_finite(path: str | Path) -> None:
    from loramem.tensorfile import all_finite

    for name, tensor in read_weights(path).items():
        if not all_finite(tensor):
            raise _fail(path, f"tensor {name} holds non-finite values (NaN or infinity)")


def check_meta(meta: Any, config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """loramem.json: an object whose record of the base model, rank, targets and layers agrees with the config."""
    if not isinstance(meta, dict):
        raise _fail(path, f"{LORAMEM_META} is {type(meta).__name__}, expected an object")
    base = meta.get("base_model", {})
    if not isinstance(base, dict) or not all(isinstance(v, (str, type(None))) for v in base.values()):
        raise _fail(path, f"{LORAMEM_META} base_model must hold the model's fingerprint strings")
    hyper = meta.get("hyperparameters")
    if hyper is not None and not isinstance(hyper, dict):
        raise _fail(path, f"{LORAMEM_META} hyperparameters must be an object")
    if hyper and hyper.get("rank") != config.get("r", 8):
        raise _fail(path, f"{LORAMEM_META} records rank {hyper.get('rank')!r}, adapter_config says r={config.get('r')}")
    for key in ("target_modules", "layers_to_transform"):
        recorded, configured = meta.get(key), config.get(key)
        same = (
            sorted(recorded) == sorted(configured)
            if isinstance(recorded, list) and isinstance(configured, list)
            else recorded == configured
        )
        if key in meta and not same:
            raise _fail(path, f"{LORAMEM_META} records {key} {recorded}, adapter_config says {configured}")
    for key, kinds in (("document_sha256", str), ("format", str), ("trainable_parameters", int)):
        if meta.get(key) is not None and not isinstance(meta[key], kinds):
            raise _fail(path, f"{LORAMEM_META} field {key} has the wrong type")
    if meta.get("final_loss") is not None and not _finite(meta["final_loss"]):
        raise _fail(path, f"{LORAMEM_META} final_loss is {meta['final_loss']!r}, expected a finite number")
    return meta


def check_adapter(path: str | Path, values: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(peft config, loramem metadata) of an adapter directory, every file checked and in agreement."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoramemError(f"adapter not found: {path} (expected a PEFT adapter directory)")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise LoramemError(f"{path} is not a PEFT adapter directory (no {name})")
    config = check_config(read_json_file(folder / ADAPTER_CONFIG, "adapter config"), path)
    meta = {}
    if (folder / LORAMEM_META).exists():
        meta = check_meta(read_json_file(folder / LORAMEM_META, "adapter metadata"), config, path)
    check_weights(path, config, values)
    return config, meta


def short_model_name(name: str) -> str:
    """A model's name as adapters compare it: the last path component, lower case (a hub id and a local copy agree)."""
    return Path(name.rstrip("/")).name.lower()


def check_base_model(config: dict[str, Any], meta: dict[str, Any], lm: Any, path: str | Path) -> None:
    """Refuse an adapter of another base model: by fingerprint when loramem.json records one, else by the
    model name in adapter_config (its last path component, so a hub id and a local copy of it agree)."""
    made_for = meta.get("base_model", {}).get("model")
    if made_for:
        if made_for != lm.fingerprint["model"]:
            raise IncompatibleArtifactError(
                f"adapter {path} was trained on another base model ({meta['base_model'].get('id', '?')})"
            )
        return
    named = config.get("base_model_name_or_path")
    if not named:
        return
    known = {
        short_model_name(lm.model_id),
        short_model_name(str(getattr(lm.model.config, "_name_or_path", "") or lm.model_id)),
    }
    if short_model_name(named) not in known:
        raise IncompatibleArtifactError(f"adapter {path} names another base model ({named}), not {lm.model_id}")


def is_adapter_folder(path: Path) -> bool:
    """A folder that train-adapter, merge or eval wrote (the adapter's files and nothing else), or an empty one."""
    if not path.is_dir() or path.is_symlink():
        return False
    entries = list(path.iterdir())
    ours = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORAMEM_META, TRAIN_QA, "README.md"}  # README.md: PEFT's model card
    names = {entry.name for entry in entries}
    if not names:
        return True
    return ADAPTER_CONFIG in names and names <= ours and all(e.is_file() and not e.is_symlink() for e in entries)
