"""HMRModule's loss: every term of FastMETRO's objective, each weight a config value."""

from __future__ import annotations

import pytest
import torch

from pchmr.core.contracts.backbone import BackboneOptions
from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.losses import LossWeights
from pchmr.core.engine.mesh_losses import edge_length_loss, normal_loss
from pchmr.core.engine.module import HMRModule
from pchmr.plugins.backbones.fastmetro import make_fastmetro
from pchmr.testing.toys import ToyBodyModel, toy_batch

SIZE = 64


@pytest.fixture(scope="module")
def body() -> ToyBodyModel:
    return ToyBodyModel()


def _module(body: ToyBodyModel, weights: LossWeights | None = None) -> HMRModule:
    torch.manual_seed(0)
    backbone = make_fastmetro(body, BackboneOptions(variant="S", input_size=SIZE))
    backbone.eval()  # no dropout: terms are reproducible
    return HMRModule(backbone, body, loss_weights=weights)


def test_loss_is_the_weighted_sum_of_fastmetros_terms_with_mesh_terms_on_the_middle_level(body: ToyBodyModel) -> None:
    module = _module(body)
    batch = toy_batch(body, 3, SIZE, torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = module(batch["image"])
        terms = module.compute_losses(batch, out)
    middle = body.pyramid().levels - 2
    gt_middle = module.pyramid.downsample(batch["vertices"], middle)
    faces = module.pyramid.faces[middle]
    assert torch.allclose(
        terms["edge"], edge_length_loss(out.vertices[middle], gt_middle, faces, batch["has_vertices"])
    )
    assert torch.allclose(terms["normal"], normal_loss(out.vertices[middle], gt_middle, faces, batch["has_vertices"]))
    expected = (
        1000 * terms["joints_3d"]
        + 1000 * terms["reg_joints_3d"]
        + 100 * terms["vertices"]
        + 100 * terms["joints_2d"]
        + 500 * terms["edge"]
        + 10 * terms["normal"]
    )
    assert torch.allclose(terms["loss"], expected, rtol=1e-5)
    assert terms["edge"] > 0 and terms["normal"] > 0


def test_weights_come_from_overrides_and_zero_drops_the_mesh_terms(body: ToyBodyModel) -> None:
    weights = LossWeights.from_overrides({"edge": 0, "normal": 0, "joints-2d": 7.5})
    assert (weights.edge, weights.normal, weights.joints_2d, weights.joints_3d) == (0.0, 0.0, 7.5, 1000.0)
    module = _module(body, weights)
    batch = toy_batch(body, 2, SIZE, torch.Generator().manual_seed(3))
    with torch.no_grad():
        terms = module.compute_losses(batch, module(batch["image"]))
    assert "edge" not in terms
    expected = (
        1000 * terms["joints_3d"] + 1000 * terms["reg_joints_3d"] + 100 * terms["vertices"] + 7.5 * terms["joints_2d"]
    )
    assert torch.allclose(terms["loss"], expected, rtol=1e-5)


def test_a_weight_naming_no_term_is_refused(body: ToyBodyModel) -> None:
    with pytest.raises(ValueError, match=r"loss weights \['edgee'\] name no loss term"):
        _module(body, LossWeights.from_overrides({"edgee": 1.0}))
    with pytest.raises(ValueError, match="mesh_level 5"):
        _module(body, LossWeights(mesh_level=5))


def test_run_config_validates_and_records_loss_weights() -> None:
    cfg = RunConfig(loss_weights={"edge": 250})
    assert RunConfig.from_dict(cfg.to_dict()).loss_weights == {"edge": 250}
    with pytest.raises(ConfigError, match="loss weight 'normal' must be a number >= 0"):
        RunConfig(loss_weights={"normal": -1})


def test_evaluation_refuses_non_finite_predictions_by_name(body: ToyBodyModel) -> None:
    from pchmr.core.engine.evaluation import evaluate

    module = _module(body)
    batch = toy_batch(body, 3, SIZE, torch.Generator().manual_seed(4))
    assert set(evaluate(module, [batch])) >= {"mpjpe_mm", "pa_mpjpe_mm"}
    with torch.no_grad():
        next(p for n, p in module.backbone.named_parameters() if "vertex" in n and p.dim() == 2).fill_(float("nan"))
    module.train()
    with pytest.raises(FloatingPointError, match=r"non-finite vertices for 3 of 3 images"):
        evaluate(module, [batch])
    assert module.training, "the module's mode is restored"
