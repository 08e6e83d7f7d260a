"""The smpl body model plugin, on fake SMPL files (SMPL's real files are licence-restricted)."""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pchmr.core.contracts.bodymodel import BodyModelSpec
from pchmr.core.engine.registry import get_registry
from pchmr.plugins.bodymodels import smpl as smpl_plugin
from pchmr.plugins.bodymodels.smpl import (
    JOINT_NAMES,
    LSP_FROM_H36M,
    LSP_FROM_SMPL,
    MODEL_FILE_NAMES,
    InvalidSMPLFileError,
    MissingSMPLFilesError,
    SMPLBodyModel,
    load_smpl_pickle,
    make_smpl,
)
from pchmr.testing.fake_smpl import (
    NUM_SMPL_FACES,
    NUM_SMPL_VERTICES,
    ROOT_PARENT_UINT32,
    SMPL_PARENTS,
    fake_smpl_data,
    write_fake_graphcmr_downsampling,
    write_fake_h36m_regressor,
    write_fake_smpl,
)

J = {name: i for i, name in enumerate(JOINT_NAMES)}
#: The fake template is a 1.7 m ellipsoid whose beta 0 scales the body by 5 % per unit.
FAKE_HEIGHT_M = 1.7
FAKE_BETA0_SCALE = 0.05


@pytest.fixture(scope="module")
def fake_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_smpl(tmp_path_factory.mktemp("smpl-file"))


@pytest.fixture(scope="module")
def fake_data(fake_file: Path) -> dict:
    with fake_file.open("rb") as stream:
        return pickle.load(stream, encoding="latin1")


def smpl_dir(root: Path, fake_file: Path, name: str = "SMPL_NEUTRAL.pkl") -> Path:
    """A folder holding the fake model under ``name`` (a symlink: the file is 55 MB)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / name).symlink_to(fake_file)
    return root


@pytest.fixture(scope="module")
def body(fake_file: Path, tmp_path_factory: pytest.TempPathFactory) -> SMPLBodyModel:
    cache = tmp_path_factory.mktemp("pyramids")
    return make_smpl(BodyModelSpec(model_dir=str(fake_file.parent), cache_dir=str(cache)))


def zero_params(batch: int = 1, **overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {"global_orient": torch.zeros(batch, 3), "body_pose": torch.zeros(batch, 69)}
    params.update(overrides)
    return params


# --------------------------------------------------------------------------- loading


def test_fake_file_loads_with_smpl_counts_and_no_state(body: SMPLBodyModel) -> None:
    assert body.num_vertices == NUM_SMPL_VERTICES and tuple(body.faces.shape) == (NUM_SMPL_FACES, 3)
    assert body.faces.dtype == torch.int64
    assert dict(body.param_shapes) == {"global_orient": (3,), "body_pose": (69,), "betas": (10,)}
    assert body.joint_names == JOINT_NAMES and body.root_joints == (J["left_hip"], J["right_hip"])
    assert [JOINT_NAMES[i] for i in body.flip_permutation][:3] == ["left_ankle", "left_knee", "left_hip"]
    assert body.state_dict() == {}, "SMPL's licence-restricted arrays must never reach a checkpoint"


def test_rest_pose_is_the_template_unchanged(body: SMPLBodyModel, fake_data: dict) -> None:
    """SMPL's frame is pchmr's (y up, facing +z, left at +x): zero pose and shape give the template."""
    with torch.no_grad():
        vertices = body(**zero_params()).vertices[0].double().numpy()
    np.testing.assert_allclose(vertices, fake_data["v_template"], atol=1e-6)


def test_head_is_above_the_feet_and_left_is_plus_x(body: SMPLBodyModel) -> None:
    with torch.no_grad():
        joints = body(**zero_params()).joints[0]
    hips = joints[[J["left_hip"], J["right_hip"]]].mean(dim=0)
    assert joints[J["head"], 1] > hips[1] + 0.5 > hips[1] - 0.5 > joints[J["left_ankle"], 1]
    assert joints[J["left_hip"], 0] > 0.03 > -0.03 > joints[J["right_hip"], 0]
    assert torch.allclose(body.root(joints[None])[0, 0], hips)


def test_global_orient_rotates_about_the_root_joint(body: SMPLBodyModel, fake_data: dict) -> None:
    """A quarter turn about +y maps (x, y, z) - J0 to (z, y, -x) - the body's front (+z) turns to +x."""
    template = fake_data["v_template"]
    pelvis = np.asarray(fake_data["J_regressor"] @ template)[0]
    quarter = torch.tensor([[0.0, math.pi / 2, 0.0]])
    with torch.no_grad():
        turned = body(**zero_params(global_orient=quarter)).vertices[0].double().numpy()
    rel = template - pelvis
    expected = np.stack([rel[:, 2], rel[:, 1], -rel[:, 0]], axis=1) + pelvis
    np.testing.assert_allclose(turned, expected, atol=1e-5)


