"""metro-tsv, 3dpw-pkl and coco-json: generated files in the exact layouts load into Samples whose
keypoints, joints, frames and labels match values computed here; bad files fail clearly."""

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.contracts.sample import denormalize_image, validate_sample
from pchmr.core.kit.joints import LSP_14
from pchmr.plugins.datasets.coco import load_coco, make_coco
from pchmr.plugins.datasets.metro_tsv import make_metro_tsv
from pchmr.plugins.datasets.prepared import DatasetFormatError, decode_image
from pchmr.plugins.datasets.pw3d import load_sequence, make_3dpw
from pchmr.testing.fake_datasets import (
    frame_blue,
    write_3dpw_sequence,
    write_coco_keypoints,
    write_metro_tsv,
)
from tests.test_datasets_spin import StubBody

SIZE = 32
HIPS = [LSP_14.index("left_hip"), LSP_14.index("right_hip")]


def spec(path, root, **kw):
    return DatasetSpec(image_size=SIZE, seed=0, cache_dir=root / "cache", path=str(path), **kw)


def check_sample_against_scene(sample, scene, k):
    expected_kp = (scene.keypoints_px[k] - scene.center[k]) / (100.0 * scene.scale[k])
    np.testing.assert_allclose(sample["keypoints_2d"][:, :2].numpy(), expected_kp, atol=1e-4)
    root = scene.joints_cam[k][HIPS].mean(0)
    np.testing.assert_allclose(sample["joints_3d"][:, :3].numpy(), scene.joints_cam[k] - root, atol=1e-5)
    assert (sample["joints_3d"][:, 3] == 1).all()


# --------------------------------------------------------------------------------- METRO TSV


@pytest.fixture(scope="module")
def metro(tmp_path_factory):
    root = tmp_path_factory.mktemp("metro") / "human3.6m"
    train = write_metro_tsv(root, "train", 6, seed=3)
    test = write_metro_tsv(root, "valid", 3, seed=4)
    data = make_metro_tsv(spec(f"train={train.files['yaml']},test={test.files['yaml']}", root), StubBody())
    return train, test, data, root


def test_metro_rows_become_samples_in_crop_coordinates_and_metres(metro):
    train, test, data, _ = metro
    assert len(data.train) == 6 and len(data.test) == 3
    for scene, split in ((train, data.train), (test, data.test)):
        for i in range(len(split)):
            sample = split[i]
            validate_sample(sample, num_joints=14, num_vertices=5, image_size=SIZE)
            k = int(split.store.arrays["image_ref"][i])  # the TSV row
            check_sample_against_scene(sample, scene, k)
    assert set(data.labels["source"]) == {"h36m"} and set(data.labels["subject"]) == {"S1", "S2"}


def test_metro_truncated_tsv_names_the_file(tmp_path):
    scene = write_metro_tsv(tmp_path / "up3d", "trainval", 4)
    img = scene.files["img"]
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    with pytest.raises(DatasetFormatError, match=r"trainval\.img\.tsv: is \d+ bytes but .*lineidx.* truncated"):
        make_metro_tsv(spec(scene.files["yaml"], tmp_path), StubBody())


def _keep_lineidx(scene, rewrite):
    """Run ``rewrite()`` (which rewrites the TSVs and their .lineidx), then put the old .lineidx back."""
    saved = {kind: p.with_suffix(".lineidx").read_bytes() for kind, p in scene.files.items() if kind != "yaml"}
    rewrite()
    for kind, data in saved.items():
        scene.files[kind].with_suffix(".lineidx").write_bytes(data)


