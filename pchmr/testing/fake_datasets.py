"""Small files in the exact on-disk formats of the HMR datasets, for tests and demos.

Nothing here is real data: people are a fixed LSP-14 stick figure (:data:`FIGURE_M`, metres,
camera frame: x right, y down, z forward) placed 3-5 m in front of a pinhole camera, drawn as
coloured squares on a gradient. Each writer returns a :class:`FakeScene` holding what it wrote
(per sample: image name, pixel keypoints, camera-frame joints, box), so a test can compute the
expected crops, crop coordinates and root-relative joints independently of the loaders.

Writers (each mirrors its format's keys, dtypes, shapes and encodings):

* :func:`write_spin_npz` — SPIN's ``dataset_extras/*.npz`` plus JPEG images;
* :func:`write_metro_tsv` — METRO/FastMETRO's ``*.img.tsv`` (base64 JPEG), ``*.label.tsv``
  (JSON), ``*.hw.tsv``, ``*.linelist.tsv``, ``.lineidx`` files and the ``*.yaml`` tying them;
* :func:`write_3dpw_sequence` — a 3DPW ``sequenceFiles/<split>/<seq>.pkl`` (latin-1 pickle,
  protocol 2) plus ``imageFiles/<seq>/image_%05d.jpg``;
* :func:`write_coco_keypoints` — a COCO ``person_keypoints_*.json`` plus its images.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pchmr.core.kit.joints import COCO_17, J24, LSP_14, OPENPOSE_18, SMPL_24

__all__ = [
    "FIGURE_M",
    "FIGURE_PELVIS_M",
    "MARKER_COLORS",
    "FakeScene",
    "draw_people",
    "frame_blue",
    "write_3dpw_sequence",
    "write_coco_keypoints",
    "write_metro_tsv",
    "write_spin_npz",
]

#: LSP-14 stick figure, metres, camera axes (x right, y down), root (mid-hip) at the origin; the
#: person faces the camera, so their right side is at -x (the image's left).
FIGURE_M = np.array([
    [-0.12, 0.85, 0.02], [-0.11, 0.45, 0.0], [-0.10, 0.0, 0.0], [0.10, 0.0, 0.0], [0.11, 0.45, 0.0],
    [0.12, 0.85, 0.02], [-0.30, -0.05, -0.05], [-0.25, -0.25, 0.0], [-0.20, -0.50, 0.0], [0.20, -0.50, 0.0],
    [0.25, -0.25, 0.0], [0.30, -0.05, -0.05], [0.0, -0.55, 0.0], [0.0, -0.80, 0.0],
])  # fmt: skip
#: The figure's Human3.6M pelvis (same frame): 4 cm above the mid-hip, so that pelvis- and
#: mid-hip-aligned errors differ. Written at J24 index 14 of SPIN's ``S`` and METRO's ``3d_joints``.
FIGURE_PELVIS_M = np.array([0.0, -0.04, 0.0])
#: A distinct RGB colour per LSP-14 joint (drawn as a square of :data:`MARKER_HALF` px).
MARKER_COLORS = np.array([
    [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [255, 128, 0],
    [128, 0, 255], [0, 128, 255], [255, 0, 128], [128, 255, 0], [0, 255, 128], [255, 255, 255], [255, 160, 160],
], dtype=np.uint8)  # fmt: skip
MARKER_HALF = 3
FOCAL_PX = 150.0
IMAGE_W, IMAGE_H = 200, 160
BOX_FACTOR = 1.2
JPEG_QUALITY = 95


@dataclass
class FakeScene:
    """What a writer wrote, per person-sample (N): image name, pixel keypoints (N, 14, 2),
    camera-frame joints (N, 14, 3) metres, box ``center`` (N, 2) / ``scale`` (N,), and the files."""

    imgname: list[str]
    keypoints_px: np.ndarray
    joints_cam: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    files: dict[str, Path] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _people(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 14, 3) camera-frame joints: the figure, slightly rotated about y and jittered, 3-5 m away."""
    return _people_with_pelvis(n, rng)[0]


