"""Centralized and naive baselines: same HMRModule, same run-directory layout, resumable."""

import numpy as np
import pytest

from pchmr.core.engine.baselines import baseline_partition
from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.run import execute


def test_naive_partition_is_a_seeded_fraction_and_centralized_takes_all():
    a = baseline_partition("naive", 1000, 0.05, seed=1)
    assert a.sizes().tolist() == [50]
    assert np.array_equal(a.clients[0], baseline_partition("naive", 1000, 0.05, seed=1).clients[0])
    assert not np.array_equal(a.clients[0], baseline_partition("naive", 1000, 0.05, seed=2).clients[0])
    assert baseline_partition("centralized", 7, 1.0, seed=0).sizes().tolist() == [7]


@pytest.mark.parametrize("fraction", [0.0, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_refused(fraction):
    with pytest.raises(ConfigError, match=r"--fraction must lie in \(0, 1\]"):
        RunConfig(mode="naive", fraction=fraction)


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="--mode must be one of federated, centralized, naive"):
        RunConfig(mode="solo")


def test_naive_baseline_writes_the_run_directory_per_epoch(tmp_path, pchmr_cache):
    cfg = RunConfig(
        mode="naive", fraction=0.5, epochs=2, num_train=32, num_test=8, batch_size=8, out=str(tmp_path / "n")
    )
    result = execute(cfg)
    rounds = result.run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["unit"] == "epoch" for r in rounds)
    assert [r["lr"] for r in rounds[1:]] == pytest.approx([1e-3, 5e-4])  # cosine over the 2 epochs
    assert result.final["unit"] == "epoch" and result.final["round"] == 2
    assert result.final["mpjpe_mm"] != result.final["round0"]["mpjpe_mm"]
    assert result.run_dir.lightning_checkpoint.exists()
    part = result.run_dir.partition.read_text()
    assert '"method": "naive"' in part and '"num_samples": 16' in part
