"""The ``pseudo-labels`` dataset: one `pchmr annotate --out` directory per device under a root,
served as training samples with a ``device`` label, tested against real ground truth.

The devices here are written without fitting (the pseudo-labels are the ground truth scaled by
5 % about the root, the observed keypoints the true ones shifted): fast, and the served arrays
can be told apart. ``tests/test_pipeline.py`` annotates with the real annotators."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pchmr.core.contracts.annotation import AnnotationRecord
from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec
from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.contracts.errors import DatasetFormatError, OptionError
from pchmr.core.contracts.partition import PartitionError
from pchmr.core.contracts.sample import META_KEYS
from pchmr.core.engine.annotation import Annotated, PseudoLabelSet, write_pseudo_labels
from pchmr.core.engine.registry import get_registry
from pchmr.plugins.datasets.pseudo_labels import make_pseudo_labels
from pchmr.plugins.datasets.synthetic import make_synthetic
from pchmr.plugins.partitioners.natural import natural
from pchmr.testing import DatasetContract

#: pseudo-labels = ground truth × this about the root; observed keypoints = true ones + KEYPOINT_SHIFT
SCALE, KEYPOINT_SHIFT = 1.05, 0.01
CROP = 32


def anny(cache: str | Path) -> BodyModel:
    return get_registry().get("body_model", "anny")(BodyModelSpec(cache_dir=str(Path(cache) / "pyramids")))


def write_device(out: Path, body_model: BodyModel, cache: str | Path, *, seed: int, n: int = 6, crop: int = CROP,
                 failed: int = 1, ground_truth: bool = True, split: str = "train",
                 info: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """A device as `pchmr annotate synthetic --data-option seed=SEED --data-option split=SPLIT` writes it,
    its first ``failed`` images failed (NoPersonError), the rest "annotated" without fitting."""
    spec = DatasetSpec(image_size=crop, seed=seed, cache_dir=Path(cache) / "datasets", num_train=n, num_test=n)
    data = make_synthetic(spec, body_model)
    images = data.train if split == "train" else data.test
    ids = [f"{i:06d}" for i in range(n)]
    ok = list(range(failed, n))
    joints = np.asarray(images.array("joints_3d")[ok])
    vertices = np.asarray(images.array("vertices")[ok])
    keypoints = np.asarray(images.array("keypoints_2d")[ok])
    observed = keypoints.copy()
    observed[..., :2] += KEYPOINT_SHIFT
    records = [
        AnnotationRecord(ids[i], "failed", "fake", error="NoPersonError", message="no person") for i in range(failed)
    ]
    records += [AnnotationRecord(ids[i], "ok", "fake") for i in ok]
    annotated = Annotated(
        records=records, image_ids=[ids[i] for i in ok], crops=list(np.asarray(images.array("images")[ok])),
        keypoints=list(observed), vertices=list(vertices * SCALE), joints=list(joints[..., :3] * SCALE),
        meta=[{key: str(images.labels[key][i]) for key in META_KEYS} for i in ok],
    )  # fmt: skip
    description = {"annotator": {"annotator": "fake"}, "target": "synthetic", "body_model": body_model.name,
                   "crop_size": crop, "data_options": {"seed": seed, "split": split, "num_train": n}, **(info or {})}  # fmt: skip
    gt = {"joints_3d": joints, "vertices": vertices, "keypoints_2d": keypoints} if ground_truth else None
    return write_pseudo_labels(out, annotated, description, gt)


def edit_info(directory: Path, **changes: Any) -> None:
    info = json.loads((directory / "info.json").read_text())
    (directory / "info.json").write_text(json.dumps({**info, **changes}))


@pytest.fixture(scope="module")
def body(pchmr_cache: str) -> BodyModel:
    return anny(pchmr_cache)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, body: BodyModel, pchmr_cache: str) -> Path:
    """Two devices, ``phone-a`` (seed 1) and ``phone-b`` (seed 2), 6 images each, one failed."""
    root = tmp_path_factory.mktemp("devices")
    write_device(root / "phone-a", body, pchmr_cache, seed=1)
    write_device(root / "phone-b", body, pchmr_cache, seed=2)
    return root


def spec_for(root: Path | str, cache: str | Path, **changes: Any) -> DatasetSpec:
    spec = DatasetSpec(image_size=CROP, seed=0, cache_dir=Path(cache) / "datasets", path=str(root), num_test=4)
    return dataclasses.replace(spec, **changes)


# ------------------------------------------------------------------------------ the contract
class _Devices(DatasetContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_dataset(cls):
        return get_registry().get("dataset", "pseudo-labels")

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, pchmr_cache: str) -> BodyModel:
        return anny(pchmr_cache)

    @pytest.fixture(scope="class")
    @classmethod
    def devices_root(cls, tmp_path_factory: pytest.TempPathFactory, body_model: BodyModel, pchmr_cache: str) -> Path:
        root = tmp_path_factory.mktemp("contract-devices")
        write_device(root / "phone-a", body_model, pchmr_cache, seed=1)
        write_device(root / "phone-b", body_model, pchmr_cache, seed=2)
        return root

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_path(cls, devices_root: Path) -> str:
        return str(devices_root)

    @pytest.fixture(scope="class")
    @classmethod
    def image_size(cls) -> int:
        return CROP


class TestPseudoLabelsTestedOnSynthetic(_Devices):
    """Pseudo-labels for training, the synthetic test split (seed 0) for testing."""

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls, tmp_path_factory: pytest.TempPathFactory, devices_root: Path, body_model: BodyModel,
                  pchmr_cache: str) -> Mapping[str, tuple[Mapping[str, object], str]]:  # fmt: skip
        bad = tmp_path_factory.mktemp("bad-roots")

        def root_with(name: str, *devices: tuple[str, dict[str, Any]]) -> str:
            for device, kwargs in devices:
                write_device(bad / name / device, body_model, pchmr_cache, **kwargs)
            return str(bad / name)

        (bad / "empty").mkdir()
        (bad / "not-annotated" / "phone-a").mkdir(parents=True)
        shutil.copytree(devices_root / "phone-a", bad / "two-models" / "phone-a")
        shutil.copytree(devices_root / "phone-b", bad / "two-models" / "phone-b")
        edit_info(bad / "two-models" / "phone-b", body_model="smpl")
        return {
            "a missing root": ({"path": str(bad / "missing")}, r"missing: pseudo-label root does not exist"),
            "no location": ({"path": None}, r"needs a location: --dataset pseudo-labels:ROOT"),
            "a root without devices": ({"path": str(bad / "empty")}, r"empty holds no device directory"),
            "one device's directory as the root": (
                {"path": str(devices_root / "phone-a")}, r"phone-a is itself one `pchmr annotate --out` directory"),
            "a directory that is not annotate output": (
                {"path": str(bad / "not-annotated")},
                r"phone-a is not a `pchmr annotate --out` directory: it lacks info.json, records.jsonl, labels.npz"),
            "a device without an annotated image": (
                {"path": root_with("empty-device", ("phone-a", {"seed": 1}), ("phone-b", {"seed": 2, "n": 2, "failed": 2}))},
                r"device 'phone-b' .* has no annotated image \(NoPersonError: 2; see its records.jsonl\)"),
            "devices of two crop sizes": (
                {"path": root_with("two-crops", ("phone-a", {"seed": 1}), ("phone-b", {"seed": 2, "crop": 16}))},
                r"different crop sizes \(phone-a: 32, phone-b: 16\)"),
            "devices of two body models": (
                {"path": str(bad / "two-models")}, r"different body models \(phone-a: anny, phone-b: smpl\)"),
            "another crop size than the run's": ({"image_size": 16}, r"crop size 32; run with --input-size 32 \(got 16\)"),
            "a device annotated from the test split": (
                {"path": root_with("leak", ("phone-a", {"seed": 1}), ("phone-b", {"seed": 0, "split": "test"}))},
                r"device 'phone-b' annotated the synthetic test split of seed 0, .* would train on test images"),
            "true labels without ground truth": (
                {"path": root_with("no-gt", ("phone-a", {"seed": 1}), ("phone-b", {"seed": 2, "ground_truth": False})),
                 "options": {"labels": "gt"}},
                r"labels=gt needs the devices' ground truth .* phone-b lack"),
            "fewer training samples than devices": ({"num_train": 1}, r"num_train=1 is fewer than the 2 devices"),
            "an unknown option": ({"options": {"colour": "red"}}, r"pseudo-labels dataset has no option 'colour'"),
            "a bad option value": ({"path": f"root={devices_root},test=mine"}, r"option 'test' must be one of"),
            "a malformed location": ({"path": f"root={devices_root},gt"}, r"cannot read 'gt'"),
        }  # fmt: skip


class TestPseudoLabelsTestedOnHeldOutImages(_Devices):
    """True labels for training, each device's held-out images for testing."""

    @pytest.fixture(scope="class")
    @classmethod
    def dataset_options(cls) -> Mapping[str, object]:
        return {"labels": "gt", "test": "held-out", "held-out": 0.4}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_specs(cls, tmp_path_factory: pytest.TempPathFactory, body_model: BodyModel,
                  pchmr_cache: str) -> Mapping[str, tuple[Mapping[str, object], str]]:  # fmt: skip
        bad = tmp_path_factory.mktemp("bad-held-out")
        write_device(bad / "one-image" / "phone-a", body_model, pchmr_cache, seed=1)
        write_device(bad / "one-image" / "phone-b", body_model, pchmr_cache, seed=2, n=2, failed=1)
        write_device(bad / "no-gt" / "phone-a", body_model, pchmr_cache, seed=1, ground_truth=False)
        return {
            "a device with one image": ({"path": str(bad / "one-image")},
                                        r"test=held-out keeps at least one image to train and one to test per device; phone-b"),
            "no ground truth": ({"path": str(bad / "no-gt")}, r"labels=gt and test=held-out needs the devices' ground truth"),
            "a held-out share of 1": ({"options": {"held-out": 1}}, r"option 'held-out' must be a number in \(0, 1\)"),
        }  # fmt: skip


