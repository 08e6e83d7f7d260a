"""Federated rounds of a strategy and its mechanisms, run as pchmr's runtime runs them, with local
training replaced by a known update: in this process (:class:`InProcessGrid`) and on Flower's
Simulation Engine (:func:`run_rounds_in_flower_simulation`). The privacy suite drives them.

The server half, :func:`run_round`, does what pchmr's ``FederatedServer`` does in a round: the
mechanisms' ``before_round``; the train config (``local-epochs``, ``lr`` and the mechanisms'
``train_config``); the mechanisms' round protocol (``server-round`` added) or else the server
strategy's configure_train → send_and_receive → aggregate_train on the replies sorted by
partition id; then the mechanisms' ``round_metrics``.

The client half, :class:`ContractClient`, does what pchmr's ClientApp does in one client
process: it builds its *own* StrategyParts (the server's objects never reach a client), chains
the mechanisms' client mods around every message, hands a protocol stage to the mechanisms'
client handler (with itself as the ``ClientRuntime``), answers ``query`` with its partition id,
and otherwise "trains": :func:`client_update` moves every float entry by a small known step and
the mechanisms' ``transform_update`` runs on the result. No HMRModule is built, so
``prepare_module``, ``loss`` and ``training_step`` are not called here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pchmr.core.contracts.strategy import StrategyParts, UpdateInfo
from pchmr.core.engine.federation.mechanisms import MechanismRuntime
from pchmr.core.kit.federation import message_stage, ordered_replies, wait_for_nodes
from pchmr.testing.strategies import CONTRACT_NODES, CONTRACT_ROUNDS, array_record, contract_arrays, task_identity

__all__ = [
    "CLIENT_STEP",
    "ContractClient",
    "InProcessGrid",
    "RoundOutcome",
    "client_examples",
    "client_update",
    "run_round",
    "run_rounds",
    "run_rounds_in_flower_simulation",
]

PARTITION_KEY = "partition-id"
#: Standard deviation of every float entry's change in :func:`client_update` (a whole update of the
#: contract model has an L2 norm of about 0.25: below the usual clip norms of 1).
CLIENT_STEP = 0.05
#: The round's train config besides the mechanisms' (what pchmr's server sends).
LOCAL_EPOCHS, LEARNING_RATE = 1, 1e-3
#: Seconds a send_and_receive (or a protocol stage) may wait.
ROUND_TIMEOUT_S = 300.0
#: ConfigRecord that tells a simulated client which strategy of the simulation a message is for.
STRATEGY_RECORD, STRATEGY_KEY = "pchmr-contract", "strategy"
_NODE_POLL_S = 0.1

Arrays = dict[str, np.ndarray]
PartsMaker = Callable[[], StrategyParts]


def client_examples(partition_id: int) -> int:
    """The ``num-examples`` client ``partition_id`` reports: 10, 20, 30, … (unequal on purpose)."""
    return 10 * (partition_id + 1)


def client_update(
    global_state: Mapping[str, Any], server_round: int, partition_id: int, num_examples: int | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """Local training's stand-in: float entries + N(0, CLIENT_STEP²) drawn from (round, partition),
    integer entries + 1; metrics ``num-examples`` (``client_examples`` unless given),
    ``train-loss`` and ``partition-id``. Torch tensors in, torch tensors out, dtypes kept."""
    import torch

    rng = np.random.default_rng([server_round, partition_id])
    new_state = {}
    for key in sorted(global_state):
        value = global_state[key]
        if value.is_floating_point():
            step = torch.from_numpy(np.asarray(CLIENT_STEP * rng.standard_normal(tuple(value.shape))))
            new_state[key] = (value.double() + step).to(value.dtype)
        else:
            new_state[key] = value + 1
    examples = client_examples(partition_id) if num_examples is None else num_examples
    metrics = {
        "num-examples": float(examples),
        "train-loss": 1.0 + 0.5 * partition_id,
        PARTITION_KEY: float(partition_id),
    }
    return new_state, metrics


def _numpy(record: Any) -> Arrays:
    return {key: array.numpy() for key, array in record.items()}


# --------------------------------------------------------------------------------------
# the client half
# --------------------------------------------------------------------------------------
class ContractClient:
    """One client process: its own parts from ``make_parts``, the loops over their mechanisms, and
    the ``ClientRuntime`` a mechanism's client handler receives (``strategy``, ``train``).

    ``num_examples`` replaces every client's ``num-examples`` (1: the unwrapped strategy weighting
    clients equally, the reference of mechanisms that do)."""

    def __init__(
        self,
        make_parts: PartsMaker,
        num_clients: int = CONTRACT_NODES,
        per_round: int = CONTRACT_NODES,
        num_examples: int | None = None,
    ) -> None:
        self.strategy = make_parts()
        self.mechanisms = MechanismRuntime(self.strategy)
        self.num_clients, self.per_round, self.num_examples = num_clients, per_round, num_examples

    def train(self, msg: Any, context: Any) -> tuple[dict[str, Any], dict[str, float]]:
        """The known update for a train message, then the mechanisms' ``transform_update`` (what
        pchmr's ``train_locally`` returns): the state to send and its metrics."""
        pid = int(context.node_config[PARTITION_KEY])
        config = dict(msg.content["config"])
        global_state = msg.content["arrays"].to_torch_state_dict()
        server_round = int(config["server-round"])
        new_state, metrics = client_update(global_state, server_round, pid, self.num_examples)
        info = UpdateInfo(
            server_round=server_round,
            partition_id=pid,
            num_examples=int(metrics["num-examples"]),
            num_clients=self.num_clients,
            per_round=self.per_round,
            config=config,
        )
        return self.mechanisms.transform_update(new_state, global_state, info), metrics

    def handle(self, msg: Any, context: Any) -> Any:
        """The reply to ``msg``: the mechanisms' client mods (the first outermost) around :meth:`dispatch`."""
        handler: Callable[[Any, Any], Any] = self.dispatch
        for mod in reversed(self.mechanisms.client_mods):
            handler = (lambda m, nxt: lambda message, ctx: m(message, ctx, nxt))(mod, handler)
        return handler(msg, context)

    def dispatch(self, msg: Any, context: Any) -> Any:
        from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        kind = msg.metadata.message_type.split(".")[0]
        if kind == "query":
            pid = int(context.node_config[PARTITION_KEY])
            return Message(RecordDict({"info": ConfigRecord({PARTITION_KEY: pid})}), reply_to=msg)
        if kind != "train":
            raise ValueError(f"the contract client answers query and train messages, not {msg.metadata.message_type!r}")
        stage = message_stage(msg)
        if stage is not None:
            handler = self.mechanisms.client_handlers.get(stage)
            if handler is None:
                raise KeyError(
                    f"a message asks for client stage '{stage}', but strategy '{self.strategy.name}' has "
                    f"handlers only for {sorted(self.mechanisms.client_handlers)}"
                )
            return handler(msg, context, self)
        new_state, metrics = self.train(msg, context)
        return Message(RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _node_context(node_id: int, partition_id: int) -> Any:
    from flwr.app import Context, RecordDict

    return Context(
        run_id=1, node_id=node_id, node_config={PARTITION_KEY: partition_id}, state=RecordDict(), run_config={}
    )


class InProcessGrid:
    """A Flower Grid of ``nodes`` nodes served by one :class:`ContractClient` in this process
    (node ``101 + p`` holds partition p and its own node context); ``partition_id`` as pchmr's
    round view has it. Replies come back in the order of the messages."""

    def __init__(self, client: ContractClient, nodes: int = CONTRACT_NODES) -> None:
        self.client = client
        self.partitions = {101 + p: p for p in range(nodes)}
        self.contexts = {nid: _node_context(nid, p) for nid, p in self.partitions.items()}

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def partition_id(self, node_id: int) -> int:
        return self.partitions[node_id]

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Any]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what Flower's grids set
            node_id = message.metadata.dst_node_id
            if node_id not in self.contexts:
                raise KeyError(f"a message is addressed to node {node_id}; the grid has nodes {self.get_node_ids()}")
            replies.append(self.client.handle(message, self.contexts[node_id]))
        return replies


