"""``example-cnn``: a small, honest HMR baseline written against pchmr's public API only.

Pipeline for a batch of B normalised crops (B, 3, S, S)::

    CNN: 4 stages, each [3×3 conv stride 2, GroupNorm, ReLU, 3×3 conv, GroupNorm, ReLU],
         widths 32/64/128/256                                   → (B, 256, S/16, S/16)
    global average pool                                         → (B, 256)
    MLP: Linear(256, H), ReLU, Linear(H, H), ReLU               → (B, H)   H = 512/1024/2048 (S/M/L)
    heads: Linear(H, 3·(J + V_0)) → joints (B, J, 3) and coarse vertices (B, V_0, 3), metres
           Linear(H, 3)          → weak-perspective camera (s, tx, ty), s = softplus(·) > 0
    coarse vertices ─pyramid.up[0]→ middle ─pyramid.up[1]→ ... → full mesh (fixed sparse maps)

Like pchmr's built-in FastMETRO and TORE it predicts the body model's *coarse* mesh level and
upsamples it through the body model's mesh pyramid, so it works on any topology (Anny's
431/1,723/13,718 vertices, SMPL's 431/1,723/6,890, the toy model's 38/146/578).

Design choices, each for a stated reason:

* GroupNorm instead of BatchNorm: no running statistics, so outputs do not depend on the other
  samples of a batch, federated averaging has no statistics to average, and per-sample
  differential privacy (which forbids statistics that mix samples) applies unchanged;
* the coordinate head starts with weights scaled by :data:`HEAD_INIT_GAIN`, so an untrained model
  outputs meshes a few centimetres across around the origin rather than metres of noise (not
  zero: every parameter must get a gradient from the first step);
* the camera scale starts near :data:`INIT_CAMERA_SCALE`, which maps a 1.7 m body onto ±0.9 of
  the crop, as the built-ins do.

Public API used: :class:`~pchmr.api.Backbone`, :class:`~pchmr.api.HMROutput`,
:class:`~pchmr.api.BackboneOptions`, :func:`~pchmr.api.check_images`,
:class:`~pchmr.api.BodyModel` / :class:`~pchmr.api.MeshPyramid`, :func:`~pchmr.api.option` /
:func:`~pchmr.api.read_options` (its ``dropout`` option) and :func:`~pchmr.api.hookimpl`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pchmr.api import (
    Backbone,
    BackboneFactory,
    BackboneOptions,
    BodyModel,
    HMROutput,
    MeshPyramid,
    check_images,
    hookimpl,
    option,
    read_options,
)

__all__ = [
    "HIDDEN_WIDTHS",
    "NAME",
    "ConvEncoder",
    "ExampleCNN",
    "ExampleCNNOptions",
    "make_example_cnn",
    "pchmr_backbones",
]

NAME = "example-cnn"
#: Output channels of the encoder's stride-2 stages (output stride 2 ** len = 16).
STAGE_WIDTHS = (32, 64, 128, 256)
GROUP_NORM_GROUPS = 8
#: MLP width of each variant.
HIDDEN_WIDTHS: Mapping[str, int] = {"S": 512, "M": 1024, "L": 2048}
#: The only encoder this backbone has (``--encoder``); it has no pretrained weights.
ENCODER_NAME = "small"
#: Factor on the coordinate head's initial weights (PyTorch's default init otherwise).
HEAD_INIT_GAIN = 0.1
#: Half the height of an adult body (metres) and the half-extent of the crop it should fill.
BODY_HALF_HEIGHT_M = 0.85
CROP_HALF_EXTENT = 0.9
INIT_CAMERA_SCALE = CROP_HALF_EXTENT / BODY_HALF_HEIGHT_M
#: The smallest input whose feature grid is at least 1×1 after the four stride-2 stages.
MIN_INPUT_SIZE = 2 ** len(STAGE_WIDTHS)


def _conv_norm_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(GROUP_NORM_GROUPS, out_channels),
        nn.ReLU(inplace=True),
    ]


class ConvEncoder(nn.Module):
    """(B, 3, S, S) → (B, 256, ceil(S/16), ceil(S/16)) features; GroupNorm throughout."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for stage_width in STAGE_WIDTHS:
            layers += _conv_norm_relu(width, stage_width, stride=2) + _conv_norm_relu(
                stage_width, stage_width, stride=1
            )
            width = stage_width
        self.layers = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


def _sparse_levels(matrix: Tensor, vertices: Tensor) -> Tensor:
    """(M, N) sparse or dense matrix applied to every sample of (B, N, 3) → (B, M, 3)."""
    batch, num_in, channels = vertices.shape
    stacked = vertices.permute(1, 0, 2).reshape(num_in, batch * channels)
    mapped = torch.sparse.mm(matrix, stacked) if matrix.is_sparse else matrix @ stacked
    return mapped.reshape(-1, batch, channels).permute(1, 0, 2)


