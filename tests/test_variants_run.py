"""All six backbone variants train through ``pchmr run`` on the synthetic default (Anny).

Each runs one centralized epoch (one step) on a few samples — the same HMRModule and run directory as a
federated client's local fit — and must change the model (the metrics move off round 0) and
record the loss weights it trained with, TORE's pruning weight included."""

import json
import math

import pytest

from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.run import execute


@pytest.mark.parametrize("backbone", ["fastmetro", "tore"])
@pytest.mark.parametrize("variant", ["S", "M", "L"])
def test_every_variant_trains_through_pchmr_run(backbone, variant, tmp_path, pchmr_cache):
    cfg = RunConfig(
        backbone=backbone,
        variant=variant,
        mode="centralized",
        epochs=1,
        num_train=8,
        num_test=4,
        batch_size=8,
        out=str(tmp_path / f"{backbone}-{variant}"),
    )
    result = execute(cfg)
    final, start = result.final, result.final["round0"]
    assert all(math.isfinite(final[k]) for k in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm"))
    assert final["mpjpe_mm"] != start["mpjpe_mm"]
    recorded = json.loads(result.run_dir.config.read_text())
    assert recorded["run"]["backbone"] == backbone and recorded["run"]["variant"] == variant
    weights = recorded["loss_weights"]
    assert weights["edge"] == 500.0 and weights["normal"] == 10.0
    if backbone == "tore":
        kept = 51  # int(8 * 8 * 0.8) image tokens at 64 px
        assert weights["extra"]["token_pruning"] == pytest.approx(1e-3 * 16 * kept)
        assert weights["extra_schedule_at_epoch_0"]["token_pruning"] == pytest.approx(1 / (1 + math.exp(3)))


def test_backbone_options_reach_the_plugin_and_typos_are_refused(pchmr_cache):
    from pchmr.core.engine.components import build_components

    components = build_components(
        RunConfig(backbone="tore", backbone_options={"keep_ratio": 0.5}, num_train=8, num_test=4)
    )
    assert components.make_module().backbone.num_kept == 32  # int(64 * 0.5)
    typo = RunConfig(backbone="tore", backbone_options={"keep_ration": 0.5}, num_train=8, num_test=4)
    with pytest.raises(ValueError, match=r"tore backbone has no option 'keep_ration' \(did you mean 'keep_ratio'\?\)"):
        build_components(typo).make_module()  # refused when the encoder is built for pretraining, at the latest


def test_a_run_refused_during_set_up_leaves_no_directory(tmp_path, pchmr_cache):
    out = tmp_path / "refused"
    cfg = RunConfig(
        backbone="tore", backbone_options={"keep_ration": 0.5}, num_train=8, num_test=4, clients=2, out=str(out)
    )
    with pytest.raises(ValueError, match="keep_ration"):
        execute(cfg)
    assert not out.exists()


def test_init_from_starts_a_run_from_a_trained_model_and_refuses_another_architecture(tmp_path, pchmr_cache):
    import torch

    from pchmr.core.engine.components import build_components

    source = build_components(RunConfig(num_train=8, num_test=4)).make_module(init_seed=123)
    run_dir = tmp_path / "pretrained"
    run_dir.mkdir()
    torch.save(source.state_dict(), run_dir / "model.pt")
    module = build_components(RunConfig(num_train=8, num_test=4, init_from=str(run_dir))).make_module()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in source.state_dict().items())
    other = build_components(RunConfig(backbone="tore", num_train=8, num_test=4, init_from=str(run_dir)))
    with pytest.raises(ValueError, match="not a model of this backbone|does not fit this model"):
        other.make_module()
    with pytest.raises(Exception, match="--init-from must be a run directory"):
        RunConfig(init_from=str(tmp_path / "nothing"))
