"""One device's pseudo-labels as ``pchmr annotate`` writes them, read back and checked.

The engine writes the directory (:func:`pchmr.core.engine.annotation.write_pseudo_labels`);
this module is its one reader, used by ``pchmr personalize`` (through the engine's
``PseudoLabelSet``) and by the ``pseudo-labels`` dataset plugin::

    DIR/
      info.json       annotator (and its options), target, body_model, crop_size, the data and
                      source options, "gt": "pseudo", counts "annotated" / "failed"; an image
                      folder's absolute path (image_folder) for the figures
      records.jsonl   one record per input image: image_id, status ok/failed, the error's class
                      name and message (failed images are recorded, never silently dropped)
      labels.npz      the annotated images only, N of them:
                        image_ids (N,) str, images (N, S, S, 3) uint8 crops,
                        keypoints_2d (N, J, 3) the observed keypoints (crop coordinates, confidence),
                        joints_3d (N, J, 3|4), vertices (N, V, 3): the fit, camera-frame metres,
                        root-relative; meta_<key> (N,) str for each META_KEYS label;
                        the fit's camera (written since the annotation figures; older
                        directories lack it): translation (N, 3) the root's camera-frame
                        position in metres, intrinsics (N, 3) the crop-unit (f, cx, cy) it was
                        fitted through, crop_box (N, 3) the crop's (left, top, side) in its
                        image's pixels;
                        gt_joints_3d, gt_vertices (+ gt_keypoints_2d, gt_translation) when the
                        images came with ground truth (synthetic): for evaluation, and for
                        training on true labels
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pchmr.core.contracts.errors import DatasetFormatError
from pchmr.core.contracts.sample import META_KEYS, normalize_image
from pchmr.core.kit.safe_pickle import not_an_npz

__all__ = ["CAMERA_ARRAYS", "INFO_FILE", "LABELS_FILE", "RECORDS_FILE", "LabelDirectory", "read_label_directory"]

INFO_FILE, RECORDS_FILE, LABELS_FILE = "info.json", "records.jsonl", "labels.npz"
#: What ``pchmr annotate --out`` writes; a directory without any of them is not its output.
ANNOTATE_FILES = (INFO_FILE, RECORDS_FILE, LABELS_FILE)
_PER_SAMPLE = ("images", "keypoints_2d", "joints_3d", "vertices")
_GROUND_TRUTH = ("gt_joints_3d", "gt_vertices")
#: The fit's camera: without them a fit cannot be drawn over its image (``pchmr annotate --figures``).
CAMERA_ARRAYS = ("translation", "intrinsics")


@dataclass
class LabelDirectory:
    """A checked pseudo-label directory: ``info`` (info.json), ``records`` (records.jsonl) and
    the arrays of labels.npz, read on first use (an array never asked for is never read)."""

    path: Path
    info: dict[str, Any]
    records: list[dict[str, Any]]
    image_ids: np.ndarray
    _npz: Any = field(repr=False)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._npz.files)

    @property
    def has_ground_truth(self) -> bool:
        """Whether the images came with ground truth (``gt_joints_3d`` and ``gt_vertices``)."""
        return all(key in self._npz.files for key in _GROUND_TRUTH)

    @property
    def has_camera(self) -> bool:
        """Whether the fit's camera is stored (:data:`CAMERA_ARRAYS`), so the meshes can be drawn
        over their crops."""
        return all(key in self._npz.files for key in CAMERA_ARRAYS)

    def array(self, key: str) -> np.ndarray:
        """The (N, ...) array ``key`` of labels.npz (read once)."""
        if key not in self._arrays:
            if key not in self._npz.files:
                raise KeyError(f"{self.path / LABELS_FILE} has no array {key!r}; it has {sorted(self._npz.files)}")
            try:
                self._arrays[key] = np.asarray(self._npz[key])
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                raise DatasetFormatError(
                    f"{self.path / LABELS_FILE}: '{key}' cannot be read (truncated?): {exc}"
                ) from exc
            if len(self._arrays[key]) != len(self):
                raise DatasetFormatError(
                    f"{self.path / LABELS_FILE}: '{key}' has {len(self._arrays[key])} entries for {len(self)} image_ids"
                )
        return self._arrays[key]

    def failures(self) -> Counter[str]:
        """Failed images by error class name (from records.jsonl)."""
        return Counter(str(r.get("error") or "unknown") for r in self.records if r.get("status") != "ok")

    def sample(self, k: int, *, ground_truth: bool = False, index: int | None = None) -> dict[str, Any]:
        """The Sample (:mod:`pchmr.core.contracts.sample`) of annotated image ``k``: its crop and
        observed keypoints with the fit's joints and mesh, or with ``ground_truth`` the ``gt_*``
        arrays (the true 2D keypoints too when stored). ``index`` defaults to ``k``;
        ``meta`` holds the META_KEYS labels."""
        prefix = "gt_" if ground_truth else ""
        joints = torch.from_numpy(np.asarray(self.array(f"{prefix}joints_3d")[k], dtype=np.float32))
        if joints.shape[-1] == 3:
            joints = torch.cat([joints, torch.ones(len(joints), 1)], dim=1)
        keypoints_key = "gt_keypoints_2d" if ground_truth and "gt_keypoints_2d" in self.keys else "keypoints_2d"
        return {
            "image": normalize_image(torch.from_numpy(np.array(self.array("images")[k]))),
            "keypoints_2d": torch.from_numpy(np.asarray(self.array(keypoints_key)[k], dtype=np.float32)),
            "joints_3d": joints,
            "vertices": torch.from_numpy(np.asarray(self.array(f"{prefix}vertices")[k], dtype=np.float32)),
            "has_vertices": torch.tensor(1.0),
            "index": torch.tensor(k if index is None else index, dtype=torch.int64),
            "meta": {key: str(self.array(f"meta_{key}")[k]) for key in META_KEYS},
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the open archive and the arrays read; both come back on first use."""
        state = self.__dict__.copy()
        state["_npz"], state["_arrays"] = None, {}
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        if self._npz is None:
            self._npz = np.load(self.path / LABELS_FILE, allow_pickle=False)