# --------------------------------------------------------------------------------------
# the server half
# --------------------------------------------------------------------------------------
@dataclass
class RoundOutcome:
    """One round as the server saw it: the global model it started from, the aggregate, the
    round's train metrics (the server strategy's or the round protocol's) and the mechanisms'
    ``round_metrics``."""

    server_round: int
    global_arrays: Arrays
    aggregate: Arrays
    metrics: dict[str, Any] = field(default_factory=dict)
    mechanism_metrics: dict[str, float] = field(default_factory=dict)

    def next_global(self) -> Arrays:
        """The aggregate in the global model's dtypes, as pchmr's server sends it next round
        (Flower's FedAvg returns integer entries as float64)."""
        return {key: value.astype(self.global_arrays[key].dtype) for key, value in self.aggregate.items()}


def run_round(parts: StrategyParts, grid: Any, server_round: int, arrays: Mapping[str, np.ndarray]) -> RoundOutcome:
    """Round ``server_round`` of ``parts`` from the global ``arrays`` over ``grid`` (which maps
    nodes to partitions), as pchmr's server runs it (see the module docstring)."""
    from flwr.app import ConfigRecord

    runtime = MechanismRuntime(parts)
    runtime.before_round(server_round)
    config = ConfigRecord({"local-epochs": LOCAL_EPOCHS, "lr": LEARNING_RATE, **runtime.train_config()})
    record = array_record(arrays)
    if runtime.round_protocol is not None:
        config["server-round"] = server_round
        result = runtime.round_protocol.run_round(grid, server_round, record, config, ROUND_TIMEOUT_S)
        aggregate, metrics = result.arrays, dict(result.metrics)
    else:
        messages = list(parts.server.configure_train(server_round, record, config, grid))
        replies = ordered_replies(grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S), grid, server_round)
        aggregate, train_metrics = parts.server.aggregate_train(server_round, replies)
        if aggregate is None:
            raise RuntimeError(f"round {server_round}: strategy '{parts.name}' returned no aggregate")
        metrics = dict(train_metrics or {})
    return RoundOutcome(server_round, dict(arrays), _numpy(aggregate), metrics, runtime.round_metrics(server_round))


