"""The KV-cache artifact checked before any use: metadata typed, every tensor of the dtype and shape it implies.

`check_meta` runs on the metadata alone (a known format version first: another version is exit 3), then
`check_tensors` on the loaded tensors: exactly the expected names; token ids, positions, keys, values (or their
quantized parts and scales), value-group masks and press scores of the dtype and shape that the metadata and the
storage imply; positions in range, strictly ascending and starting with the framing tokens; floats finite.
Each rule is stated once here; a failure is one line naming what is wrong.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.tensorfile import all_finite

FORMAT_VERSION = 1
MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORED = {"float32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QUANTIZED = {"int8": torch.int8, "int4": torch.uint8}
# Generous bounds: far above any model loramem runs, low enough that arithmetic on them stays sane.
_LIMITS = {"n_layers": 4096, "n_kv_heads": 4096, "head_dim": 65536, "n_tokens": 2**31 - 1}
_FRAMING_KEYS = ("style", "prefix", "separator", "instruction", "suffix", "end_of_turn")


class InvalidCache(LoramemError):
    """A file that claims to be a loramem cache but is wrong inside."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _one_of(value: Any, options: Any) -> bool:
    """Whether a metadata value is one of some names (any JSON value may stand where a name should)."""
    return isinstance(value, str) and value in options


_JSON_NAMES = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_JSON_NAMES |= {dict: "an object", list: "a list"}


def _kind(value: Any) -> str:
    """A JSON value's kind as a message names it."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


class _Rules:
    """The checks of one cache; `fail` names the source in every message."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, what: str) -> LoramemError:
        return InvalidCache(f"{self.source} is not a valid loramem cache: {what}")

    def integer(self, meta: dict[str, Any], key: str, low: int, high: int) -> int:
        value = meta.get(key)
        if type(value) is not int:
            raise self.fail(f"metadata field {key} is {_kind(value)}, expected an integer")
        if not low <= value <= high:
            raise self.fail(f"metadata field {key} is {value}, expected {low} to {high}")
        return value

    def typed(self, meta: dict[str, Any], key: str, kinds: tuple[type, ...], required: bool = False) -> Any:
        value = meta.get(key)
        if value is None and not required and (key not in meta or type(None) in kinds):
            return value
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(_JSON_NAMES[k] for k in kinds if k is not int or float not in kinds)
            raise self.fail(f"metadata field {key} is {_kind(value)}, expected {expected}")
        return value

    def tensor(self, tensors: dict[str, torch.Tensor], name: str, label: str, dtype: torch.dtype, shape: tuple) -> Any:
        t = tensors.get(name)
        if t is None:
            raise self.fail(f"{label} are missing (no tensor {name})")
        if t.dtype != dtype:
            raise self.fail(f"{label} are {_name(t.dtype)}, expected {_name(dtype)}")
        if tuple(t.shape) != shape:
            raise self.fail(f"{label} have shape {list(t.shape)}, expected {list(shape)}")
        if not all_finite(t):
            raise self.fail(f"{label} hold non-finite values (NaN or infinity)")
        return t


def check_meta(meta: Any, source: str) -> dict[str, Any]:
    """The cache metadata with every field the code reads of the right type and range."""
    rules = _Rules(source)
    if not isinstance(meta, dict):
        raise rules.fail(f"its metadata is {_kind(meta)}, expected an object")
    version = meta.get("format_version")
    if type(version) is not int:
        raise rules.fail(f"metadata field format_version is {_kind(version)}, expected an integer")
    if version != FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{source} has cache format version {version}; this loramem reads version {FORMAT_VERSION}"
        )
    n_tokens = rules.integer(meta, "n_tokens", 1, _LIMITS["n_tokens"])
    for key in ("n_layers", "n_kv_heads", "head_dim"):
        rules.integer(meta, key, 1, _LIMITS[key])
    rules.integer(meta, "n_protected", 0, n_tokens)
    if not _one_of(meta.get("dtype"), MODEL_DTYPES):
        raise rules.fail(f"metadata field dtype is {meta.get('dtype')!r}, expected one of {', '.join(MODEL_DTYPES)}")
    model = rules.typed(meta, "model", (dict,), required=True)
    if not isinstance(model.get("model"), str) or not all(isinstance(v, (str, type(None))) for v in model.values()):
        raise rules.fail("metadata field model must hold the model's fingerprint strings")
    framing = rules.typed(meta, "framing", (dict,), required=True)
    if not all(isinstance(framing.get(k), str) for k in _FRAMING_KEYS):
        raise rules.fail(f"metadata field framing must hold the strings {', '.join(_FRAMING_KEYS)}")
    document = rules.typed(meta, "document", (dict,), required=True)
    if not isinstance(document.get("sha256"), str) or not isinstance(document.get("preview"), str):
        raise rules.fail("metadata field document must hold its sha256 and preview strings")
    adapter = rules.typed(meta, "adapter", (dict, type(None)))
    if adapter is not None and not all(isinstance(adapter.get(k), str) for k in ("path", "sha256")):
        raise rules.fail("metadata field adapter must be null or hold the adapter's path and sha256")
    for key in ("rope", "score_adjustments"):
        rules.typed(meta, key, (dict,))
    for key in ("loramem_version", "created"):
        rules.typed(meta, key, (str,))
    rules.typed(meta, "truncated", (bool,))
    seconds = rules.typed(meta, "prefill_seconds", (int, float))
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise rules.fail(f"metadata field prefill_seconds is {seconds}, expected a finite number >= 0")
    names = rules.typed(meta, "scores", (list,))
    if names is not None and not all(isinstance(n, str) for n in names):
        raise rules.fail("metadata field scores must list press names")
    history = rules.typed(meta, "history", (list,))
    if history is not None and not all(isinstance(step, dict) for step in history):
        raise rules.fail("metadata field history must list compression steps (objects)")
    rules.typed(meta, "compression", (dict, type(None)))
    _check_storage(rules, meta)
    return meta