# ------------------------------------------------------------------------------ behaviour
def test_each_training_sample_carries_its_device_and_the_counts_are_reported(root: Path, body: BodyModel,
                                                                              pchmr_cache: str) -> None:  # fmt: skip
    data = make_pseudo_labels(spec_for(root, pchmr_cache), body)
    assert list(data.labels["device"]) == ["phone-a"] * 5 + ["phone-b"] * 5  # 6 images each, 1 failed
    assert [data.train[i]["meta"]["device"] for i in (0, 9)] == ["phone-a", "phone-b"]
    devices = data.protocol["devices"]
    assert devices["phone-a"] == {"annotated": 5, "failed": {"NoPersonError": 1}, "train": 5, "test": 0}
    assert data.protocol["gt"] == "real" and data.protocol["train_gt"] == "pseudo"
    assert data.protocol["dataset"] == (
        "pseudo-labels: fake labels of 2 devices; test: synthetic test split (seed 0, 4 images)"
    )


def test_the_natural_partition_by_device_is_one_client_per_directory(root: Path, body: BodyModel,
                                                                      pchmr_cache: str) -> None:  # fmt: skip
    data = make_pseudo_labels(spec_for(root, pchmr_cache), body)
    partition = natural(data, 2, 0, {"label": "device"})
    assert partition.params["values"] == sorted(p.name for p in root.iterdir())
    for client, device in zip(partition.clients, partition.params["values"]):
        assert {data.train[int(i)]["meta"]["device"] for i in client} == {device}
    with pytest.raises(PartitionError, match=r"natural partition by 'device' has 2 values; --clients must be 2, got 3"):
        natural(data, 3, 0, {"label": "device"})


