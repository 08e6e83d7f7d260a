"""The backbone contract: images → joints, multi-level vertices and a weak-perspective camera."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from pchmr.core.bodymodel import BodyModel

__all__ = [
    "Backbone",
    "BackboneOptions",
    "BackboneFactory",
    "HMROutput",
    "InputError",
    "check_images",
    "fixed_state_keys",
    "training_mode",
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


def fixed_state_keys(module: nn.Module) -> frozenset[str]:
    """The ``state_dict`` entries of ``module`` that local training cannot change, whatever the
    data: parameters without gradient, and the buffers of submodules that stay in eval mode when
    ``module.train()`` is called (a frozen encoder's BatchNorm statistics, see
    ``BackboneOptions.freeze_encoder``). Decided by the model's structure alone, never by an
    update, so mechanisms may treat these entries as public (differential privacy leaves them
    un-noised). Every submodule's train/eval mode is restored (:func:`training_mode`)."""
    keys = set(module.state_dict())
    with training_mode(module):
        fixed = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        for prefix, sub in module.named_modules(remove_duplicate=False):
            if not sub.training:
                fixed.update(f"{prefix}.{name}" if prefix else name for name, _ in sub.named_buffers(recurse=False))
    return frozenset(fixed & keys)


@contextmanager
def training_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.train()`` for the block — the mode local training runs in, where frozen parts keep
    themselves in eval mode — then every submodule's own mode back."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.train()
    try:
        yield module
    finally:
        for sub, training in modes:
            sub.training = training
