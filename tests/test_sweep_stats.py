"""Student-t intervals over seeds and the paired difference (pchmr.report.stats), on fixed numbers."""

import math

import pytest

from pchmr.report.stats import interval, paired_difference, t_quantile


@pytest.mark.parametrize(
    "dof, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (1000, 1.962)]
)
def test_t_quantile_matches_the_tables(dof, expected):
    assert t_quantile(0.975, dof) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_refuses_what_has_no_quantile():
    with pytest.raises(ValueError, match="degrees of freedom >= 1, got 0"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        t_quantile(1.0, 3)


def test_interval_of_three_values():
    # mean 2, s = 1, half width = t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    ci = interval([1.0, 2.0, 3.0])
    assert (ci.n, ci.mean, ci.std) == (3, 2.0, 1.0)
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (ci.low, ci.high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), rel=1e-6)
    assert ci.text() == "2.0 ± 2.5" and not ci.excludes_zero


def test_interval_of_five_values_against_a_hand_computation():
    values = [57.1, 58.4, 56.9, 59.0, 57.6]  # mean 57.8, s = 0.8803
    ci = interval(values)
    s = math.sqrt(sum((v - 57.8) ** 2 for v in values) / 4)
    assert ci.mean == pytest.approx(57.8) and ci.std == pytest.approx(s)
    assert ci.half_width == pytest.approx(2.776445 * s / math.sqrt(5), rel=1e-6)
    assert ci.text(2) == f"57.80 ± {2.776445 * s / math.sqrt(5):.2f}"


def test_one_value_has_no_interval_and_none_has_no_mean():
    one = interval([41.25])
    assert (one.n, one.mean, one.std, one.half_width, one.low) == (1, 41.25, None, None, None)
    assert one.text() == "41.2" and not one.excludes_zero
    assert interval([]).text() == "—" and interval([]).n == 0
    with pytest.raises(ValueError, match="finite"):
        interval([1.0, float("nan")])


def test_paired_difference_pairs_by_seed_and_marks_an_interval_excluding_zero():
    baseline = {0: 60.0, 1: 62.0, 2: 58.0, 3: 70.0}
    row = {0: 58.0, 1: 60.5, 2: 56.5, 5: 10.0}  # seeds 3 and 5 have no partner
    diff, seeds = paired_difference(row, baseline)
    assert seeds == (0, 1, 2)
    assert diff.values == (-2.0, -1.5, -1.5)
    # mean -5/3, s = 0.288675, half = 4.302653 * s / sqrt(3) = 0.717109
    assert diff.mean == pytest.approx(-5 / 3) and diff.half_width == pytest.approx(0.717109, rel=1e-5)
    assert diff.excludes_zero and diff.high < 0
    assert diff.text(signed=True) == "−1.7 ± 0.7"
    # unpaired intervals of the same numbers overlap: pairing is what removes the seed's share
    assert interval([60.0, 62.0, 58.0]).low < interval([58.0, 60.5, 56.5]).high


def test_a_difference_whose_interval_straddles_zero_is_not_marked():
    diff, _ = paired_difference({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert not diff.excludes_zero and diff.low < 0 < diff.high
    assert diff.text(signed=True) == "+0.2 ± 2.6"  # s = 1.0408, half = 4.3027 * s / sqrt(3)
