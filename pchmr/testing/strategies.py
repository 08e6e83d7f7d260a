"""Contract suite for strategy plugins (:class:`~pchmr.core.contracts.strategy.StrategyParts` factories).

Besides aggregation, the suite checks what a third party's mechanism appended to the strategy (as
a privacy wrapper does) relies on: it composes with the strategy's own mechanisms, its train-config
values reach the clients, its state is checkpointed under its own name, and the strategy still
aggregates when its server strategy is wrapped by a delegating wrapper.

Subclass :class:`StrategyContract` in a test module and override the ``strategy_factory`` fixture
(and ``strategy_options`` if the strategy needs options)::

    from pchmr.testing.strategies import StrategyContract

    class TestMyStrategy(StrategyContract):
        @pytest.fixture
        def strategy_factory(self):
            return my_strategy

Capability fixtures (override to return False):

* ``weights_by_examples`` — aggregation weights clients by their ``num-examples``;
* ``averages_updates`` — the aggregate is a weighted average of the client models, so identical
  updates aggregate to themselves (False for server optimisers such as FedAdam, whose step is
  not the average; the suite then checks the weaker invariants noted in each check);
* ``flower_simulation`` — run the real Flower simulation check (about 20 s: Ray starts).

The unit checks drive ``server.configure_train`` with a stand-in grid of three nodes and answer
with real Flower reply ``Message``\\ s whose MetricRecord carries ``num-examples`` and
``partition-id``; the model is three float32 entries and an int64 ``num_batches_tracked``. Client
updates in the averaging checks point the same way (positive pairwise dot products), so
conflict-aware strategies such as FedGH must reduce to weighted averaging there.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.strategy import StrategyConfig, StrategyFactory, StrategyParts
from pchmr.core.kit.federation import wait_for_nodes

__all__ = [
    "FakeGrid",
    "SimulationRound",
    "StrategyContract",
    "array_record",
    "check_simulation_rounds",
    "contract_arrays",
    "contract_delta",
    "make_reply",
    "run_in_flower_simulation",
    "run_round",
    "task_identity",
    "train_config",
]

NUM_EXAMPLES_KEY = "num-examples"
PARTITION_KEY = "partition-id"
CONTRACT_NODES = 3
CONTRACT_ROUNDS = 2
CONTRACT_SEED = 0
#: float32 aggregates are compared to float64 expectations with these tolerances.
RTOL, ATOL = 1e-5, 1e-6
#: Per-round change a simulated client makes: float entries += (partition id + 1) × this.
SIMULATED_CLIENT_STEP = 0.1
_SIMULATION_TIMEOUT_S = 300.0
_NODE_POLL_S = 0.1

Arrays = dict[str, np.ndarray]
#: One client's update in a unit check: (delta from the global arrays, num-examples).
Update = tuple[Arrays, float]


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------
class FakeGrid:
    """The one Grid method a strategy's ``configure_train`` uses: ``get_node_ids``."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


@contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Flower stamps instruction Messages with the process's TaskIdentity, which a Flower runtime
    sets; outside one (unit checks) set a stand-in and restore the previous one afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    if saved[0] is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def contract_arrays() -> Arrays:
    """The global model of the unit checks: three float32 entries and an int64 counter."""
    rng = np.random.default_rng(CONTRACT_SEED)
    return {
        "encoder.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "encoder.bias": rng.normal(size=(4,)).astype(np.float32),
        "head.weight": rng.normal(size=(2, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _is_float(value: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(value).dtype, np.floating))


def contract_delta(seed: int, aligned: bool, count_step: int = 1) -> Arrays:
    """A client delta for :func:`contract_arrays`: all positive (``aligned``) or of mixed signs."""
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for key, value in contract_arrays().items():
        if _is_float(value):
            noise = rng.normal(size=value.shape)
            out[key] = (0.01 + 0.1 * np.abs(noise)) if aligned else 0.1 * noise
        else:
            out[key] = np.array(count_step, dtype=value.dtype)
    return out


def _apply(global_arrays: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Arrays:
    return {
        key: (np.asarray(value) + delta[key]).astype(np.asarray(value).dtype) for key, value in global_arrays.items()
    }


def array_record(arrays: Mapping[str, np.ndarray]) -> Any:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in arrays.items()})


def _numpy(record: Any) -> Arrays:
    return {key: array.numpy() for key, array in record.items()}


def make_reply(instruction: Any, arrays: Mapping[str, np.ndarray], num_examples: float, partition_id: int) -> Any:
    """A client's reply to ``instruction``: ``arrays`` plus ``num-examples`` and ``partition-id``."""
    from flwr.app import Message, MetricRecord, RecordDict

    metrics = MetricRecord({NUM_EXAMPLES_KEY: float(num_examples), PARTITION_KEY: float(partition_id)})
    return Message(RecordDict({"arrays": array_record(arrays), "metrics": metrics}), reply_to=instruction)


def train_config(parts: StrategyParts) -> dict[str, Any]:
    """The values the runtime adds to every round's train config: the mechanisms' ``train_config``,
    merged as the runtime merges them (a key from two mechanisms is refused)."""
    from pchmr.core.engine.federation.mechanisms import MechanismRuntime

    return MechanismRuntime(parts).train_config()


def run_round(
    parts: StrategyParts, server_round: int, global_arrays: Mapping[str, np.ndarray], updates: Sequence[Update]
) -> tuple[Arrays, Any]:
    """One round as pchmr's runtime drives it: ``configure_train`` on a grid of ``len(updates)``
    nodes, client k (partition k) answers global + ``updates[k][0]`` with ``updates[k][1]``
    examples, replies sorted by partition id, ``aggregate_train``. Returns (arrays, metrics)."""
    from flwr.app import ConfigRecord

    node_ids = [101 + k for k in range(len(updates))]
    with task_identity():
        messages = list(
            parts.server.configure_train(
                server_round, array_record(global_arrays), ConfigRecord(train_config(parts)), FakeGrid(node_ids)
            )
        )
    offered = sorted(m.metadata.dst_node_id for m in messages)
    if offered != node_ids:
        raise AssertionError(f"configure_train must train every offered node {node_ids}, it chose {offered}")
    replies = []
    for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
        pid = node_ids.index(message.metadata.dst_node_id)
        delta, count = updates[pid]
        replies.append(make_reply(message, _apply(global_arrays, delta), count, pid))
    aggregate, metrics = parts.server.aggregate_train(server_round, replies)
    if aggregate is None:
        raise AssertionError(f"aggregate_train returned no arrays for {len(replies)} valid replies")
    return _numpy(aggregate), metrics


def _assert_arrays_close(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: entries {sorted(actual)} != {sorted(expected)}"
    for key in expected:
        np.testing.assert_allclose(
            np.asarray(actual[key], dtype=np.float64),
            np.asarray(expected[key], dtype=np.float64),
            rtol=RTOL,
            atol=ATOL,
            err_msg=f"{what}: entry '{key}'",
        )


def _serialise(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` after a torch.save / torch.load round trip, as a checkpoint stores it."""
    import torch  # not at module level: simulated clients import this module, and torch takes seconds

    from pchmr.core.kit.safe_pickle import checkpoint_values

    buffer = io.BytesIO()
    torch.save(checkpoint_values(dict(state)), buffer)  # as RunDir.save_checkpoint writes it
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)  # as a resume reads it


# --------------------------------------------------------------------------------------
# the real Flower simulation
# --------------------------------------------------------------------------------------
@dataclass
class SimulationRound:
    """What the server saw in one simulated round."""

    server_round: int
    global_arrays: Arrays
    client_arrays: list[Arrays]
    aggregate: Arrays
    metrics: dict[str, Any] = field(default_factory=dict)


def _echo_train(msg: Any, context: Any) -> Any:
    """Simulated client: float entries += (partition id + 1) × step, counters += 1."""
    from flwr.app import Message, MetricRecord, RecordDict

    pid = int(context.node_config[PARTITION_KEY])
    arrays = _numpy(msg.content["arrays"])
    step = SIMULATED_CLIENT_STEP * (pid + 1)
    out = {k: (v + step).astype(v.dtype) if _is_float(v) else v + 1 for k, v in arrays.items()}
    metrics = MetricRecord({NUM_EXAMPLES_KEY: float(10 * (pid + 1)), PARTITION_KEY: float(pid)})
    return Message(RecordDict({"arrays": array_record(out), "metrics": metrics}), reply_to=msg)


def _echo_client_app() -> Any:
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_echo_train)
    return app


def _drive(parts: StrategyParts, grid: Any, rounds: int) -> list[SimulationRound]:
    from flwr.app import ConfigRecord

    arrays = contract_arrays()
    history = []
    for server_round in range(1, rounds + 1):
        messages = list(
            parts.server.configure_train(server_round, array_record(arrays), ConfigRecord(train_config(parts)), grid)
        )
        replies = list(grid.send_and_receive(messages, timeout=_SIMULATION_TIMEOUT_S))
        failed = [r for r in replies if r.has_error()]
        if failed:
            raise RuntimeError(f"round {server_round}: {len(failed)} clients failed: {failed[0].error.reason}")
        replies.sort(key=lambda r: float(r.content["metrics"][PARTITION_KEY]))
        aggregate, metrics = parts.server.aggregate_train(server_round, replies)
        if aggregate is None:
            raise RuntimeError(f"round {server_round}: aggregate_train returned no arrays")
        new_arrays = _numpy(aggregate)
        history.append(
            SimulationRound(
                server_round, arrays, [_numpy(r.content["arrays"]) for r in replies], new_arrays, dict(metrics or {})
            )
        )
        arrays = new_arrays
    return history


def run_in_flower_simulation(
    factories: Mapping[str, Callable[[], StrategyParts]], rounds: int = CONTRACT_ROUNDS, nodes: int = CONTRACT_NODES
) -> dict[str, list[SimulationRound]]:
    """Run every strategy of ``factories`` for ``rounds`` rounds in one Flower simulation (Ray
    backend, ``nodes`` SuperNodes running a client that shifts the arrays it receives), one
    strategy after the other from :func:`contract_arrays`. Returns each strategy's rounds."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    results: dict[str, list[SimulationRound]] = {}
    errors: list[tuple[str, BaseException]] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            connected = wait_for_nodes(grid, nodes, _SIMULATION_TIMEOUT_S, poll=_NODE_POLL_S)
            if len(connected) < nodes:
                raise TimeoutError(f"only {len(connected)} of {nodes} simulated nodes connected")
        except BaseException as exc:
            errors.append(("(start-up)", exc))
            return
        for name, make_parts in factories.items():
            try:
                results[name] = _drive(make_parts(), grid, rounds)
            except BaseException as exc:  # re-raised in the caller's thread below
                errors.append((name, exc))

    backend_config = {
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
        client_app=_echo_client_app(),
        num_supernodes=nodes,
        backend_name="ray",
        backend_config=backend_config,
    )
    if errors:
        name, exc = errors[0]
        raise RuntimeError(f"strategy '{name}' failed in the Flower simulation: {exc!r}") from exc
    missing = sorted(set(factories) - set(results))
    if missing:
        raise RuntimeError(f"the Flower simulation ended before strategies {missing} ran (see Flower's log)")
    return results


def check_simulation_rounds(name: str, history: Sequence[SimulationRound], averages_updates: bool) -> None:
    """Assertions on one strategy's :func:`run_in_flower_simulation` result."""
    assert len(history) == CONTRACT_ROUNDS, f"{name}: {len(history)} rounds ran, expected {CONTRACT_ROUNDS}"
    for rnd in history:
        assert len(rnd.client_arrays) == CONTRACT_NODES, (
            f"{name} round {rnd.server_round}: {len(rnd.client_arrays)} replies"
        )
        assert sorted(rnd.aggregate) == sorted(rnd.global_arrays), f"{name}: aggregate entries differ from the model's"
        for key, value in rnd.aggregate.items():
            assert value.shape == rnd.global_arrays[key].shape, f"{name}: '{key}' changed shape"
            assert np.all(np.isfinite(value)), f"{name}: '{key}' is not finite"
            if averages_updates:
                stacked = np.stack([c[key].astype(np.float64) for c in rnd.client_arrays])
                slack = ATOL + RTOL * np.abs(stacked).max()
                assert np.all(value >= stacked.min(0) - slack) and np.all(value <= stacked.max(0) + slack), (
                    f"{name} round {rnd.server_round}: '{key}' is not an average of the client values"
                )
        changed = any(not np.array_equal(rnd.aggregate[k], rnd.global_arrays[k]) for k in rnd.aggregate)
        assert changed, f"{name} round {rnd.server_round}: the global model did not change"


class _Probe(Mechanism):
    """A third party's mechanism: one train-config value and a round count as its state."""

    name = "contract-probe"
    KEY, VALUE = "contract-probe-value", 7

    def __init__(self) -> None:
        self.rounds = 0

    def train_config(self) -> Mapping[str, Any]:
        return {self.KEY: self.VALUE}

    def state_dict(self) -> Mapping[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = int(state["rounds"])


class _Delegate:
    """A server wrapper that forwards the two calls the runtime makes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        return self.inner.aggregate_train(server_round, replies)


# --------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------
class StrategyContract:
    """Checks every strategy plugin must pass; see the module docstring for the fixtures."""

    @pytest.fixture
    def strategy_factory(self) -> StrategyFactory:
        raise NotImplementedError("override the strategy_factory fixture to return the strategy factory under test")

    @pytest.fixture
    def strategy_options(self) -> Mapping[str, Any]:
        return {}

    @pytest.fixture
    def weights_by_examples(self) -> bool:
        return True

    @pytest.fixture
    def averages_updates(self) -> bool:
        return True

    @pytest.fixture
    def flower_simulation(self) -> bool:
        return True

    @pytest.fixture
    def make_parts(
        self, strategy_factory: StrategyFactory, strategy_options: Mapping[str, Any]
    ) -> Callable[[], StrategyParts]:
        """A fresh strategy per call, built for 3 clients per round, 2 rounds, seed 0."""
        config = StrategyConfig(
            num_clients=CONTRACT_NODES,
            per_round=CONTRACT_NODES,
            num_rounds=CONTRACT_ROUNDS,
            seed=CONTRACT_SEED,
            options=dict(strategy_options),
        )
        return lambda: strategy_factory(config)

    # -- checks ----------------------------------------------------------------------------
    def test_parts_are_well_formed(self, make_parts: Callable[[], StrategyParts]) -> None:
        """StrategyParts with a name, a server with configure_train and aggregate_train, JSON-able
        ``describe`` and ``train_config``, get/set_state as a pair, callable loss terms."""
        parts = make_parts()
        assert isinstance(parts, StrategyParts), f"the factory returned {type(parts).__name__}, not StrategyParts"
        assert parts.name, "StrategyParts.name is empty"
        for method in ("configure_train", "aggregate_train"):
            assert callable(getattr(parts.server, method, None)), f"the server strategy has no {method}()"
        assert all(isinstance(m, Mechanism) for m in parts.mechanisms), "mechanisms must be Mechanism objects"
        json.dumps(parts.description())  # must be JSON-able: written into the run's config
        json.dumps(train_config(parts))

    def test_configure_train_sends_the_model_to_every_offered_node(
        self, make_parts: Callable[[], StrategyParts]
    ) -> None:
        """configure_train sends the global arrays and ``train_config`` to every node it is offered."""
        from flwr.app import ConfigRecord

        parts = make_parts()
        arrays = contract_arrays()
        with task_identity():
            messages = list(
                parts.server.configure_train(
                    1, array_record(arrays), ConfigRecord(train_config(parts)), FakeGrid([5, 6, 7])
                )
            )
        assert sorted(m.metadata.dst_node_id for m in messages) == [5, 6, 7]
        for message in messages:
            sent = _numpy(next(iter(message.content.array_records.values())))
            _assert_arrays_close(sent, arrays, "the model sent to clients")
            config = next(iter(message.content.config_records.values()))
            for key, value in train_config(parts).items():
                assert config.get(key) == value, f"train_config '{key}' did not reach the clients"

    def test_aggregate_keeps_entries_shapes_and_float_dtypes(self, make_parts: Callable[[], StrategyParts]) -> None:
        """The aggregate keeps every entry, its shape and its float dtype, and is finite."""
        updates = [(contract_delta(10 + k, aligned=False), 5.0 + k) for k in range(CONTRACT_NODES)]
        aggregate, _ = run_round(make_parts(), 1, contract_arrays(), updates)
        for key, value in contract_arrays().items():
            assert key in aggregate, f"the aggregate lost '{key}'"
            assert aggregate[key].shape == value.shape, f"'{key}' changed shape {value.shape} → {aggregate[key].shape}"
            assert np.all(np.isfinite(aggregate[key])), f"'{key}' is not finite"
            if _is_float(value):
                assert aggregate[key].dtype == value.dtype, (
                    f"'{key}' changed dtype {value.dtype} → {aggregate[key].dtype}"
                )

    def test_identical_updates_aggregate_to_themselves(
        self, make_parts: Callable[[], StrategyParts], averages_updates: bool
    ) -> None:
        """Averaging strategies: the common update. Others: what one client alone would give."""
        delta = contract_delta(1, aligned=True)
        global_arrays = contract_arrays()
        aggregate, _ = run_round(make_parts(), 1, global_arrays, [(delta, 1.0), (delta, 2.0), (delta, 5.0)])
        if averages_updates:
            expected = _apply(global_arrays, delta)
        else:
            expected, _ = run_round(make_parts(), 1, global_arrays, [(delta, 1.0)])
        _assert_arrays_close(aggregate, expected, "identical client updates")

    def test_weights_follow_sample_counts(
        self, make_parts: Callable[[], StrategyParts], weights_by_examples: bool, averages_updates: bool
    ) -> None:
        """A client with n examples counts as n clients with 1; averaging: Σ n_k w_k / Σ n_k."""
        if not weights_by_examples:
            pytest.skip("the strategy does not weight clients by num-examples")
        global_arrays = contract_arrays()
        d1, d2 = contract_delta(2, aligned=True, count_step=1), contract_delta(3, aligned=True, count_step=5)
        weighted, _ = run_round(make_parts(), 1, global_arrays, [(d1, 1.0), (d2, 3.0)])
        duplicated, _ = run_round(make_parts(), 1, global_arrays, [(d1, 1.0), (d2, 1.0), (d2, 2.0)])
        _assert_arrays_close(weighted, duplicated, "3 examples on one client vs the same update on 1 + 2")
        if averages_updates:
            expected = {
                k: np.asarray(v, dtype=np.float64) + (1.0 * d1[k] + 3.0 * d2[k]) / 4.0 for k, v in global_arrays.items()
            }
            _assert_arrays_close(weighted, expected, "weights 1 : 3")

    def test_state_round_trip_gives_identical_next_round(self, make_parts: Callable[[], StrategyParts]) -> None:
        """A strategy whose mechanisms are restored from their ``state_dict()`` (by name, through
        torch.save, as a checkpoint keeps them) aggregates round 2 exactly as the uninterrupted one."""
        from pchmr.core.engine.federation.mechanisms import MechanismRuntime

        first = [(contract_delta(20 + k, aligned=False), 3.0 + 2 * k) for k in range(CONTRACT_NODES)]
        second = [(contract_delta(30 + k, aligned=False), 4.0 + k) for k in range(CONTRACT_NODES)]
        running = make_parts()
        after_one, _ = run_round(running, 1, contract_arrays(), first)
        resumed = make_parts()
        states = MechanismRuntime(running).state_dict()
        assert all(isinstance(state, Mapping) for state in states.values()), "state_dict() must return mappings"
        MechanismRuntime(resumed).load_state_dict(_serialise(states))
        uninterrupted, _ = run_round(running, 2, after_one, second)
        restored, _ = run_round(resumed, 2, after_one, second)
        for key in uninterrupted:
            np.testing.assert_array_equal(restored[key], uninterrupted[key], err_msg=f"entry '{key}' after resuming")

    def test_an_appended_mechanism_composes_and_its_config_reaches_the_clients(
        self, make_parts: Callable[[], StrategyParts]
    ) -> None:
        """What a wrapper's mechanism relies on: appended last, it runs after the strategy's own
        mechanisms, its train-config values reach every client, and its state is its own."""
        from flwr.app import ConfigRecord

        from pchmr.core.engine.federation.mechanisms import MechanismRuntime

        parts = make_parts()
        probe = _Probe()
        wrapped = parts.with_mechanism(probe, name=f"probe({parts.name})")
        runtime = MechanismRuntime(wrapped)
        assert runtime.mechanisms == (*parts.mechanisms, probe), "with_mechanism must append, keeping the others"
        assert probe not in parts.mechanisms, "with_mechanism must return new parts, leaving these unchanged"
        with task_identity():
            messages = list(
                wrapped.server.configure_train(
                    1, array_record(contract_arrays()), ConfigRecord(runtime.train_config()), FakeGrid([5, 6])
                )
            )
        for message in messages:
            config = next(iter(message.content.config_records.values()))
            assert config.get(_Probe.KEY) == _Probe.VALUE, "an appended mechanism's train_config must reach clients"
        states = runtime.state_dict()
        assert states[probe.name] == {"rounds": 0}
        MechanismRuntime(wrapped).load_state_dict(_serialise({probe.name: {"rounds": 3}}))
        assert probe.rounds == 3

    def test_a_delegating_server_wrapper_aggregates_identically(self, make_parts: Callable[[], StrategyParts]) -> None:
        """A wrapper that forwards configure_train/aggregate_train (as server-side DP does) changes
        nothing: the strategy's mechanisms do not depend on ``parts.server`` being their own."""
        updates = [(contract_delta(40 + k, aligned=False), 2.0 + k) for k in range(CONTRACT_NODES)]
        plain, _ = run_round(make_parts(), 1, contract_arrays(), updates)
        inner = make_parts()
        wrapped, _ = run_round(inner.with_server(_Delegate(inner.server)), 1, contract_arrays(), updates)
        for key in plain:
            np.testing.assert_array_equal(wrapped[key], plain[key], err_msg=f"entry '{key}' behind a wrapper")

    def test_runs_in_flower_simulation(
        self, make_parts: Callable[[], StrategyParts], flower_simulation: bool, averages_updates: bool
    ) -> None:
        """Two rounds in Flower's Simulation Engine aggregate as the unit checks say (``flower_simulation``)."""
        if not flower_simulation:
            pytest.skip("the flower_simulation fixture is False (run once for several strategies elsewhere)")
        results = run_in_flower_simulation({"strategy": make_parts})
        check_simulation_rounds("strategy", results["strategy"], averages_updates)
