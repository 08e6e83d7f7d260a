"""The strategy contract: a Flower server strategy plus what the client side must add.

pchmr's federated runtime (:mod:`pchmr.core.federation`) samples the round's clients itself,
from the run seed, and offers the strategy only those nodes; a strategy therefore aggregates
*every* node its ``configure_train`` sees. Build Flower strategies with ``fraction_train=1.0``,
``fraction_evaluate=0.0`` (pchmr evaluates the global model on the server) and
``min_*_nodes`` of 1 — :func:`flower_sampling_kwargs` returns exactly that.

Config keys follow Flower's kebab-case (``"proximal-mu"``, ``"server-learning-rate"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # keeps plugin discovery from importing Lightning
    from pchmr.core.hmr import LossTerm

__all__ = [
    "IncompatibleError",
    "StrategyConfig",
    "StrategyParts",
    "StrategyFactory",
    "PrivacyFactory",
    "flower_sampling_kwargs",
]


class IncompatibleError(ValueError):
    """A privacy mechanism cannot wrap this strategy (the message says why)."""


@dataclass(frozen=True)
class StrategyConfig:
    """What a strategy factory receives: the federation's size and the strategy's options."""

    num_clients: int
    per_round: int
    num_rounds: int
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any) -> Any:
        return self.options.get(key, default)


@dataclass
class StrategyParts:
    """A strategy as the runtime uses it.

    * ``server``: a Flower ``flwr.serverapp.strategy.Strategy`` (configure/aggregate train);
    * ``loss_terms``: added to every client's local loss (e.g. FedProx's proximal term);
    * ``train_config``: values put in every round's train ``ConfigRecord``;
    * ``requires_individual_updates``: True when aggregation compares single clients' updates
      (secure aggregation must then refuse it);
    * ``describe``: JSON-able description written into the run's config;
    * ``get_state`` / ``set_state``: the server strategy's state between rounds (e.g. FedOpt's
      moments) as a dict of tensors/numbers, saved in every round's checkpoint and restored on
      resume. Stateless strategies leave them ``None``.
    """

    name: str
    server: Any
    loss_terms: Sequence["LossTerm"] = ()
    client_mods: Sequence[Any] = ()
    train_config: Mapping[str, Any] = field(default_factory=dict)
    requires_individual_updates: bool = False
    describe: Mapping[str, Any] = field(default_factory=dict)
    get_state: Callable[[], Mapping[str, Any]] | None = None
    set_state: Callable[[Mapping[str, Any]], None] | None = None


@runtime_checkable
class StrategyFactory(Protocol):
    def __call__(self, config: StrategyConfig) -> StrategyParts: ...


@runtime_checkable
class PrivacyFactory(Protocol):
    def __call__(self, parts: StrategyParts, config: StrategyConfig) -> StrategyParts: ...


def flower_sampling_kwargs() -> dict[str, Any]:
    """Keyword arguments that make a Flower strategy train every node it is offered."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 1,
    }
