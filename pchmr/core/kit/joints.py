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

Protocols (:data:`PROTOCOLS`, :func:`get_protocol`), as the released evaluation code does it:

* ``spin`` (SPIN/GraphCMR ``eval.py``): LSP-14 from the Human3.6M regressor, prediction and GT
  each root-aligned at their own Human3.6M pelvis (H36M joint 0: regressed from the mesh, or
  J24 index 14 of ``S``), gendered GT meshes for 3DPW;
* ``metro`` (METRO ``run_metro_bodymesh.py`` / FastMETRO ``run_fastmetro_bodymesh.py``
  ``run_validate``): the same pelvis alignment (GT joints at J24's pelvis, predictions at the
  regressed pelvis, vertices at the meshes' regressed pelvis), neutral GT meshes;
* ``mid-hip``: pchmr's own, any body model: both sides at the mean of the body model's hips.

:meth:`EvalProtocol.align` applies one to (B, 17, 3) Human3.6M joints. :func:`apply_protocol`
says what an evaluation with a given body model really applies: a pelvis protocol needs the
Human3.6M regressor's pelvis row (``BodyModel.pelvis_regressor``); without it the evaluation is
mid-hip aligned and the record says so (with a warning, once).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "ALIGNMENTS",
    "COCO_17",
    "FALLBACKS",
    "H36M_17",
    "H36M_REGRESSOR",
    "J24",
    "J24_PELVIS",
    "JOINT_SETS",
    "LSP_14",
    "MPII_16",
    "OPENPOSE_18",
    "OPENPOSE_25",
    "PROTOCOLS",
    "SMPL_24",
    "AppliedProtocol",
    "EvalProtocol",
    "JointSetError",
    "ProtocolFallbackWarning",
    "apply_protocol",
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
J24 = (
    *LSP_14[:13],
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
#: Where Human3.6M's pelvis (H36M joint 0) is stored in SPIN's ``S`` and METRO's ``3d_joints``.
J24_PELVIS = J24.index("pelvis")
#: The root alignments an evaluation can apply.
ALIGNMENTS = ("pelvis", "mid-hip")
#: How a record names the Human3.6M regressor (the evaluation joints and the pelvis come from it).
H36M_REGRESSOR = "h36m-17"


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
        raise JointSetError(f"points must be (N, {len(src)}, C>=2) for a {len(src)}-joint set, got {tuple(pts.shape)}")
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


class ProtocolFallbackWarning(UserWarning):
    """A protocol asks for an alignment the run's body model cannot give (e.g. the pelvis
    without a Human3.6M regressor); the evaluation falls back, and its record says so."""


@dataclass(frozen=True)
class EvalProtocol:
    """How GT and predicted joints are made comparable; written next to every number.

    ``alignment`` is ``pelvis`` (Human3.6M joint 0) or ``mid-hip`` (mean of the LSP hips);
    ``gt_mesh`` is ``gendered`` (3DPW's male/female SMPL) or ``neutral``; ``regressor`` is where
    the evaluation joints come from (``h36m-17`` or ``body model``: its own joint regressor).
    """

    name: str
    joints: str = "lsp-14"
    regressor: str = H36M_REGRESSOR
    alignment: str = "mid-hip"
    gt_mesh: str = "neutral"
    reference: str = ""

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise JointSetError(
                f"protocol {self.name!r}: alignment must be one of {ALIGNMENTS}, got {self.alignment!r}"
            )

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
        reference="Kolotouros et al. 2019 (SPIN) eval.py: H36M regressor, LSP-14, pelvis-aligned, gendered 3DPW meshes",
    ),
    "metro": EvalProtocol(
        "metro", alignment="pelvis", gt_mesh="neutral",
        reference="Lin et al. 2021 (METRO) / Cho et al. 2022 (FastMETRO) run_validate: H36M regressor, LSP-14, "
                  "pelvis-aligned (GT joints at J24's pelvis), neutral GT meshes aligned at their regressed pelvis",
    ),
    "mid-hip": EvalProtocol(
        "mid-hip", regressor="body model", alignment="mid-hip", gt_mesh="neutral",
        reference="pchmr: the body model's own joints, both sides at the mean of its hips (any body model)",
    ),
}  # fmt: skip


