"""FedGH (pchmr's Federated Gradient Harmonization): hand-computed projections, stats, seeding, options."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.plugins.strategies.fedavg import fedavg
from pchmr.plugins.strategies.fedgh import (
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
    assert parts.mechanisms == (), "without a server optimiser FedGH keeps no state"
    assert [m.name for m in make(**{"server-opt": "yogi"}).mechanisms] == ["fedgh"]


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
    ],
)
def test_fedgh_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**options)
