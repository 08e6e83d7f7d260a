"""``pchmr configs list [COLLECTION]`` and ``pchmr configs show REF``: the config files pchmr ships.

Registered on the app in :mod:`pchmr.cli.app` with ``app.add_typer(configs_app, name="configs")``.
A packaged file is given to ``pchmr run --config``, ``pchmr partition --config`` and ``pchmr sweep``
by its reference, ``COLLECTION:NAME`` (:mod:`pchmr.core.engine.packaged_configs`); ``show`` prints
its text, to copy into a file of one's own and edit.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from pchmr.cli._output import console as _console
from pchmr.cli._output import fail as _fail

__all__ = ["configs_app"]

configs_app = typer.Typer(
    no_args_is_help=True,
    help="The config files pchmr ships (paper:NAME, settings:NAME, sweeps:NAME): list them, print one.",
)


@configs_app.command(name="list")
def list_configs(
    collection: Optional[str] = typer.Argument(None, help="Only this collection: paper, settings or sweeps."),
    match: Optional[str] = typer.Option(None, "--match", help="Only references containing this text (e.g. table02)."),
) -> None:
    """List the packaged configs by reference, with what each is."""
    from pchmr.core.engine.packaged_configs import COLLECTIONS, PackagedConfigError, packaged_configs

    try:
        found = packaged_configs(collection)
    except PackagedConfigError as exc:
        raise _fail(str(exc)) from None
    if match:
        found = [c for c in found if match.lower() in c.ref.lower()]
        if not found:
            raise _fail(f"no packaged config's reference contains {match!r}; `pchmr configs list` lists them all")
    table = Table(title=f"{len(found)} packaged configs: pchmr run --config REF (sweeps: pchmr sweep REF)")
    table.add_column("reference", no_wrap=True)
    table.add_column("what it is")
    for config in found:
        table.add_row(config.ref, config.summary)
    _console.print(table)
    if collection is None and not match:
        for name, what in COLLECTIONS.items():
            _console.print(f"[bold]{name}[/]: {what}", highlight=False)


@configs_app.command(name="show")
def show_config(
    ref: str = typer.Argument(
        ..., help="A packaged config's reference, e.g. paper:table01-fastmetro-s-fedavg-10-10-iid."
    ),
    path: bool = typer.Option(False, "--path", help="Print where the file is installed instead of its text."),
) -> None:
    """Print a packaged config (to save and edit: pchmr configs show REF > mine.toml)."""
    from pchmr.core.engine.packaged_configs import COLLECTIONS, PackagedConfigError, resolve_config_path

    if ref.partition(":")[0] not in COLLECTIONS or ":" not in ref:
        raise _fail(
            f"{ref!r} is not a packaged config's reference: give COLLECTION:NAME with COLLECTION one of "
            f"{', '.join(COLLECTIONS)} (`pchmr configs list` names them)"
        )
    try:
        file = resolve_config_path(ref)
    except PackagedConfigError as exc:
        raise _fail(str(exc)) from None
    if path:
        typer.echo(str(file))
    else:
        typer.echo(file.read_text(), nl=False)
