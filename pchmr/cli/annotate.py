"""``pchmr annotate`` and ``pchmr personalize``: label local images on the device, then fine-tune
the global model on those pseudo-labels (docs/annotation.md)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from pchmr.cli._options import check_number, parse_options
from pchmr.cli._outdir import OVERWRITE_HELP, check_out_dir, output_dir
from pchmr.cli._output import RUN_FAILED, console
from pchmr.cli._output import fail as _fail
from pchmr.core.kit.atomic import WriteError

if TYPE_CHECKING:
    import numpy as np

    from pchmr.core.engine.devices import Placement

__all__ = ["annotate", "personalize", "resolve_local_data"]

DEFAULT_CROP = 64
#: Help of the placement flags both commands take (the values of ``pchmr run``'s, see RunConfig).
ACCELERATOR_HELP = "auto (a CUDA GPU when torch sees one, else the CPU), cpu, gpu or mps."
DEVICES_HELP = "Devices to use (only 1: one device fits or fine-tunes)."
#: Where ``pchmr annotate --figures`` draws, inside ``--out``.
FIGURES_DIR = "figures"
SYNTHETIC_DATA_KEYS = ("seed", "split", "num_train", "num_test", "limit", "subject", "scene", "action", "source")


def _options(items: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` pairs → dict, values parsed as int/float/bool when they look like one."""
    return parse_options(items, flag, _fail)


def _body_model(name: str, cache_dir: Path, smpl_dir: Optional[Path]) -> Any:
    from pchmr.core.contracts.bodymodel import BodyModelSpec
    from pchmr.core.engine.registry import get_registry

    factory = get_registry().get("body_model", name)
    return factory(BodyModelSpec(cache_dir=str(cache_dir), model_dir=str(smpl_dir) if smpl_dir else None))


def check_data_options(options: dict[str, Any]) -> None:
    """Refuse (exit 2) a ``--data-option`` the synthetic split does not know or a value it cannot
    take, before any image is rendered."""
    unknown = sorted(set(options) - set(SYNTHETIC_DATA_KEYS))
    if unknown:
        raise _fail(f"--data-option does not know {unknown}; known: {list(SYNTHETIC_DATA_KEYS)}")
    split_name = str(options.get("split", "test"))
    if split_name not in ("train", "test"):
        raise _fail(f"--data-option split must be train or test, got {split_name!r}")
    for key, low in (("seed", 0), ("num_train", 1), ("num_test", 1), ("limit", 1)):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise _fail(f"--data-option {key} must be a whole number >= {low}, got {value!r}")


def _synthetic_split(body_model: Any, options: dict[str, Any], crop: int, cache_dir: Path) -> tuple[Any, list[int]]:
    """The synthetic split named by ``options`` and the indices kept by its label filters."""
    import numpy as np

    from pchmr.core.contracts.dataset import DatasetSpec
    from pchmr.core.engine.registry import get_registry

    check_data_options(options)
    spec = DatasetSpec(image_size=crop, seed=int(options.get("seed", 0)), cache_dir=cache_dir / "datasets",
                       num_train=options.get("num_train"), num_test=options.get("num_test"))  # fmt: skip
    data = get_registry().get("dataset", "synthetic")(spec, body_model)
    split_name = str(options.get("split", "test"))
    split = data.train if split_name == "train" else data.test
    keep = np.ones(len(split), dtype=bool)
    for key in ("subject", "scene", "action", "source"):
        if key in options:
            keep &= split.labels[key] == str(options[key])
    indices = (
        np.nonzero(keep)[0].tolist()[: int(options["limit"])] if "limit" in options else np.nonzero(keep)[0].tolist()
    )
    if not indices:
        raise _fail(f"no synthetic {split_name} image matches {options}")
    return split, indices