def get_protocol(name: str) -> EvalProtocol:
    """The protocol called ``name`` (``spin``, ``metro`` or ``mid-hip``)."""
    try:
        return PROTOCOLS[name.lower()]
    except KeyError:
        raise JointSetError(f"no evaluation protocol named {name!r}; known: {', '.join(PROTOCOLS)}") from None


@dataclass(frozen=True)
class AppliedProtocol:
    """What an evaluation with one body model actually applies (:func:`apply_protocol`).

    ``name`` is the dataset's protocol (empty for a dataset without one, e.g. synthetic);
    ``requested``/``alignment`` the alignment it asks and the one applied; ``regressor`` where
    the evaluation joints come from; ``gt_mesh`` the GT mesh kind (``gendered``, ``neutral``,
    ``none`` or empty when unknown); ``note`` why the two alignments differ, or which test
    samples fall back to the mid-hip.
    """

    name: str
    requested: str
    alignment: str
    regressor: str
    gt_mesh: str = ""
    note: str = ""

    def alignment_text(self) -> str:
        """``pelvis``, ``mid-hip``, or either with its note in parentheses."""
        return f"{self.alignment} ({self.note})" if self.note else self.alignment


_WARNED: set[tuple[str, str]] = set()


def _joint_source(body_model: Any) -> str:
    source = getattr(body_model, "joint_source", None)
    if not source and callable(getattr(body_model, "describe", None)):
        source = body_model.describe().get("joint_source")
    return str(source or f"{body_model.name} joint regressor")


def apply_protocol(protocol: Mapping[str, object], body_model: Any, *, warn: bool = True) -> AppliedProtocol:
    """The alignment an evaluation of data described by ``protocol`` (an ``HMRData.protocol``:
    ``protocol`` = a name of :data:`PROTOCOLS`, optional ``gt_mesh``, ``test_without_pelvis`` and
    ``test_with_3d``) applies with ``body_model``.

    A pelvis protocol needs ``body_model.pelvis_regressor`` (the Human3.6M regressor's pelvis
    row); without it the evaluation is mid-hip aligned, the note says why, and a
    :class:`ProtocolFallbackWarning` is issued once per (protocol, body model)."""
    name = str(protocol.get("protocol") or "")
    requested = get_protocol(name).alignment if name else "mid-hip"
    has_pelvis = getattr(body_model, "pelvis_regressor", None) is not None
    regressor = H36M_REGRESSOR if has_pelvis else _joint_source(body_model)
    gt_mesh = str(protocol.get("gt_mesh") or "")
    if requested == "pelvis" and not has_pelvis:
        note = f"{name} asks pelvis; {body_model.name} has no Human3.6M regressor"
        if warn and (name, body_model.name) not in _WARNED:
            _WARNED.add((name, body_model.name))
            warnings.warn(
                f"evaluation protocol '{name}' aligns at Human3.6M's pelvis but body model '{body_model.name}' has "
                "no Human3.6M regressor (SMPL with J_regressor_h36m.npy in --smpl-dir has one): numbers are "
                "mid-hip aligned and recorded as such",
                ProtocolFallbackWarning,
                stacklevel=2,
            )
        return AppliedProtocol(name, requested, "mid-hip", regressor, gt_mesh, note)
    note = ""
    missing = int(protocol.get("test_without_pelvis") or 0)
    if requested == "pelvis" and missing:
        total = protocol.get("test_with_3d", "?")
        note = f"{missing} of {total} test samples have no GT pelvis: mid-hip for those"
    return AppliedProtocol(name, requested, requested, regressor, gt_mesh, note)
