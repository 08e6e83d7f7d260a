"""pchmr's privacy contract suite on ``example-clip`` (the real Flower simulation included), plus
the clipping itself checked by hand."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from pchmr.api import IncompatibleError, OptionError, StrategyConfig, StrategyParts, UpdateInfo
from pchmr.testing import PrivacyContract, registered

BAD_OPTIONS = {
    "a zero bound": ({"max-norm": 0}, r"example-clip privacy option 'max-norm' must be a number > 0, got 0"),
    "a bound that is not a number": ({"max_norm": "tight"}, r"option 'max-norm' must be a number > 0, got 'tight'"),
}
INFO = UpdateInfo(server_round=1, partition_id=0, num_examples=10, num_clients=3, per_round=3, config={})


def _clip():
    return registered("privacy", "example-clip")


class TestExampleClip(PrivacyContract):
    """A bound below the suite's client updates (L2 norm about 0.25), so every update is clipped;
    ``exact_options`` lift it for the one check that compares a round with plain FedAvg."""

    @pytest.fixture(scope="class")
    @classmethod
    def privacy_factory(cls):
        return _clip()

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls) -> Mapping[str, object]:
        return {"max-norm": 0.05}

    @pytest.fixture(scope="class")
    @classmethod
    def exact_options(cls) -> Mapping[str, object]:
        return {"max-norm": 100.0}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return BAD_OPTIONS


def _mechanism(max_norm: float):
    wrapped = _clip()(StrategyParts(name="plain", server=None), StrategyConfig(3, 3, 1, 0, {"max-norm": max_norm}))
    assert wrapped.name == "example-clip(plain)"
    return wrapped.mechanism("example-clip")


def test_an_update_above_the_bound_is_scaled_onto_it_and_integers_pass() -> None:
    old = {"w": torch.zeros(2), "b": torch.ones(1, dtype=torch.float64), "n": torch.tensor(3)}
    new = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([5.0], dtype=torch.float64), "n": torch.tensor(4)}
    out = _mechanism(1.0).transform_update(new, old, INFO)  # Δ = (3, 0, 4): norm 5, scale 1/5
    torch.testing.assert_close(out["w"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([1.8], dtype=torch.float64))
    assert out["w"].dtype == torch.float32 and out["n"].item() == 4


def test_an_update_within_the_bound_is_sent_as_it_is() -> None:
    old, new = {"w": torch.zeros(2)}, {"w": torch.tensor([0.3, 0.4])}  # norm 0.5
    assert _mechanism(0.6).transform_update(new, old, INFO) is new


def test_wrapping_a_strategy_that_already_clips_is_refused() -> None:
    once = _clip()(StrategyParts(name="plain", server=None), StrategyConfig(3, 3, 1, 0))
    with pytest.raises(IncompatibleError, match=r"example-clip cannot wrap 'example-clip\(plain\)': it already clips"):
        _clip()(once, StrategyConfig(3, 3, 1, 0))


def test_an_unknown_option_names_the_known_one() -> None:
    with pytest.raises(OptionError, match=r"example-clip privacy has no option 'norm' \(did you mean 'max-norm'\?\)"):
        _clip()(StrategyParts(name="plain", server=None), StrategyConfig(3, 3, 1, 0, {"norm": 1.0}))
