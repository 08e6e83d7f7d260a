"""Keypoint/depth sources and the annotation pipeline: layouts, crops, and per-image errors
(no person, wrong layout, NaN depth, count mismatch) recorded while the other images are
annotated. A stub annotator keeps these tests free of fitting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pchmr.core.contracts.annotation import (
    AnnotationItem,
    DepthError,
    FitResult,
    KeypointLayoutError,
    NoPersonError,
    ObservationBatch,
    pixels_to_crop,
)
from pchmr.core.engine.annotation import (
    PseudoLabelSet,
    annotate_items,
    items_from_folder,
    write_pseudo_labels,
)
from pchmr.plugins.annotators.sources import (
    COCO17,
    OPENPOSE25,
    FileDepthSource,
    FileKeypointSource,
    sample_depth,
    to_lsp14,
)
from pchmr.plugins.bodymodels.anny import JOINT_NAMES

J = len(JOINT_NAMES)


class StubAnnotator:
    """Returns a fixed mesh and records which image ids it saw."""

    name = "stub"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def fit(self, batch: ObservationBatch) -> FitResult:
        self.seen.extend(batch.image_ids)
        b = len(batch)
        return FitResult(vertices=torch.zeros(b, 5, 3), joints=torch.zeros(b, J, 3), translation=torch.zeros(b, 3),
                         params={}, losses={"total": torch.arange(b, dtype=torch.float32)})  # fmt: skip

    def describe(self) -> dict[str, object]:
        return {"annotator": self.name}


def _coco_person(width: float = 100.0) -> list[list[float]]:
    """17 COCO keypoints spread over a 100 x 200 pixel box, all confident."""
    rng = np.random.default_rng(0)
    return [[float(x), float(y), 0.9] for x, y in zip(rng.uniform(50, 50 + width, 17), rng.uniform(20, 220, 17))]


def test_coco_keypoints_map_to_lsp14_with_neck_and_head_as_means():
    points = np.zeros((17, 3))
    points[:, 2] = 1.0
    points[COCO17.index("left_shoulder"), :2] = (10, 20)
    points[COCO17.index("right_shoulder"), :2] = (30, 40)
    points[COCO17.index("left_ear"), :2] = (0, 0)
    points[COCO17.index("right_ear"), 2] = 0.1  # below the confidence floor: the head is missing
    out = to_lsp14(points, COCO17, JOINT_NAMES, "img")
    assert out[JOINT_NAMES.index("neck")].tolist() == [20.0, 30.0, 1.0]
    assert out[JOINT_NAMES.index("head"), 2] == 0.0
    assert out[JOINT_NAMES.index("left_shoulder"), :2].tolist() == [10.0, 20.0]


def test_openpose_file_is_read_and_the_most_confident_person_wins(tmp_path):
    weak = np.zeros((25, 3)).ravel().tolist()
    strong = np.zeros((25, 3))
    strong[:, :2] = np.arange(50).reshape(25, 2)
    strong[:, 2] = 0.8
    (tmp_path / "a_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": weak},
                                                                      {"pose_keypoints_2d": strong.ravel().tolist()}]}))  # fmt: skip
    obs = FileKeypointSource(tmp_path)(AnnotationItem("a"), JOINT_NAMES)
    assert (
        obs.keypoints[JOINT_NAMES.index("right_ankle"), :2].tolist()
        == strong[OPENPOSE25.index("right_ankle"), :2].tolist()
    )
    assert obs.intrinsics is None


def test_sapiens_instance_info_json_is_read(tmp_path):
    person = np.array(_coco_person())
    data = {"instance_info": [{"keypoints": person[:, :2].tolist(), "keypoint_scores": person[:, 2].tolist()}]}
    (tmp_path / "s.json").write_text(json.dumps(data))
    obs = FileKeypointSource(tmp_path)(AnnotationItem("s"), JOINT_NAMES)
    assert obs.keypoints[JOINT_NAMES.index("left_hip"), :2] == pytest.approx(person[COCO17.index("left_hip"), :2])


def test_wrong_layout_and_empty_files_raise_per_image_errors(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"keypoints": [[1.0, 2.0, 1.0]] * 18}))
    (tmp_path / "empty.json").write_text(json.dumps({"people": []}))
    source = FileKeypointSource(tmp_path)
    with pytest.raises(KeypointLayoutError, match=r"bad: .*18 keypoints.*coco-17 \(17\)"):
        source(AnnotationItem("bad"), JOINT_NAMES)
    with pytest.raises(NoPersonError, match="empty"):
        source(AnnotationItem("empty"), JOINT_NAMES)


def test_depth_is_sampled_from_a_map_of_another_resolution():
    depth = np.arange(16, dtype=float).reshape(4, 4) + 1.0  # 4x4 map for an 8x8 image
    keypoints = np.array([[1.0, 1.0, 1.0], [7.0, 7.0, 1.0], [7.0, 1.0, 0.0]])
    values, valid = sample_depth(depth, keypoints, (8, 8))
    assert values[0] == pytest.approx(np.median([1, 2, 5, 6]))  # 3x3 window clipped at the corner
    assert valid.tolist() == [1.0, 1.0, 0.0]


def test_nan_depth_at_most_keypoints_is_a_depth_error(tmp_path):
    np.save(tmp_path / "x.npy", np.full((8, 8), np.nan))
    item = AnnotationItem("x", image=np.zeros((8, 8, 3), np.uint8))
    keypoints = np.array([[1.0, 1.0, 1.0], [5.0, 5.0, 1.0]] * 7)
    with pytest.raises(DepthError, match=r"x: depth is NaN.* at 14 of the 14"):
        FileDepthSource(tmp_path)(item, keypoints)


def test_pixels_to_crop_maps_the_box_corners_to_minus_one_and_one():
    kp, k = pixels_to_crop(
        np.array([[10.0, 20.0, 1.0], [110.0, 120.0, 0.5]]), np.array([200.0, 60.0, 70.0]), (10.0, 20.0, 100.0)
    )
    assert kp.tolist() == [[-1.0, -1.0, 1.0], [1.0, 1.0, 0.5]]
    assert k.tolist() == pytest.approx([4.0, 0.0, 0.0])


def test_pipeline_records_every_failure_and_annotates_the_rest(tmp_path):
    from PIL import Image

    images, keypoints, depth = tmp_path / "img", tmp_path / "kp", tmp_path / "depth"
    for d in (images, keypoints, depth):
        d.mkdir()
    for stem in ("good1", "good2", "nobody", "layout", "nandepth", "nokeypoints"):
        Image.fromarray(np.full((240, 200, 3), 128, np.uint8)).save(images / f"{stem}.png")
    for stem in ("good1", "good2", "nandepth"):
        (keypoints / f"{stem}.json").write_text(json.dumps({"keypoints": _coco_person()}))
    (keypoints / "nobody.json").write_text(json.dumps({"people": []}))
    (keypoints / "layout.json").write_text(json.dumps({"keypoints": [[1.0, 1.0, 1.0]] * 12}))
    (keypoints / "orphan.json").write_text(json.dumps({"keypoints": _coco_person()}))
    for stem in ("good1", "good2"):
        np.save(depth / f"{stem}.npy", np.full((240, 200), 3.0))
    np.save(depth / "nandepth.npy", np.full((240, 200), np.nan))

    kp_source = FileKeypointSource(keypoints)
    items, early = items_from_folder(images, kp_source.stems())
    annotator = StubAnnotator()
    result = annotate_items(
        items, annotator, JOINT_NAMES, kp_source, FileDepthSource(depth), crop_size=32, batch_size=1
    )
    result.records[:0] = early
    status = {r.image_id: (r.status, r.error) for r in result.records}
    assert status == {
        "good1": ("ok", None), "good2": ("ok", None), "nobody": ("failed", "NoPersonError"),
        "layout": ("failed", "KeypointLayoutError"), "nandepth": ("failed", "DepthError"),
        "nokeypoints": ("failed", "CountMismatchError"), "orphan": ("failed", "CountMismatchError"),
    }  # fmt: skip
    assert annotator.seen == ["good1", "good2"]
    assert result.crops[0].shape == (32, 32, 3)

    out = write_pseudo_labels(tmp_path / "out", result, {"annotator": "stub"})
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 7 and json.loads((out / "info.json").read_text())["gt"] == "pseudo"
    labels = PseudoLabelSet(out)
    sample = labels[1]
    assert sample["image"].shape == (3, 32, 32) and sample["joints_3d"].shape == (J, 4)
    assert sample["meta"]["label"] == "pseudo"
    with pytest.raises(ValueError, match="no ground truth"):
        PseudoLabelSet(out, ground_truth=True)


def test_synthetic_sources_corrupt_ground_truth_deterministically():
    from pchmr.core.contracts.errors import OptionError
    from pchmr.plugins.annotators.sources import file_depth, synthetic_depth, synthetic_keypoints

    class Split:
        def array(self, name):
            arrays = {
                "images": np.zeros((1, 224, 224, 3), np.uint8),
                "keypoints_2d": np.zeros((1, J, 3), np.float32),
                "camera": np.array([[500.0, 112.0, 112.0]], np.float32),
                "joints_3d": np.zeros((1, J, 4), np.float32),
                "root_cam": np.array([[0.0, 0.0, 4.0]], np.float32),
            }
            return arrays[name]

    item = AnnotationItem("s0", image=np.zeros((224, 224, 3), np.uint8), dataset=Split(), index=0)
    clean = synthetic_keypoints(noise_px=0.0, missing=0.0, outliers=0.0)(item, JOINT_NAMES)
    assert np.allclose(clean.keypoints[:, :2], 112.0) and clean.keypoints[:, 2].min() == 1.0
    noisy = synthetic_keypoints(**{"noise-px": 4, "missing": 0.0, "outliers": "0"})  # as the command line gives them
    a, b = noisy(item, JOINT_NAMES), noisy(item, JOINT_NAMES)
    assert np.array_equal(a.keypoints, b.keypoints) and 1.0 < np.std(a.keypoints[:, :2] - 112.0) < 8.0
    depth = synthetic_depth(noise_m=0.0, missing=0.0)(item, clean.keypoints)
    assert depth.invariance == "scale"
    assert np.allclose(depth.depth, depth.depth[0]) and not np.isclose(depth.depth[0], 4.0)  # unknown scale
    with pytest.raises(OptionError, match=r"synthetic keypoint source option 'missing' must be a number in \[0, 1\)"):
        synthetic_keypoints(missing=1.0)
    with pytest.raises(
        OptionError, match="files depth source option 'invariance' must be one of metric, scale, affine"
    ):
        file_depth(".", invariance="relative")


def test_cli_annotate_refuses_an_unknown_target_and_a_folder_without_keypoints(tmp_path):
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["annotate", "no-such-thing", "--annotator", "smplifyx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "neither an image folder nor a dataset" in result.output
    result = runner.invoke(app, ["annotate", str(tmp_path), "--annotator", "smplifyx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--keypoints" in result.output