def test_betas_reach_the_shape(body: SMPLBodyModel) -> None:
    """The fake's beta 0 scales the body by 5 % per unit: 1.7 m → 1.785 m at beta 0 = 1."""
    betas = torch.zeros(1, 10)
    betas[0, 0] = 1.0
    with torch.no_grad():
        vertices = body(**zero_params(betas=betas)).vertices[0]
    height = float(vertices[:, 1].max() - vertices[:, 1].min())
    assert height == pytest.approx(FAKE_HEIGHT_M * (1 + FAKE_BETA0_SCALE), abs=1e-4)


def test_forward_is_differentiable_even_at_zero_pose(body: SMPLBodyModel) -> None:
    params = {
        "global_orient": torch.zeros(2, 3, requires_grad=True),
        "body_pose": torch.zeros(2, 69, requires_grad=True),
        "betas": torch.zeros(2, 10, requires_grad=True),
    }
    out = body(**params)
    assert out.vertices.shape == (2, NUM_SMPL_VERTICES, 3) and out.joints.shape == (2, 14, 3)
    (out.joints[:, J["left_wrist"]].sum() + out.vertices[:, :100].square().sum()).backward()
    for name, value in params.items():
        assert torch.isfinite(value.grad).all(), name
        assert value.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_bad_parameters_are_refused(body: SMPLBodyModel) -> None:
    with pytest.raises(TypeError, match=r"unknown parameters \['pose'\].*'betas', 'body_pose', 'global_orient'"):
        body(pose=torch.zeros(1, 72))
    with pytest.raises(ValueError, match=r"'body_pose' must be \(1, 69\), got \(1, 23, 3\)"):
        body(global_orient=torch.zeros(1, 3), body_pose=torch.zeros(1, 23, 3))


# --------------------------------------------------------------------------- joints


def test_joint_regressor_rows_sum_to_one(body: SMPLBodyModel) -> None:
    regressor = body.joint_regressor
    assert regressor.shape == (14, NUM_SMPL_VERTICES) and regressor.dtype == torch.float32
    torch.testing.assert_close(regressor.sum(dim=1), torch.ones(14), atol=1e-5, rtol=0)


def test_without_h36m_the_joints_are_smpl_rows(body: SMPLBodyModel, fake_data: dict) -> None:
    """head = SMPL joint 15, neck = 12, left hip = 1, right ankle = 8 of the pickle's J_regressor."""
    smpl_rows = fake_data["J_regressor"].toarray()
    expected = torch.from_numpy(smpl_rows[list(LSP_FROM_SMPL)]).float()
    torch.testing.assert_close(body.joint_regressor, expected)
    assert LSP_FROM_SMPL[J["head"]] == 15 and LSP_FROM_SMPL[J["neck"]] == 12 and LSP_FROM_SMPL[J["right_ankle"]] == 8
    with torch.no_grad():
        head = body(**zero_params()).joints[0, J["head"]].double().numpy()
    np.testing.assert_allclose(head, fake_data["J"][15], atol=1e-5)
    assert "smpl J_regressor" in body.describe()["joint_source"]


def test_h36m_regressor_is_preferred_when_present(fake_file: Path, tmp_path: Path) -> None:
    folder = smpl_dir(tmp_path / "models", fake_file)
    h36m = np.load(write_fake_h36m_regressor(folder))
    body = make_smpl(BodyModelSpec(model_dir=str(folder), cache_dir=str(tmp_path)))
    torch.testing.assert_close(body.joint_regressor, torch.from_numpy(h36m[list(LSP_FROM_H36M)]).float())
    assert "human3.6m" in body.describe()["joint_source"]
    forced = make_smpl(BodyModelSpec(model_dir=str(folder), extra={"joints": "smpl"}))
    assert "smpl J_regressor" in forced.describe()["joint_source"]


