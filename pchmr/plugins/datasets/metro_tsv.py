"""``metro-tsv``: METRO / FastMETRO's TSV datasets (what FastMETRO and TORE train on).

One split is a YAML file naming four TSVs in its folder (METRO's ``datasets/<name>/*.yaml``,
e.g. ``human3.6m/train.smpl.p1.yaml``, ``3dpw/test_has_gender.yaml``, ``up3d/trainval.yaml``,
``coco_smpl/train.yaml``, ``muco/train.yaml``):

* ``img``: ``<key>\\t<base64 JPEG>`` per row;
* ``label``: ``<key>\\t<JSON list>`` whose first dict has ``center`` [x, y] px, ``scale`` (box/200 px),
  ``2d_joints`` (24 × [x, y, vis], J24, pixels), ``3d_joints`` (24 × [x, y, z, conf], J24,
  **metres**, camera frame), ``has_2d_joints``, ``has_3d_joints``, ``pose`` (72), ``betas`` (10),
  ``has_smpl`` and optionally ``gender``;
* ``hw``: ``<key>\\t[{"height": H, "width": W}]`` (read for checks only);
* ``linelist``: the row numbers that form the split, one per line.

Each TSV may have a ``<name>.lineidx`` beside it (byte offset of every row, METRO's
``tsv_writer`` writes them); without it the offsets are found by one scan of the file. A
``.lineidx`` that does not match its TSV (rows added, removed or rewritten since) is named as
stale; a last row cut off by a truncated copy is named as such (see :class:`TSVFile`).

Location: ``--dataset metro-tsv:SPLIT.yaml`` (seeded 80/20 split) or
``metro-tsv:train=A.yaml,test=B.yaml[,source=NAME][,protocol=metro|spin|mid-hip]``. ``source``
defaults to the folder name (``human3.6m`` → ``h36m``, ``coco_smpl`` → ``coco``, ``up3d``,
``3dpw``, ``muco``). Human3.6M's pelvis (``3d_joints`` J24 index 14) is kept as the GT pelvis of
the pelvis-aligned protocols.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option
from pchmr.core.kit.joints import J24, J24_PELVIS, remap
from pchmr.plugins.datasets.prepared import (
    Annotations,
    DatasetFormatError,
    decode_image,
    gender_names,
    limit,
    make_hmr_data,
    prepare_split,
    progress_bar,
    read_location,
    split_indices,
)
from pchmr.plugins.datasets.spin_npz import MAX_METRES, labels_from_imgnames

__all__ = ["MetroTsvOptions", "TSVFile", "TSVImages", "load_metro_split", "make_metro_tsv", "pchmr_datasets"]

YAML_KEYS = ("img", "label")
LABEL_KEYS = ("center", "scale", "2d_joints", "3d_joints")
_FOLDER_SOURCES = {"human3.6m": "h36m", "h36m": "h36m", "coco_smpl": "coco", "coco": "coco", "up3d": "up3d",
                   "3dpw": "3dpw", "muco": "muco", "mpii": "mpii", "mpi_inf_3dhp": "mpi-inf-3dhp"}  # fmt: skip


class TSVFile:
    """Random access to the rows of a TSV by row number (through ``.lineidx`` offsets).

    A ``.lineidx`` written for another version of the file (stale) is named as the cause: its
    offsets must start at 0 and grow, its last row must end the file, and every row read must
    start after a newline and end where the next offset begins. A last row without the newline
    that ends every row of METRO's TSVs is *cut off*: :meth:`is_cut_off` says so, and a value that
    does not parse there is reported as a truncated file rather than as bad content."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: TSV file does not exist")
        self.size = self.path.stat().st_size
        self.lineidx: Path | None = None
        lineidx = self.path.with_suffix(".lineidx")
        if lineidx.is_file():
            self.lineidx = lineidx
            try:
                self.offsets = [int(line) for line in lineidx.read_text().split()]
            except ValueError as exc:
                raise DatasetFormatError(f"{lineidx}: expected one integer byte offset per line ({exc})") from exc
            self._check_offsets()
        else:
            self.offsets = self._scan()
        with self.path.open("rb") as stream:
            stream.seek(max(self.size - 1, 0))
            self._ends_with_newline = self.size == 0 or stream.read(1) == b"\n"
        self._stream: Any = None

    def _stale(self, what: str) -> DatasetFormatError:
        if self.lineidx is None:  # offsets from our own scan: the file changed since
            return DatasetFormatError(f"{self.path}: {what}; the file changed while it was being read")
        return DatasetFormatError(
            f"{self.path}: {what}; its {self.lineidx.name} is stale (written for another version of this TSV): "
            "delete it (pchmr then finds the rows by one scan) or regenerate it"
        )

    def _check_offsets(self) -> None:
        assert self.lineidx is not None
        bad = [o for o in self.offsets if not 0 <= o < self.size]
        if bad:
            raise DatasetFormatError(
                f"{self.path}: is {self.size} bytes but {self.lineidx.name} points to offset {bad[0]}; "
                "the TSV is truncated (or the .lineidx is stale: written for another version of this file)"
            )
        if not self.offsets:
            if self.size:
                raise self._stale(f"{self.lineidx.name} lists no rows but the file has {self.size} bytes")
            return
        steps = np.diff(np.asarray(self.offsets, dtype=np.int64))
        if self.offsets[0] != 0 or (steps <= 0).any():
            where = 0 if self.offsets[0] != 0 else int(np.argmax(steps <= 0)) + 1
            raise self._stale(
                f"{self.lineidx.name} row {where} starts at byte {self.offsets[where]}, expected offsets from 0 "
                "growing row by row"
            )
        with self.path.open("rb") as stream:
            stream.seek(self.offsets[-1])
            stream.readline()
            end = stream.tell()
        if end < self.size:
            raise self._stale(
                f"{self.lineidx.name} lists {len(self.offsets)} rows but the file goes on after them "
                f"(row {len(self.offsets) - 1} ends at byte {end} of {self.size})"
            )

    def _scan(self) -> list[int]:
        offsets, pos = [], 0
        with self.path.open("rb") as stream:
            for line in stream:
                offsets.append(pos)
                pos += len(line)
        return offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def is_cut_off(self, index: int) -> bool:
        """Row ``index`` is the file's last and lacks its newline: the file may end inside it."""
        return not self._ends_with_newline and index == len(self.offsets) - 1

    def cut_off_error(self, index: int, detail: str) -> DatasetFormatError:
        """The error for a cut-off last row whose value does not parse (``detail``: why)."""
        return DatasetFormatError(
            f"{self.path}: row {index} is cut off: the file ends inside it (byte {self.size}) without the newline "
            f"that ends every row; the TSV is truncated (an interrupted download or copy?) ({detail})"
        )

    def row(self, index: int) -> list[str]:
        """The tab-separated columns of row ``index`` (stripped)."""
        if not 0 <= index < len(self.offsets):
            raise DatasetFormatError(f"{self.path}: row {index} requested but the file has {len(self.offsets)} rows")
        if self._stream is None:
            self._stream = self.path.open("rb")
        start = self.offsets[index]
        self._stream.seek(max(start - 1, 0))
        if start > 0 and self._stream.read(1) != b"\n":
            raise self._stale(f"row {index} starts at byte {start}, inside another row")
        line = self._stream.readline()
        end = self.offsets[index + 1] if index + 1 < len(self.offsets) else self.size
        if start + len(line) != end:
            raise self._stale(f"row {index} spans bytes {start}..{start + len(line)}, but the next row starts at {end}")
        columns = line.decode("utf-8").rstrip("\n").split("\t")
        if len(columns) < 2:
            if self.is_cut_off(index):
                raise self.cut_off_error(index, "no tab after the key")
            raise DatasetFormatError(f"{self.path}: row {index} has no tab; expected '<key>\\t<value>'")
        return [c.strip() for c in columns]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stream"] = None
        return state


