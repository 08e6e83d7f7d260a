"""Evaluation of the global model and the mean-pose baselines it must beat."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pchmr.core.contracts.backbone import HMROutput
from pchmr.core.engine.devices import Placement
from pchmr.core.engine.module import HMRModule
from pchmr.core.kit.metrics import mpjpe, pa_mpjpe, procrustes_align

__all__ = ["evaluate", "mean_pose_baselines"]


@contextlib.contextmanager
def _placed(module: HMRModule, placement: Placement | None) -> Iterator[None]:
    """``module`` on ``placement``'s device for the block, then back where it was (a module
    Lightning is fitting already is there: nothing moves)."""
    home = next(module.parameters()).device
    if placement is None or (home.type, home.index or 0) == (placement.device.type, placement.device.index or 0):
        yield
        return
    module.to(placement.device)
    try:
        yield
    finally:
        module.to(home)


def _full_precision(out: HMROutput) -> HMROutput:
    """A prediction made under autocast, in float32 for the metrics."""
    return dataclasses.replace(
        out,
        joints=out.joints.float(),
        vertices=tuple(v.float() for v in out.vertices),
        camera=out.camera.float(),
    )


@torch.no_grad()
def evaluate(
    module: HMRModule,
    loader: DataLoader,
    placement: Placement | None = None,
    on_batch: Callable[[Mapping[str, torch.Tensor], HMROutput], None] | None = None,
) -> dict[str, float]:
    """Run the evaluation protocol of :meth:`HMRModule.update_metrics` over ``loader``, on
    ``placement`` (default: where the module is, in 32-bit): batches are moved there, the forward
    pass runs under its autocast, the metrics are computed in float32. ``on_batch`` sees every
    batch and its float32 prediction (``pchmr eval``'s per-sample errors)."""
    with _placed(module, placement):
        return _evaluate(module, loader, placement, on_batch)


def _evaluate(
    module: HMRModule,
    loader: DataLoader,
    placement: Placement | None,
    on_batch: Callable[[Mapping[str, torch.Tensor], HMROutput], None] | None = None,
) -> dict[str, float]:
    was_training = module.training
    module.eval()
    for m in module.val_metrics.values():
        m.reset()
    mixed = placement is not None and placement.precision != "32-true"
    for batch in loader:
        if placement is not None:
            batch = placement.to(batch)
        if mixed:
            with placement.autocast():  # type: ignore[union-attr]
                out = _full_precision(module(batch["image"]))
        else:
            out = module(batch["image"])
        bad = ~torch.isfinite(out.vertices[-1]).flatten(1).all(dim=1)
        if bad.any():
            module.train(was_training)
            raise FloatingPointError(
                f"the model predicts non-finite vertices for {int(bad.sum())} of {len(bad)} images of an evaluation "
                "batch (diverged training, or a normalisation statistic pushed out of range)"
            )
        module.update_metrics(batch, out)
        if on_batch is not None:
            on_batch(batch, out)
    # a metric with no update (MPVPE on a test set without GT meshes) is NaN, without torchmetrics' warning
    result = {k: float(m.compute()) if m.update_called else math.nan for k, m in module.val_metrics.items()}
    for m in module.val_metrics.values():
        m.reset()
    module.train(was_training)
    return result


def _all_joints(
    dataset: Dataset, alignment: str = "mid-hip", batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, J, 3) float64 root-relative GT joints and (N, J) validity. The samples' joints are
    mid-hip relative; with ``alignment="pelvis"`` those with a GT pelvis are re-rooted there, as
    :meth:`HMRModule.update_metrics` does (the others keep the mid-hip)."""
    joints = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        j = batch["joints_3d"].double()
        pelvis = batch.get("pelvis_3d")
        if alignment == "pelvis" and pelvis is not None:
            use = (pelvis[:, 3] > 0)[:, None, None]
            j = torch.cat([torch.where(use, j[..., :3] - pelvis[:, None, :3].double(), j[..., :3]), j[..., 3:]], dim=-1)
        joints.append(j)
    stacked = torch.cat(joints)
    return stacked[..., :3], stacked[..., 3]


def mean_pose_baselines(train: Dataset, test: Dataset, alignment: str = "mid-hip") -> dict[str, float]:
    """The best constant predictions, to show a model learns from the images.

    * ``mean_pose_mpjpe_mm``: the training set's mean root-relative joints in the camera frame,
      predicted for every test image (MPJPE), rooted as the run's evaluation roots them
      (``alignment``: ``mid-hip``, or ``pelvis`` where a sample has a GT pelvis);
    * ``mean_pose_pa_mpjpe_mm``: the mean pose in the body's own frame (generalised Procrustes
      mean of the training poses: rotation and scale removed), scored with PA-MPJPE.
    """
    train_j, train_v = _all_joints(train, alignment)
    test_j, test_v = _all_joints(test, alignment)
    w = train_v[..., None]
    mean_cam = (train_j * w).sum(0) / w.sum(0).clamp_min(1.0)
    pred = mean_cam.expand_as(test_j).contiguous()
    canonical = mean_cam.clone()
    for _ in range(10):  # generalised Procrustes: align all to the mean, re-average
        aligned = procrustes_align(train_j, canonical.expand_as(train_j).contiguous(), train_v)
        new = (aligned * w).sum(0) / w.sum(0).clamp_min(1.0)
        if torch.allclose(new, canonical, atol=1e-7):
            break
        canonical = new
    pred_pa = canonical.expand_as(test_j).contiguous()
    return {
        "mean_pose_mpjpe_mm": float(np.nanmean(mpjpe(pred, test_j, test_v).numpy())),
        "mean_pose_pa_mpjpe_mm": float(np.nanmean(pa_mpjpe(pred_pa, test_j, test_v).numpy())),
    }
