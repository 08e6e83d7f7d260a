"""The paper's pipeline end to end (scripts/experiments/pipeline.py): devices annotate their own
synthetic images with the real DePoser (`pchmr annotate synthetic`), a federation trains on the
pseudo-labels through `pchmr run` (Flower's Simulation Engine), one client per device, and is
evaluated against real ground truth; and the study's statistics."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from pchmr.core.contracts.partition import load_partition

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiments" / "pipeline.py"


def _script():
    spec = importlib.util.spec_from_file_location("pipeline_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pipeline = _script()


def test_t_interval_uses_students_t_with_n_minus_1_degrees_of_freedom() -> None:
    assert pipeline.t_quantile(2) == pytest.approx(4.303, abs=5e-4)
    assert pipeline.t_quantile(4) == pytest.approx(2.776, abs=5e-4)
    mean, half = pipeline.t_interval([1.0, 2.0, 3.0])  # s = 1
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert math.isnan(pipeline.t_interval([5.0])[1]) and pipeline.mean_ci_text([5.0]) == "5.0"
    assert pipeline.mean_ci_text([1.0, 2.0, 3.0]) == "2.0 ± 2.5"


def test_the_test_seed_may_not_be_a_devices_seed() -> None:
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--devices", "3", "--test-seed", "2"])


def test_devices_annotate_then_federate_on_their_pseudo_labels_against_real_ground_truth(tmp_path, pchmr_cache):
    out = tmp_path / "study"
    args = ["--out", str(out), "--devices", "2", "--images", "8", "--annotate-option", "iterations=20",
            "--labels", "deposer", "--seeds", "0", "--base-images", "0", "--backbone", "tore", "--rounds", "1", "--local-epochs", "1", "--batch-size", "8",
            "--test-images", "8"]  # fmt: skip
    assert pipeline.main(args) == 0

    labels = out / "labels" / "deposer"
    assert sorted(p.name for p in labels.iterdir()) == ["device-1", "device-2"]
    for device in ("device-1", "device-2"):
        info = json.loads((labels / device / "info.json").read_text())
        assert info["annotator"]["annotator"] == "deposer" and info["annotated"] + info["failed"] == 8
        assert info["data_options"]["split"] == "train" and "gt_keypoints_2d" in np.load(labels / device / "labels.npz")

    run = out / "runs" / "deposer-s0"
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    final = json.loads((run / "final.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]
    for key in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm"):
        assert math.isfinite(final[key]) and final[key] > 0
    assert final["protocol"]["ground_truth"] == "real"
    assert final["protocol"]["dataset"] == (
        "pseudo-labels: deposer labels of 2 devices; test: synthetic test split (seed 0, 8 images)"
    )
    config = json.loads((run / "config.json").read_text())
    data = config["data"]
    assert data["train_gt"] == "pseudo" and data["test"] == "synthetic" and data["num_test"] == 8

    # one client per device directory, each holding exactly that device's annotated images
    partition = load_partition(run / "partition.json")
    assert partition.params["label"] == "device" and partition.params["values"] == ["device-1", "device-2"]
    for client, device in zip(partition.clients, partition.params["values"]):
        assert len(client) == data["devices"][device]["annotated"] == data["devices"][device]["train"]
    assert sorted(np.concatenate(partition.clients).tolist()) == list(range(data["num_train"]))

    table = (out / "pipeline.md").read_text()
    assert "| DePoser labels | 1 |" in table and "deposer labels of 2 devices" in table
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["annotate-deposer-device-1", "annotate-deposer-device-2", "run-deposer-s0"]

    # a second call reuses everything (nothing re-annotated or re-run)
    assert pipeline.main(args) == 0
    assert len((out / "steps.jsonl").read_text().splitlines()) == 3
