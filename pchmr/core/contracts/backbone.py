"""The backbone contract: images → joints, multi-level vertices and a weak-perspective camera."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from pchmr.core.contracts.bodymodel import BodyModel

__all__ = [
    "Backbone",
    "BackboneFactory",
    "BackboneOptions",
    "HMROutput",
    "InputError",
    "check_images",
]


class InputError(ValueError):
    """Images handed to a backbone do not match what it was built for."""


@dataclass(frozen=True)
class HMROutput:
    """What every backbone returns for a batch of B images.

    * ``joints``   (B, J, 3) metres, camera-frame axes (x right, y down, z forward), up to a
      translation: the loss and the metrics root-align them;
    * ``vertices`` one (B, V_l, 3) tensor per mesh-pyramid level, coarse first, full last, in
      the same frame and units as ``joints``;
    * ``camera``   (B, 3) weak perspective (s, tx, ty): ``uv = s * xyz[..., :2] + (tx, ty)``
      maps root-relative metres to crop coordinates in [-1, 1];
    * ``aux``      backbone-specific tensors its :meth:`Backbone.extra_losses` reads.
    """

    joints: Tensor
    vertices: tuple[Tensor, ...]
    camera: Tensor
    aux: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneOptions:
    """Options every backbone factory receives; ``extra`` holds plugin-specific ones.

    ``encoder_weights`` is a weights file for the backbone's CNN feature encoder (``None``: random
    init). ``freeze_encoder`` asks for that encoder to stay fixed: no gradients (so no optimizer
    state and no weight decay) and normalisation statistics kept in training mode. A backbone
    without a separable feature encoder raises ``ValueError`` when asked to freeze one.
    """

    variant: str = "S"
    encoder: str = "small"
    input_size: int = 64
    encoder_weights: str | None = None
    freeze_encoder: bool = False
    extra: Mapping[str, object] = field(default_factory=dict)


class Backbone(nn.Module):
    """Base class of HMR backbones. ``forward(images)`` maps (B, 3, H, W) normalised crops with
    H = W = ``input_size`` to :class:`HMROutput`. Subclasses may add loss terms."""

    input_size: int

    def extra_losses(self, output: HMROutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Backbone-specific loss terms (e.g. TORE's token-pruning loss), unweighted scalars."""
        return {}

    def extra_loss_weights(self, epoch: int) -> dict[str, float]:
        """The weight of each :meth:`extra_losses` term at training epoch ``epoch`` (0-based,
        counted over the model's whole training: a federated client in round r with E local
        epochs is at ``(r - 1) * E + e``). A term missing here weighs 1.0; a user's
        ``LossWeights.extra[name]`` replaces the base weight (the schedule still applies)."""
        return {}

    def extra_loss_schedule(self, epoch: int) -> dict[str, float]:
        """Multipliers of the extra terms at ``epoch`` (a warm-up, say); missing terms: 1.0."""
        return {}


@runtime_checkable
class BackboneFactory(Protocol):
    """``factory(body_model, options) -> Backbone``."""

    def __call__(self, body_model: BodyModel, options: BackboneOptions) -> Backbone: ...


def check_images(images: Tensor, input_size: int, channels: int = 3) -> None:
    """Raise :class:`InputError` unless ``images`` is a finite (B, channels, size, size) batch."""
    expected = f"(B, {channels}, {input_size}, {input_size})"
    if not isinstance(images, Tensor):
        raise InputError(f"images must be a torch.Tensor {expected}, got {type(images).__name__}")
    if images.ndim != 4:
        raise InputError(f"images must be {expected}, got shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        raise InputError(f"images must have {channels} channels {expected}, got shape {tuple(images.shape)}")
    if images.shape[2] != input_size or images.shape[3] != input_size:
        raise InputError(
            f"images must be {input_size}x{input_size} {expected}, got shape {tuple(images.shape)}; "
            "build the backbone with --input-size to match the data"
        )
    if not torch.isfinite(images).all():
        raise InputError(f"images {expected} contain NaN or infinite values; check the data preparation")
