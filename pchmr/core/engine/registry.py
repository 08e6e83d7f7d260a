"""Discovers plugins through the ``pchmr`` entry-point group and looks them up by kind and name.

Built-in plugins and third-party ones take the same path: a distribution declares

.. code-block:: toml

    [project.entry-points.pchmr]
    acme = "pchmr_acme.plugin"

and the module ``pchmr_acme.plugin`` defines ``@hookimpl`` functions from
:mod:`pchmr.core.contracts.hookspecs`. Nothing is loaded at import time; :func:`get_registry` loads once.

Environment switches (handy for debugging a broken installation):

* ``PCHMR_DISABLE_PLUGINS=acme,foo`` skips those entry points by name;
* ``PCHMR_ONLY_PLUGINS=anny,synthetic`` loads only those entry points.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from pchmr.core.contracts import hookspecs
from pchmr.core.contracts.hookspecs import KINDS, PROJECT

__all__ = [
    "DuplicatePluginError",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "Registry",
    "UnknownPluginError",
    "get_registry",
]


class PluginError(Exception):
    """Base class of plugin errors."""


class PluginLoadError(PluginError):
    """An entry point failed to import or to answer a hook; names the distribution."""


class DuplicatePluginError(PluginError):
    """Two plugins offer the same name for one kind."""


class UnknownPluginError(PluginError, LookupError):
    """No plugin of that kind has that name; the message lists the registered names."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    factory: Any
    entry_point: str
    distribution: str
    version: str

    @property
    def provider(self) -> str:
        return f"{self.distribution} {self.version}"


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "?"
    return dist.metadata["Name"], dist.version


class Registry:
    """All plugins of all kinds, loaded from entry points (and optional in-process modules)."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._plugins: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        self._sources: dict[int, tuple[str, str, str]] = {}

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self, group: str = PROJECT) -> None:
        """Import every entry point of ``group`` and collect its offers."""
        only = _env_set("PCHMR_ONLY_PLUGINS")
        disabled = _env_set("PCHMR_DISABLE_PLUGINS")
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            if (only and ep.name not in only) or ep.name in disabled:
                continue
            dist, version = _dist_of(ep)
            try:
                module = ep.load()
            except Exception as exc:  # report any import failure with its distribution
                raise PluginLoadError(
                    f"entry point '{ep.name} = {ep.value}' from distribution {dist} {version} "
                    f"failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            self.register(module, name=ep.name, distribution=dist, version=version)

    def register(self, module: object, *, name: str, distribution: str = "local", version: str = "") -> None:
        """Register one plugin object (a module or an instance with ``@hookimpl`` methods)."""
        self._pm.register(module, name=f"{distribution}:{name}")
        self._pm.check_pending()
        for kind, hook_name in KINDS.items():
            impl = getattr(module, hook_name, None)
            if impl is None:
                continue
            try:
                offers = impl()
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin '{name}' from distribution {distribution} {version} raised in {hook_name}(): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(offers, Mapping):
                raise PluginLoadError(
                    f"plugin '{name}' from distribution {distribution}: {hook_name}() must return a "
                    f"mapping name -> factory, got {type(offers).__name__}"
                )
            for offer_name, factory in offers.items():
                self._add(kind, offer_name, factory, name, distribution, version)

    def _add(self, kind: str, name: str, factory: Any, ep: str, dist: str, version: str) -> None:
        existing = self._plugins[kind].get(name)
        if existing is not None:
            raise DuplicatePluginError(
                f"two plugins offer the {kind.replace('_', ' ')} '{name}': "
                f"entry point '{existing.entry_point}' ({existing.provider}) and '{ep}' ({dist} {version}); "
                f"uninstall one, or disable it with PCHMR_DISABLE_PLUGINS={ep}"
            )
        self._plugins[kind][name] = PluginInfo(kind, name, factory, ep, dist, version)

    # -- lookup --------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[_check_kind(kind)])

    def infos(self, kind: str | None = None) -> list[PluginInfo]:
        kinds = [kind] if kind else list(KINDS)
        return [info for k in kinds for _, info in sorted(self._plugins[_check_kind(k)].items())]

    def info(self, kind: str, name: str) -> PluginInfo:
        plugins = self._plugins[_check_kind(kind)]
        if name in plugins:
            return plugins[name]
        raise UnknownPluginError(_unknown_message(kind, name, plugins.values()))

    def get(self, kind: str, name: str) -> Any:
        """The factory registered as ``name`` for ``kind``."""
        return self.info(kind, name).factory


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind '{kind}'; kinds are {', '.join(KINDS)}")
    return kind


def _unknown_message(kind: str, name: str, infos: Iterable[PluginInfo]) -> str:
    infos = list(infos)
    label = kind.replace("_", " ")
    if not infos:
        return f"no {label} named '{name}': no {label} plugin is registered (is pchmr installed with pip?)"
    by_dist: dict[str, list[str]] = {}
    for info in infos:
        by_dist.setdefault(info.provider, []).append(info.name)
    listed = "; ".join(f"{', '.join(sorted(names))} ({dist})" for dist, names in sorted(by_dist.items()))
    msg = f"no {label} named '{name}'.\n  registered: {listed}"
    close = difflib.get_close_matches(name, [i.name for i in infos], n=1)
    if close:
        msg += f"\n  did you mean '{close[0]}'?"
    return msg + "\n  `pchmr plugins` lists every kind."


def _env_set(var: str) -> set[str]:
    return {item.strip() for item in os.environ.get(var, "").split(",") if item.strip()}


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        registry = Registry()
        registry.load_entry_points()
        _REGISTRY = registry
    return _REGISTRY
