"""Evaluation protocols applied end to end: the Human3.6M pelvis of SMPL (its regressor's row 0),
the GT pelvis in the prepared store, pelvis- vs mid-hip-aligned metrics computed independently
here, the protocol record (what was applied, with which regressor and GT mesh) and the fallback
when the body model has no Human3.6M regressor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pchmr.core.contracts.backbone import Backbone, HMROutput
from pchmr.core.contracts.bodymodel import BodyModelSpec
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.sample import SampleError, validate_sample
from pchmr.core.engine.components import Components
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.module import HMRModule
from pchmr.core.kit import joints as joints_module
from pchmr.core.kit.joints import (
    LSP_14,
    ProtocolFallbackWarning,
    apply_protocol,
    get_protocol,
)
from pchmr.core.kit.metrics import mpjpe, mpvpe, pa_mpjpe, pck
from pchmr.plugins.bodymodels.smpl import LSP_FROM_H36M, make_smpl
from pchmr.plugins.datasets.spin_npz import make_spin_npz
from pchmr.testing.fake_datasets import write_spin_npz
from pchmr.testing.fake_smpl import write_fake_h36m_regressor, write_fake_smpl
from pchmr.testing.toys import ToyBodyModel, toy_batch

SIZE = 32
N = 6
HIPS = [LSP_14.index("left_hip"), LSP_14.index("right_hip")]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smpl_dirs(tmp_path_factory):
    """Two SMPL folders: one with J_regressor_h36m.npy, one without."""
    root = tmp_path_factory.mktemp("smpl")
    with_h36m, plain = root / "h36m", root / "plain"
    write_fake_smpl(with_h36m)
    regressor = np.load(write_fake_h36m_regressor(with_h36m, seed=3))
    write_fake_smpl(plain)
    return with_h36m, plain, regressor


@pytest.fixture(scope="module")
def bodies(smpl_dirs, pchmr_cache):
    with_h36m, plain, _ = smpl_dirs
    cache = os.path.join(pchmr_cache, "pyramids")
    return (make_smpl(BodyModelSpec(model_dir=str(with_h36m), cache_dir=cache)),
            make_smpl(BodyModelSpec(model_dir=str(plain), cache_dir=cache)))  # fmt: skip


@pytest.fixture(scope="module")
def h36m_file(tmp_path_factory):
    """A Human3.6M-style SPIN npz with S (pelvis at J24 14) and SMPL annotations; train = test."""
    root = tmp_path_factory.mktemp("spin")
    scene = write_spin_npz(root / "h36m_valid_protocol2.npz", N, seed=5, with_smpl=True)
    return scene, root


def _data(h36m_file, body, protocol):
    scene, root = h36m_file
    path = scene.files["npz"]
    spec = DatasetSpec(SIZE, 0, root / "cache", f"train={path},test={path},protocol={protocol}")
    return make_spin_npz(spec, body)


def _batch(data):
    return next(iter(DataLoader(data.test, batch_size=len(data.test))))


def _module(body, alignment):
    return HMRModule(Backbone(), body, alignment=alignment)


def _metrics(module, batch, vertices):
    out = HMROutput(
        joints=torch.zeros(len(vertices), 14, 3), vertices=(vertices,), camera=torch.zeros(len(vertices), 3)
    )
    module.update_metrics(batch, out)
    return {k: float(m.compute()) for k, m in module.val_metrics.items() if m.update_called}


def _predicted_vertices(body, n, seed=7):
    """Some SMPL meshes (any pose) translated far away: the metrics must root-align them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = body(global_orient=torch.randn(n, 3, generator=g) * 0.3, body_pose=torch.randn(n, 69, generator=g) * 0.2,
                   betas=torch.randn(n, 10, generator=g))  # fmt: skip
    return out.vertices + torch.tensor([0.3, -0.2, 4.0])


def _gt_meshes(body, scene):
    pose, betas = scene.extra["pose"], scene.extra["shape"]
    with torch.no_grad():
        out = body(global_orient=torch.tensor(pose[:, :3], dtype=torch.float32),
                   body_pose=torch.tensor(pose[:, 3:], dtype=torch.float32),
                   betas=torch.tensor(betas, dtype=torch.float32))  # fmt: skip
    return out.vertices.double().numpy()


