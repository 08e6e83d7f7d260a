"""Prediction grids: the same test images with the mesh each run predicts and the ground truth
(the PCHMR paper's Figs. 4, 5 and 12).

:func:`prediction_grid` takes finished runs, keeps one run per setting and model (the first
repetition given, :func:`grid_runs`; unfinished runs, without ``model.pt``, are left out and named),
and reads the test split of the first kept run, the **reference**, once: its
:func:`sample_positions` (``k`` samples evenly spaced over the split, first and last included, so
the choice is the same on every call). Every kept run's model predicts those same images
(:func:`~pchmr.core.engine.inference.load_trained` with the reference's data), and is scored on
them under the reference's protocol (:func:`~pchmr.core.engine.inference.score_samples`: each
image's MPJPE and PA-MPJPE as the run's own evaluation computes them). A run that needs other
images (another input size or body model) cannot predict them and is left out, named.

:func:`plot_grid` draws it: one column per test image; the first row the input crop, the second
the ground-truth mesh (orange, :data:`~pchmr.core.kit.overlay.GT_COLOR`) over it and its side view,
then one row per run, the predicted mesh (blue) over the image and its side view, captioned with
that image's errors. The ground truth's weak-perspective camera is fitted to the sample's 2D
keypoints (:func:`fit_weak_perspective`, least squares); without enough of them the reference run's
predicted camera draws it, and the grid's notes say so.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pchmr.report.tables import (
    ReportError,
    RunSummary,
    config_differences,
    model_label,
    protocol_label,
    repetition_groups,
    run_names,
    setting_label,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "GRID_SAMPLES",
    "GridRow",
    "PredictionGrid",
    "fit_weak_perspective",
    "grid_figure",
    "grid_runs",
    "plot_grid",
    "prediction_grid",
    "sample_positions",
]

#: Test images per run when not told.
GRID_SAMPLES = 4
#: Fewest confident 2D keypoints a ground-truth camera is fitted to.
MIN_KEYPOINTS = 3
DPI = 110
CELL_INCHES = 1.45  # one image's side
LABEL_INCHES = 2.4  # the row labels' column
LABEL_WIDTH = 30


def sample_positions(size: int, k: int) -> list[int]:
    """``k`` positions evenly spaced over a split of ``size`` samples, the first and the last
    included (all of them when ``k >= size``)."""
    if size < 1 or k < 1:
        raise ReportError(f"a prediction grid needs at least one test sample and k >= 1, got {size} samples, k={k}")
    if k >= size:
        return list(range(size))
    if k == 1:
        return [0]
    return [round(i * (size - 1) / (k - 1)) for i in range(k)]


def fit_weak_perspective(joints: np.ndarray, keypoints: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """The weak-perspective camera (s, tx, ty) minimising Σ wⱼ ‖s·xyⱼ + t − uvⱼ‖² for root-relative
    3D ``joints`` (J, 3) and their 2D ``keypoints`` (J, 2, crop coordinates), or None with fewer
    than :data:`MIN_KEYPOINTS` weighted joints or a scale that is not positive."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    use = w > 0
    if use.sum() < MIN_KEYPOINTS:
        return None
    xy, uv, w = np.asarray(joints, np.float64)[use, :2], np.asarray(keypoints, np.float64)[use, :2], w[use]
    xy_mean = (w[:, None] * xy).sum(0) / w.sum()
    uv_mean = (w[:, None] * uv).sum(0) / w.sum()
    dx, du = xy - xy_mean, uv - uv_mean
    denominator = float((w * (dx * dx).sum(1)).sum())
    if denominator <= 0:
        return None
    scale = float((w * (dx * du).sum(1)).sum()) / denominator
    if not np.isfinite(scale) or scale <= 0:
        return None
    t = uv_mean - scale * xy_mean
    return np.array([scale, t[0], t[1]], dtype=np.float64)


def grid_runs(runs: Sequence[RunSummary]) -> tuple[list[RunSummary], list[str]]:
    """The runs a grid shows (one per setting and model: the first of each group of repetitions,
    finished with a ``model.pt``) and, for every other run, why it is not shown."""
    names = run_names(runs)
    chosen: list[RunSummary] = []
    left_out: list[str] = []
    for group in repetition_groups(runs):
        usable = [r for r in group if (r.path / "model.pt").is_file()]
        for run in group:
            if run not in usable:
                left_out.append(f"{names[run.path]} has no model.pt (unfinished, or its model was not kept)")
        if not usable:
            continue
        chosen.append(usable[0])
        if len(usable) > 1:
            others = ", ".join(f"{names[r.path]} (seed {r.config.seed})" for r in usable[1:])
            left_out.append(f"{others}: repetitions of {names[usable[0].path]}, which stands for them")
    return chosen, left_out


