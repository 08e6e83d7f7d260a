"""The dataset contract suite on the built-in datasets: the synthetic renders (Anny) and every
file format, read from small files written by :mod:`pchmr.testing.fake_datasets` (SPIN's with
and without SMPL ground-truth meshes, METRO's TSVs, 3DPW's pickles, COCO's JSON); and proof
that the suite can fail."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.sample import normalize_image
from pchmr.core.engine.registry import get_registry
from pchmr.plugins.datasets.mixed import CATALOG
from pchmr.testing import DatasetContract, ToyBodyModel, toy_batch, write_fake_smpl
from pchmr.testing.datasets import DatasetMaker
from pchmr.testing.fake_datasets import write_3dpw_sequence, write_coco_keypoints, write_metro_tsv, write_spin_npz

#: Built-in datasets this module runs the suite on. The other named datasets of the catalogue
#: (``3dpw``, ``coco``, ``up3d`` …) are the same factory as ``h36m`` over other layouts.
#: ``pseudo-labels`` runs the suite in tests/test_pseudo_labels.py (its devices are written there).
COVERED = {"synthetic", "spin-npz", "metro-tsv", "3dpw-pkl", "coco-json", "h36m", "mixed", "pseudo-labels"}


def test_every_registered_builtin_dataset_is_covered() -> None:
    builtins = {info.name for info in get_registry().infos("dataset") if info.distribution == "pchmr"}
    assert builtins - COVERED <= set(CATALOG), f"add a contract test class for {builtins - COVERED - set(CATALOG)}"


def _registered(name: str) -> DatasetMaker:
    return get_registry().get("dataset", name)


class TestSynthetic(DatasetContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_dataset(cls) -> DatasetMaker:
        return _registered("synthetic")

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, pchmr_cache: str) -> BodyModel:
        return get_registry().get("body_model", "anny")(BodyModelSpec(cache_dir=str(Path(pchmr_cache) / "pyramids")))

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {
            "no training sample": ({"num_train": 0}, r"at least one train and one test sample, got 0 and 4"),
            "a tiny crop": ({"image_size": 4}, r"at least 8 px, got image_size=4"),
        }

    def test_a_body_model_without_a_pose_sampler_is_refused(self, spec: DatasetSpec) -> None:
        with pytest.raises(TypeError, match="sample_pose"):
            _registered("synthetic")(spec, ToyBodyModel())


class _FileDataset(DatasetContract):
    """A file format on files written under a class-scoped temporary directory."""

    name = ""

    @pytest.fixture(scope="class")
    @classmethod
    def make_dataset(cls) -> DatasetMaker:
        return _registered(cls.name)

    @pytest.fixture(scope="class")
    @classmethod
    def root(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tmp_path_factory.mktemp(f"{cls.name}-files")


class TestSpinNpz(_FileDataset):
    name = "spin-npz"

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, root: Path) -> str:
        return str(write_spin_npz(root / "h36m_valid_protocol2.npz", num_samples=10, seed=1).files["npz"])

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls, root: Path) -> Mapping[str, tuple[Mapping[str, object], str]]:
        missing = root / "missing.npz"
        return {
            "a missing file": ({"path": str(missing)}, rf"{missing}: SPIN .npz annotation file does not exist"),
            "a test file without a train file": ({"path": f"test={missing}"}, r"give both train=FILE and test=FILE"),
        }


class TestSpinNpzWithSMPLMeshes(TestSpinNpz):
    """SMPL ground truth (``pose``, ``shape``) gives every sample vertices from the body model."""

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, root: Path, pchmr_cache: str) -> BodyModel:
        write_fake_smpl(root / "smpl")
        spec = BodyModelSpec(model_dir=str(root / "smpl"), cache_dir=str(Path(pchmr_cache) / "pyramids"))
        return get_registry().get("body_model", "smpl")(spec)

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, root: Path) -> str:
        scene = write_spin_npz(root / "3dpw_test.npz", num_samples=10, seed=2, with_smpl=True, gender=True)
        return str(scene.files["npz"])

    def test_every_sample_has_vertices(self, samples: dict[str, list[Mapping[str, Any]]]) -> None:
        assert all(float(s["has_vertices"]) == 1.0 for items in samples.values() for s in items)


class TestMetroTsv(_FileDataset):
    name = "metro-tsv"

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, root: Path) -> str:
        train = write_metro_tsv(root, "train", 6, seed=3).files["yaml"]
        test = write_metro_tsv(root, "valid", 4, seed=4).files["yaml"]
        return f"train={train},test={test}"


class Test3dpwPkl(_FileDataset):
    name = "3dpw-pkl"

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, root: Path) -> str:
        write_3dpw_sequence(root, "downtown_walking_00", "train", num_frames=4, seed=5)
        write_3dpw_sequence(root, "courtyard_basketball_00", "test", num_frames=4, seed=6)
        return str(root)


class TestCocoJson(_FileDataset):
    """COCO has 2D keypoints only: the projection and upright checks find no 3D joints."""

    name = "coco-json"

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, root: Path) -> str:
        write_coco_keypoints(root, "train2014", num_images=3, seed=7)
        write_coco_keypoints(root, "val2014", num_images=2, seed=8)
        return str(root)


class TestNamedH36m(_FileDataset):
    """A named dataset under a data root; its factory lists the files it reads (FileChecker)."""

    name = "h36m"

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, root: Path) -> str:
        write_spin_npz(root / "dataset_extras" / "h36m_train.npz", 6, seed=1, images_dir=root / "h36m")
        write_spin_npz(root / "dataset_extras" / "h36m_valid_protocol2.npz", 4, seed=2, images_dir=root / "h36m")
        return str(root)

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls, root: Path) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {
            "no data root": ({"path": None}, r"dataset 'h36m' needs the data root: --dataset h36m:ROOT"),
            "an empty data root": ({"path": str(root / "empty")}, r"h36m: no known layout under"),
        }


class TestMixed(_FileDataset):
    """Three named datasets' training sets concatenated, each sample keeping its ``source``."""

    name = "mixed"

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, root: Path) -> str:
        write_spin_npz(root / "dataset_extras" / "h36m_train.npz", 6, seed=1, images_dir=root / "h36m")
        write_spin_npz(root / "dataset_extras" / "h36m_valid_protocol2.npz", 3, seed=2, images_dir=root / "h36m")
        write_spin_npz(root / "dataset_extras" / "mpii_train.npz", 5, seed=3, images_dir=root / "mpii", with_3d=False)
        write_coco_keypoints(root / "coco", "train2014", num_images=2, seed=4)
        write_coco_keypoints(root / "coco", "val2014", num_images=1, seed=5)
        return str(root)

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_options(cls) -> Mapping[str, object]:
        return {"datasets": "h36m,mpii,coco"}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        one = {"datasets": "h36m"}
        return {"a single member": ({"options": one}, r"needs two or more distinct names, got \['h36m'\]")}


