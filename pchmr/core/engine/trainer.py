"""Lightning Trainers as pchmr builds them, and the learning-rate schedule over rounds or epochs."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable

import pytorch_lightning as pl

from pchmr.core.engine.config import LR_SCHEDULES
from pchmr.core.engine.devices import CPU, Placement

__all__ = ["CPU", "LearningRate", "lr_factor", "make_trainer", "quiet_lightning"]


def lr_factor(schedule: str, index: int, total: int) -> float:
    """The multiplier of the base learning rate for round or epoch ``index`` (1-based) of ``total``.

    ``cosine``: half a cosine from 1 at the first round down toward 0, never reaching it
    (``(1 + cos(π (index − 1) / total)) / 2``; 3 rounds: 1, 0.75, 0.25), so the last rounds
    take small steps and the final model is not one noisy step away from where training went;
    ``constant``: 1 (the PCHMR paper's Table 7 gives one rate per setting).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if not 1 <= index <= total:
        raise ValueError(f"round or epoch {index} is outside 1..{total}")
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (index - 1) / total))


class LearningRate(pl.Callback):
    """Sets every parameter group's learning rate at the start of each training epoch to
    ``rate(epoch)`` (``epoch`` 0-based, as Lightning counts, resumed fits included). It runs after
    a carried-over optimizer state is loaded, so a kept AdamW state never brings back an old rate."""

    def __init__(self, rate: Callable[[int], float]) -> None:
        self.rate = rate

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lr = float(self.rate(trainer.current_epoch))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banner lines (GPU available, TPU, ...)."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
    # a frozen pretrained encoder stays in eval mode on purpose (FeatureEncoder.freeze)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def make_trainer(
    *,
    max_epochs: int = 1,
    max_steps: int = -1,
    grad_clip: float | None = None,
    quiet: bool = True,
    callbacks: Iterable[pl.Callback] = (),
    placement: Placement | None = None,
    **kwargs: object,
) -> pl.Trainer:
    """A Trainer on ``placement`` (default: one CPU, 32-bit); ``quiet`` (federated clients) turns
    logging, checkpoints, progress and summary off."""
    if quiet:
        quiet_lightning()
    where = placement or CPU
    return pl.Trainer(
        **where.trainer_kwargs(),
        max_epochs=max_epochs,
        max_steps=max_steps,
        gradient_clip_val=grad_clip,
        logger=False if quiet else kwargs.pop("logger", True),
        enable_checkpointing=not quiet and bool(kwargs.pop("enable_checkpointing", False)),
        enable_progress_bar=not quiet,
        enable_model_summary=not quiet,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )
