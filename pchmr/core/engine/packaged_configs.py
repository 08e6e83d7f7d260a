"""The config files pchmr ships (``pchmr/configs/COLLECTION/NAME.toml``), addressed as ``COLLECTION:NAME``.

Wherever pchmr reads a config file (``pchmr run --config``, ``pchmr partition --config``, the Flower
app's ``config`` key, ``pchmr sweep`` and a sweep's ``base`` or row ``config``), a reference such as
``paper:table01-fastmetro-s-fedavg-10-10-iid`` names the packaged file, so an installed wheel runs
the paper's experiments without a checkout. Anything else is a path. The files are package data,
read where the package is installed (:func:`importlib.resources.files`).
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["COLLECTIONS", "PackagedConfig", "PackagedConfigError", "packaged_configs", "resolve_config_path"]

#: The collections, each a folder of ``pchmr/configs``, with what it holds.
COLLECTIONS = {
    "paper": "one pchmr run config per row and model of the PCHMR paper's Tables 1-4 and 8-12 (docs/paper.md)",
    "settings": "experimental settings of pchmr's own (docs/strategies.md)",
    "sweeps": "pchmr sweep files (docs/sweep.md)",
}
SUFFIX = ".toml"


class PackagedConfigError(ValueError):
    """A ``COLLECTION:NAME`` reference that names no packaged file."""


@dataclass(frozen=True)
class PackagedConfig:
    """One packaged file: its reference (``paper:NAME``), where it is installed and its summary
    (the file's ``description`` key, else its first comment line)."""

    ref: str
    path: Path
    summary: str


def _root() -> Path:
    return Path(str(resources.files("pchmr.configs")))


def _summary(path: Path) -> str:
    text = path.read_text()
    try:
        description = tomllib.loads(text).get("description")
    except tomllib.TOMLDecodeError:
        description = None
    if isinstance(description, str) and description:
        return description
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def packaged_configs(collection: str | None = None) -> list[PackagedConfig]:
    """Every packaged file, or those of ``collection``, sorted by reference."""
    if collection is not None and collection not in COLLECTIONS:
        raise PackagedConfigError(
            f"no collection {collection!r} of packaged configs; the collections are {', '.join(COLLECTIONS)}"
        )
    names = [collection] if collection else list(COLLECTIONS)
    found = []
    for name in names:
        folder = _root() / name
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            found.append(PackagedConfig(f"{name}:{path.stem}", path, _summary(path)))
    return found


def _is_ref(value: str) -> bool:
    collection, sep, _ = value.partition(":")
    return bool(sep) and collection in COLLECTIONS


def resolve_config_path(value: str | Path) -> Path:
    """The file ``value`` names: a packaged file for ``COLLECTION:NAME`` (``.toml`` optional), else
    ``value`` as a path (unchecked: the reader says whether it exists).

    A reference to no packaged file raises :class:`PackagedConfigError` naming the closest
    references and ``pchmr configs list``."""
    text = str(value)
    if not _is_ref(text):
        return Path(value)
    collection, _, name = text.partition(":")
    name = name.removesuffix(SUFFIX)
    path = _root() / collection / f"{name}{SUFFIX}"
    if name and "/" not in name and "\\" not in name and path.is_file():
        return path
    known = [c.ref for c in packaged_configs(collection)]
    close = difflib.get_close_matches(f"{collection}:{name}", known, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise PackagedConfigError(
        f"no packaged config {text!r}{hint}: `pchmr configs list {collection}` lists the {len(known)} "
        f"{collection} configs pchmr ships; a file of your own is given as its path"
    )
