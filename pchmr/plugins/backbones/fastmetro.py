"""FastMETRO (Cho et al., ECCV 2022): encoder–decoder transformers over CNN features.

Pipeline for a batch of B crops (see the module docstring of
:mod:`pchmr.core.kit.transformer` for the layer layout)::

    encoder CNN (B, C, h, w) ─1×1 conv→ (B, h·w, 512) image tokens + 2D sine positions
    transformer 1 (d=512, MLP 2048):  encoder over [camera token, image tokens],
                                      decoder over [J joint tokens, V_0 vertex tokens]
    linear 512→128 for the camera token, the image tokens and the joint/vertex tokens
    transformer 2 (d=128, MLP 512):   same structure
    heads: Linear(128, 3) per joint/vertex token → xyz (metres);
           Linear(128, 3) on the camera token → weak perspective (s, tx, ty)
    coarse (V_0) ─fixed pyramid.up[0]→ middle (V_1) ─fixed pyramid.up[1:]→ ... → full mesh
           (option learned_upsampling: the reference's learnable Linear(V_0, V_1) for up[0])

S/M/L have 1/2/3 encoder and decoder layers in each transformer. In the decoder's
self-attention a vertex token attends to every joint token and to the vertex tokens adjacent
to it on the coarse mesh (``pyramid.adjacency``, diagonal included); joint tokens attend to
everything, as in the original mask.

Departures from the reference code:

* the coarse→middle upsampling is fixed (``pyramid.up[0]``, sparse) unless the backbone option
  ``learned_upsampling`` is true. The reference learns it as a dense Linear(V_0, V_1) (0.74 M
  of FastMETRO-S's 10.0 M parameters for SMPL sizes; 2.9 MB of every client message here).
  With AdamW each of its ~740 k weights moves by about the learning rate per step and weight
  decay pulls the upsampling toward zero, so after a few hundred steps every middle vertex is
  its neighbours' average plus the drift of hundreds of coarse vertices (measured: mean
  |drift| 0.005 per weight after 150 steps at lr 1e-3; over a frozen public-pretrained CNN,
  2,400 centralized images gave 187.0 / 126.1 mm MPJPE / PA-MPJPE with the fixed upsampling
  against 227.8 / 143.8 learned). The reference trains on ~10⁶ images at lr 1e-4, where the
  layer can settle; with ``learned_upsampling=true`` the parameter count is the paper's;
* the camera scale is ``softplus(raw + offset)``: always positive, and at initialisation
  (camera head weights scaled down) about :data:`INIT_CAMERA_SCALE`, which maps a 1.7 m body
  onto ±0.9 of the crop;
* the learnable coarse→middle layer, when asked for, starts as the pyramid's fixed ``up[0]``
  (bias 0), so the untrained model already outputs consistent meshes on every level;
* the xyz head starts at :data:`XYZ_HEAD_INIT_GAIN` times its default weights (bias 0). It
  reads LayerNorm-ed features, so with default weights every token of the untrained model
  outputs a random offset of about ±0.6 m that the first hundreds of steps only undo; small
  weights start every token near the root and the first steps learn the shape (measured over
  a frozen public-pretrained CNN, 1,600 centralized images: 227.5 / 149.6 mm MPJPE / PA-MPJPE
  against 273.8 / 198.1 with the default init). The untrained model is still untrained: a mesh
  collapsed near the root.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pchmr.core.contracts.backbone import (
    Backbone,
    BackboneFactory,
    BackboneOptions,
    HMROutput,
    check_images,
)
from pchmr.core.contracts.bodymodel import BodyModel, MeshPyramid, sparse_bmm
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.kit.encoders import NORMS, FeatureEncoder, build_encoder
from pchmr.core.kit.transformer import EncoderDecoder, sine_position_encoding

__all__ = [
    "VARIANT_LAYERS",
    "CommonBackboneOptions",
    "FastMETRO",
    "FastMETROOptions",
    "make_fastmetro",
    "pchmr_backbones",
    "query_attention_mask",
]

#: Encoder and decoder layers per transformer for each variant.
VARIANT_LAYERS: Mapping[str, int] = {"S": 1, "M": 2, "L": 3}
#: Width and MLP width of the first and second transformer.
MODEL_DIM_1, FFN_DIM_1 = 512, 2048
MODEL_DIM_2, FFN_DIM_2 = 128, 512
NUM_HEADS = 8
DEFAULT_DROPOUT = 0.1

#: Half the height of an adult body (metres) and the half-extent of the crop it should fill.
BODY_HALF_HEIGHT_M = 0.85
CROP_HALF_EXTENT = 0.9
#: Camera scale of the untrained model: a 1.7 m body spans ±0.9 in crop coordinates.
INIT_CAMERA_SCALE = CROP_HALF_EXTENT / BODY_HALF_HEIGHT_M
#: Factor on the camera head's initial weights, so the initial camera is close to (s0, 0, 0).
CAMERA_HEAD_INIT_GAIN = 0.01
#: Factor on the xyz heads' default initial weights (bias 0): the untrained mesh starts near the root.
XYZ_HEAD_INIT_GAIN = 0.01
#: Minimum number of pyramid levels: coarse (tokens), middle (learned upsampling), full.
MIN_PYRAMID_LEVELS = 3


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def query_attention_mask(num_joints: int, adjacency: Tensor) -> Tensor:
    """(J+V, J+V) bool mask, ``True`` = may attend, for the decoder's joint+vertex tokens.

    Joint rows attend to every token; vertex rows attend to every joint and to the vertices
    adjacent to them in ``adjacency`` (V, V) bool (its diagonal should be set).
    """
    v = adjacency.shape[0]
    allowed = torch.ones(num_joints + v, num_joints + v, dtype=torch.bool)
    allowed[num_joints:, num_joints:] = adjacency.to(torch.bool)
    return allowed


class FastMETRO(Backbone):
    """FastMETRO on any mesh pyramid with at least three levels.

    ``forward(images (B, 3, S, S))`` → :class:`HMROutput` with joints (B, J, 3), vertices
    ((B, V_0, 3), (B, V_1, 3), ..., (B, V_full, 3)) in metres and camera (B, 3) = (s, tx, ty), s > 0.
    """

    def __init__(
        self,
        pyramid: MeshPyramid,
        num_joints: int,
        encoder: FeatureEncoder,
        input_size: int,
        num_layers: int,
        dropout: float = DEFAULT_DROPOUT,
        learned_upsampling: bool = False,
    ) -> None:
        super().__init__()
        if pyramid.levels < MIN_PYRAMID_LEVELS:
            raise ValueError(
                f"FastMETRO needs a mesh pyramid with at least {MIN_PYRAMID_LEVELS} levels "
                f"(coarse, middle, full), got {pyramid.levels}: {pyramid.num_vertices}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.input_size = input_size
        self.num_joints = num_joints
        self.num_vertex_tokens = pyramid.num_vertices[0]
        self.encoder = encoder
        self.conv_1x1 = nn.Conv2d(encoder.out_channels, MODEL_DIM_1, kernel_size=1)
        # learned tokens, N(0, 1) like nn.Embedding
        self.camera_token = nn.Parameter(torch.randn(1, MODEL_DIM_1))
        self.joint_tokens = nn.Parameter(torch.randn(num_joints, MODEL_DIM_1))
        self.vertex_tokens = nn.Parameter(torch.randn(self.num_vertex_tokens, MODEL_DIM_1))
        self.transformer_1 = EncoderDecoder(MODEL_DIM_1, NUM_HEADS, FFN_DIM_1, num_layers, num_layers, dropout)
        self.transformer_2 = EncoderDecoder(MODEL_DIM_2, NUM_HEADS, FFN_DIM_2, num_layers, num_layers, dropout)
        self.reduce_camera = nn.Linear(MODEL_DIM_1, MODEL_DIM_2)
        self.reduce_image = nn.Linear(MODEL_DIM_1, MODEL_DIM_2)
        self.reduce_queries = nn.Linear(MODEL_DIM_1, MODEL_DIM_2)
        self.xyz_head = nn.Linear(MODEL_DIM_2, 3)
        self.camera_head = nn.Linear(MODEL_DIM_2, 3)
        with torch.no_grad():
            self.camera_head.weight.mul_(CAMERA_HEAD_INIT_GAIN)
            self.camera_head.bias.zero_()
            self.xyz_head.weight.mul_(XYZ_HEAD_INIT_GAIN)
            self.xyz_head.bias.zero_()
        self.camera_scale_offset = _inverse_softplus(INIT_CAMERA_SCALE)
        self.coarse_to_middle: nn.Linear | None = None
        if learned_upsampling:
            self.coarse_to_middle = nn.Linear(pyramid.num_vertices[0], pyramid.num_vertices[1])
            with torch.no_grad():
                self.coarse_to_middle.weight.copy_(pyramid.up[0].to_dense())
                self.coarse_to_middle.bias.zero_()
        # topology-derived constants: not parameters, not in the state dict
        self.register_buffer("query_allowed", query_attention_mask(num_joints, pyramid.adjacency), persistent=False)
        self.fixed_up_levels = pyramid.levels - 2
        for level in range(0 if self.coarse_to_middle is None else 1, pyramid.levels - 1):
            up = pyramid.up[level]
            self.register_buffer(f"up_{level}", up.coalesce() if up.is_sparse else up, persistent=False)

    def _image_tokens(self, images: Tensor) -> tuple[Tensor, int, int]:
        """(B, 3, S, S) → ((B, h·w, 512) tokens, h, w)."""
        features = self.conv_1x1(self.encoder(images))
        h, w = features.shape[-2:]
        return features.flatten(2).transpose(1, 2), h, w

    def _camera(self, camera_features: Tensor) -> Tensor:
        """(B, 128) → (B, 3) = (s > 0, tx, ty)."""
        raw = self.camera_head(camera_features)
        scale = F.softplus(raw[:, :1] + self.camera_scale_offset)
        return torch.cat((scale, raw[:, 1:]), dim=1)

    def _upsample(self, coarse: Tensor) -> tuple[Tensor, ...]:
        """(B, V_0, 3) → every level, coarse first."""
        if self.coarse_to_middle is None:
            levels = [coarse, sparse_bmm(self.up_0, coarse)]
        else:
            levels = [coarse, self.coarse_to_middle(coarse.transpose(1, 2)).transpose(1, 2)]
        for level in range(1, 1 + self.fixed_up_levels):
            levels.append(sparse_bmm(getattr(self, f"up_{level}"), levels[-1]))
        return tuple(levels)

    def forward(self, images: Tensor) -> HMROutput:
        check_images(images, self.input_size)
        batch = images.shape[0]
        image_tokens, h, w = self._image_tokens(images)
        pos_1 = sine_position_encoding(h, w, MODEL_DIM_1, images.device).to(image_tokens.dtype)
        pos_2 = sine_position_encoding(h, w, MODEL_DIM_2, images.device).to(image_tokens.dtype)
        camera = self.camera_token.expand(batch, -1, -1)
        queries = torch.cat((self.joint_tokens, self.vertex_tokens), dim=0).expand(batch, -1, -1)

        camera_1, image_1, queries_1 = self.transformer_1(camera, image_tokens, queries, pos_1, self.query_allowed)
        camera_2, _, queries_2 = self.transformer_2(
            self.reduce_camera(camera_1),
            self.reduce_image(image_1),
            self.reduce_queries(queries_1),
            pos_2,
            self.query_allowed,
        )
        xyz = self.xyz_head(queries_2)
        joints, coarse = xyz[:, : self.num_joints], xyz[:, self.num_joints :]
        return HMROutput(joints=joints, vertices=self._upsample(coarse), camera=self._camera(camera_2[:, 0]))


def variant_layers(variant: str, family: str = "FastMETRO") -> int:
    """Layers per transformer of variant S/M/L (any case); shared by FastMETRO and TORE."""
    key = variant.upper()
    if key not in VARIANT_LAYERS:
        raise ValueError(f"unknown {family} variant {variant!r}; choose one of {sorted(VARIANT_LAYERS)}")
    return VARIANT_LAYERS[key]


@dataclass(frozen=True)
class CommonBackboneOptions:
    """The ``--backbone-option`` values (``BackboneOptions.extra``) FastMETRO and TORE share."""

    dropout: float = option(
        DEFAULT_DROPOUT, low=0.0, high=1.0, high_open=True, key="dropout", help="dropout in the transformers"
    )
    encoder_norm: str = option(
        "batch", choices=NORMS, key="encoder_norm", help="the CNN's normalisation (group for example-level DP-SGD)"
    )


@dataclass(frozen=True)
class FastMETROOptions(CommonBackboneOptions):
    """``--backbone-option`` values of ``fastmetro``."""

    learned_upsampling: bool = option(
        False,
        key="learned_upsampling",
        help="the reference's learnable coarse→middle upsampling instead of the fixed one",
    )


def make_fastmetro(body_model: BodyModel, options: BackboneOptions) -> FastMETRO:
    """Build FastMETRO-``options.variant`` (S, M or L) for ``body_model``'s mesh pyramid.

    ``options.extra`` holds :class:`FastMETROOptions`: ``dropout`` (default 0.1), ``encoder_norm``
    (``batch`` or ``group``, see :mod:`pchmr.core.kit.encoders`) and ``learned_upsampling``
    (default false: the reference's learnable coarse→middle layer, see the module docstring). ``options.freeze_encoder`` trains only the transformer and heads
    over the (pretrained) CNN, see :meth:`~pchmr.core.kit.encoders.FeatureEncoder.freeze`.
    """
    layers = variant_layers(options.variant)
    extra = read_options(FastMETROOptions, options.extra, plugin="fastmetro", kind="backbone")
    encoder = build_encoder(
        options.encoder, options.input_size, norm=extra.encoder_norm, weights=options.encoder_weights
    )
    if options.freeze_encoder:
        encoder.freeze()
    return FastMETRO(
        body_model.pyramid(),
        num_joints=body_model.num_joints,
        encoder=encoder,
        input_size=options.input_size,
        num_layers=layers,
        dropout=extra.dropout,
        learned_upsampling=extra.learned_upsampling,
    )


make_fastmetro.options = FastMETROOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_backbones() -> Mapping[str, BackboneFactory]:
    """Offer ``fastmetro`` (variants S/M/L via ``BackboneOptions.variant``)."""
    return {"fastmetro": make_fastmetro}
