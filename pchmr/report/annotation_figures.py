"""Figures of ``pchmr annotate`` fits, the PCHMR paper's Fig. 6: per image the fitted mesh over
the image (front view) and turned 90° about the vertical axis (side view), several annotations
of the same images side by side (DePoser beside SMPLify-X), the ground truth when it is known.

The front view is drawn through the camera the fit used: the pinhole of the crop it was fitted
in (``intrinsics``, crop units) with the mesh at the fitted ``translation``, so the mesh lies on
the person exactly where the fit put it. The side view is orthographic at the front view's scale
at the root (focal / root depth, pixels per metre), the root at the front view's height and the
panel's centre, the camera on the right: what a 2D fit gets wrong in depth (a limb flipped
towards or away from the camera, the torso's yaw) shows there. With ground truth (synthetic
images) the true mesh is drawn in :data:`~pchmr.core.kit.overlay.GT_COLOR` under the fit in
every side view, root on root at the fit's scale, and in two columns of its own.

:func:`open_annotation` reads and checks one ``pchmr annotate --out`` directory;
:func:`match_images` pairs the annotated images of several by image id; :func:`draw_fit` and
:func:`draw_truth` draw one image's views (and return the masks they drew, which the tests and
the numbers use); :func:`write_figures` writes one PNG per image, an overview of the first
images and ``figures.json`` (per image and annotation: MPJPE, mean joint depth error and the
side-view overlap with the truth when known, the fit's 2D reprojection error).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pchmr.core.kit.atomic import write_bytes_atomic, write_text_atomic
from pchmr.core.kit.joints import LSP_14
from pchmr.core.kit.overlay import GT_COLOR, MESH_COLOR, MeshLayer, draw_mesh, side_layers
from pchmr.core.kit.pseudo_labels import CAMERA_ARRAYS, LABELS_FILE, LabelDirectory, read_label_directory
from pchmr.core.kit.render import PinholeCamera

__all__ = [
    "ANNOTATOR_COLORS",
    "FIGURES_FILE",
    "OVERVIEW_FILE",
    "PANEL_SIZE",
    "Annotation",
    "FigureInputError",
    "View",
    "draw_fit",
    "draw_truth",
    "figure_name",
    "match_images",
    "name_columns",
    "open_annotation",
    "torso_angles",
    "write_figures",
]

#: Side of one panel (pixels) unless told.
PANEL_SIZE = 256
#: The paper's Fig. 6 colours: DePoser green, SMPLify-X red; other annotators MESH_COLOR.
ANNOTATOR_COLORS = {"deposer": (0.35, 0.78, 0.42), "smplifyx": (0.88, 0.33, 0.33)}
#: Opacity of a fit over the image (front) and over the ground truth (side).
FRONT_ALPHA, SIDE_ALPHA = 0.7, 0.75
OVERVIEW_FILE, FIGURES_FILE = "overview.png", "figures.json"
#: Pixels between panels, and the height of a title or caption line at a panel side of 256.
GUTTER, LINE = 4, 20
BACKGROUND = 255
#: Mean absolute difference (grey levels) under which a re-cropped source image counts as the
#: stored crop (both come from the same bilinear resampling, so they are equal).
SAME_CROP = 2.0


class FigureInputError(ValueError):
    """An annotation cannot be drawn or compared; the message names the directory, what was
    wrong and what was expected."""


@dataclass
class Annotation:
    """One ``pchmr annotate --out`` directory, ready to draw: its labels, the body model's faces,
    a column name and colour, and each annotated image's position and record."""

    path: Path
    labels: LabelDirectory
    faces_for: Callable[[str], np.ndarray] = field(repr=False)
    name: str = ""
    color: tuple[float, float, float] = MESH_COLOR
    position: dict[str, int] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    _faces: np.ndarray | None = field(default=None, repr=False)
    _sources: dict[str, Path] | None = field(default=None, repr=False)

    @property
    def body_model(self) -> str:
        return str(self.labels.info.get("body_model", ""))

    @property
    def faces(self) -> np.ndarray:
        """(F, 3) triangles of the annotation's body model (loaded on first use, then checked
        against the stored meshes)."""
        if self._faces is None:
            faces = np.asarray(self.faces_for(self.body_model), dtype=np.int64)
            vertices = self.labels.array("vertices").shape[1]
            if faces.ndim != 2 or faces.shape[1] != 3 or int(faces.max(initial=-1)) >= vertices:
                raise FigureInputError(
                    f"{self.path / LABELS_FILE}: its meshes have {vertices} vertices, which the faces of body model "
                    f"{self.body_model!r} do not fit; was it annotated with another body model than info.json says?"
                )
            self._faces = faces
        return self._faces

    @property
    def annotator(self) -> str:
        described = self.labels.info.get("annotator")
        return str(described.get("annotator", "?") if isinstance(described, dict) else described or "?")

    @property
    def has_ground_truth(self) -> bool:
        """Whether the true meshes are stored (synthetic images): drawn under the fits' side views."""
        return self.labels.has_ground_truth

    @property
    def has_true_camera(self) -> bool:
        """Whether the true root positions are stored too, so the truth has a front view."""
        return self.labels.has_ground_truth and "gt_translation" in self.labels.keys

    def source_image(self, image_id: str) -> Path | None:
        """The image file ``image_id`` was cropped from, when the annotation's target folder is
        still where it was (an image folder; synthetic images have none)."""
        if self._sources is None:
            from pchmr.core.engine.annotation import IMAGE_SUFFIXES

            info = self.labels.info
            target = Path(str(info.get("image_folder") or info.get("target") or ""))
            self._sources = {}
            if info.get("target") not in (None, "synthetic") and target.is_dir():
                self._sources = {p.stem: p for p in sorted(target.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        return self._sources.get(image_id)


def open_annotation(path: str | Path, faces_for: Callable[[str], np.ndarray], name: str | None = None) -> Annotation:
    """Read and check one ``pchmr annotate --out`` directory (``FileNotFoundError`` or
    :class:`~pchmr.core.contracts.errors.DatasetFormatError` naming what is missing), refuse one
    without the fit's camera (:class:`FigureInputError`: written before the figures existed);
    its body model's faces come from ``faces_for(body_model_name)`` when first drawn."""
    path = Path(path)
    labels = read_label_directory(path)
    if len(labels) and not labels.has_camera:
        missing = [key for key in CAMERA_ARRAYS if key not in labels.keys]
        raise FigureInputError(
            f"{path / LABELS_FILE} has no fitted camera ({', '.join(missing)}): it was written by a pchmr annotate "
            f"older than its figures; annotate the images again to draw them"
        )
    if not str(labels.info.get("body_model", "")):
        raise FigureInputError(f"{path / 'info.json'} names no body_model; pchmr annotate writes one")
    annotation = Annotation(path, labels, faces_for)
    annotation.name = name or annotation.annotator
    annotation.color = ANNOTATOR_COLORS.get(annotation.annotator, MESH_COLOR)
    annotation.position = {str(image_id): k for k, image_id in enumerate(labels.image_ids)}
    annotation.records = {str(r.get("image_id")): r for r in labels.records}
    return annotation


def match_images(annotations: Sequence[Annotation]) -> tuple[list[str], dict[str, list[str]]]:
    """The image ids every annotation has annotated (in the first one's order), and per
    directory the ids it annotated that some other lacks. Refuses (:class:`FigureInputError`)
    no common image, and an id whose ground truth differs between two annotations (the same
    name, not the same image: synthetic images of another seed or split)."""
    common = [i for i in annotations[0].position if all(i in a.position for a in annotations[1:])]
    shared = set(common)
    only = {str(a.path): [i for i in a.position if i not in shared] for a in annotations}
    if not common:
        shown = "; ".join(f"{a.path}: {_some(list(a.position))}" for a in annotations)
        raise FigureInputError(
            f"the annotations share no annotated image (matched by image id, the file stem or the synthetic "
            f"index): {shown}; give pchmr annotate outputs of the same images"
        )
    with_truth = [a for a in annotations if a.labels.has_ground_truth]
    for other in with_truth[1:]:
        first = with_truth[0]
        for image_id in common:
            a = first.labels.array("gt_vertices")[first.position[image_id]]
            b = other.labels.array("gt_vertices")[other.position[image_id]]
            if a.shape != b.shape or not np.allclose(a, b, atol=1e-5):
                raise FigureInputError(
                    f"image {image_id} has different ground truth in {first.path} and {other.path}: the same name is "
                    "not the same image (synthetic images of another --data-option seed or split?); compare "
                    "annotations of the same images"
                )
    return common, only


def _some(ids: list[str], n: int = 3) -> str:
    if not ids:
        return "no annotated image"
    return ", ".join(ids[:n]) + (f" … ({len(ids)} images)" if len(ids) > n else f" ({len(ids)} images)")


# ------------------------------------------------------------------------------ drawing
@dataclass(frozen=True)
class View:
    """One image drawn for one annotation: ``front`` (S, S, 3) uint8 (the mesh over the image),
    ``side`` (S, S, 3) uint8, the masks of the fit in each (``front_mask``, ``side_mask``) and of
    the ground truth in the side view (``truth_side_mask``, None without ground truth)."""

    front: np.ndarray
    side: np.ndarray
    front_mask: np.ndarray
    side_mask: np.ndarray
    truth_side_mask: np.ndarray | None = None


def crop_camera(intrinsics: np.ndarray, size: int) -> PinholeCamera:
    """The pinhole of crop-unit intrinsics (f, cx, cy) (:mod:`pchmr.core.contracts.annotation`)
    for the crop drawn ``size`` x ``size`` pixels."""
    f, cx, cy = (float(v) for v in intrinsics)
    half = size / 2.0
    return PinholeCamera(fx=f * half, fy=f * half, cx=(cx + 1.0) * half, cy=(cy + 1.0) * half, height=size, width=size)


def background(annotation: Annotation, image_id: str, size: int) -> tuple[np.ndarray, str]:
    """The image under the front view, ``size`` pixels square: the crop's box of the source image
    when that image is still in the annotation's target folder (and crops to the stored crop),
    else the stored crop resampled; and which of the two (``"source image"`` / ``"crop"``)."""
    from PIL import Image

    from pchmr.core.engine.annotation import crop_image

    k = annotation.position[image_id]
    crop = np.asarray(annotation.labels.array("images")[k])
    source = annotation.source_image(image_id)
    if source is not None and "crop_box" in annotation.labels.keys:
        box = tuple(float(v) for v in annotation.labels.array("crop_box")[k])
        try:
            with Image.open(source) as opened:
                original = np.asarray(opened.convert("RGB"))
        except (OSError, ValueError):
            original = None
        if original is not None:
            again = crop_image(original, box, crop.shape[0]).astype(np.float64)  # type: ignore[arg-type]
            if np.abs(again - crop).mean() <= SAME_CROP:
                return crop_image(original, box, size), "source image"  # type: ignore[arg-type]
    if crop.shape[0] == size:
        return crop.copy(), "crop"
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)), "crop"


