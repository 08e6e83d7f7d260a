"""The body-model contract suite on the built-in body models (Anny; SMPL from fake files, with and
without the Human3.6M regressor) and on the toy double, and proof that the suite can fail."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec, BodyOutput, MeshPyramid
from pchmr.core.engine.registry import get_registry
from pchmr.testing import BodyModelContract, ToyBodyModel, write_fake_h36m_regressor, write_fake_smpl
from pchmr.testing.bodymodels import ParamMaker, RestParams, default_params, zero_params

#: Anny's phenotype entries live in [0, 1]; 0.5 is the middle of every range.
ANNY_PHENOTYPE_CENTRE = 0.5


def test_every_registered_builtin_body_model_is_covered() -> None:
    builtins = {info.name for info in get_registry().infos("body_model") if info.distribution == "pchmr"}
    assert builtins == {"anny", "smpl"}, f"add a contract test class for {builtins - {'anny', 'smpl'}}"


class TestToyBodyModel(BodyModelContract):
    """The double the other suites default to passes the suite it stands in for."""

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        return ToyBodyModel()


class TestAnny(BodyModelContract):
    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, pchmr_cache: str) -> BodyModel:
        return get_registry().get("body_model", "anny")(BodyModelSpec(cache_dir=str(Path(pchmr_cache) / "pyramids")))

    @pytest.fixture(scope="class")
    @classmethod
    def make_params(cls, body_model: BodyModel) -> ParamMaker:
        """Small random bone rotations around the rest A-pose, phenotypes around 0.5."""
        random = default_params(body_model)

        def make(batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
            params = random(batch_size, generator)
            params["phenotype"] = params["phenotype"] + ANNY_PHENOTYPE_CENTRE
            return params

        return make

    @pytest.fixture(scope="class")
    @classmethod
    def rest_params(cls, body_model: BodyModel) -> RestParams:
        """The rest A-pose of the middle phenotype (zeros would be a new-born: age 0)."""
        zeros = zero_params(body_model)

        def rest(batch_size: int) -> dict[str, torch.Tensor]:
            params = zeros(batch_size)
            params["phenotype"] = params["phenotype"] + ANNY_PHENOTYPE_CENTRE
            return params

        return rest


@pytest.mark.parametrize("h36m_regressor", [False, True], ids=["smpl-joints", "h36m-joints"], scope="class")
class TestSMPL(BodyModelContract):
    """SMPL from fake model files (no licence-restricted data), with its own joint regressor and
    with the Human3.6M one (which adds ``pelvis_regressor``)."""

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, h36m_regressor: bool, pchmr_cache: str, tmp_path_factory: pytest.TempPathFactory) -> BodyModel:
        model_dir = tmp_path_factory.mktemp("fake-smpl")
        write_fake_smpl(model_dir)
        if h36m_regressor:
            write_fake_h36m_regressor(model_dir)
        spec = BodyModelSpec(cache_dir=str(Path(pchmr_cache) / "pyramids"), model_dir=str(model_dir))
        model = get_registry().get("body_model", "smpl")(spec)
        assert (getattr(model, "pelvis_regressor", None) is not None) == h36m_regressor
        return model


# --------------------------------------------------------------------------------------
# The suite must be able to fail: a body model breaking each clause is caught by its check.
# --------------------------------------------------------------------------------------
class _Broken(ToyBodyModel):
    """The toy body with switchable contract violations."""

    def __init__(self, *, millimetres: bool = False, z_up: bool = False, batch_coupled: bool = False,
                 lax_shapes: bool = False, rebuilds_pyramid: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.millimetres, self.z_up, self.batch_coupled = millimetres, z_up, batch_coupled
        self.lax_shapes, self.rebuilds_pyramid = lax_shapes, rebuilds_pyramid

    def forward(self, **params: torch.Tensor) -> BodyOutput:
        if self.lax_shapes:  # the toy's old behaviour: extra entries silently ignored
            params = {"global_orient": params["global_orient"][:, :3], "betas": params["betas"][:, :2]}
        out = super().forward(**params)
        vertices = out.vertices
        if self.millimetres:
            vertices = vertices * 1000.0
        if self.z_up:
            vertices = vertices[..., [0, 2, 1]] * torch.tensor([1.0, -1.0, 1.0])
        if self.batch_coupled:
            vertices = vertices - vertices.mean(dim=0, keepdim=True)
        return BodyOutput(vertices=vertices, joints=self.joints_from_vertices(vertices))

    def pyramid(self) -> MeshPyramid:
        if self.rebuilds_pyramid:
            self._pyramid = None
        return super().pyramid()


def _run(check: str, body: BodyModel) -> None:
    """Call one check of the suite directly, with the suite's default fixtures."""
    method = getattr(BodyModelContract(), check)
    params = default_params(body)(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        output, rest = body(**params), body(**zero_params(body)(1))
    values: Mapping[str, object] = {
        "body_model": body, "params": params, "output": output, "rest": rest,
        "height_range_m": (0.5, 2.5), "pyramid_tolerance_m": 0.05,
    }  # fmt: skip
    method(**{name: values[name] for name in inspect.signature(method).parameters})


@pytest.mark.parametrize(
    ("flaw", "check", "message"),
    [
        ({"millimetres": True}, "test_rest_body_is_metres_tall", r"1\.7e\+03 tall along y"),
        ({"z_up": True}, "test_rest_body_is_metres_tall", r"0\.24 tall along y"),
        ({"batch_coupled": True}, "test_batch_size_independence", "alone vs in a batch"),
        ({"rebuilds_pyramid": True}, "test_pyramid_is_computed_once", "built a new pyramid"),
    ],
)
def test_the_suite_catches_a_broken_body_model(flaw: dict, check: str, message: str) -> None:
    _run(check, ToyBodyModel())  # the sound toy passes the same check
    with pytest.raises(AssertionError, match=message):
        _run(check, _Broken(**flaw))


def test_the_suite_catches_silently_ignored_parameter_entries() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"'global_orient' of shape \(2, 4\).*no ValueError or TypeError"):
        _run("test_rejects_wrong_parameter_shapes", _Broken(lax_shapes=True))


def test_the_toy_body_model_names_a_parameter_of_the_wrong_shape() -> None:
    toy = ToyBodyModel()
    with pytest.raises(ValueError, match=r"'betas' must be \(1, 2\), got \(1, 3\)"):
        toy(global_orient=torch.zeros(1, 3), betas=torch.zeros(1, 3))
