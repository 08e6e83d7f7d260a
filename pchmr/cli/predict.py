"""``pchmr predict``: a trained model on the user's own images — meshes, 3D joints and overlays."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pchmr.cli._options import check_number
from pchmr.cli._outdir import OVERWRITE_HELP, check_out_dir, output_dir
from pchmr.cli._output import RUN_FAILED, console, fail

__all__ = ["predict"]


def predict(
    images: Path = typer.Argument(..., help="A folder of images (png, jpg, bmp, webp) or one image file."),
    checkpoint: Path = typer.Option(..., help="A finished run directory (config.json + model.pt) or its model.pt."),
    out: Path = typer.Option(..., help="Where the meshes, joints, overlays and predictions.json go."),
    boxes: Optional[Path] = typer.Option(
        None,
        help="Person boxes in COCO layout (images: id, file_name; annotations: image_id and bbox [x, y, w, h] or "
        "keypoints [x, y, v, ...]); the largest person of an image is cropped. Without it, or for an image it does "
        "not list, the whole image is cropped, centred.",
    ),
    mesh_format: str = typer.Option("obj", help="Mesh file format: obj or ply."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    accelerator: str = typer.Option("cpu", help="cpu, gpu, mps or auto."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Predict a body mesh for every image: per image a mesh (.obj/.ply, metres, camera axes,
    root-relative), its 3D joints with their names (JSON) and an overlay PNG (the mesh over the
    image, and a side view beside it). A bad image is recorded in predictions.json and skipped."""
    from pchmr.core.engine.config import ConfigError
    from pchmr.core.engine.devices import DeviceError, resolve_placement
    from pchmr.core.engine.inference import IMAGE_SUFFIXES, load_trained, read_person_boxes
    from pchmr.core.engine.registry import PluginError
    from pchmr.core.kit.atomic import WriteError

    problem = check_number("--batch-size", batch_size, 1, whole=True)
    if problem:
        raise fail(problem)
    if mesh_format not in ("obj", "ply"):
        raise fail(f"--mesh-format must be obj or ply, got '{mesh_format}'")
    if images.is_dir():
        files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise fail(f"{images} holds no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    elif images.is_file():
        files = [images]
    else:
        raise fail(f"no such image folder or file: {images}")
    check_out_dir(out, overwrite)
    try:
        placement = resolve_placement(accelerator, 1, "32-true")
        person_boxes = read_person_boxes(boxes) if boxes is not None else {}
        trained = load_trained(checkpoint)
    except (FileNotFoundError, ValueError, ConfigError, DeviceError, PluginError) as exc:
        raise fail(str(exc)) from None
    try:
        with output_dir(out, overwrite):
            records = _predict_all(trained, files, person_boxes, out, mesh_format, batch_size, placement)
    except WriteError as exc:
        raise fail(str(exc), code=RUN_FAILED) from None
    done = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    console.print(f"predicted {len(done)} of {len(records)} images → {out}")
    for record in failed[:10]:
        console.print(f"[yellow]skipped {record['image']}: {record['reason']}[/]")
    if not done:
        raise fail(f"no image of {images} could be read; see {out / 'predictions.json'}", code=RUN_FAILED)


def _predict_all(trained, files, person_boxes, out: Path, mesh_format: str, batch_size: int, placement) -> list:
    import torch

    from pchmr.core.contracts.sample import normalize_image
    from pchmr.core.engine.inference import centre_box, crop, load_image, predict_batch
    from pchmr.core.kit.atomic import write_bytes_atomic, write_text_atomic
    from pchmr.core.kit.overlay import front_and_side, write_mesh

    size = trained.config.input_size
    faces = trained.faces
    names = trained.joint_names
    records: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )
    with progress:
        task = progress.add_task("images", total=len(files))
        for start in range(0, len(files), batch_size):
            batch: list[tuple[Path, np.ndarray, Any]] = []
            for path in files[start : start + batch_size]:
                try:
                    image = load_image(path)
                    box = person_boxes.get(path.name) or centre_box(image.shape[1], image.shape[0])
                    batch.append((path, image, box))
                except ValueError as exc:
                    records.append({"image": path.name, "status": "failed", "reason": str(exc)})
                    progress.advance(task)
            if not batch:
                continue
            crops = torch.stack([normalize_image(torch.from_numpy(crop(img, box, size))) for _, img, box in batch])
            pred = predict_batch(trained, crops, placement)
            for k, (path, image, box) in enumerate(batch):
                stem = path.stem
                mesh_file = write_mesh(out / f"{stem}.{mesh_format}", pred["vertices"][k], faces)
                joints = {
                    "joints_m": {name: [float(v) for v in xyz] for name, xyz in zip(names, pred["joints"][k])},
                    "frame": "camera axes (x right, y down, z forward), metres, relative to the root (mid-hip)",
                    "camera": {"s_tx_ty": [float(v) for v in pred["camera"][k]], "crop_box_px": list(box.as_tuple())},
                }
                write_text_atomic(out / f"{stem}.json", json.dumps(joints, indent=1) + "\n")
                panel = front_and_side(image, pred["vertices"][k], faces, pred["camera"][k], box=box.as_tuple())
                write_bytes_atomic(out / f"{stem}_overlay.png", _png(panel))
                records.append({
                    "image": path.name, "status": "ok", "box": [round(v, 2) for v in box.as_tuple()],
                    "box_source": box.source, "mesh": mesh_file.name, "joints": f"{stem}.json",
                    "overlay": f"{stem}_overlay.png",
                })  # fmt: skip
                progress.advance(task)
    summary = {
        "checkpoint": str(trained.model_path),
        "images": len(files),
        "predicted": sum(r["status"] == "ok" for r in records),
        "records": sorted(records, key=lambda r: r["image"]),
    }
    write_text_atomic(out / "predictions.json", json.dumps(summary, indent=1) + "\n")
    return records


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
