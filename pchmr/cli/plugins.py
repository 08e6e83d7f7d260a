"""``pchmr plugins``: every registered plugin by kind, or the options one plugin declares.

Registered on the app in :mod:`pchmr.cli.app`. ``pchmr plugins --options NAME`` prints the
plugin's options class (:func:`pchmr.core.contracts.options.describe_options`): key, type,
default, allowed values or range, help; ``--kind KIND`` picks the plugin when NAME exists in
several kinds (``secagg`` is a strategy and a privacy mechanism).
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from pchmr.cli._output import console as _console
from pchmr.cli._output import fail as _fail
from pchmr.core.contracts.hookspecs import KINDS

__all__ = ["plugins"]

#: plugin kind → how a user gives that kind's options.
OPTION_FLAGS = {
    "backbone": "pchmr run --backbone-option key=value",
    "body_model": "BodyModelSpec.extra (no command-line flag)",
    "dataset": "pchmr run / pchmr partition --dataset-option key=value",
    "partitioner": "pchmr run / pchmr partition --partition-option key=value",
    "strategy": "pchmr run --strategy-option key=value",
    "privacy": "pchmr run --privacy-option key=value",
    "annotator": "pchmr annotate --option key=value",
    "keypoint_source": "pchmr annotate --keypoint-option key=value",
    "depth_source": "pchmr annotate --depth-option key=value",
    "attack": "pchmr audit --attack-option key=value",
}


def plugins(
    options: Optional[str] = typer.Option(
        None, "--options", metavar="NAME", help="Describe the options plugin NAME declares (key, type, default, help)."
    ),
    kind: Optional[str] = typer.Option(
        None, "--kind", help=f"Only this plugin kind ({', '.join(KINDS)}); with --options, when NAME is in several."
    ),
) -> None:
    """List every registered plugin by kind, with the distribution that provides it, or one plugin's options."""
    from pchmr.core.engine.registry import PluginError, get_registry

    try:
        registry = get_registry()
        kinds = list(KINDS) if kind is None else [_kind(kind)]
        if options is None:
            _print_listing(registry, kinds)
        else:
            _print_options(_find(registry, options, kinds))
    except (PluginError, TypeError) as exc:
        raise _fail(str(exc)) from None


def _kind(text: str) -> str:
    normal = text.strip().replace("-", "_").replace(" ", "_")
    if normal not in KINDS:
        raise _fail(f"--kind must be one of {', '.join(KINDS)}, got '{text}'")
    return normal


def _print_listing(registry: object, kinds: list[str]) -> None:
    table = Table(title="pchmr plugins")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("provided by")
    table.add_column("entry point")
    for kind in kinds:
        infos = registry.infos(kind)  # type: ignore[attr-defined]
        if not infos:
            table.add_row(kind.replace("_", " "), "[dim](none)[/]", "", "")
        for info in infos:
            table.add_row(kind.replace("_", " "), info.name, info.provider, info.entry_point)
    _console.print(table)


def _find(registry: object, name: str, kinds: list[str]) -> object:
    """The one plugin named ``name`` among ``kinds``; a clear exit when none or several are."""
    if len(kinds) == 1:
        return registry.info(kinds[0], name)  # type: ignore[attr-defined]  # UnknownPluginError lists the names
    found = [info for kind in kinds for info in registry.infos(kind) if info.name == name]  # type: ignore[attr-defined]
    if len(found) > 1:
        where = ", ".join(info.kind for info in found)
        raise _fail(f"'{name}' names plugins of several kinds ({where}); add --kind, e.g. --kind {found[0].kind}")
    if not found:
        import difflib

        every = {info.name: info.kind for kind in kinds for info in registry.infos(kind)}  # type: ignore[attr-defined]
        close = difflib.get_close_matches(name, list(every), n=1)
        hint = f"; did you mean '{close[0]}' ({every[close[0]].replace('_', ' ')})?" if close else ";"
        raise _fail(f"no plugin named '{name}' of any kind{hint} `pchmr plugins` lists them all")
    return found[0]


def _print_options(info: object) -> None:
    from pchmr.core.contracts.options import declared_options, describe_options

    kind, name, provider = info.kind, info.name, info.provider  # type: ignore[attr-defined]
    label = f"{kind.replace('_', ' ')} '{name}' ({provider})"
    declared = declared_options(info.factory)  # type: ignore[attr-defined]
    if declared is None:
        _console.print(
            f"{label} declares no options class: it reads whatever it is given itself (see its documentation)",
            highlight=False,
        )
        return
    rows = describe_options(declared)
    if not rows:
        _console.print(f"{label} takes no options", highlight=False)
        return
    table = Table(title=f"options of the {label}", caption=f"give them as: {OPTION_FLAGS.get(kind, 'key=value')}")
    for column in ("key", "type", "default", "allowed", "help"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.key, row.type, row.default_text, row.allowed or "any", row.help)
    _console.print(table)