@dataclass
class TSVImages:
    """Base64 JPEGs of an ``img`` TSV; a reference is the row number as a string."""

    tsv: TSVFile
    files: Sequence[Path] = field(default_factory=tuple)

    def read(self, reference: str) -> np.ndarray:
        row = int(reference)
        value = self.tsv.row(row)[-1]
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            if self.tsv.is_cut_off(row):
                raise self.tsv.cut_off_error(row, f"its base64 ends early: {exc}") from exc
            raise DatasetFormatError(
                f"{self.tsv.path}: row {row} is not base64 ({exc}); expected a base64 JPEG"
            ) from exc
        try:
            return decode_image(data, f"{self.tsv.path} row {row}")
        except DatasetFormatError as exc:
            if self.tsv.is_cut_off(row):
                raise self.tsv.cut_off_error(row, f"its JPEG does not decode: {exc}") from exc
            raise


@dataclass(frozen=True)
class MetroTsvOptions:
    """Where ``metro-tsv`` reads: the ``key=value`` pairs of its ``--dataset`` path, or ``DatasetSpec.options``
    (a bare path is one YAML, split 80/20 by the seed)."""

    train: str | None = option(None, help="the training split's YAML (with test)")
    test: str | None = option(None, help="the test split's YAML (with train)")
    source: str | None = option(
        None, default_text="from the file names", help="the source label of every sample (h36m, up3d, …)"
    )
    protocol: str | None = option(
        None, default_text="metro", help="the evaluation protocol (a name of pchmr.core.kit.joints.PROTOCOLS)"
    )


