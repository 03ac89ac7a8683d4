"""The base of every spec: a pydantic model whose fields carry their default, bounds, choices and help once.

A spec's fields are the one declaration of a setting: the CLI builds its options from them (`cli/specopts.py`),
config files and run records are them serialized, and a server's request bodies are the same models. Validation
errors become one `SpecError` naming each setting by its field path (`train.rank`); a front-end renders the path
its own way (the CLI as the flag, `--rank`) in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from loramem.errors import LoramemError

S = TypeVar("S", bound="Spec")
Path_ = tuple[str, ...]


class SpecError(LoramemError):
    """Settings a spec refused: (field paths at fault, reason) pairs, rendered with the settings' names in front."""

    def __init__(self, problems: list[tuple[list[Path_], str]], source: str | None = None) -> None:
        self.problems, self.source = problems, source
        super().__init__(self.render(lambda path: ".".join(path)))

    def render(self, name: Callable[[Path_], str]) -> str:
        """The problems as one line, each setting named by `name(path)` (a field path, a flag, a request key)."""
        text = "; ".join(
            f"{', '.join(name(p) for p in paths)}: {reason}" if paths else reason for paths, reason in self.problems
        )
        return f"{self.source}: {text}" if self.source else text


def refuse(reason: str, *paths: str) -> NoReturn:
    """A spec's own check failed: the settings at fault by dotted field path, so each front-end can name them its
    way. Raised from a validator it passes through pydantic unchanged."""
    raise SpecError([([tuple(p.split(".")) for p in paths], reason)])


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _field(spec: type[Spec] | None, path: Path_) -> Any:
    """The FieldInfo at a path of a spec (nested specs walked), or None."""
    info = None
    for part in path:
        if spec is None or part not in spec.model_fields:
            return None
        info = spec.model_fields[part]
        kind = info.annotation
        spec = kind if isinstance(kind, type) and issubclass(kind, Spec) else None
    return info


def _range(info: Any) -> str | None:
    """A field's bounds as users read them: in [0, 1], in (0, 1], at least 1, > 0."""
    low = high = None
    for bound in getattr(info, "metadata", ()):
        for name, text in (("ge", "["), ("gt", "(")):
            if getattr(bound, name, None) is not None:
                low = (text, getattr(bound, name))
        for name, text in (("le", "]"), ("lt", ")")):
            if getattr(bound, name, None) is not None:
                high = (text, getattr(bound, name))
    if low and high:
        return f"must be in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"must be at least {low[1]:g}" if low[0] == "[" else f"must be > {low[1]:g}"
    if high:
        return f"must be at most {high[1]:g}" if high[0] == "]" else f"must be < {high[1]:g}"
    return None


def _reason(error: Mapping[str, Any], info: Any = None) -> str:
    """pydantic's message, in loramem's voice: lower case, without the `Value error,` prefix, with the input;
    a bound as the field's whole range."""
    if error["type"] == "extra_forbidden":
        return "unknown setting"
    if error["type"] in _BOUND_ERRORS and _range(info):
        return f"{_range(info)} (got {error.get('input')!r})"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message[:1].lower() + message[1:]
    if error["type"] not in ("value_error", "missing", "extra_forbidden") and "input" in error:
        message += f" (got {error['input']!r})"
    return message


def spec_error(exc: ValidationError, spec: type[Spec] | None = None, source: str | None = None) -> SpecError:
    """A ValidationError of `spec` as a SpecError; list positions in a path are dropped (the setting is named)."""
    problems: list[tuple[list[Path_], str]] = []
    for error in exc.errors():
        path = tuple(str(part) for part in error["loc"] if isinstance(part, str))
        if path and any([path] == paths for paths, _ in problems):
            continue  # one reason per setting: the items of a list fail alike
        problems.append(([path] if path else [], _reason(error, _field(spec, path))))
    return SpecError(problems, source)


class Spec(BaseModel):
    """A typed, validated group of settings: unknown settings are refused, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise spec_error(exc, type(self)) from None

    # Not a custom __init__ to pydantic: nested specs are validated as part of their parent, so an error keeps its
    # whole path (train.rank), and only a spec built directly turns ValidationError into SpecError here.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def parse(cls: type[S], data: Mapping[str, Any], source: str | None = None) -> S:
        """A spec from plain data (a config file, a request body, a record); `source` prefixes its errors."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise spec_error(exc, cls, source) from None
        except SpecError as exc:
            raise SpecError(exc.problems, source) from None

    def replace(self: S, **changes: Any) -> S:
        """A copy with some settings changed, validated like a new spec."""
        return type(self).parse({**self.model_dump(), **changes})


def setting(
    default: Any = None,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    short: str | None = None,
    shown: str | None = None,
    runtime: bool = False,
    **bounds: Any,
) -> Any:
    """A spec field: its default, help and bounds (`ge`, `gt`, `le`, `lt`), and how a command line spells it
    (`flag`, default `--field-name`; `short`, e.g. -m; `shown`, the default as --help describes it). `runtime`:
    how a result is computed, not what it is (a decoding batch), so run records leave it out."""
    extra = {"flag": flag, "short": short, "shown": shown, "runtime": runtime or None}
    schema_extra: Any = {k: v for k, v in extra.items() if v is not None} or None
    if factory is not None:
        return Field(default_factory=factory, description=help, json_schema_extra=schema_extra, **bounds)
    return Field(default, description=help, json_schema_extra=schema_extra, **bounds)


def comma_separated(value: Any) -> Any:
    """'a, b' -> ['a', 'b'], as a flag or a config file may write a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = BeforeValidator(comma_separated)


def unique(items: list[Any]) -> list[Any]:
    """In first-seen order, each once."""
    return list(dict.fromkeys(items))


def field_extra(spec: type[Spec], name: str) -> dict[str, Any]:
    extra = spec.model_fields[name].json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def leaves(spec: type[Spec], prefix: Path_ = ()) -> Iterator[tuple[Path_, type[Spec], str]]:
    """Every setting of a spec, nested specs walked: (field path, the spec class holding it, field name)."""
    for name, info in spec.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, Spec):
            yield from leaves(kind, (*prefix, name))
        else:
            yield (*prefix, name), spec, name


def flag_of(spec: type[Spec], path: Path_) -> str:
    """The command-line flag of a setting (its field's `flag`, else --field-name). A nested spec's own checks name
    its fields without the parent's prefix (chunk_size for train.chunk_size): a path that ends one setting's only."""
    found = [(holder, name) for leaf, holder, name in leaves(spec) if leaf == path]
    found = found or [(holder, name) for leaf, holder, name in leaves(spec) if leaf[-len(path) :] == path]
    if len(found) != 1:
        return ".".join(path)
    holder, name = found[0]
    return field_extra(holder, name).get("flag") or "--" + name.replace("_", "-")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested record as dotted keys (train.rank), so two records compare setting by setting."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest(flat: Mapping[Path_, Any]) -> dict[str, Any]:
    """Settings by field path -> the nested mapping a spec parses."""
    data: dict[str, Any] = {}
    for path, value in flat.items():
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return data


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over`'s settings on top of `base`'s, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out
