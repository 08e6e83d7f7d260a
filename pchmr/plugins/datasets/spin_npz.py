"""``spin-npz``: the ``.npz`` annotation files of SPIN / GraphCMR (``dataset_extras/*.npz``).

One file per split: ``h36m_train.npz``, ``h36m_valid_protocol1.npz``/``…protocol2.npz``,
``3dpw_test.npz``, ``mpi_inf_3dhp_train.npz``/``…valid.npz``, ``lsp_dataset_train.npz``/
``…test.npz``, ``lspet_dataset_train.npz``, ``coco_2014_train.npz``, ``mpii_train.npz``.
Keys (N samples; SPIN's ``datasets/preprocess`` writes them):

=============  ================  =================================================================
key            shape, dtype      meaning
=============  ================  =================================================================
``imgname``    (N,) str          image path relative to the dataset's image folder
``center``     (N, 2) float      box centre, pixels (x, y)
``scale``      (N,) float        box side / 200 px
``part``       (N, 24, 3) float  2D J24 keypoints, pixels + visibility (optional)
``S``          (N, 24, 4) float  3D J24 joints, **metres**, camera frame + confidence (optional)
``pose``       (N, 72) float     SMPL axis-angle, global orientation in the camera frame (optional)
``shape``      (N, 10) float     SMPL betas (optional, with ``pose``)
``has_smpl``   (N,) int/float    1 where ``pose``/``shape`` are valid (default 1 with ``pose``)
``gender``     (N,) str          ``m``/``f`` (3DPW; optional)
``openpose``   (N, 25, 3) float  OpenPose BODY_25 detections (optional; used when ``part`` is absent)
=============  ================  =================================================================

Location: ``--dataset spin-npz:FILE.npz`` (a seeded 80/20 train/test split of one file, images
relative to the file's folder) or ``spin-npz:train=A.npz,test=B.npz,images=DIR[,source=NAME]
[,protocol=metro|spin|mid-hip]`` (the evaluation protocol, :mod:`pchmr.core.kit.joints`; default
``metro``). Meta labels come from the image names (Human3.6M ``S9_Directions_1…``: subject and
action; 3DPW ``imageFiles/<location>_<activity>_NN/…``, or METRO's ``<location>_<activity>_NN/…``:
scene ``<location>_<activity>`` (the sequence without its take index), action and subject the
sequence; MPI-INF-3DHP ``S1/Seq1/…``); ``source`` is the file's dataset name (``h36m``, ``3dpw``,
``coco`` …) unless given. Human3.6M's pelvis
(``S`` J24 index 14) is kept as the GT pelvis of the pelvis-aligned protocols.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option
from pchmr.core.kit.joints import J24, J24_PELVIS, OPENPOSE_25, remap
from pchmr.core.kit.safe_pickle import not_an_npz
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
    split_indices,
)

__all__ = [
    "REQUIRED_KEYS",
    "SpinNpzOptions",
    "load_spin_npz",
    "make_spin_npz",
    "pchmr_datasets",
    "source_from_filename",
]

REQUIRED_KEYS = ("imgname", "center", "scale")
#: Expected per-sample shape of each key (after the leading N).
KEY_SHAPES: Mapping[str, tuple[int, ...]] = {
    "center": (2,), "scale": (), "part": (24, 3), "S": (24, 4), "pose": (72,), "shape": (10,),
    "has_smpl": (), "gender": (), "openpose": (25, 3), "imgname": (),
}  # fmt: skip
#: A 3D coordinate beyond this many metres from the camera means the file is not in metres.
MAX_METRES = 50.0
_SOURCES = (("h36m", "h36m"), ("3dpw", "3dpw"), ("mpi_inf_3dhp", "mpi-inf-3dhp"), ("lspet", "lspet"),
            ("lsp", "lsp"), ("coco", "coco"), ("mpii", "mpii"), ("up3d", "up3d"), ("up_3d", "up3d"))  # fmt: skip


@dataclass(frozen=True)
class SpinNpzOptions:
    """Where ``spin-npz`` reads: the ``key=value`` pairs of its ``--dataset`` path, or ``DatasetSpec.options``
    (a bare path is one file, split 80/20 by the seed)."""

    train: str | None = option(None, help="the training .npz (with test)")
    test: str | None = option(None, help="the test .npz (with train)")
    images: str | None = option(None, default_text="beside the .npz", help="the folder the image names are relative to")
    source: str | None = option(
        None, default_text="from the file name", help="the source label of every sample (h36m, 3dpw, …)"
    )
    protocol: str | None = option(
        None, default_text="metro", help="the evaluation protocol (a name of pchmr.core.kit.joints.PROTOCOLS)"
    )


def source_from_filename(path: Path) -> str:
    """``h36m_valid_protocol2.npz`` → ``h36m``; ``mpi_inf_3dhp_train.npz`` → ``mpi-inf-3dhp``."""
    stem = path.stem.lower()
    for prefix, name in _SOURCES:
        if stem.startswith(prefix):
            return name
    return stem


def _read(npz: Any, key: str, path: Path, n: int | None) -> np.ndarray:
    try:
        value = np.asarray(npz[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # an object array: a pickle inside the archive, never loaded
            raise DatasetFormatError(
                f"{path}: '{key}' is an object array (a pickle inside the archive), which pchmr does not load; a "
                "SPIN .npz holds plain arrays (image names as fixed-width strings)"
            ) from None
        raise DatasetFormatError(f"{path}: key '{key}' cannot be read (truncated or corrupt file?): {exc}") from exc
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DatasetFormatError(f"{path}: key '{key}' cannot be read (truncated or corrupt file?): {exc}") from exc
    shape = KEY_SHAPES[key]
    if key == "scale" and value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    expected = ("N", *shape) if n is None else (n, *shape)
    if value.ndim != 1 + len(shape) or tuple(value.shape[1:]) != shape or (n is not None and len(value) != n):
        raise DatasetFormatError(f"{path}: '{key}' must have shape {expected}, got {value.shape}")
    if key not in ("imgname", "gender") and not np.issubdtype(value.dtype, np.number):
        raise DatasetFormatError(f"{path}: '{key}' must be numeric, got dtype {value.dtype}")
    if np.issubdtype(value.dtype, np.inexact) and value.size:
        bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DatasetFormatError(
                f"{path}: '{key}' holds NaN or infinite values (sample {first} first, {int(bad.sum())} sample(s) in "
                "all); a SPIN .npz holds finite numbers (a missing keypoint has confidence 0)"
            )
    return value


def _open(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SPIN .npz annotation file does not exist")
    problem = not_an_npz(path)
    if problem:
        raise DatasetFormatError(f"{path}: not an .npz archive: {problem}")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: not a readable .npz archive (truncated or corrupt?): {exc}") from exc


_H36M = re.compile(r"(S\d+)_([A-Za-z]+)")
#: a 3DPW image: SPIN's ``imageFiles/<sequence>/…`` or METRO's TSV key ``<sequence>/image_…``, the
#: sequence ``<location>_<activity>_NN`` (groups: sequence, location, activity)
_PW3D = re.compile(r"(?:^|/)(([a-z]+)_([a-zA-Z_]+?)_\d+)/")
_MPI = re.compile(r"(S\d+)/(Seq\d+)/")


def labels_from_imgnames(imgnames: np.ndarray, source: str) -> dict[str, np.ndarray]:
    """Meta labels (subject, scene, action, source) from SPIN image names; ``unknown`` otherwise."""
    n = len(imgnames)
    subject, scene, action = (np.full(n, "unknown", dtype=object) for _ in range(3))
    for i, name in enumerate(imgnames):
        s = str(name)
        if m := _PW3D.search(s):
            # the scene is the sequence without its take index, as pw3d.sequence_labels names it
            scene[i], action[i], subject[i] = f"{m.group(2)}_{m.group(3)}", m.group(3), m.group(1)
        elif m := _MPI.search(s):
            subject[i], scene[i] = m.group(1), m.group(2)
        elif m := _H36M.search(Path(s).name):
            subject[i], action[i] = m.group(1), m.group(2)
    return {"subject": subject.astype(str), "scene": scene.astype(str), "action": action.astype(str),
            "source": np.full(n, source)}  # fmt: skip


def load_spin_npz(path: str | Path, joint_names: tuple[str, ...], source: str | None = None) -> Annotations:
    """Read and check one SPIN ``.npz``; joints mapped from J24 to ``joint_names``."""
    path = Path(path)
    npz = _open(path)
    with npz:
        missing = [k for k in REQUIRED_KEYS if k not in npz.files]
        if missing:
            raise DatasetFormatError(
                f"{path}: missing key(s) {missing}; a SPIN .npz has {list(REQUIRED_KEYS)} and optionally "
                "part, S, pose, shape, has_smpl, gender, openpose"
            )
        imgname = _read(npz, "imgname", path, None).astype(str)
        n = len(imgname)
        center = _read(npz, "center", path, n).astype(np.float64)
        scale = _read(npz, "scale", path, n).astype(np.float64)
        if not (scale > 0).all():
            raise DatasetFormatError(
                f"{path}: 'scale' must be > 0 (box side / 200 px), sample {int(np.argmin(scale))} is not"
            )
        optional = {k: _read(npz, k, path, n) for k in ("part", "S", "pose", "shape", "has_smpl", "gender", "openpose")
                    if k in npz.files}  # fmt: skip
    j = len(joint_names)
    if "part" in optional:
        keypoints = remap(optional["part"].astype(np.float64), J24, joint_names)
    elif "openpose" in optional:
        keypoints = remap(optional["openpose"].astype(np.float64), OPENPOSE_25, joint_names)
    else:
        keypoints = np.zeros((n, j, 3))
    keypoints[..., 2] = np.clip(keypoints[..., 2], 0.0, 1.0)
    joints = np.zeros((n, j, 4))
    pelvis = None
    if "S" in optional:
        s = optional["S"].astype(np.float64)
        valid = s[..., 3] > 0
        if valid.any() and np.abs(s[..., :3][valid]).max() > MAX_METRES:
            raise DatasetFormatError(
                f"{path}: 'S' has coordinates up to {np.abs(s[..., :3][valid]).max():.0f}; expected metres "
                f"(|x| < {MAX_METRES:.0f}), e.g. millimetres divided by 1000"
            )
        joints = remap(s, J24, joint_names)
        joints[..., 3] = (joints[..., 3] > 0).astype(np.float64)
        pelvis = s[:, J24_PELVIS].copy()  # Human3.6M's pelvis (the SPIN/METRO protocols' GT root)
        pelvis[:, 3] = (pelvis[:, 3] > 0).astype(np.float64)
    pose = betas = has_smpl = None
    if "pose" in optional:
        if "shape" not in optional:
            raise DatasetFormatError(
                f"{path}: has 'pose' but no 'shape'; SMPL annotations need both (N, 72) and (N, 10)"
            )
        pose, betas = optional["pose"].astype(np.float64), optional["shape"].astype(np.float64)
        has_smpl = optional["has_smpl"].astype(bool) if "has_smpl" in optional else np.ones(n, bool)
    gender = gender_names(optional["gender"]) if "gender" in optional else None
    src = source or source_from_filename(path)
    return Annotations(
        image=imgname, center=center, scale=scale, keypoints=keypoints, joints=joints,
        labels=labels_from_imgnames(imgname, src), pose=pose, betas=betas, has_smpl=has_smpl, gender=gender,
        origin=str(path), pelvis=pelvis,
    )  # fmt: skip


def make_spin_npz(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """The factory registered as ``spin-npz`` (see the module docstring for the location)."""
    where = read_location("spin-npz", spec, SpinNpzOptions)
    protocol = where.get("protocol", "metro")
    source = where.get("source")
    if "main" in where:
        main = Path(where["main"]).expanduser()
        ann = load_spin_npz(main, body_model.joint_names, source)
        train_idx, test_idx = split_indices(len(ann), spec.seed)
        files = {"train": (main, ann, train_idx), "test": (main, ann, test_idx)}
        split_note = f"seeded 80/20 split of {main.name} (seed {spec.seed})"
    else:
        if "train" not in where or "test" not in where:
            raise DatasetFormatError(f"spin-npz: give both train=FILE and test=FILE (or one FILE), got {spec.path!r}")
        files = {}
        for split in ("train", "test"):
            path = Path(where[split]).expanduser()
            ann = load_spin_npz(path, body_model.joint_names, source)
            files[split] = (path, ann, np.arange(len(ann)))
        split_note = "files as given"
    counts = {"train": spec.num_train, "test": spec.num_test}
    stores = {}
    for split, (path, ann, index) in files.items():
        chosen = ann.take(limit(index, counts[split], spec.seed))
        images = FolderImages(Path(where.get("images", path.parent)).expanduser(), listed_in=str(path))
        images.check_exist(chosen.image.tolist())
        with progress_bar(f"preparing spin-npz {path.name} ({split}, {spec.image_size}px)") as update:
            stores[split] = prepare_split(chosen, images, spec=spec, body_model=body_model, name=f"spin-npz-{split}",
                                          sources=[path], protocol=protocol, progress=update)  # fmt: skip
    name = f"spin-npz:{files['test'][0].name}"
    return make_hmr_data(name, stores["train"], stores["test"], body_model, protocol, {"split": split_note})


make_spin_npz.options = SpinNpzOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_datasets() -> Mapping[str, Any]:
    return {"spin-npz": make_spin_npz}