def _rows(regressor):
    """The LSP-14 and pelvis rows of a (17, V) Human3.6M regressor, normalised (independently of smpl.py)."""
    lsp = regressor[list(LSP_FROM_H36M)]
    return lsp / lsp.sum(1, keepdims=True), regressor[0] / regressor[0].sum()


def _order(data, scene):
    """Index of each test sample in the written file."""
    refs = data.test.store.arrays["image_ref"]
    return [scene.imgname.index(str(r)) for r in refs]


# ----------------------------------------------------------------------------- body model and store


def test_smpl_exposes_the_h36m_pelvis_row_only_with_the_h36m_regressor(bodies, smpl_dirs):
    with_h36m, plain = bodies
    _, pelvis_row = _rows(smpl_dirs[2])
    np.testing.assert_allclose(with_h36m.pelvis_regressor.numpy(), pelvis_row, atol=1e-7)
    assert with_h36m.pelvis_regressor.shape == (6890,) and with_h36m.pelvis_regressor.dtype == torch.float32
    assert plain.pelvis_regressor is None
    assert with_h36m.describe()["pelvis"] == "human3.6m regressor joint 0" and "none" in plain.describe()["pelvis"]
    assert "pelvis_regressor" not in with_h36m.state_dict()


def test_the_store_keeps_the_gt_pelvis_relative_to_the_joints_root(h36m_file, bodies):
    scene, _ = h36m_file
    data = _data(h36m_file, bodies[0], "spin")
    for i, k in enumerate(_order(data, scene)):
        sample = data.test[i]
        validate_sample(sample, num_joints=14, num_vertices=6890, image_size=SIZE)
        mid_hip = scene.joints_cam[k][HIPS].mean(0)
        np.testing.assert_allclose(sample["pelvis_3d"][:3].numpy(), scene.extra["pelvis_cam"][k] - mid_hip, atol=1e-6)
        assert float(sample["pelvis_3d"][3]) == 1.0
    assert data.protocol["test_without_pelvis"] == 0 and data.protocol["test_with_3d"] == N
    assert data.protocol["gt_mesh"] == "neutral"  # spin asks gendered meshes, but these annotations carry no gender


def test_joints_from_the_gt_mesh_give_the_mesh_pelvis(tmp_path, bodies, smpl_dirs):
    body = bodies[0]
    scene = write_spin_npz(tmp_path / "3dpw_test.npz", 4, seed=1, with_smpl=True, with_3d=False)
    path = scene.files["npz"]
    data = make_spin_npz(DatasetSpec(SIZE, 0, tmp_path / "cache", f"train={path},test={path}"), body)
    lsp_rows, pelvis_row = _rows(smpl_dirs[2])
    meshes = _gt_meshes(body, scene)
    for i, k in enumerate(_order(data, scene)):
        joints = lsp_rows @ meshes[k]
        expected = pelvis_row @ meshes[k] - joints[HIPS].mean(0)
        np.testing.assert_allclose(data.test[i]["pelvis_3d"][:3].numpy(), expected, atol=2e-5)
    # without the Human3.6M regressor the mesh gives no pelvis: invalid, and counted
    plain = make_spin_npz(DatasetSpec(SIZE, 0, tmp_path / "cache", f"train={path},test={path}"), bodies[1])
    assert (plain.test.store.arrays["pelvis_3d"] == 0).all()
    assert plain.protocol["test_without_pelvis"] == plain.protocol["test_with_3d"] == 4


def test_spin_poses_gendered_gt_meshes_and_their_pelvis_and_says_so(tmp_path, smpl_dirs, pchmr_cache):
    folder = tmp_path / "smpl"
    for seed, gender in enumerate(("neutral", "male", "female")):
        write_fake_smpl(folder, gender, seed=seed)  # different shape fields per gender
    np.save(folder / "J_regressor_h36m.npy", smpl_dirs[2])
    cache = os.path.join(pchmr_cache, "pyramids")
    body = make_smpl(BodyModelSpec(model_dir=str(folder), cache_dir=cache))
    male = make_smpl(BodyModelSpec(model_dir=str(folder), cache_dir=cache, extra={"gender": "male"}))
    female = make_smpl(BodyModelSpec(model_dir=str(folder), cache_dir=cache, extra={"gender": "female"}))
    scene = write_spin_npz(tmp_path / "3dpw_test.npz", 4, seed=2, with_smpl=True, with_3d=False, gender=True)
    path = scene.files["npz"]
    lsp_rows, pelvis_row = _rows(smpl_dirs[2])
    for protocol, expected_mesh in (("spin", "gendered"), ("metro", "neutral")):
        data = make_spin_npz(DatasetSpec(SIZE, 0, tmp_path / "cache", f"train={path},test={path},protocol={protocol}"),
                             body)  # fmt: skip
        assert data.protocol["gt_mesh"] == expected_mesh
        assert _components(body, data).protocol().gt_mesh == expected_mesh
        for i, k in enumerate(_order(data, scene)):
            model = {"m": male, "f": female}[scene.extra["gender"][k]] if protocol == "spin" else body
            mesh = _gt_meshes(model, scene)[k]
            expected = pelvis_row @ mesh - (lsp_rows @ mesh)[HIPS].mean(0)
            np.testing.assert_allclose(data.test[i]["pelvis_3d"][:3].numpy(), expected, atol=2e-5)


