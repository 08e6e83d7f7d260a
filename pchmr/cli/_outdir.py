"""The ``--out`` directory of the commands that write results (``annotate``, ``partition``,
``personalize``, ``report``): never a silent overwrite, never a half-made directory.

:func:`output_dir` refuses (exit 2, before any work) an ``--out`` that is a file, a non-empty
directory without ``--overwrite``, or a place that cannot be written; creates it; and when the
command fails or refuses later, removes what this invocation created (the directory it made, or,
in a directory that was empty before, what was written into it) — never anything that was there
before. ``pchmr run`` has its own rule (a non-empty ``--out`` needs ``--resume``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pchmr.cli._output import fail

__all__ = ["OVERWRITE_HELP", "check_out_dir", "output_dir"]

OVERWRITE_HELP = "Write into a non-empty --out, replacing the files of the same names (other files there stay)."


def check_out_dir(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse (``fail``, exit 2) ``out`` when it is a file or a non-empty directory without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise fail(f"{flag} {out} is a file, not a directory; choose another {flag}")
    if out.is_dir() and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise fail(
                f"{flag} {out} is not empty (it holds {shown}); pass --overwrite to replace its files, "
                f"or choose another {flag}"
            )


@contextmanager
def output_dir(out: Path, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Check ``out`` (:func:`check_out_dir`), make it (exit 2 naming the path when it cannot be
    made or written) and yield it; on any exception out of the block, remove what this created."""
    check_out_dir(out, overwrite, flag)
    made: Path | None = None  # the top-most directory this call creates
    probe = out
    while not probe.exists() and probe != probe.parent:
        made, probe = probe, probe.parent
    was_empty = made is None and not any(out.iterdir())
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # can this process write there? (root passes os.access)
            pass
    except OSError as exc:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise fail(f"cannot write to {flag} {out}: {exc.strerror or exc}; choose another {flag}") from None
    try:
        yield out
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif was_empty:
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
