"""Joint sets of the HMR datasets, the mappings between them, and the evaluation protocols.

Every joint set is a tuple of *canonical* names: two sets share a name exactly when the
community's converters treat the joints as the same point. The canonical names of the
evaluation joints are those of the body models' LSP-14 set (:data:`LSP_14`):
``right_ankle … left_wrist, neck, head`` where ``neck`` is LSP's neck (Human3.6M's thorax,
MPII's upper neck) and ``head`` the top of the head.

===============  ====  ===================================================================
set              J     where it comes from
===============  ====  ===================================================================
``lsp-14``       14    the evaluation joints of pchmr's body models (Anny, SMPL)
``j24``          24    SPIN/GraphCMR/METRO's ground-truth superset (``part``, ``S``,
                       METRO ``2d_joints``/``3d_joints``); Human3.6M's head top is stored at
                       J24 18 (``Head (H36M)``), LSP's at J24 13 — both are ``head`` here,
                       J24 13 as the fallback ``head_lsp``
``h36m-17``      17    Human3.6M's joints in its own order (pelvis, right leg, left leg,
                       spine, thorax, neck/nose, head top, left arm, right arm); METRO's
                       ``J_regressor_h36m_correct.npy`` rows
``coco-17``      17    COCO person keypoints
``openpose-25``  25    OpenPose BODY_25 (its neck, mid-hip and hips are named ``op_*``:
                       they are not LSP's)
``openpose-18``  18    OpenPose COCO-18 (3DPW's ``poses2d``)
``mpii-16``      16    MPII Human Pose
``smpl-24``      24    SMPL's kinematic joints (3DPW ``jointPositions``); hips, neck and head
                       are ``smpl_*`` (inside the body, not LSP's)
===============  ====  ===================================================================

:func:`remap` converts (N, J_src, C) points whose last column is a confidence into another
set; a target joint takes the first of its candidates (:data:`FALLBACKS`) that the sample
marks valid, and gets confidence 0 when none is.

Protocols (:data:`PROTOCOLS`, :func:`get_protocol`): ``spin`` (SPIN/GraphCMR: LSP-14 from the
Human3.6M regressor, root-aligned at Human3.6M's pelvis, gendered GT meshes for 3DPW) and
``metro`` (METRO/FastMETRO: LSP-14 from the Human3.6M regressor, root-aligned at the mid-hip,
neutral GT meshes unless the annotation is gendered). :meth:`EvalProtocol.align` applies one to
(B, 17, 3) Human3.6M joints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "COCO_17",
    "EvalProtocol",
    "FALLBACKS",
    "H36M_17",
    "J24",
    "JOINT_SETS",
    "LSP_14",
    "MPII_16",
    "OPENPOSE_18",
    "OPENPOSE_25",
    "PROTOCOLS",
    "SMPL_24",
    "JointSetError",
    "candidate_indices",
    "get_joint_set",
    "get_protocol",
    "remap",
    "root_relative",
]


class JointSetError(ValueError):
    """An unknown joint set or protocol, or points whose shape does not fit their set."""


LSP_14 = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    "neck", "head",
)  # fmt: skip
J24 = LSP_14[:13] + (
    "head_lsp", "pelvis", "thorax", "spine", "jaw", "head",
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
)  # fmt: skip
H36M_17 = (
    "pelvis", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "spine", "neck", "jaw", "head",
    "left_shoulder", "left_elbow", "left_wrist", "right_shoulder", "right_elbow", "right_wrist",
)  # fmt: skip
COCO_17 = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
OPENPOSE_25 = (
    "nose", "op_neck", "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist", "op_mid_hip",
    "op_right_hip", "right_knee", "right_ankle", "op_left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
    "left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel",
)  # fmt: skip
MPII_16 = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "pelvis", "thorax", "neck", "head_lsp",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
)  # fmt: skip
OPENPOSE_18 = (
    "nose", "op_neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "op_right_hip", "right_knee", "right_ankle", "op_left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
SMPL_24 = (
    "smpl_pelvis", "smpl_left_hip", "smpl_right_hip", "smpl_spine1", "left_knee", "right_knee",
    "smpl_spine2", "left_ankle", "right_ankle", "smpl_spine3", "smpl_left_foot", "smpl_right_foot",
    "smpl_neck", "smpl_left_collar", "smpl_right_collar", "smpl_head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "smpl_left_hand", "smpl_right_hand",
)  # fmt: skip

JOINT_SETS: Mapping[str, tuple[str, ...]] = {
    "lsp-14": LSP_14,
    "j24": J24,
    "h36m-17": H36M_17,
    "coco-17": COCO_17,
    "openpose-25": OPENPOSE_25,
    "openpose-18": OPENPOSE_18,
    "mpii-16": MPII_16,
    "smpl-24": SMPL_24,
}

#: Stand-ins tried, in order, when a set lacks a joint or a sample marks it invalid. LSP's head
#: top for Human3.6M's; SMPL's kinematic hips/neck/head (inside the body: an approximation a
#: protocol names) so that 3DPW's joints have a root; OpenPose's hips and neck for 2D keypoints.
FALLBACKS: Mapping[str, tuple[str, ...]] = {
    "head": ("head_lsp", "smpl_head"),
    "neck": ("smpl_neck", "op_neck"),
    "left_hip": ("smpl_left_hip", "op_left_hip"),
    "right_hip": ("smpl_right_hip", "op_right_hip"),
}

#: The root of the LSP-14 set (mid-hip), as the body models define it.
MID_HIP = ("left_hip", "right_hip")


def get_joint_set(name: str) -> tuple[str, ...]:
    """The joint names of set ``name`` (a key of :data:`JOINT_SETS`)."""
    try:
        return JOINT_SETS[name]
    except KeyError:
        raise JointSetError(f"no joint set named {name!r}; known sets: {', '.join(JOINT_SETS)}") from None


def _names(source: str | Sequence[str]) -> tuple[str, ...]:
    return get_joint_set(source) if isinstance(source, str) else tuple(source)


def candidate_indices(source: str | Sequence[str], target: Sequence[str]) -> list[tuple[int, ...]]:
    """For each target name, the indices in ``source`` of the joint and its fallbacks, in order
    (empty when ``source`` has none of them)."""
    src = _names(source)
    position = {name: i for i, name in enumerate(src)}
    out = []
    for name in target:
        options = (name, *FALLBACKS.get(name, ()))
        out.append(tuple(position[o] for o in options if o in position))
    return out


def remap(points: np.ndarray, source: str | Sequence[str], target: Sequence[str]) -> np.ndarray:
    """(N, J_src, C) points, last column a confidence, → (N, J_target, C) in ``target`` order.

    Each target joint takes its first candidate (the joint itself, then :data:`FALLBACKS`) whose
    confidence is > 0 in that sample; a joint with no valid candidate is all zeros (confidence 0).
    """
    src = _names(source)
    pts = np.asarray(points)
    if pts.ndim != 3 or pts.shape[1] != len(src) or pts.shape[2] < 2:
        raise JointSetError(
            f"points must be (N, {len(src)}, C>=2) for a {len(src)}-joint set, got {tuple(pts.shape)}"
        )
    out = np.zeros((pts.shape[0], len(target), pts.shape[2]), dtype=pts.dtype)
    for j, candidates in enumerate(candidate_indices(src, target)):
        filled = np.zeros(pts.shape[0], dtype=bool)
        for i in candidates:
            take = ~filled & (pts[:, i, -1] > 0)
            out[take, j] = pts[take, i]
            filled |= take
    return out


def root_relative(joints: np.ndarray, names: Sequence[str], root: Sequence[str] = MID_HIP) -> np.ndarray:
    """(N, J, 4) joints (xyz + validity) → the same with the mean of ``root`` subtracted.

    A sample whose root joints are not all valid has no usable root: all its joints get
    validity 0 (and coordinates 0)."""
    j = np.asarray(joints, dtype=np.float64)
    if j.ndim != 3 or j.shape[1] != len(names) or j.shape[2] != 4:
        raise JointSetError(f"joints must be (N, {len(names)}, 4), got {tuple(j.shape)}")
    idx = [list(names).index(r) for r in root]
    ok = (j[:, idx, 3] > 0).all(axis=1)
    centre = j[:, idx, :3].mean(axis=1, keepdims=True)
    out = j.copy()
    out[:, :, :3] -= centre
    out[~ok] = 0.0
    out[:, :, :3] *= out[:, :, 3:] > 0
    return out


@dataclass(frozen=True)
class EvalProtocol:
    """How GT and predicted joints are made comparable; written next to every number.

    ``alignment`` is ``pelvis`` (Human3.6M joint 0) or ``mid-hip`` (mean of the LSP hips);
    ``gt_mesh`` is ``gendered`` (3DPW's male/female SMPL) or ``neutral``.
    """

    name: str
    joints: str = "lsp-14"
    regressor: str = "h36m-17"
    alignment: str = "mid-hip"
    gt_mesh: str = "neutral"
    reference: str = ""

    def describe(self) -> dict[str, str]:
        return asdict(self)

    def align(self, h36m_joints: np.ndarray) -> np.ndarray:
        """(B, 17, 3) Human3.6M joints (regressed from a mesh) → (B, 14, 3) LSP-14 joints
        root-aligned as this protocol says."""
        j = np.asarray(h36m_joints, dtype=np.float64)
        if j.ndim != 3 or j.shape[1:] != (len(H36M_17), 3):
            raise JointSetError(f"Human3.6M joints must be (B, 17, 3), got {tuple(j.shape)}")
        lsp = j[:, [H36M_17.index(n) for n in LSP_14]]
        if self.alignment == "pelvis":
            root = j[:, [H36M_17.index("pelvis")]]
        else:
            root = lsp[:, [LSP_14.index(n) for n in MID_HIP]].mean(axis=1, keepdims=True)
        return lsp - root


PROTOCOLS: Mapping[str, EvalProtocol] = {
    "spin": EvalProtocol(
        "spin", alignment="pelvis", gt_mesh="gendered",
        reference="Kolotouros et al. 2019 (SPIN) eval: H36M regressor, LSP-14, pelvis-aligned, gendered 3DPW meshes",
    ),
    "metro": EvalProtocol(
        "metro", alignment="mid-hip", gt_mesh="neutral",
        reference="Lin et al. 2021 (METRO) / Cho et al. 2022 (FastMETRO) eval: H36M regressor, LSP-14, mid-hip aligned",
    ),
}  # fmt: skip


def get_protocol(name: str) -> EvalProtocol:
    """The protocol called ``name`` (``spin`` or ``metro``)."""
    try:
        return PROTOCOLS[name.lower()]
    except KeyError:
        raise JointSetError(f"no evaluation protocol named {name!r}; known: {', '.join(PROTOCOLS)}") from None
