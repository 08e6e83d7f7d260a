"""HMR training losses: the terms and their default weights, each a config value.

All terms are L1 (as FastMETRO trains), computed on root-aligned quantities:

* ``joints_3d``      backbone joint tokens vs GT joints (root-relative metres);
* ``reg_joints_3d``  joints regressed from the predicted full mesh vs GT joints;
* ``vertices``       per pyramid level (weights ``vertex_levels``, coarse first) vs the GT mesh
                     downsampled with the pyramid's matrices;
* ``joints_2d``      weak-perspective projection of the predicted joints vs 2D keypoints
                     (crop coordinates), weighted by keypoint confidence.

* ``edge`` / ``normal`` FastMETRO's mesh regularisers (:mod:`pchmr.core.engine.mesh_losses`) on the
                     pyramid level ``mesh_level`` (the middle one by default) against the GT mesh
                     downsampled to it;
* backbone terms     whatever :meth:`~pchmr.core.contracts.backbone.Backbone.extra_losses` returns (TORE's
                     token-pruning loss), weighted by ``extra[name]`` when given, else by the
                     backbone's own default and schedule.

The default weights follow FastMETRO's training script: joints 1000 (tokens and mesh-regressed),
vertices 100 with level weights coarse 0.25 / middle 0.50 / full 0.25, 2D 100, and on the middle
mesh edge 100 × 5.0 = 500 and normal 100 × 0.1 = 10.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

__all__ = ["LossWeights", "weighted_l1"]


@dataclass(frozen=True)
class LossWeights:
    joints_3d: float = 1000.0
    reg_joints_3d: float = 1000.0
    vertices: float = 100.0
    vertex_levels: tuple[float, ...] = (0.25, 0.5, 0.25)
    joints_2d: float = 100.0
    edge: float = 500.0
    normal: float = 10.0
    mesh_level: int = -2  # pyramid level of the edge/normal terms (Python index: -2 = middle of 3)
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("joints_3d", "reg_joints_3d", "vertices", "joints_2d", "edge", "normal"):
            value = getattr(self, name)
            if not (value >= 0.0):
                raise ValueError(f"loss weight '{name}' must be a number >= 0, got {value!r}")
        if any(not (w >= 0.0) for w in self.vertex_levels):
            raise ValueError(f"vertex_levels must be weights >= 0, got {self.vertex_levels}")
        for name, value in self.extra.items():
            if not (isinstance(value, (int, float)) and value >= 0.0):
                raise ValueError(f"loss weight '{name}' must be a number >= 0, got {value!r}")

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, object]) -> LossWeights:
        """Defaults with ``overrides`` applied: a field name (``edge``, ``joints_3d``, ...,
        ``vertex_levels`` as a list) or any other name, taken as a backbone term (``extra``)."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        fields: dict[str, object] = {}
        extra: dict[str, float] = {}
        for key, value in overrides.items():
            name = str(key).replace("-", "_")
            if name == "vertex_levels":
                if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                    raise ValueError(f"vertex_levels must be a list of weights >= 0, got {value!r}")
                fields[name] = tuple(_weight(name, v) for v in value)
            elif name == "mesh_level":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"mesh_level must be a whole number (a pyramid level, e.g. -2), got {value!r}")
                fields[name] = value
            elif name in known:
                fields[name] = _weight(name, value)
            else:
                extra[str(key)] = _weight(str(key), value)
        return cls(**fields, extra=extra)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["vertex_levels"] = list(self.vertex_levels)
        out["extra"] = dict(self.extra)
        return out


def _weight(name: str, value: object) -> float:
    """``value`` as a loss weight: a number (ints and floats, not bools or text) that is finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"loss weight '{name}' must be a number >= 0, got {value!r}")
    return float(value)


def weighted_l1(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean absolute error over (B, N, C); ``weight`` (B, N) masks points (0 = ignore).

    Returns a scalar that is 0 (with a gradient) when every weight is 0.
    """
    err = (pred - target).abs().sum(dim=-1)  # (B, N), summed over coordinates
    if weight is None:
        return err.mean() / pred.shape[-1]
    w = weight.to(err.dtype)
    return (err * w).sum() / (w.sum().clamp_min(1.0) * pred.shape[-1])


def level_weights_for(levels: int, weights: tuple[float, ...]) -> tuple[float, ...]:
    """The per-level vertex weights for a pyramid of ``levels`` levels (coarse first)."""
    if len(weights) != levels:
        raise ValueError(f"vertex_levels has {len(weights)} weights for a {levels}-level mesh pyramid")
    return weights


def zero_like_loss(reference: Tensor) -> Tensor:
    return torch.zeros((), dtype=reference.dtype, device=reference.device)
