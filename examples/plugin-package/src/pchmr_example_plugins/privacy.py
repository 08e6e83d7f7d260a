"""``example-clip``: every client scales its model update to an L2 norm of at most ``max-norm``.

The update is Δ = new − global over the model's floating-point entries (integer buffers such as
BatchNorm's step counter pass unchanged); a client whose ‖Δ‖₂ exceeds the bound C sends
``global + Δ · C / ‖Δ‖₂`` instead, so no single client can move the average by more than C times
its weight. Clipping alone is no privacy guarantee (``dp`` adds the noise that makes one); it bounds
each client's influence and is the first half of DP-FedAvg.

The plugin appends one mechanism, :class:`ClipUpdate`, whose ``transform_update`` runs on every
client after local training and before anything leaves it, so it composes with any strategy and
with secure aggregation (which sums what the clients send). Wrapping a strategy that already
clips is refused: the second bound would be the only one that counts, silently.

Options (``--privacy-option``): ``max-norm`` (C > 0, default 1.0). Written from
``docs/plugins.md`` alone; only :mod:`pchmr.api` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from pchmr.api import (
    IncompatibleError,
    Mechanism,
    PrivacyFactory,
    StrategyConfig,
    StrategyParts,
    UpdateInfo,
    hookimpl,
    option,
    read_options,
)

__all__ = ["NAME", "ClipOptions", "ClipUpdate", "clip_updates", "pchmr_privacy", "update_norm"]

NAME = "example-clip"
#: Below this norm (a client that did not move) nothing is scaled.
_TINY_NORM = 1e-12


@dataclass(frozen=True)
class ClipOptions:
    """``--privacy-option`` values of ``example-clip``."""

    max_norm: float = option(1.0, low=0.0, low_open=True, help="C: L2 bound of a client's update (float entries)")


def update_norm(new_state: Mapping[str, Tensor], global_state: Mapping[str, Tensor]) -> float:
    """‖new − global‖₂ over the floating-point entries of ``global_state``, in float64."""
    total = sum(
        float((new_state[k].double() - g.double()).square().sum())
        for k, g in global_state.items()
        if g.is_floating_point()
    )
    return math.sqrt(total)


class ClipUpdate(Mechanism):
    """The client half: ``transform_update`` scales Δ to ‖Δ‖₂ ≤ ``max_norm``; ``describe`` records C."""

    name = NAME

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def describe(self) -> Mapping[str, object]:
        return {"max-norm": self.max_norm}

    def transform_update(
        self, new_state: dict[str, Tensor], global_state: dict[str, Tensor], info: UpdateInfo
    ) -> dict[str, Tensor]:
        """Client, after local training: the state to send, same keys, shapes and dtypes."""
        norm = update_norm(new_state, global_state)
        if norm <= self.max_norm or norm < _TINY_NORM:
            return new_state
        scale = self.max_norm / norm
        out = {}
        for key, g in global_state.items():
            new = new_state[key]
            out[key] = (g.double() + scale * (new.double() - g.double())).to(g.dtype) if g.is_floating_point() else new
        return out


def clip_updates(parts: StrategyParts, config: StrategyConfig) -> StrategyParts:
    """The factory registered as ``example-clip``: ``parts`` with :class:`ClipUpdate` appended."""
    options = read_options(ClipOptions, config.options, plugin=NAME, kind="privacy")
    if any(isinstance(m, ClipUpdate) for m in parts.mechanisms):
        raise IncompatibleError(
            f"{NAME} cannot wrap '{parts.name}': it already clips client updates (mechanism '{NAME}'), and only "
            "the smaller bound would count; apply it once with the bound you want"
        )
    return parts.with_mechanism(ClipUpdate(options.max_norm), name=f"{NAME}({parts.name})")


clip_updates.options = ClipOptions  # type: ignore[attr-defined]  # the DeclaresOptions capability


@hookimpl
def pchmr_privacy() -> Mapping[str, PrivacyFactory]:
    """Offer ``example-clip``."""
    return {NAME: clip_updates}
