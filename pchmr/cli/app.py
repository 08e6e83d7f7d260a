"""The ``pchmr`` command line (typer + rich)."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.table import Table

from pchmr.cli.run import run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pchmr: federated, privacy-constrained 3D human mesh recovery.",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

app.command(name="run")(run)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def plugins() -> None:
    """List every registered plugin by kind, with the distribution that provides it."""
    from pchmr.core.contracts.hookspecs import KINDS
    from pchmr.core.engine.registry import PluginError, get_registry

    try:
        registry = get_registry()
    except PluginError as exc:
        raise _fail(str(exc)) from None
    table = Table(title="pchmr plugins")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("provided by")
    table.add_column("entry point")
    for kind in KINDS:
        infos = registry.infos(kind)
        if not infos:
            table.add_row(kind.replace("_", " "), "[dim](none)[/]", "", "")
        for info in infos:
            table.add_row(kind.replace("_", " "), info.name, info.provider, info.entry_point)
    console.print(table)


from pchmr.cli.report import report as _report  # noqa: E402  (registered below, after the app exists)

app.command(name="report")(_report)
app.command(name="partition")(__import__("pchmr.cli.partition", fromlist=["partition"]).partition)
app.add_typer(__import__("pchmr.cli.data", fromlist=["data_app"]).data_app, name="data")
app.add_typer(__import__("pchmr.cli.privacy", fromlist=["privacy_app"]).privacy_app, name="privacy")
app.command(name="annotate")(__import__("pchmr.cli.annotate", fromlist=["annotate"]).annotate)
app.command(name="personalize")(__import__("pchmr.cli.annotate", fromlist=["personalize"]).personalize)


def main() -> None:
    from pchmr.core.engine.perf import tune_allocator

    tune_allocator()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; resume with `pchmr run --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