@pytest.mark.parametrize("change", ["rows added", "rows rewritten", "rows removed"])
def test_metro_stale_lineidx_is_named(tmp_path, change):
    """A TSV rewritten after its .lineidx was written: the error names the stale .lineidx (with
    rows added, the old reading asked for row 4 of a "4-row" file that has 6)."""
    scene = write_metro_tsv(tmp_path / "up3d", "trainval", 4, seed=0)
    count, seed = {"rows added": (6, 0), "rows rewritten": (4, 1), "rows removed": (3, 1)}[change]
    _keep_lineidx(scene, lambda: write_metro_tsv(tmp_path / "up3d", "trainval", count, seed=seed))
    with pytest.raises(DatasetFormatError, match=r"trainval\.\w+\.tsv: .*\.lineidx is stale") as info:
        make_metro_tsv(spec(scene.files["yaml"], tmp_path), StubBody())
    assert "file has 4 rows" not in str(info.value)


def test_metro_stale_lineidx_of_one_row_read_is_named(tmp_path):
    """A row whose offset lands inside another row: named when the row is read."""
    from pchmr.plugins.datasets.metro_tsv import TSVFile

    scene = write_metro_tsv(tmp_path / "up3d", "trainval", 4)
    lineidx = scene.files["label"].with_suffix(".lineidx")
    offsets = [int(o) for o in lineidx.read_text().split()]
    offsets[2] += 5
    lineidx.write_text("".join(f"{o}\n" for o in offsets))
    tsv = TSVFile(scene.files["label"])
    assert tsv.row(0)[0] == scene.imgname[0]
    with pytest.raises(DatasetFormatError, match=r"row 1 spans bytes .* next row starts at .*lineidx is stale"):
        tsv.row(1)
    with pytest.raises(DatasetFormatError, match=r"row 2 starts at byte \d+, inside another row.*lineidx is stale"):
        tsv.row(2)


@pytest.mark.parametrize("lineidx", [True, False])
@pytest.mark.parametrize("kind", ["label", "img"])
def test_metro_cut_off_last_row_is_reported_as_truncated(tmp_path, kind, lineidx):
    scene = write_metro_tsv(tmp_path / "up3d", "trainval", 4)
    path = scene.files[kind]
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\t") + 40])  # inside the last row's value
    if not lineidx:
        path.with_suffix(".lineidx").unlink()
    with pytest.raises(DatasetFormatError, match=rf"trainval\.{kind}\.tsv: row 3 is cut off: .* truncated"):
        make_metro_tsv(spec(scene.files["yaml"], tmp_path), StubBody())


def test_metro_last_row_without_its_newline_still_loads(tmp_path):
    scene = write_metro_tsv(tmp_path / "up3d", "trainval", 4)
    for kind in ("label", "img"):
        scene.files[kind].write_bytes(scene.files[kind].read_bytes()[:-1])
    data = make_metro_tsv(spec(scene.files["yaml"], tmp_path), StubBody())
    assert len(data.train) + len(data.test) == 4


def test_metro_label_without_a_key_or_with_a_bad_shape(tmp_path):
    scene = write_metro_tsv(tmp_path / "up3d", "trainval", 4)
    label = scene.files["label"]
    label.write_text(label.read_text().replace('"center"', '"centre"', 1))
    with pytest.raises(DatasetFormatError, match=r"trainval\.label\.tsv: row 0 .*lacks \['center'\]"):
        make_metro_tsv(spec(scene.files["yaml"], tmp_path), StubBody())
    scene = write_metro_tsv(tmp_path / "up3d", "trainval", 4)
    rows = [line.split("\t") for line in scene.files["label"].read_text().splitlines()]
    labels = json.loads(rows[1][1])
    labels[0]["3d_joints"] = [[0.0, 0.0, 0.0]]
    rows[1][1] = json.dumps(labels)
    scene.files["label"].write_text("".join("\t".join(r) + "\n" for r in rows))
    (scene.files["label"].with_suffix(".lineidx")).unlink()  # offsets are rescanned
    with pytest.raises(DatasetFormatError, match=r"row 1 '3d_joints' must have shape \(24, 4\)"):
        make_metro_tsv(spec(scene.files["yaml"], tmp_path), StubBody())


