"""Plugin options: each plugin declares them once, as a frozen dataclass, and one reader reads them.

A plugin's options are the fields of one frozen dataclass; :func:`option` gives every field its
default, its help and what is allowed (a range, choices). The factory exposes that class as its
``options`` attribute (the optional :class:`DeclaresOptions` capability) and reads the user's
``key=value`` mapping with :func:`read_options`. The engine reads the same class before any data
is prepared, so a bad option ends a run before heavy work, and ``pchmr plugins --options NAME``
prints :func:`describe_options`::

    @dataclass(frozen=True)
    class LDAOptions:
        alpha: float = option(0.5, low=0.0, low_open=True, help="Dirichlet concentration")
        label: str = option("source", help="the meta label whose values are skewed")

    def lda(data, num_clients, seed, options):
        opts = read_options(LDAOptions, options, plugin="lda", kind="partitioner")
        ...

    lda.options = LDAOptions

Keys. A field's key is its name with ``_`` written ``-`` (Flower's kebab-case: ``proximal-mu``)
unless ``option(key=...)`` names it (the backbones keep ``keep_ratio``). Users may write any key
with ``-`` or ``_``: matching ignores the difference, and messages print the declared key.

Values are coerced by the field's annotation: ``bool`` (also the strings ``true``/``false``),
``int`` (also integral floats and numeric strings), ``float`` (also ints and numeric strings;
finite), ``str``, ``int | float`` (an int stays an int, a float a float: Flower's count-or-fraction
convention), and any of these ``| None`` (default ``None``: "not given", which the plugin resolves;
``default_text`` then says what it resolves to).

Errors are :class:`~pchmr.core.contracts.errors.OptionError` in one wording,
``<plugin> <kind> option '<key>' must be <rule>, got <value>``, e.g. ``fedprox strategy option
'proximal-mu' must be a number >= 0, got -1``. A rule between options lives in the class's
``__post_init__``: it raises ``ValueError`` whose message starts with the quoted key (``"'beta-1'
applies to server-opt adam and yogi, not adagrad"``) and the reader prefixes the plugin.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from pchmr.core.contracts.errors import OptionError

__all__ = [
    "DeclaresOptions",
    "NoOptions",
    "OptionInfo",
    "declared_options",
    "describe_options",
    "option",
    "option_error",
    "read_options",
]

T = TypeVar("T")

#: The field-metadata key :func:`option` stores its :class:`_Rule` under.
_METADATA_KEY = "pchmr.option"
#: Field types an option may have (``X | None`` of each too; ``int | float`` as well).
_SCALARS = (bool, int, float, str)
_TRUE_FALSE = ("true", "false")


@dataclass(frozen=True)
class _Rule:
    """What :func:`option` records in a field's metadata."""

    help: str
    choices: tuple[Any, ...] | None
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    key: str | None
    default_text: str | None


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple[Any, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    key: str | None = None,
    default_text: str | None = None,
) -> Any:
    """A dataclass field declaring one plugin option.

    ``default`` (omit it for a required option), ``help`` (one line, what it does and its unit),
    ``choices`` (the allowed values), ``low``/``high`` (a numeric range, closed unless
    ``low_open``/``high_open``), ``key`` (what users type, default the field name with ``-``) and
    ``default_text`` (how :func:`describe_options` shows a ``None`` default the plugin resolves,
    e.g. ``"min(1e-5, 1/N^1.1)"``).
    """
    rule = _Rule(help, None if choices is None else tuple(choices), low, high, low_open, high_open, key, default_text)
    metadata = {_METADATA_KEY: rule}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NoOptions:
    """The options of a plugin that takes none: any key is refused."""


@runtime_checkable
class DeclaresOptions(Protocol):
    """Optional capability of every plugin factory: an ``options`` attribute holding the frozen
    dataclass of its options (fields made with :func:`option`; :class:`NoOptions` for none).

    The engine reads a run's options through it before any data is prepared, and ``pchmr plugins
    --options NAME`` describes them. A factory without it receives its options unchecked."""

    options: type


@dataclass(frozen=True)
class OptionInfo:
    """One row of :func:`describe_options`: what ``pchmr plugins --options NAME`` prints.

    ``type`` is the annotation as users read it (``float``, ``int | float``, ``str | None``),
    ``default`` the declared default (``None`` when ``required``), ``default_text`` how it is
    shown, ``allowed`` the rule (``> 0``, ``[0, 1)``, ``adam, yogi``, ``true, false``; empty: any).
    """

    key: str
    type: str
    default: Any
    default_text: str
    required: bool
    allowed: str
    help: str


@dataclass(frozen=True)
class _Declared:
    """One field of an options class, resolved."""

    name: str
    key: str
    bases: tuple[type, ...]
    optional: bool
    rule: _Rule
    default: Any

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def numeric(self) -> bool:
        return int in self.bases or float in self.bases