def outline(picture: np.ndarray, mask: np.ndarray, color: tuple[float, float, float], dark: float = 0.45) -> np.ndarray:
    """``picture`` with the edge of ``mask`` (its pixels with a 4-neighbour outside it) in
    ``color`` darkened by ``dark``: a fit stays visible on a background of its own colour."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    edge = mask & ~inner
    out = picture.copy()
    out[edge] = np.round(np.asarray(color) * dark * 255.0).astype(np.uint8)
    return out


def _side_geometry(camera: PinholeCamera, translation: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Pixels per metre at the root and the side view's root pixel (centre, the root's height)."""
    _, y, z = (float(v) for v in translation)
    return camera.fx / z, (camera.width / 2.0, camera.fy * y / z + camera.cy)


def draw_fit(annotation: Annotation, image_id: str, size: int = PANEL_SIZE, *, picture: np.ndarray | None = None,
             truth: bool = True) -> View:  # fmt: skip
    """The fit of ``image_id``: its mesh over ``picture`` (default :func:`background`) through the
    fitted camera, and its side view, the ground truth under it when known and ``truth``."""
    labels, k = annotation.labels, annotation.position[image_id]
    if picture is None:
        picture, _ = background(annotation, image_id, size)
    camera = crop_camera(labels.array("intrinsics")[k], size)
    translation = np.asarray(labels.array("translation")[k], dtype=np.float64)
    vertices = np.asarray(labels.array("vertices")[k], dtype=np.float64)
    if not np.isfinite(translation).all() or translation[2] <= 0 or not np.isfinite(vertices).all():
        raise FigureInputError(
            f"{annotation.path / LABELS_FILE}: image {image_id}'s fit is not drawable (translation {translation}, "
            "finite vertices in front of the camera expected)"
        )
    front, front_mask = draw_mesh(picture, vertices + translation, annotation.faces, camera, annotation.color,
                                  FRONT_ALPHA)  # fmt: skip
    front = outline(front, front_mask, annotation.color)
    scale, origin = _side_geometry(camera, translation)
    layers = [MeshLayer(vertices, annotation.faces, annotation.color, SIDE_ALPHA)]
    gt = truth and annotation.has_ground_truth
    if gt:
        gt_vertices = np.asarray(labels.array("gt_vertices")[k], dtype=np.float64)
        layers.insert(0, MeshLayer(gt_vertices, annotation.faces, GT_COLOR, 1.0))
    side, masks = side_layers(layers, scale=scale, origin=origin, height=size, width=size)
    return View(front, side, front_mask, masks[-1], masks[0] if gt else None)


