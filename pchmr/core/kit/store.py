"""The prepared on-disk store: crops decoded once, read as memory maps afterwards.

A store is one directory holding N samples:

* ``arrays/<name>.npy`` — small per-sample arrays written first, whole (keypoints, joints,
  flags, labels …);
* ``<name>.npy`` — the large per-sample arrays (``images`` (N, S, S, 3) uint8, optionally
  ``vertices`` (N, V, 3) float32), pre-allocated as ``.npy`` memory maps and filled chunk by
  chunk by a caller-supplied ``produce(start, stop)`` (which decodes and crops the source
  images — each exactly once);
* ``state.json`` — the progress of an unfinished preparation: the checksum of every small array
  and of every finished chunk, rewritten atomically after each chunk is flushed;
* ``manifest.json`` — written last, only when every chunk is done: the store is complete.

Interrupting a preparation (kill, crash, Ctrl-C) loses at most the chunk in flight: calling
:func:`prepare_store` again verifies the finished chunks against their checksums and produces
the rest. A lock file serialises two processes preparing the same store.

The directory name is derived by the caller from the *identity* of the data
(:func:`store_key`: the sources' SHA-256 checksums, crop size, body model …), so a changed
source file never reuses an old store. Opening a store (:class:`PreparedStore`) re-checks the
small arrays' checksums; :meth:`PreparedStore.verify` also re-checks every chunk. A mismatch
raises :class:`ChecksumMismatchError` naming the file, the expected and the actual checksum.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "STORE_VERSION",
    "ChecksumMismatchError",
    "ChunkSpec",
    "IncompleteStoreError",
    "PreparedStore",
    "StoreError",
    "file_sha256",
    "prepare_store",
    "store_key",
]

STORE_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
ARRAYS_DIR = "arrays"
DEFAULT_CHUNK = 64
_HASH_BLOCK = 1 << 20
_CHECKSUM_CACHE = "checksums.json"


class StoreError(RuntimeError):
    """A store cannot be used; the message names the directory or file and the way out."""


class IncompleteStoreError(StoreError):
    """The store's preparation has not finished (``manifest.json`` is missing)."""


class ChecksumMismatchError(StoreError):
    """A file's SHA-256 differs from the one recorded when it was written."""


@dataclass(frozen=True)
class ChunkSpec:
    """A large per-sample array filled chunk by chunk: per-sample ``shape`` and ``dtype``."""

    shape: tuple[int, ...]
    dtype: str


