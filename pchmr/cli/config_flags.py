"""Command-line flags derived from a config dataclass's field metadata (as LightningCLI derives
them from signatures).

Each field of the config (``RunConfig``) carries a :class:`~pchmr.core.engine.run_options.RunOption`:
help, flag, and how the command line reads it. :func:`with_config_flags` turns a typer command
into one that also takes a flag per field (typer reads the generated ``__signature__``) and hands
the command the flags it was given as :class:`GivenFlags`; the command lays them over the config
file's values with :meth:`GivenFlags.over`. ``pchmr run`` takes every field, ``pchmr partition``
those a partition depends on.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.markup import escape

from pchmr.cli._options import parse_options
from pchmr.core.engine.config import ConfigError
from pchmr.core.engine.run_options import (
    KeyValues,
    NameAndPath,
    NotOnCli,
    PathValue,
    Repeated,
    RunOption,
    Shortcut,
    Switch,
    declared_option,
)

__all__ = ["ConfigFlag", "GivenFlags", "config_flags", "with_config_flags"]

Command = TypeVar("Command", bound=Callable[..., Any])

#: Field types a plain ``--flag VALUE`` reads (click converts and names a wrong type).
_PLAIN_TYPES = (str, int, float)


@dataclass(frozen=True)
class ConfigFlag:
    """One flag of a command: ``param`` its parameter name, ``field`` the config field it sets
    (for a shortcut, the mapping holding its key), ``option`` that field's metadata,
    ``shortcut`` set when the flag stands for one key of a ``key=value`` mapping."""

    param: str
    field: str
    option: RunOption
    parameter: inspect.Parameter
    shortcut: Shortcut | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling on the command line: ``("--freeze-encoder", "--train-encoder")``."""
        return ("--" + self.shortcut.key,) if self.shortcut is not None else _names(self.field, self.option)


def _names(field: str, option: RunOption) -> tuple[str, ...]:
    """A field's flag, and for a switch the flag that turns it off."""
    flag = option.flag_of(field)
    return (flag, option.cli.off) if isinstance(option.cli, Switch) else (flag,)


def config_flags(config_type: type, fields: Collection[str] | None = None) -> tuple[ConfigFlag, ...]:
    """The flags of ``config_type``'s fields (all, or those named in ``fields``), in field order, each
    shortcut right after its mapping; fields declared :class:`NotOnCli` have none. TypeError when a
    field's metadata does not fit its type (a programming error, found when the CLI is built)."""
    hints = typing.get_type_hints(config_type)
    all_fields = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(fields or ()) - set(all_fields))
    if unknown:
        raise TypeError(f"{config_type.__name__} has no fields {unknown}")
    flags: list[ConfigFlag] = []
    for field in all_fields.values():
        option = declared_option(field)
        if isinstance(option.cli, NotOnCli) or (fields is not None and field.name not in fields):
            continue
        annotation, default = _parameter_type(field.name, option, hints[field.name], all_fields)
        help_text = escape(option.help + _default_note(field))
        decls = "/".join(_names(field.name, option))
        info = typer.Option(default, decls, help=help_text, metavar=_metavar(option))
        parameter = inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
        flags.append(ConfigFlag(field.name, field.name, option, parameter))
        for shortcut in option.cli.shortcuts if isinstance(option.cli, KeyValues) else ():
            flag = option.flag_of(field.name)
            info = typer.Option(
                None, "--" + shortcut.key, help=escape(f"{shortcut.help} (alias of {flag} {shortcut.key}=...)")
            )
            param = shortcut.key.replace("-", "_")
            shortcut_parameter = inspect.Parameter(
                param, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=Optional[str]
            )
            flags.append(ConfigFlag(param, field.name, option, shortcut_parameter, shortcut))
    taken = [name for flag in flags for name in flag.names]
    clashes = sorted({name for name in taken if taken.count(name) > 1})
    if clashes:
        raise TypeError(f"{config_type.__name__}: flags {clashes} are declared by more than one field")
    return tuple(flags)


