"""``pchmr eval``: score a run's global model on a dataset without training."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from pchmr.cli._options import check_number, parse_options
from pchmr.cli._outdir import OVERWRITE_HELP, check_out_dir, output_dir
from pchmr.cli._output import RUN_FAILED, console, fail

__all__ = ["evaluate_command"]

_METRICS = {"mpjpe_mm": "MPJPE (mm)", "pa_mpjpe_mm": "PA-MPJPE (mm)", "mpvpe_mm": "MPVPE (mm)", "pck": "PCK@150mm"}


def evaluate_command(
    checkpoint: Path = typer.Option(..., help="A finished run directory (config.json + model.pt) or its model.pt."),
    dataset: Optional[str] = typer.Option(
        None,
        metavar="NAME[:PATH]",
        help="Dataset plugin to evaluate on, with its data path (e.g. 3dpw-pkl:/data/3DPW); default: the run's own "
        "dataset and test split, which reproduces the run's final metrics.",
    ),
    dataset_option: list[str] = typer.Option([], "--dataset-option", help="Dataset option key=value (repeatable)."),
    protocol: Optional[str] = typer.Option(
        None,
        help="Evaluation protocol of a real dataset: spin, metro or mid-hip (pchmr.core.kit.joints.PROTOCOLS; "
        "the dataset's option protocol=NAME); default: the dataset's.",
    ),
    num_test: Optional[int] = typer.Option(None, help="Test samples (synthetic data; default: the run's)."),
    out: Optional[Path] = typer.Option(
        None, help="Write metrics.json, per_sample.csv and overlays of the best and worst samples here."
    ),
    worst: int = typer.Option(4, help="With --out: overlays of this many best and worst samples (by MPJPE)."),
    batch_size: int = typer.Option(64, help="Evaluation batch size (the run's: 64)."),
    accelerator: str = typer.Option("cpu", help="cpu, gpu, mps or auto."),
    precision: str = typer.Option("32-true", help="32-true, 16-mixed (GPU) or bf16-mixed."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Evaluate a trained model on a dataset's test split: the metrics table with its protocol,
    per-sample errors (CSV) and overlays of the best and worst samples."""
    from pchmr.core.engine.config import ConfigError
    from pchmr.core.engine.devices import DeviceError, resolve_placement
    from pchmr.core.engine.inference import load_trained, score_samples
    from pchmr.core.engine.registry import PluginError
    from pchmr.core.kit.atomic import WriteError

    for problem in (
        check_number("--batch-size", batch_size, 1, whole=True),
        check_number("--worst", worst, 0, whole=True),
        None if num_test is None else check_number("--num-test", num_test, 1, whole=True),
    ):
        if problem:
            raise fail(problem)
    options = parse_options(dataset_option, "--dataset-option", fail)
    if protocol is not None:
        from pchmr.core.kit.joints import PROTOCOLS

        if protocol not in PROTOCOLS:
            raise fail(f"unknown --protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
        if "protocol" in options and options["protocol"] != protocol:
            raise fail(f"--protocol {protocol} and --dataset-option protocol={options['protocol']} disagree: give one")
        options["protocol"] = protocol
    name, path = (None, None)
    if dataset is not None:
        name, _, given_path = dataset.partition(":")
        if not name:
            raise fail(f"--dataset expects NAME[:PATH] (e.g. 3dpw-pkl:/data/3DPW), got '{dataset}'")
        path = given_path or None
    if out is not None:
        check_out_dir(out, overwrite)
    try:
        placement = resolve_placement(accelerator, 1, precision)
        trained = load_trained(
            checkpoint, dataset=name, dataset_path=path, dataset_options=options, num_test=num_test, with_data=True
        )
    except (FileNotFoundError, ValueError, ConfigError, DeviceError, PluginError) as exc:
        raise fail(str(exc)) from None
    data = trained.components.data  # type: ignore[union-attr]
    try:
        scores = score_samples(trained, data.test, batch_size=batch_size, placement=placement)
    except FloatingPointError as exc:
        raise fail(str(exc), code=RUN_FAILED) from None
    _print_table(scores, trained.model_path)
    if out is None:
        return
    try:
        with output_dir(out, overwrite):
            _write_outputs(out, scores, trained, data.test, worst)
    except WriteError as exc:
        raise fail(str(exc), code=RUN_FAILED) from None
    console.print(f"wrote metrics.json, per_sample.csv and {2 * min(worst, len(scores.index))} overlays → {out}")


def _print_table(scores, model_path: Path) -> None:
    table = Table(
        title=f"{model_path} on {len(scores.index)} test samples",
        caption=f"protocol: {scores.protocol.label()} · PCK at 150 mm",
    )
    for column in ("metric", "value", "median", "worst sample"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key, label in _METRICS.items():
        value = scores.metrics.get(key, math.nan)
        per = scores.per_sample[key]
        finite = per[np.isfinite(per)]
        fmt = "{:.3f}" if key == "pck" else "{:.1f}"
        worst = (finite.min() if key == "pck" else finite.max()) if finite.size else math.nan
        table.add_row(label, fmt.format(value), fmt.format(float(np.median(finite)) if finite.size else math.nan),
                      fmt.format(worst))  # fmt: skip
    console.print(table)


def _write_outputs(out: Path, scores, trained, dataset, worst: int) -> None:
    from pchmr.core.contracts.sample import denormalize_image
    from pchmr.core.engine.inference import predict_batch
    from pchmr.core.kit.atomic import write_bytes_atomic, write_text_atomic
    from pchmr.core.kit.overlay import GT_COLOR, front_and_side, overlay_mesh

    record = {
        "checkpoint": str(trained.model_path),
        "metrics": scores.metrics,
        "protocol": scores.protocol.as_dict(),
        "samples": len(scores.index),
        "pck_threshold_mm": 150,
    }
    write_text_atomic(out / "metrics.json", json.dumps(record, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["sample", *scores.per_sample])
    writer.writeheader()
    writer.writerows(scores.rows())
    write_text_atomic(out / "per_sample.csv", buffer.getvalue())
    order = scores.ranked("mpjpe_mm")
    picks = [("best", order[:worst]), ("worst", order[::-1][:worst])]
    faces = trained.faces
    for tag, positions in picks:
        for rank, pos in enumerate(positions):
            sample = dataset[int(pos)]
            image = sample["image"]
            pred = predict_batch(trained, image[None])
            picture = denormalize_image(image).numpy()
            if float(sample["has_vertices"]) > 0:  # ground truth in orange under the prediction
                gt = sample["vertices"].numpy() - _root(trained, sample["vertices"])
                picture = overlay_mesh(picture, gt, faces, pred["camera"][0], color=GT_COLOR, alpha=0.35)
            panel = front_and_side(picture, pred["vertices"][0], faces, pred["camera"][0])
            error = scores.per_sample["mpjpe_mm"][pos]
            name = f"{tag}-{rank:02d}-sample{int(scores.index[pos])}-mpjpe{error:.0f}.png"
            write_bytes_atomic(out / name, _png(panel))


def _root(trained, vertices) -> np.ndarray:
    joints = trained.module.regress_joints(vertices[None].float())
    return trained.module._root(joints)[0].detach().numpy()


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
