"""Contract suites for keypoint-source and depth-source plugins (:mod:`pchmr.core.contracts.annotation`).

Both kinds register a factory ``factory(**options) -> source``. Subclass the suite and override
``make_source`` (the factory) and the inputs the source can serve::

    import pytest
    from pchmr.api import AnnotationItem
    from pchmr.testing import KeypointSourceContract, registered

    class TestMyDetector(KeypointSourceContract):
        @pytest.fixture(scope="class")
        @classmethod
        def make_source(cls):
            return registered("keypoint_source", "my-detector")

        @pytest.fixture(scope="class")
        @classmethod
        def items(cls, tmp_path_factory):
            return [AnnotationItem("img0", image=...), AnnotationItem("img1", image=...)]

:class:`KeypointSourceContract` fixtures: ``make_source``, ``options`` (``{}``), ``items`` (the
:class:`~pchmr.core.contracts.annotation.AnnotationItem` s it serves, pixels loaded, a person in
each), ``joint_names`` (LSP-14), ``bad_items`` (``{description: (item, regex)}``: items it cannot
serve), ``bad_options`` (``{description: (options, regex)}``), ``known_gaps``.

:class:`DepthSourceContract` fixtures: ``make_source``, ``options``, ``cases`` (``(item, keypoints
(J, 3) pixels)`` pairs it serves), ``bad_cases`` (``{description: (item, keypoints, regex)}``),
``bad_options``, ``known_gaps``.

An item a source cannot serve raises :class:`~pchmr.core.contracts.annotation.AnnotationInputError`
(``NoPersonError``, ``KeypointLayoutError``, ``CountMismatchError``, ``DepthError``) naming the
image: the pipeline records it and annotates the other images. Bad options raise ``ValueError``
or ``TypeError`` (Python's own, for an unknown keyword) naming the option, or ``OSError`` for a
path that is not there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from pchmr.core.contracts.annotation import (
    DEPTH_INVARIANCES,
    AnnotationInputError,
    AnnotationItem,
    DepthObservation,
    DepthSource,
    KeypointObservation,
    KeypointSource,
)
from pchmr.testing.suite import ContractSuite, raises_matching
from pchmr.testing.toys import TOY_JOINT_NAMES

__all__ = ["DepthCase", "DepthSourceContract", "KeypointSourceContract", "SourceFactory"]

SourceFactory = Callable[..., Any]
DepthCase = tuple[AnnotationItem, np.ndarray]

#: An option key no source takes (a valid Python identifier: factories take ``**options``).
UNKNOWN_OPTION = "contract_unknown_option"
#: Confident keypoints lie within the image, give or take this fraction of its size.
IMAGE_MARGIN = 0.25
#: Pixel keypoints of a person span more than this many pixels (crop coordinates span ≤ 2).
MIN_PIXEL_SPREAD = 2.0
#: Metric depths lie within this range (metres).
METRIC_RANGE_M = (0.1, 100.0)


def _check_options(make_source: SourceFactory, bad_options: Mapping[str, tuple[Mapping[str, object], str]]) -> None:
    if not bad_options:
        pytest.skip("no bad_options given")
    for description, (options, pattern) in bad_options.items():
        raises_matching(lambda options=options: make_source(**options), (ValueError, TypeError, OSError), pattern,
                        f"{description} ({dict(options)})")  # fmt: skip


class _SourceSuite(ContractSuite):
    """Fixtures both source suites share."""

    @pytest.fixture(scope="class")
    @classmethod
    def make_source(cls) -> SourceFactory:
        raise NotImplementedError("override the make_source fixture: the registered factory(**options) -> source")

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls) -> Mapping[str, object]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def source(cls, make_source: SourceFactory, options: Mapping[str, object]) -> Any:
        return make_source(**options)


class KeypointSourceContract(_SourceSuite):
    """Checks every keypoint-source plugin must pass; see the module docstring for the fixtures."""

    @pytest.fixture(scope="class")
    @classmethod
    def items(cls) -> Sequence[AnnotationItem]:
        raise NotImplementedError("override the items fixture: AnnotationItems (pixels loaded) the source serves")

    @pytest.fixture(scope="class")
    @classmethod
    def joint_names(cls) -> tuple[str, ...]:
        return TOY_JOINT_NAMES

    @pytest.fixture(scope="class")
    @classmethod
    def bad_items(cls) -> Mapping[str, tuple[AnnotationItem, str]]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def observations(
        cls, source: KeypointSource, items: Sequence[AnnotationItem], joint_names: tuple[str, ...]
    ) -> list[KeypointObservation]:
        """The source's observation of every item, in order, computed once per class."""
        return [source(item, joint_names) for item in items]

    # -- checks ---------------------------------------------------------------------------
    def test_is_a_keypoint_source(self, source: KeypointSource) -> None:
        """The factory returns a KeypointSource: a callable ``(item, joint_names)``."""
        assert isinstance(source, KeypointSource), f"{type(source).__name__} is not callable"

    def test_observation_shapes_and_dtypes(
        self, observations: list[KeypointObservation], joint_names: tuple[str, ...]
    ) -> None:
        """A KeypointObservation per item: keypoints (J, 3) float32 in the requested joint order;
        intrinsics None or (3,) float32."""
        for item, obs in enumerate(observations):
            assert isinstance(obs, KeypointObservation), (
                f"item {item}: got {type(obs).__name__}, not KeypointObservation"
            )
            assert isinstance(obs.keypoints, np.ndarray) and obs.keypoints.dtype == np.float32, (
                f"item {item}: keypoints must be a float32 numpy array"
            )
            assert obs.keypoints.shape == (len(joint_names), 3), f"item {item}: keypoints {obs.keypoints.shape}"
            if obs.intrinsics is not None:
                assert isinstance(obs.intrinsics, np.ndarray) and obs.intrinsics.dtype == np.float32, (
                    f"item {item}: intrinsics must be None or a float32 numpy array"
                )
                assert obs.intrinsics.shape == (3,), f"item {item}: intrinsics {obs.intrinsics.shape}, expected (3,)"

    def test_keypoints_are_image_pixels(
        self, observations: list[KeypointObservation], items: Sequence[AnnotationItem]
    ) -> None:
        """Confidences lie in [0, 1]; confident keypoints are finite, inside the image (±25 %)
        and spread over more than 2 pixels: image pixels, not crop coordinates."""
        for k, (item, obs) in enumerate(zip(items, observations)):
            h, w = item.size
            conf = obs.keypoints[:, 2]
            assert ((conf >= 0) & (conf <= 1)).all(), f"item {k} ({item.image_id}): confidences outside [0, 1]"
            points = obs.keypoints[conf > 0, :2]
            assert len(points), f"item {k} ({item.image_id}): no confident keypoint"
            assert np.isfinite(points).all(), f"item {k} ({item.image_id}): confident keypoints are not finite"
            low, high = -IMAGE_MARGIN * np.array([w, h]), (1 + IMAGE_MARGIN) * np.array([w, h])
            assert ((points >= low) & (points <= high)).all(), (
                f"item {k} ({item.image_id}): keypoints span {points.min(0)}..{points.max(0)}, outside the "
                f"{w}x{h} image"
            )
            spread = float((points.max(0) - points.min(0)).max())
            assert spread > MIN_PIXEL_SPREAD, f"item {k} ({item.image_id}): keypoints span {spread:.3g}: pixels?"

    def test_intrinsics_are_pixels_of_the_image(
        self, observations: list[KeypointObservation], items: Sequence[AnnotationItem]
    ) -> None:
        """Intrinsics, when known: a positive focal length and a principal point inside the image."""
        for k, (item, obs) in enumerate(zip(items, observations)):
            if obs.intrinsics is None:
                continue
            h, w = item.size
            focal, u0, v0 = (float(v) for v in obs.intrinsics)
            assert focal > 0, f"item {k} ({item.image_id}): focal length {focal}"
            assert 0 <= u0 <= w and 0 <= v0 <= h, f"item {k} ({item.image_id}): principal point ({u0}, {v0})"

    def test_people_stand_upright_in_image_coordinates(
        self, observations: list[KeypointObservation], joint_names: tuple[str, ...]
    ) -> None:
        """Image y points down: in most items the head's y is smaller than the ankles'."""
        names = list(joint_names)
        if not {"head", "left_ankle", "right_ankle"} <= set(names):
            pytest.skip("the joint set has no head and ankles")
        head, ankles = names.index("head"), [names.index("left_ankle"), names.index("right_ankle")]
        votes = [
            float(obs.keypoints[head, 1]) < float(obs.keypoints[ankles, 1].mean())
            for obs in observations
            if obs.keypoints[head, 2] > 0 and (obs.keypoints[ankles, 2] > 0).all()
        ]
        if not votes:
            pytest.skip("no item has a confident head and confident ankles")
        assert sum(votes) > len(votes) / 2, (
            f"the head is below the ankles in {votes.count(False)} of {len(votes)} items"
        )

    def test_is_deterministic_and_independent_of_call_order(
        self, source: KeypointSource, items: Sequence[AnnotationItem], joint_names: tuple[str, ...],
        observations: list[KeypointObservation],
    ) -> None:  # fmt: skip
        """Serving the items again, in reverse order, gives identical observations."""
        for k in reversed(range(len(items))):
            again = source(items[k], joint_names)
            np.testing.assert_array_equal(again.keypoints, observations[k].keypoints, err_msg=f"item {k} keypoints")
            if observations[k].intrinsics is None:
                assert again.intrinsics is None, f"item {k}: intrinsics appeared the second time"
            else:
                np.testing.assert_array_equal(again.intrinsics, observations[k].intrinsics, err_msg=f"item {k}")

    def test_rejects_unservable_items_naming_the_image(
        self, source: KeypointSource, joint_names: tuple[str, ...], bad_items: Mapping[str, tuple[AnnotationItem, str]]
    ) -> None:
        """Every ``bad_items`` entry raises an AnnotationInputError whose message names the image
        and matches its regex."""
        if not bad_items:
            pytest.skip("no bad_items given")
        for description, (item, pattern) in bad_items.items():
            error = raises_matching(lambda item=item: source(item, joint_names), AnnotationInputError, pattern,
                                    f"{description} (image {item.image_id})")  # fmt: skip
            assert item.image_id in str(error), f"{description}: the message {str(error)!r} does not name the image"

    def test_rejects_an_unknown_option(self, make_source: SourceFactory, options: Mapping[str, object]) -> None:
        """An unknown option (beside the valid ``options``) raises ValueError or TypeError naming it."""
        bad = {**options, UNKNOWN_OPTION: 1}
        raises_matching(
            lambda: make_source(**bad), (ValueError, TypeError), UNKNOWN_OPTION, f"option {UNKNOWN_OPTION}=1"
        )

    def test_rejects_bad_options(
        self, make_source: SourceFactory, bad_options: Mapping[str, tuple[Mapping[str, object], str]]
    ) -> None:
        """Every ``bad_options`` entry raises ValueError, TypeError or OSError matching its regex."""
        _check_options(make_source, bad_options)


