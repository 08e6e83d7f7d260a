"""The ``smpl`` body model: SMPL (Loper et al. 2015) through ``smplx``, from the user's own files.

SMPL's model files are licence-restricted: pchmr never ships them. Register at
https://smpl.is.tue.mpg.de, download "SMPL for Python" and pass the folder holding the ``.pkl``
files as ``BodyModelSpec.model_dir`` (``--smpl-dir``). Accepted names, per gender, are listed in
:data:`MODEL_FILE_NAMES` (smplx's ``SMPL_NEUTRAL.pkl`` and SMPL's own
``basicmodel_*_lbs_10_207_0_v1.*.pkl``; case-insensitive), in the folder itself or in its
``smpl/`` subfolder (smplx's layout). Optional files in the same place:

* ``J_regressor_h36m.npy`` (17, 6890), the Human3.6M joint regressor of SPIN/GraphCMR/METRO:
  when present the evaluation joints come from it (the protocol of the FastMETRO paper) and its
  pelvis row (H36M joint 0) is exposed as ``pelvis_regressor`` for pelvis-aligned protocols;
* ``mesh_downsampling.npz``, GraphCMR's SMPL pyramid (6890 → 1723 → 431, the file FastMETRO
  ships): when present it is the mesh pyramid, its matrices used as they are (its upsampling
  rows sum to 0.83–1.05: :func:`pchmr.core.kit.pyramid.load_graphcmr_downsampling`), else pchmr
  builds and caches its own (:func:`pchmr.core.kit.pyramid.cached_pyramid`).

The pickles are read without chumpy: chumpy ``Ch`` arrays (SMPL v1.0.0 files) are replaced by
their values while unpickling, so chumpy need not (and on NumPy 2 cannot) be installed. Nothing
else is allowed to load (:data:`SMPL_PICKLE`: NumPy arrays, SciPy sparse matrices, plain
containers): a model file naming any other class or function is refused before it runs, and
smplx is handed the values, never the file.

Frame. SMPL's template is in metres, y up, the body facing +z, its left side at +x (SMPL's left
hip, joint 1, has x > 0) — already pchmr's body frame (:mod:`pchmr.core.contracts.bodymodel`), so
:data:`SMPL_TO_BODY` is the identity and vertices pass through unchanged.

Parameters (``param_shapes``), axis-angle in radians, SMPL's own convention:

* ``global_orient`` (B, 3): rotation of the pelvis about SMPL's root joint;
* ``body_pose`` (B, 69): 23 joints × 3, SMPL's joint order (left hip, right hip, spine1, ...);
* ``betas`` (B, 10): shape coefficients (zeros when omitted).

Evaluation joints (J = 14, LSP order, :data:`JOINT_NAMES`) are a (14, 6890) linear regressor
(``joint_regressor``, rows sum to 1):

* with ``J_regressor_h36m.npy``: Human3.6M joints 3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10
  (the 12 limb joints, thorax as ``neck``, head top as ``head``), as METRO/FastMETRO evaluate;
* without it: rows of SMPL's own ``J_regressor`` (24 joints): the 12 limb joints map to SMPL's,
  ``neck`` is SMPL joint 12 (neck) and ``head`` is SMPL joint 15 (head), which sits inside the
  skull, several centimetres below LSP's head top: an approximation, reported by
  :meth:`SMPLBodyModel.describe` so numbers computed with it are not mistaken for H36M-protocol ones.

The root (:meth:`BodyModel.root`) is the mid-hip of the evaluation joints. Options in
``BodyModelSpec.extra``: ``gender`` (neutral/male/female, default neutral), ``joints``
(auto/h36m/smpl) and ``pyramid`` (auto/graphcmr/qem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from pchmr.core.contracts.bodymodel import (
    BodyModel,
    BodyModelSpec,
    BodyOutput,
    MeshPyramid,
)
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.kit.safe_pickle import SPARSE_PICKLE, UnsafeFileError, safe_load

__all__ = [
    "GENDERS",
    "H36M_REGRESSOR_NAMES",
    "JOINT_NAMES",
    "MODEL_FILE_NAMES",
    "SMPL_PICKLE",
    "SMPL_TO_BODY",
    "SMPL_URL",
    "InvalidSMPLFileError",
    "MissingSMPLFilesError",
    "SMPLBodyModel",
    "SMPLFiles",
    "SMPLOptions",
    "check_smpl_frame",
    "find_smpl_files",
    "load_smpl_pickle",
    "lsp_regressor_from_h36m",
    "lsp_regressor_from_smpl",
    "make_smpl",
    "pchmr_body_models",
    "pelvis_regressor_from_h36m",
]

SMPL_URL = "https://smpl.is.tue.mpg.de"
GENDERS = ("neutral", "male", "female")
#: Model file names accepted per gender, in order of preference (matched case-insensitively).
MODEL_FILE_NAMES: Mapping[str, tuple[str, ...]] = {
    "neutral": (
        "SMPL_NEUTRAL.pkl",
        "basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl",
        "basicModel_neutral_lbs_10_207_0_v1.0.0.pkl",
    ),
    "male": ("SMPL_MALE.pkl", "basicmodel_m_lbs_10_207_0_v1.1.0.pkl", "basicmodel_m_lbs_10_207_0_v1.0.0.pkl"),
    "female": ("SMPL_FEMALE.pkl", "basicmodel_f_lbs_10_207_0_v1.1.0.pkl", "basicModel_f_lbs_10_207_0_v1.0.0.pkl"),
}
#: The Human3.6M regressor's names (METRO and FastMETRO ship the ``_correct`` one).
H36M_REGRESSOR_NAMES = ("J_regressor_h36m.npy", "J_regressor_h36m_correct.npy")
GRAPHCMR_DOWNSAMPLING_NAME = "mesh_downsampling.npz"
#: smplx's layout keeps SMPL's files in a ``smpl/`` subfolder of the models folder.
SMPL_SUBFOLDER = "smpl"

#: Rows: pchmr body axes in SMPL's coordinates. SMPL is already y up, facing +z, left at +x.
SMPL_TO_BODY = np.eye(3)
#: SMPL joints that :func:`check_smpl_frame` compares: hips, ankles, feet (ball of the foot), head.
SMPL_L_HIP, SMPL_R_HIP, SMPL_L_ANKLE, SMPL_R_ANKLE, SMPL_L_FOOT, SMPL_R_FOOT, SMPL_HEAD = 1, 2, 7, 8, 10, 11, 15
#: The head joint must be at least this far (metres) above the ankles: an adult is ~1.3 m.
MIN_HEAD_ABOVE_ANKLES_M = 0.8

NUM_VERTICES = 6890
NUM_SMPL_JOINTS = 24
NUM_BODY_JOINTS = 23
NUM_BETAS = 10
NUM_H36M_JOINTS = 17
#: Human3.6M's pelvis row in its 17-joint regressor.
H36M_PELVIS = 0

#: The evaluation joint set, LSP-14 order.
JOINT_NAMES = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    "neck", "head",
)  # fmt: skip
#: Row of SMPL's 24-joint J_regressor for each evaluation joint (neck = SMPL neck, head = SMPL head).
LSP_FROM_SMPL = (8, 5, 2, 1, 4, 7, 21, 19, 17, 16, 18, 20, 12, 15)
#: Row of the 17-joint Human3.6M regressor for each evaluation joint (neck = thorax, head = head top).
LSP_FROM_H36M = (3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10)
ROOT_JOINTS = (JOINT_NAMES.index("left_hip"), JOINT_NAMES.index("right_hip"))
#: A regressor row may sum to 1 ± this before it is refused (it is then renormalised exactly).
ROW_SUM_TOLERANCE = 1e-2
DEFAULT_PYRAMID_CACHE = Path("~/.cache/pchmr/pyramids")

JOINT_SOURCES = ("auto", "h36m", "smpl")
PYRAMID_SOURCES = ("auto", "graphcmr", "qem")
#: Keys every SMPL pickle must hold (what the forward pass reads).
REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")


class MissingSMPLFilesError(FileNotFoundError):
    """SMPL's model files (or an optional file that was asked for) are not where pchmr looked.
    The message says where to obtain SMPL and which file names are accepted."""


class InvalidSMPLFileError(ValueError):
    """A file was found but is not a usable SMPL model, regressor or pyramid."""


# --------------------------------------------------------------------------- finding the files


@dataclass(frozen=True)
class SMPLFiles:
    """Where the files of one SMPL model are: the model pickle and the optional extras."""

    model: Path
    gender: str
    h36m_regressor: Path | None = None
    downsampling: Path | None = None


def _how_to_obtain() -> str:
    return (
        f"SMPL's licence forbids redistribution, so pchmr cannot ship it: register at {SMPL_URL}, "
        "download 'SMPL for Python' and pass the folder holding the .pkl files with --smpl-dir DIR "
        "(BodyModelSpec.model_dir); or use the free 'anny' body model"
    )


def _accepted(gender: str) -> str:
    return ", ".join(MODEL_FILE_NAMES[gender])


def _search_dirs(model_dir: Path) -> list[Path]:
    sub = model_dir / SMPL_SUBFOLDER
    return [model_dir, sub] if sub.is_dir() else [model_dir]


def _find_named(directories: list[Path], names: tuple[str, ...]) -> Path | None:
    """The first file (in ``names`` order, then directory order) whose name matches case-insensitively."""
    for name in names:
        for directory in directories:
            for candidate in sorted(directory.iterdir()):
                if candidate.name.lower() == name.lower() and candidate.is_file():
                    return candidate
    return None


def find_smpl_files(model_dir: str | os.PathLike[str] | None, gender: str = "neutral") -> SMPLFiles:
    """Locate the SMPL model of ``gender`` under ``model_dir`` (a folder, or the ``.pkl`` itself)
    and the optional ``J_regressor_h36m.npy`` and ``mesh_downsampling.npz`` beside it.

    Raises :class:`MissingSMPLFilesError` naming the folder, the accepted names and where to
    obtain SMPL when nothing usable is there.
    """
    if gender not in GENDERS:
        raise ValueError(f"unknown SMPL gender {gender!r}; choose one of {', '.join(GENDERS)}")
    if model_dir is None or str(model_dir) == "":
        raise MissingSMPLFilesError(
            f"the 'smpl' body model needs SMPL's model files and no folder was given; {_how_to_obtain()}. "
            f"Accepted file names for gender '{gender}': {_accepted(gender)}"
        )
    root = Path(model_dir).expanduser()
    if root.is_file():
        model, directories = root, [root.parent]
    elif root.is_dir():
        directories = _search_dirs(root)
        model = _find_named(directories, MODEL_FILE_NAMES[gender])
        if model is None:
            where = " or ".join(str(d) for d in directories)
            raise MissingSMPLFilesError(
                f"no SMPL model file for gender '{gender}' in {where}; accepted names "
                f"(case-insensitive): {_accepted(gender)}. {_how_to_obtain()}"
            )
    else:
        raise MissingSMPLFilesError(
            f"SMPL folder {root} does not exist; {_how_to_obtain()}. "
            f"Accepted file names for gender '{gender}': {_accepted(gender)}"
        )
    return SMPLFiles(
        model=model,
        gender=gender,
        h36m_regressor=_find_named(directories, H36M_REGRESSOR_NAMES),
        downsampling=_find_named(directories, (GRAPHCMR_DOWNSAMPLING_NAME,)),
    )


# --------------------------------------------------------------------------- reading the pickle


class _ChumpyValue:
    """Stands in for a chumpy object while unpickling; keeps chumpy's pickled state."""

    def __setstate__(self, state: object) -> None:
        self.state = state

    def value(self) -> np.ndarray | None:
        """The array of a plain ``chumpy.ch.Ch`` (its ``x``); None for chumpy expressions."""
        x = self.state.get("x") if isinstance(self.state, dict) else None
        if isinstance(x, _ChumpyValue):  # a Ch wrapping another Ch
            return x.value()
        return None if x is None else np.asarray(x)