# --------------------------------------------------------------------------------- 3DPW


@pytest.fixture(scope="module")
def pw3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("pw3d") / "3DPW"
    train = write_3dpw_sequence(root, "downtown_walking_00", "train", num_frames=4, seed=5)
    test = write_3dpw_sequence(root, "courtyard_basketball_00", "test", num_frames=6, seed=6)
    return train, test, root


def test_3dpw_joints_are_moved_into_the_camera_and_invalid_frames_dropped(pw3d):
    _, test, root = pw3d
    data = make_3dpw(spec(root, root), StubBody())
    assert len(data.test) == int(test.extra["valid"].sum()) == 11
    written = [k for k in range(len(test.imgname)) if test.extra["valid"][k]]
    for i, k in enumerate(written):  # samples keep the file's person-by-person order
        sample = data.test[i]
        validate_sample(sample, num_joints=14, num_vertices=5, image_size=SIZE)
        root_cam = test.joints_cam[k][HIPS].mean(0)
        np.testing.assert_allclose(sample["joints_3d"][:, :3].numpy(), test.joints_cam[k] - root_cam, atol=1e-5)
    assert set(data.labels["scene"]) == {"downtown_walking"} and set(data.labels["action"]) == {"walking"}
    assert sorted(set(data.labels["subject"])) == ["downtown_walking_00/person0", "downtown_walking_00/person1"]


def test_3dpw_global_orientation_is_rotated_into_the_camera_frame(pw3d):
    _, test, _ = pw3d
    ann = load_sequence(test.files["pkl"], LSP_14)
    valid = test.extra["valid"]
    got = Rotation.from_rotvec(ann.pose[:, :3]).as_matrix()
    want = Rotation.from_rotvec(test.extra["orient_cam"][valid]).as_matrix()
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(ann.pose[:, 3:], test.extra["poses"][valid, 3:])
    assert list(ann.gender[:2]) == ["male", "male"] and ann.gender[-1] == "female"
    assert ann.image[1] == "imageFiles/courtyard_basketball_00/image_00001.jpg"  # frame 1, not img_frame_ids[1]


def _background_blue(image):
    """The blue level of the fake background: the median blue of the pixels whose red and green
    are the dark gradient's (markers and zero padding excluded)."""
    image = np.asarray(image, dtype=np.float64)
    background = (image[..., 0] < 70) & (image[..., 1] < 70) & (image[..., 2] > 4) & (image[..., 2] < 245)
    return float(np.median(image[..., 2][background])) if background.sum() > 0.2 * background.size else -1.0


def _shows_frame(root, name, frame):
    """The image ``name`` exists and is 3DPW frame ``frame``'s (its background's blue level)."""
    path = root / name
    return path.is_file() and abs(_background_blue(decode_image(path, str(path))) - frame_blue(frame)) < 6


def test_3dpw_frame_f_reads_image_f_not_img_frame_ids(pw3d):
    """Frame f's image is image_{f:05d}.jpg; img_frame_ids indexes the 60 Hz arrays. Each sample's
    image is its own frame's (the fake images carry their frame in the background colour); the
    image img_frame_ids would name (the old reading) is another frame's or does not exist, and
    the same check refuses it."""
    import pickle

    _, test, root = pw3d
    raw = pickle.loads(test.files["pkl"].read_bytes(), encoding="latin1")
    ids = np.asarray(raw["img_frame_ids"])
    for p in range(2):  # the fake file is in 3DPW's layout: the 60 Hz rows at img_frame_ids are the frames
        assert len(raw["poses_60Hz"][p]) > 2 * len(raw["poses"][p]) - 1
        np.testing.assert_allclose(np.asarray(raw["poses_60Hz"][p])[ids], raw["poses"][p])
        np.testing.assert_allclose(np.asarray(raw["trans_60Hz"][p])[ids], raw["trans"][p])
    ann = load_sequence(test.files["pkl"], LSP_14)
    frames = [k % 6 for k in range(len(test.imgname)) if test.extra["valid"][k]]
    assert list(ann.image) == [f"imageFiles/courtyard_basketball_00/image_{f:05d}.jpg" for f in frames]
    for k, f in enumerate(frames):
        assert _shows_frame(root, ann.image[k], f), (k, ann.image[k])
        old = f"imageFiles/courtyard_basketball_00/image_{ids[f]:05d}.jpg"
        assert not _shows_frame(root, old, f), f"the old reading's {old} passes the check"


