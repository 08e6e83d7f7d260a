"""Does a drawn mesh lie on the person? Masks and controls for ``pchmr predict``'s overlays.

Used by ``tests/test_predict_overlap.py`` and ``scripts/experiments/predict_overlap.py`` (which
measures a finished run, e.g. the README's default one). The reference is the body's exact
silhouette in a synthetic image: the split's stored mesh rasterised through the pinhole camera
that rendered the image (``vertices + root_cam`` and the intrinsics ``camera`` = (f, cx, cy),
:class:`pchmr.plugins.datasets.synthetic.SyntheticSplit`). The drawn mesh is read back from the
overlay PNG itself: the pixels the overlay changed.

The controls are the same drawings with a projection bug a renderer could have: moved a quarter
crop sideways, transposed (x and y swapped), halved about the crop centre, flipped upside down. A
drawing that lies on the person overlaps the body more than its buggy versions do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CONTROLS", "DRAWN", "body_masks", "drawn_mask", "iou", "overlap_study", "read_drawings"]

#: An overlay pixel differing from the image by more than this (of 255, in any channel) is drawn mesh.
DRAWN = 8


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def drawn_mask(overlay: np.ndarray, image: np.ndarray, threshold: int = DRAWN) -> np.ndarray:
    """(H, W) bool: where the front view of an overlay (H, W, 3 uint8, the left half of
    ``pchmr predict``'s ``*_overlay.png``) differs from the image it was drawn over."""
    overlay, image = np.asarray(overlay, dtype=np.int64), np.asarray(image, dtype=np.int64)
    if overlay.shape != image.shape:
        raise ValueError(f"the overlay's front view {overlay.shape} and the image {image.shape} differ in size")
    return np.abs(overlay - image).max(axis=-1) > threshold


def body_masks(split: Any, faces: np.ndarray, indices: Sequence[int]) -> list[np.ndarray]:
    """The exact silhouettes of a synthetic split's samples ``indices``, as rendered."""
    from pchmr.core.kit.render import PinholeCamera, rasterize_faces

    vertices, root_cam, intrinsics = split.array("vertices"), split.array("root_cam"), split.array("camera")
    size = int(split.array("images").shape[1])
    out = []
    for i in indices:
        f, cx, cy = (float(v) for v in intrinsics[i])
        in_camera = np.asarray(vertices[i], dtype=np.float64) + root_cam[i]
        out.append(rasterize_faces(in_camera, faces, PinholeCamera(f, f, cx, cy, size, size)) >= 0)
    return out


def _halved(mask: np.ndarray) -> np.ndarray:
    """The mask at half its size about the image centre (nearest pixel)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    out[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = mask[::2, ::2][: h // 2, : w // 2]
    return out


#: name → the drawing with that projection bug
CONTROLS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "moved a quarter crop right": lambda m: np.roll(m, m.shape[1] // 4, axis=1),
    "transposed": lambda m: m.T,
    "halved about the centre": _halved,
    "upside down": lambda m: m[::-1],
}


def overlap_study(drawn: Sequence[np.ndarray], bodies: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image IoU with the body of the drawings (``own``), of each control, and of the next
    image's drawing (``another image's drawing``: what a person-sized mesh that ignores the image
    scores when every person stands near the crop centre)."""
    if len(drawn) != len(bodies) or not drawn:
        raise ValueError(f"need as many drawings as bodies (>= 1), got {len(drawn)} and {len(bodies)}")
    n = len(drawn)
    study = {"own": np.array([iou(d, b) for d, b in zip(drawn, bodies)])}
    for name, bug in CONTROLS.items():
        study[name] = np.array([iou(bug(d), b) for d, b in zip(drawn, bodies)])
    study["another image's drawing"] = np.array([iou(drawn[(i + 1) % n], bodies[i]) for i in range(n)])
    return study


def read_drawings(pred_dir: Path, images: Sequence[Path]) -> list[np.ndarray]:
    """The drawn masks of ``pchmr predict --out pred_dir`` for ``images`` (the files it read)."""
    from PIL import Image

    out = []
    for path in images:
        image = np.asarray(Image.open(path).convert("RGB"))
        overlay = np.asarray(Image.open(pred_dir / f"{path.stem}_overlay.png").convert("RGB"))
        out.append(drawn_mask(overlay[:, : image.shape[1]], image))
    return out
