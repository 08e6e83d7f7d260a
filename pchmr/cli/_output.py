"""What every command prints through: the consoles, the exit codes and the one error style."""

from __future__ import annotations

import os
import sys
import threading

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["BAD_INPUT", "INTERRUPTED", "RUN_FAILED", "console", "err_console", "exit_interrupted", "fail"]

#: Exit code of input refused before anything ran (a bad option, file or plugin name).
BAD_INPUT = 2
#: Exit code of a run that started and failed (a client failed, training diverged).
RUN_FAILED = 1
#: Exit code after Ctrl-C.
INTERRUPTED = 130

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = BAD_INPUT) -> typer.Exit:
    """Print ``error: <message>`` on stderr (the message verbatim: brackets are not rich markup)
    and return the ``typer.Exit`` to raise: ``raise fail("...") from None``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def exit_interrupted() -> typer.Exit:
    """After Ctrl-C (the message printed): the ``typer.Exit`` to raise, or, when threads that are
    not daemons are still alive, an immediate exit. Flower's Simulation Engine runs client fits in
    such threads; a Ctrl-C that also stopped Ray leaves them waiting in ``ray.get`` for workers
    that are gone, and the interpreter would wait for them at exit forever. Every file a run
    resumes from is written atomically, so nothing is lost by not waiting."""
    lingering = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if lingering:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)
    return typer.Exit(INTERRUPTED)
