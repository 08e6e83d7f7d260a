"""Named datasets under one data root, the manifest of their files, and mixed training sets.

``--dataset h36m:ROOT`` finds Human3.6M under ROOT in the first layout of :data:`CATALOG` that is
usable there (SPIN ``.npz`` files, METRO TSVs or the raw release: its training file and every
file it needs, :func:`layout_files`) and loads it with that format's plugin, ``source`` set to the name. ``--dataset h36m,up3d,coco,mpii,mpi-inf-3dhp:ROOT``
(``mixed``) concatenates the members' training sets — each sample keeps its member's
``source`` label, so ``--partitioner by-source`` and ``lda --partition-option label=source``
reproduce the PCHMR paper's mixed and LDA settings — and evaluates on the members' test
splits that carry 3D joints. :func:`check_root` is ``pchmr data check``: per dataset and
layout, which files are present, which are missing (and whether the loader needs them) and
where each is obtained; it calls a layout usable by the same rule. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, ExpectedFile, HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import NoOptions, option, read_options
from pchmr.core.engine.registry import get_registry
from pchmr.plugins.datasets.prepared import DatasetFormatError

__all__ = [
    "CATALOG",
    "Layout",
    "MixedOptions",
    "MixedSplit",
    "check_root",
    "find_layout",
    "layout_files",
    "make_mixed",
    "make_named",
    "missing_files",
    "pchmr_datasets",
]

SPIN_URL = "SPIN's fetch_data.sh / datasets/preprocess (github.com/nkolot/SPIN), images from the dataset's own site"
METRO_URL = "METRO's download_tsv.sh (github.com/microsoft/MeshTransformer, docs/DOWNLOAD.md)"


@dataclass(frozen=True)
class Layout:
    """One way a dataset can lie under the data root: its format plugin and files (relative).

    ``images`` is the training images' folder (and the test's, unless ``test_images`` names
    another). Without its ``test`` file a layout is still usable — its format splits the
    training file 80/20 with the run's seed — unless ``needs_test``."""

    format: str
    train: str
    test: str | None
    images: str | None
    obtain: str
    test_images: str | None = None
    needs_test: bool = False

    def files(self) -> list[str]:
        return [f for f in (self.train, self.test) if f]


#: name → layouts in order of preference. Paths are relative to the data root.
CATALOG: Mapping[str, tuple[Layout, ...]] = {
    "h36m": (
        Layout("spin-npz", "dataset_extras/h36m_train.npz", "dataset_extras/h36m_valid_protocol2.npz", "h36m",
               f"{SPIN_URL}; Human3.6M images: http://vision.imar.ro/human3.6m (licence)"),
        Layout("metro-tsv", "human3.6m/train.smpl.p1.yaml", "human3.6m/valid.protocol2.yaml", None, METRO_URL),
    ),
    "3dpw": (
        Layout("3dpw-pkl", "3DPW/sequenceFiles/train", "3DPW/sequenceFiles/test", "3DPW/imageFiles",
               "https://virtualhumans.mpi-inf.mpg.de/3DPW (sequenceFiles.zip, imageFiles.zip)", needs_test=True),
        Layout("metro-tsv", "3dpw/train.yaml", "3dpw/test_has_gender.yaml", None, METRO_URL),
    ),
    "mpi-inf-3dhp": (
        Layout("spin-npz", "dataset_extras/mpi_inf_3dhp_train.npz", "dataset_extras/mpi_inf_3dhp_valid.npz",
               "mpi_inf_3dhp", f"{SPIN_URL}; images: https://vcai.mpi-inf.mpg.de/3dhp-dataset"),
    ),
    "coco": (
        Layout("coco-json", "coco/annotations/person_keypoints_train2014.json",
               "coco/annotations/person_keypoints_val2014.json", "coco/train2014",
               "https://cocodataset.org (2014 train/val)", test_images="coco/val2014"),
        Layout("spin-npz", "dataset_extras/coco_2014_train.npz", None, "coco", SPIN_URL),
        Layout("metro-tsv", "coco_smpl/train.yaml", None, None, METRO_URL),
    ),
    "mpii": (
        Layout("spin-npz", "dataset_extras/mpii_train.npz", None, "mpii",
               f"{SPIN_URL}; images: http://human-pose.mpi-inf.mpg.de"),
    ),
    "lsp": (
        Layout("spin-npz", "dataset_extras/lsp_dataset_train.npz", "dataset_extras/lsp_dataset_test.npz",
               "lsp_dataset", f"{SPIN_URL}; images: http://sam.johnson.io/research/lsp.html"),
    ),
    "lspet": (
        Layout("spin-npz", "dataset_extras/hr-lspet_train.npz", None, "hr-lspet",
               f"{SPIN_URL}; images: http://sam.johnson.io/research/lspet.html"),
    ),
    "up3d": (
        Layout("metro-tsv", "up3d/trainval.yaml", "up3d/test.yaml", None, METRO_URL),
    ),
    "muco": (
        Layout("metro-tsv", "muco/train.yaml", None, None, METRO_URL),
    ),
}  # fmt: skip


