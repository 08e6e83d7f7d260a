"""What a plugin package's own tests need of pchmr's machinery, without importing the engine:
look a registered plugin up by kind and name, and wrap a backbone in the training loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pchmr.core.contracts.backbone import Backbone
    from pchmr.core.contracts.bodymodel import BodyModel
    from pchmr.core.engine.module import HMRModule
    from pchmr.core.engine.registry import PluginInfo

__all__ = ["hmr_module", "plugin_info", "registered"]


def registered(kind: str, name: str) -> Any:
    """The factory registered as ``name`` for plugin ``kind`` (``backbone``, ``partitioner``, …),
    found through the ``pchmr`` entry points exactly as ``pchmr run`` finds it."""
    return plugin_info(kind, name).factory


def plugin_info(kind: str, name: str) -> PluginInfo:
    """Who registered ``name`` for ``kind``: ``.distribution``, ``.version``, ``.entry_point``."""
    from pchmr.core.engine.registry import get_registry

    return get_registry().info(kind, name)


def hmr_module(backbone: Backbone, body_model: BodyModel, **kwargs: Any) -> HMRModule:
    """``backbone`` inside pchmr's one training loop (``HMRModule``), default losses and
    optimiser; ``kwargs`` go to ``HMRModule`` (``loss_weights``, ``optim``, ``alignment``)."""
    from pchmr.core.engine.module import HMRModule

    return HMRModule(backbone, body_model, **kwargs)
