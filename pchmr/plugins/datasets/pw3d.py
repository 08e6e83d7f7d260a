"""``3dpw``: raw 3DPW (von Marcard et al. 2018) from its released ``sequenceFiles``.

Layout under ROOT (the unpacked ``3DPW`` folder): ``sequenceFiles/{train,validation,test}/*.pkl``
and ``imageFiles/<sequence>/image_%05d.jpg``. Each pickle (Python 2, read with
``encoding='latin1'``, allowing NumPy arrays and plain containers only: a file naming any other
class or function is refused before it runs) holds, for P people and F frames:

=====================  =========================  ==================================================
key                    type, shape                meaning
=====================  =========================  ==================================================
``sequence``           str                        sequence name, ``<scene>_<activity>_NN``
``genders``            P × 'm'/'f'
``betas``              P × (10+,)                 SMPL shape (the first 10 are used)
``poses``              P × (F, 72)                SMPL axis-angle, global orientation in the world
``poses2d``            P × (F, 3, 18)             OpenPose-18 keypoints, rows x, y (px), confidence
``jointPositions``     P × (F, 72)                SMPL's 24 joints, world frame, metres
``cam_poses``          (F, 4, 4)                  world → camera extrinsics [R | t]
``cam_intrinsics``     (3, 3)
``campose_valid``      P × (F,)                   1 where the person's pose/camera is valid
``poses_60Hz``         P × (~2F, 72)              the poses at 60 Hz (not read)
``img_frame_ids``      (F,)                       index of each image frame into the 60 Hz arrays (not read)
=====================  =========================  ==================================================

Every per-frame array above is per *image* frame (30 Hz): frame f's image is
``imageFiles/<sequence>/image_{f:05d}.jpg``. ``img_frame_ids`` (≈ 2f) indexes ``poses_60Hz`` and
``trans_60Hz`` (3DPW's readme; SPIN's and VIBE's preprocessing agree) and never names an image.

A sample is one valid (person, frame). Its box is SPIN's (the extent of the confident 2D
keypoints × 1.2); its 3D joints are ``jointPositions`` moved to the camera (``R x + t``) and
mapped from SMPL-24 (hips, neck and head are SMPL's kinematic joints: an approximation; with
the ``smpl`` body model the joints are instead regressed from the GT mesh, as SPIN and METRO
evaluate, and the GT pelvis of the pelvis-aligned protocols is the GT mesh's Human3.6M pelvis;
with other body models there is no GT pelvis and those protocols fall back to the mid-hip);
the SMPL global orientation is rotated into the camera frame (``R · R_global``).
Labels (:func:`sequence_labels`): ``scene`` = the sequence name without its take index
(``courtyard_relaxOnBench_01`` → ``courtyard_relaxOnBench``; the location is its prefix) — the
natural partition by scene, ``--partitioner natural --partition-option label=scene``, gives the
PCHMR paper's 20 devices on 3DPW's 24 training sequences, where the location prefix alone gives 2
— ``action`` = the activity, ``subject`` = ``<sequence>/person<p>``, ``source`` = ``3dpw``.

Location: ``--dataset 3dpw-pkl:ROOT`` (the ``3DPW`` folder; ``--dataset 3dpw:DATA_ROOT`` finds it as ``DATA_ROOT/3DPW``) (train = ``train``, test = ``test``) or
``3dpw-pkl:root=ROOT,train=train,test=validation[,protocol=spin|metro|mid-hip]``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option
from pchmr.core.kit.joints import OPENPOSE_18, SMPL_24, remap
from pchmr.core.kit.safe_pickle import UnsafeFileError, safe_load
from pchmr.plugins.datasets.prepared import (
    Annotations,
    DatasetFormatError,
    FolderImages,
    gender_names,
    limit,
    make_hmr_data,
    prepare_split,
    progress_bar,
    read_location,
)

__all__ = [
    "REQUIRED_KEYS",
    "PW3DOptions",
    "load_3dpw_split",
    "load_sequence",
    "make_3dpw",
    "pchmr_datasets",
    "sequence_labels",
]

REQUIRED_KEYS = ("sequence", "genders", "betas", "poses", "poses2d", "jointPositions", "cam_poses", "campose_valid")
BOX_FACTOR = 1.2
MIN_KEYPOINTS = 2
_NAME = re.compile(r"^([a-zA-Z]+)_(.+?)(?:_\d+)?$")


@dataclass(frozen=True)
class PW3DOptions:
    """Where ``3dpw-pkl`` reads: the ``key=value`` pairs of its ``--dataset`` path, or ``DatasetSpec.options``."""

    root: str | None = option(None, help="the 3DPW root (sequenceFiles/, imageFiles/); a bare path is the root")
    train: str | None = option(None, default_text="train", help="the training split's folder under sequenceFiles/")
    test: str | None = option(None, default_text="test", help="the test split's folder under sequenceFiles/")
    protocol: str | None = option(
        None, default_text="metro", help="the evaluation protocol (a name of pchmr.core.kit.joints.PROTOCOLS)"
    )


def sequence_labels(sequence: str) -> tuple[str, str]:
    """``(scene, action)`` of a 3DPW sequence name ``<location>_<activity>_NN``: the scene is the
    name without its take index ``NN`` (``courtyard_relaxOnBench_01`` → ``courtyard_relaxOnBench``),
    the action the activity (``relaxOnBench``). A name of another form is its own scene."""
    m = _NAME.match(sequence)
    return (f"{m.group(1)}_{m.group(2)}", m.group(2)) if m else (sequence, "unknown")


def _load_pickle(path: Path) -> dict[str, Any]:
    """One sequence file, unpickled with only NumPy arrays and plain containers allowed
    (:func:`~pchmr.core.kit.safe_pickle.safe_load`): a file naming any other class or function
    is refused (:class:`~pchmr.core.kit.safe_pickle.UnsafeFileError`) before it runs."""
    try:
        data = safe_load(path, what="3DPW sequence file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: 3DPW sequence file does not exist") from None
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as exc:
        raise DatasetFormatError(f"{path}: not a readable 3DPW pickle (truncated or corrupt?): {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a dict of 3DPW arrays, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetFormatError(f"{path}: missing key(s) {missing}; a 3DPW sequence file has {list(REQUIRED_KEYS)}")
    return data


def _person_array(data: Mapping[str, Any], key: str, p: int, shape: tuple[int, ...], path: Path) -> np.ndarray:
    value = np.asarray(data[key][p], dtype=np.float64)
    if value.shape != shape:
        raise DatasetFormatError(f"{path}: '{key}'[{p}] must have shape {shape}, got {value.shape}")
    return value


def load_sequence(path: str | Path, joint_names: tuple[str, ...], joints_from_mesh: bool = False) -> Annotations:
    """The valid (person, frame) samples of one 3DPW sequence file; see the module docstring."""
    path = Path(path)
    data = _load_pickle(path)
    cams = np.asarray(data["cam_poses"], dtype=np.float64)
    if cams.ndim != 3 or cams.shape[1:] != (4, 4):
        raise DatasetFormatError(f"{path}: 'cam_poses' must have shape (F, 4, 4), got {cams.shape}")
    frames = len(cams)
    people = len(data["poses"])
    sequence = str(data["sequence"])
    scene, action = sequence_labels(sequence)
    genders = gender_names(np.asarray(data["genders"]))
    rows: dict[str, list[Any]] = {
        k: [] for k in ("image", "center", "scale", "kp", "joints", "pose", "betas", "gender", "subject")
    }
    rot, trans = cams[:, :3, :3], cams[:, :3, 3]
    for p in range(people):
        poses = _person_array(data, "poses", p, (frames, 72), path)
        poses2d = _person_array(data, "poses2d", p, (frames, 3, 18), path)
        world = _person_array(data, "jointPositions", p, (frames, 72), path).reshape(frames, 24, 3)
        valid = _person_array(data, "campose_valid", p, (frames,), path) > 0
        betas = np.asarray(data["betas"][p], dtype=np.float64).reshape(-1)
        if betas.size < 10:
            raise DatasetFormatError(f"{path}: 'betas'[{p}] must have at least 10 values, got {betas.size}")
        cam_joints = np.einsum("fij,fkj->fki", rot, world) + trans[:, None]
        orient = Rotation.from_matrix(rot @ Rotation.from_rotvec(poses[:, :3]).as_matrix()).as_rotvec()
        for f in np.flatnonzero(valid):
            kp = poses2d[f].T  # (18, 3)
            confident = kp[kp[:, 2] > 0, :2]
            if len(confident) < MIN_KEYPOINTS:
                continue
            lo, hi = confident.min(0), confident.max(0)
            rows["image"].append(f"imageFiles/{sequence}/image_{f:05d}.jpg")
            rows["center"].append((lo + hi) / 2.0)
            rows["scale"].append(BOX_FACTOR * float((hi - lo).max()) / 200.0)
            rows["kp"].append(kp)
            rows["joints"].append(np.concatenate([cam_joints[f], np.ones((24, 1))], axis=1))
            rows["pose"].append(np.concatenate([orient[f], poses[f, 3:]]))
            rows["betas"].append(betas[:10])
            rows["gender"].append(genders[p])
            rows["subject"].append(f"{sequence}/person{p}")
    n = len(rows["image"])
    if n == 0:
        raise DatasetFormatError(f"{path}: no valid (person, frame) with 2D keypoints")
    keypoints = remap(np.stack(rows["kp"]), OPENPOSE_18, joint_names)
    keypoints[..., 2] = np.clip(keypoints[..., 2], 0.0, 1.0)
    joints = remap(np.stack(rows["joints"]), SMPL_24, joint_names)
    if joints_from_mesh:
        joints[...] = 0.0
    labels = {"subject": np.array(rows["subject"]), "scene": np.full(n, scene), "action": np.full(n, action),
              "source": np.full(n, "3dpw")}  # fmt: skip
    return Annotations(
        image=np.array(rows["image"]), center=np.stack(rows["center"]), scale=np.array(rows["scale"]),
        keypoints=keypoints, joints=joints, labels=labels, pose=np.stack(rows["pose"]), betas=np.stack(rows["betas"]),
        has_smpl=np.ones(n, bool), gender=np.array(rows["gender"]), origin=str(path),
    )  # fmt: skip


def _concat(parts: list[Annotations], origin: str) -> Annotations:
    cat = lambda key: np.concatenate([getattr(a, key) for a in parts])  # noqa: E731
    return Annotations(
        image=cat("image"), center=cat("center"), scale=cat("scale"), keypoints=cat("keypoints"), joints=cat("joints"),
        labels={k: np.concatenate([a.labels[k] for a in parts]) for k in parts[0].labels}, pose=cat("pose"),
        betas=cat("betas"), has_smpl=cat("has_smpl"), gender=cat("gender"), origin=origin,
    )  # fmt: skip


def load_3dpw_split(
    root: str | Path, split: str, joint_names: tuple[str, ...], joints_from_mesh: bool = False
) -> tuple[Annotations, list[Path]]:
    """Every sequence of ``sequenceFiles/<split>`` (sorted by name) and the pickles read."""
    folder = Path(root) / "sequenceFiles" / split
    files = sorted(folder.glob("*.pkl"))
    if not files:
        raise FileNotFoundError(f"{folder}: no 3DPW sequence files (*.pkl); expected ROOT/sequenceFiles/{split}/*.pkl")
    return _concat([load_sequence(f, joint_names, joints_from_mesh) for f in files], str(folder)), files


def make_3dpw(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """The factory registered as ``3dpw-pkl`` (see the module docstring)."""
    where = read_location("3dpw-pkl", spec, PW3DOptions)
    root = Path(where.get("root", where.get("main", ""))).expanduser()
    protocol = where.get("protocol", "metro")
    from_mesh = body_model.name == "smpl"
    counts = {"train": spec.num_train, "test": spec.num_test}
    stores = {}
    for split in ("train", "test"):
        name = where.get(split, split)
        ann, files = load_3dpw_split(root, name, body_model.joint_names, from_mesh)
        chosen = ann.take(limit(np.arange(len(ann)), counts[split], spec.seed))
        images = FolderImages(root, listed_in=f"{root}/sequenceFiles/{name}")
        images.check_exist(chosen.image.tolist())
        with progress_bar(f"preparing 3dpw {name} ({spec.image_size}px)") as update:
            stores[split] = prepare_split(chosen, images, spec=spec, body_model=body_model, name=f"3dpw-{split}",
                                          sources=files, protocol=protocol, progress=update)  # fmt: skip
    joints_note = (
        "regressed from the GT SMPL mesh" if from_mesh else "SMPL-24 jointPositions (hips/neck/head approximate)"
    )
    return make_hmr_data(f"3dpw-pkl:{where.get('test', 'test')}", stores["train"], stores["test"], body_model, protocol,
                         {"joints": joints_note})  # fmt: skip


make_3dpw.options = PW3DOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_datasets() -> Mapping[str, Any]:
    return {"3dpw-pkl": make_3dpw}