def _yaml_files(path: Path) -> dict[str, Path]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: METRO dataset YAML does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DatasetFormatError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict) or any(k not in doc for k in YAML_KEYS):
        raise DatasetFormatError(f"{path}: expected a mapping with keys img, label (and hw, linelist); got {doc!r}")
    if doc.get("composite"):
        raise DatasetFormatError(f"{path}: composite TSV datasets are not supported; list the parts as separate splits")
    out = {}
    for key in ("img", "label", "hw", "linelist"):
        if doc.get(key):
            candidate = Path(str(doc[key]))
            out[key] = candidate if candidate.is_absolute() else path.parent / candidate
    return out


def _row_label(tsv: TSVFile, row: int) -> tuple[str, dict[str, Any]]:
    key, value = tsv.row(row)[:2]
    try:
        labels = json.loads(value)
    except json.JSONDecodeError as exc:
        if tsv.is_cut_off(row):
            raise tsv.cut_off_error(row, f"its JSON ends early: {exc}") from exc
        raise DatasetFormatError(f"{tsv.path}: row {row} is not JSON ({exc})") from exc
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], dict):
        raise DatasetFormatError(f"{tsv.path}: row {row} must hold a JSON list of label dicts, got {value[:60]!r}")
    missing = [k for k in LABEL_KEYS if k not in labels[0]]
    if missing:
        raise DatasetFormatError(
            f"{tsv.path}: row {row} (key {key}) lacks {missing}; METRO labels have {list(LABEL_KEYS)}"
        )
    return key, labels[0]


def _array(label: Mapping[str, Any], key: str, shape: tuple[int, ...], tsv: TSVFile, row: int) -> np.ndarray:
    value = np.asarray(label[key], dtype=np.float64)
    if value.ndim == len(shape) + 1 and value.shape[0] == 1:  # METRO's occasional extra person axis
        value = value[0]
    if value.shape != shape:
        raise DatasetFormatError(f"{tsv.path}: row {row} '{key}' must have shape {shape}, got {value.shape}")
    return value


