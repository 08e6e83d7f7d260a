"""Reading files pchmr did not write without running code from them.

A pickle names the functions and classes it needs, and unpickling imports and calls them: a
3DPW sequence, a SMPL model or a checkpoint received from someone else could name ``os.system``.
Every reader of such a file goes through this module:

* :func:`safe_load` unpickles with an allowlist of ``module.name`` globals (a :class:`PickleAllowlist`):
  :data:`NUMPY_PICKLE` (arrays, dtypes and scalars of NumPy, and plain containers: dict, list, tuple,
  set, frozenset, OrderedDict, slice, complex, bytearray) by default, :data:`SPARSE_PICKLE` adding
  SciPy's csc/csr/coo matrices. Python 2 names (``__builtin__``, ``copy_reg``), NumPy's moved
  module (``numpy.core`` ↔ ``numpy._core``) and SciPy's private sparse modules
  (``scipy.sparse.csc``, ``scipy.sparse._csr``) resolve to today's objects. Any other global is
  refused with an :class:`UnsafeFileError` naming the file and the global, before it is imported.
  ``stand_ins`` maps a module (e.g. ``chumpy``) to a harmless class that receives the pickled
  state of every class of that module instead.
* :func:`safe_load_npz` reads members of an ``.npz``: plain arrays with ``allow_pickle=False``,
  object arrays through :func:`safe_load`.
* :func:`load_torch_file` is ``torch.load(weights_only=True)`` (tensors, numbers, strings,
  containers of them), its refusal turned into an :class:`UnsafeFileError` that says what to do,
  and a file it cannot read at all (empty, truncated, not from ``torch.save``) into an
  :class:`UnreadableFileError`;
  :func:`checkpoint_values` turns what a checkpoint is given into types that load that way
  (NumPy arrays → tensors, NumPy scalars → Python numbers) and refuses anything else by its key.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import copyreg
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

try:  # NumPy 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

__all__ = [
    "NUMPY_PICKLE",
    "SPARSE_PICKLE",
    "PickleAllowlist",
    "UnreadableFileError",
    "UnsafeFileError",
    "checkpoint_values",
    "load_torch_file",
    "not_an_npz",
    "safe_load",
    "safe_load_npz",
]


class UnsafeFileError(ValueError):
    """A file asks to run code (a function or class outside its reader's allowlist) when loaded;
    the message names the file, what it is, and the refused ``module.name``."""


class UnreadableFileError(ValueError):
    """A file is not one its reader can read at all: empty, truncated or corrupt, or of another
    format; the message names the file, what it should be, what was found and what to do."""


@dataclass(frozen=True)
class PickleAllowlist:
    """The globals a reader lets a pickle use: canonical ``module.name`` → the object, and what
    they are in words (for the refusal message)."""

    globals: Mapping[str, Any]
    describes: str
    stand_ins: Mapping[str, type] = field(default_factory=dict)

    def plus(self, extra: Mapping[str, Any], describes: str) -> PickleAllowlist:
        return PickleAllowlist({**self.globals, **extra}, describes, dict(self.stand_ins))


_CONTAINERS: dict[str, Any] = {
    f"builtins.{cls.__name__}": cls for cls in (dict, list, tuple, set, frozenset, slice, complex, bytearray)
}
_CONTAINERS["collections.OrderedDict"] = collections.OrderedDict
# Python 3 pickles bytes as _codecs.encode(str, "latin1") at protocol 2 (NumPy's array data included)
_CONTAINERS["_codecs.encode"] = _codecs.encode

#: NumPy arrays (any dtype, object arrays' items unpickled by the same rules), dtypes, scalars and
#: plain Python containers: what 3DPW's sequence files and SMPLify's pose prior hold.
NUMPY_PICKLE = PickleAllowlist(
    {
        **_CONTAINERS,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        "numpy.core.multiarray._reconstruct": _multiarray._reconstruct,
        "numpy.core.multiarray.scalar": _multiarray.scalar,
        "numpy.core.numeric._frombuffer": _numeric._frombuffer,  # arrays pickled with protocol 5
    },
    "numpy arrays and plain Python containers",
)

#: :data:`NUMPY_PICKLE` plus SciPy's sparse matrices (SMPL's ``J_regressor``, GraphCMR's pyramid).
#: ``copyreg._reconstructor`` (with ``object``) rebuilds them from protocol 0/1 pickles; it can
#: only instantiate classes this list allows.
SPARSE_PICKLE = NUMPY_PICKLE.plus(
    {
        "scipy.sparse.csc_matrix": sp.csc_matrix,
        "scipy.sparse.csr_matrix": sp.csr_matrix,
        "scipy.sparse.coo_matrix": sp.coo_matrix,
        "copyreg._reconstructor": copyreg._reconstructor,  # type: ignore[attr-defined]
        "builtins.object": object,
    },
    "numpy arrays, SciPy sparse matrices and plain Python containers",
)


def canonical_name(module: str, name: str) -> str:
    """``module.name`` as the allowlists spell it: Python 2's names mapped to Python 3's,
    ``numpy._core`` to ``numpy.core``, SciPy's sparse submodules to ``scipy.sparse``."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if module == "numpy._core" or module.startswith("numpy._core."):
        module = "numpy.core" + module[len("numpy._core") :]
    if module.startswith("scipy.sparse."):
        module = "scipy.sparse"
    return f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream: IO[bytes], allowed: PickleAllowlist, refuse: Any, encoding: str) -> None:
        super().__init__(stream, encoding=encoding)
        self._allowed = allowed
        self._refuse = refuse

    def find_class(self, module: str, name: str) -> Any:
        for prefix, stand_in in self._allowed.stand_ins.items():
            if module == prefix or module.startswith(prefix + "."):
                return stand_in
        key = canonical_name(module, name)
        if key in self._allowed.globals:
            return self._allowed.globals[key]
        raise self._refuse(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise self._refuse(f"a persistent id ({type(pid).__name__})")


def safe_load(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    what: str,
    allowed: PickleAllowlist = NUMPY_PICKLE,
    encoding: str = "latin1",
    name: str | None = None,
) -> Any:
    """Unpickle ``source`` (a path or a binary stream) using only ``allowed``'s globals.

    ``what`` names the kind of file in messages ("3DPW sequence file"); ``name`` the file (default:
    the path, or the stream's ``name``). ``encoding="latin1"`` reads Python 2 pickles (3DPW's and
    SMPL's) and NumPy arrays in them. Raises :class:`UnsafeFileError` for a global outside the
    allowlist, before importing or calling it; other unpickling failures (truncated, corrupt)
    propagate as pickle raises them.
    """
    label = name or (
        str(source) if isinstance(source, (str, os.PathLike)) else str(getattr(source, "name", "<stream>"))
    )

    def refuse(global_name: str) -> UnsafeFileError:
        return UnsafeFileError(
            f"refusing to load {label} ({what}): it asks to import {global_name}, which a {what} never contains; "
            f"pchmr only unpickles {allowed.describes} from files it did not write"
        )

    if isinstance(source, (str, os.PathLike)):
        with Path(source).open("rb") as stream:
            return _RestrictedUnpickler(stream, allowed, refuse, encoding).load()
    return _RestrictedUnpickler(source, allowed, refuse, encoding).load()


def safe_load_npz(
    path: str | os.PathLike[str], names: Iterable[str], *, what: str, allowed: PickleAllowlist = NUMPY_PICKLE
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the ``.npz`` at ``path`` (those it has; the caller checks for missing
    ones): plain arrays read with ``allow_pickle=False``, object arrays unpickled by
    :func:`safe_load` with ``allowed`` (Python 2 pickles decoded as latin-1, as ``np.load(...,
    encoding="latin1")`` does). Other members are never read. A file that is not a zip archive
    raises ``ValueError``; an object array asking for a refused global, :class:`UnsafeFileError`."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not an .npz archive: {exc}") from exc
    out: dict[str, np.ndarray] = {}
    with archive:
        members = {member.removesuffix(".npy"): member for member in archive.namelist()}
        for name in names:
            if name not in members:
                continue
            with archive.open(members[name]) as stream:
                version = np.lib.format.read_magic(stream)
                _, _, dtype = _read_header(stream, version)
                if not dtype.hasobject:
                    stream.close()
                    with archive.open(members[name]) as fresh:
                        out[name] = np.lib.format.read_array(fresh, allow_pickle=False)
                    continue
                value = safe_load(stream, what=what, allowed=allowed, name=f"{path} (array {name!r})")
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{path}: array {name!r} unpickles to a {type(value).__name__}, not an array")
            out[name] = value
    return out


def not_an_npz(path: str | os.PathLike[str]) -> str | None:
    """None when ``path`` is a zip archive (what ``numpy.savez`` writes), else why it cannot be an
    ``.npz`` (e.g. ``the file is empty; a .npz is a zip archive of .npy arrays ...``), for its
    reader's refusal: ``np.load`` would otherwise take the file for a pickle and suggest loading it
    with ``allow_pickle=True``."""  # safe: a docstring naming what np.load would suggest; nothing here loads so
    path = Path(path)
    if zipfile.is_zipfile(path):
        return None
    found = (
        "the file is empty"
        if path.stat().st_size == 0
        else "it is not a zip archive (truncated or corrupt, or of another format)"
    )
    return f"{found}; a .npz is a zip archive of .npy arrays, as numpy.savez writes"


def _read_header(stream: IO[bytes], version: tuple[int, int]) -> tuple[Any, bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    return np.lib.format._read_array_header(stream, version)  # type: ignore[attr-defined]  # 3.0: no public reader


# --------------------------------------------------------------------------- torch files

#: how torch names the global it refused ("Unsupported global: GLOBAL numpy.dtype was not ...",
#: "Trying to load unsupported GLOBAL posix.system whose module posix is blocked")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


#: the first bytes of what torch.save writes: a zip archive (since torch 1.6) or a pickle (before)
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def load_torch_file(path: str | os.PathLike[str], *, what: str, advice: str, damaged: str | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers, strings,
    None and lists, tuples, sets and dicts of them; nothing in the file is called. A file that
    asks for more raises :class:`UnsafeFileError` naming it, the refused global (when torch names
    one) and ``advice`` (what to do instead); there is no fallback to an unrestricted load. A
    file torch cannot read at all (empty, truncated, corrupt, not written by ``torch.save``)
    raises :class:`UnreadableFileError` naming it, what it is and ``damaged`` (default ``advice``)."""
    import torch  # not at module level: the pickle readers need no torch

    with Path(path).open("rb") as stream:
        head = stream.read(8)
    if not head:
        raise UnreadableFileError(f"cannot read {path} ({what}): the file is empty. {damaged or advice}")
    if not head.startswith(_TORCH_FILE_STARTS):
        raise UnreadableFileError(
            f"cannot read {path} ({what}): it is not a file torch.save writes (it starts with {head!r}, neither "
            f"a zip archive nor a pickle). {damaged or advice}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = _REFUSED_GLOBAL.search(message)
        if found:
            asks = f"it asks to import {found.group(1)}, which a {what} never contains"
        else:
            asks = f"it holds more than tensors, numbers, strings and containers of them ({_unpickler_reason(message)})"
        raise UnsafeFileError(
            f"refusing to load {path} ({what}): {asks}; pchmr loads it with torch.load(weights_only=True), which "
            f"runs nothing from the file. {advice}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).split(". ")[0].strip() or type(exc).__name__
        if "magic number" in reason:  # a pickle, but not one torch.save wrote (no torch header)
            found = f"it is not a file torch.save writes ({reason})"
        else:
            found = f"it is truncated or corrupt ({reason})"
        raise UnreadableFileError(f"cannot read {path} ({what}): {found}. {damaged or advice}") from None


def _unpickler_reason(message: str) -> str:
    """What torch's weights-only unpickler objected to (the text after ``WeightsUnpickler error:``)."""
    _, _, rest = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest or message).splitlines() if line.strip()]
    return lines[0] if lines else "an object it does not allow"


def checkpoint_values(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with NumPy arrays as tensors and NumPy scalars as Python numbers, so that
    ``torch.load(weights_only=True)`` reads it back; tensors, bool/int/float/complex/str/bytes,
    None, torch dtypes and sizes, and lists, tuples, sets and dicts (string or number keys) of
    them pass unchanged. Anything else raises ``TypeError`` naming ``where`` and the key path."""
    import torch

    if isinstance(value, np.generic):  # before the builtins: np.float64 is a float, np.str_ a str
        return value.item()
    if value is None or type(value) in (bool, int, float, complex, str, bytes):  # not subclasses (an IntEnum)
        return value
    if isinstance(value, (torch.Tensor, torch.dtype, torch.Size)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where} is a numpy object array; a checkpoint holds tensors, numbers and strings")
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, Mapping):
        items = {}
        for key, item in value.items():
            if isinstance(key, np.generic):
                key = key.item()
            if key is not None and type(key) not in (str, int, float, bool):
                raise TypeError(
                    f"{where} has a key of type {type(key).__name__}; a checkpoint's keys are strings or numbers"
                )
            items[key] = checkpoint_values(item, f"{where}[{key!r}]")
        return collections.OrderedDict(items) if isinstance(value, collections.OrderedDict) else items
    if isinstance(value, list):
        return [checkpoint_values(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):  # a named tuple too: its class would not load, its values do
        return tuple(checkpoint_values(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, (set, frozenset)):
        return {checkpoint_values(item, f"{where}{{{item!r}}}") for item in value}
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint holds tensors, numbers, "
        "strings, None and lists, tuples, sets and dicts of them (numpy arrays become tensors), so that a run "
        "directory received from someone else resumes without running code from it"
    )