def _check_storage(rules: _Rules, meta: dict[str, Any]) -> None:
    storage = rules.typed(meta, "storage", (dict,))
    if storage is None:
        return
    from loramem.vocab import QUANT_AXES, STORE_DTYPES

    head_dim = meta["head_dim"]
    dtype, axis, group = storage.get("dtype", "native"), storage.get("axis", "token"), storage.get("group", 0)
    if set(storage) - {"dtype", "axis", "group"}:
        raise rules.fail(f"metadata field storage has unknown keys {sorted(set(storage) - {'dtype', 'axis', 'group'})}")
    if not _one_of(dtype, STORE_DTYPES) or not _one_of(axis, QUANT_AXES):
        raise rules.fail(f"metadata field storage names an unknown storage ({dtype!r}, axis {axis!r})")
    if type(group) is not int or group < 0 or (group and head_dim % group):
        raise rules.fail(f"metadata field storage has group {group!r}, which does not divide head_dim {head_dim}")
    if dtype == "int4" and (head_dim % 2 or group % 2):
        raise rules.fail("metadata field storage is int4 with an odd head_dim or group")


def _value_groups(rules: _Rules, meta: dict[str, Any]) -> int:
    """Groups per value vector of a value-group cache, from its compression step."""
    step = meta.get("compression")
    if not isinstance(step, dict):
        raise rules.fail("it has value-group masks but no value-group compression step")
    groups, budget = step.get("groups"), step.get("budget")
    if type(groups) is not int or groups < 1 or meta["head_dim"] % groups:
        raise rules.fail(f"compression groups {groups!r} does not divide head_dim {meta['head_dim']}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise rules.fail(f"compression budget {budget!r} is not a number in (0, 1]")
    if not isinstance(step.get("score_groups"), str):
        raise rules.fail("compression score_groups must be a string")
    if meta.get("storage", {}).get("dtype") == "int4" and (meta["head_dim"] // groups) % 2:
        raise rules.fail("int4 storage of value groups needs an even group width")
    return groups


def _check_positions(rules: _Rules, positions: torch.Tensor, layer: int, meta: dict[str, Any]) -> None:
    n_tokens, protected = meta["n_tokens"], meta["n_protected"]
    label = f"layer {layer} positions"
    p = positions.long()
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n_tokens):
        raise rules.fail(f"{label} run outside [0, {n_tokens})")
    if p.shape[1] > 1 and not bool((p[:, 1:] > p[:, :-1]).all()):
        raise rules.fail(f"{label} are not strictly ascending")
    if p.shape[1] < protected or not torch.equal(p[:, :protected], torch.arange(protected).expand(p.shape[0], -1)):
        raise rules.fail(f"{label} do not keep the {protected} framing tokens")
    if meta.get("compression") is None and p.shape[1] != n_tokens:
        raise rules.fail(f"{label} keep {p.shape[1]} of {n_tokens} tokens, but the cache is not compressed")


def _check_stored(
    rules: _Rules,
    tensors: dict[str, torch.Tensor],
    name: str,
    label: str,
    shape: tuple,
    meta: dict[str, Any],
    rows: bool,
) -> set[str]:
    """Keys or values as stored: a float tensor, or quantized data and its scales; returns the names used."""
    storage = meta.get("storage", {})
    dtype, axis, group = storage.get("dtype", "native"), storage.get("axis", "token"), storage.get("group", 0)
    if dtype not in _QUANTIZED:
        expected = MODEL_DTYPES[meta["dtype"]] if dtype == "native" else _STORED[dtype]
        rules.tensor(tensors, name, label, expected, shape)
        return {name}
    heads, n, width = shape
    packed = width // 2 if dtype == "int4" else width
    rules.tensor(tensors, f"{name}.q", f"{label} ({dtype} data)", _QUANTIZED[dtype], (heads, n, packed))
    if axis == "channel":
        scale_shape = (heads, 1, width)
    else:
        scale_shape = (heads, n, 1 if rows or not group else width // group)
    scale = rules.tensor(tensors, f"{name}.scale", f"{label} (scales)", torch.float32, scale_shape)
    if scale.numel() and float(scale.min()) <= 0:
        raise rules.fail(f"{label} (scales) are not all positive")
    return {f"{name}.q", f"{name}.scale"}


def check_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
    """Every tensor present with the dtype and shape the (checked) metadata implies, and nothing else."""
    rules = _Rules(source)
    n_layers, heads, dim, n_tokens = meta["n_layers"], meta["n_kv_heads"], meta["head_dim"], meta["n_tokens"]
    token_ids = rules.tensor(tensors, "token_ids", "token ids", torch.int32, (n_tokens,))
    if int(token_ids.min()) < 0:
        raise rules.fail("token ids hold negative values")
    masked = "layers.0.group_mask" in tensors
    groups = _value_groups(rules, meta) if masked else 0
    expected = {"token_ids"}
    for layer in range(n_layers):
        prefix = f"layers.{layer}"
        positions = tensors.get(f"{prefix}.positions")
        kept = positions.shape[-1] if positions is not None and positions.dim() else 0
        positions = rules.tensor(tensors, f"{prefix}.positions", f"layer {layer} positions", torch.int32, (heads, kept))
        _check_positions(rules, positions, layer, meta)
        expected.add(f"{prefix}.positions")
        shapes = {"keys": (heads, kept, dim), "values": (heads, kept, dim)}
        if masked:
            mask = rules.tensor(
                tensors, f"{prefix}.group_mask", f"layer {layer} group mask", torch.uint8, (heads, kept, groups)
            )
            if mask.numel() and int(mask.max()) > 1:
                raise rules.fail(f"layer {layer} group mask holds values other than 0 and 1")
            bools = mask.bool()
            shapes = {"keys": (1, int(bools.any(-1).sum()), dim), "values": (1, int(bools.sum()), dim // groups)}
            expected.add(f"{prefix}.group_mask")
        for kind, shape in shapes.items():
            name = f"{prefix}.{kind}"
            expected |= _check_stored(rules, tensors, name, f"layer {layer} {kind}", shape, meta, masked)
    for name in list(tensors):
        if name.startswith("scores.") and len(name) > len("scores."):
            rules.tensor(tensors, name, f"{name[7:]} scores", torch.float32, (n_layers, heads, n_tokens))
            expected.add(name)
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise rules.fail(f"unexpected tensor {unexpected[0]}")


def check_fits(meta: dict[str, Any], token_ids: torch.Tensor, lm: Any, source: str) -> None:
    """A cache whose fingerprint names the loaded model must also have its shape and its framing: the layers, KV
    heads and head dim of the model's config, the framing its chat template gives (another loramem's framing
    is exit 3) and that framing's tokens as the protected prefix."""
    from loramem.model.prompt import Framing, prefix_ids
    from loramem.vocab import FRAMINGS

    rules = _Rules(source)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    heads = config.num_attention_heads
    expected = {
        "n_layers": config.num_hidden_layers,
        "n_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }
    for key, value in expected.items():
        if meta[key] != value:
            raise rules.fail(f"{key} is {meta[key]}, but the model it names has {value}")
    style = meta["framing"]["style"]
    if style not in FRAMINGS:
        raise rules.fail(f"framing style {style!r} is not one of {', '.join(FRAMINGS)}")
    if meta["framing"] != lm.framing(style).to_dict():
        raise IncompatibleArtifactError(
            f"{source} frames the document differently than this loramem frames it for this model; re-encode it"
        )
    prefix = prefix_ids(lm.tokenizer, Framing.from_dict(meta["framing"]))
    if meta["n_protected"] != len(prefix) or token_ids[: len(prefix)].tolist() != prefix:
        raise rules.fail(f"n_protected is {meta['n_protected']}, but its framing prefix is {len(prefix)} tokens")