def row_label(run: RunSummary) -> str:
    return f"{setting_label(run.config)} · {model_label(run.config)} · seed {run.config.seed}"


def _distinct_labels(rows: list[GridRow]) -> list[GridRow]:
    """Rows sharing a label get the config fields that tell them apart appended (``lr=0.003``)."""
    out = list(rows)
    labels = [row.label for row in rows]
    for label in set(labels):
        same = [i for i, other in enumerate(labels) if other == label]
        if len(same) < 2:
            continue
        details = config_differences([rows[i].run.config.to_dict() for i in same])
        for i, detail in zip(same, details):
            if detail:
                out[i] = dataclasses.replace(rows[i], label=f"{label} · {detail}")
    return out


@dataclass(frozen=True)
class GridRow:
    """One run's predictions on the grid's images: ``front`` (the mesh over the image) and
    ``side`` pictures and each image's errors (mm: ``mpjpe_mm``, ``pa_mpjpe_mm``)."""

    run: RunSummary
    label: str
    front: tuple[np.ndarray, ...]
    side: tuple[np.ndarray, ...]
    errors: tuple[Mapping[str, float], ...]


@dataclass(frozen=True)
class PredictionGrid:
    """The images, the ground truth and the runs' rows of a prediction grid."""

    reference: Path  # the run whose test split gives the images
    protocol: Mapping[str, Any]  # the reference's, as its run directory records it
    sample_ids: tuple[int, ...]  # each image's id in that split
    images: tuple[np.ndarray, ...]  # (S, S, 3) uint8 crops
    truth_front: tuple[np.ndarray | None, ...]  # None: the sample has no ground-truth mesh
    truth_side: tuple[np.ndarray | None, ...]
    rows: tuple[GridRow, ...]
    left_out: tuple[str, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)


