"""HMR training losses: the terms and their default weights, each a config value.

All terms are L1 (as FastMETRO trains), computed on root-aligned quantities:

* ``joints_3d``      backbone joint tokens vs GT joints (root-relative metres);
* ``reg_joints_3d``  joints regressed from the predicted full mesh vs GT joints;
* ``vertices``       per pyramid level (weights ``vertex_levels``, coarse first) vs the GT mesh
                     downsampled with the pyramid's matrices;
* ``joints_2d``      weak-perspective projection of the predicted joints vs 2D keypoints
                     (crop coordinates), weighted by keypoint confidence.

The default weights follow FastMETRO's training script (joints 1000, vertices 100 with level
weights coarse 0.25 / middle 0.50 / full 0.25, 2D 100). FastMETRO's edge (500) and normal (10)
terms on the middle mesh are in :mod:`pchmr.core.mesh_losses` and not yet part of this loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["LossWeights", "weighted_l1", "project_weak_perspective"]


@dataclass(frozen=True)
class LossWeights:
    joints_3d: float = 1000.0
    reg_joints_3d: float = 1000.0
    vertices: float = 100.0
    vertex_levels: tuple[float, ...] = (0.25, 0.5, 0.25)
    joints_2d: float = 100.0
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("joints_3d", "reg_joints_3d", "vertices", "joints_2d"):
            value = getattr(self, name)
            if not (value >= 0.0):
                raise ValueError(f"loss weight '{name}' must be a number >= 0, got {value!r}")
        if any(not (w >= 0.0) for w in self.vertex_levels):
            raise ValueError(f"vertex_levels must be weights >= 0, got {self.vertex_levels}")

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["vertex_levels"] = list(self.vertex_levels)
        out["extra"] = dict(self.extra)
        return out


def weighted_l1(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean absolute error over (B, N, C); ``weight`` (B, N) masks points (0 = ignore).

    Returns a scalar that is 0 (with a gradient) when every weight is 0.
    """
    err = (pred - target).abs().sum(dim=-1)  # (B, N), summed over coordinates
    if weight is None:
        return err.mean() / pred.shape[-1]
    w = weight.to(err.dtype)
    return (err * w).sum() / (w.sum().clamp_min(1.0) * pred.shape[-1])


def project_weak_perspective(points: Tensor, camera: Tensor) -> Tensor:
    """(B, N, 3) metres and (B, 3) (s, tx, ty) → (B, N, 2) crop coordinates."""
    return camera[:, None, :1] * points[..., :2] + camera[:, None, 1:]


def level_weights_for(levels: int, weights: tuple[float, ...]) -> tuple[float, ...]:
    """The per-level vertex weights for a pyramid of ``levels`` levels (coarse first)."""
    if len(weights) != levels:
        raise ValueError(f"vertex_levels has {len(weights)} weights for a {levels}-level mesh pyramid")
    return weights


def zero_like_loss(reference: Tensor) -> Tensor:
    return torch.zeros((), dtype=reference.dtype, device=reference.device)
