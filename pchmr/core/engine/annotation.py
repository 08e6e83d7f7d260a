"""The annotation pipeline: items → sources → crops → batched fits → pseudo-labelled Samples and
one record per image (annotated or failed, never dropped).

Output directory of :func:`write_pseudo_labels` (the layout and its one reader:
:mod:`pchmr.core.kit.pseudo_labels`; :class:`PseudoLabelSet` serves it as Samples)::

    OUT/
      info.json          annotator, its options, body model, crop size, counts, "gt": "pseudo"
      records.jsonl      one AnnotationRecord per input image (status, losses or error)
      labels.npz         the annotated images' Samples: images (N, H, W, 3) uint8,
                         keypoints_2d, joints_3d, vertices, image_ids, meta_*; the fit's camera
                         (translation, intrinsics) and each crop's box in its image (crop_box);
                         gt_* when the input had ground truth (joints_3d, vertices,
                         keypoints_2d, translation)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pchmr.core.contracts.annotation import (
    AnnotationInputError,
    AnnotationItem,
    AnnotationRecord,
    Annotator,
    DepthSource,
    DeviceAnnotator,
    FitResult,
    KeypointSource,
    Observation,
    ObservationBatch,
    pixels_to_crop,
)
from pchmr.core.contracts.errors import DatasetFormatError
from pchmr.core.contracts.sample import META_KEYS
from pchmr.core.engine.devices import DeviceError, Placement, resolve_placement
from pchmr.core.kit.atomic import savez_atomic, write_text_atomic
from pchmr.core.kit.pseudo_labels import LABELS_FILE, read_label_directory

__all__ = ["Annotated", "PseudoLabelSet", "annotate_items", "annotation_placement", "crop_box", "crop_image",
           "items_from_dataset", "items_from_folder", "write_pseudo_labels"]  # fmt: skip

log = logging.getLogger("pchmr.annotate")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: Square crop side = this × the longer side of the keypoints' bounding box.
CROP_MARGIN = 1.3
#: Unknown camera: focal length = this × the image's longer side (≈ 53° field of view).
DEFAULT_FOCAL_FACTOR = 1.0


@dataclass
class Annotated:
    """The result of :func:`annotate_items`: per image a record; for the annotated ones the
    crop (H, W, 3) uint8, observation and fit (camera-frame root-relative metres), the fit's
    root position in the camera frame (``translations``, metres), the crop-unit intrinsics it
    was fitted through (``intrinsics``: f, cx, cy) and the crop's box in its image
    (``boxes``: left, top, side in pixels)."""

    records: list[AnnotationRecord] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    keypoints: list[np.ndarray] = field(default_factory=list)
    vertices: list[np.ndarray] = field(default_factory=list)
    joints: list[np.ndarray] = field(default_factory=list)
    meta: list[dict[str, str]] = field(default_factory=list)
    items: list[AnnotationItem] = field(default_factory=list)
    translations: list[np.ndarray] = field(default_factory=list)
    intrinsics: list[np.ndarray] = field(default_factory=list)
    boxes: list[tuple[float, float, float]] = field(default_factory=list)


def items_from_dataset(split: Any, indices: Sequence[int] | None = None, prefix: str = "") -> list[AnnotationItem]:
    """Items of a synthetic-style split (``array("images")`` (N, H, W, 3) uint8)."""
    images = split.array("images")
    indices = range(len(split)) if indices is None else indices
    return [
        AnnotationItem(f"{prefix}{i:06d}", image=np.asarray(images[i]), dataset=split, index=int(i)) for i in indices
    ]


def items_from_folder(
    folder: str | Path, keypoint_stems: set[str] | None = None
) -> tuple[list[AnnotationItem], list[AnnotationRecord]]:
    """One item per image file of ``folder``; keypoint files without an image become failed
    records (:class:`CountMismatchError`) so the mismatch is reported, not ignored."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    items, unreadable = [], []
    for p in files:
        try:
            with Image.open(p) as image:
                items.append(AnnotationItem(p.stem, image=np.asarray(image.convert("RGB")), path=str(p)))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # PIL's UnidentifiedImageError is an OSError
            unreadable.append(f"{p} ({exc})")
    if unreadable:  # refused before any fit: nothing is lost, and no image is silently left out
        shown = "; ".join(unreadable[:3]) + (f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        raise DatasetFormatError(
            f"{len(unreadable)} file(s) in {folder} cannot be read as an image: {shown}; "
            f"replace or remove them (images are {', '.join(IMAGE_SUFFIXES)} files PIL opens)"
        )
    orphans = sorted((keypoint_stems or set()) - {p.stem for p in files})
    records = [AnnotationRecord(s, "failed", "", error="CountMismatchError",
                                message=f"keypoint file {s}.json has no image {s}.* in {folder}") for s in orphans]  # fmt: skip
    return items, records


def crop_box(keypoints: np.ndarray, image_size: tuple[int, int], full_image: bool) -> tuple[float, float, float]:
    """(left, top, side) of the square crop around the confident keypoints (× :data:`CROP_MARGIN`),
    or the whole (square) image when ``full_image`` (synthetic crops already are)."""
    h, w = image_size
    if full_image:
        return 0.0, 0.0, float(max(h, w))
    pts = keypoints[keypoints[:, 2] > 0, :2]
    lo, hi = pts.min(0), pts.max(0)
    centre, side = (lo + hi) / 2.0, float(max(hi - lo).max() * CROP_MARGIN)
    side = max(side, 8.0)
    return float(centre[0] - side / 2), float(centre[1] - side / 2), side


def crop_image(image: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """The square ``box`` (left, top, side) of ``image`` resampled to ``size`` x ``size`` pixels
    (bilinear; the part of the box outside the image is black)."""
    from PIL import Image

    left, top, side = box
    pil = Image.fromarray(image)  # EXTENT fills the part of the box outside the image with black
    return np.asarray(pil.transform((size, size), Image.EXTENT, (left, top, left + side, top + side), Image.BILINEAR))


def observe(item: AnnotationItem, joint_names: Sequence[str], keypoints: KeypointSource, depth: DepthSource | None,
            crop_size: int, full_image: bool) -> tuple[Observation, np.ndarray, tuple[float, float, float]]:  # fmt: skip
    """One item → its crop-coordinate :class:`Observation`, (crop_size, crop_size, 3) crop and
    the crop's box in the image (left, top, side pixels); raises :class:`AnnotationInputError`
    for an unusable image."""
    kp = keypoints(item, joint_names)
    h, w = item.size
    intrinsics = kp.intrinsics
    if intrinsics is None:
        intrinsics = np.array([DEFAULT_FOCAL_FACTOR * max(h, w), w / 2.0, h / 2.0], dtype=np.float32)
    if depth is not None:
        dep = depth(item, kp.keypoints)
        depth_values, depth_valid, invariance = dep.depth, dep.valid, dep.invariance
    else:
        depth_values, depth_valid, invariance = np.zeros(len(kp.keypoints)), np.zeros(len(kp.keypoints)), "scale"
    box = crop_box(kp.keypoints, (h, w), full_image)
    crop_kp, crop_k = pixels_to_crop(kp.keypoints, intrinsics, box)
    crop = item.image if full_image and h == w == crop_size else crop_image(item.image, box, crop_size)
    obs = Observation(
        image_id=item.image_id,
        keypoints=torch.from_numpy(crop_kp),
        intrinsics=torch.from_numpy(crop_k),
        depth=torch.as_tensor(depth_values, dtype=torch.float32),
        depth_valid=torch.as_tensor(depth_valid, dtype=torch.float32),
        depth_invariance=invariance,
    )
    return obs, crop, box


def annotation_placement(accelerator: str = "auto", devices: int = 1, precision: str = "32-true") -> Placement:
    """Where ``pchmr annotate`` fits: :func:`~pchmr.core.engine.devices.resolve_placement`, one
    device, in 32-bit. Mixed precision is refused (:class:`DeviceError`): the fits' L-BFGS
    stages compare energies along a strong-Wolfe line search, which bfloat16/float16 round-off
    (1e-3 relative: millimetres on a body) stalls."""
    placement = resolve_placement(accelerator, devices, precision)
    if precision != "32-true":
        raise DeviceError(
            f"--precision {precision}: annotation fits in 32-bit only (its L-BFGS line search needs exact "
            "energies); mixed precision is for training (pchmr run, pchmr personalize)"
        )
    if devices != 1:
        raise DeviceError(f"--devices {devices}: an annotator fits on one device, use --devices 1")
    return placement


def _place(annotator: Annotator, placement: Placement | None) -> torch.device | None:
    """The device ``annotator`` fits on: ``placement``'s when it has the DeviceAnnotator
    capability (moved there now), else None (the CPU, as it was built)."""
    if placement is None or placement.accelerator == "cpu":
        return None
    if not isinstance(annotator, DeviceAnnotator):
        log.warning("annotator %s cannot move to the %s (no to_device): fitting on the CPU", annotator.name,
                    placement.accelerator)  # fmt: skip
        return None
    annotator.to_device(placement.device)
    return placement.device


def annotate_items(items: Iterable[AnnotationItem], annotator: Annotator, joint_names: Sequence[str],
                   keypoints: KeypointSource, depth: DepthSource | None = None, *, crop_size: int,
                   full_image: bool = False, batch_size: int = 64,
                   meta: Callable[[AnnotationItem], dict[str, str]] | None = None,
                   progress: Callable[[int], None] | None = None,
                   placement: Placement | None = None) -> Annotated:  # fmt: skip
    """Observe every item (failures recorded), fit the usable ones in batches of ``batch_size``
    on ``placement``'s device (:func:`annotation_placement`; default: the CPU) when the annotator
    can move there (:class:`~pchmr.core.contracts.annotation.DeviceAnnotator`)."""
    out = Annotated()
    pending: list[tuple[AnnotationItem, Observation, np.ndarray, tuple[float, float, float]]] = []
    device = _place(annotator, placement)

    def flush() -> None:
        if not pending:
            return
        batch = ObservationBatch.stack([o for _, o, _, _ in pending])
        fit = annotator.fit(batch if device is None else batch.to(device))
        if device is not None:  # read back on the CPU, once per batch
            fit = FitResult(fit.vertices.cpu(), fit.joints.cpu(), fit.translation.cpu(),
                            {k: v.cpu() for k, v in fit.params.items()},
                            {k: v.cpu() for k, v in fit.losses.items()})  # fmt: skip
        for k, (item, obs, crop, box) in enumerate(pending):
            losses = {name: float(v[k]) for name, v in fit.losses.items()}
            out.records.append(AnnotationRecord(item.image_id, "ok", annotator.name, losses=losses))
            out.image_ids.append(item.image_id)
            out.crops.append(crop)
            out.keypoints.append(obs.keypoints.numpy())
            out.vertices.append(fit.vertices[k].numpy())
            out.joints.append(fit.joints[k].numpy())
            out.meta.append(meta(item) if meta else dict.fromkeys(META_KEYS, "unknown"))
            out.items.append(item)
            out.translations.append(fit.translation[k].numpy())
            out.intrinsics.append(obs.intrinsics.numpy())
            out.boxes.append(box)
        if progress:
            progress(len(pending))
        pending.clear()

    for item in items:
        try:
            obs, crop, box = observe(item, joint_names, keypoints, depth, crop_size, full_image)
        except AnnotationInputError as exc:
            log.warning("%s", exc)
            out.records.append(AnnotationRecord(item.image_id, "failed", annotator.name,
                                                error=type(exc).__name__, message=str(exc)))  # fmt: skip
            if progress:
                progress(1)
            continue
        pending.append((item, obs, crop, box))
        if len(pending) >= batch_size:
            flush()
    flush()
    return out


def write_pseudo_labels(out_dir: str | Path, annotated: Annotated, info: Mapping[str, Any],
                        ground_truth: Mapping[str, np.ndarray] | None = None) -> Path:  # fmt: skip
    """Write ``info.json``, ``records.jsonl`` and ``labels.npz`` (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = sum(r.status == "ok" for r in annotated.records)
    info = {**dict(info), "gt": "pseudo", "annotated": ok, "failed": len(annotated.records) - ok}
    write_text_atomic(out / "info.json", json.dumps(info, indent=1, default=str) + "\n")
    write_text_atomic(out / "records.jsonl", "".join(json.dumps(r.as_dict()) + "\n" for r in annotated.records))
    arrays: dict[str, np.ndarray] = {"image_ids": np.array(annotated.image_ids, dtype=str)}
    if annotated.image_ids:
        arrays.update(images=np.stack(annotated.crops).astype(np.uint8), keypoints_2d=np.stack(annotated.keypoints),
                      vertices=np.stack(annotated.vertices).astype(np.float32),
                      joints_3d=np.stack(annotated.joints).astype(np.float32))  # fmt: skip
        n = len(annotated.image_ids)
        if len(annotated.translations) == len(annotated.intrinsics) == len(annotated.boxes) == n:
            arrays.update(translation=np.stack(annotated.translations).astype(np.float32),
                          intrinsics=np.stack(annotated.intrinsics).astype(np.float32),
                          crop_box=np.asarray(annotated.boxes, dtype=np.float32).reshape(n, 3))  # fmt: skip
        for key in META_KEYS:
            arrays[f"meta_{key}"] = np.array([m.get(key, "unknown") for m in annotated.meta], dtype=str)
    for key, value in (ground_truth or {}).items():
        arrays[f"gt_{key}"] = value
    savez_atomic(out / LABELS_FILE, **arrays)
    return out


class PseudoLabelSet(Dataset):
    """Samples (:mod:`pchmr.core.contracts.sample`) of a pseudo-label directory (read and checked by
    :func:`pchmr.core.kit.pseudo_labels.read_label_directory`), ``has_vertices`` 1 and
    ``meta['label']`` = ``"pseudo"``; ``ground_truth=True`` serves the ``gt_*`` arrays instead
    (synthetic inputs only: real ground truth for evaluation). ``index`` is the image's position
    in the directory."""

    def __init__(self, directory: str | Path, indices: Sequence[int] | None = None, ground_truth: bool = False) -> None:
        self.directory = Path(directory)
        if not (self.directory / LABELS_FILE).is_file():
            raise FileNotFoundError(
                f"{self.directory} holds no {LABELS_FILE}; run `pchmr annotate ... --out {self.directory}`"
            )
        self.labels = read_label_directory(self.directory, require_info=False)
        if ground_truth and not self.labels.has_ground_truth:
            raise ValueError(f"{self.directory} has no ground truth (gt_*): its images were not synthetic")
        self.ground_truth = ground_truth
        self.indices = list(range(len(self.labels))) if indices is None else list(indices)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of labels.npz by name (each read once)."""
        return {key: self.labels.array(key) for key in self.labels.keys}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.labels.sample(self.indices[i], ground_truth=self.ground_truth)
        sample["meta"]["label"] = "ground-truth" if self.ground_truth else "pseudo"
        return sample
