"""Command-line options derived from the library's config dataclasses: a default and a help text are written once.

A stage declares which config dataclasses it takes and under which params.yaml group their keys live::

    @stage(cfg=Group(FeatureConfig, "features"), run_cfg=RUN)
    def main(model: Path = typer.Option(..., help="…"), …, *, cfg: FeatureConfig, run: RunConfig) -> None:

Every field of ``FeatureConfig`` declared with :func:`netvlad_core.config.option` becomes one option
(``--batch-size``; booleans ``--float16/--no-float16``) with the field's default and help, followed by the
params.yaml key it maps to; the command receives the built (and validated) dataclass. Typer has no support of its
own for dataclass parameters (tiangolo/typer#154), hence this helper: it gives the command a signature that Typer
reads. Values that may be unset (``int | None`` …) go through :func:`netvlad_core.config.parse_unset`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import typer

from netvlad_core.config import RunConfig, option_name, parse_unset
from netvlad_core.errors import NetVLADError
from stages._common import user_errors


@dataclass(frozen=True)
class Group:
    """A config dataclass a command takes: ``params`` is its params.yaml group (``None``: not in params.yaml),
    ``only``/``exclude`` pick fields, ``prefix`` goes before each option name."""

    cls: type
    params: str | None = None
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()


TRUE_WORDS, FALSE_WORDS = ("yes", "true", "on", "1"), ("no", "false", "off", "0")
RUN = Group(RunConfig)  # device, progress bars, torchrun timeout: every heavy command takes them


def config_fields(group: Group) -> list[dataclasses.Field]:
    """The fields of ``group`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(group.cls)
            if f.init and f.metadata.get("cli", False) and "help" in f.metadata
            and (group.only is None or f.name in group.only) and f.name not in group.exclude]


def _optional_base(hint: Any) -> Any | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _converter(name: str, hint: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(the type Typer parses, a function from that value to the field's value) for a field of type ``hint``."""
    base = _optional_base(hint)
    if base is not None:
        def unset_or(value: Any) -> Any:
            value = parse_unset(value)
            if value is None or base is str:
                return value
            if base is bool:
                word = str(value).strip().lower()
                if word in TRUE_WORDS or word in FALSE_WORDS:
                    return word in TRUE_WORDS
                raise NetVLADError(f"--{name}: expected auto, yes or no, got {value!r}")
            try:
                return base(value)
            except (TypeError, ValueError):
                raise NetVLADError(f"--{name} must be {base.__name__} or unset (default, none, null or ''), got "
                                   f"{value!r}") from None
        return Optional[str], unset_or
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        element = typing.get_args(hint)[0]
        return List[element], (tuple if origin is tuple else list)
    if hint in (bool, int, float, str):
        return hint, lambda value: value
    raise TypeError(f"option --{name}: unsupported field type {hint!r}")


def _option_parameter(group: Group, arg: str, field: dataclasses.Field, hint: Any) -> inspect.Parameter:
    name = option_name(field)
    cli_type, _ = _converter(name, hint)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(default, tuple):
        default = list(default)
    where = f" (params.yaml: {group.params}.{name})" if group.params else ""
    decls = [f"--{name}/--no-{name}"] if hint is bool else [f"--{name}"]
    info = typer.Option(default, *decls, help=field.metadata["help"] + where,
                        show_default="unset" if default is None else True)
    return inspect.Parameter(f"{arg}__{field.name}", inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=cli_type)


def stage(**groups: Group) -> Callable[[Callable], Callable]:
    """Give a command one option per config field of ``groups`` (``{parameter name: Group}``), build the
    dataclasses from the parsed values, validate them (``validate()`` when they have one) and call the command with
    them; user errors become one ``error:`` line (:func:`stages._common.user_errors`)."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        own_hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=own_hints.get(p.name, p.annotation)) for name, p in signature.parameters.items()
               if name not in groups]
        extra, converters, negations = [], {}, {}
        for arg, group in groups.items():
            hints = typing.get_type_hints(group.cls)
            for field in config_fields(group):
                param = _option_parameter(group, arg, field, hints[field.name])
                extra.append(param)
                converters[param.name] = (arg, field.name, _converter(option_name(field), hints[field.name])[1])
                if _optional_base(hints[field.name]) is bool:  # a YAML false arrives as --no-<name> (DVC)
                    flag = f"{param.name}__no"
                    extra.append(inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=(
                        typer.Option(False, f"--no-{option_name(field)}", hidden=True))))
                    negations[flag] = (param.name, option_name(field))

        @user_errors
        def command(**kwargs: Any) -> Any:
            for flag, (name, option) in negations.items():
                if kwargs.pop(flag):
                    if parse_unset(kwargs[name]) is not None:
                        raise NetVLADError(f"--{option} {kwargs[name]} contradicts --no-{option}")
                    kwargs[name] = "no"
            values: dict[str, dict[str, Any]] = {arg: {} for arg in groups}
            for key in list(kwargs):
                if key in converters:
                    arg, field_name, convert = converters[key]
                    values[arg][field_name] = convert(kwargs.pop(key))
            for arg, group in groups.items():
                built = group.cls(**values[arg])
                if hasattr(built, "validate"):
                    built.validate()
                kwargs[arg] = built
            return fn(**kwargs)

        functools.update_wrapper(command, fn, updated=())
        del command.__wrapped__  # Typer must read the signature below, not fn's
        command.__signature__ = signature.replace(parameters=own + extra)
        command.__annotations__ = {p.name: p.annotation for p in own + extra}
        command.__config_groups__ = groups  # what the command's options come from (tests/test_config.py)
        return command

    return decorate
