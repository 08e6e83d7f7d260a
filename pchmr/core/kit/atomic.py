"""Atomic file writes: a file is either its old bytes or its new bytes, never a mix or a stub.

Every writer puts the new bytes into a temporary file in the target's own directory (same file
system, so the rename is atomic), flushes and ``fsync``\\ s it, ``os.replace``\\ s it over the target
and ``fsync``\\ s the directory so the rename itself survives a power cut. When anything fails the
temporary file is removed and the target keeps its old bytes.

Failures a user can act on become a :class:`WriteError` (an :class:`OSError` with the same
``errno``) whose message says what happened in words: a full disk or quota (``ENOSPC``,
``EDQUOT``: how many bytes were needed and how many are free on which mount), a read-only file
system (``EROFS``), no permission (``EACCES``, ``EPERM``). ``hint`` is appended to the message
(e.g. how to resume).

:func:`append_line_atomic` adds one line to a line-per-record file (``rounds.jsonl``) by writing
the old content plus the new line through the same temp-and-rename path: a crash leaves either
the file without the line or with the whole line, never half of it.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "WriteError",
    "append_line_atomic",
    "describe_error",
    "savez_atomic",
    "torch_save_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: errno values meaning "no room": the disk or the user's quota is full
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: errno values meaning "not allowed to write there"
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


class WriteError(OSError):
    """A file could not be written; its old content (if any) is unchanged. ``str()`` is the
    whole message; ``errno`` and ``filename`` are the underlying error's."""

    def __init__(self, code: int | None, message: str, path: Path) -> None:
        super().__init__(code, message, str(path))
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


def _write(fd: int, data: memoryview) -> int:
    """One ``os.write`` (a seam for tests that simulate a full disk)."""
    return os.write(fd, data)


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def describe_error(exc: OSError, path: Path, needed: int | None = None, hint: str = "") -> WriteError:
    """The :class:`WriteError` for ``exc`` raised while writing ``path`` (``needed`` bytes)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if exc.errno in _NO_SPACE:
        what = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        free = _free_bytes(path.parent)
        room = []
        if needed is not None:
            room.append(f"needed {needed} bytes")
        if free is not None:
            room.append(f"{free} free on {_mount_point(path.parent)}")
        detail = f" ({', '.join(room)})" if room else ""
        message = f"{what} while writing {path}{detail}: nothing was replaced{tail}"
    elif exc.errno == errno.EROFS:
        message = f"cannot write {path}: {path.parent} is on a read-only file system{tail}"
    elif exc.errno in _NOT_WRITABLE:
        message = f"cannot write {path}: permission denied in {path.parent}{tail}"
    else:
        message = f"cannot write {path}: {exc.strerror or exc}{tail}"
    return WriteError(exc.errno, message, path)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms and file systems cannot open a directory: the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, hint: str = "") -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring); a :class:`WriteError`
    leaves the old file as it was and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    view = memoryview(data)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as exc:
        raise describe_error(exc, path, len(view), hint) from exc
    try:
        try:
            written = 0
            while written < len(view):
                written += _write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise describe_error(exc, path, len(view), hint) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str, hint: str = "") -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"), hint)


def append_line_atomic(path: str | os.PathLike[str], line: str, hint: str = "") -> None:
    """Add ``line`` (a newline is added) to the end of ``path`` (created when missing): the file
    is rewritten through :func:`write_bytes_atomic`, so it holds the whole line or none of it."""
    path = Path(path)
    if "\n" in line:
        raise ValueError("append_line_atomic writes one line: the record holds a newline")
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):  # a whole last record without its newline: keep it on its own line
        old += b"\n"
    write_bytes_atomic(path, old + line.encode("utf-8") + b"\n", hint)


def _serialized(save: Callable[[io.BytesIO], Any]) -> bytes:
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def torch_save_atomic(obj: Any, path: str | os.PathLike[str], hint: str = "") -> None:
    """``torch.save(obj)`` into ``path`` atomically (serialised in memory first, so the bytes
    needed are known)."""
    import torch

    write_bytes_atomic(path, _serialized(lambda buffer: torch.save(obj, buffer)), hint)


def savez_atomic(path: str | os.PathLike[str], hint: str = "", **arrays: Any) -> None:
    """``numpy.savez(path, **arrays)`` atomically (``path`` is used as given: no ``.npz`` is added)."""
    import numpy as np

    write_bytes_atomic(path, _serialized(lambda buffer: np.savez(buffer, **arrays)), hint)
