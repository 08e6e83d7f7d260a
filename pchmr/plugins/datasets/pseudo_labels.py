"""``pseudo-labels``: train on what the devices annotated themselves (the PCHMR paper's Fig. 2).

Each device labels its own images with ``pchmr annotate`` (DePoser, SMPLify-X); the federation
then trains on those pseudo-labels, one client per device. This dataset reads a root holding one
``pchmr annotate --out`` directory per device::

    ROOT/
      <device>/   info.json, records.jsonl, labels.npz (pchmr.core.kit.pseudo_labels)
      <device>/   ...

Location: ``--dataset pseudo-labels:ROOT`` or ``pseudo-labels:root=ROOT,labels=gt,test=held-out``
(the ``key=value`` pairs are the options below, also accepted as dataset options).

* Training samples: every annotated image of every device (devices in sorted name order, each
  device's images in its order); a device's failed images (records.jsonl names each error) are
  absent and counted in the protocol. ``meta`` / ``labels`` carry the annotator's META_KEYS
  labels plus ``device`` = the directory's name, so ``--partitioner natural --partition-option
  label=device --clients D`` makes one client per device (the natural partitioner refuses any
  other client count, naming D). ``num_train`` caps the total, taken evenly from the devices.
* ``labels=pseudo`` (default): the annotator's fit (joints, mesh) with the keypoints it saw;
  ``labels=gt``: the same images with their true labels (``gt_*`` arrays, synthetic devices
  only; the true 2D keypoints when stored, else the observed ones): the true-label federation of
  the pipeline study.
* The test split is always real ground truth on images no device trained on:
  ``test=synthetic`` (default) the ``synthetic`` dataset's test split of seed ``test_seed`` at the
  devices' crop size (a device annotated from that very split is refused: it would train on test
  images); ``test=held-out`` the last ``held_out`` share of each device's annotated images,
  removed from training whatever ``labels`` says, with their ``gt_*`` arrays.

``protocol['dataset']`` says both (``pseudo-labels: deposer labels of 4 devices; test: synthetic
test split (seed 0, 200 images)``), so the training labels are printed beside every number;
``protocol['gt']`` is ``real`` (what the test numbers are measured against).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.errors import DatasetFormatError
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.sample import META_KEYS
from pchmr.core.kit.pseudo_labels import ANNOTATE_FILES, LabelDirectory, read_label_directory
from pchmr.plugins.datasets.synthetic import DEFAULT_NUM_TEST, make_synthetic

__all__ = ["DEVICE_LABEL", "DeviceSamples", "PseudoLabelOptions", "make_pseudo_labels", "pchmr_datasets"]

NAME = "pseudo-labels"
#: The label naming each training sample's device (``--partition-option label=device``).
DEVICE_LABEL = "device"
log = logging.getLogger("pchmr.datasets.pseudo_labels")


@dataclass(frozen=True)
class PseudoLabelOptions:
    """The ``key=value`` pairs of ``--dataset pseudo-labels:...`` (a bare path is ``root``)."""

    root: str | None = option(None, help="the directory holding one `pchmr annotate --out` directory per device")
    labels: str = option(
        "pseudo", choices=("pseudo", "gt"), help="train on the annotator's fits, or on the same images' true labels"
    )
    test: str = option(
        "synthetic",
        choices=("synthetic", "held-out"),
        help="real-GT test split: the synthetic dataset's test split, or each device's held-out images",
    )
    test_seed: int = option(0, low=0, help="test=synthetic: the seed of the synthetic dataset whose test split is used")
    held_out: float = option(
        0.2, low=0.0, high=1.0, low_open=True, high_open=True, help="test=held-out: each device's share held out"
    )


class DeviceSamples(Dataset):
    """Samples of chosen images of several devices: entry i is image ``k`` of ``device``, served
    with its pseudo-labels or (``ground_truth``) its ``gt_*`` arrays, ``index`` i and
    ``meta['device']`` the device's name."""

    def __init__(self, entries: Sequence[tuple[str, int]], devices: Mapping[str, LabelDirectory], ground_truth: bool):
        self.entries = list(entries)
        self.devices = dict(devices)
        self.ground_truth = ground_truth
        self.labels = {key: np.array([str(devices[d].array(f"meta_{key}")[k]) for d, k in self.entries], dtype=str)
                       for key in META_KEYS}  # fmt: skip
        self.labels[DEVICE_LABEL] = np.array([d for d, _ in self.entries], dtype=str)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a split of {len(self)}")
        i = int(i) % len(self)
        device, k = self.entries[i]
        sample = self.devices[device].sample(k, ground_truth=self.ground_truth, index=i)
        sample["meta"][DEVICE_LABEL] = device
        return sample