def prediction_grid(runs: Sequence[RunSummary], samples: int = GRID_SAMPLES) -> PredictionGrid:
    """The grid of ``runs`` on ``samples`` test images (module docstring); :class:`ReportError`
    naming the cause when no run can be shown or the reference's data cannot be read."""
    import torch
    from torch.utils.data import Subset

    from pchmr.core.contracts.sample import denormalize_image
    from pchmr.core.engine.devices import resolve_placement
    from pchmr.core.engine.inference import load_trained, predict_batch, score_samples
    from pchmr.core.engine.registry import PluginError
    from pchmr.core.kit.overlay import GT_COLOR, overlay_mesh, side_view

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ReportError(f"a prediction grid shows k >= 1 test images per run, got {samples!r}")
    chosen, left_out = grid_runs(runs)
    names = run_names(runs)
    if not chosen:
        raise ReportError("no run to draw a prediction grid of: " + "; ".join(left_out))
    placement = resolve_placement("cpu")
    first = chosen[0]
    try:
        reference = load_trained(first.path, with_data=True)
    except (OSError, ValueError, PluginError) as exc:  # missing or damaged data, model or plugin
        raise ReportError(f"cannot read the test images of {first.path} for the prediction grid: {exc}") from None
    data = reference.components.data  # type: ignore[union-attr]
    positions = sample_positions(len(data.test), samples)
    picked = [data.test[p] for p in positions]
    images = torch.stack([s["image"] for s in picked])
    pictures = [denormalize_image(s["image"]).numpy() for s in picked]
    faces = reference.faces
    notes: list[str] = []

    rows: list[GridRow] = []
    reference_cameras: np.ndarray | None = None
    for run in chosen:
        cfg = run.config
        if (cfg.body_model, cfg.input_size) != (reference.config.body_model, reference.config.input_size):
            left_out.append(f"{names[run.path]} predicts {cfg.body_model} meshes from {cfg.input_size} px crops, not the "
                            f"{reference.config.body_model} meshes from {reference.config.input_size} px crops of "
                            f"{names[first.path]}'s test images")  # fmt: skip
            continue
        try:
            trained = reference if run is first else load_trained(run.path, data=data)
        except (OSError, ValueError, PluginError) as exc:
            raise ReportError(f"cannot load the model of {run.path} for the prediction grid: {exc}") from None
        scores = score_samples(trained, Subset(data.test, positions), batch_size=len(positions), placement=placement)
        predicted = predict_batch(trained, images)
        if run is first:
            reference_cameras = predicted["camera"]
        run_faces = trained.faces
        front = tuple(overlay_mesh(pic, v, run_faces, c) for pic, v, c in
                      zip(pictures, predicted["vertices"], predicted["camera"]))  # fmt: skip
        side = tuple(side_view(v, run_faces, c, pic.shape[0], pic.shape[1]) for pic, v, c in
                     zip(pictures, predicted["vertices"], predicted["camera"]))  # fmt: skip
        errors = tuple({"mpjpe_mm": float(scores.per_sample["mpjpe_mm"][i]),
                        "pa_mpjpe_mm": float(scores.per_sample["pa_mpjpe_mm"][i])}
                       for i in range(len(positions)))  # fmt: skip
        rows.append(GridRow(run, row_label(run), front, side, errors))
    rows = _distinct_labels(rows)

    truth_front: list[np.ndarray | None] = []
    truth_side: list[np.ndarray | None] = []
    fallback = 0
    module = reference.module
    for i, (sample, picture) in enumerate(zip(picked, pictures)):
        if float(sample["has_vertices"]) <= 0:
            truth_front.append(None)
            truth_side.append(None)
            continue
        with torch.no_grad():
            vertices = sample["vertices"][None].float()
            joints = module.regress_joints(vertices)
            root = module._root(joints)
        gt_vertices = (vertices - root)[0].numpy()
        gt_joints = (joints - root)[0].numpy()
        keypoints = sample["keypoints_2d"].numpy()
        valid = sample["joints_3d"][:, 3].numpy() > 0
        camera = fit_weak_perspective(gt_joints, keypoints[:, :2], keypoints[:, 2] * valid)
        if camera is None:
            camera = reference_cameras[i]  # type: ignore[index]
            fallback += 1
        truth_front.append(overlay_mesh(picture, gt_vertices, faces, camera, color=GT_COLOR))
        truth_side.append(side_view(gt_vertices, faces, camera, picture.shape[0], picture.shape[1], color=GT_COLOR))
    if fallback:
        notes.append(f"{fallback} ground-truth mesh(es) drawn through {names[first.path]}'s predicted camera "
                     f"(fewer than {MIN_KEYPOINTS} confident 2D keypoints to fit one)")  # fmt: skip
    notes.append(
        f"test images: samples {', '.join(str(int(s['index'])) for s in picked)} (evenly spaced over the "
        f"{len(data.test)} of {names[first.path]}'s test split); every row predicts these same images, scored by that "
        "split's protocol"
    )
    return PredictionGrid(first.path, dict(first.protocol), tuple(int(s["index"]) for s in picked), tuple(pictures),
                          tuple(truth_front), tuple(truth_side), tuple(rows), tuple(left_out), tuple(notes))  # fmt: skip


def plot_grid(grid: PredictionGrid, path: str | Path) -> Path:
    """Write the grid (:func:`grid_figure`) as a PNG to ``path``."""
    fig = grid_figure(grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def grid_figure(grid: PredictionGrid) -> Figure:
    """The grid as a figure: a column per test image; rows: the input, the ground truth, each run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(grid.images)
    labels = ["input image", "ground truth (orange)", *(f"{row.label} (blue)" for row in grid.rows)]
    n_rows = len(labels)
    width = LABEL_INCHES + k * 2 * CELL_INCHES
    height = 0.9 + n_rows * (CELL_INCHES + 0.35)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes: Any = fig.subplots(n_rows, k, squeeze=False)
    for j in range(k):
        image = grid.images[j]
        pictures: list[tuple[np.ndarray, str]] = [(image, f"test sample {grid.sample_ids[j]}")]
        if grid.truth_front[j] is None:
            pictures.append((image, "no ground-truth mesh"))
        else:
            pictures.append((np.concatenate([grid.truth_front[j], grid.truth_side[j]], axis=1), "front | side"))
        for row in grid.rows:
            e = row.errors[j]
            pictures.append((np.concatenate([row.front[j], row.side[j]], axis=1),
                             f"MPJPE {e['mpjpe_mm']:.0f} · PA {e['pa_mpjpe_mm']:.0f} mm"))  # fmt: skip
        for i, (picture, caption) in enumerate(pictures):
            ax = axes[i][j]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_title(caption, fontsize=7, pad=2)
            if j == 0:
                ax.set_ylabel(textwrap.fill(labels[i], LABEL_WIDTH), fontsize=7, rotation=0, ha="right",
                              va="center", labelpad=6)  # fmt: skip
    fig.suptitle(textwrap.fill(f"Predictions on {grid.reference.name}'s test images — protocol: "
                               f"{protocol_label(grid.protocol)}", 110), fontsize=9)  # fmt: skip
    return fig