def declared_options(factory: object) -> type | None:
    """The options class ``factory`` declares (its ``options`` attribute), or None when it declares none.

    Raises ``TypeError`` when the attribute is there but is not a dataclass type."""
    declared = getattr(factory, "options", None)
    if declared is None:
        return None
    if not (isinstance(declared, type) and dataclasses.is_dataclass(declared)):
        raise TypeError(
            f"{getattr(factory, '__name__', factory)!r}.options must be the dataclass of its options "
            f"(see pchmr.core.contracts.options), got {declared!r}"
        )
    return declared


def read_options(cls: type[T], values: Mapping[str, object] | None, *, plugin: str, kind: str) -> T:
    """``values`` (the user's ``key=value`` mapping) read into an instance of the options class ``cls``.

    ``plugin`` is the registered name and ``kind`` the plugin kind (``partitioner``), both for
    messages. Unknown keys, a key given twice (``keep_ratio`` and ``keep-ratio``), a missing
    required option, a value of the wrong type or outside its range or choices, and a rule of
    ``cls.__post_init__`` raise :class:`OptionError`.
    """
    who = f"{plugin} {kind.replace('_', ' ')}"
    if values is not None and not isinstance(values, Mapping):
        raise OptionError(f"{who} options must be a table of key = value, got {values!r}")
    fields = _fields(cls)
    by_key = {_normal(f.key): f for f in fields}
    given: dict[str, tuple[str, object]] = {}
    unknown: list[str] = []
    for raw_key, value in (values or {}).items():
        declared = by_key.get(_normal(str(raw_key)))
        if declared is None:
            unknown.append(str(raw_key))
        elif declared.name in given:
            raise OptionError(
                f"{who} option '{declared.key}' is given twice, as '{given[declared.name][0]}' and '{raw_key}'; "
                "give it once"
            )
        else:
            given[declared.name] = (str(raw_key), value)
    if unknown:
        raise OptionError(_unknown_message(who, plugin, unknown, fields))
    kwargs: dict[str, Any] = {}
    for declared in fields:
        if declared.name in given:
            kwargs[declared.name] = _read(who, declared, given[declared.name][1])
        elif declared.required:
            raise OptionError(
                f"{who} option '{declared.key}' is required: give {declared.key}=VALUE, {_rule_text(declared)} "
                f"({declared.rule.help})"
            )
    try:
        return cls(**kwargs)
    except OptionError:
        raise
    except ValueError as exc:  # a rule between options, from cls.__post_init__
        raise OptionError(f"{who} option {exc}") from exc


def option_error(plugin: str, kind: str, key: str, rule: str, value: object) -> OptionError:
    """The reader's error for a rule only the plugin can check (against the data, the run, the
    file system): ``<plugin> <kind> option '<key>' must be <rule>, got <value>``."""
    return OptionError(f"{plugin} {kind.replace('_', ' ')} option '{key}' must be {rule}, got {value!r}")


def describe_options(cls: type) -> tuple[OptionInfo, ...]:
    """The rows describing every option of the options class ``cls``, in declaration order.

    Raises ``TypeError`` for a declaration the reader cannot read (an unsupported type, a
    default outside its own rule): the contract tests call it on every built-in plugin."""
    rows = []
    for declared in _fields(cls):
        type_text = " | ".join(b.__name__ for b in declared.bases) + (" | None" if declared.optional else "")
        if declared.required:
            default, shown = None, "required"
        else:
            default = declared.default
            shown = declared.rule.default_text or (
                repr(default) if isinstance(default, float) else _value_text(default)
            )
        rows.append(
            OptionInfo(
                key=declared.key,
                type=type_text,
                default=default,
                default_text=shown,
                required=declared.required,
                allowed=_allowed_text(declared),
                help=declared.rule.help,
            )
        )
    return tuple(rows)


# ----------------------------------------------------------------------------- internals
def _normal(key: str) -> str:
    return key.strip().replace("_", "-")


@functools.cache
def _fields(cls: type) -> tuple[_Declared, ...]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"plugin options must be declared as a dataclass, got {cls!r}")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        rule = f.metadata.get(_METADATA_KEY) or _Rule("", None, None, None, False, False, None, None)
        bases, optional = _parse_type(cls, f.name, hints[f.name])
        default: Any = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        declared = _Declared(f.name, rule.key or f.name.replace("_", "-"), bases, optional, rule, default)
        if not declared.required and not (default is None and optional) and _check(declared, default) is None:
            raise TypeError(
                f"{cls.__name__}.{f.name}: the default {default!r} breaks its own rule ({_rule_text(declared)})"
            )
        out.append(declared)
    keys = [_normal(d.key) for d in out]
    if len(set(keys)) != len(keys):
        raise TypeError(f"{cls.__name__} declares two options with the same key (ignoring '-' and '_'): {keys}")
    return tuple(out)