def _parse_location(spec: DatasetSpec) -> PseudoLabelOptions:
    """``ROOT`` or ``key=value,...`` from ``--dataset pseudo-labels:...``, then ``spec.options`` (which win)."""
    values: dict[str, object] = {}
    path = (spec.path or "").strip()
    if path and "=" not in path:
        values["root"] = path
    elif path:
        for part in path.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise DatasetFormatError(
                    f"dataset '{NAME}': cannot read '{part}' in '{path}'; expected ROOT or key=value pairs "
                    "(root=, labels=, test=, test-seed=, held-out=)"
                )
            values[key.strip()] = value.strip()
    for key, value in (spec.options or {}).items():
        values = {k: v for k, v in values.items() if k.replace("_", "-") != str(key).replace("_", "-")}
        values[str(key)] = value
    options = read_options(PseudoLabelOptions, values, plugin=NAME, kind="dataset")
    if not options.root:
        raise DatasetFormatError(
            f"dataset '{NAME}' needs a location: --dataset {NAME}:ROOT (ROOT holds one `pchmr annotate --out` "
            "directory per device)"
        )
    return options


def _annotator(info: Mapping[str, Any]) -> str:
    described = info.get("annotator")
    if isinstance(described, Mapping):
        return str(described.get("annotator") or described.get("name") or "unknown")
    return str(described or "unknown")


