"""The strategy contract: a Flower server strategy plus the mechanisms that add to it.

pchmr's federated runtime (:mod:`pchmr.core.engine.federation`) samples the round's clients itself,
from the run seed, and offers the strategy only those nodes; a strategy therefore aggregates
*every* node its ``configure_train`` sees. Build Flower strategies with ``fraction_train=1.0``,
``fraction_evaluate=0.0`` (pchmr evaluates the global model on the server) and
``min_*_nodes`` of 1 — :func:`flower_sampling_kwargs` returns exactly that.

Config keys follow Flower's kebab-case (``"proximal-mu"``, ``"server-learning-rate"``).

Everything a strategy adds besides its Flower server strategy (a client loss term, the server
optimiser's state, a privacy plugin's client mods, update transforms, round protocol and
accountant) is a :class:`~pchmr.core.contracts.mechanism.Mechanism` in
:attr:`StrategyParts.mechanisms`. Privacy plugins (``pchmr_privacy``) compose by appending one
(:meth:`StrategyParts.with_mechanism`) and, where they must see every reply on the server, by
wrapping the server strategy (:meth:`StrategyParts.with_server`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    Protocol,
    runtime_checkable,
)

from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.rounds import (  # re-exported: they were defined here first
    STAGE_KEY,
    ClientHandler,
    ClientMod,
    ClientRuntime,
    RoundProtocol,
    RoundResult,
    UpdateInfo,
)

__all__ = [
    "STAGE_KEY",
    "ClientHandler",
    "ClientMod",
    "ClientRuntime",
    "IncompatibleError",
    "PrivacyBudgetExhausted",
    "PrivacyFactory",
    "RoundProtocol",
    "RoundResult",
    "StrategyConfig",
    "StrategyFactory",
    "StrategyParts",
    "UpdateInfo",
]


class IncompatibleError(ValueError):
    """A privacy mechanism cannot wrap this strategy, or a strategy's mechanisms cannot run together
    (the message says why)."""


class PrivacyBudgetExhausted(Exception):
    """Raised by a mechanism's ``before_round``: the next round would exceed the privacy budget.

    The runtime stops cleanly: it keeps the last global model, writes ``final.json`` with
    ``"stopped": <message>`` and the run exits with code 0.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


@dataclass(frozen=True)
class StrategyParts:
    """A strategy as the runtime uses it.

    * ``name``: shown in errors (a privacy wrapper renames it, e.g. ``dp(fedavg)``);
    * ``server``: a Flower ``flwr.serverapp.strategy.Strategy`` (configure/aggregate train);
    * ``mechanisms``: what the strategy adds, in the order the runtime calls their hooks (see
      :mod:`pchmr.core.contracts.mechanism`); their names are unique;
    * ``requires_individual_updates``: True when aggregation compares single clients' updates
      (secure aggregation must then refuse it);
    * ``describe``: the strategy's JSON-able description; :meth:`description` adds the
      mechanisms' and is written into the run's ``config.json``.

    Compose by appending (:meth:`with_mechanism`) or wrapping the server (:meth:`with_server`);
    both return new parts and leave these unchanged.
    """

    name: str
    server: Any
    mechanisms: tuple[Mechanism, ...] = ()
    requires_individual_updates: bool = False
    describe: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mechanisms", tuple(self.mechanisms))
        seen: set[str] = set()
        for mechanism in self.mechanisms:
            if not isinstance(mechanism, Mechanism):
                raise TypeError(
                    f"strategy '{self.name}': {mechanism!r} is not a Mechanism; subclass "
                    "pchmr.api.Mechanism and override the hooks it needs"
                )
            if mechanism.name in seen:
                raise ValueError(
                    f"strategy '{self.name}' has two mechanisms named '{mechanism.name}'; a mechanism's name keys "
                    "its checkpointed state and must be unique: give one of them another name"
                )
            seen.add(mechanism.name)

    def with_mechanism(self, mechanism: Mechanism, *, name: str | None = None) -> StrategyParts:
        """These parts with ``mechanism`` appended (its hooks run after the others'), renamed to
        ``name`` when given; a second mechanism of the same name is refused (ValueError)."""
        return replace(self, name=name or self.name, mechanisms=(*self.mechanisms, mechanism))

    def with_server(self, server: Any, *, name: str | None = None) -> StrategyParts:
        """These parts with ``server`` (typically a wrapper of ``self.server``) as the Flower strategy."""
        return replace(self, name=name or self.name, server=server)

    def mechanism(self, name: str) -> Mechanism:
        """The mechanism called ``name`` (KeyError naming the ones there are)."""
        for mechanism in self.mechanisms:
            if mechanism.name == name:
                return mechanism
        raise KeyError(
            f"strategy '{self.name}' has no mechanism named '{name}'; it has: "
            f"{', '.join(m.name for m in self.mechanisms) or 'none'}"
        )

    def description(self) -> dict[str, Any]:
        """``describe`` plus ``"mechanisms"``: each mechanism's ``describe()`` with its ``name``, in
        list order (what ``config.json`` records as the run's strategy)."""
        mechanisms = [{"name": m.name, **dict(m.describe())} for m in self.mechanisms]
        return {**dict(self.describe), "mechanisms": mechanisms}


@runtime_checkable
class StrategyFactory(Protocol):
    def __call__(self, config: StrategyConfig) -> StrategyParts: ...


@runtime_checkable
class PrivacyFactory(Protocol):
    def __call__(self, parts: StrategyParts, config: StrategyConfig) -> StrategyParts: ...
