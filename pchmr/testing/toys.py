"""Tiny deterministic doubles for tests: a toy body model and random Sample batches.

:class:`ToyBodyModel` is a subdivided octahedron projected onto an ellipsoid of a standing
adult's proportions (1.7 m tall). With ``segments = n`` (divisible by 4) each octahedron edge
is cut in n, giving 4n² + 2 vertices; the default n = 12 gives 578. Its mesh pyramid nests
the same construction at n/4 (coarse, 38 vertices) and n/2 (middle, 146): a coarse vertex *is*
a fine vertex (one-hot ``down``), and a fine vertex is either a coarse one or the midpoint of a
coarse edge (``up`` rows hold one 1 or two 0.5). Nothing here reads files or needs
:mod:`pchmr.core.kit.pyramid`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import Tensor

from pchmr.core.contracts.bodymodel import BodyModel, BodyOutput, MeshPyramid
from pchmr.core.contracts.sample import META_KEYS

__all__ = [
    "TOY_JOINT_NAMES",
    "ToyBodyModel",
    "body_to_camera",
    "toy_batch",
]

#: The 14 joints FastMETRO evaluates on (LSP order).
TOY_JOINT_NAMES = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    "neck", "head",
)  # fmt: skip
#: Both hips: their mean is the root.
TOY_ROOT_JOINTS = (2, 3)
#: Left/right mirror of each joint.
TOY_FLIP_PERMUTATION = (5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13)
#: Where the right-side and central joints sit, body frame (x to the body's left, y up, z front),
#: metres; left-side joints mirror x. The joint regressor is a kernel over nearby surface vertices.
_RIGHT_AND_CENTRE_TARGETS = {
    "right_ankle": (-0.06, -0.80, 0.0),
    "right_knee": (-0.10, -0.45, 0.0),
    "right_hip": (-0.10, -0.05, 0.0),
    "right_wrist": (-0.21, -0.05, 0.0),
    "right_elbow": (-0.20, 0.22, 0.0),
    "right_shoulder": (-0.16, 0.45, 0.0),
    "neck": (0.0, 0.62, 0.0),
    "head": (0.0, 0.80, 0.0),
}
#: Ellipsoid half-extents (x, y, z) in metres: 44 cm wide, 1.7 m tall, 24 cm deep.
TOY_HALF_EXTENTS = (0.22, 0.85, 0.12)
#: Width (metres) of the Gaussian kernel turning joint targets into vertex weights.
JOINT_KERNEL_WIDTH_M = 0.06
#: Kernel weights below this fraction of a joint's largest weight are dropped.
JOINT_KERNEL_CUTOFF = 1e-2
#: ``betas`` scale the body as exp(BETA_SCALE * beta): beta 0 = height, beta 1 = girth.
BETA_SCALE = 0.1
#: Default octahedron subdivision of the full mesh (must be divisible by 4).
DEFAULT_SEGMENTS = 12
#: Standard deviations of the random ToyBodyModel parameters in :func:`toy_batch` (radians for
#: ``global_orient``), and the largest random yaw (radians) it turns every body by.
TOY_PARAM_STD = {"global_orient": 0.15, "betas": 0.5}
TOY_MAX_YAW = 0.5
#: Weak-perspective scale :func:`toy_batch` projects with (a 1.7 m body spans about ±0.9).
TOY_CAMERA_SCALE = 1.05


def _octahedron_grid(n: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Integer points p with |x|+|y|+|z| = n and the outward-oriented triangles between them."""
    index: dict[tuple[int, int, int], int] = {}
    points: list[tuple[int, int, int]] = []
    faces: list[tuple[int, int, int]] = []

    def vid(p: tuple[int, int, int]) -> int:
        if p not in index:
            index[p] = len(points)
            points.append(p)
        return index[p]

    for sx, sy, sz in itertools.product((1, -1), repeat=3):

        def at(a: int, b: int, sx: int = sx, sy: int = sy, sz: int = sz) -> tuple[int, int, int]:
            return (sx * a, sy * b, sz * (n - a - b))

        for a in range(n):
            for b in range(n - a):
                tris = [(at(a, b), at(a + 1, b), at(a, b + 1))]
                if a + b <= n - 2:
                    tris.append((at(a + 1, b), at(a + 1, b + 1), at(a, b + 1)))
                for tri in tris:
                    faces.append(_outward(tri, vid))
    return points, faces


def _outward(tri: tuple[tuple[int, int, int], ...], vid) -> tuple[int, int, int]:
    p0, p1, p2 = (torch.tensor(p, dtype=torch.float64) for p in tri)
    normal = torch.linalg.cross(p1 - p0, p2 - p0)
    ids = (vid(tri[0]), vid(tri[1]), vid(tri[2]))
    return ids if float(normal @ (p0 + p1 + p2)) > 0 else (ids[0], ids[2], ids[1])


