"""The embedded ``synthetic`` dataset: body-model renders with exact 3D ground truth.

Every sample is a posed body (one of :data:`NUM_SUBJECTS` fixed subjects, one action family of
the body model's pose sampler) rendered with one colour per body part (left limbs warm, right
limbs cool, torso front white and back dark grey, face skin and back of the head dark) over a
patterned background, by the CPU rasteriser of :mod:`pchmr.core.kit.render`.

Labels, chosen for non-IID federated splits (``meta`` of every sample, ``HMRData.labels``):

* ``subject``: ``subject-00`` … ``subject-23``, a fixed shape vector each (the same in both
  splits); each source films mostly its own six subjects;
* ``action``: the body model's pose families (Anny: stand, walk, reach, squat, kick, wave);
* ``scene``: one of :data:`SCENES`, the background style;
* ``source``: one of :data:`SOURCES`, a simulated source dataset with its own camera distance,
  elevation and body-yaw ranges and its own preferred actions and scenes.

Camera: OpenCV frame, the body at a random yaw about its vertical axis, seen from a source-
specific distance and elevation; the focal length and principal point are chosen so that the
body's bounding box (its longer side) fills :attr:`SourceStyle.fill` of the crop and is centred
in it. ``keypoints_2d`` are the projections of the evaluation joints in crop coordinates;
``joints_3d`` and ``vertices`` are camera-frame metres relative to the root (mid-hip). The
absolute root position and the intrinsics are kept in the cache (``root_cam``, ``camera`` =
(f, cx, cy) in pixels, continuous coordinates) so that ``project(joints_3d + root_cam)`` gives
``keypoints_2d`` back.

Option (``--dataset-option``, :class:`SyntheticOptions`): ``2d-only`` = comma-separated sources
whose *training* samples keep only their 2D keypoints: ``joints_3d`` all invalid (validity 0),
``vertices`` zeros and ``has_vertices`` 0, as a 2D-only dataset (COCO, MPII) gives them; the loss
then trains those samples on the 2D reprojection term alone. The test split keeps everything. The
cache is not affected (the labels are masked when read). ``tilt`` = comma-separated sources whose
training 3D labels (joints and mesh, root-relative) are rotated about the camera's x axis by
``tilt-degrees`` (default 180: OpenGL's y-up, z-backward camera frame against OpenCV's): labels
in another frame convention, or from a miscalibrated camera, for the same kind of images, so
that those clients' updates oppose the others'.

Preparation runs once per (seed, sizes, image size, body model, :data:`DATASET_VERSION`): the
arrays are written as ``.npy`` files into a temporary directory renamed into place when
complete, then always read back with ``np.load(mmap_mode="r")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.sample import META_KEYS, normalize_image
from pchmr.core.kit.render import PinholeCamera, render_mesh

__all__ = [
    "DATASET_VERSION",
    "SCENES",
    "SOURCES",
    "SourceStyle",
    "SyntheticOptions",
    "SyntheticSplit",
    "make_synthetic",
    "pchmr_datasets",
]

#: Bump when anything changes what a cache holds; old caches are then ignored.
DATASET_VERSION = 2
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_TEST = 200
NUM_SUBJECTS = 24
#: Probability that a sample shows one of its source's own subjects.
HOME_SUBJECT_PROB = 0.85
#: Bodies posed per body-model forward.
RENDER_BATCH = 64
SPLITS = ("train", "test")
_SPLIT_STREAM = {"subjects": 0, "train": 1, "test": 2}

SCENES = (
    "sky_gradient", "horizon_floor", "radial_glow", "vertical_stripes",
    "checker", "diagonal_bands", "soft_blobs", "side_gradient",
)  # fmt: skip

#: RGB in [0, 1] per body part; names follow :data:`pchmr.plugins.bodymodels.anny.PART_NAMES`
#: plus the front/back splits of ``torso`` and ``head``.
PART_COLORS: dict[str, tuple[float, float, float]] = {
    "head_front": (0.96, 0.80, 0.66), "head_back": (0.22, 0.13, 0.07), "neck": (0.85, 0.68, 0.55),
    "torso_front": (0.97, 0.97, 0.97), "torso_back": (0.30, 0.30, 0.36), "hips": (0.18, 0.18, 0.22),
    "left_upper_arm": (1.00, 0.50, 0.00), "left_forearm": (1.00, 0.85, 0.10), "left_hand": (0.70, 0.30, 0.00),
    "right_upper_arm": (0.00, 0.72, 0.20), "right_forearm": (0.00, 0.90, 0.90), "right_hand": (0.00, 0.35, 0.55),
    "left_thigh": (0.90, 0.08, 0.08), "left_shin": (1.00, 0.50, 0.62), "left_foot": (0.55, 0.00, 0.20),
    "right_thigh": (0.10, 0.20, 0.90), "right_shin": (0.55, 0.62, 1.00), "right_foot": (0.12, 0.00, 0.45),
}  # fmt: skip
_UNKNOWN_PART_COLOR = (0.6, 0.6, 0.6)


@dataclass(frozen=True)
class SourceStyle:
    """A simulated source dataset: its camera ranges, preferences and share of the samples.

    Angles in degrees; ``yaw`` 0 faces the camera; ``elevation`` > 0 looks down on the body;
    ``fill`` is the fraction of the crop side the body's bounding box covers."""

    name: str
    share: float
    distance: tuple[float, float]
    elevation: tuple[float, float]
    yaw: tuple[float, float]
    fill: tuple[float, float]
    action_weights: Mapping[str, float]
    scene_weights: Mapping[str, float]


