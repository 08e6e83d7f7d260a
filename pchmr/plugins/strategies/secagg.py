"""``secagg`` strategy: FedAvg under secure aggregation, so ``pchmr run --strategy secagg`` works as written.

It is exactly ``--strategy fedavg --privacy secagg``: Flower's FedAvg as the server strategy,
wrapped by the ``secagg`` privacy plugin (:mod:`pchmr.plugins.privacy.secagg`). Its strategy
options are the privacy plugin's (``backend``, ``num-shares``, ``reconstruction-threshold``,
``clipping-range``, ``quantization-range``, ``max-weight``, ``timeout``, ``parties``,
``precision-bits``), given with ``--strategy-option``. Combining it with ``--privacy secagg`` would
wrap secure aggregation twice and is refused.
"""

from __future__ import annotations

import dataclasses

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.plugins.privacy.secagg import secagg
from pchmr.plugins.privacy.secagg.codec import SecAggSettings
from pchmr.plugins.strategies.fedavg import fedavg

__all__ = ["secagg_fedavg"]


def secagg_fedavg(config: StrategyConfig) -> StrategyParts:
    """FedAvg (no options of its own) wrapped by secure aggregation configured from ``config.options``."""
    inner = fedavg(StrategyConfig(config.num_clients, config.per_round, config.num_rounds, config.seed, {}))
    return dataclasses.replace(secagg(inner, config), name="secagg")


secagg_fedavg.options = SecAggSettings  # type: ignore[attr-defined]  # DeclaresOptions: the privacy plugin's


@hookimpl
def pchmr_strategies() -> dict[str, object]:
    return {"secagg": secagg_fedavg}
