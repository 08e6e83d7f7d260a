"""The ``anny`` body model: NAVER's Anny (Apache-2.0, no licence files to fetch) in pchmr's frame.

Anny's mesh is Z-up with the body facing -Y and its left side at +X. pchmr's body frame is
y up, z out of the body's front, x to the body's left (:mod:`pchmr.core.contracts.bodymodel`), so
``v_pchmr = C @ v_anny`` with ``C`` = :data:`ANNY_TO_BODY` (x, y, z) ← (x, z, -y).

Parameters (``param_shapes``):

* ``pose`` (B, 104, 3): per-bone axis-angle in radians, one row per entry of
  :attr:`AnnyBodyModel.bone_labels`. Each rotation is expressed in axes aligned with the
  *body frame at rest* and carried along by the bone's parents (Anny's ``local-ref``
  parameterisation, axes converted to pchmr's): +x rotation of ``lowerleg01.L`` bends the
  left knee, -x rotation of ``upperleg01.L`` flexes the left hip. Bone 0 (``root``) is the
  global orientation about the root bone's head. Zero pose is Anny's rest A-pose.
* ``phenotype`` (B, 6): ``gender, age, muscle, weight, height, proportions`` in [0, 1]
  (0.5 when omitted; adults have age ≳ 0.6).

Evaluation joints (J = 14, the LSP-14 order) are fixed linear combinations of the vertices,
built from Anny's COCO keypoint regressor: right/left ankle, knee, hip, wrist, elbow and
shoulder are COCO's; ``neck`` is the mean of the two shoulders and ``head`` the mean of the
two ears. The root (:meth:`BodyModel.root`) is the mid-hip.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch import Tensor

from pchmr.core.contracts.bodymodel import (
    BodyModel,
    BodyModelSpec,
    BodyOutput,
    MeshPyramid,
)
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import NoOptions, read_options

__all__ = [
    "ACTIONS",
    "ANNY_TO_BODY",
    "JOINT_NAMES",
    "PART_NAMES",
    "PHENOTYPE_NAMES",
    "AnnyBodyModel",
    "make_anny",
    "pchmr_body_models",
]

NUM_BONES = 104
PHENOTYPE_NAMES = ("gender", "age", "muscle", "weight", "height", "proportions")
#: Rows: pchmr body axes (x left, y up, z front) in Anny's coordinates (x left, z up, -y front).
ANNY_TO_BODY = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

#: The evaluation joint set, LSP-14 order.
JOINT_NAMES = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    "neck", "head",
)  # fmt: skip
#: Each evaluation joint as the mean of these COCO keypoints of Anny's regressor.
_JOINT_FROM_COCO: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in JOINT_NAMES[:12]},
    "neck": ("left_shoulder", "right_shoulder"),
    "head": ("left_ear", "right_ear"),
}
ROOT_JOINTS = (JOINT_NAMES.index("left_hip"), JOINT_NAMES.index("right_hip"))

#: Body parts (for colouring renders): every bone maps to one of them.
PART_NAMES = (
    "head", "neck", "torso", "hips",
    "left_upper_arm", "left_forearm", "left_hand", "right_upper_arm", "right_forearm", "right_hand",
    "left_thigh", "left_shin", "left_foot", "right_thigh", "right_shin", "right_foot",
)  # fmt: skip
#: Bone-label prefix → part suffix (sided bones get ``left_``/``right_`` from ``.L``/``.R``).
_BONE_PREFIX_TO_PART = (
    ("upperleg", "thigh"), ("lowerleg", "shin"), ("foot", "foot"), ("toe", "foot"),
    ("shoulder", "upper_arm"), ("upperarm", "upper_arm"), ("lowerarm", "forearm"),
    ("wrist", "hand"), ("finger", "hand"), ("metacarpal", "hand"),
    ("clavicle", "torso"), ("pelvis", "hips"), ("spine", "torso"), ("neck", "neck"),
    ("head", "head"), ("eye", "head"), ("root", "hips"),
)  # fmt: skip

#: Squared angle (rad²) below which Rodrigues' coefficients use their Taylor expansions.
SMALL_ANGLE2 = 1e-8
DEFAULT_PYRAMID_CACHE = Path("~/.cache/pchmr/pyramids")
_ANNY_CACHE_SIZE = 2

#: Pose families :meth:`AnnyBodyModel.sample_pose` draws from.
ACTIONS = ("stand", "walk", "reach", "squat", "kick", "wave")


def bone_part(label: str) -> str:
    """The :data:`PART_NAMES` entry of one Anny bone label (e.g. ``'lowerarm01.L'`` →
    ``'left_forearm'``)."""
    stem, _, side = label.partition(".")
    for prefix, part in _BONE_PREFIX_TO_PART:
        if stem.startswith(prefix):
            if part in ("torso", "hips", "neck", "head") or side not in ("L", "R"):
                return part
            return ("left_" if side == "L" else "right_") + part
    prefixes = [p for p, _ in _BONE_PREFIX_TO_PART]
    raise ValueError(f"Anny bone {label!r} maps to no body part; known prefixes {prefixes}")


def _quiet_warp() -> None:
    """Anny skins with NVIDIA Warp, which greets on stdout at init unless its log level is
    raised, and whose native library prints a "could not load the CUDA driver" notice on stderr
    on every machine without a GPU. Initialise Warp here, with its log level raised and the
    process's stderr (file descriptor 2, which the native code writes to) parked on /dev/null
    for the duration of ``warp.init()`` only; errors still raise as exceptions."""
    try:
        import warp
    except ImportError:  # anny falls back to torch skinning
        return
    if warp.config.log_level <= warp.LOG_INFO:
        warp.config.log_level = warp.LOG_WARNING
    if _warp_initialised(warp):
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                warp.init()
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _warp_initialised(warp: object) -> bool:
    context = getattr(getattr(warp, "_src", None), "context", None)
    return getattr(context, "runtime", None) is not None


@functools.lru_cache(maxsize=_ANNY_CACHE_SIZE)
def _build_anny(dtype: torch.dtype) -> torch.nn.Module:
    """Anny's full-body model in ``dtype``, built once per process (building reads a ~790 MB
    cache, ~1 s once it exists; the very first build on a machine takes ~90 s)."""
    _quiet_warp()
    try:
        import anny
    except ImportError as exc:  # pragma: no cover - anny is a hard dependency
        raise ImportError("the 'anny' body model needs the 'anny' package (pip install anny==0.6.2)") from exc
    model = anny.Anny(pose_parameterization="local-ref").to(dtype)
    model.requires_grad_(False)
    return model


def _coco_regressor(model: torch.nn.Module) -> tuple[Tensor, list[str]]:
    import anny

    regressor = anny.KeypointsRegressor.coco(model)
    return regressor.regression_weights.to(torch.float64), list(regressor.labels)


def build_joint_regressor(coco_weights: Tensor, coco_labels: list[str]) -> Tensor:
    """(K, V) COCO regression weights → (14, V) float32 regressor of :data:`JOINT_NAMES`."""
    rows = []
    for name in JOINT_NAMES:
        sources = _JOINT_FROM_COCO[name]
        missing = [s for s in sources if s not in coco_labels]
        if missing:
            raise ValueError(f"Anny's COCO regressor lacks keypoints {missing}; it has {coco_labels}")
        rows.append(torch.stack([coco_weights[coco_labels.index(s)] for s in sources]).mean(dim=0))
    return torch.stack(rows).to(torch.float32)


def axis_angle_to_matrix(rotvec: Tensor) -> Tensor:
    """(..., 3) axis-angle (radians) → (..., 3, 3) rotation by Rodrigues' formula, with Taylor
    coefficients near zero so that gradients at the zero pose are finite."""
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*rotvec.shape[:-1], 3, 3)
    theta2 = (rotvec * rotvec).sum(dim=-1)
    small = theta2 < SMALL_ANGLE2
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)[..., None, None]
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / (theta * theta))[..., None, None]
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + a * skew + b * (skew @ skew)


def flip_pose(pose: np.ndarray, bone_labels: tuple[str, ...]) -> np.ndarray:
    """Mirror (..., 104, 3) body-frame axis-angle poses left↔right (reflection x → -x):
    swap ``.L``/``.R`` bones and negate the y and z components of every rotation vector."""
    index = {label: i for i, label in enumerate(bone_labels)}
    swap = [index.get(_mirror_label(label), i) for i, label in enumerate(bone_labels)]
    flipped = pose[..., swap, :].copy()
    flipped[..., 1:] *= -1.0
    return flipped


def _mirror_label(label: str) -> str:
    if label.endswith(".L"):
        return label[:-2] + ".R"
    if label.endswith(".R"):
        return label[:-2] + ".L"
    return label


# --------------------------------------------------------------------------- pose sampling
# Angles in degrees, body axes at rest (x left, y up, z front), written for the LEFT side;
# right-side rotations are the mirror images (see flip_pose). Sign conventions:
#   hip flexion (thigh forward) = -x; knee flexion = +x; ankle: +x points the toes down;
#   spine/neck flexion (lean forward, nod) = +x; lateral bend = z; twist/turn = y;
#   shoulder abduction (raise the left arm sideways, from Anny's A-pose) = +z, shoulder
#   flexion (swing the arm forward) = -x; elbow angles are the *total* flexion (0 = straight
#   arm; Anny's rest pose is already bent, see ArmRest) about the rest elbow hinge; arm twist
#   is about the upper arm's rest direction.
_SPINE_BONES = ("spine05", "spine04", "spine03", "spine02", "spine01")
_X, _Y, _Z = np.eye(3)


@dataclass(frozen=True)
class ArmRest:
    """The left arm of the rest skeleton, body frame: the upper arm's unit direction, the
    elbow hinge (unit, so that a positive rotation bends the elbow further) and the elbow's
    rest flexion in degrees."""

    upper_dir: np.ndarray
    hinge: np.ndarray
    rest_flexion: float

    @classmethod
    def from_points(cls, shoulder: np.ndarray, elbow: np.ndarray, wrist: np.ndarray) -> ArmRest:
        upper, fore = elbow - shoulder, wrist - elbow
        upper, fore = upper / np.linalg.norm(upper), fore / np.linalg.norm(fore)
        hinge = np.cross(upper, fore)
        flexion = float(np.degrees(np.arccos(np.clip(upper @ fore, -1.0, 1.0))))
        return cls(upper, hinge / np.linalg.norm(hinge), flexion)


def _axis_rot(axis: np.ndarray, degrees: np.ndarray) -> Rotation:
    return Rotation.from_rotvec(np.radians(degrees)[:, None] * (axis / np.linalg.norm(axis))[None])


class _PoseBuilder:
    """Accumulates per-bone rotations of ``n`` left-side-defined poses."""

    def __init__(self, n: int, rng: np.random.Generator, bone_labels: tuple[str, ...], arm_rest: ArmRest) -> None:
        self.n, self.rng, self.arm_rest = n, rng, arm_rest
        self.index = {label: i for i, label in enumerate(bone_labels)}
        self.pose = np.zeros((n, len(bone_labels), 3))

    def u(self, low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, self.n)

    def set(self, bone: str, rotation: Rotation) -> None:
        self.pose[:, self.index[bone]] = rotation.as_rotvec()

    def leg(self, side: str, flex: np.ndarray, abduct: np.ndarray, knee: np.ndarray, toes_down: np.ndarray) -> None:
        """Hip flexion/abduction, knee flexion and the foot angle relative to level."""
        sign = 1.0 if side == "L" else -1.0
        twist = self.u(-8, 8)
        hip = _axis_rot(-_X, flex) * _axis_rot(sign * _Z, abduct) * _axis_rot(sign * _Y, twist)
        self.set(f"upperleg01.{side}", hip)
        self.set(f"lowerleg01.{side}", _axis_rot(_X, knee))
        # Flat foot when toes_down = 0: undo the thigh and shank pitch.
        self.set(f"foot.{side}", _axis_rot(_X, flex - knee + toes_down))

    def arm(self, side: str, abduct: np.ndarray, flex: np.ndarray, elbow: np.ndarray, twist: np.ndarray) -> None:
        sign = 1.0 if side == "L" else -1.0
        arm_dir = self.arm_rest.upper_dir * np.array([sign, 1.0, 1.0])
        shoulder = _axis_rot(-_X, flex) * _axis_rot(sign * _Z, abduct) * _axis_rot(arm_dir, sign * twist)
        self.set(f"upperarm01.{side}", shoulder)
        hinge = self.arm_rest.hinge * np.array([1.0, sign, sign])  # a rotation axis mirrors as a pseudovector
        self.set(f"lowerarm01.{side}", _axis_rot(hinge, elbow - self.arm_rest.rest_flexion))
        self.set(f"wrist.{side}", _axis_rot(_X, self.u(-15, 15)) * _axis_rot(_Z, self.u(-10, 10)))

    def spine(self, flex: np.ndarray, lateral: np.ndarray, twist: np.ndarray) -> None:
        share = 1.0 / len(_SPINE_BONES)
        rot = _axis_rot(_X, flex * share) * _axis_rot(_Z, lateral * share) * _axis_rot(_Y, twist * share)
        for bone in _SPINE_BONES:
            self.set(bone, rot)

    def neck(self, flex: np.ndarray, turn: np.ndarray) -> None:
        self.set("neck01", _axis_rot(_X, flex * 0.5) * _axis_rot(_Y, turn * 0.5))
        self.set("head", _axis_rot(_X, flex * 0.5) * _axis_rot(_Y, turn * 0.5) * _axis_rot(_Z, self.u(-8, 8)))

    def standing_legs(self) -> None:
        for side in ("L", "R"):
            self.leg(side, self.u(-5, 12), self.u(0, 10), self.u(0, 15), self.u(-5, 5))

    def relaxed_arm(self, side: str) -> None:
        self.arm(side, self.u(-45, -20), self.u(-10, 20), self.u(5, 35), self.u(-20, 20))


def _stand(b: _PoseBuilder) -> None:
    b.standing_legs()
    b.relaxed_arm("L")
    b.relaxed_arm("R")
    b.spine(b.u(-5, 10), b.u(-6, 6), b.u(-15, 15))
    b.neck(b.u(-10, 20), b.u(-35, 35))


def _walk(b: _PoseBuilder) -> None:
    phase = b.u(-1, 1)  # +1: left leg forward
    stride = b.u(15, 30)
    left, right = stride * phase, -stride * phase
    # The trailing leg (negative flexion) bends its knee more, the leading one lands straight.
    b.leg("L", left, b.u(0, 5), np.where(left < 0, b.u(10, 35), b.u(0, 12)), b.u(-5, 10))
    b.leg("R", right, b.u(0, 5), np.where(right < 0, b.u(10, 35), b.u(0, 12)), b.u(-5, 10))
    swing = b.u(15, 35)
    b.arm("L", b.u(-45, -32), -swing * phase, b.u(15, 50), b.u(-10, 10))
    b.arm("R", b.u(-45, -32), swing * phase, b.u(15, 50), b.u(-10, 10))
    b.spine(b.u(0, 10), b.u(-4, 4), 8 * phase)
    b.neck(b.u(-5, 15), b.u(-20, 20))


def _reach(b: _PoseBuilder) -> None:
    b.standing_legs()
    for side in ("L", "R"):
        b.arm(side, b.u(95, 135), b.u(-10, 35), b.u(0, 35), b.u(-20, 20))
    b.spine(b.u(-15, 0), b.u(-8, 8), b.u(-10, 10))
    b.neck(b.u(-30, 0), b.u(-20, 20))


def _squat(b: _PoseBuilder) -> None:
    depth = b.u(0.0, 1.0)
    for side in ("L", "R"):
        flex = 60 + 45 * depth + b.u(-5, 5)
        b.leg(side, flex, b.u(10, 25), 70 + 55 * depth + b.u(-5, 5), b.u(-5, 5))
        b.arm(side, b.u(-45, -35), b.u(55, 95), b.u(5, 45), b.u(-15, 15))
    b.spine(b.u(15, 35), b.u(-5, 5), b.u(-8, 8))
    b.neck(b.u(-25, 0), b.u(-20, 20))


def _kick(b: _PoseBuilder) -> None:
    """Left leg kicks (mirrored for half of the samples by the caller)."""
    b.leg("L", b.u(45, 95), b.u(0, 15), b.u(0, 45), b.u(10, 35))
    b.leg("R", b.u(-10, 5), b.u(0, 10), b.u(0, 15), b.u(-5, 5))
    for side in ("L", "R"):
        b.arm(side, b.u(5, 50), b.u(-25, 25), b.u(20, 70), b.u(-20, 20))
    b.spine(b.u(-20, -5), b.u(-8, 8), b.u(-15, 15))
    b.neck(b.u(0, 25), b.u(-15, 15))


def _wave(b: _PoseBuilder) -> None:
    """Left hand waves (mirrored for half of the samples by the caller)."""
    b.standing_legs()
    b.arm("L", b.u(30, 70), b.u(-10, 25), b.u(85, 130), b.u(-100, -70))
    b.relaxed_arm("R")
    b.spine(b.u(-5, 8), b.u(-10, 3), b.u(-15, 15))
    b.neck(b.u(-10, 15), b.u(-10, 45))


_ACTION_BUILDERS: dict[str, tuple[Callable[[_PoseBuilder], None], bool]] = {
    # action: (builder, one-sided: mirror half of the samples)
    "stand": (_stand, False),
    "walk": (_walk, False),
    "reach": (_reach, False),
    "squat": (_squat, False),
    "kick": (_kick, True),
    "wave": (_wave, True),
}


def sample_action_pose(
    n: int, generator: np.random.Generator, action: str, bone_labels: tuple[str, ...], arm_rest: ArmRest
) -> np.ndarray:
    """(n, len(bone_labels), 3) float32 axis-angle poses of one action family, root at zero.

    ``arm_rest`` describes the left arm of the rest skeleton (the elbow angles are absolute)."""
    if action not in _ACTION_BUILDERS:
        raise ValueError(f"unknown action {action!r}; the anny pose sampler knows {list(_ACTION_BUILDERS)}")
    build, one_sided = _ACTION_BUILDERS[action]
    builder = _PoseBuilder(n, generator, bone_labels, arm_rest)
    build(builder)
    pose = builder.pose
    if one_sided:
        mirrored = generator.random(n) < 0.5
        pose[mirrored] = flip_pose(pose[mirrored], bone_labels)
    return pose.astype(np.float32)


class AnnyBodyModel(BodyModel):
    """Anny as a pchmr :class:`~pchmr.core.contracts.bodymodel.BodyModel` (see the module docstring).

    The wrapped Anny module is shared by every instance of the process and is deliberately not
    a submodule: it stays on its own device and dtype (CPU, float32), adds nothing to
    ``state_dict()``, and ``forward`` moves inputs to it and results back to the pose's device.
    """

    def __init__(self, anny_model: torch.nn.Module, pyramid_cache_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.name = "anny"
        self.shape_param = "phenotype"
        self._anny_ref = (anny_model,)  # a tuple hides it from nn.Module's registration
        self.bone_labels: tuple[str, ...] = tuple(anny_model.bone_labels)
        if len(self.bone_labels) != NUM_BONES:
            raise ValueError(f"expected Anny's default rig with {NUM_BONES} bones, got {len(self.bone_labels)}")
        self.param_shapes = {"pose": (NUM_BONES, 3), "phenotype": (len(PHENOTYPE_NAMES),)}
        self.joint_names = JOINT_NAMES
        self.root_joints = ROOT_JOINTS
        self.flip_permutation = tuple(JOINT_NAMES.index(_mirror_name(n)) for n in JOINT_NAMES)
        self.pyramid_cache_dir = Path(pyramid_cache_dir or DEFAULT_PYRAMID_CACHE).expanduser()
        self._pyramid: MeshPyramid | None = None

        faces = torch.as_tensor(anny_model.faces, dtype=torch.int64)
        if faces.ndim != 2 or faces.shape[1] != 3:
            faces = anny_model.get_triangular_faces()
        self.register_buffer("faces", faces.clone(), persistent=False)
        weights, labels = _coco_regressor(anny_model)
        self.register_buffer("joint_regressor", build_joint_regressor(weights, labels), persistent=False)
        self._rest_vertices: np.ndarray | None = None

    # ----------------------------------------------------------------- forward and joints
    def forward(self, **params: Tensor) -> BodyOutput:
        """``pose`` (B, 104, 3) radians and optional ``phenotype`` (B, 6) in [0, 1] →
        vertices (B, 13718, 3) and joints (B, 14, 3), float32 metres, body frame (y up)."""
        unknown = sorted(set(params) - set(self.param_shapes))
        if unknown:
            raise TypeError(
                f"AnnyBodyModel.forward got unknown parameters {unknown}; it takes {sorted(self.param_shapes)}"
            )
        if "pose" not in params:
            raise TypeError("AnnyBodyModel.forward needs 'pose' (B, 104, 3) axis-angle radians")
        pose = params["pose"]
        if pose.ndim != 3 or tuple(pose.shape[1:]) != self.param_shapes["pose"]:
            raise ValueError(f"'pose' must be (B, {NUM_BONES}, 3) axis-angle, got {tuple(pose.shape)}")
        batch = pose.shape[0]
        phenotype = params.get("phenotype")
        if phenotype is None:
            phenotype = pose.new_full((batch, len(PHENOTYPE_NAMES)), 0.5)
        if tuple(phenotype.shape) != (batch, len(PHENOTYPE_NAMES)):
            raise ValueError(
                f"'phenotype' must be ({batch}, {len(PHENOTYPE_NAMES)}) {PHENOTYPE_NAMES}, got {tuple(phenotype.shape)}"
            )

        anny = self.anny
        dtype, device = anny.template_vertices.dtype, anny.template_vertices.device
        conv = torch.as_tensor(ANNY_TO_BODY, dtype=dtype, device=device)
        # A rotation R in body axes acts on Anny vectors as C^T R C: its axis is C^T w.
        rotvec = pose.to(device=device, dtype=dtype) @ conv
        delta = torch.zeros(batch, NUM_BONES, 4, 4, dtype=dtype, device=device)
        delta[..., :3, :3] = axis_angle_to_matrix(rotvec)
        delta[..., 3, 3] = 1.0
        out = anny(pose_parameters=delta, phenotype_kwargs=phenotype.to(device=device, dtype=dtype))
        vertices = (out["vertices"] @ conv.T).to(device=pose.device, dtype=torch.float32)
        return BodyOutput(vertices=vertices, joints=self.joints_from_vertices(vertices))

    @property
    def anny(self) -> torch.nn.Module:
        """The wrapped (shared, unregistered) ``anny.Anny`` module."""
        return self._anny_ref[0]

    def joints_from_vertices(self, vertices: Tensor) -> Tensor:
        """(B, V, 3) → (B, 14, 3), one fixed linear combination of the vertices per joint."""
        return torch.einsum("jv,bvc->bjc", self.joint_regressor.to(vertices.dtype), vertices)

    # ------------------------------------------------------------------- rest mesh, pyramid
    def rest_vertices(self) -> np.ndarray:
        """(V, 3) float32 vertices of the zero pose with phenotype 0.5, body frame, metres."""
        if self._rest_vertices is None:
            with torch.no_grad():
                pose = torch.zeros(1, NUM_BONES, 3, device=self.faces.device)
                self._rest_vertices = self.forward(pose=pose).vertices[0].cpu().numpy()
        return self._rest_vertices

    def pyramid(self) -> MeshPyramid:
        """Coarse (431) / middle (1723) / full (13718) levels, cached on disk per topology."""
        if self._pyramid is None:
            from pchmr.core.kit.pyramid import cached_pyramid

            faces = self.faces.cpu().numpy()
            self._pyramid = cached_pyramid(self.rest_vertices(), faces, self.pyramid_cache_dir)
        return self._pyramid

    # --------------------------------------------------------------- synthetic-data support
    def vertex_parts(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """(V,) int64 index into :data:`PART_NAMES` of each vertex's dominant skinning bone,
        and the part names."""
        weights = self.anny.vertex_bone_weights.cpu()
        indices = self.anny.vertex_bone_indices.cpu()
        dominant = torch.gather(indices, 1, weights.argmax(dim=1, keepdim=True))[:, 0].numpy()
        bone_to_part = np.array([PART_NAMES.index(bone_part(b)) for b in self.bone_labels], dtype=np.int64)
        return bone_to_part[dominant], PART_NAMES

    @property
    def actions(self) -> tuple[str, ...]:
        return ACTIONS

    def sample_shape(self, n: int, generator: np.random.Generator) -> np.ndarray:
        """(n, 6) float32 phenotypes of varied adults (both genders, age 0.6–1)."""
        low = np.array([0.0, 0.6, 0.1, 0.1, 0.1, 0.1])
        high = np.array([1.0, 1.0, 0.9, 0.9, 0.9, 0.9])
        return (low + (high - low) * generator.random((n, len(PHENOTYPE_NAMES)))).astype(np.float32)

    def sample_pose(self, n: int, generator: np.random.Generator, action: str) -> np.ndarray:
        """(n, 104, 3) float32 axis-angle poses of one action family (see :data:`ACTIONS`), with
        the root left at identity (the caller sets the global orientation)."""
        heads = self.anny.template_bone_heads.detach().cpu().double().numpy() @ ANNY_TO_BODY.T
        index = {label: i for i, label in enumerate(self.bone_labels)}
        arm_rest = ArmRest.from_points(*(heads[index[b]] for b in ("upperarm01.L", "lowerarm01.L", "wrist.L")))
        return sample_action_pose(n, generator, action, self.bone_labels, arm_rest)

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info.update(root="mid-hip", joint_source="anny COCO regressor (neck = mean shoulders, head = mean ears)")
        return info


def _mirror_name(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[5:]
    if name.startswith("right_"):
        return "left_" + name[6:]
    return name


def make_anny(spec: BodyModelSpec | None = None) -> AnnyBodyModel:
    """The factory registered as ``anny``: the process-wide cached Anny (float32) wrapped with
    pchmr's frame; the pyramid cache goes to ``spec.cache_dir`` or ``~/.cache/pchmr/pyramids``."""
    spec = spec or BodyModelSpec()
    read_options(NoOptions, spec.extra, plugin="anny", kind="body_model")
    return AnnyBodyModel(_build_anny(torch.float32), pyramid_cache_dir=spec.cache_dir)


make_anny.options = NoOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_body_models() -> Mapping[str, Callable[[BodyModelSpec], AnnyBodyModel]]:
    return {"anny": make_anny}
