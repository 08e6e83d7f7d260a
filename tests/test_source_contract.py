"""The keypoint- and depth-source contract suites on the built-in sources: per-image files
(COCO-17, OpenPose-25 and Sapiens keypoint JSON; .npy depth maps) written here from a stick
figure, and the synthetic sources over a small synthetic split (Anny); and proof that the suites
can fail."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from pchmr.core.contracts.annotation import AnnotationItem, DepthObservation, KeypointObservation
from pchmr.core.contracts.bodymodel import BodyModelSpec
from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.engine.annotation import items_from_dataset
from pchmr.core.engine.registry import get_registry
from pchmr.core.kit.joints import LSP_14
from pchmr.plugins.annotators.sources import COCO17, OPENPOSE25
from pchmr.testing import DepthSourceContract, KeypointSourceContract
from pchmr.testing.fake_datasets import FIGURE_M, IMAGE_H, IMAGE_W, draw_people
from pchmr.testing.sources import DepthCase, SourceFactory

#: Where the figure stands in each image: (sideways shift m, distance m) and the file layout.
PEOPLE = ((0.0, 4.0, "coco-17"), (0.3, 3.5, "openpose-25"), (-0.2, 5.0, "sapiens"))
FOCAL_PX = 150.0
#: Half the distance between the ears (metres), placed beside the figure's head.
HALF_EAR_SPAN_M = 0.07


def test_every_registered_builtin_source_is_covered() -> None:
    registry = get_registry()
    for kind in ("keypoint_source", "depth_source"):
        builtins = {info.name for info in registry.infos(kind) if info.distribution == "pchmr"}
        assert builtins == {"files", "synthetic"}, f"add a {kind} contract test class for {builtins}"


def _figure_px(shift: float, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """LSP-14 camera-frame joints of the figure and their (14, 2) pixel projections."""
    joints = FIGURE_M + np.array([shift, 0.0, depth])
    return joints, FOCAL_PX * joints[:, :2] / joints[:, 2:] + np.array([IMAGE_W / 2, IMAGE_H / 2])


def _layout(points_px: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """(K, 3) detector keypoints of a layout from the figure: LSP-14 names where they exist, the
    ears beside the head (LSP's head is their mean), everything else unconfident."""
    out = np.zeros((len(names), 3))
    for j, name in enumerate(LSP_14):
        if name in names:
            out[names.index(name)] = (*points_px[j], 0.9)
    head = points_px[LSP_14.index("head")]
    ear = FOCAL_PX * HALF_EAR_SPAN_M / 4.0
    out[names.index("left_ear")] = (head[0] + ear, head[1], 0.9)
    out[names.index("right_ear")] = (head[0] - ear, head[1], 0.9)
    return out


def _write_keypoints(path: Path, points: np.ndarray, layout: str) -> None:
    if layout == "openpose-25":
        data: object = {"people": [{"pose_keypoints_2d": points.ravel().tolist()}]}
    elif layout == "sapiens":
        data = {"instance_info": [{"keypoints": points[:, :2].tolist(), "keypoint_scores": points[:, 2].tolist()}]}
    else:
        data = {"keypoints": points.tolist()}
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def figure_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[AnnotationItem], list[np.ndarray]]:
    """Keypoint JSON and .npy depth maps of three images: (root, items, true camera-frame joints)."""
    root = tmp_path_factory.mktemp("figure-files")
    (root / "keypoints").mkdir()
    (root / "depth").mkdir()
    items, joints = [], []
    for k, (shift, depth, layout) in enumerate(PEOPLE):
        cam, px = _figure_px(shift, depth)
        names = OPENPOSE25 if layout == "openpose-25" else COCO17
        _write_keypoints(root / "keypoints" / f"img{k}.json", _layout(px, names), layout)
        np.save(root / "depth" / f"img{k}.npy", np.full((IMAGE_H, IMAGE_W), depth, dtype=np.float32))
        items.append(AnnotationItem(f"img{k}", image=draw_people(px[None], seed=k)))
        joints.append(cam)
    (root / "keypoints" / "nobody.json").write_text(json.dumps({"people": []}))
    (root / "keypoints" / "twelve.json").write_text(json.dumps({"keypoints": [[1.0, 1.0, 1.0]] * 12}))
    np.save(root / "depth" / "nan.npy", np.full((IMAGE_H, IMAGE_W), np.nan))
    return root, items, joints


