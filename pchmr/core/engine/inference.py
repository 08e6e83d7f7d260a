"""A trained model outside training: load a run's global model, score it sample by sample on a
dataset (``pchmr eval``), and predict meshes for images (``pchmr predict``).

The model is rebuilt from the run directory's ``config.json`` (backbone, variant, encoder, body
model) and loaded from its ``model.pt`` with ``weights_only`` (a file that asks to run code is
refused). The weights it starts from (``--init-from``, ``--encoder-weights``) are not needed:
``model.pt`` holds every weight.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pchmr.core.contracts.backbone import HMROutput
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import HMRData
from pchmr.core.engine.components import Components, build_components, load_model_weights, make_loader
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.devices import Placement
from pchmr.core.engine.evaluation import evaluate
from pchmr.core.engine.module import HMRModule
from pchmr.core.kit.metrics import Protocol, mpjpe, mpvpe, pa_mpjpe, pck

__all__ = [
    "EVAL_BATCH",
    "SampleScores",
    "TrainedModel",
    "load_trained",
    "predict_batch",
    "resolve_checkpoint",
    "score_samples",
]

#: The batch size the run evaluated its global model with (the server's and the baselines').
EVAL_BATCH = 64


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """RUN_DIR or RUN_DIR/model.pt → (config.json, model.pt); FileNotFoundError names what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such run directory or model file: {path}")
    run_dir = path if path.is_dir() else path.parent
    model = path if path.is_file() else run_dir / "model.pt"
    config = run_dir / "config.json"
    if not model.is_file() or not config.is_file():
        missing = " and ".join(p.name for p in (config, model) if not p.is_file())
        hint = " (the run has not finished: resume it first)" if config.is_file() else ""
        raise FileNotFoundError(
            f"{path} is not a finished pchmr run: it has no {missing}{hint}; give a run directory `pchmr run --out` "
            "wrote (config.json + model.pt) or its model.pt"
        )
    return config, model


@dataclass
class TrainedModel:
    """A run's global model, ready to predict (``module`` in eval mode on the CPU)."""

    config: RunConfig
    module: HMRModule
    body_model: BodyModel
    model_path: Path
    components: Components | None = None  # with data when loaded for a dataset

    @property
    def faces(self) -> np.ndarray:
        return self.body_model.faces.cpu().numpy()

    @property
    def joint_names(self) -> tuple[str, ...]:
        return tuple(self.body_model.joint_names)

    def protocol(self) -> Protocol | None:
        return self.components.protocol() if self.components is not None else None


def _saved_run(config_path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path} is not a pchmr config.json ({exc})") from None
    run = stored.get("run") if isinstance(stored, Mapping) else None
    if not isinstance(run, Mapping):
        raise ValueError(f"{config_path} is not a pchmr config.json: it has no 'run' table of options")
    return dict(run)


def load_trained(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    dataset_path: str | None = None,
    dataset_options: Mapping[str, object] | None = None,
    num_test: int | None = None,
    cache_dir: str | Path | None = None,
    with_data: bool = False,
    data: HMRData | None = None,
) -> TrainedModel:
    """The global model of a run directory (or its ``model.pt``).

    ``with_data`` also builds the run's dataset (or ``dataset``/``dataset_path``/``dataset_options``
    instead of the run's) so the module scores by that dataset's protocol, as the run did.
    ``cache_dir`` replaces the run's (another machine's path); by default the run's own when it
    exists, else this machine's default cache. ``data`` instead hands it data already loaded
    (another run's, of the same body model: several models scored on the same images under the
    same protocol, as ``pchmr report``'s prediction grid does).
    """
    from pchmr.core.kit.cache import default_cache_dir

    config_path, model_path = resolve_checkpoint(checkpoint)
    run = _saved_run(config_path)
    run["init_from"] = None  # model.pt holds every weight
    if cache_dir is not None:
        run["cache_dir"] = str(cache_dir)
    elif run.get("cache_dir") and not Path(str(run["cache_dir"])).is_dir():
        run["cache_dir"] = str(default_cache_dir())
    if dataset is not None:
        run.update(dataset=dataset, dataset_path=dataset_path, dataset_options=dict(dataset_options or {}))
        run["eval_datasets"] = None
    elif dataset_options:
        run["dataset_options"] = {**dict(run.get("dataset_options") or {}), **dict(dataset_options)}
    if num_test is not None:
        run["num_test"] = num_test
    config = RunConfig.from_saved(run)
    if with_data and data is None:
        data_only = build_components(config, with_model=False)
        components = Components(config=config, body_model=data_only.body_model, data=data_only.data)
    else:
        from pchmr.core.engine.components import _body_model

        cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        body = _body_model(config.body_model, str(cache), config.smpl_dir)
        components = Components(config=config, body_model=body, data=data)  # type: ignore[arg-type]
    module = components.make_module()
    load_model_weights(module, model_path)
    module.eval()
    loaded = with_data or data is not None
    return TrainedModel(config, module, components.body_model, model_path, components if loaded else None)


