"""Mechanisms: composition by appending, the runtime's loops over them (list order, refusals by
name), the round context handed to ``loss``/``training_step``, and checkpoints of both layouts."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from pchmr.core.contracts.backbone import BackboneOptions
from pchmr.core.contracts.mechanism import Mechanism, RoundContext
from pchmr.core.contracts.strategy import IncompatibleError, StrategyConfig, StrategyParts, UpdateInfo
from pchmr.core.engine.federation.client import _chain
from pchmr.core.engine.federation.mechanisms import (
    LEGACY_STATE_KEY,
    STATES_KEY,
    MechanismRuntime,
    legacy_states,
)
from pchmr.core.engine.module import HMRModule
from pchmr.plugins.backbones.fastmetro import make_fastmetro
from pchmr.plugins.privacy.dp import dp
from pchmr.plugins.strategies.fedavg import fedavg
from pchmr.plugins.strategies.fedopt import fedopt
from pchmr.testing.strategies import contract_arrays, contract_delta, run_round
from pchmr.testing.toys import ToyBodyModel, toy_batch

CONFIG = StrategyConfig(num_clients=6, per_round=3, num_rounds=4, seed=0)


class Recorder(Mechanism):
    """A third party's mechanism: logs every hook call as ``"<name>.<hook>"`` into a shared list."""

    def __init__(self, name: str, log: list[str], shift: float = 0.0) -> None:
        self.name = name
        self.log = log
        self.shift = shift
        self.rounds = 0

    def prepare_module(self, module: Any) -> None:
        self.log.append(f"{self.name}.prepare_module")

    def before_round(self, server_round: int) -> None:
        self.log.append(f"{self.name}.before_round")
        self.rounds = server_round

    def train_config(self) -> Mapping[str, Any]:
        return {f"{self.name}-key": self.name}

    def round_metrics(self, server_round: int) -> Mapping[str, float]:
        self.log.append(f"{self.name}.round_metrics")
        return {f"{self.name}-rounds": float(self.rounds)}

    def state_dict(self) -> Mapping[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = int(state["rounds"])

    def client_mods(self) -> tuple[Any, ...]:
        def mod(msg: Any, context: Any, call_next: Any) -> Any:
            self.log.append(f"{self.name}.mod-in")
            reply = call_next(msg, context)
            self.log.append(f"{self.name}.mod-out")
            return reply

        return (mod,)

    def transform_update(self, new_state: dict, global_state: dict, info: UpdateInfo) -> dict:
        self.log.append(f"{self.name}.transform_update")
        return {key: value * 2 + self.shift for key, value in new_state.items()}


def wrapper(name: str, log: list[str], shift: float = 0.0) -> Any:
    """A privacy factory ``(parts, config) -> parts`` appending one :class:`Recorder`."""

    def wrap(parts: StrategyParts, config: StrategyConfig) -> StrategyParts:
        return parts.with_mechanism(Recorder(name, log, shift), name=f"{name}({parts.name})")

    return wrap


def _serialise(state: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- composition and order ---------------------------------------------------------------------
def test_mechanisms_appended_by_two_wrappers_compose_without_knowing_each_others_fields() -> None:
    log: list[str] = []
    inner = fedopt(CONFIG)
    parts = wrapper("b", log)(wrapper("a", log)(inner, CONFIG), CONFIG)
    assert parts.name == "b(a(fedopt))" and parts.server is inner.server
    assert [m.name for m in parts.mechanisms] == ["fedopt", "a", "b"]
    assert [m.name for m in inner.mechanisms] == ["fedopt"], "appending leaves the wrapped parts unchanged"
    runtime = MechanismRuntime(parts)
    assert runtime.train_config() == {"a-key": "a", "b-key": "b"}
    runtime.before_round(3)
    assert runtime.round_metrics(3) == {"a-rounds": 3.0, "b-rounds": 3.0}
    states = runtime.state_dict()
    assert set(states) == {"fedopt", "a", "b"} and states["a"] == {"rounds": 3}
    assert states["fedopt"] == {"server-opt": "adam", "m_t": {}, "v_t": {}}
    fresh = wrapper("b", [])(wrapper("a", [])(fedopt(CONFIG), CONFIG), CONFIG)
    MechanismRuntime(fresh).load_state_dict(_serialise(states))
    assert [m.state_dict() for m in fresh.mechanisms[1:]] == [{"rounds": 3}, {"rounds": 3}]
    described = parts.description()
    assert [m["name"] for m in described["mechanisms"]] == ["fedopt", "a", "b"]
    assert described["server"] == "flwr.serverapp.strategy.FedAdam"


def test_round_metrics_may_map_names_to_numbers() -> None:
    class PerLayer(Mechanism):
        name = "per-layer"

        def round_metrics(self, server_round: int) -> Mapping[str, Any]:
            return {"count": 2, "top-layers": {"head.weight": np.float64(0.5), "head.bias": 1}}

    runtime = MechanismRuntime(fedavg(CONFIG).with_mechanism(PerLayer()))
    metrics = runtime.round_metrics(1)
    assert metrics == {"count": 2.0, "top-layers": {"head.weight": 0.5, "head.bias": 1.0}}
    assert type(metrics["count"]) is float and all(type(v) is float for v in metrics["top-layers"].values())


def test_every_hook_runs_in_list_order() -> None:
    log: list[str] = []
    parts = wrapper("b", log, shift=1.0)(wrapper("a", log)(fedavg(CONFIG), CONFIG), CONFIG)
    runtime = MechanismRuntime(parts)
    runtime.prepare_module(None)
    runtime.before_round(1)
    runtime.round_metrics(1)
    info = UpdateInfo(server_round=1, partition_id=0, num_examples=4, num_clients=6, per_round=3, config={})
    out = runtime.transform_update({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])}, info)
    assert out["w"].item() == (1.0 * 2) * 2 + 1.0, "a's transform, then b's on a's result"
    reply = _chain(runtime.client_mods, lambda msg, ctx: log.append("handler") or "reply")(None, None)
    assert reply == "reply"
    hooks = ["prepare_module", "before_round", "round_metrics", "transform_update"]
    assert log == [f"{n}.{hook}" for hook in hooks for n in "ab"] + [
        "a.mod-in",
        "b.mod-in",
        "handler",
        "b.mod-out",
        "a.mod-out",
    ]


