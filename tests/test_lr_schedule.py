"""The learning-rate schedule over rounds (federated) and epochs (baselines)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.federation.client import _OptimizerCarry
from pchmr.core.engine.trainer import LearningRate, lr_factor, make_trainer


def test_cosine_starts_at_the_full_rate_and_ends_small_but_not_zero() -> None:
    assert [lr_factor("cosine", r, 3) for r in (1, 2, 3)] == pytest.approx([1.0, 0.75, 0.25])
    factors = [lr_factor("cosine", r, 100) for r in range(1, 101)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:])) and factors[-1] > 0
    assert factors[49] == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 100)))
    assert lr_factor("constant", 7, 9) == 1.0 and lr_factor("cosine", 1, 1) == 1.0


def test_bad_schedules_and_indices_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'; choose one of cosine, constant"):
        lr_factor("step", 1, 3)
    with pytest.raises(ValueError, match="round or epoch 4 is outside 1..3"):
        lr_factor("cosine", 4, 3)
    with pytest.raises(ConfigError, match="--lr-schedule must be one of cosine, constant, got 'linear'"):
        RunConfig(lr_schedule="linear")
    assert RunConfig().lr_schedule == "cosine"


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.rates: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        self.rates.append((self.current_epoch, self.trainer.optimizers[0].param_groups[0]["lr"]))
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1.0)


def test_the_rate_is_set_every_epoch_even_over_a_carried_optimizer_state() -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    first = _Tiny()
    carry = _OptimizerCarry(None)
    make_trainer(max_epochs=1, callbacks=[carry, LearningRate(lambda epoch: 0.5)]).fit(first, data)
    assert first.rates == [(0, 0.5), (0, 0.5)]
    assert carry.final is not None and carry.final["param_groups"][0]["lr"] == 0.5

    second = _Tiny()  # a client's next round: its kept AdamW state says lr 0.5, the schedule says less
    make_trainer(max_epochs=2, callbacks=[_OptimizerCarry(carry.final), LearningRate(lambda e: 0.1 / (e + 1))]).fit(
        second, data
    )
    assert second.rates == [(0, 0.1), (0, 0.1), (1, 0.05), (1, 0.05)]


def test_a_run_saved_before_the_schedule_and_core_freeze_options_resumes_as_it_ran() -> None:
    saved = RunConfig(rounds=5).to_dict()
    del saved["lr_schedule"], saved["freeze_encoder"]
    saved["backbone_options"] = {"freeze_encoder": "true", "dropout": 0.2}
    old = RunConfig.from_saved(saved)
    assert old.lr_schedule == "constant" and old.freeze_encoder is True
    assert dict(old.backbone_options) == {"dropout": 0.2}
    del saved["backbone_options"]
    assert RunConfig.from_saved(saved).freeze_encoder is False  # the CNN trained before the option existed
    current = RunConfig(lr_schedule="cosine", freeze_encoder=None)
    assert RunConfig.from_saved(current.to_dict()) == current