# ------------------------------------------------------------------------------ checksums


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _array_sha256(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B") if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of a file's bytes. With ``cache_dir``, the digest is remembered per absolute path,
    size and modification time in ``cache_dir/checksums.json`` so a large source is read once."""
    p = Path(path).resolve()
    try:
        stat = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: file not found") from None
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = Path(cache_dir) / _CHECKSUM_CACHE if cache_dir is not None else None
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            cache = json.loads(cache_file.read_text())
    entry = cache.get(str(p))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    h = hashlib.sha256()
    with p.open("rb") as stream:
        for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache_file is not None:
        cache[str(p)] = {"stamp": stamp, "sha256": digest}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(cache_file, cache)
    return digest


def store_key(identity: Mapping[str, Any]) -> str:
    """16 hex digits identifying a store: SHA-256 of the JSON of ``identity`` (sorted keys)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ reading


class PreparedStore:
    """A complete store opened for reading (small arrays loaded, large ones memory-mapped).

    Raises :class:`IncompleteStoreError` when the preparation has not finished and
    :class:`ChecksumMismatchError` when a small array differs from its recorded checksum.
    """

    def __init__(self, directory: str | os.PathLike[str], *, verify_arrays: bool = True) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            hint = (
                "its preparation was interrupted; run the same command (or `pchmr data prepare`) again to resume it"
                if (self.directory / STATE).is_file()
                else "no store was prepared there"
            )
            raise IncompleteStoreError(f"{self.directory}: not a complete prepared store ({MANIFEST} missing): {hint}")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise StoreError(
                f"{manifest_path}: not valid JSON ({exc}); delete {self.directory} and prepare again"
            ) from exc
        if self.manifest.get("version") != STORE_VERSION:
            raise StoreError(
                f"{manifest_path}: store version {self.manifest.get('version')!r}, expected {STORE_VERSION}; "
                f"delete {self.directory} and prepare again"
            )
        self.num_samples = int(self.manifest["num_samples"])
        self.info: dict[str, Any] = dict(self.manifest.get("info", {}))
        self.arrays: dict[str, np.ndarray] = {}
        for name, digest in self.manifest["arrays"].items():
            path = self.directory / ARRAYS_DIR / f"{name}.npy"
            array = _load_array(path)
            if verify_arrays and _array_sha256(array) != digest:
                raise ChecksumMismatchError(
                    f"{path}: SHA-256 {_array_sha256(array)[:16]}… but the store's manifest expects {digest[:16]}…; "
                    f"the store is corrupt: delete {self.directory} and prepare it again"
                )
            self.arrays[name] = array
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    @property
    def chunked_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["chunked"])

    def chunked(self, name: str) -> np.ndarray:
        """The read-only memory map of large array ``name`` (N, ...)."""
        if name not in self.manifest["chunked"]:
            raise KeyError(f"store {self.directory} has no array {name!r}; it has {list(self.manifest['chunked'])}")
        if name not in self._maps:
            self._maps[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._maps[name]

    def verify(self) -> None:
        """Re-check every chunk of every large array against its recorded checksum."""
        chunks = self.manifest["chunks"]
        size = int(self.manifest["chunk_size"])
        for name in self.manifest["chunked"]:
            data = self.chunked(name)
            for index, digests in chunks.items():
                start = int(index) * size
                actual = _array_sha256(np.asarray(data[start : start + size]))
                if actual != digests[name]:
                    raise ChecksumMismatchError(
                        f"{self.directory / (name + '.npy')}: samples {start}..{min(start + size, self.num_samples) - 1} "
                        f"have SHA-256 {actual[:16]}…, the manifest expects {digests[name][:16]}…; "
                        f"delete {self.directory} and prepare it again"
                    )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing from the store; delete {path.parent.parent} and prepare again") from None
    except ValueError as exc:
        raise ChecksumMismatchError(
            f"{path}: unreadable ({exc}); delete {path.parent.parent} and prepare again"
        ) from exc


# ------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    lock_path = directory.with_name(f".{directory.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_store(
    directory: str | os.PathLike[str],
    *,
    num_samples: int,
    arrays: Mapping[str, np.ndarray],
    chunked: Mapping[str, ChunkSpec],
    produce: Callable[[int, int], Mapping[str, np.ndarray]],
    info: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreparedStore:
    """Build (or resume, or just open) the store in ``directory`` and return it opened.

    Args:
        num_samples: N.
        arrays: small (N, ...) arrays (numeric or fixed-width strings) written first.
        chunked: the large arrays, per-sample shape and dtype (``images``: (S, S, 3) uint8).
        produce: ``produce(start, stop)`` returns ``{name: (stop - start, *shape) array}`` for
            every chunked array; it is called once per unfinished chunk, in order.
        info: JSON-able facts stored in the manifest (protocol, sources, crop size …).
        on_progress: called with (samples done, N) after every chunk (and once at the start).
    """
    if num_samples < 1:
        raise ValueError(f"a store needs at least one sample, got num_samples={num_samples}")
    for name, value in arrays.items():
        if len(value) != num_samples:
            raise ValueError(f"array {name!r} has {len(value)} entries for {num_samples} samples")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        if (directory / MANIFEST).is_file():
            return PreparedStore(directory)
        digests = {name: _array_sha256(np.asarray(value)) for name, value in arrays.items()}
        state = _resume_state(directory, num_samples, chunk_size, digests, chunked)
        if state is None:
            state = _start(directory, num_samples, chunk_size, arrays, digests, chunked)
        _fill(directory, state, chunked, produce, on_progress)
        manifest = {
            "version": STORE_VERSION, "num_samples": num_samples, "chunk_size": chunk_size, "arrays": digests,
            "chunked": {name: {"shape": list(spec.shape), "dtype": spec.dtype} for name, spec in chunked.items()},
            "chunks": state["chunks"], "info": dict(info or {}),
        }  # fmt: skip
        _write_json_atomic(directory / MANIFEST, manifest)
        (directory / STATE).unlink(missing_ok=True)
    return PreparedStore(directory)


def _start(
    directory: Path, n: int, chunk_size: int, arrays: Mapping[str, np.ndarray], digests: Mapping[str, str],
    chunked: Mapping[str, ChunkSpec],
) -> dict[str, Any]:  # fmt: skip
    if directory.exists():
        shutil.rmtree(directory)
    (directory / ARRAYS_DIR).mkdir(parents=True)
    for name, value in arrays.items():
        np.save(directory / ARRAYS_DIR / f"{name}.npy", np.asarray(value), allow_pickle=False)
    for name, spec in chunked.items():
        mm = np.lib.format.open_memmap(directory / f"{name}.npy", "w+", np.dtype(spec.dtype), (n, *spec.shape))
        del mm
    state = {"version": STORE_VERSION, "num_samples": n, "chunk_size": chunk_size, "arrays": dict(digests),
             "chunked": sorted(chunked), "chunks": {}}  # fmt: skip
    _write_json_atomic(directory / STATE, state)
    return state


def _resume_state(
    directory: Path, n: int, chunk_size: int, digests: Mapping[str, str], chunked: Mapping[str, ChunkSpec]
) -> dict[str, Any] | None:
    """The state of an interrupted preparation of the same data, its finished chunks re-verified;
    ``None`` (start afresh) when there is none or it does not describe the same data."""
    path = directory / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        return None
    same = (
        state.get("version") == STORE_VERSION and state.get("num_samples") == n and state.get("chunk_size") == chunk_size
        and state.get("arrays") == dict(digests) and state.get("chunked") == sorted(chunked)
    )  # fmt: skip
    if not same:
        return None
    maps = {}
    for name, spec in chunked.items():
        try:
            maps[name] = np.load(directory / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        if maps[name].shape != (n, *spec.shape) or maps[name].dtype != np.dtype(spec.dtype):
            return None
    for name in digests:
        try:
            if _array_sha256(np.load(directory / ARRAYS_DIR / f"{name}.npy")) != digests[name]:
                return None
        except (OSError, ValueError):
            return None
    kept = {}
    for index, chunk_digests in state["chunks"].items():
        start = int(index) * chunk_size
        if all(_array_sha256(np.asarray(maps[k][start : start + chunk_size])) == chunk_digests.get(k) for k in maps):
            kept[index] = chunk_digests
    state["chunks"] = kept
    state["resumed_chunks"] = len(kept)
    return state


def _fill(
    directory: Path, state: dict[str, Any], chunked: Mapping[str, ChunkSpec],
    produce: Callable[[int, int], Mapping[str, np.ndarray]], on_progress: Callable[[int, int], None] | None,
) -> None:  # fmt: skip
    n, size = int(state["num_samples"]), int(state["chunk_size"])
    maps = {name: np.load(directory / f"{name}.npy", mmap_mode="r+") for name in chunked}
    done = sum(min(size, n - int(i) * size) for i in state["chunks"])
    if on_progress is not None:
        on_progress(done, n)
    for index in range((n + size - 1) // size):
        if str(index) in state["chunks"]:
            continue
        start, stop = index * size, min((index + 1) * size, n)
        produced = produce(start, stop)
        chunk_digests = {}
        for name, spec in chunked.items():
            value = np.asarray(produced[name])
            if value.shape != (stop - start, *spec.shape):
                raise ValueError(
                    f"produce({start}, {stop}) returned {name!r} of shape {value.shape}, "
                    f"expected {(stop - start, *spec.shape)}"
                )
            maps[name][start:stop] = value
            maps[name].flush()
            chunk_digests[name] = _array_sha256(np.asarray(maps[name][start:stop]))
        state["chunks"][str(index)] = chunk_digests
        _write_json_atomic(directory / STATE, state)
        done += stop - start
        if on_progress is not None:
            on_progress(done, n)
