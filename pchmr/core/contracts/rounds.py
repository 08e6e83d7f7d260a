"""What one federated round is made of, between the server, the clients and the mechanisms: a round
protocol and its result, what a client update's transform knows, client mods and handlers and the
client runtime a handler receives.

Both :mod:`pchmr.core.contracts.strategy` (which re-exports these names) and
:mod:`pchmr.core.contracts.mechanism` use them; this module imports neither, so the two never import
each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # keeps plugin discovery from importing Flower
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message
    from torch import Tensor

__all__ = ["STAGE_KEY", "ClientHandler", "ClientMod", "ClientRuntime", "RoundProtocol", "RoundResult", "UpdateInfo"]


#: ConfigRecord key naming the client handler a protocol message is for (see ``client_handlers``).
STAGE_KEY = "pchmr-stage"


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
    holding ``server-round``, ``local-epochs``, ``lr`` and the mechanisms' ``train_config``), ``timeout``
    the seconds a send_and_receive may wait. Reply checking and ordering:
    :func:`pchmr.core.kit.federation.ordered_replies`; local training inside a client handler:
    :func:`pchmr.core.engine.federation.client.train_locally`.
    """

    def run_round(
        self, grid: Any, server_round: int, arrays: ArrayRecord, train_config: ConfigRecord, timeout: float
    ) -> RoundResult: ...


@dataclass(frozen=True)
class UpdateInfo:
    """What :meth:`~pchmr.core.contracts.mechanism.Mechanism.transform_update` knows about the client
    update it transforms."""

    server_round: int
    partition_id: int
    num_examples: int
    num_clients: int  # N, the federation's size
    per_round: int  # k, clients sampled per round
    config: Mapping[str, Any]  # the round's train config as the client received it


#: A Flower client mod: ``mod(msg, context, call_next) -> reply`` (``call_next(msg, context)`` runs
#: the rest of the chain and the handler).
ClientMod = Callable[["Message", "Context", Callable[["Message", "Context"], "Message"]], "Message"]


class ClientRuntime(Protocol):
    """What a client handler receives: the client process's state, built once from the run directory."""

    strategy: Any  # the run's StrategyParts (pchmr.core.contracts.strategy, which imports this module)

    def train(self, msg: Message, context: Context) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Local training for a train message (the global model in ``"arrays"``, the round's config in
        ``"config"``), then the mechanisms' ``transform_update``: the new state dict and its metrics
        (``num-examples``, ``train-loss``, ``fit-seconds``, ``train-img-s``, ``partition-id``)."""
        ...


#: ``handler(msg, context, runtime) -> reply`` for protocol messages whose ConfigRecord has
#: ``STAGE_KEY`` set to the handler's key.
ClientHandler = Callable[["Message", "Context", "ClientRuntime"], "Message"]
