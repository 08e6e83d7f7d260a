"""The non-federated baselines, through the same HMRModule and the same run-directory layout.

* ``centralized`` — all training data on one trainer (the usual HMR setting);
* ``naive`` — one device training alone on a seeded random ``fraction`` of the training data
  (the PCHMR paper's 5/10/20 % single-device baseline).

An epoch plays the part of a round: ``rounds.jsonl`` gets one record per evaluated epoch
(``round`` = epochs done, ``unit`` = ``"epoch"``), with round 0 the untrained model. The
Lightning checkpoint (weights, optimizer, epoch) is rewritten after every epoch, so a killed
baseline resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Subset

from pchmr.core.contracts.partition import Partition
from pchmr.core.engine.components import Components, make_loader
from pchmr.core.engine.devices import Placement
from pchmr.core.engine.evaluation import evaluate
from pchmr.core.engine.federation.common import RoundReport
from pchmr.core.engine.rundir import RunDir
from pchmr.core.engine.tracking import Tracker, open_tracker
from pchmr.core.engine.trainer import LearningRate, lr_factor, make_trainer
from pchmr.core.kit.atomic import describe_error
from pchmr.core.kit.seeds import derive_seed

__all__ = ["baseline_partition", "run_baseline"]

_EVAL_BATCH = 64


def baseline_partition(mode: str, num_train: int, fraction: float, seed: int) -> Partition:
    """The one 'client' of a baseline: every sample (centralized) or a seeded fraction (naive)."""
    if mode == "centralized":
        return Partition((np.arange(num_train, dtype=np.int64),), "centralized", {"num_samples": num_train})
    size = max(1, round(fraction * num_train))
    chosen = np.sort(np.random.default_rng(derive_seed(seed, 0x9A1)).choice(num_train, size, replace=False))
    return Partition((chosen.astype(np.int64),), "naive", {"fraction": fraction, "num_samples": size, "seed": seed})


class _EpochRecorder(pl.Callback):
    """Evaluates the model after every epoch, appends to rounds.jsonl, rewrites the checkpoint."""

    def __init__(
        self,
        rd: RunDir,
        components: Components,
        on_round: Callable[[RoundReport], None],
        elapsed: float,
        num_epochs: int,
        eval_every: int,
        placement: Placement,
        train_size: int,
        tracker: Tracker,
    ) -> None:
        self.rd = rd
        self.tracker = tracker
        self.placement = placement
        self.train_size = train_size
        self.test_loader = make_loader(components.data.test, _EVAL_BATCH, shuffle=False, placement=placement)
        self.on_round = on_round
        self.elapsed = elapsed
        self.num_epochs = num_epochs
        self.eval_every = eval_every
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._t0
        self.elapsed += seconds
        epoch = trainer.current_epoch + 1
        metrics = None
        record: dict[str, Any] | None = None
        if epoch % self.eval_every == 0 or epoch == self.num_epochs:
            metrics = evaluate(module, self.test_loader, self.placement)  # type: ignore[arg-type]
            loss = trainer.callback_metrics.get("train/loss")
            record = {
                "round": epoch,
                "unit": "epoch",
                **metrics,
                "wall_seconds": round(self.elapsed, 3),
                "round_seconds": round(seconds, 3),
                "bytes_sent": 0,
                "bytes_received": 0,
                "train_loss": None if loss is None else float(loss),
                "train_img_s": round(self.train_size / seconds, 3) if seconds > 0 else None,
                "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
            }
            self.rd.append_round(record)
        tmp = self.rd.lightning_checkpoint.with_name("last.ckpt.tmp")
        try:
            trainer.save_checkpoint(tmp)
            tmp.replace(self.rd.lightning_checkpoint)
        except OSError as exc:  # a full disk: the checkpoint of the epoch before stays whole
            tmp.unlink(missing_ok=True)
            raise describe_error(exc, self.rd.lightning_checkpoint, hint=self.rd.resume_hint) from exc
        self.rd.write_json(self.rd.path / "checkpoints" / "progress.json", {"epoch": epoch, "elapsed": self.elapsed})
        if record is not None:  # the epoch is saved: it is never trained again
            self.tracker.log_round(record)
        self.on_round(RoundReport(epoch, self.num_epochs, metrics, seconds))


def run_baseline(
    rd: RunDir,
    components: Components,
    partition: Partition,
    on_round: Callable[[RoundReport], None] | None,
    baselines: Mapping[str, float],
) -> dict[str, Any]:
    """Train the baseline's one device on ``partition``'s only client, on the run's placement
    (:meth:`~pchmr.core.engine.config.RunConfig.placement`), evaluating every ``eval_every``
    epochs; returns ``final.json``'s content."""
    cfg = components.config
    report = on_round or (lambda r: None)
    placement = cfg.placement()
    module = components.make_module()
    train = Subset(components.data.train, partition.clients[0].tolist())
    loader = make_loader(train, cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, 0xB), placement=placement)
    ckpt_path: Path | None = rd.lightning_checkpoint if rd.lightning_checkpoint.exists() else None
    if ckpt_path is None:
        rd.truncate_rounds(-1)
        elapsed = 0.0
    else:
        progress = rd.read_json(rd.path / "checkpoints" / "progress.json")
        rd.truncate_rounds(int(progress["epoch"]))
        elapsed = float(progress["elapsed"])
    with open_tracker(cfg, rd) as tracker:  # after the records were cut to the checkpoint
        if ckpt_path is None:
            test_loader = make_loader(components.data.test, _EVAL_BATCH, shuffle=False, placement=placement)
            metrics = evaluate(module, test_loader, placement)
            record = {
                "round": 0,
                "unit": "epoch",
                **metrics,
                "wall_seconds": 0.0,
                "round_seconds": 0.0,
                "bytes_sent": 0,
                "bytes_received": 0,
            }
            rd.append_round(record)
            tracker.log_round(record)
            report(RoundReport(0, cfg.epochs, metrics, 0.0))
        torch.manual_seed(derive_seed(cfg.seed, 0xC))
        recorder = _EpochRecorder(
            rd, components, report, elapsed, cfg.epochs, cfg.eval_every, placement, len(train), tracker
        )
        schedule = LearningRate(lambda epoch: cfg.lr * lr_factor(cfg.lr_schedule, epoch + 1, cfg.epochs))
        trainer = make_trainer(
            max_epochs=cfg.epochs,
            grad_clip=module.optim.grad_clip,
            quiet=True,
            callbacks=[recorder, schedule],
            placement=placement,
        )
        # weights_only: the checkpoint of a received run directory runs no code (RunDir.check_resumable read it)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)
        rd.save_model({k: v.detach().clone() for k, v in module.state_dict().items()})
        return rd.summarize(baselines, components.protocol().as_dict())