def run_annotation(target: str, annotator_name: str, out: Path, *, keypoints_dir: Optional[Path], depth_dir: Optional[Path],
                   options: dict[str, Any], keypoint_options: dict[str, Any], depth_options: dict[str, Any],
                   data_options: dict[str, Any], body_model_name: str, smpl_dir: Optional[Path], crop: int,
                   batch_size: int, cache_dir: Path, placement: Placement | None = None,
                   figures: bool = False) -> dict[str, Any]:  # fmt: skip
    """Annotate an image folder or the synthetic dataset into ``out``, fitting on ``placement``
    (:func:`~pchmr.core.engine.annotation.annotation_placement`; default the CPU), and with
    ``figures`` draw every fit into ``out/figures`` (:mod:`pchmr.report.annotation_figures`);
    returns the summary."""
    import numpy as np

    from pchmr.core.engine.annotation import (
        annotate_items,
        items_from_dataset,
        items_from_folder,
        write_pseudo_labels,
    )
    from pchmr.core.engine.registry import get_registry

    if not Path(target).is_dir() and target != "synthetic":
        raise _fail(f"{target!r} is neither an image folder nor a dataset; use a folder or 'synthetic'")
    if Path(target).is_dir() and keypoints_dir is None:
        raise _fail(f"annotating the image folder {target} needs --keypoints DIR (per-image JSON keypoints)")
    registry = get_registry()
    body_model = _body_model(body_model_name, cache_dir, smpl_dir)
    annotator = registry.get("annotator", annotator_name)(body_model, {**options})
    uses_depth = annotator_name != "smplifyx"
    ground_truth: dict[str, np.ndarray] | None = None
    if Path(target).is_dir():
        kp_source = registry.get("keypoint_source", "files")(keypoints_dir, **keypoint_options)
        dep_source = (
            registry.get("depth_source", "files")(depth_dir, **depth_options) if uses_depth and depth_dir else None
        )
        if uses_depth and dep_source is None:
            raise _fail(f"the {annotator_name} annotator needs --depth DIR (per-image depth maps)")
        items, early = items_from_folder(target, kp_source.stems())
        full_image, meta = False, None
    else:  # the sources first: their options are refused before any image is rendered
        kp_source = registry.get("keypoint_source", "synthetic")(**keypoint_options)
        dep_source = registry.get("depth_source", "synthetic")(**depth_options) if uses_depth else None
        split, indices = _synthetic_split(body_model, data_options, crop, cache_dir)
        items, early, full_image = items_from_dataset(split, indices), [], True

        def meta(item: Any) -> dict[str, str]:
            return {k: str(split.labels[k][item.index]) for k in split.labels}

        # the crop is the whole synthetic image (rendered at the crop size): its keypoints are the true 2D labels
        ground_truth = {"joints_3d": np.asarray(split.array("joints_3d")[indices]),
                        "vertices": np.asarray(split.array("vertices")[indices]),
                        "keypoints_2d": np.asarray(split.array("keypoints_2d")[indices]),
                        "translation": np.asarray(split.array("root_cam")[indices], dtype=np.float32)}  # fmt: skip
    start = time.perf_counter()
    result = annotate_items(items, annotator, body_model.joint_names, kp_source, dep_source, crop_size=crop,
                            full_image=full_image, batch_size=batch_size, meta=meta, placement=placement)  # fmt: skip
    result.records[:0] = early
    if ground_truth is not None:
        kept = [i for i, item in enumerate(items) if item.image_id in set(result.image_ids)]
        ground_truth = {k: v[kept] for k, v in ground_truth.items()}
    info = {"annotator": annotator.describe(), "target": target, "body_model": body_model.name, "crop_size": crop,
            "keypoint_options": keypoint_options, "depth_options": depth_options, "data_options": data_options,
            "seconds": time.perf_counter() - start}  # fmt: skip
    if placement is not None:
        info["placement"] = placement.describe()
    if Path(target).is_dir():  # where the figures find the source images again, wherever they are drawn
        info["image_folder"] = str(Path(target).resolve())
    write_pseudo_labels(out, result, info, ground_truth)
    summary = {"annotated": len(result.image_ids), "failed": Counter(r.error for r in result.records if r.status != "ok"),
               "seconds": info["seconds"]}  # fmt: skip
    if ground_truth is not None and result.image_ids:
        summary["accuracy"] = accuracy(np.stack(result.joints), np.stack(result.vertices), ground_truth)
    if figures and result.image_ids:
        from pchmr.report.annotation_figures import open_annotation, write_figures

        faces = body_model.faces.cpu().numpy()
        drawn = write_figures([open_annotation(out, lambda name: faces)], out / FIGURES_DIR)
        summary["figures"] = drawn["images"]
    return summary