@pytest.fixture(scope="module")
def synthetic_items(pchmr_cache: str) -> list[AnnotationItem]:
    """Four images of a 64-pixel synthetic split (Anny) with their ground truth."""
    registry = get_registry()
    anny = registry.get("body_model", "anny")(BodyModelSpec(cache_dir=str(Path(pchmr_cache) / "pyramids")))
    spec = DatasetSpec(image_size=64, seed=0, cache_dir=Path(pchmr_cache) / "datasets", num_train=4, num_test=1)
    return items_from_dataset(registry.get("dataset", "synthetic")(spec, anny).train)


def _registered(kind: str, name: str) -> SourceFactory:
    return get_registry().get(kind, name)


# ----------------------------------------------------------------------------- keypoints
class TestFileKeypoints(KeypointSourceContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_source(cls) -> SourceFactory:
        return _registered("keypoint_source", "files")

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls, figure_files: tuple[Path, list, list]) -> Mapping[str, object]:
        return {"directory": str(figure_files[0] / "keypoints")}

    @pytest.fixture(scope="class")
    @classmethod
    def items(cls, figure_files: tuple[Path, list, list]) -> Sequence[AnnotationItem]:
        return figure_files[1]

    @pytest.fixture(scope="class")
    @classmethod
    def bad_items(cls) -> Mapping[str, tuple[AnnotationItem, str]]:
        return {
            "no keypoint file": (AnnotationItem("lonely"), r"no keypoint file lonely.json"),
            "no person": (AnnotationItem("nobody"), r"nobody.json holds no person"),
            "an unknown layout": (AnnotationItem("twelve"), r"has 12 keypoints per person; known layouts: coco-17"),
        }

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls, tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, tuple[Mapping[str, object], str]]:
        missing = tmp_path_factory.getbasetemp() / "no-such-keypoints"
        return {"a missing directory": ({"directory": str(missing)}, rf"keypoint directory {missing} does not exist")}

    def test_the_figure_is_read_in_lsp_order(self, observations: list[KeypointObservation]) -> None:
        """Every joint where the figure put it, but the neck: the sources make it the shoulders' mean."""
        kept = [j for j, name in enumerate(LSP_14) if name != "neck"]
        for k, obs in enumerate(observations):
            _, px = _figure_px(*PEOPLE[k][:2])
            np.testing.assert_allclose(obs.keypoints[kept, :2], px[kept], atol=1e-3)


