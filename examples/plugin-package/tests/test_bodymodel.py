"""pchmr's body-model contract suite on ``example-ellipsoid``, plus a few checks of our own."""

from __future__ import annotations

import pytest
import torch

from pchmr.api import BodyModel, BodyModelSpec
from pchmr.testing import BodyModelContract, registered


def _ellipsoid() -> BodyModel:
    return registered("body_model", "example-ellipsoid")(BodyModelSpec())


class TestEllipsoid(BodyModelContract):
    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        return _ellipsoid()


def test_scale_zero_is_1_7_m_tall_and_scale_grows_it_exponentially() -> None:
    body = _ellipsoid()
    heights = []
    for scale in (0.0, 0.1):
        vertices = body(global_orient=torch.zeros(1, 3), scale=torch.full((1, 1), scale)).vertices[0]
        heights.append(float(vertices[:, 1].max() - vertices[:, 1].min()))
    assert heights[0] == pytest.approx(1.7, abs=1e-5)
    assert heights[1] == pytest.approx(1.7 * float(torch.tensor(0.1).exp()), abs=1e-5)


def test_a_half_turn_about_y_swaps_left_and_right() -> None:
    body = _ellipsoid()
    names = body.joint_names
    turned = body(global_orient=torch.tensor([[0.0, torch.pi, 0.0]]), scale=torch.zeros(1, 1)).joints[0]
    assert turned[names.index("left_hip"), 0] < 0 < turned[names.index("right_hip"), 0]


def test_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"example-ellipsoid body model takes no options, got 'gender'"):
        registered("body_model", "example-ellipsoid")(BodyModelSpec(extra={"gender": "female"}))
