"""``fedavg``: Flower's own FedAvg (McMahan et al. 2017), weights by client sample counts."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import NoOptions, read_options
from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.core.kit.federation import flower_sampling_kwargs


def fedavg(config: StrategyConfig) -> StrategyParts:
    """Server: ``flwr.serverapp.strategy.FedAvg``; the client adds nothing to its loss."""
    read_options(NoOptions, config.options, plugin="fedavg", kind="strategy")
    server = FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples")
    return StrategyParts(name="fedavg", server=server, describe={"server": "flwr.serverapp.strategy.FedAvg"})


fedavg.options = NoOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_strategies() -> dict[str, object]:
    return {"fedavg": fedavg}
