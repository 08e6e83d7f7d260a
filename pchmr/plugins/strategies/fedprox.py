"""``fedprox``: FedProx (Li et al., MLSys 2020) — Flower's FedProx server plus a proximal loss term.

Server: ``flwr.serverapp.strategy.FedProx``, which aggregates exactly like FedAvg (weights ∝
``num-examples``) and puts μ into every round's train config under ``"proximal-mu"``.

Client: :class:`ProximalTerm`, a mechanism whose ``loss`` adds to the local loss::

    μ/2 · Σ_i ‖w_i − w_i^global‖²      over the module's trainable parameters w_i

μ is read from the round's train config (``context.config["proximal-mu"]``) and w^global is the
state the local fit started from (``context.global_state``), both from the
:class:`~pchmr.core.contracts.mechanism.RoundContext` the runtime hands the hook. Its
gradient is μ(w − w^global), so one SGD step of size lr moves a parameter by −lr·μ(w − w^global) on
top of the data gradient; μ = 0 gives FedAvg exactly.

Option: ``proximal-mu`` (μ ≥ 0, default 0.01).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from flwr.serverapp.strategy import FedProx
from torch import Tensor, nn

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.mechanism import Mechanism, RoundContext
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.core.kit.federation import flower_sampling_kwargs

if TYPE_CHECKING:
    from pchmr.core.contracts.backbone import HMROutput

__all__ = [
    "DEFAULT_PROXIMAL_MU",
    "PROXIMAL_MU_KEY",
    "FedProxOptions",
    "ProximalTerm",
    "fedprox",
    "proximal_penalty",
    "read_proximal_mu",
]

#: Flower's train-config key for μ.
PROXIMAL_MU_KEY = "proximal-mu"
DEFAULT_PROXIMAL_MU = 0.01


@dataclass(frozen=True)
class FedProxOptions:
    """``--strategy-option`` values of ``fedprox``."""

    proximal_mu: float = option(
        DEFAULT_PROXIMAL_MU, low=0.0, key=PROXIMAL_MU_KEY, help="μ of the proximal term μ/2·‖w − w_global‖² (0: FedAvg)"
    )


def read_proximal_mu(options: Mapping[str, Any]) -> float:
    """The ``proximal-mu`` option (:class:`FedProxOptions`) as a finite float ≥ 0; an
    :class:`~pchmr.core.contracts.errors.OptionError` for any other key or value."""
    return read_options(FedProxOptions, options, plugin="fedprox", kind="strategy").proximal_mu


def proximal_penalty(
    parameters: Iterable[tuple[str, nn.Parameter]], global_state: Mapping[str, Tensor], mu: float
) -> Tensor:
    """μ/2 · Σ ‖w − w_global‖² (scalar) over the trainable ``(name, parameter)`` pairs.

    ``global_state`` maps the same names to the round's global values (any device/dtype; moved to
    the parameter's). μ = 0 returns an exact zero without building a graph.
    """
    trainable = [(name, p) for name, p in parameters if p.requires_grad]
    if not trainable:
        return torch.zeros(())
    first = trainable[0][1]
    if mu == 0.0:
        return first.new_zeros(())
    missing = [name for name, _ in trainable if name not in global_state]
    if missing:
        raise KeyError(
            f"the global state has no entry for trainable parameter(s) {missing[:3]}"
            f"{' …' if len(missing) > 3 else ''}; it must be the state dict the round started from"
        )
    total = first.new_zeros(())
    for name, p in trainable:
        total = total + (p - global_state[name].to(device=p.device, dtype=p.dtype)).pow(2).sum()
    return 0.5 * mu * total


class ProximalTerm(Mechanism):
    """FedProx's client half: ``loss`` is ``μ/2 · Σ‖w − w_global‖²`` over ``module``'s trainable
    parameters, μ and w_global from the round's :class:`~pchmr.core.contracts.mechanism.RoundContext`;
    ``batch`` and ``output`` are not used."""

    name = "fedprox"

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor], output: HMROutput, context: RoundContext) -> Tensor:
        if PROXIMAL_MU_KEY not in context.config:
            raise KeyError(
                f"the round's train config has no '{PROXIMAL_MU_KEY}' (keys: {sorted(context.config)}); "
                "the server half must be Flower's FedProx"
            )
        return proximal_penalty(module.named_parameters(), context.global_state, float(context.config[PROXIMAL_MU_KEY]))


def fedprox(config: StrategyConfig) -> StrategyParts:
    """Server: ``flwr.serverapp.strategy.FedProx``; client: :class:`ProximalTerm` in the local loss."""
    mu = read_proximal_mu(config.options)
    server = FedProx(**flower_sampling_kwargs(), weighted_by_key="num-examples", proximal_mu=mu)
    return StrategyParts(
        name="fedprox",
        server=server,
        mechanisms=(ProximalTerm(),),
        describe={
            "server": "flwr.serverapp.strategy.FedProx",
            PROXIMAL_MU_KEY: mu,
            "client": "loss += proximal-mu/2 * sum ||w - w_global||^2 over trainable parameters",
        },
    )


fedprox.options = FedProxOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_strategies() -> dict[str, object]:
    return {"fedprox": fedprox}
