"""Which entries of a model's state local training can change, and the mode it trains in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["fixed_state_keys", "trainable_state_keys", "training_mode"]


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


def trainable_state_keys(module: nn.Module) -> frozenset[str]:
    """The ``state_dict`` entries of ``module`` that are parameters local training updates by
    gradient: parameters with ``requires_grad`` (every name of a shared one), minus what
    :func:`fixed_state_keys` calls fixed. Every other entry is a buffer (BatchNorm's running
    statistics and ``num_batches_tracked``, constants) or a frozen parameter: statistics and
    fixed values, not a direction of descent. Decided by the model's structure alone."""
    keys = set(module.state_dict())
    trainable = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return frozenset((trainable & keys) - fixed_state_keys(module))


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
