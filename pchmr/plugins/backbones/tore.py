"""TORE (Dou et al., ICCV 2023): token reduction on the FastMETRO trunk.

Pipeline for a batch of B crops, following the authors' FastMETRO variant
(``Frank-ZY-Dou/TORE``, ``tore/modeling_fm/bert/modeling_metro.py``)::

    encoder CNN (B, C, h, w) ─1×1 conv→ (B, 512, h, w)
    token selector: conv 3×3 512→128, GELU, Linear(128, M) per cell, softmax over the h·w cells
        → S (B, M, h·w), each row a distribution over cells ("soft pooling")
    pooled image tokens S · tokens → (B, M, 512), LayerNorm over (M, 512) jointly
    transformer 1 (d=512, MLP 2048): encoder over [camera token, M pooled tokens],
                                     decoder over the J joint tokens only
    linear 512→128 (one layer for the camera and image tokens, one for the joint tokens)
    transformer 2 (d=128, MLP 512):  same structure → camera feature, J joint features
    transformer 3 (d=128, MLP 512):  encoder over [camera feature, J joint features]
                                     ("geometry tokens"), decoder over the V_0 vertex tokens
                                     (128-d) attending to each other along coarse-mesh edges
                                     (``pyramid.adjacency``) and to the encoded geometry tokens
    heads: Linear(128, 3) on joint features → joints; on vertex features → coarse mesh;
           on the camera feature → weak perspective (s, tx, ty)
    coarse (V_0) ─fixed pyramid.up[0], up[1], ...→ full mesh  (one batched sparse product per level)

The vertex tokens never see image tokens: the coarse mesh is a function of transformer 2's
camera and joint features only. S/M/L have 1/2/3 encoder and decoder layers in each of the
three transformers. With M = int(49 · 0.8) = 39, SMPL sizes and 2048 input channels this is
10.16 M / 18.45 M / 26.73 M parameters without the CNN, as the paper and the repository.

Kept tokens. M = ``int(h · w · keep_ratio)`` (at least 1), fixed when the model is built from the
encoder's grid at ``input_size``: 39 of 49 for ResNet-50 at 224 px (the repository's
``int(49 · keep_ratio)``), 51 of 64 for the small encoder's 8×8 grid at 64 px.

Choices where the repository decides (each is needed for its parameter counts):

* the selector, the joint (M, 512) LayerNorm and a positional encoding of the pooled tokens by
  their index (the 2D sine encoding of an M×1 grid) are as in the repository; transformer 3's
  geometry tokens likewise get the sine encoding of a J×1 grid;
* the camera and image tokens share one 512→128 reduction (FastMETRO has one each);
* upsampling is entirely fixed (FastMETRO learns its coarse→middle layer).

Departures (none changes the parameter count):

* the camera scale is ``softplus(raw + offset)`` with FastMETRO's initial scale, and the joint
  and vertex heads start at FastMETRO's small ``XYZ_HEAD_INIT_GAIN`` weights (bias 0), as in
  :mod:`pchmr.plugins.backbones.fastmetro`;
* the pruning loss (:func:`token_pruning_loss`) is the selector's probability *mass* outside the
  body, averaged over kept tokens and samples (in [0, 1], independent of batch size), where
  TORE sums min–max normalised selector maps (a Python loop, scale ∝ B·M). The body mask is the
  set of feature cells hit by the GT full mesh projected with a weak-perspective camera fitted
  to the GT 3D joints and 2D keypoints (TORE projects with the *predicted* camera, used here only
  for samples where the fit is impossible). Samples without a GT mesh are left out, as in TORE.
  TORE's script weights its loss by 1e-3 · sigmoid(epoch − 3); that schedule is the trainer's.
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
    InputError,
    check_images,
)
from pchmr.core.contracts.bodymodel import BodyModel, MeshPyramid, sparse_bmm
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.kit.encoders import FeatureEncoder, build_encoder
from pchmr.core.kit.geometry import project_weak_perspective
from pchmr.core.kit.transformer import EncoderDecoder, sine_position_encoding
from pchmr.plugins.backbones.fastmetro import (
    CAMERA_HEAD_INIT_GAIN,
    DEFAULT_DROPOUT,
    FFN_DIM_1,
    FFN_DIM_2,
    INIT_CAMERA_SCALE,
    MODEL_DIM_1,
    MODEL_DIM_2,
    NUM_HEADS,
    XYZ_HEAD_INIT_GAIN,
    CommonBackboneOptions,
    variant_layers,
)

__all__ = [
    "DEFAULT_KEEP_RATIO",
    "PRUNING_LOSS",
    "TORE",
    "TOREOptions",
    "TokenSelector",
    "body_mask_on_grid",
    "fit_weak_perspective",
    "kept_tokens",
    "make_tore",
    "pchmr_backbones",
    "token_pruning_loss",
]

#: Fraction of the h·w image tokens kept after pooling (TORE's ``--keep_ratio`` 0.8).
DEFAULT_KEEP_RATIO = 0.8
#: Hidden width of the token selector's 3×3 convolution.
SELECTOR_DIM = 128
#: Width and MLP width of transformer 3 (geometry tokens → vertex tokens).
MODEL_DIM_3, FFN_DIM_3 = 128, 512
#: Name of the pruning loss in :meth:`TORE.extra_losses` (its weight: ``LossWeights.extra``).
PRUNING_LOSS = "token_pruning"
#: TORE's script weights its *summed* pruning loss (B · M normalised maps) by 1e-3; ours is the
#: mean over samples and kept tokens, so the equivalent weight is 1e-3 · B · M at TORE's batch.
TORE_PRUNING_WEIGHT = 1e-3
#: The per-GPU batch that weight was tuned at (FastMETRO's and TORE's default, 16: inferred).
TORE_REFERENCE_BATCH = 16
#: ... and ramped in by ``sigmoid(epoch - TORE_PRUNING_RAMP_EPOCH)``.
TORE_PRUNING_RAMP_EPOCH = 3
#: Guards ``int(cells · ratio)`` against 0.29 · 100 = 28.999…
KEEP_EPS = 1e-9
#: A weak-perspective fit needs this much spread (m², weighted) in the GT joints.
MIN_FIT_SPREAD = 1e-8
#: Minimum number of pyramid levels: coarse (tokens), at least one fixed upsampling.
MIN_PYRAMID_LEVELS = 2


def kept_tokens(num_cells: int, keep_ratio: float) -> int:
    """Number of pooled image tokens: ``int(num_cells · keep_ratio)``, at least 1."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    if num_cells < 1:
        raise ValueError(f"the feature grid must have at least one cell, got {num_cells}")
    return max(1, int(num_cells * keep_ratio + KEEP_EPS))


