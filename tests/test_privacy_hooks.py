"""The mechanism hooks privacy plugins use, in one real Simulation-Engine run.

A test-only privacy plugin (written to a temporary distribution that Ray's workers import
through PYTHONPATH) appends two mechanisms to FedAvg, which between them use every hook:

* a round protocol with two client stages: ``ping`` (each client answers its partition id, no
  training) and ``train`` (the client handler calls :func:`train_locally`), averaged unweighted;
* an update transform that replaces each client's trained state by ``global + 1e-3`` (float
  tensors), so the aggregate is known exactly: the round's global model + 1e-3;
* two client mods that log ``message id, type, stage, in/out`` to a file: the order must be
  A-in, B-in, B-out, A-out for every message, query messages included;
* ``before_round`` that stops the run before round 2, ``round_metrics`` and ``state_dict``;
* a second mechanism whose ``loss`` and ``training_step`` record the :class:`RoundContext` they
  receive in the clients (and change nothing).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections import defaultdict

import pytest
import torch

from pchmr.core.contracts.strategy import PrivacyBudgetExhausted, StrategyParts
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.federation.client import _chain
from pchmr.core.engine.federation.common import sample_clients
from pchmr.core.engine.federation.mechanisms import STATES_KEY, MechanismRuntime
from pchmr.core.engine.registry import get_registry
from pchmr.core.engine.run import execute
from pchmr.core.kit.federation import failure_message, ordered_replies

CONFIG = dict(num_train=48, num_test=16, clients=4, per_round=2, rounds=3, batch_size=16, seed=3)
SHIFT = 1e-3
STOP_MESSAGE = "hooktest: budget spent before round 2"

PLUGIN = textwrap.dedent(
    '''
    """Test-only privacy plugin exercising every mechanism hook."""
    from pathlib import Path

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import MessageType

    from pchmr.core.kit.federation import message_stage, ordered_replies, state_nbytes
    from pchmr.core.engine.federation.client import train_locally
    from pchmr.api import STAGE_KEY, Mechanism, PrivacyBudgetExhausted, RoundResult, hookimpl

    SHIFT = %(shift)r
    STOP_MESSAGE = %(stop)r


    def _logging_mod(label, log_file):
        def mod(msg, context, call_next):
            line = f"{msg.metadata.message_id} {msg.metadata.message_type} {message_stage(msg)}"
            with open(log_file, "a") as fh:
                fh.write(f"{line} {label}-in\\n")
            reply = call_next(msg, context)
            with open(log_file, "a") as fh:
                fh.write(f"{line} {label}-out\\n")
            return reply
        return mod


    def shift_transform(new_state, global_state, info):
        return {k: (g + SHIFT if g.is_floating_point() else new_state[k]) for k, g in global_state.items()}


    def ping(msg, context, runtime):
        pid = float(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"pid": pid})}), reply_to=msg)


    def train(msg, context, runtime):
        state, metrics = train_locally(runtime, msg, context)
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


    class Protocol:
        def __init__(self, log_dir):
            self.log_dir = Path(log_dir)

        def _send(self, grid, stage, server_round, content, timeout):
            messages = [
                Message(content(), dst_node_id=node, message_type=MessageType.TRAIN) for node in grid.get_node_ids()
            ]
            return ordered_replies(grid.send_and_receive(messages, timeout=timeout), grid, server_round, stage)

        def run_round(self, grid, server_round, arrays, train_config, timeout):
            torch.save(arrays.to_torch_state_dict(), self.log_dir / f"global-{server_round}.pt")
            pongs = self._send(grid, "ping", server_round, lambda: RecordDict({"config": ConfigRecord({STAGE_KEY: "ping"})}), timeout)
            config = ConfigRecord({**dict(train_config), STAGE_KEY: "train"})
            replies = self._send(grid, "train", server_round, lambda: RecordDict({"arrays": arrays, "config": config}), timeout)
            states = [r.content["arrays"].to_torch_state_dict() for r in replies]
            mean = {}
            for key, first in states[0].items():
                if first.is_floating_point():
                    mean[key] = (sum(s[key].double() for s in states) / len(states)).to(first.dtype)
                else:
                    mean[key] = first
            model = state_nbytes(arrays.to_torch_state_dict())
            metrics = {
                "pid-sum": float(sum(r.content["metrics"]["pid"] for r in pongs)),
                "pid-order": float(int("".join(str(int(r.content["metrics"]["partition-id"])) for r in replies))),
                "replies": float(len(replies)),
            }
            return RoundResult(ArrayRecord(mean), metrics, model * len(states), sum(state_nbytes(s) for s in states))


    class Hooktest(Mechanism):
        name = "hooktest"

        def __init__(self, log_dir):
            self.log_dir = log_dir
            self.protocol = Protocol(log_dir)
            self.rounds = 0

        def describe(self):
            return {"privacy": "hooktest"}

        def before_round(self, server_round):
            if server_round >= 2:
                raise PrivacyBudgetExhausted(STOP_MESSAGE)
            self.rounds += 1

        def round_metrics(self, server_round):
            return {"hook-round": 10.0 * server_round}

        def state_dict(self):
            return {"rounds-seen": self.rounds}

        def load_state_dict(self, state):
            self.rounds = int(state["rounds-seen"])

        def round_protocol(self):
            return self.protocol

        def client_handlers(self):
            return {"ping": ping, "train": train}

        def client_mods(self):
            return (_logging_mod("A", f"{self.log_dir}/mods.log"), _logging_mod("B", f"{self.log_dir}/mods.log"))

        def transform_update(self, new_state, global_state, info):
            return shift_transform(new_state, global_state, info)


    class ContextRecorder(Mechanism):
        """Saves the first RoundContext each (round, partition) hands ``loss``; logs ``training_step``'s."""

        name = "context-recorder"

        def __init__(self, log_dir):
            self.log_dir = Path(log_dir)
            self.saved = set()

        def loss(self, module, batch, output, context):
            key = (context.server_round, context.partition_id)
            if key not in self.saved:
                self.saved.add(key)
                record = {
                    "server_round": context.server_round,
                    "partition_id": context.partition_id,
                    "local_epochs": context.local_epochs,
                    "lr": context.lr,
                    "config": dict(context.config),
                    "global_state": dict(context.global_state),
                    "training_epoch": module.training_epoch,
                }
                torch.save(record, self.log_dir / f"context-{key[0]}-{key[1]}.pt")
            return None

        def training_step(self, module, batch, batch_idx, context):
            with open(self.log_dir / "steps.log", "a") as fh:
                fh.write(f"{context.server_round} {context.partition_id}\\n")
            return None


    def hooktest(parts, config):
        log_dir = config.options["log-dir"]
        return parts.with_mechanism(Hooktest(log_dir)).with_mechanism(
            ContextRecorder(log_dir), name=f"hooktest({parts.name})"
        )


    @hookimpl
    def pchmr_privacy():
        return {"hooktest": hooktest}
    '''
) % {"shift": SHIFT, "stop": STOP_MESSAGE}


@pytest.fixture(scope="module")
def hooktest_plugin(tmp_path_factory):
    """A distribution with a ``pchmr`` entry point, importable here and in Ray's workers."""
    root = tmp_path_factory.mktemp("dist")
    (root / "pchmr_hooktest_plugin.py").write_text(PLUGIN)
    info = root / "pchmr_hooktest-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pchmr-hooktest\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pchmr]\nhooktest = pchmr_hooktest_plugin\n")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    existing = os.environ.get("PYTHONPATH")
    mp.setenv("PYTHONPATH", str(root) + (os.pathsep + existing if existing else ""))
    get_registry(reload=True)
    yield root
    mp.undo()
    get_registry(reload=True)


@pytest.fixture(scope="module")
def stopped_run(hooktest_plugin, tmp_path_factory, pchmr_cache):
    log_dir = tmp_path_factory.mktemp("hooklog")
    out = tmp_path_factory.mktemp("run") / "r"
    config = RunConfig(**CONFIG, privacy="hooktest", privacy_options={"log-dir": str(log_dir)}, out=str(out))
    return execute(config), log_dir


def test_protocol_round_reaches_client_handlers_and_transforms(stopped_run):
    result, log_dir = stopped_run
    rounds = result.run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [0, 1]
    sampled = sample_clients(CONFIG["seed"], 1, CONFIG["clients"], CONFIG["per_round"])
    first = rounds[1]
    assert first["clients"] == sampled
    assert first["pid_sum"] == sum(sampled), "the ping stage must reach exactly the sampled clients"
    assert first["pid_order"] == int("".join(map(str, sampled))), "replies must be sorted by partition id"
    assert first["replies"] == 2
    assert first["hook_round"] == 10.0, "round_metrics must be merged into the round's record"
    global_1 = torch.load(log_dir / "global-1.pt")
    model = torch.load(result.run_dir.model)
    assert model.keys() == global_1.keys()
    floats = [key for key, value in global_1.items() if value.is_floating_point()]
    assert len(floats) > 10
    for key in floats:  # integer buffers (BatchNorm's step counts) are the trained clients' own
        expected = global_1[key] + SHIFT
        torch.testing.assert_close(
            model[key], expected, rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: not global + {SHIFT}: {m}"
        )
    model_bytes = sum(t.numel() * t.element_size() for t in model.values())
    assert first["bytes_sent"] == first["bytes_received"] == 2 * model_bytes


def test_budget_stop_is_clean_and_state_is_checkpointed(stopped_run):
    result, _ = stopped_run
    assert result.final["stopped"] == STOP_MESSAGE
    assert result.final["round"] == 1
    ckpt = result.run_dir.load_checkpoint()
    assert ckpt["round"] == 1 and ckpt[STATES_KEY] == {"hooktest": {"rounds-seen": 1}, "context-recorder": {}}
    config = json.loads(result.run_dir.config.read_text())
    assert config["run"]["privacy"] == "hooktest"
    described = config["strategy"]["mechanisms"]
    assert described == [{"name": "hooktest", "privacy": "hooktest"}, {"name": "context-recorder"}]


def test_loss_and_training_step_receive_the_round_context(stopped_run):
    _, log_dir = stopped_run
    sampled = sample_clients(CONFIG["seed"], 1, CONFIG["clients"], CONFIG["per_round"])
    global_1 = torch.load(log_dir / "global-1.pt")
    for pid in sampled:
        record = torch.load(log_dir / f"context-1-{pid}.pt")
        assert (record["server_round"], record["partition_id"]) == (1, pid)
        assert record["local_epochs"] == RunConfig().local_epochs == record["config"]["local-epochs"]
        assert record["lr"] == RunConfig().lr == record["config"]["lr"]  # the cosine schedule starts at --lr
        assert record["config"]["server-round"] == 1 and record["training_epoch"] == 0
        assert record["global_state"].keys() == global_1.keys()
        assert all(torch.equal(record["global_state"][k], global_1[k]) for k in global_1), "the round's global model"
    assert sorted(p.name for p in log_dir.glob("context-*.pt")) == [f"context-1-{p}.pt" for p in sampled]
    steps = [tuple(map(int, line.split())) for line in (log_dir / "steps.log").read_text().splitlines()]
    assert sorted(set(steps)) == [(1, p) for p in sampled] and len(steps) > len(sampled)


def test_client_mods_wrap_every_message_in_order(stopped_run):
    _, log_dir = stopped_run
    by_message: dict[str, list[str]] = defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    for line in (log_dir / "mods.log").read_text().splitlines():
        message_id, message_type, stage, event = line.split()
        by_message[message_id].append(event)
        kinds[message_id] = (message_type, stage)
    assert all(events == ["A-in", "B-in", "B-out", "A-out"] for events in by_message.values()), by_message
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for kind in kinds.values():
        counts[kind] += 1
    assert dict(counts) == {("query", "None"): 4, ("train", "ping"): 2, ("train", "train"): 2}


# -- the helpers, without a simulation -------------------------------------------------------
class _Reply:
    def __init__(self, node: int, error: str | None = None) -> None:
        self.metadata = type("M", (), {"src_node_id": node})()
        self.error = type("E", (), {"reason": error})()
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None


class _Grid:
    def partition_id(self, node: int) -> int:
        return {10: 2, 11: 0, 12: 1}[node]


def test_ordered_replies_sorts_by_partition_and_reports_failures():
    replies = [_Reply(10), _Reply(11), _Reply(12)]
    assert [r.metadata.src_node_id for r in ordered_replies(replies, _Grid(), 1)] == [11, 12, 10]
    broken = [_Reply(10), _Reply(11, "out of memory")]
    with pytest.raises(RuntimeError, match=r"round 4: 1 of 2 clients failed \(mask\): partition 0: out of memory"):
        ordered_replies(broken, _Grid(), 4, stage="mask")
    assert [r.metadata.src_node_id for r in ordered_replies(broken, _Grid(), 4, allow_failures=True)] == [10]
    assert failure_message(2, broken[1:], 5) == "round 2: 1 of 5 clients failed (train): node 11: out of memory"
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() File \"x.py\", line 1\n"
           "FloatingPointError: nan\nflwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
           "Message: training loss became nan at batch 0'>")  # fmt: skip
    assert (
        failure_message(3, [_Reply(12, ray)], 2)
        == "round 3: 1 of 2 clients failed (train): node 12: training loss became nan at batch 0"
    )


def test_mod_chain_runs_the_first_mod_outermost():
    trace: list[str] = []

    def mod(label):
        def run(msg, ctx, call_next):
            trace.append(f"{label}>")
            out = call_next(msg, ctx)
            trace.append(f"<{label}")
            return out + label

        return run

    handler = _chain([mod("a"), mod("b")], lambda msg, ctx: trace.append("h") or "")
    assert handler(None, None) == "ba"
    assert trace == ["a>", "b>", "h", "<b", "<a"]


def test_defaults_keep_plain_training():
    runtime = MechanismRuntime(StrategyParts(name="x", server=None))
    assert runtime.mechanisms == () and runtime.round_protocol is None and runtime.protocol_owner is None
    assert not runtime.client_mods and not runtime.client_handlers
    assert runtime.train_config() == {} and runtime.round_metrics(1) == {} and runtime.state_dict() == {}
    assert PrivacyBudgetExhausted("spent").message == "spent"
