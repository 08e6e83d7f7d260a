"""pchmr's dataset contract suite on ``example-turntable`` (on the suite's toy body and on our own
``example-ellipsoid``), plus a few checks of our own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from pchmr.api import BodyModel, BodyModelSpec, DatasetSpec, OptionError
from pchmr.testing import DatasetContract, ToyBodyModel, registered
from pchmr.testing.datasets import DatasetMaker

BAD_SPECS = {
    "no training sample": ({"num_train": 0}, r"needs at least one train and one test sample, got 0 and 4"),
    "an unknown option": (
        {"options": {"colour": "red"}},
        r"example-turntable dataset has no option 'colour'; its options are: max_yaw_deg",
    ),
    "a yaw beyond a half turn": (
        {"options": {"max_yaw_deg": 270}},
        r"option 'max_yaw_deg' must be a number in \[0, 180\], got 270",
    ),
}


def _turntable() -> DatasetMaker:
    return registered("dataset", "example-turntable")


class TestTurntable(DatasetContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_dataset(cls) -> DatasetMaker:
        return _turntable()

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return BAD_SPECS


class TestTurntableOfTheEllipsoid(TestTurntable):
    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        return registered("body_model", "example-ellipsoid")(BodyModelSpec())


def test_no_yaw_shows_every_body_from_the_front(tmp_path: Path) -> None:
    body = ToyBodyModel()
    spec = DatasetSpec(image_size=32, seed=0, cache_dir=tmp_path, num_train=4, num_test=1, options={"max_yaw_deg": 0})
    data = _turntable()(spec, body)
    names = body.joint_names
    for i in range(len(data.train)):
        joints = data.train[i]["joints_3d"]
        # camera frame, body facing the camera: its left hip is on the image's right (x > 0)
        assert joints[names.index("left_hip"), 0] > 0 > joints[names.index("right_hip"), 0]


def test_a_yaw_that_is_not_a_number_is_an_option_error(tmp_path: Path) -> None:
    spec = DatasetSpec(image_size=32, seed=0, cache_dir=tmp_path, options={"max_yaw_deg": "lots"})
    with pytest.raises(OptionError, match=r"option 'max_yaw_deg' must be a number in \[0, 180\], got 'lots'"):
        _turntable()(spec, ToyBodyModel())