class TokenSelector(nn.Module):
    """Soft pooling weights: (B, D, h, w) tokens → (B, M, h·w), each row a softmax over the cells.

    A 3×3 convolution D→128 with GELU scores every cell; a Linear(128, M) turns a cell's score
    vector into one logit per kept token; the softmax runs over cells, so kept token m is the
    convex combination ``Σ_c S[m, c] · token_c``.
    """

    def __init__(self, dim: int, num_kept: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, SELECTOR_DIM, kernel_size=3, padding=1)
        self.fc = nn.Linear(SELECTOR_DIM, num_kept)

    def forward(self, tokens: Tensor) -> Tensor:
        scores = F.gelu(self.conv(tokens)).flatten(2).transpose(1, 2)  # (B, h·w, 128)
        return self.fc(scores).softmax(dim=1).transpose(1, 2)  # (B, M, h·w)


class TORE(Backbone):
    """TORE on any mesh pyramid with at least two levels.

    ``forward(images (B, 3, S, S))`` → :class:`HMROutput` with joints (B, J, 3), vertices
    ((B, V_0, 3), ..., (B, V_full, 3)) in metres, camera (B, 3) = (s > 0, tx, ty) and
    ``aux["token_selector"]`` (B, M, h·w), the soft-pooling weights the pruning loss reads.
    """

    def __init__(
        self,
        pyramid: MeshPyramid,
        num_joints: int,
        encoder: FeatureEncoder,
        input_size: int,
        num_layers: int,
        keep_ratio: float = DEFAULT_KEEP_RATIO,
        dropout: float = DEFAULT_DROPOUT,
    ) -> None:
        super().__init__()
        if pyramid.levels < MIN_PYRAMID_LEVELS:
            raise ValueError(
                f"TORE needs a mesh pyramid with at least {MIN_PYRAMID_LEVELS} levels, got {pyramid.levels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.input_size = input_size
        self.num_joints = num_joints
        self.grid = encoder.grid_size(input_size)
        self.num_kept = kept_tokens(self.grid * self.grid, keep_ratio)
        self.encoder = encoder
        self.conv_1x1 = nn.Conv2d(encoder.out_channels, MODEL_DIM_1, kernel_size=1)
        self.selector = TokenSelector(MODEL_DIM_1, self.num_kept)
        self.pooled_norm = nn.LayerNorm((self.num_kept, MODEL_DIM_1))
        # learned tokens, N(0, 1) like nn.Embedding; vertex tokens live in transformer 3's width
        self.camera_token = nn.Parameter(torch.randn(1, MODEL_DIM_1))
        self.joint_tokens = nn.Parameter(torch.randn(num_joints, MODEL_DIM_1))
        self.vertex_tokens = nn.Parameter(torch.randn(pyramid.num_vertices[0], MODEL_DIM_3))
        self.transformer_1 = EncoderDecoder(MODEL_DIM_1, NUM_HEADS, FFN_DIM_1, num_layers, num_layers, dropout)
        self.transformer_2 = EncoderDecoder(MODEL_DIM_2, NUM_HEADS, FFN_DIM_2, num_layers, num_layers, dropout)
        self.transformer_3 = EncoderDecoder(MODEL_DIM_3, NUM_HEADS, FFN_DIM_3, num_layers, num_layers, dropout)
        self.reduce_encoder = nn.Linear(MODEL_DIM_1, MODEL_DIM_2)  # camera and image tokens
        self.reduce_joints = nn.Linear(MODEL_DIM_1, MODEL_DIM_2)
        self.joint_head = nn.Linear(MODEL_DIM_2, 3)
        self.vertex_head = nn.Linear(MODEL_DIM_3, 3)
        self.camera_head = nn.Linear(MODEL_DIM_2, 3)
        with torch.no_grad():
            self.camera_head.weight.mul_(CAMERA_HEAD_INIT_GAIN)
            self.camera_head.bias.zero_()
            for head in (self.joint_head, self.vertex_head):
                head.weight.mul_(XYZ_HEAD_INIT_GAIN)
                head.bias.zero_()
        self.camera_scale_offset = math.log(math.expm1(INIT_CAMERA_SCALE))  # inverse softplus
        # constants: not parameters, not in the state dict
        self.register_buffer("vertex_allowed", pyramid.adjacency.to(torch.bool).clone(), persistent=False)
        self.register_buffer("pos_1", sine_position_encoding(self.num_kept, 1, MODEL_DIM_1), persistent=False)
        self.register_buffer("pos_2", sine_position_encoding(self.num_kept, 1, MODEL_DIM_2), persistent=False)
        self.register_buffer("pos_3", sine_position_encoding(num_joints, 1, MODEL_DIM_3), persistent=False)
        self.up_levels = pyramid.levels - 1
        for level in range(self.up_levels):
            up = pyramid.up[level]
            self.register_buffer(f"up_{level}", up.coalesce() if up.is_sparse else up, persistent=False)

    # -- pieces ----------------------------------------------------------------------------
    def pool_tokens(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features (B, C, h, w) → (pooled tokens (B, M, 512), selector (B, M, h·w))."""
        tokens = self.conv_1x1(features)
        selector = self.selector(tokens)
        pooled = torch.bmm(selector, tokens.flatten(2).transpose(1, 2))
        return self.pooled_norm(pooled), selector

    def decode_vertices(self, camera_features: Tensor, joint_features: Tensor) -> Tensor:
        """Transformer 3: (B, 1, 128) camera and (B, J, 128) joint features → (B, V_0, 3) coarse mesh."""
        batch = joint_features.shape[0]
        queries = self.vertex_tokens.expand(batch, -1, -1)
        _, _, vertex_features = self.transformer_3(
            camera_features, joint_features, queries, self.pos_3.to(joint_features.dtype), self.vertex_allowed
        )
        return self.vertex_head(vertex_features)

    def _camera(self, camera_features: Tensor) -> Tensor:
        """(B, 128) → (B, 3) = (s > 0, tx, ty)."""
        raw = self.camera_head(camera_features)
        return torch.cat((F.softplus(raw[:, :1] + self.camera_scale_offset), raw[:, 1:]), dim=1)

    def _upsample(self, coarse: Tensor) -> tuple[Tensor, ...]:
        """(B, V_0, 3) → every level, coarse first, by the fixed pyramid matrices."""
        levels = [coarse]
        for level in range(self.up_levels):
            levels.append(sparse_bmm(getattr(self, f"up_{level}"), levels[-1]))
        return tuple(levels)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, images: Tensor) -> HMROutput:
        check_images(images, self.input_size)
        return self.forward_features(self.encoder(images))

    def forward_features(self, features: Tensor) -> HMROutput:
        """The trunk without the CNN: features (B, C, h, w) as the encoder would produce them."""
        expected = (self.conv_1x1.in_channels, self.grid, self.grid)
        if features.ndim != 4 or tuple(features.shape[1:]) != expected:
            raise InputError(
                f"TORE features must be (B, {expected[0]}, {self.grid}, {self.grid}) (the encoder's grid at "
                f"{self.input_size} px, which fixes the {self.num_kept} kept tokens), got {tuple(features.shape)}"
            )
        batch = features.shape[0]
        pooled, selector = self.pool_tokens(features)
        dtype = pooled.dtype
        camera = self.camera_token.expand(batch, -1, -1)
        joints = self.joint_tokens.expand(batch, -1, -1)
        camera_1, image_1, joints_1 = self.transformer_1(camera, pooled, joints, self.pos_1.to(dtype))
        camera_2, _, joints_2 = self.transformer_2(
            self.reduce_encoder(camera_1),
            self.reduce_encoder(image_1),
            self.reduce_joints(joints_1),
            self.pos_2.to(dtype),
        )
        coarse = self.decode_vertices(camera_2, joints_2)
        return HMROutput(
            joints=self.joint_head(joints_2),
            vertices=self._upsample(coarse),
            camera=self._camera(camera_2[:, 0]),
            aux={"token_selector": selector},
        )

    # -- loss ------------------------------------------------------------------------------
    def extra_losses(self, output: HMROutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"token_pruning": selector mass outside the GT body}``, unweighted; see :func:`token_pruning_loss`."""
        return {PRUNING_LOSS: token_pruning_loss(output, batch, self.grid, self.grid)}

    def extra_loss_weights(self, epoch: int) -> dict[str, float]:
        """The pruning loss's base weight, 1e-3 · 16 · M (see :data:`TORE_PRUNING_WEIGHT`)."""
        return {PRUNING_LOSS: TORE_PRUNING_WEIGHT * TORE_REFERENCE_BATCH * self.num_kept}

    def extra_loss_schedule(self, epoch: int) -> dict[str, float]:
        """TORE's warm-up of the pruning loss: ``sigmoid(epoch - 3)``."""
        return {PRUNING_LOSS: 1.0 / (1.0 + math.exp(TORE_PRUNING_RAMP_EPOCH - epoch))}


# ------------------------------------------------------------------------------- pruning loss


def fit_weak_perspective(points: Tensor, uv: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares weak perspective mapping (B, N, 3) metres onto (B, N, 2) crop coordinates.

    Minimises ``Σ_n w_n ‖s · xy_n + t − uv_n‖²`` in closed form (weighted means, then
    ``s = Σ w (xy − x̄y)·(uv − ūv) / Σ w ‖xy − x̄y‖²``). Returns ``(camera (B, 3) = (s, tx, ty),
    ok (B,) bool)``; ``ok`` is False where fewer than two weighted points are spread apart or
    the fitted scale is not positive (camera rows there are meaningless).
    """
    w = weight.to(points.dtype)
    total = w.sum(dim=1, keepdim=True)  # (B, 1)
    safe = total.clamp_min(torch.finfo(points.dtype).tiny)
    xy = points[..., :2]
    mean_xy = (w[..., None] * xy).sum(dim=1) / safe
    mean_uv = (w[..., None] * uv).sum(dim=1) / safe
    dxy, duv = xy - mean_xy[:, None], uv - mean_uv[:, None]
    spread = (w * dxy.square().sum(dim=-1)).sum(dim=1)
    scale = (w * (dxy * duv).sum(dim=-1)).sum(dim=1) / spread.clamp_min(MIN_FIT_SPREAD)
    translation = mean_uv - scale[:, None] * mean_xy
    ok = (spread > MIN_FIT_SPREAD) & (scale > 0) & torch.isfinite(scale)
    return torch.cat((scale[:, None], translation), dim=1), ok


def body_mask_on_grid(uv: Tensor, valid: Tensor, height: int, width: int) -> Tensor:
    """(B, N, 2) crop coordinates ([-1, 1], x right, y down) → (B, height·width) bool cells.

    A cell is in the body when at least one valid point falls in it; cells are row-major like
    the image tokens (row = y). Points outside the crop are ignored; x = 1 (y = 1) belongs to
    the last column (row).
    """
    inside = valid & (uv[..., 0].abs() <= 1) & (uv[..., 1].abs() <= 1)
    col = ((uv[..., 0] + 1) * (width / 2)).floor().clamp(0, width - 1).long()
    row = ((uv[..., 1] + 1) * (height / 2)).floor().clamp(0, height - 1).long()
    cell = torch.where(inside, row * width + col, torch.zeros_like(col))
    mask = torch.zeros(uv.shape[0], height * width, dtype=torch.float32, device=uv.device)
    mask.scatter_add_(1, cell, inside.to(mask.dtype))
    return mask > 0


def selector_outside_mass(selector: Tensor, body_mask: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid samples and kept tokens of the selector mass on cells outside the body.

    ``selector`` (B, M, h·w) rows sum to 1; ``body_mask`` (B, h·w) bool; ``valid`` (B,) bool.
    0 when every row puts all its mass inside the mask; 0 with a gradient when no sample is valid.
    """
    outside = (selector * (~body_mask)[:, None, :].to(selector.dtype)).sum(dim=-1)  # (B, M)
    w = valid.to(selector.dtype)
    return (outside.mean(dim=1) * w).sum() / w.sum().clamp_min(1.0)


def token_pruning_loss(output: HMROutput, batch: Mapping[str, Tensor], height: int, width: int) -> Tensor:
    """TORE's pruning supervision: selector mass outside the projected GT body (unweighted, in [0, 1]).

    The GT full mesh (``batch["vertices"]``, root-relative metres) is projected with the weak
    perspective camera fitted to ``batch["joints_3d"]`` and ``batch["keypoints_2d"]``
    (:func:`fit_weak_perspective`, weights = confidence × validity), or with the detached
    predicted camera where that fit fails; the cells it covers form the body mask
    (:func:`body_mask_on_grid`). Samples without a GT mesh (``has_vertices`` 0) or whose mesh
    falls entirely outside the crop are left out.
    """
    selector = output.aux.get("token_selector")
    if selector is None:
        raise KeyError("token_pruning_loss needs output.aux['token_selector'] (B, M, h·w) from a TORE backbone")
    if selector.shape[-1] != height * width:
        raise ValueError(f"token selector covers {selector.shape[-1]} cells, expected {height}×{width}")
    with torch.no_grad():
        joints, keypoints = batch["joints_3d"], batch["keypoints_2d"]
        weight = keypoints[..., 2] * joints[..., 3]
        fitted, ok = fit_weak_perspective(joints[..., :3], keypoints[..., :2], weight)
        camera = torch.where(ok[:, None], fitted, output.camera.detach().to(fitted.dtype))
        vertices = batch["vertices"]
        uv = project_weak_perspective(vertices, camera)
        has_mesh = batch["has_vertices"] > 0
        mask = body_mask_on_grid(uv, has_mesh[:, None].expand(-1, uv.shape[1]), height, width)
        valid = has_mesh & mask.any(dim=1)
    return selector_outside_mass(selector, mask, valid)


# ------------------------------------------------------------------------------- factory
@dataclass(frozen=True)
class TOREOptions(CommonBackboneOptions):
    """``--backbone-option`` values of ``tore``."""

    keep_ratio: float = option(
        DEFAULT_KEEP_RATIO,
        low=0.0,
        high=1.0,
        low_open=True,
        key="keep_ratio",
        help="share of image tokens kept after pooling",
    )


def make_tore(body_model: BodyModel, options: BackboneOptions) -> TORE:
    """Build TORE-``options.variant`` (S, M or L) for ``body_model``'s mesh pyramid.

    ``options.extra`` holds :class:`TOREOptions`: ``keep_ratio`` (in (0, 1], default 0.8),
    ``dropout`` (default 0.1), ``encoder_norm`` (``batch`` or ``group``, see
    :mod:`pchmr.core.kit.encoders`); ``options.freeze_encoder`` keeps the CNN fixed.
    """
    layers = variant_layers(options.variant, family="TORE")
    extra = read_options(TOREOptions, options.extra, plugin="tore", kind="backbone")
    encoder = build_encoder(
        options.encoder, options.input_size, norm=extra.encoder_norm, weights=options.encoder_weights
    )
    if options.freeze_encoder:
        encoder.freeze()
    return TORE(
        body_model.pyramid(),
        num_joints=body_model.num_joints,
        encoder=encoder,
        input_size=options.input_size,
        num_layers=layers,
        keep_ratio=extra.keep_ratio,
        dropout=extra.dropout,
    )


make_tore.options = TOREOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_backbones() -> Mapping[str, BackboneFactory]:
    """Offer ``tore`` (variants S/M/L via ``BackboneOptions.variant``, ``keep_ratio`` in ``extra``)."""
    return {"tore": make_tore}
