"""The annotation contract: observations of local images, annotators that fit a body model to
them, keypoint and depth sources, and the per-image records of what happened.

A device cannot send its images away, so it labels them itself (the PCHMR paper's DePoser):

1. a **keypoint source** (plugin kind ``keypoint_source``) gives 2D keypoints of one image in
   the body model's evaluation joint order, in *image pixels*, with a confidence each, and the
   camera intrinsics when it knows them;
2. a **depth source** (plugin kind ``depth_source``, optional) gives a depth per keypoint,
   known only up to the invariance it declares (:data:`DEPTH_INVARIANCES`);
3. the pipeline crops the image around the person and converts everything to *crop
   coordinates* ([-1, 1], x right, y down, as :mod:`pchmr.core.contracts.sample`), giving an
   :class:`Observation`; observations are stacked into an :class:`ObservationBatch`;
4. an **annotator** (plugin kind ``annotator``) fits the body model to a batch and returns a
   :class:`FitResult`: camera-frame meshes, the fit's losses per image;
5. every image ends as an :class:`AnnotationRecord`: annotated, or failed with the reason
   (:class:`AnnotationInputError` and its subclasses) — never silently dropped.

Units and frames are pchmr's (:mod:`pchmr.core.contracts.bodymodel`): metres; camera frame x right,
y down, z forward. Intrinsics in crop units: a camera-frame point (x, y, z) projects to crop
coordinates ``(f * x / z + cx, f * y / z + cy)``, so a crop of side S pixels with a focal
length of F pixels and principal point (u0, v0) pixels has ``f = 2F/S``, ``cx = 2u0/S - 1``,
``cy = 2v0/S - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEPTH_INVARIANCES",
    "AnnotationInputError",
    "AnnotationItem",
    "AnnotationRecord",
    "Annotator",
    "AnnotatorFactory",
    "CountMismatchError",
    "DepthError",
    "DepthObservation",
    "DepthSource",
    "DeviceAnnotator",
    "FitResult",
    "KeypointLayoutError",
    "KeypointObservation",
    "KeypointSource",
    "NoPersonError",
    "Observation",
    "ObservationBatch",
    "pixels_to_crop",
]

#: What a depth source's values are known up to:
#: ``metric`` (metres), ``scale`` (z_obs = s·z, s > 0 unknown), ``affine`` (z_obs = s·z + t).
DEPTH_INVARIANCES = ("metric", "scale", "affine")


# ----------------------------------------------------------------------------- errors
class AnnotationInputError(ValueError):
    """One image cannot be annotated; the message names the image, what was wrong and what
    was expected. The pipeline records it and annotates the other images."""


class NoPersonError(AnnotationInputError):
    """No person was detected (no keypoint instance, or too few confident keypoints)."""


class KeypointLayoutError(AnnotationInputError):
    """A keypoint file has a layout pchmr does not know (wrong number of keypoints)."""


class DepthError(AnnotationInputError):
    """Depth is missing, NaN or non-positive where the keypoints are."""


class CountMismatchError(AnnotationInputError):
    """Images and keypoint (or depth) files do not pair up one to one."""


# ------------------------------------------------------------------------ observations
@dataclass(frozen=True)
class AnnotationItem:
    """One image to annotate, as sources see it.

    ``image_id`` names it in records (a file stem or ``split:index``); ``image`` is the
    (H, W, 3) uint8 image when loaded; ``path`` its file, if any; ``dataset``/``index`` the
    dataset split and position it came from (the ``synthetic`` sources read ground truth there).
    """

    image_id: str
    image: np.ndarray | None = None
    path: str | None = None
    dataset: Any = None
    index: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) pixels of the image."""
        if self.image is None:
            raise AnnotationInputError(f"image {self.image_id}: no pixels loaded, its size is unknown")
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass(frozen=True)
class KeypointObservation:
    """What a keypoint source returns for one image.

    * ``keypoints`` (J, 3) float32: x, y in **image pixels** (continuous coordinates, the
      image spans [0, W] x [0, H]) and a confidence in [0, 1] (0 = missing), J and the order
      being the body model's evaluation joints (``BodyModel.joint_names``);
    * ``intrinsics`` (3,) float32 (focal, u0, v0) in pixels of the same image, or None when
      the camera is unknown (the pipeline then assumes a default field of view).
    """

    keypoints: np.ndarray
    intrinsics: np.ndarray | None = None


