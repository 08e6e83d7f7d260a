"""``example-ellipsoid``: the smallest body model that keeps pchmr's body-model contract.

A 1.7 m tall ellipsoid (a latitude-longitude sphere of :data:`STACKS` × :data:`SLICES` cells,
scaled to a standing adult's half extents) with the 14 LSP joints pinned to the mean of the
vertices nearest to where they sit on a person. Parameters (``param_shapes``):

* ``global_orient`` (B, 3): axis-angle rotation about the root, radians;
* ``scale`` (B, 1): log of a uniform size factor (0 = 1.7 m tall).

Frame and units are pchmr's (``docs/plugins.md``, ``body_model``): metres, y up, z out of the
body's front, x to the body's left. The mesh pyramid (coarse and middle levels of
:data:`LEVEL_SIZES` vertices, then the full mesh) comes from pchmr's own builder,
:func:`pchmr.api.build_pyramid`, computed on the first ``pyramid()`` call and kept.

Written from ``docs/plugins.md`` alone; only :mod:`pchmr.api` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from pchmr.api import (
    LSP_14,
    BodyModel,
    BodyModelSpec,
    BodyOutput,
    MeshPyramid,
    NoOptions,
    build_pyramid,
    hookimpl,
    read_options,
)

__all__ = ["NAME", "EllipsoidBody", "make_ellipsoid", "pchmr_body_models"]

NAME = "example-ellipsoid"
#: Latitude bands and longitude segments of the sphere (the full mesh has (STACKS-1)·SLICES + 2 vertices).
STACKS, SLICES = 12, 16
#: Half extents (x, y, z), metres: 44 cm wide, 1.7 m tall, 24 cm deep.
HALF_EXTENTS_M = (0.22, 0.85, 0.12)
#: Vertices of the coarse and middle pyramid levels (the full mesh has 178).
LEVEL_SIZES = (32, 80)
#: Each joint is the mean of this many vertices nearest to its target.
NEAREST = 4
#: Where the right-side and central joints sit (body frame, metres); left ones mirror x.
TARGETS_M: Mapping[str, tuple[float, float, float]] = {
    "ankle": (-0.06, -0.85, 0.0), "knee": (-0.10, -0.45, 0.0), "hip": (-0.12, -0.05, 0.0),
    "wrist": (-0.22, -0.05, 0.0), "elbow": (-0.21, 0.22, 0.0), "shoulder": (-0.16, 0.45, 0.0),
    "neck": (0.0, 0.62, 0.0), "head": (0.0, 0.85, 0.0),
}  # fmt: skip


def _sphere() -> tuple[Tensor, Tensor]:
    """(V, 3) float64 unit-sphere vertices (poles first and last) and (F, 3) int64 faces, outward."""
    points = [(0.0, 1.0, 0.0)]
    for i in range(1, STACKS):
        theta = math.pi * i / STACKS
        for j in range(SLICES):
            phi = 2 * math.pi * j / SLICES
            points.append((math.sin(theta) * math.cos(phi), math.cos(theta), math.sin(theta) * math.sin(phi)))
    points.append((0.0, -1.0, 0.0))
    last = len(points) - 1

    def ring(i: int, j: int) -> int:
        return 1 + (i - 1) * SLICES + j % SLICES

    faces = [(0, ring(1, j + 1), ring(1, j)) for j in range(SLICES)]
    for i in range(1, STACKS - 1):
        for j in range(SLICES):
            faces += [
                (ring(i, j), ring(i, j + 1), ring(i + 1, j)),
                (ring(i, j + 1), ring(i + 1, j + 1), ring(i + 1, j)),
            ]
    faces += [(last, ring(STACKS - 1, j), ring(STACKS - 1, j + 1)) for j in range(SLICES)]
    return torch.tensor(points, dtype=torch.float64), torch.tensor(faces, dtype=torch.int64)


def _target(name: str) -> tuple[float, float, float]:
    x, y, z = TARGETS_M[name.removeprefix("left_").removeprefix("right_")]
    return (-x if name.startswith("left_") else x, y, z)


def _mirror(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[5:]
    return "left_" + name[6:] if name.startswith("right_") else name


class EllipsoidBody(BodyModel):
    """``forward(global_orient (B, 3), scale (B, 1))`` → vertices (B, V, 3), joints (B, 14, 3),
    float32 metres, body frame (y up), root (mid-hip) wherever the rotation puts it."""

    def __init__(self) -> None:
        super().__init__()
        self.name = NAME
        self.joint_names = tuple(LSP_14)
        self.root_joints = (self.joint_names.index("left_hip"), self.joint_names.index("right_hip"))
        self.flip_permutation = tuple(self.joint_names.index(_mirror(n)) for n in self.joint_names)
        self.param_shapes = {"global_orient": (3,), "scale": (1,)}
        unit, faces = _sphere()
        template = unit * torch.tensor(HALF_EXTENTS_M, dtype=torch.float64)
        targets = torch.tensor([_target(n) for n in self.joint_names], dtype=torch.float64)
        nearest = torch.cdist(targets, template).topk(NEAREST, largest=False).indices  # (J, NEAREST)
        regressor = torch.zeros(len(targets), len(template)).scatter_(1, nearest, 1.0 / NEAREST)
        self.register_buffer("template", template.float(), persistent=False)
        self.register_buffer("faces", faces, persistent=False)
        self.register_buffer("joint_regressor", regressor, persistent=False)
        self._pyramid: MeshPyramid | None = None

    def forward(self, **params: Tensor) -> BodyOutput:
        unknown = sorted(set(params) - set(self.param_shapes))
        if unknown:
            raise TypeError(f"{NAME} takes {sorted(self.param_shapes)}, got unknown parameters {unknown}")
        missing = sorted(set(self.param_shapes) - set(params))
        if missing:
            raise TypeError(f"{NAME} needs {missing}: global_orient (B, 3) radians, scale (B, 1)")
        batch = params["global_orient"].shape[0]
        for name, value in params.items():
            if tuple(value.shape) != (batch, *self.param_shapes[name]):
                raise ValueError(f"'{name}' must be ({batch}, {self.param_shapes[name][0]}), got {tuple(value.shape)}")
        orient, scale = params["global_orient"].float(), params["scale"].float()
        x, y, z = orient.unbind(-1)
        zero = torch.zeros_like(x)
        skew = torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), dim=-1).view(batch, 3, 3)
        rotation = torch.linalg.matrix_exp(skew)  # Rodrigues, differentiable at 0 as well
        vertices = (self.template * scale.exp()[:, :, None]) @ rotation.transpose(1, 2)
        return BodyOutput(vertices=vertices, joints=self.joints_from_vertices(vertices))

    def pyramid(self) -> MeshPyramid:
        if self._pyramid is None:
            template, faces = self.template.double().cpu().numpy(), self.faces.cpu().numpy()
            self._pyramid = build_pyramid(template, faces, level_sizes=LEVEL_SIZES)
        return self._pyramid


def make_ellipsoid(spec: BodyModelSpec) -> EllipsoidBody:
    """The factory registered as ``example-ellipsoid``; it reads no files and takes no options."""
    read_options(NoOptions, spec.extra, plugin=NAME, kind="body_model")
    return EllipsoidBody()


make_ellipsoid.options = NoOptions  # type: ignore[attr-defined]  # the DeclaresOptions capability


@hookimpl
def pchmr_body_models() -> Mapping[str, Callable[[BodyModelSpec], EllipsoidBody]]:
    """Offer ``example-ellipsoid``."""
    return {NAME: make_ellipsoid}
