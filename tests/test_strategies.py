"""Built-in aggregation strategies: the contract suite, FedProx's proximal term, FedOpt's server step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pchmr.core.contracts.mechanism import RoundContext
from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.plugins.strategies.fedavg import fedavg
from pchmr.plugins.strategies.fedgh import fedgh
from pchmr.plugins.strategies.fedopt import ServerOptimizerState, fedopt
from pchmr.plugins.strategies.fedprox import (
    DEFAULT_PROXIMAL_MU,
    ProximalTerm,
    fedprox,
    proximal_penalty,
)
from pchmr.testing.strategies import (
    StrategyContract,
    check_simulation_rounds,
    contract_arrays,
    contract_delta,
    run_in_flower_simulation,
    run_round,
)


def make(factory: Any, **options: Any) -> StrategyParts:
    return factory(StrategyConfig(num_clients=4, per_round=2, num_rounds=2, seed=0, options=options))


# --------------------------------------------------------------------------------------
# the contract suite, once per built-in strategy (the Flower simulation runs once, below)
# --------------------------------------------------------------------------------------
class BuiltinContract(StrategyContract):
    @pytest.fixture
    def flower_simulation(self) -> bool:
        return False


class TestFedAvgContract(BuiltinContract):
    @pytest.fixture
    def strategy_factory(self) -> Any:
        return fedavg


class TestFedProxContract(BuiltinContract):
    @pytest.fixture
    def strategy_factory(self) -> Any:
        return fedprox


class TestFedOptContract(BuiltinContract):
    @pytest.fixture
    def strategy_factory(self) -> Any:
        return fedopt

    @pytest.fixture(params=["adam", "yogi", "adagrad"])
    def strategy_options(self, request: pytest.FixtureRequest) -> Mapping[str, Any]:
        return {"server-opt": request.param}

    @pytest.fixture
    def averages_updates(self) -> bool:
        return False


class TestFedGHContract(BuiltinContract):
    @pytest.fixture
    def strategy_factory(self) -> Any:
        return fedgh

    @pytest.fixture(
        params=[{}, {"granularity": "layer"}, {"weighting": "uniform"}, {"server-opt": "yogi"}],
        ids=["default", "layer", "uniform", "yogi"],
    )
    def strategy_options(self, request: pytest.FixtureRequest) -> Mapping[str, Any]:
        return request.param

    @pytest.fixture
    def weights_by_examples(self, strategy_options: Mapping[str, Any]) -> bool:
        return strategy_options.get("weighting", "examples") == "examples"

    @pytest.fixture
    def averages_updates(self, strategy_options: Mapping[str, Any]) -> bool:
        return strategy_options.get("server-opt", "none") == "none"


BUILTIN_SIMULATED = {
    "fedavg": (fedavg, {}, True),
    "fedprox": (fedprox, {}, True),
    "fedopt-adam": (fedopt, {"server-opt": "adam"}, False),
    "fedopt-yogi": (fedopt, {"server-opt": "yogi"}, False),
    "fedopt-adagrad": (fedopt, {"server-opt": "adagrad"}, False),
    "fedgh": (fedgh, {}, True),
    "fedgh-adam": (fedgh, {"server-opt": "adam"}, False),
}


def test_builtin_strategies_run_in_one_flower_simulation() -> None:
    factories = {
        name: (lambda f=factory, o=options: make(f, **o)) for name, (factory, options, _) in BUILTIN_SIMULATED.items()
    }
    results = run_in_flower_simulation(factories)
    for name, (_, _, averages) in BUILTIN_SIMULATED.items():
        check_simulation_rounds(name, results[name], averages)
    # FedAvg by hand: client p adds 0.1 (p + 1) with 10 (p + 1) examples → + 0.1 · 14/6 per round
    fedavg_rounds = results["fedavg"]
    for rnd in fedavg_rounds:
        expected = rnd.global_arrays["encoder.bias"].astype(np.float64) + 0.1 * (1 * 1 + 2 * 2 + 3 * 3) / 6
        np.testing.assert_allclose(rnd.aggregate["encoder.bias"], expected, rtol=1e-6)
    # the runtime's client deltas all point the same way: FedGH finds no conflict and equals FedAvg
    for gh, avg in zip(results["fedgh"], fedavg_rounds):
        assert gh.metrics["fedgh-conflict-fraction"] == 0.0
        np.testing.assert_allclose(gh.aggregate["encoder.weight"], avg.aggregate["encoder.weight"], rtol=1e-6)


def test_builtin_strategies_register_through_entry_points() -> None:
    from pchmr.core.engine.registry import get_registry

    registry = get_registry()
    for name, factory in {"fedavg": fedavg, "fedprox": fedprox, "fedopt": fedopt, "fedgh": fedgh}.items():
        assert registry.get("strategy", name) is factory


# --------------------------------------------------------------------------------------
# fedprox
# --------------------------------------------------------------------------------------
class TinyModule(nn.Module):
    """A stand-in for HMRModule: one trainable vector and one frozen one."""

    def __init__(self, weight: list[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.tensor([5.0], dtype=torch.float64), requires_grad=False)


def round_context(mu: float | None, global_weight: list[float]) -> RoundContext:
    """Round 1 of partition 0 starting from ``global_weight``; ``mu`` None leaves proximal-mu out."""
    config = {"server-round": 1, "local-epochs": 1} | ({} if mu is None else {"proximal-mu": mu})
    global_state = {"weight": torch.tensor(global_weight, dtype=torch.float64), "frozen": torch.tensor([0.0])}
    return RoundContext(1, 0, 1, 0.1, config, global_state)


def sgd_step(module: TinyModule, data_loss: Any, lr: float, context: RoundContext | None) -> torch.Tensor:
    module.zero_grad()
    loss = data_loss(module.weight)
    if context is not None:
        loss = loss + ProximalTerm().loss(module, {}, None, context)
    loss.backward()
    with torch.no_grad():
        module.weight -= lr * module.weight.grad
    return module.weight.detach().clone()


def test_proximal_term_at_mu_zero_is_exactly_zero_and_changes_no_step() -> None:
    def data_loss(w: torch.Tensor) -> torch.Tensor:
        return (w**2).sum() + w[0]

    context = round_context(0.0, [0.0, 4.0])
    plain, proximal = TinyModule([1.0, 2.0]), TinyModule([1.0, 2.0])
    assert ProximalTerm().loss(proximal, {}, None, context).item() == 0.0
    torch.testing.assert_close(
        sgd_step(proximal, data_loss, 0.1, context), sgd_step(plain, data_loss, 0.1, None), rtol=0, atol=0
    )


def test_proximal_term_pulls_toward_the_global_weights_by_the_hand_computed_step() -> None:
    # Prepare: w = (1, 2), w_global = (0, 4), mu = 0.5, no data loss
    module, context = TinyModule([1.0, 2.0]), round_context(0.5, [0.0, 4.0])
    # term = mu/2 (1² + 2²) = 1.25 (the frozen parameter, 5 away from its global value, is not counted)
    assert ProximalTerm().loss(module, {}, None, context).item() == pytest.approx(1.25)
    # Execute: one SGD step, lr 0.1: w ← w − lr · mu (w − w_global) = (1 − 0.05, 2 + 0.1)
    updated = sgd_step(module, lambda w: w.sum() * 0.0, 0.1, context)
    # Assert
    torch.testing.assert_close(updated, torch.tensor([0.95, 2.1], dtype=torch.float64))


def test_proximal_penalty_requires_every_trainable_parameter_in_the_global_state() -> None:
    with pytest.raises(KeyError, match="no entry for trainable parameter.*'weight'"):
        proximal_penalty([("weight", nn.Parameter(torch.ones(2)))], {}, 0.1)


def test_proximal_term_without_mu_in_the_round_config_names_the_server_half() -> None:
    with pytest.raises(KeyError, match="no 'proximal-mu'.*the server half must be Flower's FedProx"):
        ProximalTerm().loss(TinyModule([1.0, 2.0]), {}, None, round_context(None, [0.0, 4.0]))


def test_fedprox_server_sends_mu_and_the_client_gets_the_term() -> None:
    parts = make(fedprox, **{"proximal-mu": 0.25})
    assert [type(m) for m in parts.mechanisms] == [ProximalTerm]
    assert parts.describe["proximal-mu"] == 0.25
    assert make(fedprox).server.proximal_mu == DEFAULT_PROXIMAL_MU
    from flwr.app import ConfigRecord

    from pchmr.testing.strategies import FakeGrid, array_record, task_identity

    with task_identity():
        messages = list(
            parts.server.configure_train(1, array_record(contract_arrays()), ConfigRecord({}), FakeGrid([1, 2]))
        )
    assert [m.content["config"]["proximal-mu"] for m in messages] == [0.25, 0.25]


def test_fedprox_with_mu_zero_aggregates_like_fedavg() -> None:
    updates = [({"w": np.array([1.0, -1.0])}, 1.0), ({"w": np.array([3.0, 5.0])}, 3.0)]
    start = {"w": np.array([0.5, 0.5])}
    prox, _ = run_round(make(fedprox, **{"proximal-mu": 0.0}), 1, start, updates)
    avg, _ = run_round(make(fedavg), 1, start, updates)
    np.testing.assert_array_equal(prox["w"], avg["w"])
    np.testing.assert_allclose(prox["w"], [0.5 + 2.5, 0.5 + 3.5])  # (1·1 + 3·3)/4, (1·(−1) + 3·5)/4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"proximal-mu": -0.1}, r"fedprox strategy option 'proximal-mu' must be a number >= 0, got -0.1"),
        ({"proximal-mu": "big"}, r"fedprox strategy option 'proximal-mu' must be a number >= 0, got 'big'"),
        ({"proximal-mu": math.inf}, r"'proximal-mu' must be a number >= 0, got inf"),
        ({"proximal-mu": True}, r"'proximal-mu' must be a number >= 0, got True"),
        ({"mu": 0.1}, r"fedprox strategy has no option 'mu'; its options are: proximal-mu"),
    ],
)
def test_fedprox_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(fedprox, **options)


# --------------------------------------------------------------------------------------
# fedopt: the server step by hand (Reddi et al. 2021, Algorithm 2; Flower's bias-corrected Adam)
# --------------------------------------------------------------------------------------
# Two rounds, two clients, a 2-parameter float64 model w0 = (1, −2).
# Round 1: client 0 sends w + (0.5, 0.1) with 1 example, client 1 w + (−0.1, 0.3) with 3:
#          Δ1 = (1·(0.5, 0.1) + 3·(−0.1, 0.3))/4 = (0.05, 0.25).
# Round 2: both clients with 2 examples send w + (0.2, −0.4) and w + (0.2, 0.0): Δ2 = (0.2, −0.2).
W0 = np.array([1.0, -2.0])
ROUND_UPDATES = [
    [({"w": np.array([0.5, 0.1])}, 1.0), ({"w": np.array([-0.1, 0.3])}, 3.0)],
    [({"w": np.array([0.2, -0.4])}, 2.0), ({"w": np.array([0.2, 0.0])}, 2.0)],
]
DELTAS = [np.array([0.05, 0.25]), np.array([0.2, -0.2])]
ETA, BETA1, BETA2, TAU = 0.5, 0.9, 0.99, 0.01


def run_two_rounds(parts: StrategyParts) -> list[np.ndarray]:
    w, out = {"w": W0.copy()}, []
    for server_round, updates in enumerate(ROUND_UPDATES, start=1):
        w, _ = run_round(parts, server_round, w, updates)
        out.append(w["w"])
    return out


def test_fedadagrad_server_step_equals_the_hand_computation() -> None:
    parts = make(fedopt, **{"server-opt": "adagrad", "server-learning-rate": ETA, "tau": TAU})
    # m_t = Δ_t; v1 = Δ1² = (0.0025, 0.0625); w1 = w0 + 0.5 Δ1 / (|Δ1| + 0.01)
    #   = (1 + 0.5·0.05/0.06, −2 + 0.5·0.25/0.26) = (1.4166667, −1.5192308)
    # v2 = v1 + Δ2² = (0.0425, 0.1025); w2 = w1 + 0.5 (0.2/(√0.0425 + 0.01), −0.2/(√0.1025 + 0.01))
    #   = (1.4166667 + 0.4626304, −1.5192308 − 0.3028869) = (1.8792970, −1.8221177)
    w1, w2 = run_two_rounds(parts)
    np.testing.assert_allclose(w1, [1.4166667, -1.5192308], atol=1e-7)
    np.testing.assert_allclose(w2, [1.8792970, -1.8221177], atol=1e-7)


def test_fedadam_server_step_equals_the_hand_computation() -> None:
    parts = make(
        fedopt, **{"server-opt": "adam", "server-learning-rate": ETA, "beta-1": BETA1, "beta-2": BETA2, "tau": TAU}
    )
    w, m, v, expected = W0.copy(), np.zeros(2), np.zeros(2), []
    for t, delta in enumerate(DELTAS, start=1):
        m = BETA1 * m + (1 - BETA1) * delta
        v = BETA2 * v + (1 - BETA2) * delta**2
        eta_t = ETA * math.sqrt(1 - BETA2 ** (t + 1)) / (1 - BETA1 ** (t + 1))  # Flower's bias correction
        w = w + eta_t * m / (np.sqrt(v) + TAU)
        expected.append(w)
    # round 1 in numbers: m1 = (0.005, 0.025), √v1 = (0.005, 0.025), eta_1 = 0.5·√0.0199/0.19 = 0.3712299
    np.testing.assert_allclose(expected[0], W0 + 0.3712299 * np.array([0.005 / 0.015, 0.025 / 0.035]), atol=1e-7)
    for actual, hand in zip(run_two_rounds(parts), expected):
        np.testing.assert_allclose(actual, hand, rtol=1e-12)


def test_fedyogi_server_step_equals_the_hand_computation() -> None:
    parts = make(
        fedopt, **{"server-opt": "yogi", "server-learning-rate": ETA, "beta-1": BETA1, "beta-2": BETA2, "tau": TAU}
    )
    w, m, v, expected = W0.copy(), np.zeros(2), np.zeros(2), []
    for delta in DELTAS:
        m = BETA1 * m + (1 - BETA1) * delta
        v = v - (1 - BETA2) * delta**2 * np.sign(v - delta**2)
        w = w + ETA * m / (np.sqrt(v) + TAU)
        expected.append(w)
    # round 1 in numbers: v0 = 0 so v1 = 0.01 Δ1² and w1 = w0 + 0.5 (0.005/0.015, 0.025/0.035)
    np.testing.assert_allclose(expected[0], [1 + 0.5 / 3, -2 + 0.5 * 5 / 7], atol=1e-12)
    for actual, hand in zip(run_two_rounds(parts), expected):
        np.testing.assert_allclose(actual, hand, rtol=1e-12)


def test_fedopt_defaults_are_flowers() -> None:
    assert make(fedopt).describe == {
        "server": "flwr.serverapp.strategy.FedAdam",
        "server-opt": "adam",
        "server-learning-rate": 0.1,
        "beta-1": 0.9,
        "beta-2": 0.99,
        "tau": 0.001,
    }
    assert make(fedopt, **{"server-opt": "yogi"}).server.eta == 0.01
    assert make(fedopt, **{"server-opt": "adagrad"}).describe == {
        "server": "flwr.serverapp.strategy.FedAdagrad",
        "server-opt": "adagrad",
        "server-learning-rate": 0.1,
        "tau": 0.001,
    }


def test_fedopt_state_holds_the_moments_and_refuses_another_optimiser() -> None:
    parts = make(fedopt, **{"server-opt": "adam"})
    (mechanism,) = parts.mechanisms
    assert isinstance(mechanism, ServerOptimizerState) and mechanism.name == "fedopt"
    assert mechanism.state_dict() == {"server-opt": "adam", "m_t": {}, "v_t": {}}
    run_round(parts, 1, {"w": W0.copy()}, ROUND_UPDATES[0])
    state = mechanism.state_dict()
    torch.testing.assert_close(state["m_t"]["w"], torch.from_numpy(0.1 * DELTAS[0]))
    with pytest.raises(ValueError, match="state is for server-opt 'adam', this run uses 'yogi'"):
        make(fedopt, **{"server-opt": "yogi"}).mechanism("fedopt").load_state_dict(state)


@pytest.mark.parametrize(("factory", "options"), [(fedopt, {"server-opt": "adam"}), (fedgh, {"server-opt": "adam"})])
def test_server_optimizers_keep_float32_and_average_integer_counters(factory: Any, options: dict[str, Any]) -> None:
    # counter 7; clients add 1 (1 example) and 5 (3 examples) → FedAvg's 7 + (1·1 + 3·5)/4 = 11
    updates = [
        (contract_delta(1, aligned=True, count_step=1), 1.0),
        (contract_delta(2, aligned=True, count_step=5), 3.0),
    ]
    aggregate, _ = run_round(make(factory, **options), 1, contract_arrays(), updates)
    assert float(aggregate["bn.num_batches_tracked"]) == pytest.approx(11.0)
    assert {aggregate[k].dtype for k in ("encoder.weight", "encoder.bias", "head.weight")} == {np.dtype(np.float32)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"server-opt": "sgd"}, r"fedopt strategy option 'server-opt' must be one of adam, yogi, adagrad, got 'sgd'"),
        ({"beta-1": 1.0}, r"fedopt strategy option 'beta-1' must be a number in \[0, 1\), got 1.0"),
        ({"beta-2": -0.5}, r"fedopt strategy option 'beta-2' must be a number in \[0, 1\)"),
        ({"server-learning-rate": 0}, r"'server-learning-rate' must be a number > 0, got 0"),
        ({"tau": "x"}, r"'tau' must be a number > 0, got 'x'"),
        (
            {"server-opt": "adagrad", "beta-1": 0.5},
            r"fedopt strategy option 'beta-1' applies to server-opt adam and yogi, not adagrad",
        ),
        (
            {"server-learning-rate-local": 0.1},
            r"has no option 'server-learning-rate-local' \(did you mean 'server-learning-rate'\?\)",
        ),
    ],
)
def test_fedopt_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(fedopt, **options)