def draw_truth(annotation: Annotation, image_id: str, size: int = PANEL_SIZE, *,
               picture: np.ndarray | None = None) -> View:  # fmt: skip
    """The ground truth of ``image_id`` drawn like a fit (front through the true root position
    and the camera the fit used — a synthetic image's own —, side alone at its own scale)."""
    labels, k = annotation.labels, annotation.position[image_id]
    if not annotation.has_true_camera:
        raise FigureInputError(f"{annotation.path / LABELS_FILE} has no ground truth (gt_vertices, gt_translation)")
    if picture is None:
        picture, _ = background(annotation, image_id, size)
    camera = crop_camera(labels.array("intrinsics")[k], size)
    translation = np.asarray(labels.array("gt_translation")[k], dtype=np.float64)
    vertices = np.asarray(labels.array("gt_vertices")[k], dtype=np.float64)
    front, front_mask = draw_mesh(picture, vertices + translation, annotation.faces, camera, GT_COLOR, FRONT_ALPHA)
    front = outline(front, front_mask, GT_COLOR)
    scale, origin = _side_geometry(camera, translation)
    side, masks = side_layers([MeshLayer(vertices, annotation.faces, GT_COLOR, 1.0)], scale=scale, origin=origin,
                              height=size, width=size)  # fmt: skip
    return View(front, side, front_mask, masks[0], masks[0])


