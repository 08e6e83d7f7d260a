"""Camera geometry shared by losses and backbones."""

from __future__ import annotations

from torch import Tensor

__all__ = ["project_weak_perspective"]


def project_weak_perspective(points: Tensor, camera: Tensor) -> Tensor:
    """(B, N, 3) metres and (B, 3) (s, tx, ty) → (B, N, 2) crop coordinates."""
    return camera[:, None, :1] * points[..., :2] + camera[:, None, 1:]