# -- refusals, by name --------------------------------------------------------------------------
class Protocol(Mechanism):
    def __init__(self, name: str, stage: str = "run") -> None:
        self.name = name
        self.stage = stage

    def round_protocol(self) -> Any:
        return self  # anything with run_round

    def run_round(self, *args: Any) -> Any:
        raise NotImplementedError

    def client_handlers(self) -> Mapping[str, Any]:
        return {self.stage: lambda msg, context, runtime: msg}


class Keys(Mechanism):
    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key

    def train_config(self) -> Mapping[str, Any]:
        return {self.key: 1}

    def round_metrics(self, server_round: int) -> Mapping[str, float]:
        return {self.key: 1.0}


def test_two_round_protocols_are_refused_with_both_names() -> None:
    parts = StrategyParts(name="x", server=None, mechanisms=(Protocol("first", "one"), Protocol("second", "two")))
    with pytest.raises(IncompatibleError, match="mechanisms 'first' and 'second' both run a round protocol"):
        MechanismRuntime(parts)


def test_a_client_stage_handled_twice_is_refused_with_both_names() -> None:
    class Handler(Mechanism):
        name = "helper"

        def client_handlers(self) -> Mapping[str, Any]:
            return {"run": lambda msg, context, runtime: msg}

    parts = StrategyParts(name="x", server=None, mechanisms=(Protocol("secure"), Handler()))
    with pytest.raises(IncompatibleError, match="mechanisms 'secure' and 'helper' both handle the client stage 'run'"):
        MechanismRuntime(parts)


def test_a_train_config_or_metric_key_from_two_mechanisms_is_refused_with_both_names() -> None:
    parts = StrategyParts(name="x", server=None, mechanisms=(Keys("left", "epsilon"), Keys("right", "epsilon")))
    with pytest.raises(IncompatibleError, match="'left' and 'right' both set the train-config key 'epsilon'"):
        MechanismRuntime(parts)

    class MetricsOnly(Keys):
        def train_config(self) -> Mapping[str, Any]:
            return {}

    runtime = MechanismRuntime(
        StrategyParts(
            name="x", server=None, mechanisms=(MetricsOnly("left", "epsilon"), MetricsOnly("right", "epsilon"))
        )
    )
    with pytest.raises(IncompatibleError, match="'left' and 'right' both set the round-metrics key 'epsilon'"):
        runtime.round_metrics(1)