class ExampleCNN(Backbone):
    """CNN → global pool → MLP → joints, coarse vertices and camera; upsampled through the pyramid.

    ``forward(images (B, 3, S, S))`` → :class:`HMROutput` with joints (B, J, 3), vertices
    ((B, V_0, 3), ..., (B, V_full, 3)) in metres (camera-frame axes, up to a translation) and
    camera (B, 3) = (s > 0, tx, ty).
    """

    def __init__(
        self, pyramid: MeshPyramid, num_joints: int, input_size: int, hidden: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if input_size < MIN_INPUT_SIZE:
            raise ValueError(f"{NAME} needs input_size >= {MIN_INPUT_SIZE} pixels, got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{NAME}: dropout must lie in [0, 1), got {dropout}")
        self.input_size = input_size
        self.num_joints = num_joints
        self.num_coarse = pyramid.num_vertices[0]
        self.encoder = ConvEncoder()
        self.mlp = nn.Sequential(
            nn.Linear(self.encoder.out_channels, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )  # fmt: skip
        self.xyz_head = nn.Linear(hidden, 3 * (num_joints + self.num_coarse))
        self.camera_head = nn.Linear(hidden, 3)
        with torch.no_grad():
            self.xyz_head.weight.mul_(HEAD_INIT_GAIN)
            self.xyz_head.bias.zero_()
            self.camera_head.weight.mul_(HEAD_INIT_GAIN)
            self.camera_head.bias.zero_()
        self.camera_scale_offset = _inverse_softplus(INIT_CAMERA_SCALE)
        # fixed up-sampling maps of the topology: move with .to(device), stay out of the state dict
        self.num_up = pyramid.levels - 1
        for level, up in enumerate(pyramid.up):
            self.register_buffer(f"up_{level}", up.coalesce() if up.is_sparse else up, persistent=False)

    def _levels(self, coarse: Tensor) -> tuple[Tensor, ...]:
        """(B, V_0, 3) → every pyramid level, coarse first, full last."""
        levels = [coarse]
        for level in range(self.num_up):
            levels.append(_sparse_levels(getattr(self, f"up_{level}"), levels[-1]))
        return tuple(levels)

    def forward(self, images: Tensor) -> HMROutput:
        check_images(images, self.input_size)
        features = self.mlp(self.encoder(images).mean(dim=(2, 3)))
        xyz = self.xyz_head(features).view(images.shape[0], self.num_joints + self.num_coarse, 3)
        raw_camera = self.camera_head(features)
        camera = torch.cat((F.softplus(raw_camera[:, :1] + self.camera_scale_offset), raw_camera[:, 1:]), dim=1)
        joints, coarse = xyz[:, : self.num_joints], xyz[:, self.num_joints :]
        return HMROutput(joints=joints, vertices=self._levels(coarse), camera=camera)


@dataclass(frozen=True)
class ExampleCNNOptions:
    """What ``example-cnn`` reads from ``BackboneOptions.extra`` (``--backbone-option``)."""

    dropout: float = option(0.0, low=0.0, high=1.0, high_open=True, help="dropout rate of the MLP (training only)")


def make_example_cnn(body_model: BodyModel, options: BackboneOptions) -> ExampleCNN:
    """Build ``example-cnn`` for ``body_model``: variant S/M/L picks the MLP width
    (:data:`HIDDEN_WIDTHS`); ``options.extra`` may hold ``dropout`` (default 0)."""
    variant = options.variant.upper()
    if variant not in HIDDEN_WIDTHS:
        raise ValueError(f"{NAME}: unknown variant {options.variant!r}; choose one of {', '.join(HIDDEN_WIDTHS)}")
    if options.encoder != ENCODER_NAME:
        raise ValueError(
            f"{NAME}: encoder {options.encoder!r} is not available; this backbone has only '{ENCODER_NAME}'"
        )
    if options.encoder_weights is not None:
        raise ValueError(
            f"{NAME}: its '{ENCODER_NAME}' encoder has no pretrained weights to load from {options.encoder_weights!r}"
        )
    extra = read_options(ExampleCNNOptions, options.extra, plugin=NAME, kind="backbone")
    return ExampleCNN(
        body_model.pyramid(),
        num_joints=body_model.num_joints,
        input_size=options.input_size,
        hidden=HIDDEN_WIDTHS[variant],
        dropout=extra.dropout,
    )


make_example_cnn.options = ExampleCNNOptions  # type: ignore[attr-defined]  # the DeclaresOptions capability


@hookimpl
def pchmr_backbones() -> Mapping[str, BackboneFactory]:
    """Offer ``example-cnn`` (variants S/M/L via ``BackboneOptions.variant``)."""
    return {NAME: make_example_cnn}