def _up_matrix(coarse: list[tuple[int, int, int]], fine: list[tuple[int, int, int]]) -> Tensor:
    """(V_fine, V_coarse) sparse: fine grid (side 2n) from coarse grid (side n), exact midpoints."""
    where = {p: i for i, p in enumerate(coarse)}
    rows, cols, vals = [], [], []
    for row, p in enumerate(fine):
        odd = [k for k in range(3) if p[k] % 2]
        if not odd:
            rows.append(row), cols.append(where[tuple(c // 2 for c in p)]), vals.append(1.0)
            continue
        i, j = odd  # |x|+|y|+|z| is even, so exactly two coordinates are odd
        for up_axis, down_axis in ((i, j), (j, i)):
            q = [c // 2 if c % 2 == 0 else 0 for c in p]
            q[up_axis] = (abs(p[up_axis]) + 1) // 2 * (1 if p[up_axis] > 0 else -1)
            q[down_axis] = (abs(p[down_axis]) - 1) // 2 * (1 if p[down_axis] > 0 else -1)
            rows.append(row), cols.append(where[tuple(q)]), vals.append(0.5)
    return torch.sparse_coo_tensor(
        torch.tensor([rows, cols]),
        torch.tensor(vals, dtype=torch.float32),
        (len(fine), len(coarse)),
        check_invariants=True,
    ).coalesce()


def _down_matrix(coarse: list[tuple[int, int, int]], fine: list[tuple[int, int, int]], factor: int) -> Tensor:
    """(V_coarse, V_fine) one-hot: each coarse vertex picks the fine vertex at the same place."""
    where = {p: i for i, p in enumerate(fine)}
    cols = [where[tuple(c * factor for c in p)] for p in coarse]
    return torch.sparse_coo_tensor(
        torch.tensor([list(range(len(coarse))), cols]),
        torch.ones(len(coarse)),
        (len(coarse), len(fine)),
        check_invariants=True,
    ).coalesce()


def _adjacency(faces: Tensor, num_vertices: int) -> Tensor:
    adjacency = torch.eye(num_vertices, dtype=torch.bool)
    for a, b in ((0, 1), (1, 2), (2, 0)):
        adjacency[faces[:, a], faces[:, b]] = True
        adjacency[faces[:, b], faces[:, a]] = True
    return adjacency


def _ellipsoid(points: list[tuple[int, int, int]]) -> Tensor:
    p = torch.tensor(points, dtype=torch.float64)
    return p / p.norm(dim=1, keepdim=True) * torch.tensor(TOY_HALF_EXTENTS, dtype=torch.float64)


def _joint_regressor(template: Tensor) -> Tensor:
    """(J, V) rows of non-negative weights summing to 1, left/right symmetric."""
    targets = []
    for name in TOY_JOINT_NAMES:
        mirror = name.replace("left_", "right_")
        x, y, z = _RIGHT_AND_CENTRE_TARGETS[mirror]
        targets.append((-x if name.startswith("left_") else x, y, z))
    d2 = torch.cdist(torch.tensor(targets, dtype=torch.float64), template).square()
    weights = torch.exp(-(d2 - d2.min(dim=1, keepdim=True).values) / JOINT_KERNEL_WIDTH_M**2)
    weights = torch.where(weights >= JOINT_KERNEL_CUTOFF, weights, torch.zeros_like(weights))
    return (weights / weights.sum(dim=1, keepdim=True)).to(torch.float32)


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """(B, 3) axis-angle (radians) → (B, 3, 3) rotation matrices (Rodrigues), differentiable."""
    angle = axis_angle.norm(dim=1, keepdim=True).clamp_min(1e-8)
    k = axis_angle / angle
    zero = torch.zeros_like(k[:, 0])
    cross = torch.stack((zero, -k[:, 2], k[:, 1], k[:, 2], zero, -k[:, 0], -k[:, 1], k[:, 0], zero), dim=1).view(
        -1, 3, 3
    )
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(cross)
    s, c = angle.sin()[..., None], angle.cos()[..., None]
    return eye + s * cross + (1 - c) * (cross @ cross)


class ToyBodyModel(BodyModel):
    """A 1.7 m ellipsoid "body" with 14 joints and a nested 3-level pyramid (38/146/578 by default).

    ``forward(global_orient (B, 3) axis-angle, betas (B, 2))`` → vertices (B, V, 3) and joints
    (B, 14, 3), metres, body frame (y up): the template is scaled by exp(0.1·beta) in height
    (beta 0) and girth (beta 1), then rotated about its centre.
    """

    def __init__(self, segments: int = DEFAULT_SEGMENTS) -> None:
        super().__init__()
        if segments < 4 or segments % 4:
            raise ValueError(f"segments must be a positive multiple of 4, got {segments}")
        self.name = "toy"
        self.joint_names = TOY_JOINT_NAMES
        self.root_joints = TOY_ROOT_JOINTS
        self.flip_permutation = TOY_FLIP_PERMUTATION
        self.param_shapes = {"global_orient": (3,), "betas": (2,)}
        self._grids = [_octahedron_grid(segments // 4), _octahedron_grid(segments // 2), _octahedron_grid(segments)]
        points, faces = self._grids[-1]
        template = _ellipsoid(points)
        self.register_buffer("faces", torch.tensor(faces, dtype=torch.int64))
        self.register_buffer("template", template.to(torch.float32))
        self.register_buffer("joint_regressor", _joint_regressor(template))
        self._pyramid: MeshPyramid | None = None

    def forward(self, **params: Tensor) -> BodyOutput:
        expected = set(self.param_shapes)
        if set(params) != expected:
            raise TypeError(f"ToyBodyModel.forward takes {sorted(expected)}, got {sorted(params)}")
        orient, betas = params["global_orient"], params["betas"]
        batch = orient.shape[0]
        for name, value in params.items():
            if tuple(value.shape) != (batch, *self.param_shapes[name]):
                raise ValueError(f"'{name}' must be ({batch}, {self.param_shapes[name][0]}), got {tuple(value.shape)}")
        scale = torch.exp(BETA_SCALE * betas)  # (B, 2): height, girth
        scales = torch.stack((scale[:, 1], scale[:, 0], scale[:, 1]), dim=1)[:, None, :]
        vertices = (self.template[None] * scales) @ axis_angle_to_matrix(orient).transpose(1, 2)
        return BodyOutput(vertices=vertices, joints=self.joints_from_vertices(vertices))

    def joints_from_vertices(self, vertices: Tensor) -> Tensor:
        return torch.einsum("jv,bvc->bjc", self.joint_regressor.to(vertices.dtype), vertices)

    def pyramid(self) -> MeshPyramid:
        if self._pyramid is None:
            points = [grid[0] for grid in self._grids]
            faces = tuple(torch.tensor(grid[1], dtype=torch.int64) for grid in self._grids)
            self._pyramid = MeshPyramid(
                num_vertices=tuple(len(p) for p in points),
                down=(_down_matrix(points[0], points[1], 2), _down_matrix(points[1], points[2], 2)),
                up=(_up_matrix(points[0], points[1]), _up_matrix(points[1], points[2])),
                adjacency=_adjacency(faces[0], len(points[0])),
                faces=faces,
                method="toy-nested-octahedron",
            )
        return self._pyramid


def body_to_camera(points: Tensor) -> Tensor:
    """(..., 3) body frame (x left of the body, y up, z front) → camera frame (x right, y down,
    z forward) for a body facing the camera: a 180° rotation about x."""
    return points * torch.tensor((1.0, -1.0, -1.0), dtype=points.dtype, device=points.device)


def _random_params(body_model: BodyModel, batch_size: int, generator: torch.Generator | None) -> dict[str, Tensor]:
    if isinstance(body_model, ToyBodyModel):
        return {
            name: TOY_PARAM_STD[name] * torch.randn(batch_size, *shape, generator=generator)
            for name, shape in body_model.param_shapes.items()
        }
    return {name: torch.zeros(batch_size, *shape) for name, shape in body_model.param_shapes.items()}


def toy_batch(
    body_model: BodyModel, batch_size: int, image_size: int, generator: torch.Generator | None = None
) -> dict[str, Tensor | Mapping[str, list[str]]]:
    """A collated batch in the Sample schema (:mod:`pchmr.core.contracts.sample`), random but valid.

    Meshes come from ``body_model`` (random parameters for :class:`ToyBodyModel`, zero
    parameters otherwise, which must then be a valid pose), turned by a random yaw, moved to
    the camera frame and made root-relative; joints are regressed from them; 2D keypoints are
    their weak perspective projection with scale :data:`TOY_CAMERA_SCALE`; images are noise.
    ``meta`` is ``{label: [value] * batch_size}``, as PyTorch's default collate produces.
    """
    params = _random_params(body_model, batch_size, generator)
    with torch.no_grad():
        vertices = body_model(**params).vertices.to(torch.float32)
        yaw = (torch.rand(batch_size, generator=generator) * 2 - 1) * TOY_MAX_YAW
        turn = axis_angle_to_matrix(torch.stack((torch.zeros_like(yaw), yaw, torch.zeros_like(yaw)), dim=1))
        vertices = body_to_camera(vertices @ turn.transpose(1, 2))
        joints = body_model.joints_from_vertices(vertices)
        root = body_model.root(joints)
        vertices, joints = vertices - root, joints - root
    ones = torch.ones(batch_size, joints.shape[1], 1)
    uv = (TOY_CAMERA_SCALE * joints[..., :2]).clamp(-1.0, 1.0)
    return {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "keypoints_2d": torch.cat((uv, ones), dim=2),
        "joints_3d": torch.cat((joints, ones), dim=2),
        "vertices": vertices,
        "has_vertices": torch.ones(batch_size),
        "index": torch.arange(batch_size, dtype=torch.int64),
        "meta": {key: ["toy"] * batch_size for key in META_KEYS},
    }
