"""The RDP accountant against Opacus's independent implementation and hand-computable cases."""

import math
import warnings

import numpy as np
import pytest

from pchmr.core.kit.accounting import (
    DEFAULT_ORDERS,
    RDPAccountant,
    epsilon,
    epsilon_from_rdp,
    noise_multiplier_for_epsilon,
    rdp_sampled_gaussian,
)

# (q, z, T, δ): client sampling 10 of 100, DP-SGD-like small q, a large q, small z, tiny q, long run
SETTINGS = [
    (0.1, 1.1, 100, 1e-5),
    (0.01, 1.0, 1000, 1e-5),
    (0.2, 0.8, 50, 1e-4),
    (0.5, 2.0, 30, 1e-5),
    (0.001, 0.6, 10000, 1e-6),
]


def _opacus_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant as OpacusRDP

    accountant = OpacusRDP()
    accountant.history = [(z, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" for some settings
        return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q,z,steps,delta", SETTINGS)
def test_epsilon_matches_opacus(q, z, steps, delta):
    ours = epsilon(q, z, steps, delta)
    assert ours == pytest.approx(_opacus_epsilon(q, z, steps, delta), rel=1e-6)


def test_fractional_orders_agree_with_the_integer_formula_between_neighbours():
    # the two expansions are different formulas; at an order just off an integer the fractional
    # series must land next to the exact integer value (RDP is continuous in α)
    for q, z in [(0.1, 1.1), (0.02, 0.7)]:
        exact = rdp_sampled_gaussian(q, z, 3.0)
        near = rdp_sampled_gaussian(q, z, 3.0 + 1e-7)
        assert near == pytest.approx(exact, rel=1e-5)


def test_full_sampling_is_the_plain_gaussian_mechanism():
    # q = 1: RDP(α) = α / (2 z²), so T steps give T α / (2 z²)
    z, steps, delta = 2.0, 10, 1e-5
    rdp = np.array([steps * a / (2 * z * z) for a in DEFAULT_ORDERS])
    a = np.array(DEFAULT_ORDERS)
    expected = np.min(rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1))
    assert epsilon(1.0, z, steps, delta) == pytest.approx(expected, rel=1e-12)


def test_integer_order_two_by_hand():
    # A_2 = (1-q)² + 2q(1-q) + q² e^{1/z²} = 1 + q² (e^{1/z²} - 1)
    q, z = 0.3, 1.5
    assert rdp_sampled_gaussian(q, z, 2) == pytest.approx(math.log(1 + q * q * math.expm1(1 / z**2)), rel=1e-12)


def test_sampling_credit_and_monotonicity():
    assert epsilon(0.1, 1.0, 50, 1e-5) < epsilon(1.0, 1.0, 50, 1e-5)
    assert epsilon(0.1, 1.0, 50, 1e-5) < epsilon(0.1, 1.0, 100, 1e-5)
    assert epsilon(0.1, 2.0, 50, 1e-5) < epsilon(0.1, 1.0, 50, 1e-5)
    assert epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert rdp_sampled_gaussian(0.0, 1.0, 2.5) == 0.0 and rdp_sampled_gaussian(0.5, 0.0, 2.5) == math.inf


def test_noise_multiplier_for_epsilon_inverts_epsilon():
    q, steps, delta, target = 0.1, 100, 1e-5, 3.0
    z = noise_multiplier_for_epsilon(target, q, steps, delta)
    assert epsilon(q, z, steps, delta) <= target
    assert epsilon(q, z * 0.99, steps, delta) > target
    assert _opacus_epsilon(q, z, steps, delta) == pytest.approx(epsilon(q, z, steps, delta), rel=1e-6)


def test_accountant_composes_merges_and_restores():
    acc = RDPAccountant()
    for _ in range(30):
        acc.step(0.1, 1.1)
    acc.step(0.2, 0.9, steps=5)
    assert acc.history == [(0.1, 1.1, 30), (0.2, 0.9, 5)]
    rdp = acc.rdp()
    from pchmr.core.kit.accounting import rdp_curve

    np.testing.assert_allclose(rdp, rdp_curve(0.1, 1.1, 30) + rdp_curve(0.2, 0.9, 5), rtol=1e-14)
    restored = RDPAccountant()
    restored.load_state_dict(acc.state_dict())
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5) > 0
    assert acc.epsilon_after(0.1, 1.1, 10, 1e-5) > acc.epsilon(1e-5)
    assert acc.history[-1] == (0.2, 0.9, 5), "epsilon_after must not change the accountant"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: epsilon(1.5, 1.0, 10, 1e-5), "sample rate q must lie in"),
        (lambda: epsilon(0.1, -1.0, 10, 1e-5), "noise multiplier z must be"),
        (lambda: epsilon(0.1, 1.0, 10, 0.0), "delta must lie in"),
        (lambda: rdp_sampled_gaussian(0.1, 1.0, 1.0), "order must be > 1"),
        (lambda: noise_multiplier_for_epsilon(-1.0, 0.1, 10, 1e-5), "target epsilon must be"),
        (lambda: epsilon_from_rdp([2.0, 3.0], [0.1], 1e-5), "same length"),
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- pchmr privacy budget ----------------------------------------------------------------------
def _budget(*args: str):
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    return CliRunner().invoke(app, ["privacy", "budget", *args])


def test_cli_budget_prints_epsilon_and_the_noise_for_a_target():
    out = _budget("--sample-rate", "0.01", "--noise-multiplier", "1.0", "--rounds", "1000", "--delta", "1e-5")
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"epsilon = {epsilon(0.01, 1.0, 1000, 1e-5):.4f} at delta = 1e-05 after 1000 round(s)")
    assert "epsilon = 2.1014" in out.output  # Opacus's RDPAccountant gives 2.1014 for this setting
    out = _budget("--sample-rate", "0.1", "--target-epsilon", "3", "--rounds", "100")
    assert out.exit_code == 0, out.output
    z = float(out.output.split("noise multiplier = ")[1].split()[0])
    assert epsilon(0.1, z, 100, 1e-5) <= 3.0 < epsilon(0.1, z - 0.001, 100, 1e-5)


def test_cli_budget_refuses_bad_input():
    both = _budget("--sample-rate", "0.1", "--rounds", "5", "--noise-multiplier", "1", "--target-epsilon", "2")
    assert both.exit_code == 2 and "exactly one of --noise-multiplier" in both.output
    bad_q = _budget("--sample-rate", "1.5", "--rounds", "5", "--noise-multiplier", "1")
    assert bad_q.exit_code == 2 and "--sample-rate must lie in (0, 1], got 1.5" in bad_q.output
