"""pchmr's annotator contract suite on ``example-rest-fit`` (on the suite's toy body and on our
own ``example-ellipsoid``), plus a few checks of our own."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from pchmr.api import AnnotatorFactory, BodyModel, BodyModelSpec, ObservationBatch
from pchmr.testing import AnnotatorContract, ToyBodyModel, contract_observations, registered

BAD_OPTIONS = {
    "a zero depth floor": (
        {"min_depth_m": 0},
        r"example-rest-fit annotator option 'min_depth_m' must be a number > 0, got 0",
    ),
    "a depth floor that is not a number": (
        {"min_depth_m": "near"},
        r"option 'min_depth_m' must be a number > 0, got 'near'",
    ),
}


def _rest_fit() -> AnnotatorFactory:
    return registered("annotator", "example-rest-fit")


class TestRestFit(AnnotatorContract):
    @pytest.fixture(scope="class")
    @classmethod
    def annotator_factory(cls) -> AnnotatorFactory:
        return _rest_fit()

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return BAD_OPTIONS


class TestRestFitOfTheEllipsoid(TestRestFit):
    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        return registered("body_model", "example-ellipsoid")(BodyModelSpec())


def test_the_translation_of_an_unturned_body_is_exact() -> None:
    """contract_observations' first image is the rest body, unturned, at (0.1, 0, 4) metres."""
    body = ToyBodyModel()
    result = _rest_fit()(body, {}).fit(contract_observations(body))
    torch.testing.assert_close(result.translation[0], torch.tensor([0.1, 0.0, 4.0]), rtol=0.0, atol=1e-4)


def test_the_depth_floor_holds_for_a_body_seen_too_large() -> None:
    body = ToyBodyModel()
    batch = contract_observations(body)
    large = ObservationBatch(batch.image_ids, batch.keypoints * torch.tensor([20.0, 20.0, 1.0]), batch.intrinsics,
                             batch.depth, batch.depth_valid, batch.depth_invariance)  # fmt: skip
    result = _rest_fit()(body, {"min_depth_m": 1.0}).fit(large)
    assert (result.translation[:, 2] == 1.0).all()
