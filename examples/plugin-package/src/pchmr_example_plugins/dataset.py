"""``example-turntable``: any body model at rest, turned on a turntable in front of a camera.

Every sample is the body model's rest pose (zero parameters) turned by a random yaw about its
vertical axis and placed 3.5-5 m in front of a pinhole camera of focal length
:data:`FOCAL_CROP` (crop units); the image is the stick figure of its joints, one coloured
square per joint on a grey background. Ground truth is exact: ``joints_3d`` and ``vertices`` in
camera-frame metres relative to the root, ``keypoints_2d`` their projections in crop coordinates.

Labels (``meta``): ``subject`` cycles over 4 values, ``action`` is ``turn-left`` or
``turn-right`` (the yaw's sign), ``scene`` ``plain`` and ``source`` the dataset's name.

Options (``spec.options``): ``max_yaw_deg`` (default 90, in [0, 180]). Samples are made in
memory from ``spec.seed`` (nothing is worth caching); ``spec.path`` is ignored.

Written from ``docs/plugins.md`` alone; only :mod:`pchmr.api` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pchmr.api import BodyModel, DatasetSpec, HMRData, hookimpl, normalize_image, option, read_options

__all__ = ["NAME", "TurntableOptions", "make_turntable", "pchmr_datasets"]

NAME = "example-turntable"
DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST = 64, 16
#: Focal length of the camera, crop units: a 1.7 m body 3.5-5 m away spans ±0.6-0.85 of the crop.
FOCAL_CROP = 3.5
DISTANCE_RANGE_M = (3.5, 5.0)
DEFAULT_MAX_YAW_DEG = 90.0
SUBJECTS = 4
#: Half side of a joint's square in pixels, and the background's grey level.
MARKER_HALF_PX = 1
BACKGROUND = 96
_SPLIT_STREAM = {"train": 1, "test": 2}
#: Body frame (x left, y up, z front) → camera frame (x right, y down, z forward) for a body
#: facing the camera: a half turn about x.
BODY_TO_CAMERA = (1.0, -1.0, -1.0)


@dataclass(frozen=True)
class TurntableOptions:
    """The options of ``example-turntable`` (``spec.options``)."""

    max_yaw_deg: float = option(
        DEFAULT_MAX_YAW_DEG, low=0.0, high=180.0, key="max_yaw_deg", help="largest turn away from the camera, degrees"
    )


def _yaw_matrix(yaw: float) -> Tensor:
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _draw(keypoints: Tensor, size: int) -> Tensor:
    """(J, 3) crop coordinates → (3, S, S) normalised image of one coloured square per joint."""
    image = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    for j, (u, v) in enumerate(((keypoints[:, :2] + 1.0) * size / 2.0).tolist()):
        rows = slice(max(int(v) - MARKER_HALF_PX, 0), int(v) + MARKER_HALF_PX + 1)
        cols = slice(max(int(u) - MARKER_HALF_PX, 0), int(u) + MARKER_HALF_PX + 1)
        image[rows, cols] = ((53 * j) % 256, (101 * j + 80) % 256, (197 * j + 40) % 256)
    return normalize_image(torch.from_numpy(image))


def _split(body_model: BodyModel, n: int, size: int, rng: np.random.Generator, max_yaw: float) -> list[dict]:
    """``n`` Samples (pchmr's Sample schema) of the rest body on the turntable."""
    zeros = {name: torch.zeros(1, *shape) for name, shape in body_model.param_shapes.items()}
    with torch.no_grad():
        rest = body_model(**zeros)
    flip = torch.tensor(BODY_TO_CAMERA)
    samples = []
    for i in range(n):
        yaw, distance = float(rng.uniform(-max_yaw, max_yaw)), float(rng.uniform(*DISTANCE_RANGE_M))
        turn = _yaw_matrix(yaw).T
        joints, vertices = (rest.joints[0] @ turn) * flip, (rest.vertices[0] @ turn) * flip
        root = body_model.root(joints[None])[0]
        joints, vertices = joints - root, vertices - root
        uv = FOCAL_CROP * joints[:, :2] / (joints[:, 2:] + distance)
        keypoints = torch.cat((uv, torch.ones(len(uv), 1)), dim=1)
        samples.append({
            "image": _draw(keypoints, size),
            "keypoints_2d": keypoints.float(),
            "joints_3d": torch.cat((joints, torch.ones(len(joints), 1)), dim=1).float(),
            "vertices": vertices.float(),
            "has_vertices": torch.tensor(1.0),
            "index": torch.tensor(i, dtype=torch.int64),
            "meta": {"subject": f"subject-{i % SUBJECTS}", "scene": "plain",
                     "action": "turn-left" if yaw >= 0 else "turn-right", "source": NAME},
        })  # fmt: skip
    return samples


def make_turntable(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """The factory registered as ``example-turntable``: both splits made from ``spec.seed``."""
    max_yaw = math.radians(read_options(TurntableOptions, spec.options, plugin=NAME, kind="dataset").max_yaw_deg)
    counts = {"train": spec.num_train, "test": spec.num_test}
    if any(n is not None and n < 1 for n in counts.values()):
        raise ValueError(
            f"{NAME} needs at least one train and one test sample, got {spec.num_train} and {spec.num_test}"
        )
    counts = {"train": spec.num_train or DEFAULT_NUM_TRAIN, "test": spec.num_test or DEFAULT_NUM_TEST}
    if spec.image_size < 8:
        raise ValueError(f"{NAME} draws square crops of at least 8 pixels, got image_size={spec.image_size}")
    splits = {
        split: _split(body_model, n, spec.image_size, np.random.default_rng([spec.seed, _SPLIT_STREAM[split]]), max_yaw)
        for split, n in counts.items()
    }
    train = splits["train"]
    labels = {key: np.array([s["meta"][key] for s in train]) for key in ("subject", "scene", "action", "source")}
    mean_joints = torch.stack([s["joints_3d"][:, :3] for s in train]).mean(dim=0).numpy()
    protocol = {"dataset": NAME, "gt": "real", "image_size": spec.image_size, "seed": spec.seed,
                "num_train": len(train), "num_test": len(splits["test"]), "body_model": body_model.name}  # fmt: skip
    return HMRData(train=train, test=splits["test"], labels=labels, protocol=protocol, train_mean_joints=mean_joints)


make_turntable.options = TurntableOptions  # type: ignore[attr-defined]  # the DeclaresOptions capability


@hookimpl
def pchmr_datasets() -> Mapping[str, Callable[[DatasetSpec, BodyModel], HMRData]]:
    """Offer ``example-turntable``."""
    return {NAME: make_turntable}
