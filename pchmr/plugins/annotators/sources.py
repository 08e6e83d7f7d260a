"""Keypoint and depth sources: per-image files (COCO-17, COCO-WholeBody, OpenPose-25, Sapiens /
MMPose JSON; depth maps as .npy or .png) and ``synthetic`` sources that corrupt the synthetic
dataset's ground truth.

Every source returns keypoints in the body model's evaluation joints (LSP-14 names), image
pixels; :data:`LSP_FROM_NAMED` says how each is made from a detector layout (``neck`` = mean of
the shoulders, ``head`` = mean of the ears — Anny's own definition; for SMPL with the H36M
regressor the head is the head *top*, a few cm higher: an approximation).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pchmr.core.contracts.annotation import (
    DEPTH_INVARIANCES,
    AnnotationItem,
    DepthError,
    DepthObservation,
    KeypointLayoutError,
    KeypointObservation,
    NoPersonError,
)
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import NoOptions, option, read_options

__all__ = ["LAYOUTS", "FileDepthOptions", "FileDepthSource", "FileKeypointSource", "SyntheticDepthOptions",
           "SyntheticDepthSource", "SyntheticKeypointOptions", "SyntheticKeypointSource", "pchmr_depth_sources",
           "pchmr_keypoint_sources", "to_lsp14"]  # fmt: skip

COCO17 = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
OPENPOSE25 = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "mid_hip", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee",
    "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear", "left_big_toe",
    "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel",
)  # fmt: skip
#: Keypoint count → (layout name, names of the first keypoints; the rest are ignored).
LAYOUTS: dict[int, tuple[str, tuple[str, ...]]] = {
    17: ("coco-17", COCO17),
    25: ("openpose-25", OPENPOSE25),
    133: ("coco-wholebody-133", COCO17),  # its first 17 keypoints are COCO's body keypoints
}
_LIMBS = ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "right_wrist",
          "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist")  # fmt: skip
LSP_FROM_NAMED: dict[str, tuple[str, ...]] = {
    **{n: (n,) for n in _LIMBS},
    "neck": ("left_shoulder", "right_shoulder"),
    "head": ("left_ear", "right_ear"),
}
#: Keypoints below this confidence count as missing.
MIN_CONFIDENCE = 0.3
#: An image needs at least this many confident keypoints to hold a person.
MIN_KEYPOINTS = 6
#: Depth sampled as the median of a (2r+1)² window around each keypoint.
DEPTH_WINDOW_RADIUS = 1
#: At least this share of the visible keypoints must have a valid depth.
MIN_DEPTH_SHARE = 0.5


def to_lsp14(points: np.ndarray, layout_names: Sequence[str], joint_names: Sequence[str], image_id: str) -> np.ndarray:
    """(K, 3) detector keypoints (x, y, confidence) of a layout → (J, 3) in ``joint_names``
    order; a joint made of several keypoints gets their mean position and smallest confidence."""
    index = {n: i for i, n in enumerate(layout_names)}
    out = np.zeros((len(joint_names), 3), dtype=np.float32)
    for j, name in enumerate(joint_names):
        if name not in LSP_FROM_NAMED:
            raise KeypointLayoutError(
                f"image {image_id}: no rule makes the body model's joint {name!r} from detector keypoints"
            )
        rows = points[[index[s] for s in LSP_FROM_NAMED[name]]]
        out[j, :2] = rows[:, :2].mean(0)
        out[j, 2] = rows[:, 2].min()
    out[out[:, 2] < MIN_CONFIDENCE, 2] = 0.0
    return out


# ------------------------------------------------------------------------------- files
def _instances(data: Any, image_id: str) -> list[np.ndarray]:
    """Every person instance of a keypoint JSON as (K, 3) arrays."""
    if isinstance(data, dict) and "people" in data:  # OpenPose
        return [np.asarray(p["pose_keypoints_2d"], dtype=np.float64).reshape(-1, 3) for p in data["people"]]
    if isinstance(data, dict) and "instance_info" in data:  # Sapiens / MMPose demos
        out = []
        for inst in data["instance_info"]:
            xy = np.asarray(inst["keypoints"], dtype=np.float64).reshape(-1, 2)
            scores = np.asarray(inst.get("keypoint_scores", np.ones(len(xy))), dtype=np.float64).reshape(-1, 1)
            if len(scores) != len(xy):
                raise KeypointLayoutError(f"image {image_id}: {len(xy)} keypoints but {len(scores)} keypoint_scores")
            out.append(np.concatenate([xy, scores], axis=1))
        return out
    if isinstance(data, dict) and "keypoints" in data:
        data = data["keypoints"]
    if isinstance(data, list) and data and isinstance(data[0], list) and data[0] and isinstance(data[0][0], list):
        return [np.asarray(inst, dtype=np.float64).reshape(-1, 3) for inst in data]
    if isinstance(data, list):
        if not data:
            return []
        flat = np.asarray(data, dtype=np.float64)
        if flat.ndim == 1 and flat.size % 3 == 0:
            return [flat.reshape(-1, 3)]
        if flat.ndim == 2 and flat.shape[1] == 3:
            return [flat]
    raise KeypointLayoutError(
        f"image {image_id}: unknown keypoint JSON; expected OpenPose ('people'), Sapiens/MMPose ('instance_info') "
        "or 'keypoints' as [[x, y, c], ...] / a flat [x, y, c, ...] list"
    )


class FileKeypointSource:
    """Per-image JSON files ``<dir>/<image stem>.json`` (or ``<stem>_keypoints.json``, OpenPose's
    naming). Several people: the instance with the most confident keypoints wins."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"keypoint directory {self.directory} does not exist")

    def path_for(self, image_id: str) -> Path | None:
        for name in (f"{image_id}.json", f"{image_id}_keypoints.json"):
            if (self.directory / name).is_file():
                return self.directory / name
        return None

    def stems(self) -> set[str]:
        return {p.stem[: -len("_keypoints")] if p.stem.endswith("_keypoints") else p.stem
                for p in self.directory.glob("*.json")}  # fmt: skip

    def __call__(self, item: AnnotationItem, joint_names: Sequence[str]) -> KeypointObservation:
        path = self.path_for(item.image_id)
        if path is None:
            from pchmr.core.contracts.annotation import CountMismatchError

            raise CountMismatchError(
                f"image {item.image_id}: no keypoint file {item.image_id}.json in {self.directory}"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise KeypointLayoutError(f"image {item.image_id}: {path.name} is not valid JSON ({exc})") from exc
        instances = _instances(data, item.image_id)
        if not instances:
            raise NoPersonError(f"image {item.image_id}: {path.name} holds no person")
        for inst in instances:
            if len(inst) not in LAYOUTS:
                known = ", ".join(f"{n} ({k})" for k, (n, _) in LAYOUTS.items())
                raise KeypointLayoutError(
                    f"image {item.image_id}: {path.name} has {len(inst)} keypoints per person; known layouts: {known}"
                )
        best = max(instances, key=lambda p: float((p[:, 2] >= MIN_CONFIDENCE).sum()))
        keypoints = to_lsp14(best, LAYOUTS[len(best)][1], joint_names, item.image_id)
        if int((keypoints[:, 2] > 0).sum()) < MIN_KEYPOINTS:
            raise NoPersonError(
                f"image {item.image_id}: only {int((keypoints[:, 2] > 0).sum())} body joints reach confidence "
                f"{MIN_CONFIDENCE}; at least {MIN_KEYPOINTS} are needed to fit a person"
            )
        return KeypointObservation(keypoints=keypoints, intrinsics=None)


def _read_depth_map(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        depth = np.load(path).astype(np.float64)
    else:
        from PIL import Image

        depth = np.asarray(Image.open(path)).astype(np.float64)
    depth = np.squeeze(depth)
    if depth.ndim != 2:
        raise DepthError(f"{path.name}: a depth map must be (H, W), got shape {depth.shape}")
    return depth


def sample_depth(
    depth: np.ndarray, keypoints: np.ndarray, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(J,) depth and validity at (J, 3) pixel keypoints of an image of (H, W) pixels, from a
    depth map of any resolution (coordinates rescaled), median of a small window; NaN, infinite
    and non-positive values are invalid."""
    h, w = image_size
    dh, dw = depth.shape
    values = np.zeros(len(keypoints), dtype=np.float32)
    valid = np.zeros(len(keypoints), dtype=np.float32)
    r = DEPTH_WINDOW_RADIUS
    for j, (x, y, c) in enumerate(keypoints):
        if c <= 0:
            continue
        col, row = int(np.floor(x * dw / w)), int(np.floor(y * dh / h))
        window = depth[max(row - r, 0) : row + r + 1, max(col - r, 0) : col + r + 1]
        good = window[np.isfinite(window) & (window > 0)]
        if 0 <= row < dh and 0 <= col < dw and good.size:
            values[j], valid[j] = float(np.median(good)), 1.0
    return values, valid


@dataclass(frozen=True)
class FileDepthOptions:
    """``--depth-option`` values of the ``files`` depth source."""

    invariance: str = option(
        "affine", choices=DEPTH_INVARIANCES, help="what the maps are known up to (affine: relative-depth networks)"
    )
    inverse: bool = option(False, help="the maps hold disparity-like values (larger = nearer), read as 1/value")


class FileDepthSource:
    """Per-image depth maps ``<dir>/<image stem>.npy`` or ``.png`` (16-bit PNGs hold depth in
    any unit). ``options.invariance`` (default ``affine``, as relative-depth networks such as
    Sapiens' give) is declared to the fitter; ``options.inverse`` reads disparity-like maps
    (larger = nearer) as 1/value."""

    def __init__(self, directory: str | Path, options: FileDepthOptions = FileDepthOptions()) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"depth directory {self.directory} does not exist")
        self.invariance, self.inverse = options.invariance, options.inverse

    def __call__(self, item: AnnotationItem, keypoints: np.ndarray) -> DepthObservation:
        path = next((self.directory / f"{item.image_id}{s}" for s in (".npy", ".png")
                     if (self.directory / f"{item.image_id}{s}").is_file()), None)  # fmt: skip
        if path is None:
            from pchmr.core.contracts.annotation import CountMismatchError

            raise CountMismatchError(
                f"image {item.image_id}: no depth map {item.image_id}.npy/.png in {self.directory}"
            )
        depth = _read_depth_map(path)
        if self.inverse:
            with np.errstate(divide="ignore", invalid="ignore"):
                depth = np.where(depth > 0, 1.0 / depth, np.nan)
        values, valid = sample_depth(depth, keypoints, item.size)
        return _checked_depth(item.image_id, values, valid, keypoints, self.invariance)


def _checked_depth(
    image_id: str, values: np.ndarray, valid: np.ndarray, keypoints: np.ndarray, invariance: str
) -> DepthObservation:
    visible = int((keypoints[:, 2] > 0).sum())
    good = int(valid.sum())
    if visible and good < MIN_DEPTH_SHARE * visible:
        raise DepthError(
            f"image {image_id}: depth is NaN, infinite or non-positive at {visible - good} of the {visible} visible "
            f"keypoints; at most {int((1 - MIN_DEPTH_SHARE) * 100)}% may be missing"
        )
    return DepthObservation(depth=values, valid=valid, invariance=invariance)


# --------------------------------------------------------------------------- synthetic
def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


@dataclass(frozen=True)
class SyntheticKeypointOptions:
    """``--keypoint-option`` values of the ``synthetic`` keypoint source."""

    noise_px: float = option(
        4.0, low=0.0, key="noise_px", help="Gaussian noise per coordinate, pixels of a 224-pixel crop (≈ 1.8 %)"
    )
    missing: float = option(0.05, low=0.0, high=1.0, high_open=True, help="probability that a joint is undetected")
    outliers: float = option(
        0.02, low=0.0, high=1.0, high_open=True, help="probability that a detected joint jumps 10–40 px"
    )
    seed: int = option(0, low=0, help="seed of the corruption (mixed with each image's index)")


class SyntheticKeypointSource:
    """Ground-truth 2D joints of a synthetic split, corrupted like a detector's output
    (:class:`SyntheticKeypointOptions`: Gaussian noise per coordinate, undetected joints with
    confidence 0, outliers off by a uniform 10–40 px jump). Intrinsics are the dataset's (a
    device knows its camera). Deterministic per (seed, image index)."""

    def __init__(self, options: SyntheticKeypointOptions = SyntheticKeypointOptions()) -> None:
        self.noise_px, self.missing, self.outliers, self.seed = (
            options.noise_px,
            options.missing,
            options.outliers,
            options.seed,
        )

    def __call__(self, item: AnnotationItem, joint_names: Sequence[str]) -> KeypointObservation:
        split, i = _synthetic(item)
        size = split.array("images").shape[1]
        crop = np.array(split.array("keypoints_2d")[i], dtype=np.float64)
        if len(crop) != len(joint_names):
            raise KeypointLayoutError(
                f"image {item.image_id}: the split has {len(crop)} joints, the body model {len(joint_names)}"
            )
        rng = _rng(self.seed, i, 0)
        pixels = (crop[:, :2] + 1.0) * size / 2.0
        scale = size / 224.0
        pixels += rng.normal(0.0, self.noise_px * scale, pixels.shape)
        jump = rng.random(len(pixels)) < self.outliers
        angle, length = rng.uniform(0, 2 * np.pi, len(pixels)), rng.uniform(10, 40, len(pixels)) * scale
        pixels += jump[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1) * length[:, None]
        conf = (rng.random(len(pixels)) >= self.missing).astype(np.float64)
        keypoints = np.concatenate([pixels, conf[:, None]], axis=1).astype(np.float32)
        return KeypointObservation(keypoints=keypoints, intrinsics=np.array(split.array("camera")[i], dtype=np.float32))


@dataclass(frozen=True)
class SyntheticDepthOptions:
    """``--depth-option`` values of the ``synthetic`` depth source."""

    noise_m: float = option(0.05, low=0.0, key="noise_m", help="Gaussian noise per joint depth, metres")
    max_scale: float = option(
        5.0, low=1.0, key="max_scale", help="scale s drawn log-uniform in [1/max_scale, max_scale]"
    )
    invariance: str = option("scale", choices=DEPTH_INVARIANCES, help="scale, affine (adds a shift) or metric (exact)")
    missing: float = option(0.05, low=0.0, high=1.0, high_open=True, help="probability that a joint has no depth")
    seed: int = option(0, low=0, help="seed of the corruption (mixed with each image's index)")


class SyntheticDepthSource:
    """True camera depth of every joint, corrupted (:class:`SyntheticDepthOptions`):
    ``z_obs = s·(z + ε) + t`` with ε ~ N(0, ``noise_m``²) metres per joint, s log-uniform in
    [1/``max_scale``, ``max_scale``] (unknown to the fitter) and, when ``invariance='affine'``,
    a shift t uniform in [0, 2·s·z_root]; ``missing`` drops a joint's depth. Deterministic per
    (seed, image index)."""

    def __init__(self, options: SyntheticDepthOptions = SyntheticDepthOptions()) -> None:
        self.noise_m, self.max_scale, self.invariance, self.missing, self.seed = (
            options.noise_m,
            options.max_scale,
            options.invariance,
            options.missing,
            options.seed,
        )

    def __call__(self, item: AnnotationItem, keypoints: np.ndarray) -> DepthObservation:
        split, i = _synthetic(item)
        z = np.array(split.array("joints_3d")[i][:, 2], dtype=np.float64) + float(split.array("root_cam")[i][2])
        rng = _rng(self.seed, i, 1)
        noisy = z + rng.normal(0.0, self.noise_m, z.shape)
        if self.invariance == "metric":
            scale, shift = 1.0, 0.0
        else:
            scale = float(np.exp(rng.uniform(-np.log(self.max_scale), np.log(self.max_scale))))
            shift = float(rng.uniform(0.0, 2.0 * scale * z.mean())) if self.invariance == "affine" else 0.0
        observed = np.maximum(scale * noisy + shift, 1e-3)
        valid = ((rng.random(len(z)) >= self.missing) & (keypoints[:, 2] > 0)).astype(np.float32)
        return _checked_depth(item.image_id, observed.astype(np.float32), valid, keypoints, self.invariance)


def _synthetic(item: AnnotationItem) -> tuple[Any, int]:
    split = item.dataset
    if split is None or item.index is None or not hasattr(split, "array"):
        raise ValueError(
            f"image {item.image_id}: the synthetic sources read ground truth from a synthetic dataset split; "
            "annotate a dataset (pchmr annotate synthetic), or use the file sources for image folders"
        )
    return split, int(item.index)


# --------------------------------------------------------------------------- factories
def file_keypoints(directory: str | Path, **options: object) -> FileKeypointSource:
    """The ``files`` keypoint source over ``directory`` (it takes no options)."""
    read_options(NoOptions, options, plugin="files", kind="keypoint_source")
    return FileKeypointSource(directory)


def synthetic_keypoints(**options: object) -> SyntheticKeypointSource:
    """The ``synthetic`` keypoint source (options: :class:`SyntheticKeypointOptions`)."""
    return SyntheticKeypointSource(
        read_options(SyntheticKeypointOptions, options, plugin="synthetic", kind="keypoint_source")
    )


def file_depth(directory: str | Path, **options: object) -> FileDepthSource:
    """The ``files`` depth source over ``directory`` (options: :class:`FileDepthOptions`)."""
    return FileDepthSource(directory, read_options(FileDepthOptions, options, plugin="files", kind="depth_source"))


def synthetic_depth(**options: object) -> SyntheticDepthSource:
    """The ``synthetic`` depth source (options: :class:`SyntheticDepthOptions`)."""
    return SyntheticDepthSource(read_options(SyntheticDepthOptions, options, plugin="synthetic", kind="depth_source"))


file_keypoints.options = NoOptions  # type: ignore[attr-defined]  # DeclaresOptions
synthetic_keypoints.options = SyntheticKeypointOptions  # type: ignore[attr-defined]
file_depth.options = FileDepthOptions  # type: ignore[attr-defined]
synthetic_depth.options = SyntheticDepthOptions  # type: ignore[attr-defined]


@hookimpl
def pchmr_keypoint_sources() -> Mapping[str, Callable[..., Any]]:
    return {"files": file_keypoints, "synthetic": synthetic_keypoints}


@hookimpl
def pchmr_depth_sources() -> Mapping[str, Callable[..., Any]]:
    return {"files": file_depth, "synthetic": synthetic_depth}
