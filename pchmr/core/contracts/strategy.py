"""The strategy contract: a Flower server strategy plus what the client side must add.

pchmr's federated runtime (:mod:`pchmr.core.engine.federation`) samples the round's clients itself,
from the run seed, and offers the strategy only those nodes; a strategy therefore aggregates
*every* node its ``configure_train`` sees. Build Flower strategies with ``fraction_train=1.0``,
``fraction_evaluate=0.0`` (pchmr evaluates the global model on the server) and
``min_*_nodes`` of 1 — :func:`flower_sampling_kwargs` returns exactly that.

Config keys follow Flower's kebab-case (``"proximal-mu"``, ``"server-learning-rate"``).

Privacy mechanisms (``pchmr_privacy`` plugins) wrap a :class:`StrategyParts` and use the runtime
hooks it carries: a :class:`RoundProtocol` that replaces the whole train round on the server,
client mods and named client handlers (messages whose ConfigRecord holds :data:`STAGE_KEY`),
update transforms applied on the client after local training, and per-round callbacks
(``before_round`` may raise :class:`PrivacyBudgetExhausted` to stop the run cleanly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Protocol,
    runtime_checkable,
)

if TYPE_CHECKING:  # keeps plugin discovery from importing Lightning (and Flower)
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message
    from torch import Tensor


__all__ = [
    "STAGE_KEY",
    "ClientHandler",
    "ClientRuntime",
    "IncompatibleError",
    "LossTerm",
    "PrivacyBudgetExhausted",
    "PrivacyFactory",
    "RoundProtocol",
    "RoundResult",
    "StrategyConfig",
    "StrategyFactory",
    "StrategyParts",
    "UpdateInfo",
    "UpdateTransform",
]


#: ConfigRecord key naming the client handler a protocol message is for (see ``client_handlers``).
STAGE_KEY = "pchmr-stage"


class IncompatibleError(ValueError):
    """A privacy mechanism cannot wrap this strategy (the message says why)."""


class PrivacyBudgetExhausted(Exception):
    """Raised by ``StrategyParts.before_round``: the next round would exceed the privacy budget.

    The runtime stops cleanly: it keeps the last global model, writes ``final.json`` with
    ``"stopped": <message>`` and the run exits with code 0.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class RoundResult:
    """What a :class:`RoundProtocol` returns for one round.

    ``arrays``: the new global model; ``metrics``: flat numbers merged into the round's
    ``rounds.jsonl`` record (``-`` becomes ``_`` in keys); ``bytes_sent`` / ``bytes_received``:
    what the server sent to / received from clients in this round (counted by the protocol).
    """

    arrays: ArrayRecord
    metrics: dict[str, float]
    bytes_sent: int
    bytes_received: int


@runtime_checkable
class RoundProtocol(Protocol):
    """Replaces configure_train → send_and_receive → aggregate_train for every round.

    ``grid`` is the runtime's view of the Flower grid holding only the round's sampled nodes
    (``grid.get_node_ids()``; ``grid.partition_id(node_id)`` maps a node to its partition);
    ``arrays`` is the current global model, ``train_config`` the round's train config (already
    holding ``server-round``, ``local-epochs`` and the strategy's ``train_config``), ``timeout``
    the seconds a send_and_receive may wait. Reply checking and ordering:
    :func:`pchmr.core.kit.federation.ordered_replies`; local training inside a client handler:
    :func:`pchmr.core.engine.federation.client.train_locally`.
    """

    def run_round(
        self, grid: Any, server_round: int, arrays: ArrayRecord, train_config: ConfigRecord, timeout: float
    ) -> RoundResult: ...


@dataclass(frozen=True)
class UpdateInfo:
    """What an update transform knows about the client update it transforms."""

    server_round: int
    partition_id: int
    num_examples: int
    num_clients: int  # N, the federation's size
    per_round: int  # k, clients sampled per round
    config: Mapping[str, Any]  # the round's train config as the client received it


