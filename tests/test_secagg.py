"""Secure aggregation (``--privacy secagg``): threat model, exactness, dropouts, composition, real runs.

The protocol tests run the real server protocol against the real client handlers through an
in-process grid (no Ray), with a stand-in for local training whose updates are known; the grid
records every reply the server receives. The Simulation-Engine runs at the end are marked slow.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.strategy import (
    IncompatibleError,
    StrategyConfig,
    StrategyParts,
)
from pchmr.core.kit.federation import flower_sampling_kwargs
from pchmr.plugins.privacy.secagg import secagg
from pchmr.plugins.privacy.secagg.codec import (
    FixedPointCodec,
    decode_sum,
    encode_update,
    mask_stream,
    read_settings,
)

#: |corr| between anything the server receives and any one client's update must stay below this
#: (for a vector independent of the update, corr·√n is approximately standard normal: 6/√n is > 6 σ).
CORR_SIGMAS = 6.0
NUM_VALUES = 3000


# --------------------------------------------------------------------------------------
# an in-process federation
# --------------------------------------------------------------------------------------
class _Context:
    def __init__(self, partition: int) -> None:
        self.state = RecordDict()
        self.node_config = {"partition-id": partition}


class FakeTrainer:
    """Local training stand-in: client p's new state = global + a fixed update of its own."""

    def __init__(self, num_clients: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.updates = {p: rng.normal(0.0, 0.05, NUM_VALUES).astype(np.float32) for p in range(num_clients)}
        self.bias_updates = {p: rng.normal(0.0, 0.5, 4).astype(np.float32) for p in range(num_clients)}
        self.examples = {p: 5 + 3 * p for p in range(num_clients)}
        self.losses = {p: 1.0 + 0.25 * p for p in range(num_clients)}
        self.new_states: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(
        self, runtime: Any, msg: Message, context: _Context
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        p = int(context.node_config["partition-id"])
        state = msg.content["arrays"].to_torch_state_dict()
        new = {
            "weight": state["weight"] + torch.from_numpy(self.updates[p]).reshape(state["weight"].shape),
            "bias": state["bias"] + torch.from_numpy(self.bias_updates[p]),
            "count": state["count"] + (p + 2),
        }
        self.new_states[p] = new
        metrics = {
            "num-examples": float(self.examples[p]),
            "train-loss": self.losses[p],
            "fit-seconds": 0.1,
            "partition-id": float(p),
        }
        return new, metrics


def global_arrays() -> ArrayRecord:
    rng = np.random.default_rng(42)
    return ArrayRecord(
        {
            "weight": Array(rng.normal(0, 1, (NUM_VALUES // 30, 30)).astype(np.float32)),
            "bias": Array(rng.normal(0, 1, 4).astype(np.float32)),
            "count": Array(np.array(7, dtype=np.int64)),
        }
    )


class InProcessGrid:
    """Delivers messages to client handlers in this process; records what the server receives.

    ``drop``: {partition: stage} — that client fails (an error reply) from that stage on.
    """

    def __init__(self, handlers: dict[int, Any], drop: dict[int, str] | None = None) -> None:
        self.nodes = {1000 + p: p for p in handlers}
        self.handlers = {1000 + p: h for p, h in handlers.items()}
        self.contexts = {1000 + p: _Context(p) for p in handlers}
        self.drop = dict(drop or {})
        self.dropped: set[int] = set()
        self.received: list[RecordDict] = []
        self._ids = 0

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def partition_id(self, node_id: int) -> int:
        return self.nodes[node_id]

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self._ids += 1
            message.metadata.__dict__["_message_id"] = f"m{self._ids}"  # what the SuperLink would set
            nid = message.metadata.dst_node_id
            stage = _stage_of(message)
            if self.drop.get(self.nodes[nid]) == stage or nid in self.dropped:
                self.dropped.add(nid)
                replies.append(Message(Error(code=0, reason="client dropped out"), reply_to=message))
                continue
            reply = self.handlers[nid](message, self.contexts[nid], None)
            self.received.append(reply.content)
            replies.append(reply)
        return replies


def _stage_of(message: Message) -> str:
    for record in message.content.config_records.values():
        if "stage" in record:
            return str(record["stage"])
    return "train"


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a Flower run need a run/node/task id."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def plain_fedavg(arrays: ArrayRecord, trainer: FakeTrainer, partitions: list[int]) -> dict[str, np.ndarray]:
    """What plain FedAvg returns for these clients (Flower's FedAvg on the clear updates)."""
    replies = []
    template = Message(RecordDict({"x": ConfigRecord({})}), dst_node_id=1, message_type="train")
    for p in partitions:
        new = trainer.new_states[p]
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in new.items()}),
                "metrics": __import__("flwr").app.MetricRecord({"num-examples": float(trainer.examples[p])}),
            }
        )
        replies.append(Message(content, reply_to=template))
    result, _ = FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples").aggregate_train(1, replies)
    return {k: v.numpy() for k, v in result.items()}


def run_flower_round(
    num_clients: int = 4,
    drop: dict[int, str] | None = None,
    options: dict | None = None,
    extra_config: dict | None = None,
):
    trainer = FakeTrainer(num_clients)
    parts = StrategyParts(name="fedavg", server=FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples"))
    wrapped = secagg(parts, StrategyConfig(num_clients, num_clients, 1, 0, options or {}))
    mechanism = wrapped.mechanism("secagg")
    handler = next(iter(mechanism.client_handlers().values()))
    handler.train = trainer
    grid = InProcessGrid(dict.fromkeys(range(num_clients), handler), drop)
    arrays = global_arrays()
    config = ConfigRecord({"server-round": 1, "local-epochs": 1, **(extra_config or {})})
    result = mechanism.round_protocol().run_round(grid, 1, arrays, config, 60.0)
    return trainer, grid, arrays, result, wrapped


def _received_vectors(received: list[RecordDict]) -> list[np.ndarray]:
    """Every bytes payload the server received, as uint64 words (those of at least 8 bytes)."""
    out = []
    for content in received:
        for record in content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes) and len(item) >= 8:
                        out.append(np.frombuffer(item[: len(item) // 8 * 8], dtype=np.uint64))
        for record in content.array_records.values():
            for array in record.values():
                out.append(np.frombuffer(array.data[: len(array.data) // 8 * 8], dtype=np.uint64))
    return out


def assert_nothing_reveals_an_update(
    grid: InProcessGrid, trainer: FakeTrainer, arrays: ArrayRecord, codec: FixedPointCodec
) -> int:
    """No received payload equals, contains or correlates with any client's update; returns how
    many update-sized payloads were checked."""
    global_state = arrays.to_torch_state_dict()
    checked = 0
    for p, new in trainer.new_states.items():
        _, clear = encode_update(codec, global_state, new, trainer.examples[p], {})
        clear_body = clear.view(np.int64)[:NUM_VALUES].astype(np.float64)
        update = trainer.updates[p].astype(np.float64)
        raw_bytes = [new["weight"].numpy().tobytes(), trainer.updates[p].tobytes(), clear.tobytes()[: NUM_VALUES * 8]]
        for content in grid.received:
            for record in content.array_records.values():
                assert not record, "the server received a model/update array in the clear"
        for vector in _received_vectors(grid.received):
            blob = vector.tobytes()
            assert not any(raw[:256] in blob for raw in raw_bytes), f"client {p}'s update appears verbatim"
            if vector.size < NUM_VALUES:
                continue
            checked += 1
            received = vector[:NUM_VALUES].view(np.int64).astype(np.float64)
            assert not np.array_equal(received, clear_body)
            for reference in (update, clear_body):
                corr = float(np.corrcoef(received, reference)[0, 1])
                assert abs(corr) < CORR_SIGMAS / math.sqrt(NUM_VALUES), f"client {p}: |corr| = {abs(corr):.3f}"
    return checked // len(trainer.new_states)


# --------------------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------------------
def test_mask_stream_uses_the_whole_secret_and_is_deterministic():
    a = mask_stream(b"\x01" * 32, b"x", 1000)
    assert a.dtype == np.uint64 and a.shape == (1000,)
    assert np.array_equal(a, mask_stream(b"\x01" * 32, b"x", 1000))
    # secrets that agree on their 32-bit XOR fold (what Flower's pseudo_rand_gen keeps) still differ
    other = b"\x01" * 28 + b"\x00\x00\x00\x00"
    folded = b"\x01" * 24 + b"\x00\x00\x00\x00" + b"\x00" * 4
    assert not np.array_equal(mask_stream(other, b"x", 1000), mask_stream(folded, b"x", 1000))
    assert not np.array_equal(a, mask_stream(b"\x01" * 32, b"y", 1000))
    bits = np.unpackbits(a.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01  # 64 000 bits: 5 σ ≈ 0.01


def test_fixed_point_sum_decodes_to_the_weighted_average():
    codec = read_settings({}, 3).codec(3)
    g = {"w": torch.zeros(5), "n": torch.tensor(3)}
    news = [
        {"w": torch.tensor([0.5, -0.25, 1.0, 0.0, -8.5]), "n": torch.tensor(5)},
        {"w": torch.tensor([-0.5, 0.75, 0.0, 2.0, 0.0]), "n": torch.tensor(4)},
    ]
    total, layout = None, None
    for new, n, loss in zip(news, (1, 3), (2.0, 4.0)):
        layout, vec = encode_update(codec, g, new, n, {"train-loss": loss, "partition-id": 9.0})
        total = vec if total is None else total + vec
    agg = decode_sum(layout, total, codec, 2)
    # (1·[0.5, −0.25, 1, 0, −8 (clipped)] + 3·[−0.5, 0.75, 0, 2, 0]) / 4
    assert np.allclose(agg.deltas["w"], [-0.25, 0.5, 0.25, 1.5, -2.0], atol=codec.tolerance)
    assert agg.deltas["n"] == pytest.approx((1 * 2 + 3 * 1) / 4)
    assert agg.num_examples == 4 and agg.clipped == 1
    assert agg.metrics == {"train-loss": pytest.approx((1 * 2.0 + 3 * 4.0) / 4)}  # partition-id is never shared


def test_an_integer_buffer_stored_as_float_is_averaged_exactly_not_clipped():
    """Flower's FedAvg turns int64 buffers (num_batches_tracked) into float64 in the global model;
    clients still return int64: such entries are exact integers relative to rint(global)."""
    codec = read_settings({}, 2).codec(2)
    g = {"steps": torch.tensor(21.0, dtype=torch.float64)}
    total, layout = None, None
    for steps, n in ((32, 1), (53, 3)):
        layout, vec = encode_update(codec, g, {"steps": torch.tensor(steps)}, n, {})
        total = vec if total is None else total + vec
    agg = decode_sum(layout, total, codec, 2)
    assert layout.entries[0][2] is False and agg.clipped == 0  # updates of 11 and 32 exceed the ±8 clip
    assert agg.integer_entries == {"steps"}
    assert 21.0 + agg.deltas["steps"] == pytest.approx((1 * 32 + 3 * 53) / 4, abs=1e-12)


def test_options_are_validated_with_clear_messages():
    with pytest.raises(
        OptionError, match="secagg privacy option 'backend' must be one of flower, crypten, got 'paillier'"
    ):
        read_settings({"backend": "paillier"}, 4)
    with pytest.raises(
        OptionError,
        match=r"secagg privacy has no option 'shares' \(did you mean 'num-shares'\?\); its options are: backend, num-shares",
    ):
        read_settings({"shares": 3}, 4)
    with pytest.raises(ValueError, match="at least 2 clients per round"):
        read_settings({}, 1)
    with pytest.raises(ValueError, match="could overflow"):
        read_settings({"quantization-range": 2**40, "max-weight": 2**20}, 10)
    with pytest.raises(OptionError, match="'clipping-range' must be a number > 0, got 0.0"):
        read_settings({"clipping-range": 0.0}, 4)
    with pytest.raises(
        OptionError, match="option 'reconstruction-threshold' \\(5\\) must be less than 'num-shares' \\(5\\)"
    ):
        read_settings({"num-shares": 5, "reconstruction-threshold": 5}, 6)
    with pytest.raises(OptionError, match=r"'num-shares' as a fraction must lie in \(0, 1\], got 1.5"):
        read_settings({"num-shares": 1.5}, 6)
    with pytest.raises(OptionError, match="'parties' must be an integer in \\[2, 8\\], got 9"):
        read_settings({"backend": "crypten", "parties": 9}, 6)
    with pytest.raises(OptionError, match="secagg privacy option 'num-shares' as a count must be >= 3"):
        read_settings({"num-shares": 2}, 6)


def test_strategies_comparing_individual_updates_are_refused():
    parts = StrategyParts(name="fedgh", server=None, requires_individual_updates=True)
    with pytest.raises(IncompatibleError, match="compares individual client updates.*only ever sees the sum"):
        secagg(parts, StrategyConfig(10, 2, 1, 0, {}))


def test_secure_aggregation_over_another_round_protocol_is_refused():
    once = secagg(StrategyParts(name="fedavg", server=None), StrategyConfig(10, 2, 1, 0, {}))
    assert once.name == "fedavg+secagg" and [m.name for m in once.mechanisms] == ["secagg"]
    with pytest.raises(IncompatibleError, match="'fedavg\\+secagg' already runs its own round protocol"):
        secagg(once, StrategyConfig(10, 2, 1, 0, {}))


# --------------------------------------------------------------------------------------
# the flower backend
# --------------------------------------------------------------------------------------
def test_flower_secure_round_equals_fedavg_and_reveals_no_update():
    trainer, grid, arrays, result, _wrapped = run_flower_round(4)
    codec = read_settings({}, 4).codec(4)
    expected = plain_fedavg(arrays, trainer, [0, 1, 2, 3])
    got = {k: v.numpy() for k, v in result.arrays.items()}
    scale = max(np.abs(expected["weight"]).max(), 1.0)
    tolerance = codec.tolerance + 2 * np.finfo(np.float32).eps * scale
    assert np.max(np.abs(got["weight"] - expected["weight"])) <= tolerance
    assert np.max(np.abs(got["bias"] - expected["bias"])) <= tolerance
    assert float(got["count"]) == pytest.approx(float(expected["count"]))
    # weighted train loss: Σ n_p loss_p / Σ n_p
    n = np.array([5, 8, 11, 14])
    loss = 1.0 + 0.25 * np.arange(4)
    assert result.metrics["train-loss"] == pytest.approx(float((n * loss).sum() / n.sum()), abs=1e-6)
    assert result.metrics["secagg-clients"] == 4 and result.metrics["secagg-dropped"] == 0
    assert result.bytes_received > 4 * NUM_VALUES * 8 and result.bytes_sent > 4 * NUM_VALUES * 4
    assert assert_nothing_reveals_an_update(grid, trainer, arrays, codec) == 4  # one masked vector per client


def test_flower_survives_a_client_dropping_out_after_sharing_keys():
    trainer, grid, arrays, result, _ = run_flower_round(5, drop={2: "collect_masked_vectors"})
    codec = read_settings({}, 5).codec(5)
    survivors = [0, 1, 3, 4]
    expected = plain_fedavg(arrays, trainer, survivors)
    got = {k: v.numpy() for k, v in result.arrays.items()}
    tolerance = codec.tolerance + 2 * np.finfo(np.float32).eps * max(np.abs(expected["weight"]).max(), 1.0)
    assert np.max(np.abs(got["weight"] - expected["weight"])) <= tolerance
    assert result.metrics["secagg-clients"] == 4 and result.metrics["secagg-dropped"] == 1
    assert 2 not in trainer.new_states  # the dropped client never trained
    assert assert_nothing_reveals_an_update(grid, trainer, arrays, codec) == 4


def test_flower_survives_a_client_dropping_out_before_sharing_keys():
    """Flower's own unmask stage halts here (it asks for shares of every sampled client)."""
    trainer, _, arrays, result, _ = run_flower_round(5, drop={3: "share_keys"})
    codec = read_settings({}, 5).codec(5)
    expected = plain_fedavg(arrays, trainer, [0, 1, 2, 4])
    got = result.arrays["weight"].numpy()
    tolerance = codec.tolerance + 2 * np.finfo(np.float32).eps * max(np.abs(expected["weight"]).max(), 1.0)
    assert np.max(np.abs(got - expected["weight"])) <= tolerance
    assert result.metrics["secagg-dropped"] == 1


def test_uniform_weighting_averages_without_weights_and_shares_no_metrics():
    trainer, _, arrays, result, _ = run_flower_round(3, extra_config={"secagg-weighting": "uniform"})
    codec = read_settings({}, 3).codec(3)
    mean_update = np.mean([trainer.updates[p] for p in range(3)], axis=0).reshape(-1)
    got = result.arrays["weight"].numpy().reshape(-1) - arrays["weight"].numpy().reshape(-1)
    assert np.max(np.abs(got - mean_update)) <= codec.tolerance + 4 * np.finfo(np.float32).eps * 4
    assert "train-loss" not in result.metrics


def test_flower_halts_when_too_few_clients_remain():
    with pytest.raises(RuntimeError, match="secure aggregation \\(SecAgg\\+\\) halted"):
        run_flower_round(3, drop={0: "share_keys", 1: "share_keys"})


# --------------------------------------------------------------------------------------
# the crypten backend (two real party processes, started once for this module)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crypten_parts():
    if importlib.util.find_spec("crypten") is None:
        pytest.skip("crypten is not installed (scripts/install.sh installs crypten==0.4.1)")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    parts = StrategyParts(name="fedavg", server=FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples"))
    wrapped = secagg(parts, StrategyConfig(5, 5, 2, 0, {"backend": "crypten", "parties": 2}))  # two rounds below
    protocol = wrapped.mechanism("secagg").round_protocol()
    protocol.start()
    yield wrapped
    protocol.close()


def run_crypten_round(
    wrapped: StrategyParts, num_clients: int, drop: dict[int, str] | None = None, server_round: int = 1
):
    trainer = FakeTrainer(num_clients, seed=server_round)
    mechanism = wrapped.mechanism("secagg")
    handler = next(iter(mechanism.client_handlers().values()))
    handler.train = trainer
    grid = InProcessGrid(dict.fromkeys(range(num_clients), handler), drop)
    arrays = global_arrays()
    config = ConfigRecord({"server-round": server_round, "local-epochs": 1})
    return trainer, grid, arrays, mechanism.round_protocol().run_round(grid, server_round, arrays, config, 120.0)


def _crypten_tolerance(codec: FixedPointCodec, trainer: FakeTrainer, expected: np.ndarray) -> float:
    """Fixed-point rounding + CrypTen's float32 plaintext of the weighted sum + float32 output."""
    largest_update = max(float(np.abs(u).max()) for u in trainer.updates.values())
    return codec.tolerance + 2.0**-23 * largest_update + 2 * np.finfo(np.float32).eps * float(np.abs(expected).max())


def test_crypten_secure_round_equals_fedavg_and_reveals_no_update(crypten_parts):
    trainer, grid, arrays, result = run_crypten_round(crypten_parts, 4)
    codec = read_settings({"backend": "crypten"}, 5).codec(5)
    expected = plain_fedavg(arrays, trainer, [0, 1, 2, 3])
    got = {k: v.numpy() for k, v in result.arrays.items()}
    assert np.max(np.abs(got["weight"] - expected["weight"])) <= _crypten_tolerance(codec, trainer, expected["weight"])
    assert float(got["count"]) == pytest.approx(float(expected["count"]), abs=1e-5)
    n = np.array([5, 8, 11, 14])
    loss = 1.0 + 0.25 * np.arange(4)
    assert result.metrics["train-loss"] == pytest.approx(float((n * loss).sum() / n.sum()), abs=1e-5)
    assert result.metrics["secagg-clients"] == 4 and result.metrics["secagg-party-bytes"] >= 4 * NUM_VALUES * 8
    assert assert_nothing_reveals_an_update(grid, trainer, arrays, codec) == 4


def test_crypten_leaves_out_a_client_that_fails(crypten_parts):
    trainer, grid, arrays, result = run_crypten_round(crypten_parts, 4, drop={1: "train"}, server_round=2)
    codec = read_settings({"backend": "crypten"}, 5).codec(5)
    expected = plain_fedavg(arrays, trainer, [0, 2, 3])
    got = result.arrays["weight"].numpy()
    assert np.max(np.abs(got - expected["weight"])) <= _crypten_tolerance(codec, trainer, expected["weight"])
    assert result.metrics["secagg-dropped"] == 1
    assert assert_nothing_reveals_an_update(grid, trainer, arrays, codec) == 3


# --------------------------------------------------------------------------------------
# real runs on Flower's Simulation Engine (Ray), one per backend
# --------------------------------------------------------------------------------------
SIM_CONFIG = dict(num_train=36, num_test=12, clients=3, per_round=2, rounds=1, batch_size=16, seed=5)


def _simulate(tmp_path, **changes):
    from pchmr.core.engine.config import RunConfig
    from pchmr.core.engine.run import execute

    return execute(RunConfig(**SIM_CONFIG, out=str(tmp_path / "run"), **changes))


def _check_secure_run(result) -> None:
    rounds = result.run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [0, 1]
    secure = rounds[1]
    assert secure["secagg_clients"] == 2 and secure["secagg_dropped"] == 0
    model_values = sum(t.numel() for t in torch.load(result.run_dir.model).values())
    assert secure["bytes_received"] >= 2 * 8 * model_values  # two masked/shared vectors of 8-byte words
    assert math.isfinite(secure["train_loss"]) and math.isfinite(secure["mpjpe_mm"])
    assert secure["mpjpe_mm"] != rounds[0]["mpjpe_mm"]  # the secure aggregate moved the model
    # the clients' training speed only as the protocol reveals it: their weighted average, no one's own
    assert secure["train_img_s"] > 0 and "client_img_s" not in secure


@pytest.mark.slow
def test_simulation_run_with_strategy_secagg_flower(tmp_path, pchmr_cache):
    result = _simulate(tmp_path, strategy="secagg")
    _check_secure_run(result)
    (described,) = result.run_dir.read_config()["strategy"]["mechanisms"]
    assert described["name"] == "secagg" and described["backend"] == "flower"


@pytest.mark.slow
def test_simulation_run_with_fedprox_under_crypten(tmp_path, pchmr_cache):
    if importlib.util.find_spec("crypten") is None:
        pytest.skip("crypten is not installed")
    result = _simulate(tmp_path, strategy="fedprox", privacy="secagg", privacy_options={"backend": "crypten"})
    _check_secure_run(result)
    described = result.run_dir.read_config()["strategy"]
    assert [m["name"] for m in described["mechanisms"]] == ["fedprox", "secagg"]
    assert described["mechanisms"][1]["backend"] == "crypten" and described["proximal-mu"] == 0.01