def _exists(root: Path, relative: str) -> bool:
    p = root / relative
    return p.is_file() or (p.is_dir() and any(p.glob("*.pkl")))


def layout_files(name: str, layout: Layout, root: str | Path) -> list[ExpectedFile]:
    """What ``layout`` of dataset ``name`` reads under ``root``: each file or folder, whether it
    is there and whether the loader needs it given what else is (:class:`ExpectedFile`)."""
    root = Path(root).expanduser()
    has_test = bool(layout.test) and _exists(root, layout.test or "")
    roles: list[tuple[str, str | None, bool]] = [
        ("train", layout.train, True),
        ("test", layout.test, layout.needs_test),
        ("images", layout.images, True),
        ("test images", layout.test_images, has_test or layout.needs_test),
    ]
    out = []
    for role, rel, required in roles:
        if rel is not None:
            present = (root / rel).is_dir() if "images" in role else _exists(root, rel)
            out.append(ExpectedFile(name, layout.format, role, root / rel, present, layout.obtain, required))
    return out


def missing_files(files: Sequence[ExpectedFile]) -> list[ExpectedFile]:
    """The required files of one layout that are not there: it is usable when there are none."""
    return [f for f in files if f.required and not f.present]


def find_layout(name: str, root: str | Path) -> Layout:
    """The first layout of ``name`` usable under ``root`` (its training file and every file it
    needs are there: :func:`layout_files`, the rule ``pchmr data check`` prints)."""
    if name not in CATALOG:
        raise DatasetFormatError(f"no named dataset {name!r}; known: {', '.join(CATALOG)}")
    root = Path(root).expanduser()
    partial: list[tuple[Layout, list[ExpectedFile]]] = []
    for layout in CATALOG[name]:
        files = layout_files(name, layout, root)
        lacking = missing_files(files)
        if not lacking:
            return layout
        if files[0].present:
            partial.append((layout, lacking))
    if partial:
        layout, lacking = partial[0]
        what = ", ".join(f"{f.role} {f.path}" for f in lacking)
        raise FileNotFoundError(
            f"{name}: the {layout.format} layout under {root} is incomplete: {root / layout.train} is there but "
            f"not {what} (`pchmr data check {root}`; {layout.obtain})"
        )
    expected = "; ".join(f"{layout.format}: {root / layout.train}" for layout in CATALOG[name])
    raise FileNotFoundError(
        f"{name}: no known layout under {root}; expected one of {expected} (`pchmr data check {root}`)"
    )


