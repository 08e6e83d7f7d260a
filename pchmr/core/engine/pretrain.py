"""Encoder pretraining on public data: pchmr's stand-in for an ImageNet-initialised CNN.

HMR backbones are never trained from scratch: FastMETRO and TORE start from a CNN pretrained
on public images (ImageNet, COCO) and the PCHMR paper's federated runs start from there too.
Nothing can be downloaded here, so ``--encoder-weights public`` makes the public data instead:

* a *public* split of the ``synthetic`` generator, rendered with its own seed
  (:data:`PUBLIC_SEED`): other subjects (body shapes), poses, cameras and backgrounds than any
  run's data, from the same scene and action vocabulary — the analogue of pretraining on a
  public dataset of the same domain, never on the clients' images. It is rendered with Anny
  whatever the run's body model (a SMPL run pretrains on the same public images);
* the backbone's own CNN (``backbone.encoder``) with a throw-away *linear* head on its
  globally average-pooled features regressing the root-relative 3D joints (camera frame), L1,
  AdamW, for :data:`PRETRAIN_EPOCHS` epochs. A linear read-out forces the pose into the
  features themselves, where a transformer's attention (a weighted average of image tokens
  and a linear map) can read it; an MLP head would hold much of it instead;
* the encoder's state dict cached under ``<cache>/encoders/`` keyed by everything that
  determines it (encoder, input size, body model, public split, recipe version, and the
  accelerator when it is not the CPU: a GPU computes other round-off), written atomically;
  later runs load the file like a user's ImageNet weights.

Pretraining runs where the run's models run (the run's placement's device), always in 32-bit:
the weights are cached and shared by runs of any ``--precision``.

Only the CNN is pretrained: the transformer, the tokens and the heads start untrained, so a
run's round 0 is still the untrained HMR model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from pchmr.core.contracts.backbone import BackboneOptions
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.engine.config import PUBLIC_DATASET
from pchmr.core.engine.devices import CPU, Placement
from pchmr.core.engine.registry import get_registry

__all__ = ["PRETRAIN_EPOCHS", "PUBLIC", "PUBLIC_SEED", "pretrain_encoder", "pretrained_encoder"]

log = logging.getLogger("pchmr.pretrain")

#: The value of ``--encoder-weights`` that asks for public pretraining.
PUBLIC = "public"
#: Seed of the public split (no run uses it: run seeds are small integers).
PUBLIC_SEED = 1_000_003
#: Public training images and the recipe.
PUBLIC_SAMPLES = 2000
PRETRAIN_EPOCHS = 3
PRETRAIN_BATCH = 16
PRETRAIN_LR = 1e-3
PRETRAIN_WEIGHT_DECAY = 1e-4
#: Bump when the recipe changes: it is part of the cache key.
RECIPE_VERSION = 2


def public_encoder(
    backbone: str, encoder: str, input_size: int, body_model: BodyModel, extra: Mapping[str, object] | None = None
) -> nn.Module:
    """``backbone``'s untrained CNN ``encoder``, built with the run's backbone options ``extra``
    (they may change the CNN itself, e.g. ``encoder_norm=group``)."""
    options = BackboneOptions(encoder=encoder, input_size=input_size, extra=dict(extra or {}))
    model = get_registry().get("backbone", backbone)(body_model, options)
    cnn = getattr(model, "encoder", None)
    if not isinstance(cnn, nn.Module) or not isinstance(getattr(cnn, "out_channels", None), int):
        raise ValueError(
            f"backbone '{backbone}' has no CNN 'encoder' attribute with 'out_channels' to pretrain; "
            "pass --encoder-weights FILE or --encoder-weights none (from scratch)"
        )
    return cnn


def _cache_key(
    encoder: str, input_size: int, body_model: BodyModel, cnn: nn.Module, placement: Placement | None = None
) -> str:
    architecture = repr(cnn) + repr(sorted((k, tuple(v.shape)) for k, v in cnn.state_dict().items()))
    identity = {
        "recipe": RECIPE_VERSION,
        "architecture": hashlib.sha256(architecture.encode()).hexdigest(),
        "encoder": encoder,
        "input_size": input_size,
        "body_model": body_model.name,
        "joints": list(body_model.joint_names),
        "dataset": PUBLIC_DATASET,
        "seed": PUBLIC_SEED,
        "samples": PUBLIC_SAMPLES,
        "epochs": PRETRAIN_EPOCHS,
        "batch": PRETRAIN_BATCH,
        "lr": PRETRAIN_LR,
    }
    if placement is not None and placement.accelerator != "cpu":  # the CPU's key predates placements
        identity["accelerator"] = placement.accelerator
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{encoder}-{input_size}px-{body_model.name}-{digest}"


def pretrained_encoder(
    backbone: str,
    encoder: str,
    input_size: int,
    body_model: BodyModel,
    cache_dir: Path,
    progress: Callable[[str], None] | None = None,
    extra: Mapping[str, object] | None = None,
    placement: Placement | None = None,
) -> Path:
    """The cached public-pretrained weights of ``backbone``'s ``encoder`` (made on first use,
    on ``placement``'s device; default the CPU).

    ``extra`` are the run's backbone options; the cache is keyed by the CNN they build (its
    layers and tensor shapes), so options that leave the CNN alone share one file.
    """
    with torch.random.fork_rng():  # building the model draws from the global RNG: leave it as it was
        cnn = public_encoder(backbone, encoder, input_size, body_model, extra)
    key = _cache_key(encoder, input_size, body_model, cnn, placement)
    path = Path(cache_dir) / "encoders" / f"{key}.pt"
    if path.is_file():
        return path
    if progress is not None:
        progress(f"pretraining the {encoder} encoder on the public synthetic split (once; cached in {path.parent})")
    state, _ = pretrain_encoder(
        backbone, encoder, input_size, body_model, Path(cache_dir), extra=extra, placement=placement
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def pretrain_encoder(
    backbone: str,
    encoder: str,
    input_size: int,
    body_model: BodyModel,
    cache_dir: Path,
    epochs: int = PRETRAIN_EPOCHS,
    samples: int = PUBLIC_SAMPLES,
    seed: int = PUBLIC_SEED,
    extra: Mapping[str, object] | None = None,
    placement: Placement | None = None,
) -> tuple[dict[str, Tensor], list[float]]:
    """Train ``backbone``'s CNN encoder (built with backbone options ``extra``) on the public
    split, on ``placement``'s device in 32-bit (default: the CPU); returns its state dict (on the
    CPU) and the mean training loss of every epoch."""
    registry = get_registry()
    spec = DatasetSpec(
        image_size=input_size, seed=seed, cache_dir=Path(cache_dir) / "datasets", num_train=samples, num_test=1
    )
    data = registry.get("dataset", PUBLIC_DATASET)(spec, body_model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cnn = public_encoder(backbone, encoder, input_size, body_model, extra)
        joints = body_model.num_joints
        head = nn.Linear(cnn.out_channels, joints * 3)
        where = placement or CPU
        if where.accelerator != "cpu":
            cnn.to(where.device)
            head.to(where.device)
        params = list(cnn.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=PRETRAIN_LR, weight_decay=PRETRAIN_WEIGHT_DECAY, fused=True)
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            data.train, batch_size=PRETRAIN_BATCH, shuffle=True, generator=generator, **where.loader_kwargs()
        )
        cnn.train()
        start = time.perf_counter()
        losses: list[float] = []
        for epoch in range(epochs):
            total, batches = 0.0, 0
            for batch in loader:
                loss = pretraining_loss(cnn, head, where.to(batch), joints)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            losses.append(total / max(batches, 1))
            log.info(
                "encoder pretraining epoch %d: loss %.4f (%.0f s)",
                epoch,
                total / max(batches, 1),
                time.perf_counter() - start,
            )
    return {k: v.detach().cpu().clone() for k, v in cnn.state_dict().items()}, losses


def pretraining_loss(cnn: nn.Module, head: nn.Module, batch: dict, joints: int) -> Tensor:
    """L1 of the pooled linear head's (J, 3) root-relative joints (metres), weighted by validity."""
    out = head(cnn(batch["image"]).mean(dim=(2, 3))).view(-1, joints, 3)
    j3d = batch["joints_3d"]
    return ((out - j3d[..., :3]).abs().sum(-1) * j3d[..., 3]).sum() / j3d[..., 3].sum().clamp_min(1)
