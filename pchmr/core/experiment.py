"""Builds an experiment's components from a RunConfig through the plugin registry.

The same builder runs in the server process and in every client process (a Ray actor or a
SuperNode): each reads the run directory's ``config.json``, so a client needs nothing but the
run directory and the prepared data cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pchmr.core.backbone import BackboneOptions
from pchmr.core.bodymodel import BodyModel, BodyModelSpec
from pchmr.core.config import RunConfig
from pchmr.core.data import DatasetSpec, HMRData
from pchmr.core.hmr import HMRModule, LossTerm, OptimConfig
from pchmr.core.joints import AppliedProtocol, apply_protocol
from pchmr.core.losses import LossWeights
from pchmr.core.metrics import Protocol, mpjpe, pa_mpjpe, procrustes_align
from pchmr.core.partition import Partition
from pchmr.core.pretrain import PUBLIC, PUBLIC_BODY_MODEL, pretrained_encoder
from pchmr.core.registry import get_registry

__all__ = ["Components", "default_cache_dir", "build_components", "derive_seed", "make_loader", "mean_pose_baselines"]


def default_cache_dir() -> Path:
    """``$PCHMR_CACHE_DIR`` or ``~/.cache/pchmr``: prepared data and mesh pyramids."""
    return Path(os.environ.get("PCHMR_CACHE_DIR", Path.home() / ".cache" / "pchmr"))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Components:
    config: RunConfig
    body_model: BodyModel
    data: HMRData
    encoder_weights: str | None = None  # the resolved file of --encoder-weights
    encoder_resolved: bool = True  # False: built for the data only (build_components(with_model=False))

    def make_module(self, loss_terms: Sequence[LossTerm] = (), init_seed: int | None = None) -> HMRModule:
        """A fresh HMRModule; weights initialised from ``init_seed`` (default: the run seed)."""
        cfg = self.config
        if not self.encoder_resolved:
            raise RuntimeError("these components were built for the data only: call build_components(config)")
        factory = get_registry().get("backbone", cfg.backbone)
        options = BackboneOptions(
            variant=cfg.variant, encoder=cfg.encoder, input_size=cfg.input_size, encoder_weights=self.encoder_weights,
            freeze_encoder=cfg.encoder_frozen, extra=dict(cfg.backbone_options),
        )
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(cfg.seed if init_seed is None else init_seed, 1))
            backbone = factory(self.body_model, options)
        module = HMRModule(
            backbone,
            self.body_model,
            loss_weights=LossWeights.from_overrides(cfg.loss_weights),
            optim=OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay),
            loss_terms=loss_terms,
            alignment=self.applied_protocol().alignment,
        )
        if cfg.init_from is not None:
            load_model_weights(module, cfg.init_from)
        return module

    def applied_protocol(self) -> AppliedProtocol:
        """The alignment the data's protocol asks and the body model allows (:func:`apply_protocol`);
        mid-hip when there are no data (a module built only to load weights)."""
        return apply_protocol(self.data.protocol if self.data is not None else {}, self.body_model)

    def protocol(self) -> Protocol:
        proto = self.data.protocol
        applied = self.applied_protocol()
        named = bool(applied.name)  # real data name their protocol; synthetic keeps its record
        return Protocol(
            dataset=str(proto.get("dataset", self.config.dataset)),
            joint_set=f"{self.body_model.name}-{self.body_model.num_joints}",
            alignment=applied.alignment_text() if named else "mid-hip (root)",
            body_model=self.body_model.name,
            ground_truth=str(proto.get("gt", "real")),
            regressor=applied.regressor if named else "",
            gt_mesh=(applied.gt_mesh or "unknown") if named else "",
        )

    def client_dataset(self, partition: Partition, client: int) -> Dataset:
        return Subset(self.data.train, partition.clients[client].tolist())


def load_model_weights(module: HMRModule, source: str | Path) -> None:
    """Load a trained HMRModule state (a run directory's ``model.pt``, or the file itself) into
    ``module``; a state of another backbone, variant or body model is refused by name."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path} (expected a run directory with model.pt, or the file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not fit this model (another variant or body model?): {exc}") from exc
    mismatched = list(result.missing_keys) + list(result.unexpected_keys)
    if mismatched:
        raise ValueError(
            f"{path} is not a model of this backbone/body model: {len(result.missing_keys)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (first: {mismatched[:3]}); use the same --backbone, "
            "--variant, --encoder and --body-model as the run that made it"
        )


def build_components(
    config: RunConfig,
    with_model: bool = True,
    progress: Callable[[str], None] | None = None,
    pretrained: bool = True,
) -> Components:
    """Body model, then the dataset (prepared once, cached) — all through the registry — then,
    unless ``with_model`` is false (data only), the CNN's pretrained weights (``--encoder-weights
    public`` pretrains once and caches; ``progress`` hears about it). ``pretrained=False`` skips
    them: for a federated client, whose every weight arrives from the server each round."""
    registry = get_registry()
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    body_model = _body_model(config.body_model, str(cache), config.smpl_dir)
    dataset_plugin, dataset_options = dataset_resolution(config.dataset)
    data_factory = registry.get("dataset", dataset_plugin)
    spec = DatasetSpec(
        image_size=config.input_size,
        seed=config.seed,
        cache_dir=cache / "datasets",
        path=config.dataset_path,
        num_train=config.num_train,
        num_test=config.num_test,
        options=dataset_options,
    )
    data = data_factory(spec, body_model)
    if not with_model:
        return Components(config=config, body_model=body_model, data=data, encoder_resolved=False)
    weights = config.encoder_weights if config.loads_encoder_weights and pretrained else None
    if weights == PUBLIC:
        # one public split whatever the run's body model (its pretraining head is thrown away)
        public_body = (
            body_model if body_model.name == PUBLIC_BODY_MODEL else _body_model(PUBLIC_BODY_MODEL, str(cache), None)
        )
        weights = str(pretrained_encoder(
            config.backbone, config.encoder, config.input_size, public_body, cache, progress=progress,
            extra=config.backbone_options,
        ))
    return Components(config=config, body_model=body_model, data=data, encoder_weights=weights)


def dataset_resolution(name: str) -> tuple[str, dict[str, object]]:
    """``--dataset`` name → (plugin name, DatasetSpec options): ``a,b,c`` is the ``mixed``
    plugin with ``options["datasets"] = "a,b,c"`` (each member's samples keep ``source`` = its name)."""
    if "," in name:
        return "mixed", {"datasets": name}
    return name, {}


@functools.lru_cache(maxsize=4)
def _body_model(name: str, cache_dir: str, model_dir: str | None) -> BodyModel:
    factory = get_registry().get("body_model", name)
    return factory(BodyModelSpec(cache_dir=cache_dir, model_dir=model_dir))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def _all_joints(dataset: Dataset, alignment: str = "mid-hip", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
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


def describe_plugins(config: RunConfig) -> dict[str, Any]:
    """Which distribution provided each plugin the run uses (written into config.json)."""
    registry = get_registry()
    chosen = {
        "backbone": config.backbone,
        "body_model": config.body_model,
        "dataset": dataset_resolution(config.dataset)[0],
        "partitioner": config.partitioner,
        "strategy": config.strategy,
    }
    return {kind: {"name": name, "provider": registry.info(kind, name).provider} for kind, name in chosen.items()}