def load_metro_split(
    yaml_path: str | Path, joint_names: tuple[str, ...], source: str | None = None
) -> tuple[Annotations, TSVImages, list[Path]]:
    """Read one METRO split: its annotations (joints mapped to ``joint_names``), its image TSV
    and the files to checksum."""
    yaml_path = Path(yaml_path)
    files = _yaml_files(yaml_path)
    labels, images = TSVFile(files["label"]), TSVFile(files["img"])
    if "linelist" in files:
        try:
            rows = [int(line.split("\t")[0]) for line in files["linelist"].read_text().split("\n") if line.strip()]
        except (FileNotFoundError, ValueError) as exc:
            raise DatasetFormatError(f"{files['linelist']}: expected one row number per line ({exc})") from exc
    else:
        rows = list(range(len(labels)))
    if len(images) != len(labels):
        raise DatasetFormatError(
            f"{files['img']} has {len(images)} rows but {files['label']} has {len(labels)}; they must be row-aligned"
        )
    n = len(rows)
    keys, center, scale = [], np.zeros((n, 2)), np.zeros(n)
    j2d, j3d = np.zeros((n, 24, 3)), np.zeros((n, 24, 4))
    pose, betas, has_smpl, gender = np.zeros((n, 72)), np.zeros((n, 10)), np.zeros(n, bool), []
    for i, row in enumerate(rows):
        key, label = _row_label(labels, row)
        image_key = images.row(row)[0]
        if image_key != key:
            raise DatasetFormatError(f"{files['img']} row {row} has key {image_key!r} but {files['label']} has {key!r}")
        keys.append(key)
        center[i] = _array(label, "center", (2,), labels, row)
        scale[i] = float(label["scale"])
        j2d[i] = _array(label, "2d_joints", (24, 3), labels, row) * (1.0 if label.get("has_2d_joints", 1) else 0.0)
        j3d[i] = _array(label, "3d_joints", (24, 4), labels, row) * (1.0 if label.get("has_3d_joints", 1) else 0.0)
        if label.get("has_smpl", 0):
            pose[i], betas[i], has_smpl[i] = (
                _array(label, "pose", (72,), labels, row),
                _array(label, "betas", (10,), labels, row),
                True,
            )
        gender.append(str(label.get("gender", "neutral")))
    if not (scale > 0).all():
        raise DatasetFormatError(f"{files['label']}: 'scale' must be > 0, row {rows[int(np.argmin(scale))]} is not")
    valid = j3d[..., 3] > 0
    if valid.any() and np.abs(j3d[..., :3][valid]).max() > MAX_METRES:
        raise DatasetFormatError(f"{files['label']}: '3d_joints' exceed {MAX_METRES:.0f}; expected metres")
    joints = remap(j3d, J24, joint_names)
    joints[..., 3] = (joints[..., 3] > 0).astype(np.float64)
    pelvis = j3d[:, J24_PELVIS].copy()  # Human3.6M's pelvis: the root METRO's evaluation aligns GT joints at
    pelvis[:, 3] = (pelvis[:, 3] > 0).astype(np.float64)
    keypoints = remap(j2d, J24, joint_names)
    keypoints[..., 2] = np.clip(keypoints[..., 2], 0.0, 1.0)
    folder = yaml_path.parent.name.lower()
    src = source or _FOLDER_SOURCES.get(folder, folder)
    ann = Annotations(
        image=np.array([str(r) for r in rows]), center=center, scale=scale, keypoints=keypoints, joints=joints,
        labels=labels_from_imgnames(np.array(keys), src), pose=pose, betas=betas, has_smpl=has_smpl,
        gender=gender_names(np.array(gender)), origin=str(yaml_path), pelvis=pelvis,
    )  # fmt: skip
    return ann, TSVImages(images, files=(files["img"],)), [files["label"], files["img"]]


def make_metro_tsv(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """The factory registered as ``metro-tsv`` (see the module docstring)."""
    where = read_location("metro-tsv", spec, MetroTsvOptions)
    protocol = where.get("protocol", "metro")
    if "main" in where:
        path = Path(where["main"]).expanduser()
        ann, images, sources = load_metro_split(path, body_model.joint_names, where.get("source"))
        train_idx, test_idx = split_indices(len(ann), spec.seed)
        splits = {"train": (path, ann, images, sources, train_idx), "test": (path, ann, images, sources, test_idx)}
    else:
        if "train" not in where or "test" not in where:
            raise DatasetFormatError(f"metro-tsv: give train=YAML and test=YAML (or one YAML), got {spec.path!r}")
        splits = {}
        for split in ("train", "test"):
            path = Path(where[split]).expanduser()
            ann, images, sources = load_metro_split(path, body_model.joint_names, where.get("source"))
            splits[split] = (path, ann, images, sources, np.arange(len(ann)))
    counts = {"train": spec.num_train, "test": spec.num_test}
    stores = {}
    for split, (path, ann, images, sources, index) in splits.items():
        chosen = ann.take(limit(index, counts[split], spec.seed))
        with progress_bar(f"preparing metro-tsv {path.name} ({split}, {spec.image_size}px)") as update:
            stores[split] = prepare_split(chosen, images, spec=spec, body_model=body_model, name=f"metro-tsv-{split}",
                                          sources=sources, protocol=protocol, progress=update)  # fmt: skip
    name = f"metro-tsv:{splits['test'][0].parent.name}/{splits['test'][0].name}"
    return make_hmr_data(name, stores["train"], stores["test"], body_model, protocol, {})


make_metro_tsv.options = MetroTsvOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_datasets() -> Mapping[str, Any]:
    return {"metro-tsv": make_metro_tsv}
