"""The annotator contract suite on the built-in annotators (smplifyx and deposer on SMPL from fake
files, deposer on Anny), and proof that the suite can fail."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from pchmr.core.contracts.annotation import AnnotatorFactory, FitResult, ObservationBatch
from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec
from pchmr.core.engine.registry import get_registry
from pchmr.testing import AnnotatorContract, ToyBodyModel, contract_observations, write_fake_smpl
from pchmr.testing.annotators import CONTRACT_DEPTHS_M, CONTRACT_SHIFTS_M, CONTRACT_YAWS, reprojection_px
from pchmr.testing.bodymodels import RestParams
from pchmr.testing.toys import axis_angle_to_matrix, body_to_camera

#: Small budgets (L-BFGS iterations scaled to 10 %, two orientation hypotheses) and the pose
#: prior that needs no file: the contract is about shapes, frames and units, not fit quality.
FAST = {"pose_prior": "l2", "iterations": 10, "orientations": 2, "camera_iterations": 10}
#: The fitting core's images share one L-BFGS line search: an image's fit moves with its batch-mates.
SHARED_LINE_SEARCH = (
    "the fitting core minimises the batch's summed energy with one L-BFGS line search "
    "(pchmr/plugins/annotators/fitting.py), so an image's fit depends on its batch-mates by millimetres "
    "to centimetres; per-image line searches would fix it"
)
BAD_OPTIONS = {
    "an unknown pose prior": ({"pose_prior": "vae"}, r"option 'pose_prior' must be one of gmm, limits, l2, got 'vae'"),
    "too many orientations": (
        {"orientations": 5, "pose_prior": "l2"},
        r"option 'orientations' must be an integer in \[1, 4\], got 5",
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin waiting for each
    other and the fits ran several times slower. These are contract checks, not a speed test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_every_registered_builtin_annotator_is_covered() -> None:
    builtins = {info.name for info in get_registry().infos("annotator") if info.distribution == "pchmr"}
    assert builtins == {"smplifyx", "deposer"}, f"add a contract test class for {builtins - {'smplifyx', 'deposer'}}"


class _BuiltinOnFakeSMPL(AnnotatorContract):
    name = ""

    @pytest.fixture(scope="class")
    @classmethod
    def annotator_factory(cls) -> AnnotatorFactory:
        return get_registry().get("annotator", cls.name)

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, pchmr_cache: str, tmp_path_factory: pytest.TempPathFactory) -> BodyModel:
        model_dir = tmp_path_factory.mktemp("fake-smpl")
        write_fake_smpl(model_dir)
        spec = BodyModelSpec(cache_dir=str(Path(pchmr_cache) / "pyramids"), model_dir=str(model_dir))
        return get_registry().get("body_model", "smpl")(spec)

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls) -> Mapping[str, object]:
        return FAST

    @pytest.fixture(scope="class")
    @classmethod
    def known_gaps(cls) -> Mapping[str, str]:
        return {"test_images_are_fitted_independently": SHARED_LINE_SEARCH}


class TestSmplifyx(_BuiltinOnFakeSMPL):
    name = "smplifyx"

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {**BAD_OPTIONS, "a depth term": ({"depth_weight": 1.0}, r"use the deposer annotator for a depth term")}


class TestDeposer(_BuiltinOnFakeSMPL):
    name = "deposer"

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {
            **BAD_OPTIONS,
            "a negative depth weight": (
                {"depth_weight": -1.0},
                r"option 'depth_weight' must be a number >= 0, got -1.0",
            ),
        }

    @pytest.fixture(scope="class")
    @classmethod
    def uses_depth(cls) -> bool:
        return True


class TestDeposerOnAnny(TestDeposer):
    """The default annotation setting (Anny), at rest with the middle phenotype (~4 s per fit)."""

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, pchmr_cache: str) -> BodyModel:
        return get_registry().get("body_model", "anny")(BodyModelSpec(cache_dir=str(Path(pchmr_cache) / "pyramids")))

    @pytest.fixture(scope="class")
    @classmethod
    def rest_params(cls) -> RestParams:
        return lambda b: {"pose": torch.zeros(b, 104, 3), "phenotype": torch.full((b, 6), 0.5)}


def test_builtin_annotators_refuse_a_body_model_they_have_no_adapter_for() -> None:
    with pytest.raises(ValueError, match=r"knows the body models 'anny' and 'smpl', not 'toy'"):
        get_registry().get("annotator", "smplifyx")(ToyBodyModel(), FAST)


# --------------------------------------------------------------------------------------
# The suite must be able to fail: an annotator breaking each clause is caught by its check.
# --------------------------------------------------------------------------------------
class _Oracle:
    """Returns the toy body at rest where the contract observations put it, with switchable flaws."""

    name = "oracle"

    def __init__(self, body: ToyBodyModel, flaw: str = "none") -> None:
        self.body, self.flaw = body, flaw
        self.moved = False

    def to_device(self, device: torch.device) -> None:
        self.moved = True

    def fit(self, batch: ObservationBatch) -> FitResult:
        index = [int(i.split("-")[1]) for i in batch.image_ids]
        b = len(index)
        with torch.no_grad():
            vertices = self.body(global_orient=torch.zeros(b, 3), betas=torch.zeros(b, 2)).vertices
        yaw = torch.tensor([CONTRACT_YAWS[i] for i in index])
        turn = axis_angle_to_matrix(torch.stack((torch.zeros(b), yaw, torch.zeros(b)), dim=1))
        vertices = body_to_camera(vertices @ turn.transpose(1, 2))
        if self.flaw == "body frame":
            vertices = vertices * torch.tensor([1.0, -1.0, -1.0])
        joints = self.body.joints_from_vertices(vertices)
        root = self.body.root(joints)
        translation = torch.tensor([[CONTRACT_SHIFTS_M[i], 0.0, CONTRACT_DEPTHS_M[i]] for i in index])
        if self.flaw == "millimetres":
            translation = translation * 1000.0
        if self.flaw == "batch-coupled":
            translation = translation + 0.01 * b
        if self.flaw == "moved differently" and self.moved:  # e.g. a constant left behind, another code path
            translation = translation + 0.01
        zeros = {"total": torch.zeros(b), "reprojection_px": torch.zeros(b)}
        result = FitResult(vertices=vertices - root, joints=joints - root, translation=translation, params={},
                           losses=zeros)  # fmt: skip
        losses = {"total": torch.zeros(b), "reprojection_px": reprojection_px(result, batch)}
        return FitResult(result.vertices, result.joints, result.translation, {}, losses)

    def describe(self) -> dict[str, object]:
        return {"annotator": self.name}


def _run(check: str, flaw: str) -> None:
    body = ToyBodyModel()
    annotator = _Oracle(body, flaw)
    observations = contract_observations(body)
    values = {
        "annotator": annotator, "observations": observations, "result": annotator.fit(observations),
        "body_model": body, "max_reprojection_px": 10.0, "batch_tolerance_m": 1e-3, "uses_depth": False,
    }  # fmt: skip
    method = getattr(AnnotatorContract(), check)
    method(**{name: values[name] for name in inspect.signature(method).parameters})


@pytest.mark.parametrize(
    ("flaw", "check", "message"),
    [
        ("body frame", "test_fitted_bodies_stand_upright_in_the_camera_frame", "y points down"),
        ("millimetres", "test_fit_reprojects_onto_the_confident_keypoints", r"exceed 10.0"),
        ("batch-coupled", "test_images_are_fitted_independently", r"image 0 alone vs in a batch of 2"),
        (
            "moved differently",
            "test_optional_to_device_fits_the_same_on_the_device_it_was_moved_to",
            r"translation differs after to_device",
        ),
    ],
)
def test_the_suite_catches_a_broken_annotator(flaw: str, check: str, message: str) -> None:
    _run(check, "none")  # the oracle passes the same check
    with pytest.raises(AssertionError, match=message):
        _run(check, flaw)
