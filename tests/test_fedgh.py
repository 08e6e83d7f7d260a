"""FedGH (pchmr's Federated Gradient Harmonization): hand-computed projections, stats, seeding, options."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.plugins.strategies.fedavg import fedavg
from pchmr.plugins.strategies.fedgh import (
    TOP_LAYERS_KEY,
    fedgh,
    harmonize,
    pcgrad_coefficients,
    projection_orders,
)
from pchmr.testing.strategies import (
    FakeGrid,
    array_record,
    contract_arrays,
    contract_delta,
    make_reply,
    run_round,
    task_identity,
)


def make(seed: int = 0, **options: Any) -> StrategyParts:
    return fedgh(StrategyConfig(num_clients=5, per_round=3, num_rounds=3, seed=seed, options=options))


def updates_of(*deltas: tuple[float, ...], counts: tuple[float, ...] | None = None) -> list[tuple[dict, float]]:
    counts = counts or tuple(1.0 for _ in deltas)
    return [({"w": np.array(d, dtype=np.float64)}, n) for d, n in zip(deltas, counts)]


ORIGIN = {"w": np.zeros(2)}


def test_equals_fedavg_when_no_pair_conflicts() -> None:
    # Prepare: three deltas with only positive entries (every pairwise dot product > 0)
    updates = [(contract_delta(40 + k, aligned=True, count_step=k + 1), 2.0 + 3 * k) for k in range(3)]
    # Execute
    gh_parts = make()
    gh, metrics = run_round(gh_parts, 1, contract_arrays(), updates)
    avg, _ = run_round(fedavg(StrategyConfig(5, 3, 3, 0)), 1, contract_arrays(), updates)
    # Assert: same entries (integer counter included), values equal to float32 rounding
    assert sorted(gh) == sorted(avg)
    for key in avg:
        np.testing.assert_allclose(gh[key], avg[key], rtol=1e-6, atol=1e-7, err_msg=key)
    stats = gh_parts.server.last_round_stats
    assert (stats.conflicting_pairs, stats.projections, stats.norm_ratio) == (0, 0, pytest.approx(1.0))
    assert metrics["fedgh-conflict-fraction"] == 0.0


def test_removes_the_conflicting_component_of_a_hand_computed_pair() -> None:
    # Prepare: Δ1 = (1, 0), Δ2 = (−1, 1): ⟨Δ1, Δ2⟩ = −1 < 0
    #   Δ1' = Δ1 − (−1/‖Δ2‖²) Δ2 = (1, 0) + ½(−1, 1) = (0.5, 0.5)
    #   Δ2' = Δ2 − (−1/‖Δ1‖²) Δ1 = (−1, 1) + (1, 0) = (0, 1)
    # Execute / Assert: equal weights → ½(Δ1' + Δ2') = (0.25, 0.75) (FedAvg would give (0, 0.5))
    aggregate, _ = run_round(make(), 1, ORIGIN, updates_of((1, 0), (-1, 1)))
    np.testing.assert_allclose(aggregate["w"], [0.25, 0.75], atol=1e-12)
    # 1 and 3 examples: ¼(0.5, 0.5) + ¾(0, 1) = (0.125, 0.875)
    aggregate, _ = run_round(make(), 1, ORIGIN, updates_of((1, 0), (-1, 1), counts=(1.0, 3.0)))
    np.testing.assert_allclose(aggregate["w"], [0.125, 0.875], atol=1e-12)
    # each harmonized delta is orthogonal to the other client's original delta
    coeffs, projections = pcgrad_coefficients(np.array([[1.0, -1.0], [-1.0, 2.0]]), [[1], [0]])
    harmonized = coeffs @ np.array([[1.0, 0.0], [-1.0, 1.0]])
    assert projections == 2
    assert harmonized[0] @ np.array([-1.0, 1.0]) == pytest.approx(0.0)
    assert harmonized[1] @ np.array([1.0, 0.0]) == pytest.approx(0.0)


def test_records_the_conflict_rate_and_cosines_every_round() -> None:
    # Δ1 = (1, 0), Δ2 = (−1, 1), Δ3 = (0.5, −2): pairs 12 (dot −1) and 23 (dot −2.5) conflict, 13 (0.5) not
    # cosines −1/√2 = −0.70711, 0.5/√4.25 = 0.24254, −2.5/(√2 √4.25) = −0.85749; mean −0.44069
    parts = make()
    _, metrics = run_round(parts, 1, ORIGIN, updates_of((1, 0), (-1, 1), (0.5, -2)))
    stats = parts.server.last_round_stats
    assert (stats.server_round, stats.clients, stats.pairs, stats.conflicting_pairs) == (1, 3, 3, 2)
    assert stats.conflict_fraction == pytest.approx(2 / 3)
    assert stats.mean_cosine == pytest.approx(-0.44069, abs=1e-5)
    assert stats.min_cosine == pytest.approx(-0.85749, abs=1e-5)
    assert metrics["fedgh-conflict-fraction"] == pytest.approx(2 / 3)
    assert metrics["fedgh-mean-cosine"] == pytest.approx(-0.44069, abs=1e-5)
    assert metrics["fedgh-projections"] == stats.projections > 0
    np.testing.assert_allclose(
        stats.cosines, [[1, -0.70711, 0.24254], [-0.70711, 1, -0.85749], [0.24254, -0.85749, 1]], atol=1e-5
    )
    assert "fedgh-cosines" not in metrics, "the matrix goes to the log only"
    # a second round without conflicts is recorded too
    run_round(parts, 2, ORIGIN, updates_of((1, 0), (1, 1), (0, 1)))
    assert [s.conflicting_pairs for s in parts.server.round_stats] == [2, 0]
    assert parts.server.last_round_stats.server_round == 2


def test_projection_order_matters_with_three_clients_and_is_seeded() -> None:
    # Prepare: client 0 conflicts with both others: Δ = (1, 0), (−1, 1), (−1, −2)
    deltas = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -2.0]])
    gram = deltas @ deltas.T
    # order (1, 2): (1, 0) + ½(−1, 1) = (0.5, 0.5); ⟨·, Δ3⟩ = −1.5 → + (1.5/5)(−1, −2) = (0.2, −0.1)
    # order (2, 1): (1, 0) + (1/5)(−1, −2) = (0.8, −0.4); ⟨·, Δ2⟩ = −1.2 → + (1.2/2)(−1, 1) = (0.2, 0.2)
    a12, _ = pcgrad_coefficients(gram, [[1, 2], [0, 2], [0, 1]])
    a21, _ = pcgrad_coefficients(gram, [[2, 1], [0, 2], [0, 1]])
    np.testing.assert_allclose((a12 @ deltas)[0], [0.2, -0.1], atol=1e-12)
    np.testing.assert_allclose((a21 @ deltas)[0], [0.2, 0.2], atol=1e-12)
    # the orders are permutations of the other clients, reproducible from (seed, round)
    assert projection_orders(3, 7, 2) == projection_orders(3, 7, 2)
    assert all(sorted(order) == [j for j in range(3) if j != i] for i, order in enumerate(projection_orders(3, 7, 2)))
    # Execute: the strategy with the same seed twice, and with seeds whose orders for client 0 differ
    updates = updates_of(*map(tuple, deltas))
    same_a, _ = run_round(make(seed=3), 1, ORIGIN, updates)
    same_b, _ = run_round(make(seed=3), 1, ORIGIN, updates)
    np.testing.assert_array_equal(same_a["w"], same_b["w"])
    first_of = {seed: projection_orders(3, seed, 1)[0][0] for seed in range(20)}
    seed_12 = next(s for s, j in first_of.items() if j == 1)
    seed_21 = next(s for s, j in first_of.items() if j == 2)
    out_12, _ = run_round(make(seed=seed_12), 1, ORIGIN, updates)
    out_21, _ = run_round(make(seed=seed_21), 1, ORIGIN, updates)
    assert not np.allclose(out_12["w"], out_21["w"])
    # with two clients there is a single order
    assert projection_orders(2, 0, 1) == projection_orders(2, 1, 1) == [[1], [0]]


def test_layer_granularity_projects_each_entry_separately() -> None:
    # Entry "a": Δ1 = Δ2 = (3,); entry "b": Δ1 = (1, 0), Δ2 = (−1, 1).
    # Whole model: ⟨Δ1, Δ2⟩ = 9 − 1 = 8 > 0, no projection → b = ½((1, 0) + (−1, 1)) = (0, 0.5).
    # Per layer: "b" conflicts and is harmonized as in the pair test → b = (0.25, 0.75).
    start = {"a": np.zeros(1), "b": np.zeros(2)}
    updates = [
        ({"a": np.array([3.0]), "b": np.array([1.0, 0.0])}, 1.0),
        ({"a": np.array([3.0]), "b": np.array([-1.0, 1.0])}, 1.0),
    ]
    model, _ = run_round(make(granularity="model"), 1, start, updates)
    layer, _ = run_round(make(granularity="layer"), 1, start, updates)
    np.testing.assert_allclose(model["b"], [0.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(layer["b"], [0.25, 0.75], atol=1e-12)
    np.testing.assert_allclose(layer["a"], [3.0], atol=1e-12)


def test_server_learning_rate_and_uniform_weighting() -> None:
    # η = 0.5 on the pair test's harmonized mean (0.25, 0.75), from w = (1, 1)
    start = {"w": np.ones(2)}
    aggregate, _ = run_round(make(**{"server-learning-rate": 0.5}), 1, start, updates_of((1, 0), (-1, 1)))
    np.testing.assert_allclose(aggregate["w"], [1.125, 1.375], atol=1e-12)
    # uniform weighting ignores the 1 : 3 example counts
    aggregate, _ = run_round(make(weighting="uniform"), 1, ORIGIN, updates_of((1, 0), (-1, 1), counts=(1.0, 3.0)))
    np.testing.assert_allclose(aggregate["w"], [0.25, 0.75], atol=1e-12)


def test_server_opt_adam_steps_on_the_harmonized_delta() -> None:
    # harmonized delta h = (0.25, 0.75); Flower's FedAdam round 1: m = 0.1 h, v = 0.01 h²,
    # w ← w + η √(1 − 0.99²)/(1 − 0.9²) · m / (√v + τ)
    parts = make(**{"server-opt": "adam", "server-learning-rate": 0.5, "tau": 0.01})
    aggregate, _ = run_round(parts, 1, ORIGIN, updates_of((1, 0), (-1, 1)))
    h = np.array([0.25, 0.75])
    eta_1 = 0.5 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(aggregate["w"], eta_1 * 0.1 * h / (0.1 * h + 0.01), rtol=1e-12)
    assert parts.server.last_round_stats.conflicting_pairs == 1
    state = parts.mechanism("fedgh").state_dict()
    np.testing.assert_allclose(state["m_t"]["w"].numpy(), 0.1 * h, rtol=1e-12)


def test_zero_and_single_updates_give_finite_results() -> None:
    # a client that did not move never conflicts (cosine 0 by definition)
    aggregate, _ = run_round(make(), 1, ORIGIN, updates_of((0, 0), (1, 2)))
    np.testing.assert_allclose(aggregate["w"], [0.5, 1.0], atol=1e-12)
    # one client: its model, no pairs
    parts = make()
    aggregate, _ = run_round(parts, 1, ORIGIN, updates_of((1, 2)))
    np.testing.assert_allclose(aggregate["w"], [1.0, 2.0])
    assert parts.server.last_round_stats.pairs == 0 and math.isnan(parts.server.last_round_stats.mean_cosine)


def test_reply_arrival_order_does_not_matter() -> None:
    from flwr.app import ConfigRecord

    results = []
    for reverse in (False, True):
        parts = make(seed=1)
        with task_identity():
            messages = list(
                parts.server.configure_train(1, array_record(ORIGIN), ConfigRecord({}), FakeGrid([1, 2, 3]))
            )
        messages.sort(key=lambda m: m.metadata.dst_node_id)
        deltas = [(1.0, 0.0), (-1.0, 1.0), (-1.0, -2.0)]
        replies = [make_reply(m, {"w": np.array(d)}, 1.0, pid) for pid, (m, d) in enumerate(zip(messages, deltas))]
        arrays, _ = parts.server.aggregate_train(1, replies[::-1] if reverse else replies)
        results.append(arrays["w"].numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_harmonize_keeps_float32_and_averages_integer_buffers() -> None:
    global_arrays = {"w": np.zeros(3, dtype=np.float32), "n": np.array(4, dtype=np.int64)}
    clients = [
        {"w": np.array([1, 0, 0], np.float32), "n": np.array(6)},
        {"w": np.array([-1, 1, 0], np.float32), "n": np.array(10)},
    ]
    out, stats = harmonize(global_arrays, clients, np.array([0.25, 0.75]), [[1], [0]])
    assert out["w"].dtype == np.float32
    assert float(out["n"]) == pytest.approx(0.25 * 6 + 0.75 * 10)
    assert stats.conflicting_pairs == 1


def test_fedgh_parts_declare_individual_updates_and_label_inferred_choices() -> None:
    parts = make(granularity="layer")
    assert parts.requires_individual_updates
    options = parts.describe["options"]
    assert options["granularity"] == {"value": "layer", "inferred": True}
    assert {"granularity", "weighting", "server-opt", "server-learning-rate"} <= set(options)
    assert all(entry["inferred"] for entry in options.values())
    assert {"discrepancy", "projection", "order", "reconstruction"} <= set(parts.describe["inferred"])
    assert [m.name for m in parts.mechanisms] == ["fedgh-entries"]
    assert parts.mechanisms[0].state_dict() == {}, "without a server optimiser FedGH keeps no state"
    assert [m.name for m in make(**{"server-opt": "yogi"}).mechanisms] == ["fedgh", "fedgh-entries"]
    assert options["restore-norm"] == {"value": False, "inferred": True}
    assert make(**{"restore-norm": "true"}).describe["options"]["restore-norm"]["value"] is True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"granularity": "block"}, r"fedgh strategy option 'granularity' must be one of model, layer, got 'block'"),
        ({"weighting": "size"}, r"fedgh strategy option 'weighting' must be one of examples, uniform, got 'size'"),
        ({"server-opt": "sgd"}, r"fedgh strategy option 'server-opt' must be one of none, adam, yogi, adagrad"),
        ({"beta-1": 0.5}, r"fedgh strategy option 'beta-1' needs server-opt adam, yogi or adagrad"),
        (
            {"beta-1": 0.5, "tau": 0.1},
            r"fedgh strategy option 'beta-1' and 'tau' need server-opt adam, yogi or adagrad",
        ),
        ({"server-learning-rate": -1.0}, r"fedgh strategy option 'server-learning-rate' must be a number > 0"),
        ({"server-opt": "adam", "beta-2": 1.5}, r"fedgh strategy option 'beta-2' must be a number in \[0, 1\)"),
        ({"threshold": 0.1}, r"fedgh strategy has no option 'threshold'"),
        ({"restore-norm": "maybe"}, r"fedgh strategy option 'restore-norm' must be"),
    ],
)
def test_fedgh_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**options)


# --------------------------------------------------------------------------------------
# trainable parameters only; buffers averaged as in FedAvg
# --------------------------------------------------------------------------------------
class TinyModel(nn.Module):
    """One trainable vector ``w``, a frozen parameter and two buffers (a statistic and a counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Parameter(torch.full((2,), 0.3), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(2))
        self.register_buffer("num_batches_tracked", torch.tensor(4))


TINY_GLOBAL = {
    "w": np.zeros(2, np.float32),
    "frozen": np.full(2, 0.3, np.float32),
    "running_mean": np.zeros(2, np.float32),
    "num_batches_tracked": np.array(4, np.int64),
}


def tiny_updates(*w_deltas: tuple[float, float]) -> list[tuple[dict, float]]:
    """Client k moves ``w`` by ``w_deltas[k]``, its running mean by (3, 0) + k (0, 1) (all aligned,
    large) and counts 2 (k + 1) more batches; the frozen parameter does not move."""
    return [
        (
            {
                "w": np.array(d, np.float32),
                "frozen": np.zeros(2, np.float32),
                "running_mean": np.array([3.0, k], np.float32),
                "num_batches_tracked": np.array(2 * (k + 1), np.int64),
            },
            1.0,
        )
        for k, d in enumerate(w_deltas)
    ]


def tiny_parts(**options: Any) -> StrategyParts:
    parts = make(**options)
    parts.mechanism("fedgh-entries").prepare_module(TinyModel())  # as the server does with its module
    return parts


def test_trainable_state_keys_name_the_parameters_training_updates() -> None:
    from pchmr.core.kit.state import trainable_state_keys

    assert trainable_state_keys(TinyModel()) == {"w"}
    bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert trainable_state_keys(bn) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    bn[1].eval()  # a frozen BatchNorm (its submodule stays in eval mode) keeps its parameters trainable
    assert "1.weight" in trainable_state_keys(bn) and "1.running_mean" not in trainable_state_keys(bn)


def test_two_conflicting_and_one_aligned_update_with_buffers_untouched_by_projection() -> None:
    # w: Δ1 = (1, 0) and Δ2 = (−1, 1) conflict (⟨Δ1, Δ2⟩ = −1); Δ3 = (1, 2) conflicts with neither
    #   (⟨Δ1, Δ3⟩ = 1, ⟨Δ2, Δ3⟩ = 1), so whatever the order:
    #   Δ1' = Δ1 − (−1/2) Δ2 = (0.5, 0.5)    (then ⟨Δ1', Δ3⟩ = 1.5 > 0: no second projection)
    #   Δ2' = Δ2 − (−1/1) Δ1 = (0, 1)        (then ⟨Δ2', Δ3⟩ = 2 > 0)
    #   Δ3' = Δ3 = (1, 2)
    #   equal weights: w = ⅓((0.5, 0.5) + (0, 1) + (1, 2)) = (0.5, 7/6)   (FedAvg: (1/3, 1))
    # buffers: the running mean moves by (3, 0), (3, 1), (3, 2): aligned and large; were it part of
    #   the harmonized deltas, ⟨Δ1, Δ2⟩ = −1 + 9 > 0 and nothing would be projected. It is averaged:
    #   (3, 1); the counter 4 + ⅓(2 + 4 + 6) = 8; the frozen parameter stays 0.3.
    parts = tiny_parts()
    out, metrics = run_round(parts, 1, TINY_GLOBAL, tiny_updates((1, 0), (-1, 1), (1, 2)))
    np.testing.assert_allclose(out["w"], [0.5, 7 / 6], rtol=1e-6)
    np.testing.assert_allclose(out["running_mean"], [3.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["frozen"], [0.3, 0.3], rtol=1e-6)
    assert float(out["num_batches_tracked"]) == pytest.approx(8.0)
    assert out["w"].dtype == out["running_mean"].dtype == np.float32
    stats = parts.server.last_round_stats
    assert (stats.pairs, stats.conflicting_pairs, stats.projections) == (3, 1, 2)
    assert (stats.harmonized_entries, stats.averaged_entries) == (1, 3)
    assert metrics["fedgh-conflict-fraction"] == pytest.approx(1 / 3)
    assert (metrics["fedgh-harmonized-entries"], metrics["fedgh-averaged-entries"]) == (1.0, 3.0)
    # without the module (bare arrays) every floating-point entry is harmonized: no conflict left
    bare, _ = run_round(make(), 1, TINY_GLOBAL, tiny_updates((1, 0), (-1, 1), (1, 2)))
    np.testing.assert_allclose(bare["w"], [1 / 3, 1.0], rtol=1e-6)


def test_buffers_take_no_server_step() -> None:
    # η = 0.5 scales the harmonized step of w only: w = 0.5 (0.5, 7/6); the running mean is the average
    parts = tiny_parts(**{"server-learning-rate": 0.5})
    out, _ = run_round(parts, 1, TINY_GLOBAL, tiny_updates((1, 0), (-1, 1), (1, 2)))
    np.testing.assert_allclose(out["w"], [0.25, 7 / 12], rtol=1e-6)
    np.testing.assert_allclose(out["running_mean"], [3.0, 1.0], rtol=1e-6)
    # with a server optimiser: Flower's FedAdam steps w from the harmonized delta h = (0.5, 7/6)
    # (round 1: w = η √(1 − 0.99²)/(1 − 0.9²) · 0.1 h / (0.1 h + τ), η = 0.1, τ = 0.001, as in
    # test_server_opt_adam_steps_on_the_harmonized_delta), never the running mean: the clients' average
    parts = tiny_parts(**{"server-opt": "adam"})
    out, _ = run_round(parts, 1, TINY_GLOBAL, tiny_updates((1, 0), (-1, 1), (1, 2)))
    h = np.array([0.5, 7 / 6])
    np.testing.assert_allclose(
        out["w"], 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2) * 0.1 * h / (0.1 * h + 0.001), rtol=1e-6
    )
    np.testing.assert_allclose(out["running_mean"], [3.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["frozen"], [0.3, 0.3], rtol=1e-6)


def test_restore_norm_gives_the_harmonized_step_the_average_norm() -> None:
    # the pair Δ1 = (1, 0), Δ2 = (−1, 1): average (0, 0.5), norm 0.5; harmonized h = (0.25, 0.75),
    # norm √0.625; restored: h · 0.5 / √0.625 = (0.158114, 0.474342)
    parts = make(**{"restore-norm": True})
    out, metrics = run_round(parts, 1, ORIGIN, updates_of((1, 0), (-1, 1)))
    np.testing.assert_allclose(out["w"], [0.25, 0.75] / np.sqrt(0.625) * 0.5, rtol=1e-12)
    assert np.linalg.norm(out["w"]) == pytest.approx(0.5)
    assert metrics["fedgh-norm-ratio"] == pytest.approx(np.sqrt(0.625) / 0.5), "the ratio before restoring"
    # without a projection nothing is rescaled: exactly FedAvg
    out, _ = run_round(make(**{"restore-norm": True}), 1, ORIGIN, updates_of((1, 0), (1, 1), (0, 1)))
    np.testing.assert_array_equal(out["w"], [2 / 3, 2 / 3])
    # per layer: entry "a" (no conflict) keeps its step, entry "b" is restored to its own average's norm
    start = {"a": np.zeros(1), "b": np.zeros(2)}
    updates = [
        ({"a": np.array([3.0]), "b": np.array([1.0, 0.0])}, 1.0),
        ({"a": np.array([3.0]), "b": np.array([-1.0, 1.0])}, 1.0),
    ]
    layer, _ = run_round(make(granularity="layer", **{"restore-norm": True}), 1, start, updates)
    np.testing.assert_allclose(layer["a"], [3.0], rtol=1e-12)
    np.testing.assert_allclose(layer["b"], [0.25, 0.75] / np.sqrt(0.625) * 0.5, rtol=1e-12)


def test_layer_granularity_reports_per_layer_conflicts(caplog: pytest.LogCaptureFixture) -> None:
    # three clients, three entries:
    #   "a" (3 values): every client moves it by (3, 3, 3): no conflict
    #   "b" (2 values): (1, 0), (−1, 1), (1, 2): pair 12 conflicts → 1/3, 2 projections (as above)
    #   "c" (1 value): 1, −1, −1: pairs 12 and 13 conflict → 2/3; each client projects once, onto 0
    start = {"a": np.zeros(3), "b": np.zeros(2), "c": np.zeros(1)}
    deltas = [((3, 3, 3), (1, 0), (1,)), ((3, 3, 3), (-1, 1), (-1,)), ((3, 3, 3), (1, 2), (-1,))]
    updates = [({"a": np.array(a, float), "b": np.array(b, float), "c": np.array(c, float)}, 1.0) for a, b, c in deltas]
    parts = make(granularity="layer")
    with caplog.at_level("INFO", logger="pchmr.strategies.fedgh"):
        out, metrics = run_round(parts, 4, start, updates)
    np.testing.assert_allclose(out["b"], [0.5, 7 / 6], rtol=1e-12)
    np.testing.assert_allclose(out["c"], [0.0], atol=1e-12)
    stats = parts.server.last_round_stats
    assert [(layer.name, layer.size, layer.conflicting_pairs, layer.projections) for layer in stats.layers] == [
        ("a", 3, 0, 0),
        ("b", 2, 1, 2),
        ("c", 1, 2, 3),
    ]
    assert metrics["fedgh-projections"] == 5
    assert metrics["fedgh-layers-in-conflict"] == 2
    assert metrics["fedgh-layer-conflict-fraction-mean"] == pytest.approx((0 + 1 / 3 + 2 / 3) / 3)
    assert metrics["fedgh-layer-conflict-fraction-max"] == pytest.approx(2 / 3)
    assert metrics["fedgh-layer-conflict-fraction-weighted"] == pytest.approx((0 * 3 + 2 / 3 + 2 / 3) / 6)
    # the most conflicting layers by name reach rounds.jsonl through the mechanism, for that round only
    entries = parts.mechanism("fedgh-entries")
    assert entries.round_metrics(4) == {TOP_LAYERS_KEY: {"c": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}}
    assert entries.round_metrics(3) == {}
    # the full table goes to the log (run.log in a run)
    table = next(r.getMessage() for r in caplog.records if "per-layer conflicts" in r.getMessage())
    assert "round 4 per-layer conflicts (2 of 3 layers have a conflicting pair)" in table
    assert [line.split()[:4] for line in table.splitlines()[2:]] == [
        ["a", "3", "0", "3"],
        ["b", "2", "1", "3"],
        ["c", "1", "2", "3"],
    ]
    # model granularity: no per-layer statistics, no top layers
    model = make()
    _, model_metrics = run_round(model, 4, start, updates)
    assert "fedgh-layers-in-conflict" not in model_metrics
    assert model.mechanism("fedgh-entries").round_metrics(4) == {}


# --------------------------------------------------------------------------------------
# end to end: `pchmr run --strategy fedgh`
# --------------------------------------------------------------------------------------
E2E = ["--num-train", "16", "--num-test", "8", "--clients", "2", "--per-round", "2", "--rounds", "1"]


@pytest.mark.parametrize(
    ("granularity", "extra"),
    [("model", ["--strategy-option", "restore-norm=true"]), ("layer", [])],
)
def test_cli_run_records_conflict_statistics(tmp_path, pchmr_cache, granularity: str, extra: list[str]) -> None:
    import json

    from typer.testing import CliRunner

    from pchmr.cli.app import app

    out = tmp_path / "run"
    args = ["run", "--strategy", "fedgh", "--strategy-option", f"granularity={granularity}", *extra]
    result = CliRunner().invoke(app, [*args, *E2E, "--batch-size", "8", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    record = rounds[1]
    assert record["fedgh_pairs"] == 1 and record["fedgh_clients"] == 2
    assert 0.0 <= record["fedgh_conflict_fraction"] <= 1.0 and record["fedgh_projections"] >= 0
    assert -1.0 <= record["fedgh_mean_cosine"] <= 1.0 and record["fedgh_norm_ratio"] > 0
    # trainable parameters harmonized; the frozen encoder and every BatchNorm statistic averaged
    state = torch.load(out / "model.pt", weights_only=True)
    statistics = [key for key in state if key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and record["fedgh_averaged_entries"] >= len(statistics)
    assert record["fedgh_harmonized_entries"] > 0
    assert record["fedgh_harmonized_entries"] + record["fedgh_averaged_entries"] == len(state)
    config = json.loads((out / "config.json").read_text())
    assert [m["name"] for m in config["strategy"]["mechanisms"]] == ["fedgh-entries"]
    assert config["strategy"]["options"]["granularity"]["value"] == granularity
    log = (out / "run.log").read_text()
    assert "client pairs conflict" in log
    assert "round 1 pairwise cosines of the clients' updates (partitions [0, 1])" in log
    if granularity == "model":
        assert config["strategy"]["options"]["restore-norm"]["value"] is True
        assert "fedgh_layers_in_conflict" not in record and "fedgh_top_conflict_layers" not in record
        assert "per-layer conflicts" not in log
        return
    layers = int(record["fedgh_harmonized_entries"])
    assert 0 <= record["fedgh_layers_in_conflict"] <= layers
    assert 0.0 <= record["fedgh_layer_conflict_fraction_mean"] <= record["fedgh_layer_conflict_fraction_max"] <= 1.0
    top = record["fedgh_top_conflict_layers"]  # name -> conflict fraction, the most conflicting first
    assert len(top) == min(5, int(record["fedgh_layers_in_conflict"]))
    assert set(top) <= set(state) and all(0.0 < rate <= 1.0 for rate in top.values())
    # the full per-layer table (a header and one line per harmonized entry) is in run.log
    table = log.split("round 1 per-layer conflicts", 1)[1].split("\n")
    assert f"of {layers} layers have a conflicting pair" in table[0]
    rows = table[2 : 2 + layers]
    assert all(line.split()[0] in state for line in rows) and len(rows) == layers


# --------------------------------------------------------------------------------------
# settings:noniid-conflict (pchmr/configs/settings/): the setting where clients conflict
# --------------------------------------------------------------------------------------
NONIID = "settings:noniid-conflict"


@pytest.mark.parametrize(
    ("scale", "num_clients", "allocation"),
    [(None, 8, [2, 2, 1, 3]), ("cpu", 8, [1, 3, 1, 3]), ("smoke", 4, [1, 1, 1, 1])],
)
def test_noniid_conflict_config_gives_one_source_per_client_with_its_label_type(scale, num_clients, allocation) -> None:
    from pchmr.core.engine.config import RunConfig, load_config_file
    from pchmr.core.engine.preparation import check_plugins
    from pchmr.plugins.bodymodels.anny import make_anny
    from pchmr.plugins.datasets import synthetic
    from pchmr.plugins.partitioners.by_source import by_source

    config = RunConfig.from_dict(load_config_file(NONIID, scale=scale))
    check_plugins(config)  # plugin names and every option, the dataset's included
    assert (config.dataset, config.partitioner, config.clients) == ("synthetic", "by-source", num_clients)
    options = synthetic.SyntheticOptions(only_2d=config.dataset_options["2d-only"], tilt=config.dataset_options["tilt"])
    assert (options.sources_2d, options.tilted_sources) == (("outdoor",), ("indoor", "sports"))
    # the sources of the training split as the dataset draws them (labels only, nothing rendered)
    body = make_anny()
    shapes = body.sample_shape(synthetic.NUM_SUBJECTS, synthetic.split_generator(config.seed, "subjects"))
    plan = synthetic.plan_split(config.num_train, synthetic.split_generator(config.seed, "train"), body, shapes)
    sources = np.array([synthetic.SOURCES[i].name for i in plan.source])

    labels = SimpleNamespace(labels={"source": sources}, train=range(len(sources)))
    partition = by_source(labels, config.clients, config.seed, dict(config.partition_options))
    values = partition.params["client_values"]
    assert [values.count(name) for name in ("indoor", "outdoor", "sports", "studio")] == allocation
    # about a third of the samples each: 3D in the camera frame, tilted 3D, 2D only
    shares = {
        kind: np.isin(sources, names).mean()
        for kind, names in (("3d", ["studio"]), ("tilted", ["indoor", "sports"]), ("2d", ["outdoor"]))
    }
    assert all(0.25 < share < 0.42 for share in shares.values()), shares
