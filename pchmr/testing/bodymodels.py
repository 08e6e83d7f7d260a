"""Contract suite for body-model plugins (:class:`~pchmr.core.contracts.bodymodel.BodyModel` factories).

Subclass :class:`BodyModelContract` and override the ``body_model`` fixture (class-scoped, a
classmethod: the model is built once per class)::

    import pytest
    from pchmr.api import BodyModelSpec
    from pchmr.testing import BodyModelContract, registered

    class TestStickBody(BodyModelContract):
        @pytest.fixture(scope="class")
        @classmethod
        def body_model(cls):
            return registered("body_model", "stick")(BodyModelSpec())

Other fixtures to override:

* ``make_params`` — ``(batch_size, generator) -> {name: (B, *param_shapes[name])}``: varied valid
  parameters (default: ``0.1 * randn`` for every entry of ``param_shapes``; override when 0 is
  not the centre of a parameter's range, as for Anny's phenotype in [0, 1]);
* ``rest_params`` — ``batch_size -> params`` of the body standing at rest, facing +z (default:
  zeros);
* ``height_range_m`` — (0.5, 2.5): the rest body's height (y extent) must lie in it (metres);
* ``pyramid_tolerance_m`` — 0.05: the mean distance between the posed mesh and its round trip
  through the coarse pyramid level (``upsample(downsample(v))``);
* ``known_gaps`` — ``{check name: reason}``: those checks run as ``xfail`` with the reason.

Named-joint checks (head above the ankles, left hip at +x) run when the joint set has
``head``, ``left_ankle``/``right_ankle`` and ``left_hip``/``right_hip`` (LSP names).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import pytest
import torch
from torch import Tensor

from pchmr.core.contracts.bodymodel import BodyModel, BodyOutput, MeshPyramid
from pchmr.core.kit.pyramid import GRAPHCMR_METHOD, GRAPHCMR_ROW_SUM_RANGE
from pchmr.testing.suite import ContractSuite, raises_matching

__all__ = [
    "BATCH_ATOL_M",
    "CONTRACT_SEED",
    "BodyModelContract",
    "ParamMaker",
    "RestParams",
    "default_params",
    "zero_params",
]

CONTRACT_SEED = 0
CONTRACT_BATCH = 2
#: Standard deviation of the default random parameters (radians for rotations).
DEFAULT_PARAM_STD = 0.1
#: Sample i alone and sample i inside a batch may differ this much (metres; float32 round-off).
BATCH_ATOL_M = 1e-5
#: Joints returned by forward and joints regressed from its vertices may differ this much (metres).
REGRESSION_ATOL_M = 1e-5
#: Rows of the regressor and of the pyramid's matrices must sum to 1 within this.
ROW_SUM_ATOL = 1e-4
#: Levels of a body model's mesh pyramid: coarse, middle, full.
PYRAMID_LEVELS = 3
#: An unknown parameter name no body model takes.
UNKNOWN_PARAM = "contract_unknown_param"

ParamMaker = Callable[[int, torch.Generator], dict[str, Tensor]]
RestParams = Callable[[int], dict[str, Tensor]]


def default_params(body_model: BodyModel) -> ParamMaker:
    """``(batch_size, generator) -> params``: ``DEFAULT_PARAM_STD * randn`` for every parameter."""

    def make(batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {
            name: DEFAULT_PARAM_STD * torch.randn(batch_size, *shape, generator=generator)
            for name, shape in body_model.param_shapes.items()
        }

    return make


def zero_params(body_model: BodyModel) -> RestParams:
    """``batch_size -> params``: zeros for every parameter (the rest pose of most body models)."""
    return lambda batch_size: {name: torch.zeros(batch_size, *shape) for name, shape in body_model.param_shapes.items()}


def _named(body_model: BodyModel, *names: str) -> list[int] | None:
    """Indices of ``names`` in the joint set, or None when one is missing."""
    joints = list(body_model.joint_names)
    return [joints.index(n) for n in names] if all(n in joints for n in names) else None


def _dense(matrix: Tensor) -> Tensor:
    return matrix.to_dense() if matrix.is_sparse else matrix


class BodyModelContract(ContractSuite):
    """Checks every body-model plugin must pass; see the module docstring for the fixtures."""

    # -- fixtures to override -------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        raise NotImplementedError("override the body_model fixture: the BodyModel under test (class-scoped)")

    @pytest.fixture(scope="class")
    @classmethod
    def make_params(cls, body_model: BodyModel) -> ParamMaker:
        return default_params(body_model)

    @pytest.fixture(scope="class")
    @classmethod
    def rest_params(cls, body_model: BodyModel) -> RestParams:
        return zero_params(body_model)

    @pytest.fixture(scope="class")
    @classmethod
    def height_range_m(cls) -> tuple[float, float]:
        return (0.5, 2.5)

    @pytest.fixture(scope="class")
    @classmethod
    def pyramid_tolerance_m(cls) -> float:
        return 0.05

    # -- plumbing -------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def params(cls, make_params: ParamMaker) -> dict[str, Tensor]:
        """The random parameters of :data:`CONTRACT_BATCH` bodies, drawn once per class."""
        return make_params(CONTRACT_BATCH, torch.Generator().manual_seed(CONTRACT_SEED))

    @pytest.fixture(scope="class")
    @classmethod
    def output(cls, body_model: BodyModel, params: dict[str, Tensor]) -> BodyOutput:
        """``body_model(**params)`` without gradients, computed once per class."""
        with torch.no_grad():
            return body_model(**params)

    @pytest.fixture(scope="class")
    @classmethod
    def rest(cls, body_model: BodyModel, rest_params: RestParams) -> BodyOutput:
        with torch.no_grad():
            return body_model(**rest_params(1))

    # -- checks: declarations -------------------------------------------------------------
    def test_declares_its_name_joints_and_parameters(self, body_model: BodyModel) -> None:
        """A BodyModel subclass with a non-empty ``name``, a tuple of distinct joint names and
        ``param_shapes`` mapping each parameter name to a tuple of ints (per-sample shape)."""
        assert isinstance(body_model, BodyModel), f"{type(body_model).__name__} does not subclass pchmr BodyModel"
        assert isinstance(body_model.name, str) and body_model.name, "name must be a non-empty str (the plugin name)"
        names = body_model.joint_names
        assert isinstance(names, tuple) and names, f"joint_names must be a non-empty tuple, got {type(names).__name__}"
        assert all(isinstance(n, str) for n in names), "joint_names must be strings"
        assert len(set(names)) == len(names), f"joint_names repeat a name: {names}"
        assert body_model.num_joints == len(names)
        shapes = body_model.param_shapes
        assert isinstance(shapes, Mapping) and shapes, "param_shapes must be a non-empty mapping"
        for name, shape in shapes.items():
            assert isinstance(name, str) and isinstance(shape, tuple), f"param_shapes[{name!r}] must be a tuple"
            assert all(isinstance(n, int) and n > 0 for n in shape), f"param_shapes[{name!r}] = {shape}"

    def test_root_joints_index_the_joint_set(self, body_model: BodyModel) -> None:
        """``root_joints`` is a non-empty tuple of distinct indices into ``joint_names``."""
        root = body_model.root_joints
        assert isinstance(root, tuple) and root, f"root_joints must be a non-empty tuple, got {root!r}"
        assert len(set(root)) == len(root), f"root_joints repeat an index: {root}"
        assert all(0 <= i < body_model.num_joints for i in root), (
            f"root_joints {root} outside 0..{body_model.num_joints - 1}"
        )

    def test_flip_permutation_mirrors_left_and_right(self, body_model: BodyModel) -> None:
        """``flip_permutation`` is a permutation of the joints that is its own inverse, and maps
        every ``left_*`` joint to its ``right_*`` namesake (and back) when both exist."""
        flip = body_model.flip_permutation
        names = body_model.joint_names
        assert sorted(flip) == list(range(len(names))), f"flip_permutation {flip} is not a permutation of the joints"
        assert all(flip[flip[j]] == j for j in range(len(names))), "flip_permutation must be its own inverse"
        for j, name in enumerate(names):
            for side, other in (("left_", "right_"), ("right_", "left_")):
                mirror = other + name[len(side) :]
                if name.startswith(side) and mirror in names:
                    assert names[flip[j]] == mirror, f"flip_permutation maps {name} to {names[flip[j]]}, not {mirror}"

    def test_faces_are_int64_triangles_of_the_mesh(self, body_model: BodyModel) -> None:
        """``faces`` (F, 3) int64 indexes vertices in [0, V), three distinct corners each."""
        faces = body_model.faces
        assert isinstance(faces, Tensor) and faces.dtype == torch.int64, (
            f"faces must be an int64 tensor, got {faces!r:.80}"
        )
        assert faces.ndim == 2 and faces.shape[1] == 3 and len(faces), f"faces must be (F, 3), got {tuple(faces.shape)}"
        assert 0 <= int(faces.min()) and int(faces.max()) < body_model.num_vertices, (
            f"faces index vertices {int(faces.min())}..{int(faces.max())}, outside 0..{body_model.num_vertices - 1}"
        )
        degenerate = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
        assert not degenerate.any(), f"{int(degenerate.sum())} faces repeat a corner"

    def test_joint_regressor_rows_sum_to_one(self, body_model: BodyModel, output: BodyOutput) -> None:
        """``joint_regressor`` is (J, V) float32 over the forward's V vertices, each row summing to 1."""
        regressor = body_model.joint_regressor
        expected = (body_model.num_joints, output.vertices.shape[1])
        assert tuple(regressor.shape) == expected, f"joint_regressor {tuple(regressor.shape)}, expected {expected}"
        assert regressor.dtype == torch.float32, f"joint_regressor is {regressor.dtype}, expected float32"
        worst = float((_dense(regressor).sum(dim=1) - 1.0).abs().max())
        assert worst < ROW_SUM_ATOL, f"joint_regressor rows must sum to 1; the worst is off by {worst:.3g}"

    # -- checks: forward ------------------------------------------------------------------
    def test_forward_shapes_and_dtypes(self, body_model: BodyModel, output: BodyOutput) -> None:
        """``forward(**params)`` returns a BodyOutput of finite float32 vertices (B, V, 3) and
        joints (B, J, 3)."""
        assert isinstance(output, BodyOutput), f"forward returned {type(output).__name__}, not BodyOutput"
        b = CONTRACT_BATCH
        for name, tensor, shape in (
            ("vertices", output.vertices, (b, body_model.num_vertices, 3)),
            ("joints", output.joints, (b, body_model.num_joints, 3)),
        ):
            assert tuple(tensor.shape) == shape, f"{name} {tuple(tensor.shape)}, expected {shape}"
            assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype}, expected float32"
            assert torch.isfinite(tensor).all(), f"{name} has NaN or infinite values"

    def test_joints_are_regressed_from_the_vertices(self, body_model: BodyModel, output: BodyOutput) -> None:
        """The forward's joints equal ``joints_from_vertices(vertices)``, which equals the
        ``joint_regressor`` applied to the vertices (a linear map)."""
        regressed = body_model.joints_from_vertices(output.vertices)
        torch.testing.assert_close(output.joints, regressed, rtol=0.0, atol=REGRESSION_ATOL_M)
        linear = torch.einsum("jv,bvc->bjc", _dense(body_model.joint_regressor).float(), output.vertices)
        torch.testing.assert_close(regressed, linear, rtol=0.0, atol=REGRESSION_ATOL_M)

    def test_root_is_the_mean_of_the_root_joints(self, body_model: BodyModel, output: BodyOutput) -> None:
        """``root(joints)`` is (B, 1, 3), the mean of the ``root_joints``."""
        root = body_model.root(output.joints)
        expected = output.joints[:, list(body_model.root_joints)].mean(dim=1, keepdim=True)
        assert tuple(root.shape) == (CONTRACT_BATCH, 1, 3), (
            f"root {tuple(root.shape)}, expected ({CONTRACT_BATCH}, 1, 3)"
        )
        torch.testing.assert_close(root, expected, rtol=0.0, atol=1e-6)

    def test_rest_body_is_metres_tall(self, rest: BodyOutput, height_range_m: tuple[float, float]) -> None:
        """The rest body's height (the vertices' y extent) lies in ``height_range_m``: metres,
        y up (not millimetres, not a z-up mesh lying down)."""
        height = float(rest.vertices[0, :, 1].max() - rest.vertices[0, :, 1].min())
        low, high = height_range_m
        assert low <= height <= high, (
            f"the rest body is {height:.3g} tall along y; expected [{low}, {high}] metres, y up"
        )

    def test_rest_body_is_in_the_body_frame(self, body_model: BodyModel, rest: BodyOutput) -> None:
        """Body frame: the head is above the ankles (y up) and the left hip at larger x than
        the right (x to the body's left); checked when the joint set names them."""
        checked = 0
        if (idx := _named(body_model, "head", "left_ankle", "right_ankle")) is not None:
            head, ankles = rest.joints[0, idx[0], 1], rest.joints[0, idx[1:], 1].mean()
            assert head > ankles, (
                f"head at y={float(head):.3f} is not above the ankles (y={float(ankles):.3f}): y is up"
            )
            checked += 1
        if (idx := _named(body_model, "left_hip", "right_hip")) is not None:
            left, right = rest.joints[0, idx[0], 0], rest.joints[0, idx[1], 0]
            assert left > right, f"left hip x={float(left):.3f} is not left of the right hip (x={float(right):.3f})"
            checked += 1
        if not checked:
            pytest.skip("the joint set names neither head and ankles nor both hips")

    def test_forward_is_deterministic(
        self, body_model: BodyModel, params: dict[str, Tensor], output: BodyOutput
    ) -> None:
        """Two forwards of the same parameters give identical vertices."""
        with torch.no_grad():
            again = body_model(**params)
        assert torch.equal(again.vertices, output.vertices), "two forwards of the same parameters differ"

    def test_batch_size_independence(
        self, body_model: BodyModel, params: dict[str, Tensor], output: BodyOutput
    ) -> None:
        """Body i alone gives what it gives inside the batch (atol :data:`BATCH_ATOL_M`)."""
        for i in range(CONTRACT_BATCH):
            with torch.no_grad():
                alone = body_model(**{name: value[i : i + 1] for name, value in params.items()})
            torch.testing.assert_close(
                alone.vertices[0], output.vertices[i], rtol=0.0, atol=BATCH_ATOL_M,
                msg=lambda m, i=i: f"vertices of body {i} alone vs in a batch of {CONTRACT_BATCH}: {m}",
            )  # fmt: skip

    def test_gradients_reach_every_parameter(self, body_model: BodyModel, params: dict[str, Tensor]) -> None:
        """The forward is differentiable: every parameter gets a finite, not all-zero gradient
        from the vertices and joints."""
        leaves = {name: value.clone().requires_grad_(True) for name, value in params.items()}
        out = body_model(**leaves)
        (out.vertices.square().sum() + out.joints.square().sum()).backward()
        bad = {}
        for name, leaf in leaves.items():
            if leaf.grad is None:
                bad[name] = "no gradient"
            elif not torch.isfinite(leaf.grad).all():
                bad[name] = "non-finite gradient"
            elif not leaf.grad.abs().sum() > 0:
                bad[name] = "all-zero gradient"
        assert not bad, "parameters without a useful gradient: " + ", ".join(f"{k} ({v})" for k, v in bad.items())

    # -- checks: bad input ----------------------------------------------------------------
    def test_rejects_unknown_parameters(self, body_model: BodyModel, params: dict[str, Tensor]) -> None:
        """An unknown parameter name raises TypeError naming it."""
        bad = {**params, UNKNOWN_PARAM: torch.zeros(CONTRACT_BATCH, 3)}
        raises_matching(lambda: body_model(**bad), TypeError, UNKNOWN_PARAM, f"forward(..., {UNKNOWN_PARAM}=...)")

    def test_rejects_wrong_parameter_shapes(self, body_model: BodyModel, params: dict[str, Tensor]) -> None:
        """A parameter whose per-sample shape is not ``param_shapes[name]`` raises ValueError or
        TypeError naming the parameter."""
        for name, value in params.items():
            wrong = torch.zeros(CONTRACT_BATCH, *(n + 1 for n in value.shape[1:]))
            bad = {**params, name: wrong}
            raises_matching(
                lambda bad=bad: body_model(**bad), (ValueError, TypeError), name,
                f"'{name}' of shape {tuple(wrong.shape)} (expected ({CONTRACT_BATCH}, *{body_model.param_shapes[name]}))",
            )  # fmt: skip

    # -- checks: the mesh pyramid ---------------------------------------------------------
    def test_pyramid_has_coarse_middle_and_full_levels(self, body_model: BodyModel) -> None:
        """``pyramid()`` is a MeshPyramid of 3 strictly growing levels (coarse, middle, full: what
        the default loss weights and FastMETRO read), the last with V vertices and the model's own
        faces; every level's faces (F_l, 3) int64 index its V_l vertices."""
        pyramid = body_model.pyramid()
        assert isinstance(pyramid, MeshPyramid), f"pyramid() returned {type(pyramid).__name__}, not MeshPyramid"
        sizes = pyramid.num_vertices
        assert pyramid.levels == PYRAMID_LEVELS, f"the pyramid has levels {sizes}; expected coarse, middle and full"
        assert all(a < b for a, b in zip(sizes, sizes[1:])), f"levels {sizes} must grow, coarse first"
        assert sizes[-1] == body_model.num_vertices, (
            f"the last level has {sizes[-1]} vertices, the mesh {body_model.num_vertices}"
        )
        assert torch.equal(pyramid.faces[-1].cpu(), body_model.faces.cpu()), (
            "the last level's faces are not the model's"
        )
        for level, (faces, n) in enumerate(zip(pyramid.faces, sizes)):
            assert faces.dtype == torch.int64 and faces.ndim == 2 and faces.shape[1] == 3, (
                f"faces[{level}] must be (F, 3) int64"
            )
            assert len(faces) == 0 or 0 <= int(faces.min()) <= int(faces.max()) < n, (
                f"faces[{level}] index outside 0..{n - 1}"
            )

    def test_pyramid_maps_are_convex_combinations(self, body_model: BodyModel) -> None:
        """Every ``down`` and ``up`` matrix is sparse float32 with non-negative rows summing to 1
        (a user's GraphCMR file, used as it is: its ``up`` rows need only sum within
        ``GRAPHCMR_ROW_SUM_RANGE``)."""
        pyramid = body_model.pyramid()
        for kind, matrices in (("down", pyramid.down), ("up", pyramid.up)):
            for level, matrix in enumerate(matrices):
                what = f"{kind}[{level}] {tuple(matrix.shape)}"
                assert matrix.is_sparse and matrix.dtype == torch.float32, f"{what} must be a sparse float32 tensor"
                dense = matrix.to_dense()
                if kind == "up" and pyramid.method == GRAPHCMR_METHOD:
                    sums, (low, high) = dense.sum(dim=1), GRAPHCMR_ROW_SUM_RANGE
                    assert bool(((sums >= low) & (sums <= high)).all()), f"{what}: rows must sum to {low}..{high}"
                    continue
                assert float(dense.min()) >= 0.0, f"{what} has negative weights: rows must be convex combinations"
                worst = float((dense.sum(dim=1) - 1.0).abs().max())
                assert worst < ROW_SUM_ATOL, f"{what}: rows must sum to 1, the worst is off by {worst:.3g}"

    def test_pyramid_round_trip_keeps_the_shape(
        self, body_model: BodyModel, output: BodyOutput, pyramid_tolerance_m: float
    ) -> None:
        """The posed mesh taken down to each level and back up stays within
        ``pyramid_tolerance_m`` of itself on average: the levels describe the same surface."""
        pyramid = body_model.pyramid()
        for level in range(pyramid.levels - 1):
            coarse = pyramid.downsample(output.vertices, level)
            assert tuple(coarse.shape) == (CONTRACT_BATCH, pyramid.num_vertices[level], 3)
            back = pyramid.upsample(coarse, level)
            error = float((back - output.vertices).norm(dim=-1).mean())
            assert error < pyramid_tolerance_m, (
                f"level {level} round trip moves vertices {error:.3g} m on average (limit {pyramid_tolerance_m} m)"
            )

    def test_coarse_adjacency_matches_the_coarse_faces(self, body_model: BodyModel) -> None:
        """``adjacency`` (V_0, V_0) is dense bool, symmetric, with the diagonal set and every
        edge of the coarse faces."""
        pyramid = body_model.pyramid()
        adjacency, faces = pyramid.adjacency, pyramid.faces[0]
        assert adjacency.dtype == torch.bool and not adjacency.is_sparse, "adjacency must be a dense bool tensor"
        assert torch.equal(adjacency, adjacency.T), "adjacency must be symmetric"
        assert bool(adjacency.diagonal().all()), "adjacency must have its diagonal set"
        for a, b in ((0, 1), (1, 2), (2, 0)):
            missing = int((~adjacency[faces[:, a], faces[:, b]]).sum())
            assert missing == 0, f"{missing} edges of the coarse faces are not in the adjacency"

    def test_pyramid_is_computed_once(self, body_model: BodyModel) -> None:
        """A second ``pyramid()`` call returns the same object (it is cached, never rebuilt)."""
        assert body_model.pyramid() is body_model.pyramid(), "pyramid() built a new pyramid on a second call"

    # -- checks: the record ---------------------------------------------------------------
    def test_describe_is_json_and_names_the_model(self, body_model: BodyModel) -> None:
        """``describe()`` is JSON-able and records the name, the vertex count and the joints."""
        info = body_model.describe()
        json.dumps(info)
        assert info.get("body_model") == body_model.name, f"describe()['body_model'] is {info.get('body_model')!r}"
        assert info.get("num_vertices") == body_model.num_vertices
        assert list(info.get("joints", ())) == list(body_model.joint_names), "describe()['joints'] is not the joint set"

    def test_optional_pelvis_regressor(self, body_model: BodyModel) -> None:
        """``pelvis_regressor``, when present (not None), is a (V,) float32 row summing to 1."""
        pelvis = getattr(body_model, "pelvis_regressor", None)
        if pelvis is None:
            return
        assert tuple(pelvis.shape) == (body_model.num_vertices,), f"pelvis_regressor {tuple(pelvis.shape)}"
        assert pelvis.dtype == torch.float32, f"pelvis_regressor is {pelvis.dtype}, expected float32"
        assert abs(float(pelvis.sum()) - 1.0) < ROW_SUM_ATOL, f"pelvis_regressor sums to {float(pelvis.sum()):.4g}"