#: ``transform(new_state, global_state, info) -> new_state'`` applied on the client after local
#: training (e.g. clip the update ``new - global`` and add noise).
UpdateTransform = Callable[[dict[str, "Tensor"], dict[str, "Tensor"], UpdateInfo], dict[str, "Tensor"]]

#: ``term(module, batch, output) -> scalar`` added to a client's local loss, already weighted by its
#: owner; ``module`` is the engine's HMRModule, ``output`` the backbone's HMROutput.
LossTerm = Callable[[Any, Mapping[str, "Tensor"], Any], "Tensor"]


class ClientRuntime(Protocol):
    """What a client handler receives: the client process's state, built once from the run directory."""

    strategy: StrategyParts

    def train(self, msg: Message, context: Context) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Local training for a train message (the global model in ``"arrays"``, the round's config in
        ``"config"``), then the strategy's update transforms: the new state dict and its metrics
        (``num-examples``, ``train-loss``, ``fit-seconds``, ``partition-id``)."""
        ...


#: ``handler(msg, context, runtime) -> reply`` for protocol messages whose ConfigRecord has
#: ``STAGE_KEY`` set to the handler's key.
ClientHandler = Callable[["Message", "Context", "ClientRuntime"], "Message"]


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
      resume. Stateless strategies leave them ``None``. A privacy wrapper composes its own state
      with the wrapped strategy's (e.g. ``{"inner": inner_state, "accountant": steps}``).

    Runtime hooks (defaults keep plain federated training):

    * ``round_protocol``: a :class:`RoundProtocol` run *instead of* configure_train →
      send_and_receive → aggregate_train (e.g. secure aggregation);
    * ``client_mods``: Flower client mods ``(msg, context, call_next) -> Message`` chained, in
      order, around the client's handlers for every message type (query, train, protocol stages);
    * ``client_handlers``: ``{stage: handler}``; a train message whose ConfigRecord holds
      ``STAGE_KEY == stage`` goes to ``handler(msg, context, runtime)`` instead of local training;
    * ``update_transforms``: applied in order on the client after local training to
      ``(new_state, global_state, info)`` (client-side clipping/noise, composable with secure
      aggregation since it happens before anything leaves the client);
    * ``before_round(server_round)``: called before each round; may raise
      :class:`PrivacyBudgetExhausted` to stop the run cleanly;
    * ``round_metrics(server_round)``: numbers merged into that round's ``rounds.jsonl`` record
      (e.g. ``epsilon``, ``delta``), called after the round.
    * ``prepare_module(module)``: called once on every HMRModule the runtime builds (the server's
      evaluation module and each client's training module), before any round; may raise
      :class:`IncompatibleError` (e.g. DP-SGD with BatchNorm) or install
      ``module.training_step_hook``.
    """

    name: str
    server: Any
    loss_terms: Sequence[LossTerm] = ()
    client_mods: Sequence[Any] = ()
    train_config: Mapping[str, Any] = field(default_factory=dict)
    requires_individual_updates: bool = False
    describe: Mapping[str, Any] = field(default_factory=dict)
    get_state: Callable[[], Mapping[str, Any]] | None = None
    set_state: Callable[[Mapping[str, Any]], None] | None = None
    round_protocol: RoundProtocol | None = None
    client_handlers: Mapping[str, ClientHandler] = field(default_factory=dict)
    update_transforms: Sequence[UpdateTransform] = ()
    before_round: Callable[[int], None] | None = None
    round_metrics: Callable[[int], Mapping[str, float]] | None = None
    prepare_module: Callable[[Any], None] | None = None


@runtime_checkable
class StrategyFactory(Protocol):
    def __call__(self, config: StrategyConfig) -> StrategyParts: ...


@runtime_checkable
class PrivacyFactory(Protocol):
    def __call__(self, parts: StrategyParts, config: StrategyConfig) -> StrategyParts: ...