@dataclass(frozen=True)
class DepthObservation:
    """What a depth source returns for one image: ``depth`` (J,) float32 per keypoint,
    positive, known up to ``invariance`` (one of :data:`DEPTH_INVARIANCES`); ``valid`` (J,)
    float32 in {0, 1} marks the keypoints whose depth is usable (never a keypoint of
    confidence 0)."""

    depth: np.ndarray
    valid: np.ndarray
    invariance: str = "scale"

    def __post_init__(self) -> None:
        if self.invariance not in DEPTH_INVARIANCES:
            raise ValueError(f"depth invariance must be one of {DEPTH_INVARIANCES}, got {self.invariance!r}")


@runtime_checkable
class KeypointSource(Protocol):
    """``source(item, joint_names) -> KeypointObservation``; raises :class:`NoPersonError` or
    :class:`KeypointLayoutError` (with the image id) for an image it cannot serve."""

    def __call__(self, item: AnnotationItem, joint_names: Sequence[str]) -> KeypointObservation: ...


@runtime_checkable
class DepthSource(Protocol):
    """``source(item, keypoints) -> DepthObservation`` for the (J, 3) pixel keypoints the
    keypoint source gave; raises :class:`DepthError` for an image it cannot serve."""

    def __call__(self, item: AnnotationItem, keypoints: np.ndarray) -> DepthObservation: ...


@dataclass(frozen=True)
class Observation:
    """One image ready for fitting, in crop coordinates ([-1, 1]):

    * ``keypoints`` (J, 3): x, y crop coordinates and confidence;
    * ``intrinsics`` (3,): (f, cx, cy) in crop units (see the module docstring);
    * ``depth`` (J,) and ``depth_valid`` (J,): per-keypoint depth up to ``depth_invariance``
      (zeros and 0 when there is no depth source).
    """

    image_id: str
    keypoints: Tensor
    intrinsics: Tensor
    depth: Tensor
    depth_valid: Tensor
    depth_invariance: str = "scale"


@dataclass(frozen=True)
class ObservationBatch:
    """B stacked observations: ``keypoints`` (B, J, 3), ``intrinsics`` (B, 3), ``depth`` and
    ``depth_valid`` (B, J); every image of one batch shares ``depth_invariance``."""

    image_ids: tuple[str, ...]
    keypoints: Tensor
    intrinsics: Tensor
    depth: Tensor
    depth_valid: Tensor
    depth_invariance: str = "scale"

    @classmethod
    def stack(cls, observations: Sequence[Observation]) -> ObservationBatch:
        if not observations:
            raise ValueError("cannot stack an empty list of observations")
        kinds = {o.depth_invariance for o in observations}
        if len(kinds) > 1:
            raise ValueError(f"observations of one batch must share a depth invariance, got {sorted(kinds)}")
        return cls(
            image_ids=tuple(o.image_id for o in observations),
            keypoints=torch.stack([o.keypoints for o in observations]).float(),
            intrinsics=torch.stack([o.intrinsics for o in observations]).float(),
            depth=torch.stack([o.depth for o in observations]).float(),
            depth_valid=torch.stack([o.depth_valid for o in observations]).float(),
            depth_invariance=kinds.pop(),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device) -> ObservationBatch:
        """This batch with every tensor on ``device`` (itself when they are there already)."""
        if self.keypoints.device == device:
            return self
        return ObservationBatch(
            image_ids=self.image_ids,
            keypoints=self.keypoints.to(device),
            intrinsics=self.intrinsics.to(device),
            depth=self.depth.to(device),
            depth_valid=self.depth_valid.to(device),
            depth_invariance=self.depth_invariance,
        )

    def select(self, index: Tensor | Sequence[int]) -> ObservationBatch:
        idx = torch.as_tensor(index, dtype=torch.int64)
        return ObservationBatch(
            image_ids=tuple(self.image_ids[i] for i in idx.tolist()),
            keypoints=self.keypoints[idx],
            intrinsics=self.intrinsics[idx],
            depth=self.depth[idx],
            depth_valid=self.depth_valid[idx],
            depth_invariance=self.depth_invariance,
        )


