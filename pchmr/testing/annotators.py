"""Contract suite for annotator plugins (:class:`~pchmr.core.contracts.annotation.AnnotatorFactory`).

Subclass :class:`AnnotatorContract` and override the ``annotator_factory`` fixture (the factory
``(body_model, options) -> Annotator`` a plugin registers)::

    import pytest
    from pchmr.testing import AnnotatorContract, registered

    class TestMyAnnotator(AnnotatorContract):
        @pytest.fixture(scope="class")
        @classmethod
        def annotator_factory(cls):
            return registered("annotator", "my-annotator")

The checks fit :func:`contract_observations`: the body model's rest pose (``rest_params``) seen by
a pinhole camera, noise-free, one keypoint of the second image unconfident and misplaced. Other
fixtures to override (class-scoped, written as classmethods like the above):

* ``body_model`` — what the annotator fits (default :class:`~pchmr.testing.toys.ToyBodyModel`);
* ``rest_params`` — ``batch_size -> params`` of the observed body (default: zeros);
* ``options`` — the annotator's options (default ``{}``; small iteration budgets keep the suite fast);
* ``bad_options`` — ``{description: (options, regex)}``: each must raise ``ValueError`` whose
  message matches ``regex``;
* capability flags: ``uses_depth`` (False: the fit ignores depth; True: it reads it),
  ``max_reprojection_px`` (10: the fit's mean reprojection error on these noise-free
  observations, pixels of a 224-pixel crop), ``batch_tolerance_m`` (0.001: how far an image's
  fit alone may lie from its fit inside the batch, mean over joints, metres);
* ``known_gaps`` — ``{check name: reason}``: those checks run as ``xfail`` with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from pchmr.core.contracts.annotation import (
    Annotator,
    AnnotatorFactory,
    DeviceAnnotator,
    FitResult,
    ObservationBatch,
)
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.testing.bodymodels import RestParams, zero_params
from pchmr.testing.suite import ContractSuite, raises_matching
from pchmr.testing.toys import ToyBodyModel, axis_angle_to_matrix, body_to_camera

__all__ = ["CONTRACT_FOCAL", "PX_PER_CROP_UNIT", "AnnotatorContract", "contract_observations", "reprojection_px"]

#: Focal length of the contract camera, crop units (a 1.7 m body 4-5 m away spans ±0.6-0.75).
CONTRACT_FOCAL = 3.5
#: Per image: yaw (radians) about the body's vertical axis, camera distance (metres), sideways shift (metres).
CONTRACT_YAWS = (0.0, 0.4)
CONTRACT_DEPTHS_M = (4.0, 5.0)
CONTRACT_SHIFTS_M = (0.1, -0.2)
#: The depth the contract's depth "source" reports is the true depth times this (unknown to the fit).
CONTRACT_DEPTH_SCALE = 0.5
#: Image 1's keypoint 0 is unconfident and moved by this (crop units): a fit must ignore it.
MISPLACED_OFFSET = 0.5
#: Crop units → pixels of a 224-pixel crop, the scale of ``FitResult.losses['reprojection_px']``.
PX_PER_CROP_UNIT = 112.0
#: The reported ``reprojection_px`` may differ from the suite's own measurement by this (pixels) …
REPORTED_PX_ATOL = 0.5
#: … or by this fraction of it.
REPORTED_PX_RTOL = 0.05
#: Joints regressed from the result's vertices, and its root, must match within this (metres).
RESULT_ATOL_M = 1e-4
#: A seed for the depth scramble of the depth check.
CONTRACT_SEED = 0
UNKNOWN_OPTION = "contract_unknown_option"


def contract_observations(body_model: BodyModel, rest_params: RestParams | None = None) -> ObservationBatch:
    """Two noise-free observations of ``body_model`` at rest (``rest_params``, default zeros):
    image i turned by :data:`CONTRACT_YAWS` [i], :data:`CONTRACT_DEPTHS_M` [i] metres in front of
    the camera and shifted sideways, projected with focal :data:`CONTRACT_FOCAL` (principal point
    0); depth :data:`CONTRACT_DEPTH_SCALE` × the true depth, ``scale`` invariance. Image 1's first
    keypoint has confidence 0 (and no valid depth) and is moved by :data:`MISPLACED_OFFSET`."""
    params = (rest_params or zero_params(body_model))(len(CONTRACT_YAWS))
    with torch.no_grad():
        joints = body_model(**params).joints.float()
    joints = joints - body_model.root(joints)
    b, j = joints.shape[:2]
    yaw = torch.tensor(CONTRACT_YAWS)
    turn = axis_angle_to_matrix(torch.stack((torch.zeros(b), yaw, torch.zeros(b)), dim=1))
    offset = torch.stack((torch.tensor(CONTRACT_SHIFTS_M), torch.zeros(b), torch.tensor(CONTRACT_DEPTHS_M)), dim=1)
    camera = body_to_camera(joints @ turn.transpose(1, 2)) + offset[:, None]
    uv = CONTRACT_FOCAL * camera[..., :2] / camera[..., 2:]
    confidence = torch.ones(b, j, 1)
    confidence[1, 0] = 0.0
    uv[1, 0] += MISPLACED_OFFSET
    valid = confidence[..., 0].clone()
    return ObservationBatch(
        image_ids=tuple(f"contract-{i}" for i in range(b)),
        keypoints=torch.cat((uv, confidence), dim=-1),
        intrinsics=torch.tensor([[CONTRACT_FOCAL, 0.0, 0.0]]).repeat(b, 1),
        depth=CONTRACT_DEPTH_SCALE * camera[..., 2] * valid,
        depth_valid=valid,
        depth_invariance="scale",
    )


def reprojection_px(result: FitResult, batch: ObservationBatch) -> Tensor:
    """(B,) mean distance between the fit's joints (at ``translation``, projected with the
    batch's intrinsics) and the confident keypoints, pixels of a 224-pixel crop."""
    points = result.joints + result.translation[:, None]
    f, c = batch.intrinsics[:, :1, None], batch.intrinsics[:, None, 1:]
    uv = f * points[..., :2] / points[..., 2:].clamp_min(1e-6) + c
    error = (uv - batch.keypoints[..., :2]).norm(dim=-1) * PX_PER_CROP_UNIT
    confident = (batch.keypoints[..., 2] > 0).float()
    return (error * confident).sum(dim=-1) / confident.sum(dim=-1).clamp_min(1.0)


