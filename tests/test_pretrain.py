"""Public encoder pretraining: the CNN learns on a disjoint public split, is cached, and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pchmr.core import pretrain
from pchmr.core.backbone import BackboneOptions
from pchmr.core.config import ConfigError, RunConfig
from pchmr.core.registry import get_registry
from pchmr.plugins.bodymodels.anny import make_anny

SAMPLES = 24


@pytest.fixture(scope="module")
def anny():
    return make_anny()


def test_pretraining_changes_the_cnn_and_the_cached_file_loads_into_the_backbone(
    anny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pretrain, "PUBLIC_SAMPLES", SAMPLES)
    monkeypatch.setattr(pretrain, "PRETRAIN_EPOCHS", 2)
    monkeypatch.setattr(pretrain, "PRETRAIN_BATCH", 8)
    factory = get_registry().get("backbone", "fastmetro")
    torch.manual_seed(pretrain.PUBLIC_SEED)
    untrained = factory(anny, BackboneOptions()).encoder.state_dict()

    calls: list[int] = []
    real = pretrain.pretrain_encoder

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs, epochs=2, samples=SAMPLES)

    monkeypatch.setattr(pretrain, "pretrain_encoder", counting)
    path = pretrain.pretrained_encoder("fastmetro", "small", 64, anny, tmp_path)
    again = pretrain.pretrained_encoder("fastmetro", "small", 64, anny, tmp_path)
    assert path == again and calls == [1]  # made once, then read from the cache

    state = torch.load(path, weights_only=True)
    assert state.keys() == untrained.keys()
    moved = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, untrained[k])]
    assert len(moved) > len(state) // 2  # training changed the convolutions, not only BN statistics

    model = factory(anny, BackboneOptions(encoder_weights=str(path)))
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in state.items())
    # the public split is the generator's own seed: no run's data
    public = tmp_path / "datasets"
    assert any(str(pretrain.PUBLIC_SEED) in p.name for p in public.iterdir())


def test_pretraining_lowers_its_loss_on_the_public_split(anny, tmp_path: Path) -> None:
    _, losses = pretrain.pretrain_encoder("fastmetro", "small", 64, anny, tmp_path, epochs=6, samples=SAMPLES)
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]


def test_encoder_weights_option_is_checked() -> None:
    assert RunConfig(encoder_weights="public").encoder_weights == "public"
    with pytest.raises(ConfigError, match="--encoder-weights must be 'public' or an existing weights file"):
        RunConfig(encoder_weights="/no/such/file.pt")