def test_a_bad_pelvis_is_refused_by_the_schema():
    body = ToyBodyModel()
    sample = {k: v[0] for k, v in toy_batch(body, 1, 16, torch.Generator().manual_seed(0)).items() if k != "meta"}
    sample["meta"] = {"subject": "a", "scene": "b", "action": "c", "source": "d"}
    sample["pelvis_3d"] = torch.tensor([0.0, 0.0, 0.0, 0.5])
    with pytest.raises(SampleError, match="'pelvis_3d' validity"):
        validate_sample(sample, num_joints=14, num_vertices=body.num_vertices)
    sample["pelvis_3d"] = torch.zeros(3)
    with pytest.raises(SampleError, match=r"'pelvis_3d' must be \(4,\)"):
        validate_sample(sample, num_joints=14, num_vertices=body.num_vertices)


# ----------------------------------------------------------------------------- metrics


def _expected(pred_v, gt_joints, gt_pelvis, gt_verts, lsp_rows, pelvis_row, alignment):
    """MPJPE / PA-MPJPE / MPVPE (mm) of one protocol, computed here in float64 from the scene."""
    errors, pa, verts = [], [], []
    for p, g, gp, gv in zip(pred_v, gt_joints, gt_pelvis, gt_verts):
        pj = lsp_rows @ p
        if alignment == "pelvis":
            pred_root, gt_root, pred_vroot, gt_vroot = pelvis_row @ p, gp, pelvis_row @ p, pelvis_row @ gv
        else:
            pred_root, gt_root = pj[HIPS].mean(0), g[HIPS].mean(0)
            pred_vroot, gt_vroot = pred_root, (lsp_rows @ gv)[HIPS].mean(0)
        a, b = pj - pred_root, g - gt_root
        errors.append(np.linalg.norm(a - b, axis=1).mean())
        pa.append(float(pa_mpjpe(torch.tensor(a[None]), torch.tensor(b[None]))[0]) / 1000.0)
        verts.append(np.linalg.norm((p - pred_vroot) - (gv - gt_vroot), axis=1).mean())
    return {"mpjpe_mm": 1000 * np.mean(errors), "pa_mpjpe_mm": 1000 * np.mean(pa), "mpvpe_mm": 1000 * np.mean(verts)}


def test_spin_and_mid_hip_metrics_differ_exactly_by_their_roots(h36m_file, bodies, smpl_dirs):
    scene, _ = h36m_file
    body = bodies[0]
    lsp_rows, pelvis_row = _rows(smpl_dirs[2])
    pred = _predicted_vertices(body, N)
    results = {}
    for protocol in ("spin", "metro", "mid-hip"):
        data = _data(h36m_file, body, protocol)
        order = _order(data, scene)
        alignment = apply_protocol(data.protocol, body).alignment
        got = _metrics(_module(body, alignment), _batch(data), pred)
        expected = _expected(pred.double().numpy(), scene.joints_cam[order], scene.extra["pelvis_cam"][order],
                             _gt_meshes(body, scene)[order], lsp_rows, pelvis_row, alignment)  # fmt: skip
        for key in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm"):
            assert got[key] == pytest.approx(expected[key], rel=2e-5, abs=1e-3), (protocol, key)
        results[protocol] = got
    assert abs(results["spin"]["mpjpe_mm"] - results["mid-hip"]["mpjpe_mm"]) > 1.0  # the roots differ by cm
    assert results["spin"]["pa_mpjpe_mm"] == pytest.approx(results["mid-hip"]["pa_mpjpe_mm"], abs=1e-3)
    # spin and metro both align at the pelvis; on these (gender-less) annotations they agree
    assert results["spin"]["mpjpe_mm"] == pytest.approx(results["metro"]["mpjpe_mm"], abs=1e-4)