def run_rounds(
    parts: StrategyParts, grid: Any, rounds: int = CONTRACT_ROUNDS, first_round: int = 1, arrays: Arrays | None = None
) -> list[RoundOutcome]:
    """``rounds`` rounds from ``first_round``, each from the last aggregate cast to the model's dtypes,
    as pchmr's server does (the first from
    ``arrays``, default :func:`~pchmr.testing.strategies.contract_arrays`), under a Flower task
    identity (:func:`~pchmr.testing.strategies.task_identity`). A round protocol with a
    ``close()`` (one holding processes, like CrypTen's parties) is closed afterwards."""
    current = contract_arrays() if arrays is None else arrays
    outcomes = []
    try:
        with task_identity():  # messages made outside a Flower run need one; inside one, it stays
            for server_round in range(first_round, first_round + rounds):
                outcomes.append(run_round(parts, grid, server_round, current))
                current = outcomes[-1].next_global()
    finally:
        close = getattr(MechanismRuntime(parts).round_protocol, "close", None)
        if callable(close):
            close()
    return outcomes


# --------------------------------------------------------------------------------------
# on Flower's Simulation Engine
# --------------------------------------------------------------------------------------
#: Each simulated client process's ContractClient per (simulation, strategy name).
_CLIENTS: dict[tuple[str, str], ContractClient] = {}