def test_asking_for_h36m_joints_without_the_file_fails(fake_file: Path, tmp_path: Path) -> None:
    folder = smpl_dir(tmp_path / "models", fake_file)
    with pytest.raises(MissingSMPLFilesError, match=r"joints='h36m' needs J_regressor_h36m\.npy"):
        make_smpl(BodyModelSpec(model_dir=str(folder), extra={"joints": "h36m"}))


# --------------------------------------------------------------------------- files and errors


@pytest.mark.parametrize(
    ("gender", "name"),
    [(g, n) for g, names in MODEL_FILE_NAMES.items() for n in names] + [("neutral", "smpl_neutral.PKL")],
)
def test_the_usual_file_names_are_found(fake_file: Path, tmp_path: Path, gender: str, name: str) -> None:
    folder = smpl_dir(tmp_path / "models", fake_file, name)
    files = smpl_plugin.find_smpl_files(folder, gender)
    assert files.model == folder / name and files.gender == gender
    assert files.h36m_regressor is None and files.downsampling is None


def test_smplx_layout_subfolder_and_direct_file_path_are_found(fake_file: Path, tmp_path: Path) -> None:
    smpl_dir(tmp_path / "models" / "smpl", fake_file)
    assert smpl_plugin.find_smpl_files(tmp_path / "models").model == tmp_path / "models" / "smpl" / "SMPL_NEUTRAL.pkl"
    assert smpl_plugin.find_smpl_files(fake_file).model == fake_file


def test_gender_option_picks_the_file(fake_file: Path, tmp_path: Path) -> None:
    folder = smpl_dir(tmp_path / "models", fake_file, "basicmodel_f_lbs_10_207_0_v1.1.0.pkl")
    body = make_smpl(BodyModelSpec(model_dir=str(folder), extra={"gender": "female"}))
    assert body.gender == "female" and body.describe()["gender"] == "female"
    with pytest.raises(MissingSMPLFilesError, match="no SMPL model file for gender 'male'.*SMPL_MALE.pkl"):
        make_smpl(BodyModelSpec(model_dir=str(folder), extra={"gender": "male"}))
    with pytest.raises(ValueError, match="'gender' must be one of neutral, male, female, got 'other'"):
        make_smpl(BodyModelSpec(model_dir=str(folder), extra={"gender": "other"}))


def test_no_folder_says_where_to_obtain_smpl() -> None:
    with pytest.raises(MissingSMPLFilesError, match=r"no folder was given.*https://smpl\.is\.tue\.mpg\.de.*--smpl-dir"):
        make_smpl(BodyModelSpec())


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingSMPLFilesError, match=rf"{tmp_path / 'nowhere'} does not exist.*smpl\.is\.tue\.mpg\.de"):
        make_smpl(BodyModelSpec(model_dir=str(tmp_path / "nowhere")))


def test_folder_without_a_model_lists_the_accepted_names(tmp_path: Path) -> None:
    (tmp_path / "SMPLX_NEUTRAL.pkl").write_bytes(b"")
    names = r"SMPL_NEUTRAL\.pkl, basicmodel_neutral_lbs_10_207_0_v1\.1\.0\.pkl, basicModel_neutral_lbs_10_207_0_v1\.0\.0\.pkl"
    with pytest.raises(
        MissingSMPLFilesError, match=rf"no SMPL model file for gender 'neutral' in {tmp_path}; .*{names}"
    ):
        make_smpl(BodyModelSpec(model_dir=str(tmp_path)))
    assert issubclass(MissingSMPLFilesError, FileNotFoundError)


def test_a_file_missing_keys_is_refused(tmp_path: Path) -> None:
    data = fake_smpl_data()
    del data["posedirs"]
    path = tmp_path / "SMPL_NEUTRAL.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(InvalidSMPLFileError, match=r"missing or unreadable key\(s\) \['posedirs'\]"):
        load_smpl_pickle(path)


def test_a_z_up_file_is_refused(tmp_path: Path) -> None:
    """A template rotated to z up (y → z) fails the frame check instead of giving sideways bodies."""
    data = fake_smpl_data()
    v = data["v_template"]
    data["v_template"] = np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)
    path = tmp_path / "SMPL_NEUTRAL.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(InvalidSMPLFileError, match=r"not in SMPL's frame: head .* above the ankles"):
        load_smpl_pickle(path)