def test_samples_without_a_gt_pelvis_fall_back_to_the_mid_hip_and_are_counted(h36m_file, bodies, smpl_dirs):
    scene, _ = h36m_file
    body = bodies[0]
    lsp_rows, pelvis_row = _rows(smpl_dirs[2])
    data = _data(h36m_file, body, "spin")
    order = _order(data, scene)
    batch = _batch(data)
    batch["pelvis_3d"][:2] = 0.0  # the first two samples lose their GT pelvis
    pred = _predicted_vertices(body, N)
    module = _module(body, "pelvis")
    got = _metrics(module, batch, pred)
    args = (pred.double().numpy(), scene.joints_cam[order], scene.extra["pelvis_cam"][order],
            _gt_meshes(body, scene)[order], lsp_rows, pelvis_row)  # fmt: skip
    mid = _expected(*(a[:2] for a in args[:4]), *args[4:], "mid-hip")
    pel = _expected(*(a[2:] for a in args[:4]), *args[4:], "pelvis")
    assert got["mpjpe_mm"] == pytest.approx((2 * mid["mpjpe_mm"] + (N - 2) * pel["mpjpe_mm"]) / N, rel=2e-5)
    assert got["mpvpe_mm"] == pytest.approx((2 * mid["mpvpe_mm"] + (N - 2) * pel["mpvpe_mm"]) / N, rel=2e-5)
    assert module.mid_hip_fallbacks == 2


def test_the_mean_pose_baseline_is_rooted_like_the_evaluation(h36m_file, bodies):
    """Under a pelvis protocol the constant prediction is the mean pelvis-relative pose, scored
    against pelvis-relative GT joints (mid-hip where a sample has no GT pelvis)."""
    from pchmr.core.engine.evaluation import mean_pose_baselines

    scene, _ = h36m_file
    data = _data(h36m_file, bodies[0], "spin")
    assert apply_protocol(data.protocol, bodies[0]).alignment == "pelvis"
    order = _order(data, scene)
    gt = scene.joints_cam[order][:, :, :3] - scene.extra["pelvis_cam"][order][:, None, :]  # independently of the store
    expected = np.linalg.norm(gt - gt.mean(0), axis=-1).mean() * 1000
    pelvis = mean_pose_baselines(data.train, data.test, "pelvis")
    mid_hip = mean_pose_baselines(data.train, data.test, "mid-hip")
    assert pelvis["mean_pose_mpjpe_mm"] == pytest.approx(expected, rel=1e-5)
    assert abs(pelvis["mean_pose_mpjpe_mm"] - mid_hip["mean_pose_mpjpe_mm"]) > 0.1
    assert pelvis["mean_pose_pa_mpjpe_mm"] == pytest.approx(mid_hip["mean_pose_pa_mpjpe_mm"], abs=1e-3)


def test_mid_hip_evaluation_is_unchanged_bit_for_bit():
    """The synthetic default: the metrics are the old mid-hip formula exactly, pelvis_3d or not."""
    body = ToyBodyModel()
    batch = toy_batch(body, 5, 16, torch.Generator().manual_seed(4))
    pred = batch["vertices"] + 0.05 * torch.randn(batch["vertices"].shape, generator=torch.Generator().manual_seed(5))
    regressor = body.joint_regressor.to(torch.float32)
    pred_joints = torch.einsum("jv,bvc->bjc", regressor, pred)
    root = pred_joints[:, list(body.root_joints)].mean(dim=1, keepdim=True)
    gt, valid = batch["joints_3d"][..., :3], batch["joints_3d"][..., 3]
    expected = {
        "mpjpe_mm": mpjpe(pred_joints - root, gt, valid), "pa_mpjpe_mm": pa_mpjpe(pred_joints - root, gt, valid),
        "pck": pck(pred_joints - root, gt, valid), "mpvpe_mm": mpvpe(pred - root, batch["vertices"]),
    }  # fmt: skip
    for extra in ({}, {"pelvis_3d": torch.tensor([[0.0, -0.04, 0.0, 1.0]]).expand(5, 4)}):
        module = HMRModule(Backbone(), body)
        assert module.alignment == "mid-hip"
        got = _metrics(module, {**batch, **extra}, pred)
        for key, values in expected.items():
            assert got[key] == float((values.double().sum() / len(values)).float()), key
        assert module.mid_hip_fallbacks == 0
    with pytest.raises(ValueError, match="pelvis_regressor.*'toy' has none"):
        HMRModule(Backbone(), body, alignment="pelvis")
    with pytest.raises(ValueError, match="'mid-hip' or 'pelvis'"):
        HMRModule(Backbone(), body, alignment="root")