#: What a SMPL model pickle may ask for: NumPy arrays, SciPy sparse matrices, plain containers, and
#: chumpy objects, which become :class:`_ChumpyValue` (holding their pickled state) without chumpy.
SMPL_PICKLE = dataclasses.replace(
    SPARSE_PICKLE,
    describes="numpy arrays, SciPy sparse matrices, chumpy arrays and plain Python containers",
    stand_ins={"chumpy": _ChumpyValue},
)


def _plain(value: object) -> object:
    """chumpy stand-ins → numpy arrays (None when not a plain array); SciPy sparse stays sparse."""
    if isinstance(value, _ChumpyValue):
        return value.value()
    return value


def load_smpl_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one SMPL model pickle into plain values (numpy arrays, SciPy sparse matrices, str).

    Python 2 pickles are decoded with ``encoding="latin1"``; chumpy objects are replaced by their
    arrays. Only :data:`SMPL_PICKLE`'s globals are allowed: a file naming any other class or
    function raises :class:`~pchmr.core.kit.safe_pickle.UnsafeFileError` before anything runs.
    smplx never opens the file: it receives these values (:func:`_build_layer`).
    Raises :class:`InvalidSMPLFileError` if the file is not a SMPL model dictionary.
    """
    path = Path(path)
    try:
        raw = safe_load(path, what="SMPL model file", allowed=SMPL_PICKLE)
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ImportError, AttributeError, ValueError, TypeError) as exc:
        raise InvalidSMPLFileError(f"{path} is not a readable SMPL model pickle: {type(exc).__name__}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidSMPLFileError(f"{path} is not a SMPL model: it holds a {type(raw).__name__}, not a dictionary")
    data = {key: _plain(value) for key, value in raw.items()}
    missing = [key for key in REQUIRED_KEYS if data.get(key) is None]
    if missing:
        raise InvalidSMPLFileError(
            f"{path} is not a SMPL model: missing or unreadable key(s) {missing}; a SMPL pickle holds "
            f"{', '.join(REQUIRED_KEYS)}"
        )
    _check_layout(path, data)
    check_smpl_frame(path, data)
    return data


def _dense(value: object) -> np.ndarray:
    return np.asarray(value.toarray() if sp.issparse(value) else value)


def _check_layout(path: Path, data: dict[str, Any]) -> None:
    """Shapes of the keys the forward pass reads, with SMPL's expected ones in the message."""
    expected = {
        "v_template": (NUM_VERTICES, 3),
        "shapedirs": (NUM_VERTICES, 3, None),
        "posedirs": (NUM_VERTICES, 3, 9 * NUM_BODY_JOINTS),
        "J_regressor": (NUM_SMPL_JOINTS, NUM_VERTICES),
        "weights": (NUM_VERTICES, NUM_SMPL_JOINTS),
        "kintree_table": (2, NUM_SMPL_JOINTS),
        "f": (None, 3),
    }
    for key, shape in expected.items():
        actual = tuple(np.shape(data[key]))
        if len(actual) != len(shape) or any(e is not None and a != e for a, e in zip(actual, shape)):
            want = "(" + ", ".join("N" if e is None else str(e) for e in shape) + ")"
            raise InvalidSMPLFileError(f"{path}: '{key}' has shape {actual}, a SMPL model has {want}")
    if np.shape(data["shapedirs"])[2] < NUM_BETAS:
        raise InvalidSMPLFileError(
            f"{path}: 'shapedirs' has {np.shape(data['shapedirs'])[2]} shape components, pchmr uses {NUM_BETAS}"
        )


