"""Builds an experiment's components from a RunConfig through the plugin registry.

The same builder runs in the server process and in every client process (a Ray actor or a
SuperNode): each reads the run directory's config.json, so a client needs nothing but the
run directory and the prepared data cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pchmr.core.contracts.backbone import BackboneOptions
from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.partition import Partition
from pchmr.core.engine.config import MIXED_DATASET, PUBLIC_BODY_MODEL, RunConfig
from pchmr.core.engine.devices import Placement
from pchmr.core.engine.losses import LossWeights
from pchmr.core.engine.module import HMRModule, OptimConfig
from pchmr.core.engine.pretrain import PUBLIC, pretrained_encoder
from pchmr.core.engine.registry import get_registry
from pchmr.core.kit.cache import default_cache_dir
from pchmr.core.kit.joints import AppliedProtocol, apply_protocol
from pchmr.core.kit.metrics import Protocol
from pchmr.core.kit.safe_pickle import load_torch_file
from pchmr.core.kit.seeds import derive_seed

__all__ = ["Components", "build_components", "dataset_resolution", "load_model_weights", "make_loader"]


@dataclass
class Components:
    config: RunConfig
    body_model: BodyModel
    data: HMRData
    encoder_weights: str | None = None  # the resolved file of --encoder-weights
    encoder_resolved: bool = True  # False: built for the data only (build_components(with_model=False))

    def make_module(self, mechanisms: Sequence[Mechanism] = (), init_seed: int | None = None) -> HMRModule:
        """A fresh HMRModule; weights initialised from ``init_seed`` (default: the run seed);
        ``mechanisms``: a federated client's (the strategy's), whose loss and training-step hooks
        it calls inside ``module.round(context)``."""
        cfg = self.config
        if not self.encoder_resolved:
            raise RuntimeError("these components were built for the data only: call build_components(config)")
        factory = get_registry().get("backbone", cfg.backbone)
        options = BackboneOptions(
            variant=cfg.variant,
            encoder=cfg.encoder,
            input_size=cfg.input_size,
            encoder_weights=self.encoder_weights,
            freeze_encoder=cfg.encoder_frozen,
            extra=dict(cfg.backbone_options),
        )
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(cfg.seed if init_seed is None else init_seed, 1))
            backbone = factory(self.body_model, options)
        module = HMRModule(
            backbone,
            self.body_model,
            loss_weights=LossWeights.from_overrides(cfg.loss_weights),
            optim=OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay),
            mechanisms=mechanisms,
            alignment=self.applied_protocol().alignment,
        )
        if cfg.init_from is not None:
            load_model_weights(module, cfg.init_from)
        if cfg.uses_channels_last:
            # 4-D tensors only (the convolutions' weights); loading a state dict copies into these
            # strides, and moving to a device keeps them, so the whole run stays channels-last
            module.to(memory_format=torch.channels_last)
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


#: model.pt holds a plain state dict (tensors under string keys); anything more is not pchmr's.
_MODEL_ADVICE = "A model.pt pchmr writes is a plain state dict of tensors; use the run directory's own model.pt."


def load_model_weights(module: HMRModule, source: str | Path) -> None:
    """Load a trained HMRModule state (a run directory's ``model.pt``, or the file itself) into
    ``module``; a state of another backbone, variant or body model is refused by name."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path} (expected a run directory with model.pt, or the file)")
    state = load_torch_file(path, what="trained model (model.pt)", advice=_MODEL_ADVICE)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors. {_MODEL_ADVICE}")
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
    dataset_plugin, dataset_options = dataset_resolution(config.dataset, config.dataset_options, config.eval_datasets)
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
        weights = str(
            pretrained_encoder(
                config.backbone,
                config.encoder,
                config.input_size,
                public_body,
                cache,
                progress=progress,
                extra=config.backbone_options,
                placement=config.placement(),
            )
        )
    return Components(config=config, body_model=body_model, data=data, encoder_weights=weights)


def dataset_resolution(
    name: str, options: Mapping[str, object] | None = None, eval_datasets: str | None = None
) -> tuple[str, dict[str, object]]:
    """``--dataset`` name and ``--dataset-option`` values → (plugin name, DatasetSpec options):
    ``a,b,c`` is the ``mixed`` plugin with ``options["datasets"] = "a,b,c"`` (each member's samples
    keep ``source`` = its name) besides the given ones and, with ``--eval-datasets``,
    ``options["test"]``: the members it evaluates on."""
    given = dict(options or {})
    if "," in name:
        return MIXED_DATASET, {"datasets": name, **given, **({"test": eval_datasets} if eval_datasets else {})}
    return name, given


@functools.lru_cache(maxsize=4)
def _body_model(name: str, cache_dir: str, model_dir: str | None) -> BodyModel:
    factory = get_registry().get("body_model", name)
    return factory(BodyModelSpec(cache_dir=cache_dir, model_dir=model_dir))


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, placement: Placement | None = None
) -> DataLoader:
    """A seeded loader of ``dataset``, fed as ``placement`` asks (:meth:`Placement.loader_kwargs`:
    pinned memory on a GPU, ``--loader-workers``); without one, in this process. The shuffle
    order depends on ``seed`` only, whatever the workers."""
    generator = torch.Generator().manual_seed(seed)
    feed = {"num_workers": 0, **(placement.loader_kwargs() if placement is not None else {})}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, **feed)
