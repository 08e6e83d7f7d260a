"""What the server and the clients of a federation share: the run's strategy, client sampling,
the keys of Flower's configs, the round report and the quieting of Flower's console."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.federation.mechanisms import MechanismRuntime
from pchmr.core.engine.registry import get_registry
from pchmr.core.kit.seeds import derive_seed

__all__ = [
    "PARTITION_KEY",
    "ROUND_TIMEOUT",
    "RUN_DIR_KEY",
    "SPEED_METRIC",
    "ClientDropout",
    "EngineStopped",
    "RoundReport",
    "build_strategy",
    "drops_out",
    "quiet_flower",
    "required_replies",
    "route_flower_logs",
    "sample_clients",
]


log = logging.getLogger("pchmr.federation")


PARTITION_KEY = "partition-id"


RUN_DIR_KEY = "pchmr-run-dir"


#: a client's training speed in its train reply's metrics: examples × local epochs / fit seconds
SPEED_METRIC = "train-img-s"


#: seconds a round's send_and_receive may wait for the slowest client
ROUND_TIMEOUT = 24 * 3600.0


def build_strategy(config: RunConfig) -> StrategyParts:
    """The run's strategy, wrapped by its privacy plugin when ``config.privacy`` names one.

    Raises :class:`~pchmr.core.contracts.strategy.IncompatibleError` (a ValueError) when the
    privacy plugin cannot wrap the strategy or the mechanisms cannot run together
    (:class:`~pchmr.core.engine.federation.mechanisms.MechanismRuntime`), so a run is refused
    before any heavy work.
    """
    factory = get_registry().get("strategy", config.strategy)
    # Flower warns that fraction_evaluate=0 skips federated evaluation: pchmr evaluates on the server
    with quiet_flower():
        parts = factory(_strategy_config(config, config.strategy_options))
        if config.privacy is not None:
            privacy = get_registry().get("privacy", config.privacy)
            parts = privacy(parts, _strategy_config(config, config.privacy_options))
    MechanismRuntime(parts)  # refuses mechanisms that cannot run together
    return parts


def route_flower_logs(verbose: bool = False) -> None:
    """Flower's log goes to run.log in full (its logger at INFO; :meth:`RunDir.attach_log` adds the
    file), and to the console only when ``verbose``: otherwise Flower's console handler shows
    nothing, so a client's error reaches the user as the one message the run raises, not as Ray's
    tracebacks. With :func:`quiet_flower`, the only place pchmr sets Flower's logging."""
    from flwr.supercore.logger import console_handler

    if not verbose:
        console_handler.setLevel(logging.CRITICAL)
    logging.getLogger("flwr").setLevel(logging.INFO)


@contextmanager
def quiet_flower(level: int = logging.ERROR) -> Iterator[None]:
    """Flower's logger at ``level`` (its warnings off) for the block, then as it was: strategy
    construction warns about settings pchmr chose on purpose (``fraction_evaluate=0``)."""
    logger = logging.getLogger("flwr")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _strategy_config(config: RunConfig, options: Mapping[str, Any]) -> StrategyConfig:
    """The run's federation shape (clients, per round, rounds, seed) with one plugin's options."""
    return StrategyConfig(
        num_clients=config.clients,
        per_round=config.per_round,
        num_rounds=config.rounds,
        seed=config.seed,
        options=dict(options),
    )


def sample_clients(seed: int, server_round: int, num_clients: int, per_round: int) -> list[int]:
    """The partition ids trained in ``server_round`` (sorted), from the run seed alone."""
    rng = np.random.default_rng(derive_seed(seed, server_round, 0x5A))
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def required_replies(sampled: int, fraction: float | None) -> int:
    """How many of a round's ``sampled`` clients must train successfully for it to be aggregated:
    ``ceil(fraction × sampled)`` (``--min-fit-fraction``), at least one; ``fraction`` None: one,
    Flower's ``accept_failures`` semantics (aggregate whatever arrived)."""
    if fraction is None:
        return 1
    return max(1, math.ceil(round(float(fraction) * sampled, 9)))  # round: 0.3 × 10 is 3.0000000000000004


class EngineStopped(RuntimeError):
    """The engine under the server stopped (or the run was interrupted) while the server waited for it."""


class ClientDropout(RuntimeError):
    """A simulated device failure (``--client-dropout``), raised inside the client app so that it
    reaches the server through Flower's error path, as a real device's failure does."""


def drops_out(seed: int, server_round: int, partition_id: int, probability: float) -> bool:
    """Whether partition ``partition_id`` fails its fit in ``server_round`` under ``--client-dropout
    probability``: one uniform draw from (run seed, round, partition id) alone, so the same run,
    resumed or not, on any engine and in any scheduling order, loses the same clients."""
    if probability <= 0.0:
        return False
    rng = np.random.default_rng(derive_seed(seed, server_round, partition_id, 0xD209))
    return bool(rng.random() < probability)


@dataclass
class RoundReport:
    """What the server reports to the CLI after every round (for the progress display)."""

    server_round: int
    num_rounds: int
    metrics: dict[str, float] | None
    seconds: float
    sampled: list[int] = field(default_factory=list)
    #: the sampled clients that failed this round: ``{"partition": id, "error": reason}``
    failures: list[dict[str, Any]] = field(default_factory=list)