# --------------------------------------------------------------------------------------
# The suite must be able to fail: a dataset breaking each clause is caught by its check.
# --------------------------------------------------------------------------------------
class _Flawed(torch.utils.data.Dataset):
    """Samples of the toy body standing 4 m in front of the camera, with switchable flaws."""

    def __init__(self, body: ToyBodyModel, flaw: str) -> None:
        self.batch = toy_batch(body, 3, 32, generator=torch.Generator().manual_seed(0))
        pixels = torch.randint(0, 256, (3, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        self.batch["image"] = normalize_image(pixels)
        self.flaw = flaw

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = {key: value[i] for key, value in self.batch.items() if key != "meta"}
        sample["meta"] = {key: values[i] for key, values in self.batch["meta"].items()}
        if self.flaw == "y-up keypoints":
            sample["keypoints_2d"] = sample["keypoints_2d"] * torch.tensor([1.0, -1.0, 1.0])
        if self.flaw == "index from 1":
            sample["index"] = sample["index"] + 1
        if self.flaw == "unnormalised image":
            sample["image"] = torch.full_like(sample["image"], 128.0)
        if self.flaw == "joints at the camera's depth":
            sample["joints_3d"][:, 2] += 4.0
        return sample


def _run(check: str, flaw: str) -> None:
    body = ToyBodyModel()
    dataset = _Flawed(body, flaw)
    labels = {key: [dataset[i]["meta"][key] for i in range(3)] for key in dataset.batch["meta"]}
    data = HMRData(train=dataset, test=dataset, labels=labels, protocol={"dataset": "flawed", "gt": "real"})
    samples = {"train": [dataset[i] for i in range(3)], "test": [dataset[i] for i in range(3)]}
    spec = DatasetSpec(image_size=32, seed=0, cache_dir=Path("unused"))
    method = getattr(DatasetContract(), check)
    values = {"data": data, "samples": samples, "body_model": body, "spec": spec}
    method(**{name: values[name] for name in inspect.signature(method).parameters})


@pytest.mark.parametrize(
    ("flaw", "check", "message"),
    [
        ("y-up keypoints", "test_keypoints_are_a_projection_of_the_joints", r"train\[0\].*mirrored or flipped axes"),
        ("index from 1", "test_index_is_the_position_in_the_split", r"train indices are \[1, 2, 3\]"),
        ("unnormalised image", "test_samples_follow_the_schema", r"'image' spans 128..128"),
        ("joints at the camera's depth", "test_joints_are_root_relative", r"train\[0\]: the root of joints_3d"),
    ],
)
def test_the_suite_catches_a_broken_dataset(flaw: str, check: str, message: str) -> None:
    _run(check, "none")  # the sound toy samples pass the same check
    with pytest.raises(AssertionError, match=message):
        _run(check, flaw)