SOURCES = (
    SourceStyle(
        "studio", 0.35, (3.0, 4.5), (-5.0, 10.0), (-180.0, 180.0), (0.80, 0.90),
        {"stand": 3, "reach": 3, "wave": 3, "walk": 1, "squat": 1, "kick": 1},
        {"radial_glow": 4, "sky_gradient": 3, "side_gradient": 3, "soft_blobs": 1},
    ),
    SourceStyle(
        "outdoor", 0.30, (5.0, 9.0), (0.0, 20.0), (-90.0, 90.0), (0.70, 0.85),
        {"walk": 5, "stand": 2, "kick": 2, "wave": 1, "reach": 1, "squat": 0.5},
        {"sky_gradient": 3, "horizon_floor": 4, "soft_blobs": 2, "side_gradient": 1},
    ),
    SourceStyle(
        "indoor", 0.20, (2.2, 3.5), (10.0, 35.0), (-60.0, 60.0), (0.75, 0.90),
        {"stand": 2, "squat": 3, "reach": 2, "wave": 2, "walk": 1, "kick": 0.5},
        {"checker": 4, "vertical_stripes": 3, "horizon_floor": 2, "diagonal_bands": 1},
    ),
    SourceStyle(
        "sports", 0.15, (4.0, 7.0), (-10.0, 5.0), (-180.0, 180.0), (0.70, 0.88),
        {"kick": 4, "squat": 2, "walk": 2, "reach": 1, "stand": 0.5, "wave": 0.5},
        {"diagonal_bands": 3, "soft_blobs": 3, "horizon_floor": 2, "checker": 1},
    ),
)  # fmt: skip


SOURCE_NAMES = tuple(style.name for style in SOURCES)


