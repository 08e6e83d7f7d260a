"""``example-rest-fit``: place the body model's rest pose where the 2D keypoints say it stands.

The body is not posed: every image gets the rest body (zero parameters) facing the camera, and
only its camera-frame translation t = (tx, ty, tz) is fitted. With crop-unit intrinsics
(f, cx, cy), a root-relative camera-frame joint (X, Y, Z) projects to
``u = f (X + tx) / (Z + tz) + cx``, which is linear in t once multiplied out::

    f tx − (u − cx) tz = (u − cx) Z − f X        (and the same for v, Y, ty, cy)

so t is the least-squares solution of 2·J such equations over the confident keypoints, one small
solve per image (images never influence each other). Depth observations are ignored.

Options: ``min_depth_m`` (default 0.5): tz is never smaller. Written from ``docs/plugins.md``
alone; only :mod:`pchmr.api` is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from pchmr.api import BodyModel, FitResult, ObservationBatch, hookimpl, option, read_options

__all__ = ["NAME", "RestFit", "RestFitOptions", "make_rest_fit", "pchmr_annotators"]

NAME = "example-rest-fit"
DEFAULT_MIN_DEPTH_M = 0.5
#: Crop units → pixels of a 224-pixel crop (the unit of ``losses['reprojection_px']``).
PX_PER_CROP_UNIT = 112.0
#: Body frame (x left, y up, z front) → camera frame (x right, y down, z forward), body facing the camera.
BODY_TO_CAMERA = (1.0, -1.0, -1.0)


class RestFit:
    """The annotator: ``fit(batch)`` → the rest body at the least-squares translation."""

    def __init__(self, body_model: BodyModel, min_depth_m: float = DEFAULT_MIN_DEPTH_M) -> None:
        self.name = NAME
        self.body_model = body_model
        self.min_depth_m = min_depth_m
        self.rest_params = {name: torch.zeros(1, *shape) for name, shape in body_model.param_shapes.items()}
        with torch.no_grad():
            rest = body_model(**self.rest_params)
        flip = torch.tensor(BODY_TO_CAMERA)
        joints, vertices = rest.joints[0] * flip, rest.vertices[0] * flip
        root = body_model.root(joints[None])[0]
        self.joints, self.vertices = joints - root, vertices - root  # (J, 3), (V, 3) root-relative camera frame

    def _translation(self, batch: ObservationBatch) -> Tensor:
        """(B, 3) least-squares translation of every image (confident keypoints only)."""
        x, y, z = self.joints.unbind(-1)
        rows = []
        for k, (f, cx, cy) in zip(batch.keypoints, batch.intrinsics):
            weight = (k[:, 2] > 0).float()[:, None]
            du, dv = k[:, 0] - cx, k[:, 1] - cy
            zeros = torch.zeros_like(du)
            a = torch.cat((torch.stack((f + zeros, zeros, -du), 1), torch.stack((zeros, f + zeros, -dv), 1)))
            b = torch.cat((du * z - f * x, dv * z - f * y))[:, None]
            w = torch.cat((weight, weight))
            rows.append(torch.linalg.lstsq(a * w, b * w).solution[:, 0])
        t = torch.stack(rows)
        return torch.cat((t[:, :2], t[:, 2:].clamp_min(self.min_depth_m)), dim=1)

    def fit(self, batch: ObservationBatch) -> FitResult:
        """Every image of ``batch``: the rest body, root-relative camera-frame metres, at its translation."""
        b = len(batch)
        translation = self._translation(batch)
        points = self.joints[None] + translation[:, None]
        f, c = batch.intrinsics[:, :1, None], batch.intrinsics[:, None, 1:]
        residual = f * points[..., :2] / points[..., 2:] + c - batch.keypoints[..., :2]
        confident = (batch.keypoints[..., 2] > 0).float()
        count = confident.sum(dim=1).clamp_min(1.0)
        return FitResult(
            vertices=self.vertices.expand(b, -1, -1).clone(),
            joints=self.joints.expand(b, -1, -1).clone(),
            translation=translation,
            params={name: value.expand(b, *value.shape[1:]).clone() for name, value in self.rest_params.items()},
            losses={
                "total": (residual.square().sum(-1) * confident).sum(1) / count,
                "reprojection_px": (residual.norm(dim=-1) * confident).sum(1) / count * PX_PER_CROP_UNIT,
            },
        )

    def describe(self) -> dict[str, object]:
        return {"annotator": NAME, "body_model": self.body_model.name, "min_depth_m": self.min_depth_m}


@dataclass(frozen=True)
class RestFitOptions:
    """The options of ``example-rest-fit`` (``pchmr annotate --annotator-option``)."""

    min_depth_m: float = option(
        DEFAULT_MIN_DEPTH_M, low=0.0, low_open=True, key="min_depth_m", help="smallest camera distance tz, metres"
    )


def make_rest_fit(body_model: BodyModel, options: Mapping[str, object]) -> RestFit:
    """The factory registered as ``example-rest-fit``: ``options`` may hold ``min_depth_m`` (> 0)."""
    opts = read_options(RestFitOptions, options, plugin=NAME, kind="annotator")
    return RestFit(body_model, opts.min_depth_m)


make_rest_fit.options = RestFitOptions  # type: ignore[attr-defined]  # the DeclaresOptions capability


@hookimpl
def pchmr_annotators() -> Mapping[str, Callable[[BodyModel, Mapping[str, object]], RestFit]]:
    """Offer ``example-rest-fit``."""
    return {NAME: make_rest_fit}