def check_smpl_frame(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Verify that the template's rest joints (SMPL's ``J_regressor`` @ ``v_template``) are in
    pchmr's body frame, as SMPL's are: head above the ankles by metres (y up, metres), the feet
    in front of the ankles (+z front) and the left hip at larger x than the right (x to the
    body's left). Raises :class:`InvalidSMPLFileError` naming the failed test otherwise."""
    joints = _dense(data["J_regressor"]).astype(np.float64) @ np.asarray(data["v_template"], dtype=np.float64)
    head_height = joints[SMPL_HEAD, 1] - joints[[SMPL_L_ANKLE, SMPL_R_ANKLE], 1].mean()
    foot_ahead = (joints[[SMPL_L_FOOT, SMPL_R_FOOT], 2] - joints[[SMPL_L_ANKLE, SMPL_R_ANKLE], 2]).min()
    failures = []
    if head_height < MIN_HEAD_ABOVE_ANKLES_M:
        failures.append(
            f"head {head_height:.3f} m above the ankles (y up, metres: expected > {MIN_HEAD_ABOVE_ANKLES_M})"
        )
    if foot_ahead <= 0:
        failures.append(f"feet {foot_ahead:.3f} m in front of the ankles (facing +z: expected > 0)")
    if joints[SMPL_L_HIP, 0] <= joints[SMPL_R_HIP, 0]:
        failures.append("left hip not at larger x than the right hip (x to the body's left)")
    if failures:
        raise InvalidSMPLFileError(f"{path}: the template is not in SMPL's frame: " + "; ".join(failures))


# --------------------------------------------------------------------------- the regressors


def _normalised_rows(matrix: np.ndarray, what: str) -> Tensor:
    sums = matrix.sum(axis=1)
    worst = float(np.abs(sums - 1.0).max())
    if worst > ROW_SUM_TOLERANCE:
        raise InvalidSMPLFileError(f"{what}: every row must sum to 1, the worst row is off by {worst:.3g}")
    return torch.from_numpy(matrix / sums[:, None]).to(torch.float32)


def lsp_regressor_from_smpl(j_regressor: object) -> Tensor:
    """SMPL's (24, V) ``J_regressor`` → the (14, V) float32 LSP regressor (:data:`LSP_FROM_SMPL`)."""
    dense = _dense(j_regressor).astype(np.float64)
    return _normalised_rows(dense[list(LSP_FROM_SMPL)], "SMPL's J_regressor")


def _read_h36m(path: str | os.PathLike[str], num_vertices: int) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidSMPLFileError(f"cannot read the Human3.6M regressor {path}: {exc}") from exc
    if matrix.shape != (NUM_H36M_JOINTS, num_vertices):
        raise InvalidSMPLFileError(
            f"{path}: a Human3.6M regressor is ({NUM_H36M_JOINTS}, {num_vertices}), got {matrix.shape}"
        )
    return matrix.astype(np.float64)


def lsp_regressor_from_h36m(path: str | os.PathLike[str], num_vertices: int = NUM_VERTICES) -> Tensor:
    """``J_regressor_h36m.npy`` (17, V) → the (14, V) float32 LSP regressor (:data:`LSP_FROM_H36M`)."""
    return _normalised_rows(_read_h36m(path, num_vertices)[list(LSP_FROM_H36M)], str(path))


def pelvis_regressor_from_h36m(path: str | os.PathLike[str], num_vertices: int = NUM_VERTICES) -> Tensor:
    """``J_regressor_h36m.npy`` (17, V) → its (V,) float32 pelvis row (H36M joint 0), summing to 1."""
    return _normalised_rows(_read_h36m(path, num_vertices)[[H36M_PELVIS]], str(path))[0]


# --------------------------------------------------------------------------- the body model


def _axis_angle_to_matrix(rotvec: Tensor) -> Tensor:
    """(N, 3) axis-angle → (N, 3, 3) with smplx's Rodrigues (finite gradients at zero)."""
    from smplx.lbs import batch_rodrigues

    return batch_rodrigues(rotvec)


class SMPLBodyModel(BodyModel):
    """SMPL as a pchmr :class:`~pchmr.core.contracts.bodymodel.BodyModel` (see the module docstring).

    ``layer`` is smplx's ``SMPLLayer`` (no pose state). None of SMPL's arrays are persistent
    buffers, so ``state_dict()`` is empty and no licence-restricted data reaches a checkpoint.
    """

    def __init__(
        self,
        model_data: Mapping[str, Any],
        *,
        gender: str = "neutral",
        h36m_regressor: str | os.PathLike[str] | None = None,
        downsampling: str | os.PathLike[str] | None = None,
        pyramid_cache_dir: str | os.PathLike[str] | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        self.name = "smpl"
        self.gender = gender
        self.source = source
        self.param_shapes = {"global_orient": (3,), "body_pose": (3 * NUM_BODY_JOINTS,), "betas": (NUM_BETAS,)}
        self.joint_names = JOINT_NAMES
        self.root_joints = ROOT_JOINTS
        self.flip_permutation = tuple(JOINT_NAMES.index(_mirror_name(n)) for n in JOINT_NAMES)
        self.layer = _build_layer(model_data, gender)
        for qualified, buffer in list(self.layer.named_buffers()):
            owner, _, key = qualified.rpartition(".")
            self.layer.get_submodule(owner).register_buffer(key, buffer, persistent=False)
        faces = torch.as_tensor(np.asarray(model_data["f"], dtype=np.int64))
        self.register_buffer("faces", faces, persistent=False)
        pelvis: Tensor | None = None
        if h36m_regressor is not None:
            regressor = lsp_regressor_from_h36m(h36m_regressor)
            pelvis = pelvis_regressor_from_h36m(h36m_regressor)
            self.joint_source = f"human3.6m regressor ({Path(h36m_regressor).name}; neck = thorax, head = head top)"
        else:
            regressor = lsp_regressor_from_smpl(model_data["J_regressor"])
            self.joint_source = (
                "smpl J_regressor (neck = SMPL's neck, head = SMPL's head joint, approximating LSP's head top)"
            )
        self.register_buffer("joint_regressor", regressor, persistent=False)
        # (V,) Human3.6M pelvis row, or None: the optional BodyModel.pelvis_regressor
        self.register_buffer("pelvis_regressor", pelvis, persistent=False)
        self.downsampling = Path(downsampling) if downsampling is not None else None
        self.pyramid_cache_dir = Path(pyramid_cache_dir or DEFAULT_PYRAMID_CACHE).expanduser()
        self._pyramid: MeshPyramid | None = None

    # ----------------------------------------------------------------- forward and joints
    def forward(self, **params: Tensor) -> BodyOutput:
        """``global_orient`` (B, 3), ``body_pose`` (B, 69) axis-angle radians and optional
        ``betas`` (B, 10) → vertices (B, 6890, 3) and joints (B, 14, 3), float32 metres, body
        frame (y up, facing +z), not root-aligned (SMPL's origin)."""
        unknown = sorted(set(params) - set(self.param_shapes))
        if unknown:
            raise TypeError(
                f"SMPLBodyModel.forward got unknown parameters {unknown}; it takes {sorted(self.param_shapes)}"
            )
        missing = [name for name in ("global_orient", "body_pose") if name not in params]
        if missing:
            raise TypeError(
                f"SMPLBodyModel.forward needs {missing}: global_orient (B, 3), body_pose (B, 69) axis-angle"
            )
        batch = params["global_orient"].shape[0]
        for name, value in params.items():
            if tuple(value.shape) != (batch, *self.param_shapes[name]):
                raise ValueError(f"'{name}' must be ({batch}, {self.param_shapes[name][0]}), got {tuple(value.shape)}")
        dtype, device = self.layer.shapedirs.dtype, self.layer.shapedirs.device
        orient, pose = (params[n].to(device=device, dtype=dtype) for n in ("global_orient", "body_pose"))
        betas = params.get("betas")
        betas = torch.zeros(batch, NUM_BETAS, dtype=dtype, device=device) if betas is None else betas.to(device, dtype)
        rotations = _axis_angle_to_matrix(torch.cat((orient, pose), dim=1).reshape(-1, 3)).reshape(batch, -1, 3, 3)
        out = self.layer(betas=betas, global_orient=rotations[:, :1], body_pose=rotations[:, 1:])
        vertices = out.vertices.to(device=params["global_orient"].device, dtype=torch.float32)
        return BodyOutput(vertices=vertices, joints=self.joints_from_vertices(vertices))

    def rest_vertices(self) -> np.ndarray:
        """(6890, 3) float32 template (zero pose, zero betas), body frame, metres."""
        return self.layer.v_template.detach().cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------------ pyramid
    def pyramid(self) -> MeshPyramid:
        """GraphCMR's ``mesh_downsampling.npz`` when it was found, else pchmr's own pyramid
        (431 / 1723 / 6890) cached on disk per topology."""
        if self._pyramid is None:
            from pchmr.core.kit.pyramid import (
                cached_pyramid,
                load_graphcmr_downsampling,
            )

            if self.downsampling is not None:
                pyramid = load_graphcmr_downsampling(self.downsampling)
                if pyramid.num_vertices[-1] != self.num_vertices:
                    raise InvalidSMPLFileError(
                        f"{self.downsampling}: its full level has {pyramid.num_vertices[-1]} vertices, "
                        f"SMPL has {self.num_vertices}"
                    )
            else:
                pyramid = cached_pyramid(self.rest_vertices(), self.faces.cpu().numpy(), self.pyramid_cache_dir)
            self._pyramid = pyramid
        return self._pyramid

    def describe(self) -> dict[str, object]:
        info = super().describe()
        has_pelvis = self.pelvis_regressor is not None
        pelvis = "human3.6m regressor joint 0" if has_pelvis else "none (no Human3.6M regressor)"
        info.update(gender=self.gender, root="mid-hip", joint_source=self.joint_source, pelvis=pelvis)
        return info


def _build_layer(model_data: Mapping[str, Any], gender: str) -> torch.nn.Module:
    """smplx's ``SMPLLayer`` from already-read model data (smplx's own loader needs chumpy for
    SMPL's v1.0.0 files); smplx's notice about 10 shape coefficients is kept off stdout."""
    import smplx
    from smplx.utils import Struct

    data = dict(model_data)
    for key in ("v_template", "shapedirs", "posedirs", "weights", "kintree_table", "f"):
        data[key] = np.asarray(data[key])
    with contextlib.redirect_stdout(io.StringIO()):
        layer = smplx.SMPLLayer(model_path="", data_struct=Struct(**data), num_betas=NUM_BETAS, gender=gender)
    layer.requires_grad_(False)
    return layer


def _mirror_name(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[5:]
    if name.startswith("right_"):
        return "left_" + name[6:]
    return name


@dataclass(frozen=True)
class SMPLOptions:
    """``BodyModelSpec.extra`` values of ``smpl``."""

    gender: str = option("neutral", choices=GENDERS, help="which SMPL model file (SMPL_<GENDER>.pkl) is read")
    joints: str = option(
        "auto",
        choices=JOINT_SOURCES,
        help="evaluation joints: auto (H36M regressor when its file is there), h36m (require it) or smpl",
    )
    pyramid: str = option(
        "auto",
        choices=PYRAMID_SOURCES,
        help="mesh pyramid: auto (GraphCMR's file when there, else QEM), graphcmr (require it) or qem",
    )


def make_smpl(spec: BodyModelSpec | None = None) -> SMPLBodyModel:
    """The factory registered as ``smpl``: SMPL from ``spec.model_dir`` (``--smpl-dir``).

    ``spec.extra`` options (:class:`SMPLOptions`): ``gender`` (neutral, male, female; default neutral); ``joints``
    (auto: the H36M regressor when ``J_regressor_h36m.npy`` is there, else SMPL's; h36m: require
    it; smpl: always SMPL's); ``pyramid`` (auto: GraphCMR's ``mesh_downsampling.npz`` when there,
    else pchmr's QEM pyramid cached in ``spec.cache_dir``; graphcmr: require the file; qem).
    """
    spec = spec or BodyModelSpec()
    options = read_options(SMPLOptions, spec.extra, plugin="smpl", kind="body_model")
    gender, joints, pyramid = options.gender, options.joints, options.pyramid
    files = find_smpl_files(spec.model_dir, gender)
    if joints == "h36m" and files.h36m_regressor is None:
        raise MissingSMPLFilesError(
            f"joints='h36m' needs {' or '.join(H36M_REGRESSOR_NAMES)} beside {files.model} "
            "(it comes with SPIN, GraphCMR and METRO's data downloads)"
        )
    if pyramid == "graphcmr" and files.downsampling is None:
        raise MissingSMPLFilesError(
            f"pyramid='graphcmr' needs {GRAPHCMR_DOWNSAMPLING_NAME} beside {files.model} (GraphCMR's data download)"
        )
    return SMPLBodyModel(
        load_smpl_pickle(files.model),
        gender=gender,
        h36m_regressor=files.h36m_regressor if joints != "smpl" else None,
        downsampling=files.downsampling if pyramid != "qem" else None,
        pyramid_cache_dir=spec.cache_dir,
        source=str(files.model),
    )


make_smpl.options = SMPLOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_body_models() -> Mapping[str, Callable[[BodyModelSpec], SMPLBodyModel]]:
    return {"smpl": make_smpl}