# ----------------------------------------------------------------------------- the record


def _components(body, data):
    return Components(config=RunConfig(dataset="spin-npz", body_model="smpl"), body_model=body, data=data)


def test_the_protocol_record_names_what_was_applied(h36m_file, bodies, monkeypatch):
    with_h36m, plain = bodies
    monkeypatch.setattr(joints_module, "_WARNED", set())
    spin = _components(with_h36m, _data(h36m_file, with_h36m, "spin")).protocol().as_dict()
    assert (spin["alignment"], spin["regressor"], spin["gt_mesh"]) == ("pelvis", "h36m-17", "neutral")
    mid = _components(with_h36m, _data(h36m_file, with_h36m, "mid-hip")).protocol().as_dict()
    assert (mid["alignment"], mid["regressor"], mid["gt_mesh"]) == ("mid-hip", "h36m-17", "neutral")
    components = _components(plain, _data(h36m_file, plain, "spin"))
    with pytest.warns(ProtocolFallbackWarning, match="'spin' aligns at Human3.6M's pelvis but body model 'smpl'"):
        record = components.protocol()
    assert record.alignment == "mid-hip (spin asks pelvis; smpl has no Human3.6M regressor)"
    assert record.regressor.startswith("smpl J_regressor") and "mid-hip (spin asks pelvis" in record.label()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert components.applied_protocol().alignment == "mid-hip"


def test_missing_gt_pelvises_are_written_into_the_record(tmp_path, bodies):
    body = bodies[0]
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 5, seed=3)
    arrays = dict(np.load(scene.files["npz"]))
    arrays["S"][[1, 3], 14, 3] = 0.0  # two samples without Human3.6M's pelvis
    np.savez(scene.files["npz"], **arrays)
    path = scene.files["npz"]
    data = make_spin_npz(DatasetSpec(SIZE, 0, tmp_path / "cache", f"train={path},test={path},protocol=spin"), body)
    record = _components(body, data).protocol()
    assert record.alignment == "pelvis (2 of 5 test samples have no GT pelvis: mid-hip for those)"
    assert record.gt_mesh == "none"


def test_data_without_a_named_protocol_keeps_its_record():
    body = ToyBodyModel()
    data = HMRData(train=[0], test=[0], labels={}, protocol={"dataset": "synthetic", "gt": "real"})
    components = Components(config=RunConfig(), body_model=body, data=data)
    assert components.protocol().as_dict() == {
        "dataset": "synthetic", "joint_set": "toy-14", "alignment": "mid-hip (root)", "body_model": "toy",
        "ground_truth": "real",
    }  # fmt: skip
    assert components.applied_protocol().alignment == "mid-hip"
    no_data = Components(config=RunConfig(), body_model=body, data=None)  # type: ignore[arg-type]
    assert no_data.applied_protocol().alignment == "mid-hip"  # pchmr annotate builds modules without data
    assert get_protocol("mid-hip").regressor == "body model" and get_protocol("metro").alignment == "pelvis"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_pchmr_run_with_smpl_and_the_h36m_regressor_records_the_pelvis_alignment(tmp_path, smpl_dirs, pchmr_cache):
    write_spin_npz(tmp_path / "h36m_train.npz", 12, seed=2)
    env = {**os.environ, "COLUMNS": "200", "PCHMR_CACHE_DIR": pchmr_cache}
    cmd = [sys.executable, "-m", "pchmr.cli.app", "run", "--dataset", f"spin-npz:{tmp_path / 'h36m_train.npz'}",
           "--body-model", "smpl", "--smpl-dir", str(smpl_dirs[0]), "--mode", "centralized", "--epochs", "1",
           "--batch-size", "8", "--out", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["protocol"]["alignment"] == "pelvis" and final["protocol"]["regressor"] == "h36m-17"
    assert np.isfinite(final["mpjpe_mm"]) and "pelvis aligned" in result.stdout