@dataclass(frozen=True)
class SyntheticOptions:
    """``--dataset-option`` values of ``synthetic``."""

    only_2d: str = option(
        "",
        key="2d-only",
        help=f"comma-separated sources ({', '.join(SOURCE_NAMES)}) whose training samples keep only their 2D "
        "keypoints (no 3D joints, no mesh); the test split keeps everything",
    )

    tilt: str = option(
        "",
        help="comma-separated sources whose training 3D labels (joints, mesh) are given in a camera frame "
        "pitched by tilt-degrees about its x axis (another frame convention, a miscalibrated camera); "
        "images and 2D keypoints unchanged",
    )
    tilt_degrees: float = option(
        180.0, low=-180.0, high=180.0, help="the pitch of the tilted sources' label frame; 180 = OpenGL's y up, z back"
    )

    def __post_init__(self) -> None:
        for key, names in (("2d-only", self.sources_2d), ("tilt", self.tilted_sources)):
            unknown = [name for name in names if name not in SOURCE_NAMES]
            if unknown:
                raise ValueError(f"'{key}' must name sources among {', '.join(SOURCE_NAMES)}, got {', '.join(unknown)}")
        both = [name for name in self.tilted_sources if name in self.sources_2d]
        if both:
            raise ValueError(f"'tilt' must name sources with 3D labels, got {', '.join(both)}, which '2d-only' names")

    @property
    def sources_2d(self) -> tuple[str, ...]:
        """The sources of ``2d-only``, as given (without blanks and repeats)."""
        return _names(self.only_2d)

    @property
    def tilted_sources(self) -> tuple[str, ...]:
        """The sources of ``tilt``, as given (without blanks and repeats)."""
        return _names(self.tilt)


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def label_tilt(degrees: float) -> np.ndarray:
    """(3, 3) rotation about the camera's x axis by ``degrees``: camera-frame labels → the tilted frame."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@runtime_checkable
class PoseableBody(Protocol):
    """What the synthetic dataset needs from a body model beyond :class:`BodyModel`:
    ``pose`` parameters whose entry 0 is the global (root) rotation as axis-angle, a shape
    parameter named ``shape_param``, samplers, and a part label per vertex."""

    shape_param: str
    actions: tuple[str, ...]

    def sample_pose(self, n: int, generator: np.random.Generator, action: str) -> np.ndarray: ...

    def sample_shape(self, n: int, generator: np.random.Generator) -> np.ndarray: ...

    def vertex_parts(self) -> tuple[np.ndarray, tuple[str, ...]]: ...

    def rest_vertices(self) -> np.ndarray: ...


# ------------------------------------------------------------------------------ appearance
def face_colors(body: PoseableBody, faces: np.ndarray) -> np.ndarray:
    """(F, 3) float RGB per triangle: the colour of its body part (the part two of its three
    vertices share, else its first vertex's), with the torso and the head split into a front
    and a back half at the middle of their rest-pose depth (body z)."""
    parts, names = body.vertex_parts()
    face_part = np.where(parts[faces[:, 1]] == parts[faces[:, 2]], parts[faces[:, 1]], parts[faces[:, 0]])
    centroid_z = body.rest_vertices()[faces].mean(axis=1)[:, 2]
    colors = np.empty((len(faces), 3))
    for index, name in enumerate(names):
        mask = face_part == index
        if not mask.any():
            continue
        if name in ("torso", "head"):
            z = centroid_z[mask]
            front = z > 0.5 * (z.min() + z.max())
            colors[mask] = np.where(front[:, None], PART_COLORS[f"{name}_front"], PART_COLORS[f"{name}_back"])
        else:
            colors[mask] = PART_COLORS.get(name, _UNKNOWN_PART_COLOR)
    return colors


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A background colour: any hue, low saturation, mid value (body parts stay salient)."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.08, 0.45), rng.uniform(0.25, 0.85)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _shifted(color: np.ndarray, rng: np.random.Generator, amount: float = 0.15) -> np.ndarray:
    return np.clip(color + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def make_background(scene: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 background of one of :data:`SCENES`; patterns scale with ``size``."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    c1, c2 = _muted_color(rng), _muted_color(rng)
    if scene == "sky_gradient":
        t = y
    elif scene == "side_gradient":
        t = x if rng.random() < 0.5 else 1.0 - x
        t = t * (1.0 - 0.3 * ((y - 0.5) ** 2))
    elif scene == "horizon_floor":
        horizon = rng.uniform(0.5, 0.8)
        t = np.where(y < horizon, 0.25 * y / horizon, 0.7 + 0.3 * (y - horizon) / (1.0 - horizon))
    elif scene == "radial_glow":
        cx, cy, radius = rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.6), rng.uniform(0.5, 1.0)
        t = np.clip(np.hypot(x - cx, y - cy) / radius, 0.0, 1.0)
    elif scene == "vertical_stripes":
        c2 = _shifted(c1, rng)
        t = (((x / rng.uniform(0.08, 0.2)) + rng.uniform(0, 1)) % 1.0 < 0.5).astype(float)
    elif scene == "checker":
        c2 = _shifted(c1, rng)
        angle, tile = rng.uniform(0, np.pi), rng.uniform(0.08, 0.2)
        u = (x * np.cos(angle) + y * np.sin(angle)) / tile
        v = (-x * np.sin(angle) + y * np.cos(angle)) / tile
        t = ((np.floor(u) + np.floor(v)) % 2).astype(float)
    elif scene == "diagonal_bands":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    elif scene == "soft_blobs":
        t = np.zeros_like(x)
        image = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(rng.integers(3, 6)):
            cx, cy, sigma = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.25)
            weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))[..., None]
            image = image * (1 - weight) + _muted_color(rng) * weight
        return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown scene {scene!r}; scenes are {list(SCENES)}")
    image = c1 * (1.0 - t[..., None]) + c2 * t[..., None]
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------ sample plan
@dataclass
class _Plan:
    """Every random choice of one split, drawn before any rendering (so batching cannot
    change the result)."""

    source: np.ndarray  # (N,) index into SOURCES
    subject: np.ndarray  # (N,)
    action: np.ndarray  # (N,) str
    scene: np.ndarray  # (N,) str
    pose: np.ndarray  # (N, *pose) float32, global rotation in pose[:, 0]
    shape: np.ndarray  # (N, *shape) float32
    distance: np.ndarray  # (N,) metres
    elevation: np.ndarray  # (N,) degrees
    roll: np.ndarray  # (N,) degrees
    fill: np.ndarray  # (N,)
    light: np.ndarray  # (N, 3)
    ambient: np.ndarray  # (N,)
    background_seed: np.ndarray  # (N,) uint64


def _weights(table: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    w = np.array([float(table.get(name, 0.0)) for name in names])
    if w.sum() <= 0:
        w = np.ones(len(names))
    return w / w.sum()


def _axis_angle_y(degrees: np.ndarray) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.zeros_like(rad), rad, np.zeros_like(rad)], axis=-1)


def plan_split(n: int, rng: np.random.Generator, body: PoseableBody, subject_shapes: np.ndarray) -> _Plan:
    """Draw sources, subjects, actions, scenes, poses and camera settings of ``n`` samples."""
    actions = tuple(body.actions)
    names = [s.name for s in SOURCES]
    source = rng.choice(len(SOURCES), size=n, p=_weights({s.name: s.share for s in SOURCES}, names))
    per_source = NUM_SUBJECTS // len(SOURCES)
    home = source * per_source + rng.integers(0, per_source, n)
    subject = np.where(rng.random(n) < HOME_SUBJECT_PROB, home, rng.integers(0, NUM_SUBJECTS, n))
    action = np.empty(n, dtype=object)
    scene = np.empty(n, dtype=object)
    low, high = {}, {}
    for key in ("distance", "elevation", "yaw", "fill"):
        low[key] = np.array([getattr(SOURCES[s], key)[0] for s in source])
        high[key] = np.array([getattr(SOURCES[s], key)[1] for s in source])
    for s, style in enumerate(SOURCES):
        mask = source == s
        action[mask] = rng.choice(actions, size=mask.sum(), p=_weights(style.action_weights, actions))
        scene[mask] = rng.choice(SCENES, size=mask.sum(), p=_weights(style.scene_weights, SCENES))
    uniform = {key: low[key] + (high[key] - low[key]) * rng.random(n) for key in low}

    pose_shape = np.asarray(body.sample_pose(1, np.random.default_rng(0), actions[0])).shape[1:]
    pose = np.zeros((n, *pose_shape), dtype=np.float32)
    for name in actions:
        idx = np.nonzero(action == name)[0]
        if len(idx):
            pose[idx] = body.sample_pose(len(idx), rng, name)
    pose[:, 0] = _axis_angle_y(uniform["yaw"])
    light = np.stack([rng.uniform(-0.6, 0.6, n), rng.uniform(-0.9, -0.2, n), -np.ones(n)], axis=1)
    return _Plan(
        source=source, subject=subject, action=action.astype(str), scene=scene.astype(str), pose=pose,
        shape=subject_shapes[subject], distance=uniform["distance"], elevation=uniform["elevation"],
        roll=rng.uniform(-5.0, 5.0, n), fill=uniform["fill"], light=light,
        ambient=rng.uniform(0.3, 0.5, n), background_seed=rng.integers(0, 2**63, n, dtype=np.uint64),
    )  # fmt: skip


# ----------------------------------------------------------------------------------- camera
def camera_rotation(elevation_deg: np.ndarray, roll_deg: np.ndarray) -> np.ndarray:
    """(N, 3, 3) body frame (y up, z front) → camera frame (x right, y down, z forward) for a
    camera facing the body's front, raised by ``elevation`` (looking down) and rolled."""
    flip = np.diag([1.0, -1.0, -1.0])  # facing the camera: body left → image right
    e, r = np.radians(elevation_deg), np.radians(roll_deg)
    ce, se, cr, sr = np.cos(e), np.sin(e), np.cos(r), np.sin(r)
    zeros, ones = np.zeros_like(e), np.ones_like(e)
    pitch = np.stack([ones, zeros, zeros, zeros, ce, se, zeros, -se, ce], -1).reshape(-1, 3, 3)
    roll = np.stack([cr, -sr, zeros, sr, cr, zeros, zeros, zeros, ones], -1).reshape(-1, 3, 3)
    return roll @ pitch @ flip


def fit_intrinsics(points_cam: np.ndarray, fill: np.ndarray, size: int) -> np.ndarray:
    """(N, P, 3) camera-frame points and (N,) fill fractions → (N, 3) (f, cx, cy) in pixels
    such that the points' bounding box has its longer side ``fill * size`` and is centred."""
    xn = points_cam[..., 0] / points_cam[..., 2]
    yn = points_cam[..., 1] / points_cam[..., 2]
    lo_x, hi_x, lo_y, hi_y = xn.min(1), xn.max(1), yn.min(1), yn.max(1)
    focal = fill * size / np.maximum(hi_x - lo_x, hi_y - lo_y)
    cx = size / 2.0 - focal * 0.5 * (lo_x + hi_x)
    cy = size / 2.0 - focal * 0.5 * (lo_y + hi_y)
    return np.stack([focal, cx, cy], axis=1)


def project_to_crop(points_cam: np.ndarray, intrinsics: np.ndarray, size: int) -> np.ndarray:
    """(N, P, 3) camera-frame points, (N, 3) (f, cx, cy) → (N, P, 2) crop coordinates [-1, 1]."""
    f, cx, cy = (intrinsics[:, i, None] for i in range(3))
    u = f * points_cam[..., 0] / points_cam[..., 2] + cx
    v = f * points_cam[..., 1] / points_cam[..., 2] + cy
    return np.stack([2.0 * u / size - 1.0, 2.0 * v / size - 1.0], axis=-1)


# ------------------------------------------------------------------------------ preparation
_ARRAY_FILES = ("images", "keypoints_2d", "joints_3d", "vertices", "pose", "shape", "root_cam", "camera")


def _require_poseable(body_model: BodyModel) -> PoseableBody:
    if not isinstance(body_model, PoseableBody):
        needed = ("shape_param", "actions", "sample_pose", "sample_shape", "vertex_parts", "rest_vertices")
        missing = [m for m in needed if not hasattr(body_model, m)]
        raise TypeError(
            f"body model {getattr(body_model, 'name', type(body_model).__name__)!r} cannot drive the synthetic "
            f"dataset: it lacks {missing}; use a body model that samples poses and shapes (e.g. 'anny')"
        )
    return body_model


def _render_split(
    directory: Path, plan: _Plan, body_model: BodyModel, colors: np.ndarray, size: int, progress: Any, task: Any
) -> None:
    """Pose, light and render every sample of ``plan`` into ``.npy`` files under ``directory``."""
    n, faces = len(plan.source), body_model.faces.cpu().numpy()
    num_joints, num_vertices = body_model.num_joints, body_model.num_vertices
    fmt = np.lib.format
    images = fmt.open_memmap(directory / "images.npy", "w+", np.uint8, (n, size, size, 3))
    vertices = fmt.open_memmap(directory / "vertices.npy", "w+", np.float32, (n, num_vertices, 3))
    keypoints = np.zeros((n, num_joints, 3), np.float32)
    joints = np.zeros((n, num_joints, 4), np.float32)
    root_cam = np.zeros((n, 3), np.float32)
    intrinsics_all = np.zeros((n, 3), np.float32)
    shape_param = body_model.shape_param  # type: ignore[attr-defined]
    for start in range(0, n, RENDER_BATCH):
        batch = slice(start, min(start + RENDER_BATCH, n))
        with torch.no_grad():
            params = {"pose": torch.from_numpy(plan.pose[batch]), shape_param: torch.from_numpy(plan.shape[batch])}
            out = body_model(**params)
            root = body_model.root(out.joints)
        rotation = camera_rotation(plan.elevation[batch], plan.roll[batch])
        rotation_t = np.ascontiguousarray(rotation.transpose(0, 2, 1))
        verts_rel = (out.vertices - root).double().numpy() @ rotation_t
        joints_rel = (out.joints - root).double().numpy() @ rotation_t
        root_position = np.stack([np.zeros_like(plan.distance[batch])] * 2 + [plan.distance[batch]], axis=1)
        # Render the float32 vertices that are stored, so the images are exactly their renders.
        verts_cam = verts_rel.astype(np.float32).astype(np.float64) + root_position[:, None]
        intrinsics = fit_intrinsics(verts_cam, plan.fill[batch], size)
        keypoints[batch, :, :2] = project_to_crop(joints_rel + root_position[:, None], intrinsics, size)
        keypoints[batch, :, 2] = 1.0
        joints[batch, :, :3] = joints_rel
        joints[batch, :, 3] = 1.0
        vertices[batch] = verts_rel
        root_cam[batch] = root_position
        intrinsics_all[batch] = intrinsics
        for k, i in enumerate(range(batch.start, batch.stop)):
            background = make_background(plan.scene[i], size, np.random.default_rng(int(plan.background_seed[i])))
            f, cx, cy = intrinsics[k]
            camera = PinholeCamera(f, f, cx, cy, size, size)
            light = tuple(plan.light[i])
            images[i] = render_mesh(verts_cam[k], faces, colors, camera, background, light, plan.ambient[i])
        progress.advance(task, batch.stop - batch.start)
    images.flush()
    vertices.flush()
    del images, vertices
    arrays = {"keypoints_2d": keypoints, "joints_3d": joints, "pose": plan.pose, "shape": plan.shape,
              "root_cam": root_cam, "camera": intrinsics_all}  # fmt: skip
    for name, value in arrays.items():
        np.save(directory / f"{name}.npy", np.ascontiguousarray(value, dtype=np.float32))
    labels = {"subject": np.array([f"subject-{s:02d}" for s in plan.subject]), "action": plan.action,
              "scene": plan.scene, "source": np.array([SOURCES[s].name for s in plan.source])}  # fmt: skip
    for key in META_KEYS:
        np.save(directory / f"label_{key}.npy", labels[key].astype(str))


def cache_key(spec: DatasetSpec, body_model: BodyModel, num_train: int, num_test: int) -> str:
    """Directory name of one prepared dataset under ``spec.cache_dir``."""
    identity = {
        "version": DATASET_VERSION, "seed": spec.seed, "num_train": num_train, "num_test": num_test,
        "image_size": spec.image_size, "body_model": body_model.name, "num_vertices": body_model.num_vertices,
        "num_joints": body_model.num_joints,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"synthetic-v{DATASET_VERSION}-seed{spec.seed}-{digest}"


def prepare(spec: DatasetSpec, body_model: BodyModel, num_train: int, num_test: int) -> Path:
    """Render both splits into ``spec.cache_dir`` unless a complete cache exists; return it.

    The work happens in a temporary sibling directory renamed into place at the end, so an
    interrupted preparation leaves nothing that a later run would trust."""
    body = _require_poseable(body_model)
    cache_root = Path(spec.cache_dir).expanduser()
    final = cache_root / cache_key(spec, body_model, num_train, num_test)
    if (final / "info.json").is_file():
        return final
    from rich.progress import Progress

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_root))
    try:
        subject_shapes = body.sample_shape(NUM_SUBJECTS, split_generator(spec.seed, "subjects"))
        colors = face_colors(body, body_model.faces.cpu().numpy())
        counts = {"train": num_train, "test": num_test}
        with Progress(transient=True) as progress, _single_torch_thread():
            task = progress.add_task(f"rendering synthetic data ({spec.image_size}px)", total=num_train + num_test)
            for split in SPLITS:
                (tmp / split).mkdir()
                plan = plan_split(counts[split], split_generator(spec.seed, split), body, subject_shapes)
                _render_split(tmp / split, plan, body_model, colors, spec.image_size, progress, task)
        np.save(tmp / "subject_shapes.npy", subject_shapes)
        info = {"version": DATASET_VERSION, "seed": spec.seed, "image_size": spec.image_size, "num_train": num_train,
                "num_test": num_test, "body_model": body_model.name, "shape_param": body.shape_param}  # fmt: skip
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "info.json").is_file():  # not a concurrent preparation that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Run the batched body-model forwards on one intra-op thread (restored afterwards): the
    small per-batch ops gain little from threads and lose several-fold when other processes
    share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def split_generator(seed: int, name: str) -> np.random.Generator:
    """The random stream of ``"subjects"``, ``"train"`` or ``"test"`` for a dataset seed."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[name]]))


# ---------------------------------------------------------------------------------- dataset
class SyntheticSplit(Dataset):
    """One prepared split, read from its memory-mapped ``.npy`` files; items are Samples
    (:mod:`pchmr.core.contracts.sample`). :meth:`array` exposes the stored arrays (``pose``,
    ``shape``, ``root_cam``, ``camera`` …) for tests and annotators."""

    def __init__(
        self, directory: Path, sources_2d: Sequence[str] = (), tilted: Sequence[str] = (), tilt_degrees: float = 0.0
    ) -> None:
        self.directory = Path(directory)
        self.labels = {key: np.load(self.directory / f"label_{key}.npy") for key in META_KEYS}
        self._length = len(self.labels[META_KEYS[0]])
        self._arrays: dict[str, np.ndarray] = {}
        #: (N,) bool: the samples whose 3D labels are withheld (their source is in ``sources_2d``)
        self.only_2d = np.isin(self.labels["source"], list(sources_2d))
        #: (N,) bool: the samples whose 3D labels are rotated by :attr:`tilt` (their source is in ``tilted``)
        self.tilted = np.isin(self.labels["source"], list(tilted))
        self.tilt = label_tilt(tilt_degrees).astype(np.float32)

    def labels_3d(self, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Sample ``index``'s ``joints_3d`` (J, 4), ``vertices`` (V, 3) as training sees them (tilted,
        or zeros for a 2D-only sample) and whether it has 3D labels."""
        joints, vertices = np.array(self.array("joints_3d")[index]), np.array(self.array("vertices")[index])
        if self.only_2d[index]:
            return np.zeros_like(joints), np.zeros_like(vertices), False
        if self.tilted[index]:
            joints[:, :3] = joints[:, :3] @ self.tilt.T
            vertices = vertices @ self.tilt.T
        return joints, vertices, True

    def __len__(self) -> int:
        return self._length

    def array(self, name: str) -> np.ndarray:
        """The memory-mapped (N, ...) array ``name`` (one of ``images, keypoints_2d, joints_3d,
        vertices, pose, shape, root_cam, camera``)."""
        if name not in _ARRAY_FILES:
            raise KeyError(f"no synthetic array {name!r}; stored arrays are {list(_ARRAY_FILES)}")
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._length <= index < self._length:
            raise IndexError(f"sample {index} out of range for a split of {self._length}")
        index = int(index) % self._length
        joints, vertices, has_3d = self.labels_3d(index)
        return {
            "image": normalize_image(torch.from_numpy(np.array(self.array("images")[index]))),
            "keypoints_2d": torch.from_numpy(np.array(self.array("keypoints_2d")[index])),
            "joints_3d": torch.from_numpy(joints),
            "pelvis_3d": torch.zeros(4),  # no Human3.6M pelvis: invalid (synthetic is evaluated mid-hip aligned)
            "vertices": torch.from_numpy(vertices),
            "has_vertices": torch.tensor(1.0 if has_3d else 0.0),
            "index": torch.tensor(index, dtype=torch.int64),
            "meta": {key: str(self.labels[key][index]) for key in META_KEYS},
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the memory maps (they would be copied in full); reopened lazily."""
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


def make_synthetic(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """The factory registered as ``synthetic``: prepare once (cached), then read, withholding the 3D
    labels of the ``2d-only`` sources' training samples."""
    options = read_options(SyntheticOptions, spec.options, plugin="synthetic", kind="dataset")
    num_train = DEFAULT_NUM_TRAIN if spec.num_train is None else int(spec.num_train)
    num_test = DEFAULT_NUM_TEST if spec.num_test is None else int(spec.num_test)
    if num_train < 1 or num_test < 1:
        raise ValueError(f"synthetic needs at least one train and one test sample, got {num_train} and {num_test}")
    if spec.image_size < 8:
        raise ValueError(f"synthetic renders square crops of at least 8 px, got image_size={spec.image_size}")
    directory = prepare(spec, body_model, num_train, num_test)
    train = SyntheticSplit(directory / "train", options.sources_2d, options.tilted_sources, options.tilt_degrees)
    test = SyntheticSplit(directory / "test")
    protocol = {"dataset": "synthetic", "gt": "real", "image_size": spec.image_size, "seed": spec.seed,
                "num_train": num_train, "num_test": num_test, "body_model": body_model.name,
                "version": DATASET_VERSION}  # fmt: skip
    # the mean-pose baseline sees the 3D labels training sees (tilted ones tilted, none of the 2D-only)
    stored = np.asarray(train.array("joints_3d")[..., :3], dtype=np.float64)
    stored[train.tilted] = stored[train.tilted] @ train.tilt.T.astype(np.float64)
    with_3d = ~train.only_2d
    mean_joints = stored[with_3d].mean(axis=0).astype(np.float32) if with_3d.any() else None
    return HMRData(
        train=train, test=test, labels=dict(train.labels), protocol=protocol,
        train_mean_joints=mean_joints, extra={"cache_path": str(directory)},
    )  # fmt: skip


make_synthetic.options = SyntheticOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_datasets() -> Mapping[str, Any]:
    return {"synthetic": make_synthetic}