# ------------------------------------------------------------------------------ numbers
def torso_angles(joints: np.ndarray) -> tuple[float, float]:
    """(yaw, lean) in degrees of a camera-frame LSP-14 skeleton: the yaw of the hips' and
    shoulders' left-to-right direction about the vertical axis (0: across the image), and the
    lean of the mid-hip → neck direction in depth (positive: the top away from the camera). What
    a 2D fit gets wrong and a side view shows: a body turned about the vertical or leaning in depth."""
    j = {name: np.asarray(joints[i], dtype=np.float64) for i, name in enumerate(LSP_14)}
    across = j["left_shoulder"] - j["right_shoulder"] + j["left_hip"] - j["right_hip"]
    up = j["neck"] - (j["left_hip"] + j["right_hip"]) / 2.0
    return math.degrees(math.atan2(across[2], across[0])), math.degrees(math.atan2(up[2], -up[1]))


def fit_numbers(annotation: Annotation, image_id: str, view: View | None = None) -> dict[str, float]:
    """Per image: the fit's 2D reprojection error (pixels of a 224-pixel crop, from its record)
    and, with ground truth, MPJPE and the mean absolute depth error of the root-relative joints
    (mm), how far the torso is turned and leaning from the truth's (:func:`torso_angles`,
    degrees; LSP-14 joints), and the side view's overlap (IoU) of the fit with the truth."""
    k = annotation.position[image_id]
    numbers: dict[str, float] = {}
    losses = annotation.records.get(image_id, {}).get("losses") or {}
    if "reprojection_px" in losses:
        numbers["reprojection_px"] = float(losses["reprojection_px"])
    if annotation.labels.has_ground_truth:
        joints = np.asarray(annotation.labels.array("joints_3d")[k], dtype=np.float64)[:, :3]
        truth = np.asarray(annotation.labels.array("gt_joints_3d")[k], dtype=np.float64)[:, :3]
        numbers["mpjpe_mm"] = float(np.linalg.norm(joints - truth, axis=1).mean() * 1000.0)
        numbers["depth_mm"] = float(np.abs(joints[:, 2] - truth[:, 2]).mean() * 1000.0)
        if len(joints) == len(LSP_14) == len(truth):
            (yaw, lean), (true_yaw, true_lean) = torso_angles(joints), torso_angles(truth)
            numbers["torso_yaw_deg"] = float(abs((yaw - true_yaw + 180.0) % 360.0 - 180.0))
            numbers["torso_lean_deg"] = float(abs(lean - true_lean))
    if view is not None and view.truth_side_mask is not None:
        union = int((view.side_mask | view.truth_side_mask).sum())
        numbers["side_iou"] = float((view.side_mask & view.truth_side_mask).sum() / union) if union else 0.0
    return numbers