def test_pseudo_labels_serve_the_fit_and_gt_labels_the_truth(root: Path, body: BodyModel, pchmr_cache: str) -> None:
    pseudo = make_pseudo_labels(spec_for(root, pchmr_cache), body)
    true = make_pseudo_labels(spec_for(f"root={root},labels=gt", pchmr_cache), body)
    assert (
        true.protocol["train_gt"] == "real" and "true labels (of the images fake annotated)" in true.protocol["dataset"]
    )
    gt = np.load(root / "phone-a" / "labels.npz")
    for i in (0, 4):
        p, t = pseudo.train[i], true.train[i]
        assert np.allclose(p["joints_3d"][:, :3].numpy(), SCALE * gt["gt_joints_3d"][i, :, :3], atol=1e-6)
        assert np.allclose(t["joints_3d"].numpy(), gt["gt_joints_3d"][i])
        assert np.allclose(t["vertices"].numpy(), gt["gt_vertices"][i])
        assert np.allclose(t["keypoints_2d"].numpy(), gt["gt_keypoints_2d"][i])  # the true 2D labels
        assert np.allclose(p["keypoints_2d"][:, :2].numpy(), gt["gt_keypoints_2d"][i, :, :2] + KEYPOINT_SHIFT)
        assert (p["image"] == t["image"]).all()
    assert not np.allclose(pseudo.train_mean_joints, true.train_mean_joints)


