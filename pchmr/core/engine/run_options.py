"""How a ``RunConfig`` field is set from the command line, declared once beside the field.

Each field of :class:`~pchmr.core.engine.config.RunConfig` is declared with :func:`run_option`:
its default, its help text, its flag when that is not ``--`` + the field name in kebab case, and
how the command line reads it (one of the forms below, :data:`CliForm`). ``pchmr.cli.config_flags``
builds ``pchmr run``'s flags (and the subset ``pchmr partition`` takes) from this metadata, so a
new run option is one field::

    warmup_rounds: int = run_option(0, help="Rounds at a linearly rising learning rate.")

gives ``--warmup-rounds INTEGER`` on ``pchmr run`` and ``warmup_rounds`` in config files and
``config.json``. Nothing here imports typer: the engine declares, the CLI reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CliForm",
    "KeyValues",
    "NameAndPath",
    "NotOnCli",
    "PathValue",
    "Repeated",
    "RunOption",
    "Shortcut",
    "Switch",
    "Value",
    "declared_option",
    "run_option",
]

#: The key of a field's ``metadata`` that holds its :class:`RunOption`.
METADATA_KEY = "pchmr.run_option"


@dataclass(frozen=True)
class Value:
    """``--flag VALUE``, typed as the field (text, whole number or number)."""


@dataclass(frozen=True)
class PathValue:
    """``--flag PATH``: a file or folder, kept in the config as a string."""


@dataclass(frozen=True)
class Switch:
    """``--flag/--off``: True or False; neither leaves the field's default (``None``: decided later)."""

    off: str  # the flag that sets False, e.g. "--train-encoder"


@dataclass(frozen=True)
class Shortcut:
    """``--KEY VALUE``, the same as ``--flag KEY=VALUE`` of the mapping it belongs to (the value
    stays text); both with different values is refused."""

    key: str  # the mapping's key, also the flag's name: "server-opt" → --server-opt
    help: str


@dataclass(frozen=True)
class KeyValues:
    """``--flag key=value``, repeatable, into a mapping field. Values that read as an int, a float
    or true/false become one, anything else stays text. Given at all, the flags replace the config
    file's table."""

    shortcuts: tuple[Shortcut, ...] = ()


@dataclass(frozen=True)
class Repeated:
    """``--flag VALUE``, repeatable, into a tuple of text values (a list in a config file). Given at
    all, the flags replace the config file's list."""


@dataclass(frozen=True)
class NameAndPath:
    """``--flag NAME[:PATH]``: NAME into the field, PATH (None when absent) into ``path_field``,
    itself declared :class:`NotOnCli`."""

    path_field: str


@dataclass(frozen=True)
class NotOnCli:
    """No flag of its own; ``reason`` says how the value is set instead."""

    reason: str


#: How the command line reads a field.
CliForm = Value | PathValue | Switch | KeyValues | Repeated | NameAndPath | NotOnCli


@dataclass(frozen=True)
class RunOption:
    """A field's command-line metadata: what ``--help`` says, the flag, how it is read."""

    help: str
    cli: CliForm = Value()
    flag: str | None = None  # None: "--" + the field name with "_" → "-"

    def flag_of(self, field_name: str) -> str:
        """The field's flag: ``flag``, or ``--`` + ``field_name`` in kebab case."""
        return self.flag or "--" + field_name.replace("_", "-")


def run_option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    cli: CliForm = Value(),
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its command-line metadata: ``default`` (or ``factory`` for a mutable
    one, e.g. ``dict``), ``help`` (one or two sentences, no default: ``--help`` appends it),
    ``flag`` when not derived from the field name, ``cli`` how the command line reads it."""
    metadata = {METADATA_KEY: RunOption(help=help, cli=cli, flag=flag)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared_option(field: dataclasses.Field[Any]) -> RunOption:
    """The :class:`RunOption` a field was declared with; TypeError for a field declared without
    :func:`run_option` (every field of a run config says how it is set)."""
    option = field.metadata.get(METADATA_KEY)
    if not isinstance(option, RunOption):
        raise TypeError(
            f"field '{field.name}' has no command-line metadata: declare it with "
            "run_option(default, help=..., cli=...) (cli=NotOnCli(reason) when it has no flag)"
        )
    return option