def accuracy(joints: np.ndarray, vertices: np.ndarray, gt: dict[str, np.ndarray]) -> dict[str, float]:
    """MPVPE / MPJPE / PA-MPJPE (mm) of root-relative camera-frame fits against ground truth."""
    import torch

    from pchmr.core.kit.metrics import mpjpe, mpvpe, pa_mpjpe

    pj, pv = torch.from_numpy(joints).double(), torch.from_numpy(vertices).double()
    gj, gv = torch.from_numpy(gt["joints_3d"][..., :3]).double(), torch.from_numpy(gt["vertices"]).double()
    return {"mpvpe_mm": float(mpvpe(pv, gv).mean()), "mpjpe_mm": float(mpjpe(pj, gj).mean()),
            "pa_mpjpe_mm": float(pa_mpjpe(pj, gj).mean())}  # fmt: skip


def annotate(
    target: str = typer.Argument(
        ..., help="An image folder, or 'synthetic' (the synthetic dataset, see --data-option)."
    ),
    annotator: str = typer.Option("deposer", help="Annotator plugin: deposer or smplifyx."),
    out: Path = typer.Option(..., help="Output directory for the pseudo-labels and per-image records."),
    keypoints: Optional[Path] = typer.Option(None, help="Folder of per-image keypoint JSON files (image folders)."),
    depth: Optional[Path] = typer.Option(None, help="Folder of per-image depth maps .npy/.png (image folders)."),
    option: list[str] = typer.Option([], "--option", help="Annotator option key=value (repeatable)."),
    keypoint_option: list[str] = typer.Option([], "--keypoint-option", help="Keypoint source option key=value."),
    depth_option: list[str] = typer.Option([], "--depth-option", help="Depth source option key=value."),
    data_option: list[str] = typer.Option(
        [], "--data-option", help="Synthetic data: seed, split, limit, label filters."
    ),
    body_model: str = typer.Option("anny", help="Body model plugin."),
    smpl_dir: Optional[Path] = typer.Option(None, help="Your SMPL files (for --body-model smpl)."),
    crop_size: int = typer.Option(DEFAULT_CROP, help="Square crop side in pixels of the written Samples."),
    batch_size: int = typer.Option(64, help="Images fitted together."),
    accelerator: str = typer.Option("auto", help=f"Where the fits run: {ACCELERATOR_HELP}"),
    devices: int = typer.Option(1, help=DEVICES_HELP),
    precision: str = typer.Option("32-true", help="32-true (fits run in 32-bit: their line search needs it)."),
    figures: bool = typer.Option(
        False,
        "--figures",
        help="Also draw each fit, front and side view (and the ground truth on synthetic "
        "images): OUT/figures/<image>.png, overview.png, figures.json.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Fit a body model to local images: pseudo-labelled Samples plus one record per image."""
    from pchmr.core.engine.annotation import annotation_placement
    from pchmr.core.kit.cache import default_cache_dir

    for problem in (check_number("--batch-size", batch_size, 1, whole=True),
                    check_number("--crop-size", crop_size, 1, whole=True)):  # fmt: skip
        if problem:
            raise _fail(problem)
    check_out_dir(out, overwrite)
    from pchmr.core.engine.registry import PluginError, get_registry

    try:
        placement = annotation_placement(accelerator, devices, precision)  # before any data is read
        parsed = {"options": _options(option, "--option"),
                  "keypoint_options": _options(keypoint_option, "--keypoint-option"),
                  "depth_options": _options(depth_option, "--depth-option"),
                  "data_options": _options(data_option, "--data-option")}  # fmt: skip
        if target == "synthetic":
            check_data_options(parsed["data_options"])
        registry = get_registry()  # unknown plugin names, before the body model loads
        registry.info("annotator", annotator)
        registry.info("body_model", body_model)
        with output_dir(out, overwrite):  # a refusal below leaves no directory this call made
            summary = run_annotation(target, annotator, out, keypoints_dir=keypoints, depth_dir=depth, **parsed,
                                     body_model_name=body_model, smpl_dir=smpl_dir, crop=crop_size,
                                     batch_size=batch_size, cache_dir=default_cache_dir(),
                                     placement=placement, figures=figures)  # fmt: skip
    except WriteError as exc:
        raise _fail(str(exc), code=RUN_FAILED) from None
    except (ValueError, FileNotFoundError, KeyError, PluginError) as exc:
        raise _fail(str(exc)) from None
    failed = ", ".join(f"{k}: {v}" for k, v in summary["failed"].items()) or "none"
    console.print(f"annotated {summary['annotated']} images in {summary['seconds']:.1f} s; failed: {failed} → {out}")
    if "accuracy" in summary:
        acc = summary["accuracy"]
        console.print("against ground truth: " + ", ".join(f"{k} {v:.1f}" for k, v in acc.items()))
    if "figures" in summary:
        console.print(f"drew {summary['figures']} figures → {out / FIGURES_DIR}")


# ------------------------------------------------------------------------ personalize
def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """RUN_DIR or RUN_DIR/model.pt → (config.json, model.pt)."""
    run_dir = path if path.is_dir() else path.parent
    model = path if path.is_file() else run_dir / "model.pt"
    config = run_dir / "config.json"
    if not model.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"{path} is not a pchmr run: it needs config.json and model.pt (from `pchmr run --out`)"
        )
    return config, model


def load_global_module(checkpoint: Path) -> tuple[Any, Any]:
    """The global HMRModule of a run directory, weights loaded, and its body model.

    Only the body model and the backbone are rebuilt (from ``config.json``'s RunConfig through
    the registry): the device does not need the training data, and the run's ``cache_dir`` is
    the training machine's, so this device's cache (``$PCHMR_CACHE_DIR``) holds the pyramid. The
    run's ``--init-from`` weights are not read: ``model.pt`` holds every weight, and the file the
    config names is on the training machine."""
    from pchmr.core.engine.components import Components, load_model_weights
    from pchmr.core.engine.rundir import RunDir
    from pchmr.core.kit.cache import default_cache_dir

    config_path, model_path = resolve_checkpoint(checkpoint)
    cfg = RunDir(config_path.parent).run_config(init_from=None)  # a refusal names config.json
    body_model = _body_model(cfg.body_model, default_cache_dir(), Path(cfg.smpl_dir) if cfg.smpl_dir else None)
    module = Components(config=cfg, body_model=body_model, data=None).make_module()  # type: ignore[arg-type]
    load_model_weights(module, model_path)  # weights only; another model's state is refused by name
    return module, body_model


def resolve_local_data(data: Path) -> Path:
    if (data / "labels.npz").is_file():
        return data
    raise FileNotFoundError(
        f"{data} holds no pseudo-labels (labels.npz); annotate it first with `pchmr annotate ... --out {data}`"
    )


def fine_tune(checkpoint: Path, labels_dir: Path, *, epochs: int, lr: float, batch_size: int, seed: int,
              train_share: float = 0.8, placement: Placement | None = None) -> dict[str, Any]:  # fmt: skip
    """Split the pseudo-labels 80/20 (seeded), evaluate the global model on the 20 %, fine-tune it
    on the 80 % for ``epochs`` with the same HMRModule, evaluate again, all on ``placement``
    (default: the CPU, 32-bit). Metrics against the pseudo-labels, and against real ground truth
    when the labels directory has it."""
    import numpy as np

    from pchmr.core.engine.annotation import PseudoLabelSet
    from pchmr.core.engine.components import make_loader
    from pchmr.core.engine.evaluation import evaluate
    from pchmr.core.engine.module import OptimConfig
    from pchmr.core.engine.trainer import make_trainer

    module, _ = load_global_module(checkpoint)
    full = PseudoLabelSet(labels_dir)
    n = len(full)
    if n < 5:
        raise ValueError(f"{labels_dir} has {n} annotated images; personalization needs at least 5 (80/20 split)")
    order = np.random.default_rng(seed).permutation(n)
    cut = round(train_share * n)
    train_idx, test_idx = sorted(order[:cut].tolist()), sorted(order[cut:].tolist())
    has_gt = full.labels.has_ground_truth
    sets = {"pseudo": PseudoLabelSet(labels_dir, test_idx)}
    if has_gt:
        sets["real"] = PseudoLabelSet(labels_dir, test_idx, ground_truth=True)
    loaders = {k: make_loader(v, 64, shuffle=False, placement=placement) for k, v in sets.items()}
    before = {k: evaluate(module, loader, placement) for k, loader in loaders.items()}
    module.optim = OptimConfig(lr=lr, weight_decay=module.optim.weight_decay, grad_clip=module.optim.grad_clip)
    trainer = make_trainer(max_epochs=epochs, grad_clip=module.optim.grad_clip, quiet=True, placement=placement)
    train = make_loader(PseudoLabelSet(labels_dir, train_idx), batch_size, True, seed, placement=placement)
    trainer.fit(module, train_dataloaders=train)
    after = {k: evaluate(module, loader, placement) for k, loader in loaders.items()}
    return {"train": len(train_idx), "test": len(test_idx), "before": before, "after": after, "module": module}


def personalize(
    checkpoint: Path = typer.Option(
        ..., help="Global model: a run directory (config.json + model.pt) or its model.pt."
    ),
    data: Path = typer.Option(..., help="Local pseudo-labels (a `pchmr annotate --out` directory)."),
    out: Optional[Path] = typer.Option(None, help="Write personalized.pt and personalize.json here."),
    epochs: int = typer.Option(2, help="Fine-tuning epochs (the paper: 2)."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (the paper's appendix: 1e-4)."),
    batch_size: int = typer.Option(16, help="Fine-tuning batch size."),
    seed: int = typer.Option(0, help="Seed of the 80/20 split and the shuffling."),
    accelerator: str = typer.Option("auto", help=f"Where fine-tuning runs: {ACCELERATOR_HELP}"),
    devices: int = typer.Option(1, help=DEVICES_HELP),
    precision: str = typer.Option(
        "32-true", help="32-true, 16-mixed (float16 autocast, GPU only) or bf16-mixed (bfloat16 autocast)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Fine-tune the global model on local pseudo-labels; report before/after on the held-out 20 %."""
    from pchmr.core.engine.devices import DeviceError, resolve_placement
    from pchmr.core.engine.registry import PluginError
    from pchmr.core.kit.atomic import torch_save_atomic, write_text_atomic

    checks = (check_number("--epochs", epochs, 1, whole=True), check_number("--lr", lr, 0, low_open=True),
              check_number("--batch-size", batch_size, 1, whole=True), check_number("--seed", seed, 0, whole=True))  # fmt: skip
    for problem in checks:
        if problem:
            raise _fail(problem)
    if out is not None:
        check_out_dir(out, overwrite)
    try:
        placement = resolve_placement(accelerator, devices, precision)  # before the model is loaded
        if devices != 1:
            raise DeviceError(f"--devices {devices}: personalization fine-tunes on one device, use --devices 1")
        result = fine_tune(checkpoint, resolve_local_data(data), epochs=epochs, lr=lr, batch_size=batch_size,
                           seed=seed, placement=placement)  # fmt: skip
    except (ValueError, FileNotFoundError, PluginError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"personalization: {result['train']} train / {result['test']} held-out images, {epochs} epochs")
    for column in ("against", "metric", "before", "after", "change"):
        table.add_column(column)
    for target, metrics in result["before"].items():
        for key, value in metrics.items():
            after = result["after"][target][key]
            table.add_row("pseudo-GT" if target == "pseudo" else "real GT", key, f"{value:.1f}" if key != "pck" else f"{value:.3f}",
                          f"{after:.1f}" if key != "pck" else f"{after:.3f}", f"{after - value:+.2f}")  # fmt: skip
    console.print(table)
    if out is not None:
        summary = {k: v for k, v in result.items() if k != "module"}
        record = {**summary, "epochs": epochs, "lr": lr, "placement": placement.describe()}
        try:
            with output_dir(out, overwrite):
                torch_save_atomic(result["module"].state_dict(), out / "personalized.pt")
                write_text_atomic(out / "personalize.json", json.dumps(record, indent=1) + "\n")
        except WriteError as exc:
            raise _fail(str(exc), code=RUN_FAILED) from None