def test_held_out_images_are_tested_on_their_truth_and_never_trained_on(root: Path, body: BodyModel,
                                                                         pchmr_cache: str) -> None:  # fmt: skip
    for labels in ("pseudo", "gt"):
        data = make_pseudo_labels(spec_for(root, pchmr_cache, num_test=None,
                                           options={"test": "held-out", "held_out": 0.4, "labels": labels}), body)  # fmt: skip
        train, test = set(data.train.entries), set(data.test.entries)
        assert not train & test and len(train) == 6 and len(test) == 4  # 2 of each device's 5
        assert data.test.ground_truth and data.protocol["gt"] == "real"
        assert "test: held-out 40% of each device's images (4 images)" in data.protocol["dataset"]
    gt = np.load(root / "phone-b" / "labels.npz")
    assert np.allclose(data.test[3]["joints_3d"].numpy(), gt["gt_joints_3d"][4])


def test_num_train_is_taken_evenly_from_the_devices(root: Path, body: BodyModel, pchmr_cache: str) -> None:
    data = make_pseudo_labels(spec_for(root, pchmr_cache, num_train=5), body)
    assert list(data.labels["device"]) == ["phone-a"] * 3 + ["phone-b"] * 2


def test_options_given_as_dataset_options_override_the_location(root: Path, body: BodyModel, pchmr_cache: str) -> None:
    data = make_pseudo_labels(spec_for(f"root={root},labels=gt", pchmr_cache, options={"labels": "pseudo"}), body)
    assert data.protocol["labels"] == "pseudo"
    with pytest.raises(OptionError, match=r"option 'held-out' must be a number in \(0, 1\), got 1.5"):
        make_pseudo_labels(spec_for(root, pchmr_cache, options={"held-out": 1.5}), body)


def test_a_truncated_archive_is_named(tmp_path: Path, root: Path, body: BodyModel, pchmr_cache: str) -> None:
    shutil.copytree(root, tmp_path / "devices")
    archive = tmp_path / "devices" / "phone-b" / "labels.npz"
    archive.write_bytes(archive.read_bytes()[:100])
    with pytest.raises(DatasetFormatError, match=r"phone-b/labels.npz: not a readable .npz archive"):
        make_pseudo_labels(spec_for(tmp_path / "devices", pchmr_cache), body)


def test_the_splits_pickle_without_their_arrays(root: Path, body: BodyModel, pchmr_cache: str) -> None:
    """Loader workers and Ray receive the dataset pickled: the archive is reopened, nothing copied."""
    data = make_pseudo_labels(spec_for(root, pchmr_cache, options={"test": "held-out"}), body)
    for split in (data.train, data.test):
        first = split[1]
        copy = pickle.loads(pickle.dumps(split))
        assert all(not labels._arrays for labels in copy.devices.values())
        assert (copy[1]["vertices"] == first["vertices"]).all() and copy[1]["meta"] == first["meta"]


def test_personalization_still_reads_a_device(root: Path) -> None:
    labels = PseudoLabelSet(root / "phone-a", [1, 3])
    assert len(labels) == 2 and int(labels[1]["index"]) == 3 and labels[0]["meta"]["label"] == "pseudo"
    assert PseudoLabelSet(root / "phone-a", ground_truth=True)[0]["meta"]["label"] == "ground-truth"
