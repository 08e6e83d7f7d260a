"""``pchmr partition``: the partition file, its plots and summary, and bad input refused before any work.

Runs the real command (typer's CliRunner on the pchmr app) on a small synthetic dataset
(48 training samples, prepared once per seed into the session cache).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.contracts.partition import load_partition
from pchmr.report import gini

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--num-train", "48", "--num-test", "16"]


@pytest.fixture(autouse=True)
def _cache(pchmr_cache):
    return pchmr_cache


def invoke(*args: str):
    return CliRunner().invoke(app, ["partition", *SMALL, *args])


def lda_partition(out: Path, seed: int):
    result = invoke("--partitioner", "lda", "--partition-option", "alpha=0.5", "--partition-option", "min-size=1",
                    "--clients", "4", "--seed", str(seed), "--out", str(out), "--no-plots")  # fmt: skip
    assert result.exit_code == 0, result.output
    return (out / "partition.json").read_bytes()


def test_same_seed_gives_the_same_bytes_and_another_seed_another_partition(tmp_path):
    first = lda_partition(tmp_path / "a", seed=3)
    assert lda_partition(tmp_path / "b", seed=3) == first
    other = lda_partition(tmp_path / "c", seed=4)
    assert other != first
    a, c = load_partition(tmp_path / "a" / "partition.json"), load_partition(tmp_path / "c" / "partition.json")
    assert any(not np.array_equal(x, y) for x, y in zip(a.clients, c.clients))
    assert not (tmp_path / "a" / "partition-source-histogram.png").exists()  # --no-plots


def test_writes_histogram_size_tail_and_a_summary_that_matches_the_file(tmp_path):
    result = invoke("--partitioner", "by-source", "--clients", "6", "--seed", "3", "--label", "scene",
                    "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("partition-scene-histogram.png", "partition-sizes.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    part = load_partition(tmp_path / "partition.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sizes"] == part.sizes().tolist() and summary["num_samples"] == 48
    assert summary["gini"] == pytest.approx(gini(part.sizes()), abs=1e-6)
    assert summary["entropy_bits"]["source"] == pytest.approx(0.0)  # by-source: one source per client
    assert summary["max_entropy_bits"]["source"] == pytest.approx(2.0)  # 4 sources
    assert "Gini of client sizes" in result.output


def test_cnn_cluster_also_plots_the_feature_embedding(tmp_path):
    result = invoke("--partitioner", "cnn-cluster", "--clients", "3", "--seed", "3", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "partition-embedding.png").read_bytes()[:8] == PNG_MAGIC
    assert load_partition(tmp_path / "partition.json").params["clusters"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--partitioner", "natural", "--clients", "20"],
            r"natural partition by 'scene' has \d values; --clients must be \d, got 20",
        ),
        (
            ["--partitioner", "lda", "--partition-option", "alpha=0"],
            r"lda partitioner option 'alpha' must be a number > 0, got 0",
        ),
        (["--partitioner", "lda", "--partition-option", "alpha=-1.5"], r"'alpha' must be a number > 0, got -1.5"),
        (
            ["--partitioner", "lda", "--partition-option", "label=colour"],
            r"lda partitioner option 'label' must be a label of this dataset \(action, scene, source, subject\), "
            r"got 'colour'",
        ),
        (["--label", "colour"], r"--label 'colour' is not a label of this dataset; choose one of: action, scene"),
        (["--partitioner", "ldaa"], r"no partitioner named 'ldaa'"),
        (["--scale", "smoke"], r"--scale needs --config"),
    ],
    ids=[
        "natural-too-many-clients",
        "lda-alpha-0",
        "lda-alpha-negative",
        "unknown-label-option",
        "unknown-plot-label",
        "unknown-partitioner",
        "scale-without-config",
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, args, message):
    result = invoke(*args, "--seed", "3", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "out").exists()


def test_run_refuses_a_bad_partition_before_training(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", *SMALL, "--seed", "3", "--partitioner", "lda", "--partition-option",
                                      "alpha=0", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "lda partitioner option 'alpha' must be a number > 0, got 0" in " ".join(result.output.split())
    assert not (out / "rounds.jsonl").exists() and not (out / "final.json").exists()


def test_paper_config_at_smoke_scale_checks_natural_clients_against_the_scenes_present(tmp_path):
    config = "paper:table04-fastmetro-s-fedavg-20-5-natural"  # the packaged file, by reference
    base = ["partition", "--config", config, "--scale", "smoke", *SMALL, "--seed", "3", "--no-plots"]
    # the smoke scale asks for 8 clients (8 scenes); these 48 samples show only 6 of them
    refused = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2
    assert "natural partition by 'scene' has 6 values; --clients must be 6, got 8" in " ".join(refused.output.split())
    made = CliRunner().invoke(app, [*base, "--clients", "6", "--out", str(tmp_path / "b")])
    assert made.exit_code == 0, made.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["method"] == "natural" and summary["num_clients"] == 6
    assert summary["entropy_bits"]["scene"] == pytest.approx(0.0)  # one scene per client