def _member_spec(spec: DatasetSpec, name: str, layout: Layout, root: Path) -> DatasetSpec:
    """The location and options the layout's format plugin reads."""
    options: dict[str, object] = {}
    if layout.format == "3dpw-pkl":
        path = f"root={root / Path(layout.train).parent.parent},train={Path(layout.train).name}"
        path += f",test={Path(layout.test).name}" if layout.test else ""
        return dataclasses.replace(spec, path=path, options=options)
    if layout.format == "coco-json":  # without the test file: coco-json splits train 80/20
        split = lambda rel: Path(rel).stem.removeprefix("person_keypoints_")  # noqa: E731
        path = f"root={root / Path(layout.train).parent.parent},train={split(layout.train)}"
        path += f",test={split(layout.test)}" if layout.test and _exists(root, layout.test) else ""
        return dataclasses.replace(spec, path=path, options=options)
    options["source"] = name
    if layout.images:
        options["images"] = str(root / layout.images)
    if layout.test and _exists(root, layout.test):
        path = f"train={root / layout.train},test={root / layout.test}"
    else:  # a train-only release: a seeded 80/20 split of its one file
        path = str(root / layout.train)
    return dataclasses.replace(spec, path=path, options=options)


def make_named(name: str) -> Any:
    """The factory of named dataset ``name``: ``--dataset NAME:ROOT``."""

    def factory(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
        read_options(NoOptions, spec.options, plugin=name, kind="dataset")
        if not spec.path:
            raise DatasetFormatError(f"dataset '{name}' needs the data root: --dataset {name}:ROOT")
        root = Path(spec.path).expanduser()
        layout = find_layout(name, root)
        data = get_registry().get("dataset", layout.format)(_member_spec(spec, name, layout, root), body_model)
        data.extra = {**data.extra, "layout": dataclasses.asdict(layout)}  # type: ignore[misc]
        return data

    factory.__doc__ = f"Named dataset '{name}' under a data root (layouts: {[lay.format for lay in CATALOG[name]]})."
    factory.expected_files = lambda root: check_root(root, [name])  # type: ignore[attr-defined]  # FileChecker
    factory.options = NoOptions  # type: ignore[attr-defined]  # DeclaresOptions
    return factory


def _test_summary(tests: list[tuple[str, HMRData]]) -> dict[str, object]:
    """The evaluated members' protocol facts, combined: GT-mesh kind (one word when they agree,
    else ``mixed (name: kind, …)``), samples with 3D joints and those without a GT pelvis."""
    kinds = {name: str(data.protocol.get("gt_mesh") or "unknown") for name, data in tests}
    gt_mesh = (
        next(iter(kinds.values()))
        if len(set(kinds.values())) == 1
        else ("mixed (" + ", ".join(f"{name}: {kind}" for name, kind in kinds.items()) + ")")
    )
    return {
        "gt_mesh": gt_mesh,
        "test_has_3d_joints": any(bool(d.protocol.get("test_has_3d_joints")) for _, d in tests),
        "test_has_vertices": any(bool(d.protocol.get("test_has_vertices")) for _, d in tests),
        "test_with_3d": sum(int(d.protocol.get("test_with_3d") or 0) for _, d in tests),
        "test_without_pelvis": sum(int(d.protocol.get("test_without_pelvis") or 0) for _, d in tests),
    }


class MixedSplit(ConcatDataset):
    """The members' splits one after the other; a sample's ``index`` is its position in the
    mixed split (the Sample schema's id inside the split), not in its member's."""

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = dict(super().__getitem__(idx))
        sample["index"] = torch.tensor(idx % len(self), dtype=torch.int64)
        return sample


@dataclass(frozen=True)
class MixedOptions:
    """``DatasetSpec.options`` of ``mixed`` (the engine sets them from ``--dataset A,B,C``)."""

    datasets: str = option(help="the member datasets, comma-separated (two or more registered names)")
    test: str | None = option(
        None,
        default_text="every member whose test split has 3D joints",
        help="the members whose test splits are evaluated, comma-separated (--eval-datasets)",
    )


def make_mixed(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """``--dataset A,B,C:ROOT``: the members' training sets concatenated, ``source`` per member;
    evaluated on the members whose test splits have 3D joints, or on those ``--eval-datasets``
    names (option ``test``: the PCHMR paper's mixed-set experiments evaluate on Human3.6M alone)."""
    options = read_options(MixedOptions, spec.options, plugin="mixed", kind="dataset")
    members = [m.strip() for m in options.datasets.split(",") if m.strip()]
    if len(members) < 2 or len(set(members)) != len(members):
        raise DatasetFormatError(f"a mixed dataset needs two or more distinct names, got {members}")
    chosen = [m.strip() for m in options.test.split(",") if m.strip()] if options.test else None
    if chosen is not None and (not chosen or any(name not in members for name in chosen)):
        raise DatasetFormatError(f"mixed: the evaluated members {chosen} must be members of {members}")
    registry = get_registry()
    per_train = None if spec.num_train is None else max(1, spec.num_train // len(members))
    per_test = None if spec.num_test is None else max(1, spec.num_test // len(chosen or members))
    parts: list[tuple[str, HMRData]] = []
    for name in members:
        member_spec = dataclasses.replace(spec, num_train=per_train, num_test=per_test, options={})
        data = registry.get("dataset", name)(member_spec, body_model)
        data.labels = {**data.labels, "source": np.full(len(data.train), name)}  # type: ignore[misc]
        parts.append((name, data))
    train = MixedSplit([d.train for _, d in parts])
    with_3d = [(n, d) for n, d in parts if d.protocol.get("test_has_3d_joints")]
    if chosen is not None:
        lacking = [n for n, _ in parts if n in chosen and n not in dict(with_3d)]
        if lacking:
            raise DatasetFormatError(
                f"mixed: {', '.join(lacking)} cannot be evaluated on: its test split has no 3D joints "
                "(--eval-datasets names members with 3D ground truth)"
            )
        tests = [(n, d) for n, d in parts if n in chosen]
    else:
        tests = with_3d or parts
    test = MixedSplit([d.test for _, d in tests])
    labels = {key: np.concatenate([np.asarray(d.labels[key]).astype(str) for _, d in parts])
              for key in parts[0][1].labels}  # fmt: skip
    sizes = np.array([len(d.train) for _, d in parts], dtype=np.float64)
    means = np.stack([np.asarray(d.train_mean_joints) for _, d in parts])
    protocol_name = str(parts[0][1].protocol.get("protocol", "metro"))
    protocol = {
        "dataset": f"mixed({'+'.join(members)}) test {'+'.join(n for n, _ in tests)}, {protocol_name} protocol",
        "gt": "real", "protocol": protocol_name, "members": {n: dict(d.protocol) for n, d in parts},
        "num_train": len(train), "num_test": len(test), **_test_summary(tests),
    }  # fmt: skip
    return HMRData(train=train, test=test, labels=labels, protocol=protocol,
                   train_mean_joints=(means * sizes[:, None, None]).sum(0) / sizes.sum(),
                   extra={"members": members})  # fmt: skip


# --------------------------------------------------------------------------------- check


def check_root(root: str | Path, names: Sequence[str] | None = None) -> list[ExpectedFile]:
    """Every expected file of every layout of ``names`` (default: all) under ``root``
    (:func:`layout_files`: a layout is usable when none of its required files is missing)."""
    out = []
    for name in names or list(CATALOG):
        if name not in CATALOG:
            raise DatasetFormatError(f"no named dataset {name!r}; known: {', '.join(CATALOG)}")
        for layout in CATALOG[name]:
            out.extend(layout_files(name, layout, root))
    return out


make_mixed.options = MixedOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_datasets() -> Mapping[str, Any]:
    return {"mixed": make_mixed, **{name: make_named(name) for name in CATALOG}}