class DepthSourceContract(_SourceSuite):
    """Checks every depth-source plugin must pass; see the module docstring for the fixtures."""

    @pytest.fixture(scope="class")
    @classmethod
    def cases(cls) -> Sequence[DepthCase]:
        raise NotImplementedError("override the cases fixture: (AnnotationItem, (J, 3) pixel keypoints) pairs")

    @pytest.fixture(scope="class")
    @classmethod
    def bad_cases(cls) -> Mapping[str, tuple[AnnotationItem, np.ndarray, str]]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def observations(cls, source: DepthSource, cases: Sequence[DepthCase]) -> list[DepthObservation]:
        """The source's observation of every case, in order, computed once per class."""
        return [source(item, keypoints) for item, keypoints in cases]

    # -- checks ---------------------------------------------------------------------------
    def test_is_a_depth_source(self, source: DepthSource) -> None:
        """The factory returns a DepthSource: a callable ``(item, keypoints)``."""
        assert isinstance(source, DepthSource), f"{type(source).__name__} is not callable"

    def test_observation_shapes_and_dtypes(
        self, observations: list[DepthObservation], cases: Sequence[DepthCase]
    ) -> None:
        """A DepthObservation per case: depth and valid (J,) float32, valid in {0, 1}, an
        invariance of DEPTH_INVARIANCES."""
        for k, ((_, keypoints), obs) in enumerate(zip(cases, observations)):
            assert isinstance(obs, DepthObservation), f"case {k}: got {type(obs).__name__}, not DepthObservation"
            for name in ("depth", "valid"):
                value = getattr(obs, name)
                assert isinstance(value, np.ndarray) and value.dtype == np.float32, f"case {k}: {name} must be float32"
                assert value.shape == (len(keypoints),), f"case {k}: {name} {value.shape}, expected ({len(keypoints)},)"
            assert set(np.unique(obs.valid).tolist()) <= {0.0, 1.0}, f"case {k}: valid must be 0 or 1"
            assert obs.invariance in DEPTH_INVARIANCES, f"case {k}: invariance {obs.invariance!r}"

    def test_valid_depths_are_positive_and_finite(self, observations: list[DepthObservation]) -> None:
        """Every valid depth is finite and positive, and some depth is valid."""
        for k, obs in enumerate(observations):
            good = obs.depth[obs.valid > 0]
            assert len(good), f"case {k}: no valid depth"
            assert np.isfinite(good).all() and (good > 0).all(), f"case {k}: valid depths {good.tolist()}"

    def test_unconfident_keypoints_get_no_valid_depth(self, source: DepthSource, cases: Sequence[DepthCase]) -> None:
        """A keypoint of confidence 0 (missing) never has a valid depth."""
        for k, (item, keypoints) in enumerate(cases):
            hidden = np.array(keypoints, dtype=np.float32, copy=True)
            hidden[0, 2] = 0.0
            assert source(item, hidden).valid[0] == 0.0, f"case {k}: a missing keypoint got a valid depth"

    def test_metric_depths_are_metres(self, observations: list[DepthObservation]) -> None:
        """Depths declared ``metric`` lie within 0.1-100 m (``scale``/``affine`` ones are relative)."""
        metric = [obs for obs in observations if obs.invariance == "metric"]
        if not metric:
            pytest.skip("no case declares metric depth")
        low, high = METRIC_RANGE_M
        for obs in metric:
            good = obs.depth[obs.valid > 0]
            assert ((good >= low) & (good <= high)).all(), f"metric depths {good.tolist()} outside [{low}, {high}] m"

    def test_is_deterministic_and_independent_of_call_order(
        self, source: DepthSource, cases: Sequence[DepthCase], observations: list[DepthObservation]
    ) -> None:
        """Serving the cases again, in reverse order, gives identical observations."""
        for k in reversed(range(len(cases))):
            again = source(*cases[k])
            np.testing.assert_array_equal(again.depth, observations[k].depth, err_msg=f"case {k} depth")
            np.testing.assert_array_equal(again.valid, observations[k].valid, err_msg=f"case {k} valid")
            assert again.invariance == observations[k].invariance

    def test_rejects_unservable_cases_naming_the_image(
        self, source: DepthSource, bad_cases: Mapping[str, tuple[AnnotationItem, np.ndarray, str]]
    ) -> None:
        """Every ``bad_cases`` entry raises an AnnotationInputError (DepthError) whose message
        names the image and matches its regex."""
        if not bad_cases:
            pytest.skip("no bad_cases given")
        for description, (item, keypoints, pattern) in bad_cases.items():
            error = raises_matching(lambda item=item, kp=keypoints: source(item, kp), AnnotationInputError, pattern,
                                    f"{description} (image {item.image_id})")  # fmt: skip
            assert item.image_id in str(error), f"{description}: the message {str(error)!r} does not name the image"

    def test_rejects_an_unknown_option(self, make_source: SourceFactory, options: Mapping[str, object]) -> None:
        """An unknown option (beside the valid ``options``) raises ValueError or TypeError naming it."""
        bad = {**options, UNKNOWN_OPTION: 1}
        raises_matching(
            lambda: make_source(**bad), (ValueError, TypeError), UNKNOWN_OPTION, f"option {UNKNOWN_OPTION}=1"
        )

    def test_rejects_bad_options(
        self, make_source: SourceFactory, bad_options: Mapping[str, tuple[Mapping[str, object], str]]
    ) -> None:
        """Every ``bad_options`` entry raises ValueError, TypeError or OSError matching its regex."""
        _check_options(make_source, bad_options)