def test_parts_refuse_two_mechanisms_of_one_name_and_non_mechanisms() -> None:
    parts = StrategyParts(name="x", server=None, mechanisms=(Keys("dp", "a"),))
    with pytest.raises(ValueError, match="strategy 'x' has two mechanisms named 'dp'.*must be unique"):
        parts.with_mechanism(Keys("dp", "b"))
    with pytest.raises(TypeError, match="is not a Mechanism; subclass pchmr.api.Mechanism"):
        StrategyParts(name="x", server=None, mechanisms=(lambda: None,))  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="strategy 'x' has no mechanism named 'secagg'; it has: dp"):
        parts.mechanism("secagg")
    assert Recorder("r", []).name == "r" and Keys.name == "Keys" and Mechanism().name == "Mechanism"


def test_the_default_hooks_keep_plain_training() -> None:
    plain = Mechanism()
    assert plain.describe() == {} and plain.train_config() == {} and plain.round_metrics(1) == {}
    assert plain.round_protocol() is None and not plain.client_mods() and not plain.client_handlers()
    assert plain.state_dict() == {}
    plain.load_state_dict({})
    with pytest.raises(ValueError, match="state of mechanism 'Mechanism' \\(\\['x'\\]\\), which keeps none"):
        plain.load_state_dict({"x": 1})
    state = {"w": torch.ones(2)}
    info = UpdateInfo(server_round=1, partition_id=0, num_examples=1, num_clients=2, per_round=1, config={})
    assert plain.transform_update(state, state, info) is state


# -- the round context in the training loop ---------------------------------------------------
class LossLog(Mechanism):
    """Adds ``value`` to the loss (None: nothing) and records what each hook received."""

    def __init__(self, name: str, value: float | None, step: bool = False) -> None:
        self.name = name
        self.value = value
        self.step = step
        self.seen: list[tuple[str, RoundContext]] = []

    def loss(self, module: Any, batch: Any, output: Any, context: RoundContext) -> torch.Tensor | None:
        self.seen.append(("loss", context))
        return None if self.value is None else torch.tensor(self.value)

    def training_step(self, module: Any, batch: Any, batch_idx: int, context: RoundContext) -> torch.Tensor | None:
        self.seen.append(("training_step", context))
        return torch.tensor(-1.0) if self.step else None


@pytest.fixture(scope="module")
def body() -> ToyBodyModel:
    return ToyBodyModel()


def _module(body: ToyBodyModel, mechanisms: tuple[Mechanism, ...]) -> HMRModule:
    torch.manual_seed(0)
    backbone = make_fastmetro(body, BackboneOptions(variant="S", input_size=64))
    backbone.eval()
    return HMRModule(backbone, body, mechanisms=mechanisms)


def test_loss_terms_add_in_list_order_with_the_round_context(body: ToyBodyModel) -> None:
    first, silent, second = LossLog("first", 1.0), LossLog("silent", None), LossLog("second", 2.0)
    module = _module(body, (first, silent, second))
    batch = toy_batch(body, 2, 64, torch.Generator().manual_seed(1))
    plain = _module(body, ())
    with torch.no_grad():
        expected = plain.compute_losses(batch, plain(batch["image"]))["loss"]
        global_state = {k: v.clone() for k, v in module.state_dict().items()}
        context = RoundContext(4, 2, 3, 5e-4, {"server-round": 4}, global_state)
        with module.round(context):
            assert module.round_context is context and module.training_epoch == 9  # (4 - 1) * 3 + 0
            loss = module.compute_losses(batch, module(batch["image"]))["loss"]
    assert loss.item() == pytest.approx(((expected + 1.0) + 2.0).item(), rel=1e-6)
    assert [m.seen for m in (first, silent, second)] == [[("loss", context)]] * 3
    assert module.round_context is None and module.training_epoch == 0
    with pytest.raises(RuntimeError, match=r"mechanisms \(first, silent, second\) need a round for their loss hooks"):
        module.compute_losses(batch, module(batch["image"]))