class _SimulationView:
    """The real grid as one strategy of the simulation sees it: its nodes, their partitions, and
    every message tagged with the strategy's name (so the client process picks its parts)."""

    def __init__(self, grid: Any, partition_of: Mapping[int, int], strategy: str) -> None:
        self._grid, self._partition_of, self._strategy = grid, dict(partition_of), strategy

    def get_node_ids(self) -> list[int]:
        return sorted(self._partition_of, key=self._partition_of.__getitem__)

    def partition_id(self, node_id: int) -> int:
        return self._partition_of[node_id]

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Any]:
        from flwr.app import ConfigRecord

        outgoing = list(messages)
        for message in outgoing:
            message.content[STRATEGY_RECORD] = ConfigRecord({STRATEGY_KEY: self._strategy})
        return list(self._grid.send_and_receive(outgoing, timeout=timeout))


def _client_app(token: str, makers: Mapping[str, PartsMaker], nodes: int) -> Any:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def handle(msg: Any, context: Any) -> Any:
        if STRATEGY_RECORD not in msg.content.config_records:  # discovery
            pid = int(context.node_config[PARTITION_KEY])
            return Message(RecordDict({"info": ConfigRecord({PARTITION_KEY: pid})}), reply_to=msg)
        name = str(msg.content.config_records[STRATEGY_RECORD][STRATEGY_KEY])
        if (token, name) not in _CLIENTS:
            _CLIENTS[token, name] = ContractClient(makers[name], num_clients=nodes, per_round=nodes)
        return _CLIENTS[token, name].handle(msg, context)

    app.query()(handle)
    app.train()(handle)
    return app


def _discover(grid: Any, nodes: int) -> dict[int, int]:
    """node id → partition id, asked of every node with one ``query`` message."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common import MessageType

    node_ids = wait_for_nodes(grid, nodes, ROUND_TIMEOUT_S, poll=_NODE_POLL_S)
    if len(node_ids) < nodes:
        raise TimeoutError(f"only {len(node_ids)} of {nodes} simulated nodes connected")
    queries = [
        Message(RecordDict({"info": ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in node_ids
    ]
    replies = list(grid.send_and_receive(queries, timeout=ROUND_TIMEOUT_S))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(f"{len(failed)} simulated nodes did not report their partition: {failed[0].error.reason}")
    return {r.metadata.src_node_id: int(r.content["info"][PARTITION_KEY]) for r in replies}


def run_rounds_in_flower_simulation(
    makers: Mapping[str, PartsMaker], rounds: int = CONTRACT_ROUNDS, nodes: int = CONTRACT_NODES
) -> dict[str, list[RoundOutcome] | BaseException]:
    """Run every strategy of ``makers`` for ``rounds`` rounds, one after the other, in one Flower
    simulation (Ray backend, ``nodes`` SuperNodes whose client processes run a
    :class:`ContractClient` built from the same maker). Returns each strategy's rounds, or the
    exception that stopped it (a strategy's failure does not stop the others).

    The makers are pickled to Ray's workers: module-level functions and closures over them work,
    objects shared with this process do not reach the clients (as in a real run)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    token = uuid.uuid4().hex
    results: dict[str, list[RoundOutcome] | BaseException] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            partition_of = _discover(grid, nodes)
        except BaseException as exc:  # reported for every strategy below
            results.update(dict.fromkeys(makers, exc))
            return
        for name, make_parts in makers.items():
            try:
                results[name] = run_rounds(make_parts(), _SimulationView(grid, partition_of, name), rounds)
            except BaseException as exc:  # the caller's check reports it
                results[name] = exc

    backend_config = {  # as pchmr.testing.strategies' simulation: one CPU, Ray quiet
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": 1,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        },
    }
    # Flower 1.41/1.42 marks run_simulation deprecated ("use `flwr run`"), with no Python replacement: `flwr run`
    # submits an app named by module reference to a SuperLink, whose simulation process loads it anew, so a
    # ServerApp whose closure collects results in this process (as here) cannot run that way. See
    # pchmr/core/engine/federation/simulation.py.
    run_simulation(
        server_app=server_app,
        client_app=_client_app(token, dict(makers), nodes),
        num_supernodes=nodes,
        backend_name="ray",
        backend_config=backend_config,
    )
    for name in makers:
        results.setdefault(name, RuntimeError(f"the Flower simulation ended before strategy '{name}' ran"))
    return results
