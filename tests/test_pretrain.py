"""Public encoder pretraining: the CNN learns on a disjoint public split, is cached, and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pchmr.core.contracts.backbone import BackboneOptions
from pchmr.core.engine import pretrain
from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.registry import get_registry
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
    assert RunConfig().encoder_weights == "public"  # HMR backbones start from a pretrained CNN
    assert RunConfig(encoder_weights="none").encoder_weights is None
    assert RunConfig(encoder_weights="Scratch").encoder_weights is None
    with pytest.raises(ConfigError, match="--encoder-weights must be 'public', 'none' or an existing weights file"):
        RunConfig(encoder_weights="/no/such/file.pt")


def test_the_encoder_is_frozen_by_default_exactly_when_pretrained_weights_are_loaded(tmp_path: Path) -> None:
    assert RunConfig().encoder_frozen
    assert not RunConfig(encoder_weights=None).encoder_frozen
    assert not RunConfig(freeze_encoder=False).encoder_frozen
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    fine_tune = RunConfig(init_from=str(model))  # the whole model is replaced: nothing pretrained loads
    assert not fine_tune.loads_encoder_weights and not fine_tune.encoder_frozen
    assert RunConfig(init_from=str(model), freeze_encoder=True, encoder_weights=None).encoder_frozen
    with pytest.raises(ConfigError, match="--freeze-encoder keeps the CNN fixed, but --encoder-weights none"):
        RunConfig(encoder_weights="none", freeze_encoder=True)
    with pytest.raises(ConfigError, match="freeze_encoder must be true or false, got 'yes'"):
        RunConfig(freeze_encoder="yes")  # type: ignore[arg-type]


def test_the_frozen_encoder_reaches_the_backbone_and_the_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    from pchmr.core.engine.components import Components

    captured: list[BackboneOptions] = []
    real = get_registry().get("backbone", "fastmetro")

    def factory(body_model, options):
        captured.append(options)
        return real(body_model, options)

    monkeypatch.setattr(get_registry(), "get", lambda kind, name: factory)
    from pchmr.testing.toys import ToyBodyModel

    for cfg, frozen in ((RunConfig(), True), (RunConfig(encoder_weights=None), False)):
        module = Components(config=cfg, body_model=ToyBodyModel(), data=None).make_module()  # type: ignore[arg-type]
        assert captured[-1].freeze_encoder is frozen
        trainable = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
        assert any(id(p) in trainable for p in module.backbone.encoder.parameters()) is not frozen
