"""The body-model contract: topology, a differentiable forward, joints and the mesh pyramid.

Units and frames (the same everywhere in pchmr, see :mod:`pchmr.core.contracts.sample`):

* lengths are **metres**;
* the body's own frame is **y up, z towards the viewer (out of the body's front)**, x to the
  body's left, with the origin at the root joint (mid-hip) once root-aligned;
* the camera frame is OpenCV-style: x right, y **down**, z forward (into the scene).

A body model plugin converts whatever its underlying library uses into these conventions, so
the rest of pchmr never sees a Z-up or centimetre mesh.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["BodyModel", "BodyModelSpec", "BodyOutput", "MeshPyramid", "sparse_bmm"]


@dataclass(frozen=True)
class MeshPyramid:
    """Coarse-to-full vertex levels of one mesh topology.

    ``num_vertices[0]`` is the coarse level (a few hundred vertices), the last entry the full
    mesh. Matrices are sparse COO float32 tensors:

    * ``down[l]``  (V_l, V_{l+1}): ``coarse = down[l] @ fine`` maps level l+1 to level l;
    * ``up[l]``    (V_{l+1}, V_l): ``fine = up[l] @ coarse`` maps level l to level l+1;
    * ``adjacency`` (V_0, V_0) bool, dense, symmetric, with the diagonal set: which coarse
      vertices are joined by an edge of the coarse mesh (used as an attention mask);
    * ``faces[l]`` (F_l, 3) int64 triangles of level l.

    Each row of ``down`` and ``up`` sums to 1 (convex combinations), so constant and
    translated meshes are preserved across levels; the exception is a user's GraphCMR
    ``mesh_downsampling.npz`` (``method`` ``graphcmr-mesh-downsampling``), used as it is, as
    FastMETRO does: its ``up`` rows are COMA's weights, some negative, summing to 0.83–1.05.
    """

    num_vertices: tuple[int, ...]
    down: tuple[Tensor, ...]
    up: tuple[Tensor, ...]
    adjacency: Tensor
    faces: tuple[Tensor, ...]
    method: str = "unspecified"

    def __post_init__(self) -> None:
        n = len(self.num_vertices)
        if n < 2 or len(self.down) != n - 1 or len(self.up) != n - 1 or len(self.faces) != n:
            raise ValueError(
                f"MeshPyramid with {n} levels needs {n - 1} down and up matrices and {n} face "
                f"arrays, got {len(self.down)}, {len(self.up)} and {len(self.faces)}"
            )
        for level in range(n - 1):
            coarse, fine = self.num_vertices[level], self.num_vertices[level + 1]
            if tuple(self.down[level].shape) != (coarse, fine):
                raise ValueError(f"down[{level}] must be ({coarse}, {fine}), got {tuple(self.down[level].shape)}")
            if tuple(self.up[level].shape) != (fine, coarse):
                raise ValueError(f"up[{level}] must be ({fine}, {coarse}), got {tuple(self.up[level].shape)}")
        v0 = self.num_vertices[0]
        if tuple(self.adjacency.shape) != (v0, v0):
            raise ValueError(f"adjacency must be ({v0}, {v0}), got {tuple(self.adjacency.shape)}")

    @property
    def levels(self) -> int:
        return len(self.num_vertices)

    def to(self, device: torch.device) -> MeshPyramid:
        """This pyramid with every matrix on ``device`` (itself when they are there already)."""
        if self.adjacency.device == device:
            return self

        def moved(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(t.to(device) for t in tensors)

        return dataclasses.replace(
            self, down=moved(self.down), up=moved(self.up), adjacency=self.adjacency.to(device), faces=moved(self.faces)
        )

    def downsample(self, vertices: Tensor, to_level: int = 0) -> Tensor:
        """Full-level (B, V_full, 3) vertices → (B, V_to_level, 3)."""
        out = vertices
        for level in range(self.levels - 2, to_level - 1, -1):
            out = sparse_bmm(self.down[level], out)
        return out

    def upsample(self, vertices: Tensor, from_level: int, to_level: int | None = None) -> Tensor:
        """(B, V_from, 3) vertices → (B, V_to, 3), by default up to the full level."""
        to_level = self.levels - 1 if to_level is None else to_level
        out = vertices
        for level in range(from_level, to_level):
            out = sparse_bmm(self.up[level], out)
        return out


def sparse_bmm(matrix: Tensor, batch: Tensor) -> Tensor:
    """(M, N) sparse or dense @ (B, N, C) → (B, M, C) without a Python loop over the batch.

    Under autocast (mixed precision) a sparse ``matrix`` multiplies outside it, in its own dtype
    (float32): sparse products have no backward for a bfloat16/float16 operand or gradient. The
    result is float32, as autocast gives a reduction; without autocast nothing changes."""
    b, n, c = batch.shape
    flat = batch.transpose(0, 1).reshape(n, b * c)
    if not matrix.is_sparse:
        out = matrix @ flat
    elif torch.is_autocast_enabled(flat.device.type):
        with torch.autocast(device_type=flat.device.type, enabled=False):
            out = torch.sparse.mm(matrix, flat.to(matrix.dtype))
    else:
        out = torch.sparse.mm(matrix, flat)
    return out.reshape(-1, b, c).transpose(0, 1)


@dataclass(frozen=True)
class BodyOutput:
    """A posed body: ``vertices`` (B, V, 3) and ``joints`` (B, J, 3) in metres, body frame
    (y up), *not* root-aligned: the root is wherever the model puts it."""

    vertices: Tensor
    joints: Tensor


class BodyModel(nn.Module, abc.ABC):
    """A parametric body model as pchmr sees it.

    Subclasses set in ``__init__``:

    * ``name``: the plugin name, written next to every reported number;
    * ``faces``: (F, 3) int64 buffer of the full mesh;
    * ``joint_names``: the evaluation joint set (J names), whose 3D positions
      :meth:`joints_from_vertices` regresses linearly from the full mesh;
    * ``joint_regressor``: the (J, V) float32 buffer of that linear map (rows sum to 1);
    * ``root_joints``: indices into ``joint_names`` whose mean is the root used for
      root alignment (e.g. both hips → mid-hip);
    * ``flip_permutation``: for each joint, the index of its left/right mirror.

    Optional (read with ``getattr(model, name, None)``; no abstract method):

    * ``pelvis_regressor``: (V,) float32 buffer, the Human3.6M regressor's pelvis row (H36M
      joint 0, sums to 1), present when the model's evaluation joints come from the Human3.6M
      regressor (SMPL with ``J_regressor_h36m.npy``). Pelvis-aligned evaluation protocols
      (``spin``, ``metro``: :mod:`pchmr.core.kit.joints`) need it; a model without it (Anny, SMPL
      without the file) is evaluated mid-hip aligned and the protocol record says so.

    ``param_shapes`` names the parameter tensors :meth:`forward` takes, with their shape per
    sample; the values are model-specific (a pose and a shape vector at least).
    """

    name: str
    joint_regressor: Tensor
    joint_names: tuple[str, ...]
    root_joints: tuple[int, ...]
    flip_permutation: tuple[int, ...]
    param_shapes: Mapping[str, tuple[int, ...]]

    @property
    def num_vertices(self) -> int:
        return int(self.joint_regressor.shape[1])

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @abc.abstractmethod
    def forward(self, **params: Tensor) -> BodyOutput:
        """Differentiable forward from the named parameters (each (B, *param_shapes[name])); an
        unknown name raises TypeError naming it, a wrong shape ValueError naming the parameter."""

    def joints_from_vertices(self, vertices: Tensor) -> Tensor:
        """(B, V, 3) full-mesh vertices → (B, J, 3) evaluation joints, linear in the vertices."""
        regressor = self.joint_regressor.to(vertices.dtype)
        return torch.einsum("jv,bvc->bjc", regressor, vertices)

    @abc.abstractmethod
    def pyramid(self) -> MeshPyramid:
        """The coarse/middle/full mesh pyramid; computed once per topology and cached on disk."""

    def root(self, joints: Tensor) -> Tensor:
        """(B, J, 3) joints → (B, 1, 3) root position (mean of ``root_joints``)."""
        return joints[:, list(self.root_joints)].mean(dim=1, keepdim=True)

    def describe(self) -> dict[str, object]:
        """A JSON-able summary written next to every number computed with this model."""
        return {
            "body_model": self.name,
            "num_vertices": self.num_vertices,
            "joint_set": f"{self.name}-{self.num_joints}",
            "joints": list(self.joint_names),
        }


@dataclass(frozen=True)
class BodyModelSpec:
    """Options a body-model factory receives (kept small and explicit)."""

    cache_dir: str | None = None
    model_dir: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)