@dataclass
class SampleScores:
    """``pchmr eval``'s result: the run's metrics over the dataset (exactly as the run computes
    them) and each sample's errors under the same protocol."""

    metrics: dict[str, float]
    protocol: Protocol
    index: np.ndarray  # (N,) the test split's sample positions
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)  # mpjpe_mm, pa_mpjpe_mm, mpvpe_mm, pck: (N,)
    joints: np.ndarray | None = None  # (N, J, 3) predicted joints, root-relative metres (camera axes)
    camera: np.ndarray | None = None  # (N, 3) weak perspective (s, tx, ty)

    def rows(self) -> list[dict[str, float | int]]:
        keys = list(self.per_sample)
        return [{"sample": int(i), **{k: float(self.per_sample[k][n]) for k in keys}} for n, i in enumerate(self.index)]

    def ranked(self, metric: str = "mpjpe_mm") -> np.ndarray:
        """Positions (into :attr:`index`) from the best to the worst sample by ``metric`` (NaN last)."""
        values = self.per_sample[metric]
        order = np.argsort(np.where(np.isnan(values), np.inf, values), kind="stable")
        return order


def score_samples(
    trained: TrainedModel, dataset: Dataset, batch_size: int = EVAL_BATCH, placement: Placement | None = None
) -> SampleScores:
    """Evaluate ``trained`` on ``dataset`` as the run evaluated its global model
    (:func:`~pchmr.core.engine.evaluation.evaluate`, same batches), recording every sample's
    errors, predicted joints and camera on the way."""
    module = trained.module
    per: dict[str, list[np.ndarray]] = {"mpjpe_mm": [], "pa_mpjpe_mm": [], "mpvpe_mm": [], "pck": []}
    joints: list[np.ndarray] = []
    cameras: list[np.ndarray] = []
    index: list[np.ndarray] = []

    def record(batch: Mapping[str, torch.Tensor], out: HMROutput) -> None:
        a = module.aligned_for_metrics(batch, out)
        pred, gt, valid = a.pred_joints.double(), a.gt_joints.double(), a.valid.double()
        per["mpjpe_mm"].append(mpjpe(pred, gt, valid).cpu().numpy())
        per["pa_mpjpe_mm"].append(pa_mpjpe(pred, gt, valid).cpu().numpy())
        per["pck"].append(pck(pred, gt, valid).cpu().numpy())
        vertex_error = mpvpe(a.pred_vertices.double(), a.gt_vertices.double()).cpu().numpy()
        per["mpvpe_mm"].append(np.where(a.has_mesh.cpu().numpy(), vertex_error, math.nan))
        joints.append(a.pred_joints.float().cpu().numpy())
        cameras.append(out.camera.float().cpu().numpy())
        index.append(batch["index"].cpu().numpy().reshape(-1))

    loader = make_loader(dataset, batch_size, shuffle=False, placement=placement)
    metrics = evaluate(module, loader, placement, on_batch=record)
    protocol = trained.protocol()
    if protocol is None:
        raise ValueError("score_samples needs a model loaded with its dataset (load_trained(..., with_data=True))")
    return SampleScores(
        metrics=metrics,
        protocol=protocol,
        index=np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
        per_sample={k: np.concatenate(v) if v else np.zeros(0) for k, v in per.items()},
        joints=np.concatenate(joints) if joints else None,
        camera=np.concatenate(cameras) if cameras else None,
    )


@torch.no_grad()
def predict_batch(
    trained: TrainedModel, images: torch.Tensor, placement: Placement | None = None
) -> dict[str, np.ndarray]:
    """Normalised (B, 3, S, S) crops → ``joints`` (B, J, 3) and ``vertices`` (B, V, 3), both
    root-relative metres in camera axes (the frame the camera projects), and ``camera`` (B, 3)."""
    module = trained.module
    device = next(module.parameters()).device
    if placement is not None and device != placement.device:
        module.to(placement.device)
        device = placement.device
    out = module(images.to(device))
    vertices = out.vertices[-1].float()
    joints = module.regress_joints(vertices)
    root = module._root(joints)
    return {
        "joints": (joints - root).cpu().numpy(),
        "vertices": (vertices - root).cpu().numpy(),
        "camera": out.camera.float().cpu().numpy(),
    }