def test_3dpw_crops_show_their_own_frame(pw3d):
    """Through the prepared store: every test crop is cut from its own frame's image."""
    _, test, root = pw3d
    data = make_3dpw(spec(root, root), StubBody())
    written = [k for k in range(len(test.imgname)) if test.extra["valid"][k]]
    for i, k in enumerate(written):
        blue = _background_blue(denormalize_image(data.test[i]["image"]).numpy())
        assert abs(blue - test.extra["blue"][k]) < 6, (i, test.imgname[k], blue, test.extra["blue"][k])


def test_3dpw_missing_key_and_truncated_pickle(pw3d, tmp_path):
    import pickle

    _, test, _ = pw3d
    data = pickle.loads(test.files["pkl"].read_bytes(), encoding="latin1")
    del data["cam_poses"]
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(DatasetFormatError, match=r"bad\.pkl: missing key\(s\) \['cam_poses'\]"):
        load_sequence(bad, LSP_14)
    bad.write_bytes(test.files["pkl"].read_bytes()[:300])
    with pytest.raises(DatasetFormatError, match=r"bad\.pkl: not a readable 3DPW pickle"):
        load_sequence(bad, LSP_14)


# --------------------------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "coco"
    train = write_coco_keypoints(root, "train2014", num_images=3, seed=7)
    test = write_coco_keypoints(root, "val2014", num_images=2, seed=8)
    return train, test, root


def test_coco_people_are_2d_only_samples_with_spin_boxes(coco, monkeypatch):
    train, _, root = coco
    import pchmr.plugins.datasets.prepared as prepared

    decoded = []
    original = prepared.decode_image
    monkeypatch.setattr(prepared, "decode_image", lambda *a, **k: decoded.append(a[1]) or original(*a, **k))
    data = make_coco(spec(root, root), StubBody())
    assert len(data.train) == 6 and len(data.test) == 4  # the crowd annotation is skipped
    assert len(decoded) == 3 + 2, "two people per image: each image decoded once"
    refs = list(data.train.store.arrays["image_ref"])
    for i in range(len(data.train)):
        sample = data.train[i]
        validate_sample(sample, num_joints=14, num_vertices=5, image_size=SIZE)
        k = [j for j, name in enumerate(train.imgname) if name == refs[i]][i % 2]
        expected = (train.keypoints_px[k] - train.center[k]) / (100.0 * train.scale[k])
        kp = sample["keypoints_2d"].numpy()
        seen = kp[:, 2] > 0
        np.testing.assert_allclose(kp[seen, :2], expected[seen], atol=0.01)  # JSON keeps 2 decimals
        assert kp[LSP_14.index("neck"), 2] == 0 and kp[LSP_14.index("head"), 2] == 0
        assert (sample["joints_3d"][:, 3] == 0).all() and float(sample["has_vertices"]) == 0
    assert data.train[1]["keypoints_2d"][LSP_14.index("right_ankle"), 2] == 0  # v = 0 → missing
    assert set(data.labels["source"]) == {"coco"} and data.protocol["test_has_3d_joints"] is False