def test_chumpy_arrays_load_without_chumpy(tmp_path: Path, fake_data: dict) -> None:
    path = write_fake_smpl(tmp_path, chumpy=True)
    assert b"chumpy.ch" in path.read_bytes()[:100_000] and "chumpy" not in sys.modules
    data = load_smpl_pickle(path)
    for key in ("v_template", "weights", "posedirs", "shapedirs"):
        assert isinstance(data[key], np.ndarray), key
        np.testing.assert_array_equal(data[key], fake_data[key])
    assert "chumpy" not in sys.modules


# --------------------------------------------------------------------------- the fake files


def test_fake_file_has_smpls_layout_and_loads_in_smplx(fake_file: Path, fake_data: dict) -> None:
    import smplx

    d = fake_data
    assert d["f"].dtype == np.uint32 and d["f"].shape == (NUM_SMPL_FACES, 3)
    assert d["kintree_table"].dtype == np.uint32 and d["kintree_table"][0, 0] == ROOT_PARENT_UINT32
    assert tuple(d["kintree_table"][0, 1:]) == SMPL_PARENTS[1:] and tuple(d["kintree_table"][1]) == tuple(range(24))
    assert sp.issparse(d["J_regressor"]) and d["J_regressor"].format == "csc" and d["J_regressor"].shape == (24, 6890)
    assert d["shapedirs"].shape == (6890, 3, 10) and d["posedirs"].shape == (6890, 3, 207)
    np.testing.assert_allclose(d["weights"].sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(d["J_regressor"].sum(axis=1)).ravel(), 1.0, atol=1e-12)
    assert d["bs_style"] == "lbs" and d["bs_type"] == "lrotmin"
    mirror = d["vert_sym_idxs"]
    np.testing.assert_array_equal(mirror[mirror], np.arange(6890))
    np.testing.assert_allclose(d["v_template"][mirror], d["v_template"] * [-1, 1, 1], atol=1e-12)
    model = smplx.SMPL(model_path=str(fake_file.parent))  # smplx's own loader reads the layout
    np.testing.assert_allclose(model.v_template.numpy(), d["v_template"], atol=1e-6)


def test_fake_mesh_is_closed_and_genus_zero(fake_data: dict) -> None:
    faces = fake_data["f"].astype(np.int64)
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = {tuple(e) for e in directed}
    assert len(edges) == len(directed) and all((b, a) in edges for a, b in edges)  # closed, consistently oriented
    assert NUM_SMPL_VERTICES - len(edges) // 2 + NUM_SMPL_FACES == 2  # Euler characteristic of a sphere


# --------------------------------------------------------------------------- pyramid


def test_own_pyramid_has_smpl_sizes_and_is_cached(fake_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pyramid = make_smpl(BodyModelSpec(model_dir=str(fake_file.parent), cache_dir=str(cache))).pyramid()
    assert pyramid.num_vertices == (431, 1723, NUM_SMPL_VERTICES) and pyramid.method == "qem-fast-simplification"
    assert len(list(cache.glob("pyramid-*.npz"))) == 1


def test_graphcmr_downsampling_is_preferred_when_present(fake_file: Path, tmp_path: Path) -> None:
    folder = smpl_dir(tmp_path / "models", fake_file)
    write_fake_graphcmr_downsampling(folder / "mesh_downsampling.npz")
    cache = tmp_path / "cache"
    pyramid = make_smpl(BodyModelSpec(model_dir=str(folder), cache_dir=str(cache))).pyramid()
    assert pyramid.method == "graphcmr-mesh-downsampling" and pyramid.num_vertices == (431, 1723, 6890)
    assert not cache.exists(), "nothing is built when GraphCMR's file is used"
    own = make_smpl(BodyModelSpec(model_dir=str(folder), cache_dir=str(cache), extra={"pyramid": "qem"})).pyramid()
    assert own.method == "qem-fast-simplification"


def test_a_graphcmr_file_of_another_mesh_is_refused(fake_file: Path, tmp_path: Path) -> None:
    folder = smpl_dir(tmp_path / "models", fake_file)
    write_fake_graphcmr_downsampling(folder / "mesh_downsampling.npz", sizes=(5000, 1723, 431))
    with pytest.raises(InvalidSMPLFileError, match="full level has 5000 vertices, SMPL has 6890"):
        make_smpl(BodyModelSpec(model_dir=str(folder))).pyramid()


def test_registry_offers_smpl(fake_file: Path) -> None:
    assert smpl_plugin.pchmr_body_models() == {"smpl": make_smpl}
    factory = get_registry().get("body_model", "smpl")
    assert factory is make_smpl