def _parameter_type(
    name: str, option: RunOption, hint: Any, fields: Mapping[str, dataclasses.Field[Any]]
) -> tuple[Any, Any]:
    """``(annotation, default)`` of the typer parameter reading field ``name`` of type ``hint``;
    unset flags stay None (or an empty list), so a config file's value or the field's default holds."""
    base = _without_none(hint)
    form = option.cli
    if isinstance(form, KeyValues):
        if typing.get_origin(base) not in (Mapping, dict):
            raise TypeError(f"field '{name}' reads key=value pairs but is a {hint}, not a mapping")
        return list[str], []
    if isinstance(form, Repeated):
        if typing.get_origin(base) is not tuple:
            raise TypeError(f"field '{name}' reads a repeatable flag but is a {hint}, not a tuple")
        return list[str], []
    if isinstance(form, Switch):
        if base is not bool:
            raise TypeError(f"field '{name}' is a --flag/--off switch but is a {hint}, not a bool")
        return Optional[bool], None
    if isinstance(form, NameAndPath):
        target = fields.get(form.path_field)
        if target is None or not isinstance(declared_option(target).cli, NotOnCli):
            raise TypeError(
                f"field '{name}' puts its PATH into '{form.path_field}', which must be a field without a flag"
            )
    if isinstance(form, PathValue):
        return Optional[Path], None
    if base not in _PLAIN_TYPES:
        raise TypeError(f"field '{name}' is a {hint}: a plain flag reads {', '.join(t.__name__ for t in _PLAIN_TYPES)}")
    return Optional[base], None


def _without_none(hint: Any) -> Any:
    """``X | None`` → ``X``; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _default_note(field: dataclasses.Field[Any]) -> str:
    """`` [default: X]`` (typer's own style) for a field with a plain default; nothing for None or a factory."""
    if field.default is dataclasses.MISSING or field.default is None:
        return ""
    return f" [default: {field.default}]"


def _metavar(option: RunOption) -> str | None:
    if isinstance(option.cli, KeyValues):
        return "KEY=VALUE"
    if isinstance(option.cli, NameAndPath):
        return "NAME[:PATH]"
    return None


@dataclass(frozen=True)
class GivenFlags:
    """The config flags one invocation of a command received: ``values`` by parameter name,
    None (or an empty list) for a flag not given."""

    flags: tuple[ConfigFlag, ...]
    values: Mapping[str, Any]

    def over(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """``base`` (a config file's values, keyed by field name) with every given flag written over
        it: a plain value replaces, ``key=value`` flags replace the whole table, a shortcut sets its
        key in the table (the flags' or the file's). ConfigError for a malformed ``key=value`` or a
        shortcut that contradicts its table."""
        out = dict(base)
        for flag in self.flags:
            given = self.values.get(flag.param)
            if given is None or (isinstance(given, list) and not given):
                continue
            form = flag.option.cli
            if flag.shortcut is not None:
                out[flag.field] = _with_shortcut(
                    out.get(flag.field, {}), flag.shortcut.key, given, flag.option.flag_of(flag.field)
                )
            elif isinstance(form, KeyValues):
                out[flag.field] = parse_options(list(given), flag.names[0], ConfigError)
            elif isinstance(form, Repeated):
                out[flag.field] = list(given)
            elif isinstance(form, NameAndPath):
                name, _, path = str(given).partition(":")
                out[flag.field], out[form.path_field] = name, path or None
            elif isinstance(form, PathValue):
                out[flag.field] = str(given)
            else:  # Value, Switch (a NotOnCli field has no flag)
                out[flag.field] = given
        return out


def _with_shortcut(table: Mapping[str, Any], key: str, value: str, table_flag: str) -> dict[str, Any]:
    """``table`` with ``key`` set to ``value`` (given as ``--KEY VALUE``); ConfigError when the
    table already holds another value for it."""
    given = table.get(key)
    if given is not None and given != value:
        raise ConfigError(f"--{key} {value} contradicts {table_flag} {key}={given}; give one of them")
    return {**table, key: value}


def with_config_flags(config_type: type, fields: Collection[str] | None = None) -> Callable[[Command], Command]:
    """Decorate a typer command that takes a keyword ``flags: GivenFlags``: the decorated command
    offers a flag per field of ``config_type`` (all, or those named in ``fields``) before its own
    options, and receives what was given as ``flags``."""
    flags = config_flags(config_type, fields)

    def decorate(command: Command) -> Command:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
        names = {flag.param for flag in flags}
        clash = sorted(names & {p.name for p in own})
        if clash:
            raise TypeError(f"{command.__name__}: parameters {clash} are also {config_type.__name__} flags")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = GivenFlags(flags, {name: kwargs.pop(name) for name in names if name in kwargs})
            return command(**kwargs, flags=given)

        parameters = [flag.parameter for flag in flags] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        # typer reads annotations through typing.get_type_hints: give it the resolved ones
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return typing.cast(Command, wrapper)

    return decorate