def _not_annotate_output(path: Path, missing: list[str]) -> DatasetFormatError:
    return DatasetFormatError(
        f"{path} is not a `pchmr annotate --out` directory: it lacks {', '.join(missing)} "
        f"(expected {', '.join(ANNOTATE_FILES)})"
    )


def read_label_directory(path: str | Path, *, require_info: bool = True) -> LabelDirectory:
    """Open and check one ``pchmr annotate`` output directory.

    Raises ``FileNotFoundError`` for a missing directory and
    :class:`~pchmr.core.contracts.errors.DatasetFormatError` naming the file and what was
    expected for anything else: a missing file (``require_info=False`` needs labels.npz
    alone), unreadable JSON or archive, a per-image array whose length or shape disagrees with
    ``image_ids``, ok records that do not match the annotated images."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: pseudo-label directory does not exist (write one with `pchmr annotate --out`)"
        )
    needed = ANNOTATE_FILES if require_info else (LABELS_FILE,)
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise _not_annotate_output(path, missing)
    info: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    if (path / INFO_FILE).is_file():
        try:
            info = json.loads((path / INFO_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path / INFO_FILE}: not JSON ({exc})") from exc
        if not isinstance(info, dict):
            raise DatasetFormatError(f"{path / INFO_FILE}: expected a JSON object, got {type(info).__name__}")
    if (path / RECORDS_FILE).is_file():
        for number, line in enumerate((path / RECORDS_FILE).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"{path / RECORDS_FILE}: line {number} is not JSON ({exc})") from exc
            if not isinstance(record, dict) or "status" not in record:
                raise DatasetFormatError(
                    f"{path / RECORDS_FILE}: line {number} is not an annotation record (no status)"
                )
            records.append(record)
    problem = not_an_npz(path / LABELS_FILE)
    if problem:
        raise DatasetFormatError(
            f"{path / LABELS_FILE}: not a readable .npz archive: {problem} (pchmr annotate writes one)"
        )
    try:
        npz = np.load(path / LABELS_FILE, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DatasetFormatError(f"{path / LABELS_FILE}: not a readable .npz archive (truncated?): {exc}") from exc
    if "image_ids" not in npz.files:
        raise DatasetFormatError(
            f"{path / LABELS_FILE}: no 'image_ids'; pchmr annotate writes image_ids and the labels"
        )
    image_ids = np.asarray(npz["image_ids"]).astype(str)
    labels = LabelDirectory(path, info, records, image_ids, npz)
    if len(image_ids):
        absent = [key for key in (*_PER_SAMPLE, *(f"meta_{k}" for k in META_KEYS)) if key not in npz.files]
        if absent:
            raise DatasetFormatError(f"{path / LABELS_FILE}: {len(image_ids)} annotated images but no {absent}")
        images = labels.array("images")
        if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3 or images.dtype != np.uint8:
            raise DatasetFormatError(
                f"{path / LABELS_FILE}: 'images' must be (N, S, S, 3) uint8 crops, got {images.shape} {images.dtype}"
            )
    ok = [str(r.get("image_id")) for r in records if r.get("status") == "ok"]
    if records and sorted(ok) != sorted(image_ids.tolist()):
        raise DatasetFormatError(
            f"{path / RECORDS_FILE}: {len(ok)} records say ok but labels.npz holds {len(image_ids)} images "
            "(the two files come from different annotations?)"
        )
    return labels