def pixels_to_crop(
    keypoints: np.ndarray, intrinsics: np.ndarray, box: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel keypoints (J, 3) and intrinsics (3,) (focal, u0, v0) of an image → crop
    coordinates for the square crop ``box`` = (left, top, side) in pixels: (J, 3) keypoints
    (confidence kept) and (3,) crop-unit intrinsics (f, cx, cy)."""
    left, top, side = box
    if side <= 0:
        raise ValueError(f"crop side must be positive, got {side}")
    out = np.array(keypoints, dtype=np.float32, copy=True)
    out[:, 0] = 2.0 * (out[:, 0] - left) / side - 1.0
    out[:, 1] = 2.0 * (out[:, 1] - top) / side - 1.0
    focal, u0, v0 = (float(v) for v in intrinsics)
    crop_k = np.array([2.0 * focal / side, 2.0 * (u0 - left) / side - 1.0, 2.0 * (v0 - top) / side - 1.0])
    return out, crop_k.astype(np.float32)


# -------------------------------------------------------------------------- annotators
@dataclass(frozen=True)
class FitResult:
    """What an annotator returns for a batch of B images.

    * ``vertices`` (B, V, 3) and ``joints`` (B, J, 3): metres, camera frame, root-relative
      (the body model's root, mid-hip), joints regressed from the vertices;
    * ``translation`` (B, 3): the root's camera-frame position in metres;
    * ``params``: the body model's fitted parameters, each (B, ...);
    * ``losses``: per-image (B,) values of every energy term at the end of the fit, plus
      ``total``; ``reprojection_px`` is the mean 2D error of confident keypoints in crop pixels
      of a 224-pixel crop, a scale-free quality measure.
    """

    vertices: Tensor
    joints: Tensor
    translation: Tensor
    params: Mapping[str, Tensor]
    losses: Mapping[str, Tensor]


@runtime_checkable
class Annotator(Protocol):
    """Fits a body model to observations. ``name`` is the plugin name (written into every
    record); ``fit`` is batched: images of one batch are fitted jointly but independently
    (the energy is a sum of per-image terms), and the result must not depend on which other
    images share the batch beyond optimiser round-off (a shared line search, see the fitting
    core)."""

    name: str

    def fit(self, batch: ObservationBatch) -> FitResult: ...

    def describe(self) -> dict[str, object]: ...


@runtime_checkable
class DeviceAnnotator(Protocol):
    """Optional capability of an annotator that can fit on an accelerator (a GPU): ``to_device``
    moves everything its fit computes with (the body model, priors, constants) to ``device``;
    afterwards :meth:`Annotator.fit` receives batches on that device and may return its
    :class:`FitResult` there (the pipeline reads it back on the CPU). ``pchmr annotate
    --accelerator`` calls it once, before the first batch. An annotator without it fits on the
    CPU whatever the accelerator (the pipeline says so in its log)."""

    def to_device(self, device: torch.device) -> None: ...


@runtime_checkable
class AnnotatorFactory(Protocol):
    """``factory(body_model, options) -> Annotator``; ``options`` are the user's key=value
    settings (unknown keys are refused with the list of known ones)."""

    def __call__(self, body_model: Any, options: Mapping[str, object]) -> Annotator: ...


@dataclass(frozen=True)
class AnnotationRecord:
    """The outcome for one image: ``status`` ``"ok"`` with the fit's ``losses``, or
    ``"failed"`` with ``error`` (the exception's class) and ``message``."""

    image_id: str
    status: str
    annotator: str
    losses: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    message: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"image_id": self.image_id, "status": self.status, "annotator": self.annotator,
                "losses": dict(self.losses), "error": self.error, "message": self.message}  # fmt: skip