# --------------------------------------------------------------------------------------
# predicting on a user's images
# --------------------------------------------------------------------------------------
#: Image files ``pchmr predict`` reads from a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: A person box is enlarged by this factor into the square crop (SPIN's convention).
BOX_MARGIN = 1.2


@dataclass(frozen=True)
class PersonBox:
    """The square crop of one image: top-left corner and side in pixels, and where it came from
    (``box``, ``keypoints`` or ``centre``)."""

    x0: float
    y0: float
    side: float
    source: str

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.x0, self.y0, self.side)


def centre_box(width: int, height: int) -> PersonBox:
    """The whole image, centred: a square of the longer side (padded)."""
    side = float(max(width, height))
    return PersonBox((width - side) / 2.0, (height - side) / 2.0, side, "centre")


def square_box(x: float, y: float, w: float, h: float, source: str, margin: float = BOX_MARGIN) -> PersonBox:
    """The square crop around a person box ``(x, y, w, h)``: its centre, side ``margin · max(w, h)``."""
    side = margin * max(w, h)
    return PersonBox(x + w / 2.0 - side / 2.0, y + h / 2.0 - side / 2.0, side, source)


def read_person_boxes(path: str | Path) -> dict[str, PersonBox]:
    """file name → its crop, from a COCO-layout JSON (``images`` with ``id`` and ``file_name``,
    ``annotations`` with ``image_id`` and ``bbox`` [x, y, w, h] or ``keypoints`` [x, y, v, …]).
    An image with several people gets the largest; a keypoints-only annotation is boxed around
    its visible keypoints. ValueError names what is malformed."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--boxes {path} is not readable JSON ({exc})") from None
    if not isinstance(coco, Mapping) or not isinstance(coco.get("images"), list):
        raise ValueError(
            f'--boxes {path} is not in COCO layout: expected {{"images": [{{"id", "file_name"}}], '
            '"annotations": [{"image_id", "bbox": [x, y, w, h]}]}'
        )
    names: dict[Any, str] = {}
    for entry in coco["images"]:
        if not isinstance(entry, Mapping) or "id" not in entry or "file_name" not in entry:
            raise ValueError(f"--boxes {path}: every image needs 'id' and 'file_name', got {entry!r}")
        names[entry["id"]] = Path(str(entry["file_name"])).name
    best: dict[str, tuple[float, PersonBox]] = {}
    for ann in coco.get("annotations", []):
        if not isinstance(ann, Mapping) or ann.get("image_id") not in names:
            raise ValueError(f"--boxes {path}: an annotation names no listed image: {ann!r}")
        box = _annotation_box(ann, path)
        if box is None:
            continue
        area = box.side * box.side
        name = names[ann["image_id"]]
        if name not in best or area > best[name][0]:
            best[name] = (area, box)
    return {name: box for name, (_, box) in best.items()}


def _annotation_box(ann: Mapping[str, Any], path: Path) -> PersonBox | None:
    bbox = ann.get("bbox")
    if bbox is not None:
        values = np.asarray(bbox, dtype=np.float64) if isinstance(bbox, list) else np.zeros(0)
        if values.shape != (4,) or not np.isfinite(values).all() or values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"--boxes {path}: bbox must be [x, y, w, h] with w, h > 0, got {bbox!r}")
        return square_box(*values.tolist(), source="box")
    keypoints = ann.get("keypoints")
    if keypoints is None:
        return None
    values = np.asarray(keypoints, dtype=np.float64) if isinstance(keypoints, list) else np.zeros(1)
    if values.size % 3 or not np.isfinite(values).all():
        raise ValueError(f"--boxes {path}: keypoints must be [x, y, v, …] triples, got {len(values)} numbers")
    triples = values.reshape(-1, 3)
    seen = triples[triples[:, 2] > 0]
    if len(seen) < 2:
        return None
    lo, hi = seen[:, :2].min(axis=0), seen[:, :2].max(axis=0)
    return square_box(lo[0], lo[1], max(hi[0] - lo[0], 1.0), max(hi[1] - lo[1], 1.0), source="keypoints")


def crop(image: np.ndarray, box: PersonBox, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3) uint8: the square ``box`` (zero outside the image), bilinear."""
    from PIL import Image

    x0, y0, side = box.as_tuple()
    patch = Image.fromarray(image).crop((round(x0), round(y0), round(x0 + side), round(y0 + side)))
    return np.array(patch.resize((size, size), Image.BILINEAR), dtype=np.uint8)  # writable: torch.from_numpy


def load_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; ValueError names a file that is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"not a readable image ({exc.__class__.__name__}: {exc})") from None