def test_coco_truncated_json_and_bad_keypoints(coco, tmp_path):
    _, _, root = coco
    path = root / "annotations" / "person_keypoints_train2014.json"
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "person_keypoints_x.json").write_text(path.read_text()[:500])
    with pytest.raises(DatasetFormatError, match=r"person_keypoints_x\.json: not valid JSON \(truncated\?\)"):
        load_coco(tmp_path, "x", LSP_14)
    text = path.read_text().replace('"keypoints": [', '"keypoints": [1, ', 1)
    (tmp_path / "annotations" / "person_keypoints_y.json").write_text(text)
    with pytest.raises(DatasetFormatError, match=r"annotation 0 'keypoints' must hold 51 numbers"):
        load_coco(tmp_path, "y", LSP_14)


def test_coco_without_val_annotations_splits_train_by_image(tmp_path):
    root = tmp_path / "coco"
    train = write_coco_keypoints(root, "train2014", num_images=5, seed=7)
    data = make_coco(spec(root, tmp_path), StubBody())
    assert len(data.train) + len(data.test) == 10 and len(data.test) == 2, "1 of 5 images (2 people) is the test split"
    assert "train2014 (seeded 80/20 split by image: no person_keypoints_val2014.json)" in data.protocol["dataset"]
    train_images = set(data.train.store.arrays["image_ref"].tolist())
    test_images = set(data.test.store.arrays["image_ref"].tolist())
    assert not train_images & test_images and train_images | test_images == set(train.imgname)
    with pytest.raises(FileNotFoundError, match=r"person_keypoints_val2014\.json: COCO keypoint annotations do not"):
        make_coco(spec(f"root={root},test=val2014", tmp_path), StubBody())  # a named test split must exist


def test_coco_spin_rule_keeps_people_with_all_12_body_joints(coco, tmp_path):
    """people=spin (SPIN's preprocessing): every second fake person lacks its right ankle → dropped."""
    from pchmr.plugins.datasets.coco import SPIN_BODY_JOINTS

    _, _, root = coco
    assert len(SPIN_BODY_JOINTS) == 12 and SPIN_BODY_JOINTS[0] == "left_shoulder"
    default, _ = load_coco(root, "train2014", LSP_14)
    spin, _ = load_coco(root, "train2014", LSP_14, people="spin")
    assert len(default) == 6 and len(spin) == 3
    assert (spin.keypoints[:, LSP_14.index("right_ankle"), 2] == 1).all()
    data = make_coco(spec(f"root={root},people=spin", tmp_path), StubBody())
    assert (
        len(data.train) == 3 and len(data.test) == 2 and "people=spin: all 12 body joints" in data.protocol["dataset"]
    )
    # every key is read through the declared options: types, choices and the rule between them
    from pchmr.core.contracts.errors import OptionError

    for location, message in (
        (f"root={root},people=spn", r"coco-json dataset option 'people' must be one of min-keypoints, spin, got 'spn'"),
        (f"root={root},min_keypoints=abc", r"coco-json dataset option 'min_keypoints' must be an integer"),
        (f"root={root},people=spin,min_keypoints=3", r"coco-json dataset option 'min_keypoints' applies to people="),
    ):
        with pytest.raises(OptionError, match=message):
            make_coco(spec(location, tmp_path), StubBody())
    with pytest.raises(DatasetFormatError, match=r"no person annotation with all 12 body joints"):
        (tmp_path / "annotations").mkdir()
        doc = json.loads((root / "annotations" / "person_keypoints_val2014.json").read_text())
        for ann in doc["annotations"]:
            ann["keypoints"][-1] = 0  # no right ankle anywhere
        (tmp_path / "annotations" / "person_keypoints_x.json").write_text(json.dumps(doc))
        load_coco(tmp_path, "x", LSP_14, people="spin")


def test_coco_people_option_is_listed_by_pchmr_plugins():
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    result = CliRunner().invoke(app, ["plugins", "--options", "coco-json", "--kind", "dataset"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    line = next(row for row in result.stdout.splitlines() if "people" in row and "spin" in row)
    assert "min-keypoints" in line and "all 12 body joints" in line