def read_devices(root: Path) -> dict[str, LabelDirectory]:
    """Every device directory of ``root`` (sorted by name; hidden ones skipped), each checked."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: pseudo-label root does not exist; expected a directory with one `pchmr annotate --out` "
            "directory per device"
        )
    if any((root / name).is_file() for name in ANNOTATE_FILES):
        raise DatasetFormatError(
            f"{root} is itself one `pchmr annotate --out` directory; the root holds one such directory per device "
            f"(e.g. move it to {root}/device-1/)"
        )
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetFormatError(
            f"{root} holds no device directory; expected {root}/<device>/ each written by `pchmr annotate --out`"
        )
    devices = {}
    for name in names:
        labels = read_label_directory(root / name)
        for key in ("body_model", "crop_size"):
            if key not in labels.info:
                raise DatasetFormatError(
                    f"{root / name / 'info.json'}: no '{key}'; write the device's labels with `pchmr annotate --out`"
                )
        if not len(labels):
            failures = ", ".join(f"{k}: {v}" for k, v in sorted(labels.failures().items())) or "no input image"
            raise DatasetFormatError(
                f"device '{name}' ({root / name}) has no annotated image ({failures}; see its records.jsonl); "
                "every device needs at least one"
            )
        devices[name] = labels
    return devices


def _check_devices(devices: Mapping[str, LabelDirectory], body_model: BodyModel, spec: DatasetSpec,
                   options: PseudoLabelOptions) -> None:  # fmt: skip
    """One body model and one crop size for every device, the run's; ground truth where needed;
    no device trained on the test split."""
    for key, wanted, flag in (("body_model", body_model.name, "--body-model"), ("crop_size", spec.image_size, "--input-size")):  # fmt: skip
        values = {name: labels.info[key] for name, labels in devices.items()}
        if len({str(v) for v in values.values()}) > 1:
            listed = ", ".join(f"{name}: {value}" for name, value in values.items())
            raise DatasetFormatError(
                f"the devices were annotated with different {key.replace('_', ' ')}s ({listed}); one federation "
                f"needs one: annotate every device with the same {key.replace('_', ' ')}"
            )
        value = next(iter(values.values()))
        if str(value) != str(wanted):
            raise DatasetFormatError(
                f"the devices were annotated with {key.replace('_', ' ')} {value}; run with {flag} {value} "
                f"(got {wanted})"
            )
    need_gt = [what for what, needed in (("labels=gt", options.labels == "gt"), ("test=held-out", options.test == "held-out")) if needed]  # fmt: skip
    if need_gt:
        without = [name for name, labels in devices.items() if not labels.has_ground_truth]
        if without:
            raise DatasetFormatError(
                f"{' and '.join(need_gt)} needs the devices' ground truth (gt_* arrays in labels.npz), which "
                f"{', '.join(without)} lack(s): only `pchmr annotate synthetic` keeps it"
            )
    if options.test == "synthetic":
        for name, labels in devices.items():
            data = labels.info.get("data_options") or {}
            same = str(data.get("split", "test")) == "test" and int(data.get("seed", 0)) == options.test_seed
            if labels.info.get("target") == "synthetic" and same:
                raise DatasetFormatError(
                    f"device '{name}' annotated the synthetic test split of seed {options.test_seed}, the test split "
                    f"of test=synthetic: it would train on test images; annotate devices from split=train (or "
                    f"another seed), or choose test-seed"
                )
    if options.test == "held-out":
        small = [name for name, labels in devices.items() if len(labels) < 2]
        if small:
            raise DatasetFormatError(
                f"test=held-out keeps at least one image to train and one to test per device; {', '.join(small)} "
                "annotated fewer than 2"
            )


def _even(counts: Sequence[int], cap: int | None) -> list[int]:
    """Per-device counts summing to at most ``cap``, taken round-robin (every device keeps one
    when ``cap`` >= the number of devices)."""
    if cap is None or cap >= sum(counts):
        return list(counts)
    taken = [0] * len(counts)
    while sum(taken) < cap:
        for d, n in enumerate(counts):
            if taken[d] < n and sum(taken) < cap:
                taken[d] += 1
    return taken


def make_pseudo_labels(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """The factory registered as ``pseudo-labels`` (see the module docstring)."""
    options = _parse_location(spec)
    for key, count in (("num_train", spec.num_train), ("num_test", spec.num_test)):
        if count is not None and count < 1:
            raise ValueError(f"{NAME} needs at least one train and one test sample, got {key}={count}")
    root = Path(options.root).expanduser()  # type: ignore[arg-type]
    devices = read_devices(root)
    _check_devices(devices, body_model, spec, options)
    if spec.num_train is not None and spec.num_train < len(devices):
        raise ValueError(
            f"num_train={spec.num_train} is fewer than the {len(devices)} devices under {root}: each device (a "
            "client) needs at least one training image"
        )
    names = list(devices)
    train_of, test_of = {}, {}
    for name, labels in devices.items():
        n = len(labels)
        if options.test == "held-out":
            n_test = min(n - 1, max(1, round(options.held_out * n)))
            train_of[name], test_of[name] = list(range(n - n_test)), list(range(n - n_test, n))
        else:
            train_of[name] = list(range(n))
    kept = _even([len(train_of[name]) for name in names], spec.num_train)
    train_entries = [(name, k) for name, count in zip(names, kept) for k in train_of[name][:count]]
    train = DeviceSamples(train_entries, devices, ground_truth=options.labels == "gt")
    if options.test == "held-out":
        kept_test = _even([len(test_of[name]) for name in names], spec.num_test)
        test_entries = [(name, k) for name, count in zip(names, kept_test) for k in test_of[name][:count]]
        test: Dataset = DeviceSamples(test_entries, devices, ground_truth=True)
        test_text = f"held-out {options.held_out:.0%} of each device's images ({len(test_entries)} images)"
        test_counts = dict(zip(names, kept_test))
    else:
        num_test = DEFAULT_NUM_TEST if spec.num_test is None else int(spec.num_test)
        test_spec = DatasetSpec(image_size=spec.image_size, seed=options.test_seed, cache_dir=spec.cache_dir,
                                num_train=1, num_test=num_test)  # fmt: skip
        try:
            synthetic = make_synthetic(test_spec, body_model)
        except TypeError as exc:  # a body model the synthetic renderer cannot pose
            raise ValueError(
                f"test=synthetic renders its test images with the body model: {exc}; or use test=held-out"
            ) from exc
        test = synthetic.test
        test_text = f"synthetic test split (seed {options.test_seed}, {len(test)} images)"
        test_counts = dict.fromkeys(names, 0)
    annotators = sorted({_annotator(labels.info) for labels in devices.values()})
    labels_text = f"{'+'.join(annotators)} labels"
    if options.labels == "gt":
        labels_text = f"true labels (of the images {'+'.join(annotators)} annotated)"
    counts = {
        name: {"annotated": len(labels), "failed": dict(sorted(labels.failures().items())), "train": count,
               "test": test_counts[name]}
        for (name, labels), count in zip(devices.items(), kept)
    }  # fmt: skip
    for name, c in counts.items():
        failed = ", ".join(f"{k}: {v}" for k, v in c["failed"].items()) or "none"
        log.info("device %s: %d annotated, failed %s; %d train, %d test", name, c["annotated"], failed, c["train"],
                 c["test"])  # fmt: skip
    protocol = {
        "dataset": f"{NAME}: {labels_text} of {len(devices)} devices; test: {test_text}",
        "gt": "real", "train_gt": "real" if options.labels == "gt" else "pseudo", "labels": options.labels,
        "annotators": annotators, "test": options.test, "test_split": test_text, "root": str(root),
        "devices": counts, "num_train": len(train), "num_test": len(test), "image_size": spec.image_size,
        "body_model": body_model.name,
    }  # fmt: skip
    if options.test == "synthetic":
        protocol["test_seed"] = options.test_seed
    else:
        protocol["held_out"] = options.held_out
    return HMRData(
        train=train, test=test, labels=dict(train.labels), protocol=protocol,
        train_mean_joints=_mean_joints(train), extra={"root": str(root), "devices": names},
    )  # fmt: skip


def _mean_joints(train: DeviceSamples) -> np.ndarray:
    """(J, 3) mean of the training labels' valid joints (the mean-pose baseline's prediction)."""
    key = "gt_joints_3d" if train.ground_truth else "joints_3d"
    joints = np.stack([np.asarray(train.devices[d].array(key)[k], dtype=np.float64) for d, k in train.entries])
    valid = joints[..., 3:] > 0 if joints.shape[-1] == 4 else np.ones((*joints.shape[:-1], 1), dtype=bool)
    return ((joints[..., :3] * valid).sum(0) / np.maximum(valid.sum(0), 1)).astype(np.float32)


make_pseudo_labels.options = PseudoLabelOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_datasets() -> Mapping[str, Any]:
    return {NAME: make_pseudo_labels}