def _mean_distance(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm(dim=-1).mean())


class AnnotatorContract(ContractSuite):
    """Checks every annotator plugin must pass; see the module docstring for the fixtures."""

    # -- fixtures to override -------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def annotator_factory(cls) -> AnnotatorFactory:
        raise NotImplementedError("override the annotator_factory fixture: (body_model, options) -> Annotator")

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        return ToyBodyModel()

    @pytest.fixture(scope="class")
    @classmethod
    def rest_params(cls, body_model: BodyModel) -> RestParams:
        return zero_params(body_model)

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
    def uses_depth(cls) -> bool:
        return False

    @pytest.fixture(scope="class")
    @classmethod
    def max_reprojection_px(cls) -> float:
        return 10.0

    @pytest.fixture(scope="class")
    @classmethod
    def batch_tolerance_m(cls) -> float:
        return 1e-3

    # -- plumbing -------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def annotator(
        cls, annotator_factory: AnnotatorFactory, body_model: BodyModel, options: Mapping[str, object]
    ) -> Annotator:
        return annotator_factory(body_model, dict(options))

    @pytest.fixture(scope="class")
    @classmethod
    def observations(cls, body_model: BodyModel, rest_params: RestParams) -> ObservationBatch:
        return contract_observations(body_model, rest_params)

    @pytest.fixture(scope="class")
    @classmethod
    def result(cls, annotator: Annotator, observations: ObservationBatch) -> FitResult:
        """The fit of :func:`contract_observations`, computed once per class."""
        return annotator.fit(observations)

    # -- checks: the annotator ------------------------------------------------------------
    def test_is_an_annotator(self, annotator: Annotator) -> None:
        """The factory returns an Annotator (``name``, ``fit``, ``describe``) with a non-empty name."""
        assert isinstance(annotator, Annotator), f"{type(annotator).__name__} lacks name, fit or describe"
        assert isinstance(annotator.name, str) and annotator.name, "name must be a non-empty str (the plugin name)"

    def test_describe_is_json_and_names_the_annotator(self, annotator: Annotator) -> None:
        """``describe()`` is JSON-able (written into ``info.json``) with ``annotator`` = ``name``."""
        info = annotator.describe()
        json.dumps(info)
        assert info.get("annotator") == annotator.name, f"describe()['annotator'] is {info.get('annotator')!r}"

    # -- checks: the fit ------------------------------------------------------------------
    def test_fit_result_shapes_and_dtypes(
        self, result: FitResult, observations: ObservationBatch, body_model: BodyModel
    ) -> None:
        """A FitResult of float32 vertices (B, V, 3), joints (B, J, 3), translation (B, 3);
        every ``params`` entry (B, ...); ``losses`` (B,) each, ``total`` and ``reprojection_px`` among them."""
        assert isinstance(result, FitResult), f"fit returned {type(result).__name__}, not FitResult"
        b = len(observations)
        for name, tensor, shape in (
            ("vertices", result.vertices, (b, body_model.num_vertices, 3)),
            ("joints", result.joints, (b, body_model.num_joints, 3)),
            ("translation", result.translation, (b, 3)),
        ):
            assert tuple(tensor.shape) == shape, f"{name} {tuple(tensor.shape)}, expected {shape}"
            assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype}, expected float32"
        for name, value in result.params.items():
            assert isinstance(value, Tensor) and value.shape[:1] == (b,), f"params[{name!r}] must be (B, ...)"
        missing = {"total", "reprojection_px"} - set(result.losses)
        assert not missing, f"losses lacks {sorted(missing)}"
        for name, value in result.losses.items():
            assert isinstance(value, Tensor) and tuple(value.shape) == (b,), f"losses[{name!r}] must be ({b},)"

    def test_outputs_are_finite_root_relative_metres(self, result: FitResult, body_model: BodyModel) -> None:
        """Everything is finite; joints are regressed from the vertices and root-relative (the
        body model's root at the origin); the fitted body is 0.5-2.5 m tall: metres."""
        for name in ("vertices", "joints", "translation"):
            assert torch.isfinite(getattr(result, name)).all(), f"{name} has NaN or infinite values"
        for name, value in result.losses.items():
            assert torch.isfinite(value).all(), f"losses[{name!r}] is not finite: {value.tolist()}"
        regressed = body_model.joints_from_vertices(result.vertices)
        torch.testing.assert_close(result.joints, regressed, rtol=0.0, atol=RESULT_ATOL_M,
                                   msg=lambda m: f"joints are not regressed from the vertices: {m}")  # fmt: skip
        root = body_model.root(result.joints)
        assert float(root.abs().max()) < RESULT_ATOL_M, f"the joints' root is at {root[:, 0].tolist()}, not 0"
        extent = (result.vertices.amax(dim=1) - result.vertices.amin(dim=1)).amax(dim=-1)
        assert ((extent > 0.5) & (extent < 2.5)).all(), f"fitted bodies span {extent.tolist()}: not metres"

    def test_translation_puts_the_body_in_front_of_the_camera(self, result: FitResult) -> None:
        """``translation`` z > 0: the root lies in front of the camera (camera frame, z forward)."""
        z = result.translation[:, 2]
        assert (z > 0).all(), f"root depths {z.tolist()}: the camera frame's z points forward, into the scene"

    def test_fit_reprojects_onto_the_confident_keypoints(
        self, result: FitResult, observations: ObservationBatch, max_reprojection_px: float
    ) -> None:
        """The fitted joints at ``translation``, projected with the intrinsics, land on the
        confident keypoints (mean error ≤ ``max_reprojection_px``; the misplaced unconfident
        keypoint is ignored), and ``losses['reprojection_px']`` reports that error."""
        measured = reprojection_px(result, observations)
        assert (measured <= max_reprojection_px).all(), (
            f"mean reprojection errors {measured.tolist()} px (224-pixel crop) exceed {max_reprojection_px}: "
            "joints, translation and intrinsics must agree (camera frame x right, y down, z forward)"
        )
        reported = result.losses["reprojection_px"]
        torch.testing.assert_close(reported.float(), measured, atol=REPORTED_PX_ATOL, rtol=REPORTED_PX_RTOL,
                                   msg=lambda m: f"losses['reprojection_px'] is not the mean error measured here: {m}")  # fmt: skip

    def test_fitted_bodies_stand_upright_in_the_camera_frame(self, result: FitResult, body_model: BodyModel) -> None:
        """Camera frame, y down: the fitted head is above (smaller y than) the ankles."""
        names = list(body_model.joint_names)
        if not {"head", "left_ankle", "right_ankle"} <= set(names):
            pytest.skip("the joint set has no head and ankles")
        head = result.joints[:, names.index("head"), 1]
        ankles = result.joints[:, [names.index("left_ankle"), names.index("right_ankle")], 1].mean(dim=1)
        assert (head < ankles).all(), f"head y {head.tolist()} vs ankles y {ankles.tolist()}: y points down"

    def test_fit_is_deterministic(
        self, annotator: Annotator, observations: ObservationBatch, result: FitResult
    ) -> None:
        """Fitting the same batch again gives the same result (up to float32 round-off)."""
        again = annotator.fit(observations)
        for name in ("vertices", "joints", "translation"):
            torch.testing.assert_close(getattr(again, name), getattr(result, name), rtol=1e-6, atol=1e-6,
                                       msg=lambda m, name=name: f"{name} differs between two fits: {m}")  # fmt: skip

    def test_images_are_fitted_independently(
        self, annotator: Annotator, observations: ObservationBatch, result: FitResult, batch_tolerance_m: float
    ) -> None:
        """Image i fitted alone lies within ``batch_tolerance_m`` (joints, mean, and translation)
        of its fit inside the batch."""
        for i in range(len(observations)):
            alone = annotator.fit(observations.select([i]))
            joints = _mean_distance(alone.joints[0], result.joints[i])
            translation = float((alone.translation[0] - result.translation[i]).norm())
            assert joints <= batch_tolerance_m and translation <= batch_tolerance_m, (
                f"image {i} alone vs in a batch of {len(observations)}: joints {joints:.3g} m, translation "
                f"{translation:.3g} m apart (limit {batch_tolerance_m} m)"
            )

    def test_depth_is_used_only_when_declared(
        self, annotator: Annotator, observations: ObservationBatch, result: FitResult, uses_depth: bool
    ) -> None:
        """With the depth values scrambled (validity kept), an annotator that does not use depth
        (``uses_depth`` False) gives the same fit, one that does gives another."""
        noise = torch.rand(observations.depth.shape, generator=torch.Generator().manual_seed(CONTRACT_SEED))
        scrambled = ObservationBatch(
            image_ids=observations.image_ids, keypoints=observations.keypoints, intrinsics=observations.intrinsics,
            depth=observations.depth * (0.5 + 2.0 * noise), depth_valid=observations.depth_valid,
            depth_invariance=observations.depth_invariance,
        )  # fmt: skip
        other = annotator.fit(scrambled)
        distance = _mean_distance(other.joints, result.joints)
        if uses_depth:
            assert distance > 0.0, "scrambled depths gave the same fit: set uses_depth False if depth is ignored"
        else:
            assert distance < 1e-6, f"scrambled depths moved the joints {distance:.3g} m: set uses_depth True"

    def test_optional_to_device_fits_the_same_on_the_device_it_was_moved_to(
        self, annotator: Annotator, observations: ObservationBatch, result: FitResult
    ) -> None:
        """An annotator with the optional DeviceAnnotator capability (``to_device``), moved to the
        CPU it was built on, fits as before and returns its tensors there: the move a GPU run makes
        (``pchmr annotate --accelerator gpu``), checked where every machine can."""
        if not isinstance(annotator, DeviceAnnotator):
            return
        cpu = observations.keypoints.device
        annotator.to_device(cpu)
        moved = annotator.fit(observations.to(cpu))
        for name in ("vertices", "joints", "translation"):
            assert getattr(moved, name).device == cpu, f"{name} came back on {getattr(moved, name).device}"
            torch.testing.assert_close(getattr(moved, name), getattr(result, name), rtol=1e-6, atol=1e-6,
                                       msg=lambda m, name=name: f"{name} differs after to_device: {m}")  # fmt: skip

    # -- checks: bad options --------------------------------------------------------------
    def test_rejects_unknown_options(self, annotator_factory: AnnotatorFactory, body_model: BodyModel) -> None:
        """An unknown option key raises ValueError naming it."""
        raises_matching(lambda: annotator_factory(body_model, {UNKNOWN_OPTION: 1}), ValueError, UNKNOWN_OPTION,
                        f"option {UNKNOWN_OPTION}=1 (the message must name the unknown key)")  # fmt: skip

    def test_rejects_bad_options(
        self, annotator_factory: AnnotatorFactory, body_model: BodyModel,
        bad_options: Mapping[str, tuple[Mapping[str, object], str]],
    ) -> None:  # fmt: skip
        """Every ``bad_options`` entry raises ValueError whose message matches its regex."""
        if not bad_options:
            pytest.skip("no bad_options given")
        for description, (options, pattern) in bad_options.items():
            raises_matching(lambda options=options: annotator_factory(body_model, dict(options)), ValueError, pattern,
                            f"{description} ({dict(options)})")  # fmt: skip