def _parse_type(cls: type, name: str, hint: Any) -> tuple[tuple[type, ...], bool]:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    bases = tuple(a for a in args if a is not type(None))
    if not bases or any(b not in _SCALARS for b in bases) or (bool in bases and len(bases) > 1):
        raise TypeError(
            f"{cls.__name__}.{name}: options are bool, int, float, str, int | float or one of these | None; got {hint}"
        )
    return bases, len(bases) != len(args)


def _read(who: str, declared: _Declared, value: object) -> Any:
    if value is None and declared.optional:
        return None
    checked = _check(declared, value)
    if checked is None:
        raise OptionError(f"{who} option '{declared.key}' must be {_rule_text(declared)}, got {value!r}")
    return checked[0]


def _check(declared: _Declared, value: object) -> tuple[Any] | None:
    """``(value coerced,)`` when ``value`` passes the declared type, range and choices; else None."""
    coerced = _coerce(declared.bases, value)
    if coerced is None:
        return None
    rule = declared.rule
    if rule.choices is not None and coerced[0] not in rule.choices:
        return None
    if declared.numeric and not _in_range(coerced[0], rule):
        return None
    return coerced


def _coerce(bases: tuple[type, ...], value: object) -> tuple[Any] | None:
    if bases == (bool,):
        if isinstance(value, bool):
            return (value,)
        if isinstance(value, str) and value.strip().lower() in _TRUE_FALSE:
            return (value.strip().lower() == "true",)
        return None
    if isinstance(value, bool):
        return None
    if int in bases or float in bases:
        number = _number(value)
        if number is None:
            return None
        if int in bases and isinstance(number, numbers.Integral):
            return (int(number),)
        if float in bases:
            return (float(number),)
        if float(number).is_integer():  # an int option given 4.0 or "4.0"
            return (int(number),)
        return None
    if isinstance(value, str):
        return (value,)
    return None


def _number(value: object) -> numbers.Real | None:
    """A finite number from a number or a numeric string; None otherwise."""
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                value = parse(text)
                break
            except ValueError:
                continue
        else:
            return None
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        return None
    return value


def _in_range(value: float, rule: _Rule) -> bool:
    if rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low):
        return False
    return not (rule.high is not None and (value >= rule.high if rule.high_open else value > rule.high))


def _rule_text(declared: _Declared) -> str:
    """The rule in a sentence: ``a number > 0``, ``an integer in [2, 8]``, ``one of a, b``."""
    rule = declared.rule
    if rule.choices is not None:
        return "one of " + ", ".join(_value_text(c) for c in rule.choices)
    if declared.bases == (bool,):
        return "true or false"
    if not declared.numeric:
        return "a string"
    noun = "an integer" if declared.bases == (int,) else "a number"
    span = _range_text(rule)
    if not span:
        return noun
    return f"{noun} {span}" if span[0] in "<>" else f"{noun} in {span}"


def _allowed_text(declared: _Declared) -> str:
    rule = declared.rule
    if rule.choices is not None:
        return ", ".join(_value_text(c) for c in rule.choices)
    if declared.bases == (bool,):
        return "true, false"
    return _range_text(rule) if declared.numeric else ""


def _range_text(rule: _Rule) -> str:
    """``> 0``, ``<= 1``, ``[0, 1)`` or empty (no bound)."""
    if rule.low is not None and rule.high is not None:
        return f"{'(' if rule.low_open else '['}{_value_text(rule.low)}, {_value_text(rule.high)}{')' if rule.high_open else ']'}"
    if rule.low is not None:
        return f"{'>' if rule.low_open else '>='} {_value_text(rule.low)}"
    if rule.high is not None:
        return f"{'<' if rule.high_open else '<='} {_value_text(rule.high)}"
    return ""


def _value_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _unknown_message(who: str, plugin: str, unknown: list[str], fields: tuple[_Declared, ...]) -> str:
    quoted = ", ".join(f"'{key}'" for key in unknown)
    if not fields:
        return f"{who} takes no options, got {quoted}"
    message = f"{who} has no option{'s' if len(unknown) > 1 else ''} {quoted}"
    normal = {_normal(f.key): f.key for f in fields}
    close = [m for key in unknown for m in difflib.get_close_matches(_normal(key), list(normal), n=1)]
    if len(unknown) == 1 and close:
        message += f" (did you mean '{normal[close[0]]}'?)"
    known = ", ".join(f.key for f in fields)
    return f"{message}; its options are: {known}. `pchmr plugins --options {plugin}` describes them"
