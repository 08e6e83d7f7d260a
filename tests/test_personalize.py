"""``pchmr personalize``: rebuild the global HMRModule from a run directory, split pseudo-labels
80/20, fine-tune with the same module, report before/after against pseudo-GT and real GT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pchmr.cli.annotate import fine_tune, resolve_checkpoint, resolve_local_data
from pchmr.core.engine.annotation import Annotated, write_pseudo_labels


def _labels(tmp_path, n: int, body_model, offset: float):
    """``n`` pseudo-labels whose vertices are the ground truth shifted by ``offset`` metres."""
    rng = np.random.default_rng(0)
    gt_vertices = rng.normal(0, 0.2, (n, body_model.num_vertices, 3)).astype(np.float32)
    gt_joints = np.einsum("jv,nvc->njc", body_model.joint_regressor.numpy(), gt_vertices)
    annotated = Annotated(
        image_ids=[f"{i:03d}" for i in range(n)],
        crops=[rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)],
        keypoints=[np.concatenate([rng.uniform(-1, 1, (14, 2)), np.ones((14, 1))], 1).astype(np.float32) for _ in range(n)],
        vertices=list(gt_vertices + offset), joints=list(gt_joints + offset),
        meta=[{"subject": "s", "scene": "c", "action": "a", "source": "device"}] * n,
    )  # fmt: skip
    gt = {"joints_3d": np.concatenate([gt_joints, np.ones((n, 14, 1))], -1).astype(np.float32), "vertices": gt_vertices}
    return write_pseudo_labels(tmp_path / "labels", annotated, {"annotator": "test"}, gt)


def test_checkpoint_and_data_paths_are_checked_with_the_next_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.pt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="pchmr annotate"):
        resolve_local_data(tmp_path)


def test_fine_tune_splits_80_20_and_reports_both_ground_truths(tmp_path, pchmr_cache):
    from pchmr.core.engine.components import build_components
    from pchmr.core.engine.config import RunConfig

    cfg = RunConfig(num_train=4, num_test=2, cache_dir=pchmr_cache)
    components = build_components(cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run": cfg.to_dict()}))
    module = components.make_module()
    torch.save(module.state_dict(), run / "model.pt")
    labels = _labels(tmp_path, 10, components.body_model, offset=0.05)

    result = fine_tune(run, labels, epochs=1, lr=1e-4, batch_size=4, seed=0)

    assert (result["train"], result["test"]) == (8, 2)
    assert set(result["before"]) == {"pseudo", "real"}
    for when in ("before", "after"):
        for target in ("pseudo", "real"):
            assert set(result[when][target]) == {"mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck"}
    # pseudo-labels sit 5 cm from the truth: the untrained model's errors differ between the two
    assert result["before"]["pseudo"]["mpvpe_mm"] != pytest.approx(result["before"]["real"]["mpvpe_mm"], abs=1e-3)
    # training changed the weights (loaded from model.pt, then fine-tuned)
    assert result["after"]["pseudo"] != result["before"]["pseudo"]


def test_the_global_model_loads_without_the_runs_init_from_weights(tmp_path, pchmr_cache):
    """A run fine-tuned from a pretraining (``--init-from``) names that file in its config.json; the
    device has only the run directory: model.pt holds every weight, the init file is not read."""
    from pchmr.cli.annotate import load_global_module
    from pchmr.core.engine.components import build_components
    from pchmr.core.engine.config import RunConfig

    cfg = RunConfig(num_train=4, num_test=2, cache_dir=pchmr_cache)
    module = build_components(cfg).make_module()
    run = tmp_path / "run"
    run.mkdir()
    saved = {**cfg.to_dict(), "init_from": str(tmp_path / "pretraining-on-another-machine" / "model.pt")}
    (run / "config.json").write_text(json.dumps({"run": saved}))
    torch.save(module.state_dict(), run / "model.pt")
    loaded, body_model = load_global_module(run)
    assert body_model.name == cfg.body_model
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
