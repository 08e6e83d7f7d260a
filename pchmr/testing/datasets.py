"""Contract suite for dataset plugins (:class:`~pchmr.core.contracts.dataset.DatasetFactory`).

Subclass :class:`DatasetContract` and override the ``make_dataset`` fixture (the factory
``(spec, body_model) -> HMRData`` a plugin registers)::

    import pytest
    from pchmr.testing import DatasetContract, registered

    class TestMyDataset(DatasetContract):
        @pytest.fixture(scope="class")
        @classmethod
        def make_dataset(cls):
            return registered("dataset", "my-dataset")

        @pytest.fixture(scope="class")
        @classmethod
        def bad_specs(cls):
            return {"no training sample": ({"num_train": 0}, r"num_train=0")}

Other fixtures to override (class-scoped, written as classmethods like the above):

* ``body_model`` — what the data is prepared for (default: :class:`~pchmr.testing.toys.ToyBodyModel`,
  14 LSP joints, 578 vertices);
* ``dataset_path`` (default None: ``spec.path``), ``dataset_options`` (``spec.options``, default
  ``{}``), ``image_size`` (32), ``num_train`` (8), ``num_test`` (4): the :class:`DatasetSpec`
  the checks prepare (``cache_dir`` is a fresh temporary directory per class);
* ``bad_specs`` — ``{description: (changes, regex)}``: ``dataclasses.replace(spec, **changes)``
  must raise ``ValueError`` or ``OSError`` whose message matches ``regex``;
* ``known_gaps`` — ``{check name: reason}``: those checks run as ``xfail`` with the reason.

The data is prepared once per class; the checks read every sample of both splits, so keep
``num_train`` and ``num_test`` small.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, ExpectedFile, FileChecker, HMRData
from pchmr.core.contracts.sample import IMAGE_MEAN, IMAGE_STD, META_KEYS, validate_sample
from pchmr.testing.suite import ContractSuite, raises_matching
from pchmr.testing.toys import ToyBodyModel

__all__ = ["CONTRACT_SEED", "DatasetContract", "DatasetMaker", "fit_weak_perspective"]

DatasetMaker = Callable[[DatasetSpec, BodyModel], HMRData]

CONTRACT_SEED = 0
#: Joints must be root-relative within this (metres).
ROOT_ATOL_M = 1e-3
#: A mesh's root (regressed from its vertices) must lie this close to the joints' root (metres).
VERTEX_ROOT_TOLERANCE_M = 0.05
#: No root-relative vertex of a person lies farther than this from the root (metres).
MAX_EXTENT_M = 3.0
#: A weak-perspective camera must explain the 2D keypoints from the 3D joints within this RMS
#: error (crop units; 0.1 is 5 % of the crop side: perspective effects stay well below it).
PROJECTION_RMS_TOLERANCE = 0.1
#: Fewest joints valid in 2D and 3D for the projection check to use a sample.
MIN_PROJECTION_JOINTS = 4
#: Confident keypoints lie within this of the crop centre (crop units; the crop spans [-1, 1]).
MAX_KEYPOINT_EXTENT = 2.0


def fit_weak_perspective(joints: Tensor, keypoints: Tensor) -> tuple[float, float]:
    """Least-squares weak-perspective camera ``uv = s * xy + (tx, ty)`` from (N, 3) camera-frame
    joints to (N, 2) crop coordinates: returns ``(s, rms residual)`` in crop units."""
    n = len(joints)
    design = torch.zeros(2 * n, 3, dtype=torch.float64)
    design[0::2, 0], design[0::2, 1] = joints[:, 0].double(), 1.0
    design[1::2, 0], design[1::2, 2] = joints[:, 1].double(), 1.0
    target = keypoints[:, :2].double().reshape(-1, 1)
    solution = torch.linalg.lstsq(design, target).solution
    residual = (design @ solution - target).square().mean().sqrt()
    return float(solution[0, 0]), float(residual)


def _samples(split: Any) -> list[Mapping[str, Any]]:
    return [split[i] for i in range(len(split))]


def _image_bounds() -> tuple[Tensor, Tensor]:
    """Per-channel (3, 1, 1) bounds of a normalised image: what 0 and 255 become."""
    mean, std = torch.tensor(IMAGE_MEAN).view(3, 1, 1), torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


class DatasetContract(ContractSuite):
    """Checks every dataset plugin must pass; see the module docstring for the fixtures."""

    # -- fixtures to override -------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def make_dataset(cls) -> DatasetMaker:
        raise NotImplementedError("override the make_dataset fixture: the factory (spec, body_model) -> HMRData")

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        return ToyBodyModel()

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls) -> str | None:
        return None

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_options(cls) -> Mapping[str, object]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def image_size(cls) -> int:
        return 32

    @pytest.fixture(scope="class")
    @classmethod
    def num_train(cls) -> int:
        return 8

    @pytest.fixture(scope="class")
    @classmethod
    def num_test(cls) -> int:
        return 4

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {}

    # -- plumbing -------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def spec(
        cls, tmp_path_factory: pytest.TempPathFactory, image_size: int, num_train: int, num_test: int,
        dataset_path: str | None, dataset_options: Mapping[str, object],
    ) -> DatasetSpec:  # fmt: skip
        return DatasetSpec(
            image_size=image_size, seed=CONTRACT_SEED, cache_dir=tmp_path_factory.mktemp("dataset-contract-cache"),
            path=dataset_path, num_train=num_train, num_test=num_test, options=dict(dataset_options),
        )  # fmt: skip

    @pytest.fixture(scope="class")
    @classmethod
    def data(cls, make_dataset: DatasetMaker, spec: DatasetSpec, body_model: BodyModel) -> HMRData:
        """The data prepared once per class."""
        return make_dataset(spec, body_model)

    @pytest.fixture(scope="class")
    @classmethod
    def samples(cls, data: HMRData) -> dict[str, list[Mapping[str, Any]]]:
        """Every sample of both splits, read once per class."""
        return {"train": _samples(data.train), "test": _samples(data.test)}

    # -- checks: the splits ---------------------------------------------------------------
    def test_returns_hmr_data_with_both_splits(self, data: HMRData) -> None:
        """The factory returns HMRData whose train and test splits are non-empty map-style datasets."""
        assert isinstance(data, HMRData), f"the factory returned {type(data).__name__}, not HMRData"
        for split in ("train", "test"):
            dataset = getattr(data, split)
            assert callable(getattr(dataset, "__len__", None)) and callable(getattr(dataset, "__getitem__", None)), (
                f"{split} must be a map-style dataset (__len__ and __getitem__)"
            )
            assert len(dataset) > 0, f"the {split} split is empty"

    def test_split_sizes_respect_the_spec(self, data: HMRData, spec: DatasetSpec) -> None:
        """At most ``spec.num_train`` training and ``spec.num_test`` test samples."""
        for split, limit in (("train", spec.num_train), ("test", spec.num_test)):
            n = len(getattr(data, split))
            assert limit is None or n <= limit, f"{n} {split} samples, the spec asked for at most {limit}"

    def test_samples_follow_the_schema(
        self, samples: dict[str, list[Mapping[str, Any]]], body_model: BodyModel, spec: DatasetSpec
    ) -> None:
        """Every sample passes ``validate_sample`` at ``spec.image_size``, with float32 tensors,
        an int64 ``index``, ``has_vertices`` 0 or 1 and images normalised with
        ``IMAGE_MEAN``/``IMAGE_STD`` (values inside what 0..255 become)."""
        low, high = _image_bounds()
        for split, items in samples.items():
            for i, sample in enumerate(items):
                where = f"{split}[{i}]"
                validate_sample(sample, num_joints=body_model.num_joints, num_vertices=body_model.num_vertices,
                                image_size=spec.image_size)  # fmt: skip
                for key in ("image", "keypoints_2d", "joints_3d", "vertices", "has_vertices"):
                    assert sample[key].dtype == torch.float32, f"{where} '{key}' is {sample[key].dtype}, not float32"
                assert sample["index"].dtype == torch.int64, f"{where} 'index' is {sample['index'].dtype}, not int64"
                assert float(sample["has_vertices"]) in (0.0, 1.0), f"{where} 'has_vertices' must be 0 or 1"
                image = sample["image"]
                assert ((image >= low - 1e-4) & (image <= high + 1e-4)).all(), (
                    f"{where} 'image' spans {float(image.min()):.3g}..{float(image.max()):.3g}: normalise uint8 "
                    "crops with normalize_image (IMAGE_MEAN, IMAGE_STD)"
                )

    def test_index_is_the_position_in_the_split(self, samples: dict[str, list[Mapping[str, Any]]]) -> None:
        """``sample['index']`` of the i-th sample of a split is i."""
        for split, items in samples.items():
            indices = [int(sample["index"]) for sample in items]
            assert indices == list(range(len(items))), f"{split} indices are {indices[:10]}, expected 0, 1, 2, ..."

    # -- checks: units and frames ---------------------------------------------------------
    def test_joints_are_root_relative(self, samples: dict[str, list[Mapping[str, Any]]], body_model: BodyModel) -> None:
        """Where the root joints are valid, their mean (the root) is at the origin."""
        root = list(body_model.root_joints)
        for split, items in samples.items():
            for i, sample in enumerate(items):
                joints = sample["joints_3d"]
                if (joints[root, 3] > 0).all():
                    centre = joints[root, :3].mean(dim=0)
                    assert float(centre.abs().max()) < ROOT_ATOL_M, (
                        f"{split}[{i}]: the root of joints_3d is at {centre.tolist()}; joints must be root-relative"
                    )

    def test_keypoints_are_a_projection_of_the_joints(self, samples: dict[str, list[Mapping[str, Any]]]) -> None:
        """Confident keypoints are crop coordinates (within ±2), and a weak-perspective camera
        with a positive scale maps the valid 3D joints onto them (RMS < 0.1 crop units): 2D and
        3D agree on x right, y down."""
        fitted = 0
        for split, items in samples.items():
            for i, sample in enumerate(items):
                keypoints, joints = sample["keypoints_2d"], sample["joints_3d"]
                confident = keypoints[:, 2] > 0
                if confident.any():
                    extent = float(keypoints[confident, :2].abs().max())
                    assert extent <= MAX_KEYPOINT_EXTENT, (
                        f"{split}[{i}]: a keypoint lies at {extent:.3g} from the crop centre: crop coordinates "
                        "span [-1, 1] (pixels?)"
                    )
                both = confident & (joints[:, 3] > 0)
                if int(both.sum()) < MIN_PROJECTION_JOINTS:
                    continue
                scale, rms = fit_weak_perspective(joints[both, :3], keypoints[both])
                assert scale > 0 and rms < PROJECTION_RMS_TOLERANCE, (
                    f"{split}[{i}]: the best weak-perspective camera has scale {scale:.3g} and RMS error {rms:.3g} "
                    "crop units: keypoints_2d and joints_3d disagree (mirrored or flipped axes?)"
                )
                fitted += 1
        if not fitted:
            pytest.skip(f"no sample has {MIN_PROJECTION_JOINTS} joints valid in both 2D and 3D")

    def test_people_stand_upright_in_the_camera_frame(
        self, samples: dict[str, list[Mapping[str, Any]]], body_model: BodyModel
    ) -> None:
        """Camera frame, y down: in most samples the head's y is smaller than the ankles'."""
        names = list(body_model.joint_names)
        if not {"head", "left_ankle", "right_ankle"} <= set(names):
            pytest.skip("the joint set has no head and ankles")
        head, ankles = names.index("head"), [names.index("left_ankle"), names.index("right_ankle")]
        upright = total = 0
        for items in samples.values():
            for sample in items:
                joints = sample["joints_3d"]
                if joints[head, 3] > 0 and (joints[ankles, 3] > 0).all():
                    total += 1
                    upright += int(joints[head, 1] < joints[ankles, 1].mean())
        if not total:
            pytest.skip("no sample has a valid head and valid ankles")
        assert upright > total / 2, (
            f"the head is below the ankles in {total - upright} of {total} samples: joints_3d must be in the camera "
            "frame (y down)"
        )

    def test_vertices_are_root_relative_metres(
        self, samples: dict[str, list[Mapping[str, Any]]], body_model: BodyModel
    ) -> None:
        """``vertices`` are zeros when ``has_vertices`` is 0; otherwise root-relative metres: the
        body model's root regressed from them lies within 5 cm of the origin, every vertex within 3 m."""
        for split, items in samples.items():
            for i, sample in enumerate(items):
                vertices = sample["vertices"]
                if float(sample["has_vertices"]) == 0.0:
                    assert not vertices.any(), f"{split}[{i}]: has_vertices is 0 but vertices are not zeros"
                    continue
                root = body_model.root(body_model.joints_from_vertices(vertices[None].float()))[0, 0]
                assert float(root.norm()) < VERTEX_ROOT_TOLERANCE_M, (
                    f"{split}[{i}]: the mesh's root is at {root.tolist()}; vertices must be root-relative metres"
                )
                extent = float(vertices.abs().max())
                assert extent < MAX_EXTENT_M, f"{split}[{i}]: a vertex lies {extent:.3g} from the root (metres?)"

    # -- checks: labels and records -------------------------------------------------------
    def test_meta_matches_the_labels(self, data: HMRData, samples: dict[str, list[Mapping[str, Any]]]) -> None:
        """``labels`` holds a (N_train,) array per META_KEYS label, and sample i's ``meta``
        equals ``labels[key][i]`` (partitioners split on the labels without reading samples)."""
        missing = [key for key in META_KEYS if key not in data.labels]
        assert not missing, f"labels lacks {missing}; every dataset fills {list(META_KEYS)}"
        for i, sample in enumerate(samples["train"]):
            for key in META_KEYS:
                assert str(sample["meta"][key]) == str(data.labels[key][i]), (
                    f"train[{i}] meta[{key!r}] is {sample['meta'][key]!r}, labels[{key!r}][{i}] is {data.labels[key][i]!r}"
                )

    def test_protocol_names_the_dataset_and_its_ground_truth(self, data: HMRData) -> None:
        """``protocol`` is JSON-able, names the ``dataset`` and says whether the ground truth
        (``gt``) is ``real`` or ``pseudo``."""
        json.dumps(dict(data.protocol))
        assert isinstance(data.protocol.get("dataset"), str) and data.protocol["dataset"], (
            "protocol['dataset'] is missing"
        )
        assert data.protocol.get("gt") in ("real", "pseudo"), f"protocol['gt'] is {data.protocol.get('gt')!r}"

    def test_train_mean_joints_when_given(self, data: HMRData, body_model: BodyModel) -> None:
        """``train_mean_joints``, when given (not None), is a finite (J, 3) array."""
        mean = data.train_mean_joints
        if mean is None:
            return
        assert np.shape(mean) == (body_model.num_joints, 3), f"train_mean_joints has shape {np.shape(mean)}"
        assert np.isfinite(mean).all(), "train_mean_joints has NaN or infinite values"

    # -- checks: reproducibility ----------------------------------------------------------
    def test_same_spec_gives_the_same_samples(
        self, make_dataset: DatasetMaker, spec: DatasetSpec, body_model: BodyModel,
        samples: dict[str, list[Mapping[str, Any]]],
    ) -> None:  # fmt: skip
        """Preparing again with the same spec (the cache may be read) gives identical samples."""
        again = make_dataset(spec, body_model)
        for split, items in samples.items():
            dataset = getattr(again, split)
            assert len(dataset) == len(items), (
                f"{split}: {len(dataset)} samples the second time, {len(items)} the first"
            )
            for i in sorted({0, len(items) - 1}):
                for key, value in items[i].items():
                    other = dataset[i][key]
                    same = torch.equal(value, other) if isinstance(value, Tensor) else value == other
                    assert same, f"{split}[{i}] '{key}' differs between two preparations of the same spec"

    def test_samples_collate_into_a_batch(self, samples: dict[str, list[Mapping[str, Any]]], spec: DatasetSpec) -> None:
        """PyTorch's default collate batches two samples (what the DataLoader does)."""
        from torch.utils.data import default_collate

        items = samples["train"][:2] if len(samples["train"]) > 1 else samples["train"] * 2
        batch = default_collate(items)
        assert tuple(batch["image"].shape) == (2, 3, spec.image_size, spec.image_size)
        assert all(len(batch["meta"][key]) == 2 for key in META_KEYS)

    # -- checks: bad requests -------------------------------------------------------------
    def test_rejects_bad_specs(
        self, make_dataset: DatasetMaker, spec: DatasetSpec, body_model: BodyModel,
        bad_specs: Mapping[str, tuple[Mapping[str, object], str]],
    ) -> None:  # fmt: skip
        """Every ``bad_specs`` entry raises ValueError or OSError whose message matches its regex."""
        if not bad_specs:
            pytest.skip("no bad_specs given")
        for description, (changes, pattern) in bad_specs.items():
            bad = dataclasses.replace(spec, **changes)
            raises_matching(lambda bad=bad: make_dataset(bad, body_model), (ValueError, OSError), pattern,
                            f"{description} ({dict(changes)})")  # fmt: skip

    def test_optional_expected_files(self, make_dataset: DatasetMaker, tmp_path: Path) -> None:
        """A factory with the optional FileChecker capability (``expected_files``) lists
        ExpectedFiles for an empty data root, none of them present."""
        if not isinstance(make_dataset, FileChecker):
            return
        files: Sequence[ExpectedFile] = make_dataset.expected_files(tmp_path)
        assert files and all(isinstance(f, ExpectedFile) for f in files), "expected_files must list ExpectedFiles"
        present = [str(f.path) for f in files if f.present]
        assert not present, f"expected_files calls {present} present in an empty directory"
