"""The one Sample schema every dataset plugin produces, with its units and frames.

A sample is a ``dict[str, Tensor | dict]`` so that PyTorch's default collate batches it:

==================  ===============  ======================================================
key                 shape / dtype    meaning
==================  ===============  ======================================================
``image``           (3, H, W) f32    RGB crop, normalised with :data:`IMAGE_MEAN`/:data:`IMAGE_STD`
``keypoints_2d``    (J, 3) f32       x, y in crop coordinates ([-1, 1], x right, y down) and
                                     a confidence in [0, 1] (0 = missing)
``joints_3d``       (J, 4) f32       x, y, z in **metres**, camera frame (x right, y down,
                                     z forward), **root-relative**, plus validity in {0, 1}
``vertices``        (V, 3) f32       full-mesh vertices, metres, camera frame, root-relative
                                     (zeros when ``has_vertices`` is 0)
``has_vertices``    () f32           1 when ``vertices`` is ground truth (or pseudo-GT)
``index``           () int64         the sample's id inside its dataset split
``meta``            dict[str, str]   labels partitioners use: subject, scene, action, source
==================  ===============  ======================================================

Optional keys (:data:`OPTIONAL_SAMPLE_KEYS`; a dataset gives one for all its samples or none):

==================  ===============  ======================================================
``pelvis_3d``       (4,) f32         ground-truth Human3.6M pelvis (H36M joint 0), metres,
                                     camera frame, relative to the same root as
                                     ``joints_3d``, plus validity in {0, 1}; pelvis-aligned
                                     protocols (``spin``, ``metro``) read it
==================  ===============  ======================================================

J is the body model's evaluation joint set (:attr:`pchmr.core.contracts.bodymodel.BodyModel.joint_names`);
the root is the mean of its ``root_joints`` (mid-hip for the built-in models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "META_KEYS",
    "OPTIONAL_SAMPLE_KEYS",
    "SAMPLE_KEYS",
    "SampleError",
    "denormalize_image",
    "normalize_image",
    "validate_sample",
]

#: ImageNet statistics; every backbone expects images normalised with them.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

#: The ``meta`` labels every dataset fills (``"unknown"`` when a format lacks one).
META_KEYS = ("subject", "scene", "action", "source")

SAMPLE_KEYS = ("image", "keypoints_2d", "joints_3d", "vertices", "has_vertices", "index", "meta")
OPTIONAL_SAMPLE_KEYS = ("pelvis_3d",)


class SampleError(ValueError):
    """A sample violates the schema; the message names the key, the expected and the actual."""


def normalize_image(image_uint8: Tensor) -> Tensor:
    """(..., H, W, 3) uint8 → (..., 3, H, W) float32 normalised."""
    img = image_uint8.to(torch.float32).div_(255.0).movedim(-1, -3)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (img - mean) / std


def denormalize_image(image: Tensor) -> Tensor:
    """(..., 3, H, W) normalised → (..., H, W, 3) uint8, for plots."""
    mean = torch.tensor(IMAGE_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=image.device).view(3, 1, 1)
    img = (image * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.movedim(-3, -1)


def validate_sample(
    sample: Mapping[str, Any], *, num_joints: int, num_vertices: int, image_size: int | None = None
) -> None:
    """Raise :class:`SampleError` naming the first key that breaks the schema above."""
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise SampleError(f"sample is missing keys {missing}; a sample has {list(SAMPLE_KEYS)}")
    image = sample["image"]
    if image.ndim != 3 or image.shape[0] != 3:
        raise SampleError(f"'image' must be (3, H, W), got {tuple(image.shape)}")
    if image_size is not None and tuple(image.shape[1:]) != (image_size, image_size):
        raise SampleError(f"'image' must be (3, {image_size}, {image_size}), got {tuple(image.shape)}")
    expected = {
        "keypoints_2d": (num_joints, 3),
        "joints_3d": (num_joints, 4),
        "vertices": (num_vertices, 3),
    }
    if "pelvis_3d" in sample:
        expected["pelvis_3d"] = (4,)
    for key, shape in expected.items():
        if tuple(sample[key].shape) != shape:
            raise SampleError(f"'{key}' must be {shape}, got {tuple(sample[key].shape)}")
    for key in ("image", "keypoints_2d", "joints_3d", "vertices", *(k for k in OPTIONAL_SAMPLE_KEYS if k in sample)):
        if not torch.isfinite(sample[key]).all():
            raise SampleError(f"'{key}' contains NaN or infinite values")
    conf = sample["keypoints_2d"][:, 2]
    if ((conf < 0) | (conf > 1)).any():
        raise SampleError("'keypoints_2d' confidence (column 2) must lie in [0, 1]")
    joints = sample["joints_3d"]
    if (joints[:, 3] > 0).any() and joints[:, :3].abs().max() > 3.0:
        raise SampleError("'joints_3d' has a coordinate beyond 3 m from the root: joints must be root-relative metres")
    pelvis = sample.get("pelvis_3d")
    if pelvis is not None and float(pelvis[3]) not in (0.0, 1.0):
        raise SampleError(f"'pelvis_3d' validity (column 3) must be 0 or 1, got {float(pelvis[3])}")
    if pelvis is not None and float(pelvis[3]) > 0 and pelvis[:3].abs().max() > 3.0:
        raise SampleError("'pelvis_3d' is beyond 3 m from the root: it must be relative to the joints' root, metres")
    meta = sample["meta"]
    absent = [k for k in META_KEYS if k not in meta]
    if absent:
        raise SampleError(f"'meta' is missing labels {absent}; expected {list(META_KEYS)}")
    if not math.isfinite(float(sample["has_vertices"])):
        raise SampleError("'has_vertices' must be 0 or 1")
