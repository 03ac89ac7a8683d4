"""Command-line options made from spec fields, so that no setting is declared twice.

`@with_specs(train=TrainSpec)` replaces a command's `train` parameter by one option per field of the spec (nested
specs walked): the flag, help, default, bounds and choices come from the field; the command receives the built
spec. An option keeps its default on the command line too (click reports which options were given), so a spec is
built from the given settings alone and its own defaults stand. Spec errors name flags (`named_as_flags`: a field
path to the flag that sets it, in this one place).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_origin

import typer

from loramem.errors import LoramemError
from loramem.log import warn
from loramem.specs.base import Path_, Spec, SpecError, field_extra, flag_of, leaves, nest

FROM_SPEC: Any = None  # the default of a parameter that `with_specs` fills (a spec, or the settings given)


@dataclass(frozen=True)
class Use:
    """How a command takes a spec: leaving some settings out (`exclude`, field paths), with deprecated spellings
    (`old`: path -> flag, accepted with a warning), or as the given settings alone (`given`: a nested mapping, for
    commands that merge them with a file or a record before building the spec)."""

    spec: type[Spec]
    exclude: frozenset[Path_] = field(default_factory=frozenset)
    old: dict[Path_, str] = field(default_factory=dict)
    given: bool = False


def _choices(kind: Any) -> tuple[Any, ...] | None:
    """The allowed values of a Literal (possibly inside Optional, list[...] or Annotated), else None."""
    if get_origin(kind) is Literal:
        return get_args(kind)
    for arg in get_args(kind):
        found = _choices(arg)
        if found:
            return found
    return None


def _base(kind: Any) -> Any:
    """The scalar type a field holds (int for `int | None`, str for list[str], ...)."""
    while get_origin(kind) is typing.Annotated:
        kind = get_args(kind)[0]
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) in (list, tuple) or type(kind).__name__ == "UnionType" or get_origin(kind) is typing.Union:
        return _base(args[0]) if args else str
    return kind


def _is_list(kind: Any) -> bool:
    while get_origin(kind) is typing.Annotated:
        kind = get_args(kind)[0]
    if get_origin(kind) is list:
        return True
    return any(_is_list(a) for a in get_args(kind) if a is not type(None)) if get_args(kind) else False


def _is_tuple(kind: Any) -> bool:
    while get_origin(kind) is typing.Annotated:
        kind = get_args(kind)[0]
    return get_origin(kind) is tuple


def _shown(value: Any) -> str | None:
    """A default as its flag would take it."""
    if value is None or value == []:
        return None
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


@dataclass(frozen=True)
class _Option:
    param: str  # the Python parameter name typer sees
    path: Path_
    flag: str
    parameter: inspect.Parameter


def _options(name: str, use: Use) -> list[_Option]:
    """One typer option per setting of the spec."""
    defaults = use.spec.model_construct()
    made = []
    for path, holder, fname in leaves(use.spec):
        if path in use.exclude:
            continue
        info, extra = holder.model_fields[fname], field_extra(holder, fname)
        node: Any = defaults
        for part in path:
            node = getattr(node, part) if node is not None else None
        flag = extra.get("flag") or "--" + fname.replace("_", "-")
        names = [flag, *([extra["short"]] if extra.get("short") else [])]
        kind, choices = info.annotation, _choices(info.annotation)
        base = _base(kind)
        param = "__".join((name, *path))
        if base is bool:  # a flag; one that is on by default, or by default decided at run time (None), has --no-...
            annotation: Any = bool if node is not None else Optional[bool]
            names[0] += f"/--no-{flag[2:]}" if node or node is None else ""
            shown = {"show_default": extra["shown"]} if extra.get("shown") else {}
            option = typer.Option(node, *names, help=info.description or "", metavar="", **shown)
        else:
            text = _is_list(kind) or _is_tuple(kind) or choices or base not in (int, float)
            annotation = Optional[str] if text else Optional[base]
            metavar = (
                f"[{'|'.join(map(str, choices))}]"
                if choices
                else "TEXT"
                if text
                else {int: "INTEGER", float: "FLOAT"}[base]
            )
            option = typer.Option(
                _shown(node) if text else node,
                *names,
                help=(info.description or "") + (" (comma-separated)" if _is_list(kind) else ""),
                metavar=metavar,
                show_default=extra.get("shown") or True,
            )
        made.append(_Option(param, path, flag, _keyword(param, option, annotation)))
        if path in use.old:  # a deprecated spelling: the same setting, hidden from --help
            old = typer.Option(None, use.old[path], hidden=True)
            made.append(_Option(param + "__old", path, use.old[path], _keyword(param + "__old", old, annotation)))
    return made


def _keyword(name: str, option: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


@contextmanager
def named_as_flags(
    *specs: type[Spec], named: Mapping[str, type[Spec]] | None = None, in_file: Collection[str] = (), file: Any = None
) -> Iterator[None]:
    """Spec errors raised inside name the flags that set the fields of `specs`, not the fields' paths. `named`: a
    command's specs by parameter name, so that `synth.model` is the `model` of its spec called synth; otherwise the
    first spec that has the setting names it. Settings that came from a config `file` (`in_file`, dotted paths) are
    named as the file names them, `train.rank in FILE`. The one place a field path becomes a flag."""

    def name(path: Path_) -> str:
        dotted = ".".join(path)
        if dotted in in_file:
            return f"{dotted} in {file}"
        by_name = [flag_of(named[path[0]], path[1:])] if named and len(path) > 1 and path[0] in named else []
        flags = [*by_name, *(flag_of(spec, path) for spec in [*specs, *(named or {}).values()])]
        return next((flag for flag in flags if flag.startswith("--")), dotted)

    try:
        yield
    except SpecError as exc:
        raise LoramemError(exc.render(name)) from None


def with_specs(**uses: type[Spec] | Use) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace each named parameter of a command by the options of its spec, and build the spec at call time."""
    specs = {name: u if isinstance(u, Use) else Use(u) for name, u in uses.items()}

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)
        made = {name: _options(name, use) for name, use in specs.items()}
        own = inspect.signature(func).parameters
        params = (
            [] if "ctx" in own else [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        )
        for p in own.values():
            if p.name in made:
                params += [o.parameter for o in made[p.name]]
            else:
                params.append(
                    p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                )

        def command(ctx: typer.Context, **kwargs: Any) -> Any:
            for name, use in specs.items():
                given: dict[Path_, Any] = {}
                for option in made[name]:
                    value = kwargs.pop(option.param)
                    source = ctx.get_parameter_source(option.param)
                    if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
                        continue
                    if option.param.endswith("__old"):
                        warn(f"{option.flag} is deprecated here; use {flag_of(use.spec, option.path)}")
                    given[option.path] = value
                if use.given:
                    kwargs[name] = nest(given)
                else:
                    with named_as_flags(use.spec):
                        kwargs[name] = use.spec.parse(nest(given))
            if "ctx" in own:
                kwargs["ctx"] = ctx
            with named_as_flags(named={name: use.spec for name, use in specs.items()}):
                return func(**kwargs)  # a library's SpecError names fields: shown as this command's flags

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__qualname__, command.__doc__ = func.__name__, func.__qualname__, func.__doc__
        command.__module__ = func.__module__
        return command

    return decorate