# ------------------------------------------------------------------------------ layout
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_strip(texts: Sequence[str], widths: Sequence[int], height: int, font_size: int) -> np.ndarray:
    """A white strip with each text left-aligned over its column (columns ``widths`` + gutters)."""
    from PIL import Image, ImageDraw

    total = sum(widths) + GUTTER * (len(widths) - 1)
    strip = Image.new("RGB", (total, height), (BACKGROUND,) * 3)
    draw, font, x = ImageDraw.Draw(strip), _font(font_size), 0
    for text, width in zip(texts, widths):
        draw.text((x + 3, (height - font_size) // 2), _fit_text(draw, text, font, width - 6), fill=(20, 20, 20),
                  font=font)  # fmt: skip
        x += width + GUTTER
    return np.asarray(strip)


def _fit_text(draw: Any, text: str, font: Any, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def _row(panels: Sequence[np.ndarray]) -> np.ndarray:
    height = panels[0].shape[0]
    gap = np.full((height, GUTTER, 3), BACKGROUND, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for panel in panels:
        parts += [panel, gap]
    return np.concatenate(parts[:-1], axis=1)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def figure_name(image_id: str) -> str:
    """The per-image PNG's file name: ``<image_id>.png`` (an image named like the overview gets
    ``-image`` appended)."""
    return f"{image_id}-image.png" if f"{image_id}.png" == OVERVIEW_FILE else f"{image_id}.png"


def _caption(annotation: Annotation, numbers: dict[str, float]) -> str:
    parts = [annotation.name]
    if "mpjpe_mm" in numbers:
        parts.append(f"MPJPE {numbers['mpjpe_mm']:.0f} mm, depth {numbers['depth_mm']:.0f} mm")
    if "torso_yaw_deg" in numbers:
        parts.append(f"torso turned {numbers['torso_yaw_deg']:.0f}°, leaning {numbers['torso_lean_deg']:.0f}°")
    if "side_iou" in numbers:
        parts.append(f"side IoU {numbers['side_iou']:.2f}")
    if "reprojection_px" in numbers:
        parts.append(f"2D {numbers['reprojection_px']:.1f} px")
    return " · ".join(parts[:1]) + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


@dataclass
class _Drawn:
    """One image's row: panels, column titles, caption, per-annotation numbers."""

    image_id: str
    panels: list[np.ndarray]
    titles: list[str]
    caption: str
    numbers: dict[str, dict[str, float]]
    background: str


def _draw_image(annotations: Sequence[Annotation], image_id: str, size: int) -> _Drawn:
    pictures: dict[int, tuple[np.ndarray, str]] = {}

    def picture_of(annotation: Annotation) -> np.ndarray:
        if id(annotation) not in pictures:
            pictures[id(annotation)] = background(annotation, image_id, size)
        return pictures[id(annotation)][0]

    panels, titles, captions, numbers = [picture_of(annotations[0])], [f"image {image_id}"], [], {}
    kind = pictures[id(annotations[0])][1]
    for annotation in annotations:
        view = draw_fit(annotation, image_id, size, picture=picture_of(annotation))
        panels += [view.front, view.side]
        titles += [f"{annotation.name} front", f"{annotation.name} side" + (" (GT under it)"
                   if view.truth_side_mask is not None else "")]  # fmt: skip
        numbers[annotation.name] = fit_numbers(annotation, image_id, view)
        captions.append(_caption(annotation, numbers[annotation.name]))
    truth = next((a for a in annotations if a.has_true_camera), None)
    if truth is not None:
        view = draw_truth(truth, image_id, size, picture=picture_of(truth))
        panels += [view.front, view.side]
        titles += ["ground truth front", "ground truth side"]
    caption = " | ".join(captions) + "   (side views: the camera is on the right)"
    return _Drawn(image_id, panels, titles, caption, numbers, kind)


def _figure(rows: Sequence[_Drawn], size: int) -> np.ndarray:
    """Column titles once, then per image its panels and caption."""
    widths = [size] * len(rows[0].panels)
    font = max(10, round(13 * size / PANEL_SIZE))
    line = max(14, round(LINE * size / PANEL_SIZE))
    parts = [_text_strip(rows[0].titles, widths, line, font)]
    for drawn in rows:
        if drawn is not rows[0]:
            parts.append(_text_strip(drawn.titles[:1], [sum(widths) + GUTTER * (len(widths) - 1)], line, font))
        parts += [_row(drawn.panels), _text_strip([drawn.caption], [sum(widths) + GUTTER * (len(widths) - 1)], line,
                                                  font)]  # fmt: skip
    return np.concatenate(parts, axis=0)


def write_figures(annotations: Sequence[Annotation], out: str | Path, *, size: int = PANEL_SIZE, overview: int = 8,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Draw every image the annotations share into ``out``: ``<image_id>.png`` (columns: the
    image, per annotation its front and side view, the ground truth's when known), the first
    ``overview`` images stacked in :data:`OVERVIEW_FILE` (none for 0), and :data:`FIGURES_FILE`
    with the matching and the numbers (per image and their means). Every file is written
    atomically; returns what figures.json holds."""
    if size < 32:
        raise FigureInputError(f"a panel must be at least 32 pixels wide to show a mesh, got {size}")
    name_columns(annotations)
    common, only = match_images(annotations)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[_Drawn] = []
    per_image = []
    for image_id in common:
        drawn = _draw_image(annotations, image_id, size)
        write_bytes_atomic(out / figure_name(image_id), _png(_figure([drawn], size)))
        per_image.append({"image_id": image_id, "figure": figure_name(image_id), "background": drawn.background,
                          **drawn.numbers})  # fmt: skip
        if len(rows) < overview:
            rows.append(drawn)
        if progress:
            progress(1)
    if rows:
        write_bytes_atomic(out / OVERVIEW_FILE, _png(_figure(rows, size)))
    means = {}
    for annotation in annotations:
        keys = sorted({key for row in per_image for key in row[annotation.name]})
        means[annotation.name] = {key: _mean([row[annotation.name].get(key) for row in per_image]) for key in keys}
    summary = {
        "annotations": [
            {"name": a.name, "directory": str(a.path), "annotator": a.annotator, "annotated": len(a.labels)}
            for a in annotations
        ],
        "images": len(common),
        "only_in": {path: ids for path, ids in only.items() if ids},
        "ground_truth": any(a.has_ground_truth for a in annotations),
        "panel_size": size,
        "overview": [drawn.image_id for drawn in rows],
        "mean": means,
        "per_image": per_image,
    }
    write_text_atomic(out / FIGURES_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def _mean(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def name_columns(annotations: Sequence[Annotation]) -> None:
    """Give every annotation a distinct column name: its annotator's, ``annotator (directory)``
    where two share an annotator, numbered where even those agree."""
    annotators = [a.annotator for a in annotations]
    names = [a if annotators.count(a) == 1 else f"{a} ({x.path.name})" for a, x in zip(annotators, annotations)]
    names = [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]
    for annotation, name in zip(annotations, names):
        annotation.name = name