class TestSyntheticKeypoints(KeypointSourceContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_source(cls) -> SourceFactory:
        return _registered("keypoint_source", "synthetic")

    @pytest.fixture(scope="class")
    @classmethod
    def items(cls, synthetic_items: list[AnnotationItem]) -> Sequence[AnnotationItem]:
        return synthetic_items

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {
            "negative noise": ({"noise_px": -1.0}, r"option 'noise_px' must be a number >= 0, got -1.0"),
            "everything missing": ({"missing": 1.0}, r"option 'missing' must be a number in \[0, 1\), got 1.0"),
        }


# ----------------------------------------------------------------------------- depth
class TestFileDepth(DepthSourceContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_source(cls) -> SourceFactory:
        return _registered("depth_source", "files")

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls, figure_files: tuple[Path, list, list]) -> Mapping[str, object]:
        return {"directory": str(figure_files[0] / "depth"), "invariance": "metric"}

    @pytest.fixture(scope="class")
    @classmethod
    def cases(cls, figure_files: tuple[Path, list, list]) -> Sequence[DepthCase]:
        root, items, _ = figure_files
        source = _registered("keypoint_source", "files")(root / "keypoints")
        return [(item, source(item, LSP_14).keypoints) for item in items]

    @pytest.fixture(scope="class")
    @classmethod
    def bad_cases(
        cls, cases: Sequence[DepthCase], figure_files: tuple[Path, list, list]
    ) -> Mapping[str, tuple[AnnotationItem, np.ndarray, str]]:
        keypoints = cases[0][1]
        image = figure_files[1][0].image
        return {
            "NaN everywhere": (AnnotationItem("nan", image=image), keypoints, r"nan: depth is NaN.* at 14 of the 14"),
            "no depth map": (AnnotationItem("lonely", image=image), keypoints, r"no depth map lonely.npy/.png"),
        }

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls, figure_files: tuple[Path, list, list]) -> Mapping[str, tuple[Mapping[str, object], str]]:
        directory = str(figure_files[0] / "depth")
        return {"an unknown invariance": ({"directory": directory, "invariance": "relative"}, r"must be one of")}

    def test_constant_maps_give_their_depth(self, observations: list[DepthObservation]) -> None:
        for k, obs in enumerate(observations):
            assert obs.valid.all() and np.allclose(obs.depth, PEOPLE[k][1])


class TestSyntheticDepth(DepthSourceContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_source(cls) -> SourceFactory:
        return _registered("depth_source", "synthetic")

    @pytest.fixture(scope="class", params=["scale", "affine", "metric"])
    @classmethod
    def options(cls, request: pytest.FixtureRequest) -> Mapping[str, object]:
        return {"invariance": request.param}

    @pytest.fixture(scope="class")
    @classmethod
    def cases(cls, synthetic_items: list[AnnotationItem]) -> Sequence[DepthCase]:
        source = _registered("keypoint_source", "synthetic")(missing=0.0)
        return [(item, source(item, LSP_14).keypoints) for item in synthetic_items]

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {
            "an unknown invariance": (
                {"invariance": "relative"},
                r"option 'invariance' must be one of metric, scale, affine, got 'relative'",
            ),
            "a scale range below 1": ({"max_scale": 0.5}, r"option 'max_scale' must be a number >= 1, got 0.5"),
        }


# --------------------------------------------------------------------------------------
# The suites must be able to fail.
# --------------------------------------------------------------------------------------
def _run(suite: type, check: str, values: Mapping[str, object]) -> None:
    method = getattr(suite(), check)
    method(**{name: values[name] for name in inspect.signature(method).parameters})


def test_the_keypoint_suite_catches_crop_coordinates_and_an_upside_down_person() -> None:
    item = AnnotationItem("x", image=np.zeros((IMAGE_H, IMAGE_W, 3), np.uint8))
    _, px = _figure_px(0.0, 4.0)
    crop = (px - px.mean(0)) / 100.0
    upside_down = np.array([IMAGE_W, IMAGE_H]) - px
    for points, check, message in (
        (crop, "test_keypoints_are_image_pixels", r"keypoints span 0.* pixels\?"),
        (upside_down, "test_people_stand_upright_in_image_coordinates", r"below the ankles in 1 of 1 items"),
    ):
        obs = KeypointObservation(np.concatenate([points, np.ones((14, 1))], 1).astype(np.float32))
        with pytest.raises(AssertionError, match=message):
            _run(KeypointSourceContract, check, {"observations": [obs], "items": [item], "joint_names": LSP_14})


def test_the_depth_suite_catches_a_depth_for_a_missing_keypoint() -> None:
    def careless(item: AnnotationItem, keypoints: np.ndarray) -> DepthObservation:
        n = len(keypoints)
        return DepthObservation(np.full(n, 4.0, np.float32), np.ones(n, np.float32), "metric")

    case = (AnnotationItem("x"), np.ones((14, 3), np.float32))
    with pytest.raises(AssertionError, match="a missing keypoint got a valid depth"):
        _run(
            DepthSourceContract, "test_unconfident_keypoints_get_no_valid_depth", {"source": careless, "cases": [case]}
        )
