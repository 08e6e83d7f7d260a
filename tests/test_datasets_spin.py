"""spin-npz: a generated SPIN .npz + JPEGs loads into Samples whose crops, keypoints and joints
match values computed here; bad files fail naming the file and the expectation."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.contracts.sample import denormalize_image, validate_sample
from pchmr.core.kit.joints import LSP_14
from pchmr.plugins.datasets.prepared import DatasetFormatError, crop_image
from pchmr.plugins.datasets.spin_npz import make_spin_npz
from pchmr.testing.fake_datasets import MARKER_COLORS, write_spin_npz

SIZE = 64


@dataclass
class StubBody:
    """Just what a dataset loader reads from a body model (LSP-14, mid-hip root)."""

    name: str = "stub"
    joint_names: tuple = LSP_14
    root_joints: tuple = (3, 2)
    num_vertices: int = 5

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)


def crop_px(points, center, scale):
    """Crop pixel (column, row) of image points, computed from the box definition."""
    side = 200.0 * scale
    return (np.asarray(points) - (np.asarray(center) - side / 2.0)) * SIZE / side


@pytest.fixture(scope="module")
def spin(tmp_path_factory):
    root = tmp_path_factory.mktemp("spin")
    scene = write_spin_npz(root / "h36m_valid_protocol2.npz", num_samples=10, seed=1)
    spec = DatasetSpec(image_size=SIZE, seed=0, cache_dir=root / "cache", path=str(root / "h36m_valid_protocol2.npz"))
    return scene, make_spin_npz(spec, StubBody()), root


def test_samples_follow_the_schema_and_the_split(spin):
    _scene, data, _ = spin
    assert len(data.train) == 8 and len(data.test) == 2
    for split in (data.train, data.test):
        for i in range(len(split)):
            validate_sample(split[i], num_joints=14, num_vertices=5, image_size=SIZE)
    assert data.protocol["protocol"] == "metro" and "metro protocol" in data.protocol["dataset"]
    assert set(data.labels["source"]) == {"h36m"}
    assert set(data.labels["subject"]) <= {"S1", "S2", "S3"} and set(data.labels["action"]) <= {"Directions", "Walking"}


def _written_index(scene, store, i):
    return scene.imgname.index(str(store.arrays["image_ref"][i]))


def test_keypoints_are_crop_coordinates_and_joints_root_relative_metres(spin):
    scene, data, _ = spin
    store = data.train.store
    for i in range(len(data.train)):
        k = _written_index(scene, store, i)
        sample = data.train[i]
        expected_kp = (scene.keypoints_px[k] - scene.center[k]) / (100.0 * scene.scale[k])
        np.testing.assert_allclose(sample["keypoints_2d"][:, :2].numpy(), expected_kp, atol=1e-5)
        assert (sample["keypoints_2d"][:, 2] == 1).all()
        hips = scene.joints_cam[k][[LSP_14.index("left_hip"), LSP_14.index("right_hip")]].mean(0)
        np.testing.assert_allclose(sample["joints_3d"][:, :3].numpy(), scene.joints_cam[k] - hips, atol=1e-5)
        # frame: the head is above (smaller y) the ankles, metres (a ~1.65 m figure)
        j = sample["joints_3d"]
        assert j[LSP_14.index("head"), 1] < -0.7 and j[LSP_14.index("right_ankle"), 1] > 0.7


def test_the_crop_shows_each_joint_marker_where_the_box_maps_it(spin):
    scene, data, _ = spin
    store = data.test.store
    for i in range(len(data.test)):
        k = _written_index(scene, store, i)
        image = denormalize_image(data.test[i]["image"]).numpy().astype(int)
        cols_rows = crop_px(scene.keypoints_px[k], scene.center[k], scene.scale[k])
        for j in (LSP_14.index("head"), LSP_14.index("left_ankle"), LSP_14.index("right_wrist")):
            c, r = np.floor(cols_rows[j]).astype(int)
            assert np.abs(image[r, c] - MARKER_COLORS[j].astype(int)).max() < 60, (j, image[r, c], MARKER_COLORS[j])


def test_crop_image_is_the_scaled_box_with_zero_padding():
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:20, 30:40] = 200  # a 10-px square at x 30..39, y 10..19
    out = crop_image(image, center=(35.0, 15.0), scale=0.2, size=20)  # 40-px box: 2 px per output px
    assert out.shape == (20, 20, 3)
    assert (out[8:12, 8:12] == 200).all() and (out[0:3, 0:3] == 0).all()  # centre square, black outside
    edge = crop_image(image, center=(0.0, 0.0), scale=0.1, size=20)  # box half outside the image
    assert (edge[:9, :, :] == 0).all() and (edge[:, :9] == 0).all()


def test_each_image_is_decoded_once_and_the_store_is_reused(spin, monkeypatch):
    _scene, data, root = spin
    import pchmr.plugins.datasets.prepared as prepared

    calls = []
    original = prepared.decode_image
    monkeypatch.setattr(prepared, "decode_image", lambda *a, **k: calls.append(a) or original(*a, **k))
    spec = DatasetSpec(image_size=SIZE, seed=0, cache_dir=root / "cache", path=str(root / "h36m_valid_protocol2.npz"))
    again = make_spin_npz(spec, StubBody())
    assert calls == [] and again.extra["train_store"] == data.extra["train_store"]
    fresh = DatasetSpec(image_size=32, seed=0, cache_dir=root / "cache", path=str(root / "h36m_valid_protocol2.npz"))
    make_spin_npz(fresh, StubBody())
    assert len(calls) == 10, "a new crop size decodes every source image exactly once"


# ----------------------------------------------------------------------------- bad input


def _spec(path: str, root: Path) -> DatasetSpec:
    return DatasetSpec(image_size=SIZE, seed=0, cache_dir=root / "cache", path=path)


def test_truncated_file(tmp_path):
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 4)
    data = scene.files["npz"].read_bytes()
    scene.files["npz"].write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFormatError, match=r"h36m_train\.npz.*truncated or corrupt"):
        make_spin_npz(_spec(str(scene.files["npz"]), tmp_path), StubBody())


def test_missing_key(tmp_path):
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 4)
    arrays = dict(np.load(scene.files["npz"]))
    del arrays["center"]
    np.savez(scene.files["npz"], **arrays)
    with pytest.raises(DatasetFormatError, match=r"h36m_train\.npz: missing key\(s\) \['center'\]"):
        make_spin_npz(_spec(str(scene.files["npz"]), tmp_path), StubBody())


def test_wrong_shape(tmp_path):
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 4)
    arrays = dict(np.load(scene.files["npz"]))
    arrays["part"] = arrays["part"][:, :17]
    np.savez(scene.files["npz"], **arrays)
    with pytest.raises(
        DatasetFormatError, match=r"h36m_train\.npz: 'part' must have shape \(4, 24, 3\), got \(4, 17, 3\)"
    ):
        make_spin_npz(_spec(str(scene.files["npz"]), tmp_path), StubBody())


def test_millimetres_are_refused(tmp_path):
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 4)
    arrays = dict(np.load(scene.files["npz"]))
    arrays["S"][..., :3] *= 1000.0
    np.savez(scene.files["npz"], **arrays)
    with pytest.raises(DatasetFormatError, match="expected metres"):
        make_spin_npz(_spec(str(scene.files["npz"]), tmp_path), StubBody())


def test_missing_image(tmp_path):
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 4)
    (tmp_path / scene.imgname[2]).unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"listed in .*h36m_train\.npz do not exist under .*{scene.imgname[2]}"
    ):
        make_spin_npz(_spec(str(scene.files["npz"]), tmp_path), StubBody())


def test_corrupt_image(tmp_path):
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 4)
    (tmp_path / scene.imgname[0]).write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFormatError, match=rf"{scene.imgname[0]}: not a readable JPEG"):
        make_spin_npz(_spec(str(scene.files["npz"]), tmp_path), StubBody())


def test_path_syntax_errors_name_the_keys(tmp_path):
    with pytest.raises(DatasetFormatError, match="needs a location"):
        make_spin_npz(_spec("", tmp_path), StubBody())
    with pytest.raises(DatasetFormatError, match="expected key=value with keys train, test, images"):
        make_spin_npz(_spec("train=a.npz,colour=red", tmp_path), StubBody())


# ----------------------------------------------------------------------------- SMPL meshes


@pytest.fixture(scope="module")
def smpl_body(tmp_path_factory):
    from pchmr.core.contracts.bodymodel import BodyModelSpec
    from pchmr.plugins.bodymodels.smpl import make_smpl
    from pchmr.testing.fake_smpl import write_fake_smpl

    folder = tmp_path_factory.mktemp("smpl")
    write_fake_smpl(folder)
    return make_smpl(BodyModelSpec(model_dir=str(folder), cache_dir=str(folder)))


def test_smpl_annotations_give_camera_frame_meshes_with_the_smpl_body_model(tmp_path, smpl_body):
    scene = write_spin_npz(tmp_path / "3dpw_test.npz", 5, with_smpl=True, with_3d=False)
    spec = DatasetSpec(
        image_size=32,
        seed=0,
        cache_dir=tmp_path / "cache",
        path=f"train={scene.files['npz']},test={scene.files['npz']}",
    )
    data = make_spin_npz(spec, smpl_body)
    pose, betas = scene.extra["pose"], scene.extra["shape"]
    with torch.no_grad():
        out = smpl_body(
            global_orient=torch.tensor(pose[:, :3], dtype=torch.float32),
            body_pose=torch.tensor(pose[:, 3:], dtype=torch.float32),
            betas=torch.tensor(betas, dtype=torch.float32),
        )
    root = out.joints[:, [3, 2]].mean(1, keepdim=True)
    for i in range(5):
        sample = data.test[i]
        assert float(sample["has_vertices"]) == 1.0
        torch.testing.assert_close(sample["vertices"], (out.vertices - root)[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(sample["joints_3d"][:, :3], (out.joints - root)[i], atol=1e-5, rtol=0)
        # pose[:3] = pi about x turns SMPL's y-up body into the camera's y-down frame: head above hips
        assert sample["joints_3d"][LSP_14.index("head"), 1] < 0
    assert data.protocol["test_has_vertices"] is True


def test_without_smpl_body_model_there_are_no_gt_vertices(tmp_path):
    scene = write_spin_npz(tmp_path / "h36m_train.npz", 4, with_smpl=True)
    data = make_spin_npz(_spec(str(scene.files["npz"]), tmp_path), StubBody())
    sample = data.train[0]
    assert float(sample["has_vertices"]) == 0.0 and (sample["vertices"] == 0).all()
    assert sample["vertices"].shape == (5, 3)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_pchmr_run_trains_and_evaluates_on_a_generated_spin_file(tmp_path, pchmr_cache):
    write_spin_npz(tmp_path / "h36m_train.npz", 20, seed=2)
    env = {**os.environ, "COLUMNS": "200", "PCHMR_CACHE_DIR": pchmr_cache}
    cmd = [
        sys.executable,
        "-m",
        "pchmr.cli.app",
        "run",
        "--dataset",
        f"spin-npz:{tmp_path / 'h36m_train.npz'}",
        "--clients",
        "2",
        "--per-round",
        "2",
        "--rounds",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert np.isfinite(final["mpjpe_mm"]) and final["protocol"]["dataset"].startswith("spin-npz:h36m_train.npz")


def test_spin_protocol_poses_gendered_meshes(tmp_path):
    from pchmr.core.contracts.bodymodel import BodyModelSpec
    from pchmr.plugins.bodymodels.smpl import make_smpl
    from pchmr.testing.fake_smpl import write_fake_smpl

    folder = tmp_path / "smpl"
    for seed, gender in enumerate(("neutral", "male", "female")):
        write_fake_smpl(folder, gender, seed=seed)  # different shape fields per gender
    bodies = {
        g: make_smpl(BodyModelSpec(model_dir=str(folder), extra={"gender": g})) for g in ("neutral", "male", "female")
    }
    scene = write_spin_npz(tmp_path / "3dpw_test.npz", 4, with_smpl=True, with_3d=False, gender=True)
    location = f"train={scene.files['npz']},test={scene.files['npz']},protocol=spin"
    data = make_spin_npz(DatasetSpec(32, 0, tmp_path / "cache", location), bodies["neutral"])
    assert data.protocol["protocol"] == "spin" and "spin protocol" in data.protocol["dataset"]
    pose, betas = scene.extra["pose"], scene.extra["shape"]
    for i, code in enumerate(scene.extra["gender"]):
        body = bodies["male" if code == "m" else "female"]
        with torch.no_grad():
            out = body(
                global_orient=torch.tensor(pose[i : i + 1, :3], dtype=torch.float32),
                body_pose=torch.tensor(pose[i : i + 1, 3:], dtype=torch.float32),
                betas=torch.tensor(betas[i : i + 1], dtype=torch.float32),
            )
        expected = out.vertices[0] - out.joints[0, [3, 2]].mean(0)
        torch.testing.assert_close(data.test[i]["vertices"], expected, atol=1e-5, rtol=0)
    neutral = make_spin_npz(
        DatasetSpec(32, 0, tmp_path / "cache", location.replace("protocol=spin", "protocol=metro")), bodies["neutral"]
    )
    assert not torch.allclose(neutral.test[0]["vertices"], data.test[0]["vertices"], atol=1e-4)
