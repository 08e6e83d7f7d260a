"""What every command prints through: the consoles, the exit codes and the one error style."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["BAD_INPUT", "RUN_FAILED", "console", "err_console", "fail"]

#: Exit code of input refused before anything ran (a bad option, file or plugin name).
BAD_INPUT = 2
#: Exit code of a run that started and failed (a client failed, training diverged).
RUN_FAILED = 1

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = BAD_INPUT) -> typer.Exit:
    """Print ``error: <message>`` on stderr (the message verbatim: brackets are not rich markup)
    and return the ``typer.Exit`` to raise: ``raise fail("...") from None``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