def _people_with_pelvis(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_people`'s joints (same random draws) and each person's (n, 3) pelvis
    (:data:`FIGURE_PELVIS_M` moved with the body, not jittered)."""
    angle = rng.uniform(-0.4, 0.4, n)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0], rot[:, 0, 2], rot[:, 1, 1], rot[:, 2, 0], rot[:, 2, 2] = c, s, 1.0, -s, c
    body = np.einsum("nij,kj->nki", rot, FIGURE_M) + rng.normal(0, 0.01, (n, 14, 3))
    root = np.stack([rng.uniform(-0.4, 0.4, n), rng.uniform(-0.1, 0.2, n), rng.uniform(3.0, 5.0, n)], axis=1)
    return body + root[:, None], np.einsum("nij,j->ni", rot, FIGURE_PELVIS_M) + root


def _project(joints: np.ndarray) -> np.ndarray:
    centre = np.array([IMAGE_W / 2.0, IMAGE_H / 2.0])
    return FOCAL_PX * joints[..., :2] / joints[..., 2:3] + centre


def _box(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = keypoints.min(axis=1), keypoints.max(axis=1)
    return (lo + hi) / 2.0, BOX_FACTOR * (hi - lo).max(axis=1) / 200.0


def draw_people(keypoints_px: np.ndarray, seed: int = 0, blue: int | None = None) -> np.ndarray:
    """(P, 14, 2) pixel keypoints of the people in one image → (IMAGE_H, IMAGE_W, 3) uint8: a
    dark gradient (red and green; blue constant: ``blue``, else drawn from ``seed`` in 0..39)
    with a coloured square per joint (:data:`MARKER_COLORS`)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_H, 0:IMAGE_W]
    level = rng.integers(0, 40) if blue is None else blue
    image = np.stack([x * 60 // IMAGE_W, y * 60 // IMAGE_H, np.full_like(x, level)], -1).astype(np.uint8)
    for person in keypoints_px:
        for j, (px, py) in enumerate(person):
            xi, yi = int(np.floor(px)), int(np.floor(py))
            image[max(0, yi - MARKER_HALF) : yi + MARKER_HALF + 1, max(0, xi - MARKER_HALF) : xi + MARKER_HALF + 1] = (
                MARKER_COLORS[j]
            )
    return image


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _to_set(points: np.ndarray, names: tuple[str, ...], conf: float = 1.0) -> np.ndarray:
    """(N, 14, C) LSP-14 points → (N, len(names), C+1) with confidence ``conf`` where the name exists."""
    out = np.zeros((points.shape[0], len(names), points.shape[2] + 1))
    for j, name in enumerate(LSP_14):
        if name in names:
            out[:, names.index(name), :-1] = points[:, j]
            out[:, names.index(name), -1] = conf
    return out


def _j24(points: np.ndarray, head_at: str, pelvis: np.ndarray | None = None) -> np.ndarray:
    """LSP-14 → J24 with the head top at J24 13 (``head_lsp``, LSP style) or 18 (``head``, H36M);
    ``pelvis`` (N, 3), when given, at J24 14 (``pelvis``) with confidence 1."""
    out = _to_set(points, J24)
    if head_at == "head_lsp":
        out[:, J24.index("head_lsp")] = out[:, J24.index("head")]
        out[:, J24.index("head")] = 0.0
    if pelvis is not None:
        out[:, J24.index("pelvis"), :-1], out[:, J24.index("pelvis"), -1] = pelvis, 1.0
    return out


def write_spin_npz(
    path: str | Path, num_samples: int = 12, seed: int = 0, *, images_dir: str | Path | None = None,
    with_smpl: bool = False, with_3d: bool = True, gender: bool = False,
) -> FakeScene:  # fmt: skip
    """Write a SPIN ``.npz`` (``imgname``, ``center``, ``scale``, ``part`` (J24, LSP-style head),
    ``S`` (J24 metres, H36M-style head and pelvis, camera frame; the pelvis also in
    ``extra['pelvis_cam']``), optional ``pose``/``shape``/``has_smpl``
    and ``gender``) and one JPEG per sample under ``images_dir`` (default: the file's folder),
    named like Human3.6M's (``images/S<k>_<Action>_1.54138969_<frame>.jpg``)."""
    path = Path(path)
    root = Path(images_dir) if images_dir is not None else path.parent
    rng = np.random.default_rng(seed)
    joints, pelvis = _people_with_pelvis(num_samples, rng)
    keypoints = _project(joints)
    center, scale = _box(keypoints)
    actions = ("Directions", "Walking", "Eating")
    names = [f"images/S{1 + i % 3}_{actions[i % 2]}_1.54138969_{i + 1:06d}.jpg" for i in range(num_samples)]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_jpeg(draw_people(keypoints[i : i + 1], seed + i)))
    arrays: dict[str, np.ndarray] = {
        "imgname": np.array(names), "center": center.astype(np.float64), "scale": scale.astype(np.float64),
        "part": _j24(keypoints, "head_lsp").astype(np.float64),
    }  # fmt: skip
    if with_3d:
        arrays["S"] = _j24(joints, "head", pelvis).astype(np.float64)
    if with_smpl:
        arrays["pose"] = np.concatenate([np.tile([np.pi, 0.0, 0.0], (num_samples, 1)),
                                         rng.normal(0, 0.1, (num_samples, 69))], axis=1)  # fmt: skip
        arrays["shape"] = rng.normal(0, 0.5, (num_samples, 10))
        arrays["has_smpl"] = np.ones(num_samples, dtype=np.float64)
    if gender:
        arrays["gender"] = np.array(["m" if i % 2 == 0 else "f" for i in range(num_samples)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return FakeScene(names, keypoints, joints, center, scale, files={"npz": path, "images": root},
                     extra={**arrays, "pelvis_cam": pelvis})  # fmt: skip


def _lineidx(tsv: Path) -> None:
    offsets, pos = [], 0
    with tsv.open("rb") as stream:
        for line in stream:
            offsets.append(pos)
            pos += len(line)
    tsv.with_suffix(".lineidx").write_text("".join(f"{o}\n" for o in offsets))


def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    _lineidx(path)


def write_metro_tsv(directory: str | Path, split: str = "train", num_samples: int = 12, seed: int = 0,
                    *, with_smpl: bool = False) -> FakeScene:  # fmt: skip
    """Write METRO's TSV set for one split into ``directory``: ``<split>.img.tsv`` (key, base64
    JPEG), ``<split>.label.tsv`` (key, JSON list with one dict: ``center``, ``scale``,
    ``2d_joints`` (J24 px + vis), ``3d_joints`` (J24 metres + conf), ``has_2d_joints``,
    ``has_3d_joints``, ``pose``, ``betas``, ``has_smpl``, ``gender``), ``<split>.hw.tsv``
    (key, JSON ``[{"height", "width"}]``), ``<split>.linelist.tsv`` (row numbers), each TSV with
    its ``.lineidx`` of byte offsets, and ``<split>.yaml`` naming them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    joints, pelvis = _people_with_pelvis(num_samples, rng)
    keypoints = _project(joints)
    center, scale = _box(keypoints)
    keys = [f"S{1 + i % 2}_Walking_1.54138969_{i + 1:06d}.jpg" for i in range(num_samples)]
    j2d, j3d = _j24(keypoints, "head_lsp"), _j24(joints, "head", pelvis)
    pose = np.zeros((num_samples, 72))
    if with_smpl:
        pose[:, :3] = [np.pi, 0.0, 0.0]
        pose[:, 3:] = rng.normal(0, 0.1, (num_samples, 69))
    betas = rng.normal(0, 0.5, (num_samples, 10)) if with_smpl else np.zeros((num_samples, 10))
    img_rows, label_rows, hw_rows = [], [], []
    for i, key in enumerate(keys):
        img_rows.append([key, base64.b64encode(_jpeg(draw_people(keypoints[i : i + 1], seed + i))).decode()])
        label = {"center": center[i].tolist(), "scale": float(scale[i]), "2d_joints": j2d[i].tolist(),
                 "3d_joints": j3d[i].tolist(), "has_2d_joints": 1, "has_3d_joints": 1, "pose": pose[i].tolist(),
                 "betas": betas[i].tolist(), "has_smpl": int(with_smpl), "gender": "m"}  # fmt: skip
        label_rows.append([key, json.dumps([label])])
        hw_rows.append([key, json.dumps([{"height": IMAGE_H, "width": IMAGE_W}])])
    files = {kind: directory / f"{split}.{kind}.tsv" for kind in ("img", "label", "hw", "linelist")}
    _write_tsv(files["img"], img_rows)
    _write_tsv(files["label"], label_rows)
    _write_tsv(files["hw"], hw_rows)
    _write_tsv(files["linelist"], [[str(i)] for i in range(num_samples)])
    yaml_path = directory / f"{split}.yaml"
    yaml_path.write_text("".join(f"{kind}: {p.name}\n" for kind, p in files.items()))
    files["yaml"] = yaml_path
    return FakeScene(keys, keypoints, joints, center, scale, files=files,
                     extra={"pose": pose, "betas": betas, "2d_joints": j2d, "3d_joints": j3d,
                            "pelvis_cam": pelvis})  # fmt: skip


def _rodrigues(rotvec: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(rotvec).as_matrix()


def write_3dpw_sequence(root: str | Path, sequence: str = "courtyard_basketball_00", split: str = "test",
                        num_frames: int = 6, num_people: int = 2, seed: int = 0) -> FakeScene:  # fmt: skip
    """Write ``<root>/sequenceFiles/<split>/<sequence>.pkl`` in 3DPW's layout (``sequence``,
    ``genders``, ``betas`` (P × (10,)), ``poses`` (P × (F, 72), world frame), ``trans``,
    ``poses2d`` (P × (F, 3, 18) OpenPose-18 px), ``jointPositions`` (P × (F, 72) world metres),
    ``cam_poses`` (F, 4, 4) world → camera, ``cam_intrinsics`` (3, 3), ``campose_valid``
    (P × (F,)); the 60 Hz ``poses_60Hz``/``trans_60Hz`` (P × (2F + 1, ·)) and ``img_frame_ids``
    (F,) = 2f + 1, the index of image frame f into them, so that ``poses_60Hz[p][img_frame_ids]``
    equals ``poses[p]``) and one image per frame, ``imageFiles/<sequence>/image_{f:05d}.jpg``
    for f = 0 … F-1, showing that frame's people (a marker of :data:`MARKER_COLORS` at each
    keypoint) on a background whose blue level is :func:`frame_blue` (f) (``extra['blue']`` per
    sample), so an image tells which frame it is. Reading ``img_frame_ids`` as image numbers
    names another frame's image, or one that does not exist.

    The world frame is the camera's rotated by a known per-frame rotation about x, so the loader
    must apply ``cam_poses``. Person-frames that are not valid (the last frame of person 1) are
    returned with ``extra['valid']`` False. Samples are ordered person by person."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    joints_cam = _people(num_frames * num_people, rng).reshape(num_people, num_frames, 14, 3)
    keypoints = _project(joints_cam)
    angles = rng.uniform(-0.3, 0.3, num_frames)
    cam_rot = _rodrigues(np.stack([angles, np.zeros_like(angles), np.zeros_like(angles)], 1))  # world → camera
    cam_t = rng.normal(0, 0.2, (num_frames, 3))
    cam_poses = np.tile(np.eye(4), (num_frames, 1, 1))
    cam_poses[:, :3, :3], cam_poses[:, :3, 3] = cam_rot, cam_t
    # world = R^T (cam - t)
    joints_world = np.einsum("fji,pfkj->pfki", cam_rot, joints_cam - cam_t[None, :, None])
    smpl_world = np.zeros((num_people, num_frames, 24, 3))
    for j, name in enumerate(LSP_14):
        target = {"left_hip": "smpl_left_hip", "right_hip": "smpl_right_hip", "neck": "smpl_neck",
                  "head": "smpl_head"}.get(name, name)  # fmt: skip
        smpl_world[:, :, SMPL_24.index(target)] = joints_world[:, :, j]
    poses2d = np.transpose(_to_set(keypoints.reshape(-1, 14, 2), OPENPOSE_18).reshape(num_people, num_frames, 18, 3),
                           (0, 1, 3, 2))  # fmt: skip
    orient_cam = rng.normal(0, 0.2, (num_people, num_frames, 3)) + np.array([np.pi, 0.0, 0.0])
    from scipy.spatial.transform import Rotation

    orient_world = np.stack([
        Rotation.from_matrix(np.einsum("fji,pfjk->pfik", cam_rot, _rodrigues(orient_cam.reshape(-1, 3)).reshape(
            num_people, num_frames, 3, 3))[p]).as_rotvec() for p in range(num_people)])  # fmt: skip
    poses = np.concatenate([orient_world, rng.normal(0, 0.1, (num_people, num_frames, 69))], axis=2)
    trans = [rng.normal(0, 1, (num_frames, 3)) for _ in range(num_people)]
    valid = np.ones((num_people, num_frames), dtype=np.float64)
    if num_people > 1:
        valid[1, -1] = 0
    frame_ids = np.arange(num_frames) * 2 + 1  # image frame f → 60 Hz row 2f + 1 (3DPW's ≈ 2f)
    for f in range(num_frames):
        path = root / "imageFiles" / sequence / f"image_{f:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(draw_people(keypoints[:, f], seed + f, blue=frame_blue(f))))
    data = {
        "sequence": sequence, "genders": ["m", "f", "m"][:num_people],
        "betas": [rng.normal(0, 0.5, 10) for _ in range(num_people)],
        "betas_clothed": [np.zeros(10) for _ in range(num_people)],
        "poses": [poses[p] for p in range(num_people)],
        "trans": trans,
        "poses_60Hz": [_at_60hz(poses[p], frame_ids) for p in range(num_people)],
        "trans_60Hz": [_at_60hz(trans[p], frame_ids) for p in range(num_people)],
        "poses2d": [poses2d[p] for p in range(num_people)],
        "jointPositions": [smpl_world[p].reshape(num_frames, 72) for p in range(num_people)],
        "cam_poses": cam_poses, "cam_intrinsics": np.array([[FOCAL_PX, 0, IMAGE_W / 2], [0, FOCAL_PX, IMAGE_H / 2],
                                                            [0, 0, 1.0]]),
        "campose_valid": [valid[p] for p in range(num_people)], "img_frame_ids": frame_ids,
    }  # fmt: skip
    pkl = root / "sequenceFiles" / split / f"{sequence}.pkl"
    pkl.parent.mkdir(parents=True, exist_ok=True)
    with pkl.open("wb") as stream:
        pickle.dump(data, stream, protocol=2)
    flat = lambda a: a.reshape(num_people * num_frames, *a.shape[2:])  # noqa: E731
    names = [f"imageFiles/{sequence}/image_{f:05d}.jpg" for p in range(num_people) for f in range(num_frames)]
    kp = flat(keypoints)
    center, scale = _box(kp)
    return FakeScene(names, kp, flat(joints_cam), center, scale, files={"pkl": pkl, "root": root},
                     extra={"blue": np.tile([frame_blue(f) for f in range(num_frames)], num_people),
                            "valid": flat(valid) > 0, "orient_cam": flat(orient_cam), "poses": flat(poses),
                            "betas": np.repeat(np.stack(data["betas"]), num_frames, axis=0),
                            "gender": np.repeat(np.array(data["genders"]), num_frames)})  # fmt: skip


def frame_blue(frame: int) -> int:
    """The background's blue level in the image of 3DPW frame ``frame`` (:func:`write_3dpw_sequence`):
    16, 40, 64 … 232, then again (ten frames apart)."""
    return 16 + (24 * frame) % 240


def _at_60hz(per_frame: np.ndarray, frame_ids: np.ndarray) -> np.ndarray:
    """(F, D) per image frame → (2F + 1, D) at 60 Hz: row ``frame_ids[f]`` is frame f, the rows
    between are the mean of their neighbours, the first is the first frame's."""
    out = np.zeros((2 * len(per_frame) + 1, per_frame.shape[1]))
    out[frame_ids] = per_frame
    out[0] = per_frame[0]
    out[2:-1:2] = (per_frame[:-1] + per_frame[1:]) / 2.0
    out[-1] = per_frame[-1]
    return out


def write_coco_keypoints(root: str | Path, split: str = "train2014", num_images: int = 4, people_per_image: int = 2,
                         seed: int = 0) -> FakeScene:  # fmt: skip
    """Write ``<root>/annotations/person_keypoints_<split>.json`` (COCO: ``images``,
    ``annotations`` with 51 ``keypoints`` (x, y, v with v ∈ {0, 1, 2}), ``bbox`` [x, y, w, h],
    ``num_keypoints``, ``iscrowd``, ``category_id`` 1; ``categories`` with the 17 keypoint names)
    and ``<root>/<split>/COCO_<split>_%012d.jpg``. The last keypoint (right ankle) of every
    second person is unlabeled (v = 0). One crowd annotation per file is added (to be skipped)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = num_images * people_per_image
    joints = _people(n, rng)
    joints[:, :, 0] += np.tile(np.linspace(-0.6, 0.6, people_per_image), num_images)[:, None]
    keypoints = _project(joints)
    images, annotations, names = [], [], []
    for k in range(num_images):
        image_id = 1000 + k
        file_name = f"COCO_{split}_{image_id:012d}.jpg"
        people = keypoints[k * people_per_image : (k + 1) * people_per_image]
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / file_name).write_bytes(_jpeg(draw_people(people, seed + k)))
        images.append({"id": image_id, "file_name": file_name, "width": IMAGE_W, "height": IMAGE_H})
    coco = _to_set(keypoints, COCO_17, conf=2.0)
    coco[1::2, COCO_17.index("right_ankle")] = 0.0
    for i in range(n):
        kp = coco[i]
        labelled = kp[:, 2] > 0
        lo, hi = kp[labelled, :2].min(0), kp[labelled, :2].max(0)
        annotations.append({"id": 1 + i, "image_id": 1000 + i // people_per_image, "category_id": 1, "iscrowd": 0,
                            "keypoints": [round(float(v), 2) for v in kp.reshape(-1)],
                            "num_keypoints": int(labelled.sum()), "bbox": [*lo.tolist(), *(hi - lo).tolist()],
                            "area": float(np.prod(hi - lo))})  # fmt: skip
        names.append(f"{split}/COCO_{split}_{1000 + i // people_per_image:012d}.jpg")
    annotations.append({"id": 9999, "image_id": 1000, "category_id": 1, "iscrowd": 1, "keypoints": [0] * 51,
                        "num_keypoints": 0, "bbox": [0, 0, 10, 10], "area": 100.0})  # fmt: skip
    doc = {"info": {"description": "pchmr fake COCO"}, "images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_17),
                           "skeleton": [[16, 14], [14, 12]]}]}  # fmt: skip
    path = root / "annotations" / f"person_keypoints_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    boxes = np.array([a["bbox"] for a in annotations[:n]])
    center = boxes[:, :2] + boxes[:, 2:] / 2
    scale = BOX_FACTOR * boxes[:, 2:].max(1) / 200.0
    return FakeScene(names, keypoints, joints, center, scale, files={"json": path, "root": root},
                     extra={"coco_keypoints": coco})  # fmt: skip