def test_the_first_training_step_returned_wins_and_later_mechanisms_are_not_asked(body: ToyBodyModel) -> None:
    default, replacing, later = LossLog("default", None), LossLog("dp-sgd", None, step=True), LossLog("later", None)
    module = _module(body, (default, replacing, later))
    batch = toy_batch(body, 2, 64, torch.Generator().manual_seed(1))
    context = RoundContext(1, 0, 1, 1e-3, {}, {})
    with module.round(context):
        assert module.training_step(batch, 0).item() == -1.0
        with pytest.raises(RuntimeError, match="rounds do not nest"), module.round(context):
            pass
    assert default.seen == [("training_step", context)] and replacing.seen == [("training_step", context)]
    assert later.seen == []


# -- checkpoints: today's layout and the one before mechanisms --------------------------------
def _dp_fedopt() -> StrategyParts:
    return dp(fedopt(CONFIG), StrategyConfig(6, 3, 4, 0, {"placement": "client", "noise-multiplier": 1.1}))


def test_a_checkpoint_of_the_layout_before_mechanisms_resumes_every_state() -> None:
    # Prepare: round 1 of dp(fedopt); its state as the old layout saved it, dp's around fedopt's
    updates = [(contract_delta(50 + k, aligned=False), 1.0) for k in range(3)]
    running = _dp_fedopt()
    running.mechanism("dp").before_round(1)
    after_one, _ = run_round(running, 1, contract_arrays(), updates)
    fedopt_state, dp_state = running.mechanism("fedopt").state_dict(), running.mechanism("dp").state_dict()
    old = {"round": 1, LEGACY_STATE_KEY: _serialise({"inner": fedopt_state, **dp_state})}
    # Execute
    resumed = _dp_fedopt()
    MechanismRuntime(resumed).restore(old)
    # Assert: the same ε, the same moments, the same next aggregate
    assert resumed.mechanism("dp").round_metrics(1) == running.mechanism("dp").round_metrics(1)
    assert resumed.mechanism("dp").round_metrics(1)["epsilon"] > 0
    for key in ("m_t", "v_t"):
        restored = resumed.mechanism("fedopt").state_dict()[key]
        assert restored.keys() == fedopt_state[key].keys() and restored
        assert all(torch.equal(restored[k], fedopt_state[key][k]) for k in restored)
    second = [(contract_delta(60 + k, aligned=False), 1.0) for k in range(3)]
    uninterrupted, _ = run_round(running, 2, after_one, second)
    restored_round, _ = run_round(resumed, 2, after_one, second)
    for key in uninterrupted:
        np.testing.assert_array_equal(restored_round[key], uninterrupted[key], err_msg=key)


def test_old_layouts_split_onto_the_stateful_mechanisms_and_extra_state_is_refused() -> None:
    opt = fedopt(CONFIG)
    state = {"server-opt": "adam", "m_t": {}, "v_t": {}}
    assert legacy_states(state, opt.mechanisms, opt.name) == {"fedopt": state}
    wrapped = dp(fedavg(CONFIG), CONFIG)  # dp(fedavg) saved {"inner": None, "accountant": ...}
    accountant = wrapped.mechanism("dp").state_dict()["accountant"]
    assert legacy_states({"inner": None, "accountant": accountant}, wrapped.mechanisms, wrapped.name) == {
        "dp": {"accountant": accountant}
    }
    plain = fedavg(CONFIG)
    with pytest.raises(ValueError, match="holds more state than strategy 'fedavg''s stateful mechanisms \\(none\\)"):
        MechanismRuntime(plain).restore({LEGACY_STATE_KEY: {"x": 1}})
    MechanismRuntime(plain).restore({LEGACY_STATE_KEY: None})  # the old layout of a stateless strategy


def test_a_checkpoint_naming_a_mechanism_the_run_lacks_is_refused() -> None:
    runtime = MechanismRuntime(fedopt(CONFIG))
    with pytest.raises(ValueError, match=r"state of mechanism\(s\) \['dp'\], which strategy 'fedopt' does not have"):
        runtime.restore({STATES_KEY: {"dp": {"accountant": {}}, "fedopt": runtime.state_dict()["fedopt"]}})
    with pytest.raises(ValueError, match="mechanism 'dp' cannot restore the checkpoint's state: KeyError"):
        MechanismRuntime(_dp_fedopt()).restore({STATES_KEY: {"dp": {}}})
