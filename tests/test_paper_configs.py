"""configs/paper/: one config per experiment of the PCHMR paper's Tables 1-4 and 9-11.

Every file is loaded and validated at full scale and at ``--scale smoke`` without training:
RunConfig, plugin names, strategy options, the hyperparameters of the paper's Table 7 (checked
against a transcription kept here), and — at smoke scale — that its partition can be made on
labels distributed like the synthetic data's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file
from pchmr.core.engine.federation.common import build_strategy
from pchmr.core.engine.registry import get_registry
from pchmr.plugins.datasets.synthetic import SCENES, SOURCES
from pchmr.plugins.partitioners import cnn_cluster

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"
FILES = sorted(CONFIGS.glob("*.toml"))
MIXED = "h36m,up3d,coco,mpii,mpi-inf-3dhp"

#: The paper's Table 7, (setting, model) → (learning rate, epochs or rounds).
TABLE7 = {
    ("centralized", "fastmetro"): (1e-3, 60), ("centralized", "tore"): (1e-3, 60),
    ("naive", "fastmetro"): (1e-3, 60), ("naive", "tore"): (1e-3, 60),
    ("3dpw centralized", "fastmetro"): (1e-4, 20), ("3dpw centralized", "tore"): (1e-4, 20),
    ("10/10", "fastmetro"): (1e-3, 200), ("10/10", "tore"): (5e-4, 200),
    ("100/10", "fastmetro"): (1e-3, 2000), ("100/10", "tore"): (5e-4, 2000),
    ("1000/10", "fastmetro"): (1e-3, 6000), ("1000/10", "tore"): (1e-3, 6000),
    ("3dpw 100/10", "fastmetro"): (1e-4, 600), ("3dpw 100/10", "tore"): (1e-4, 600),
    ("3dpw 20/5", "fastmetro"): (1e-4, 200), ("3dpw 20/5", "tore"): (1e-4, 200),
}  # fmt: skip
#: Rows × models of each table (Tables 1, 2, 3, 4, 9, 10, 11 of the paper).
ROWS_PER_TABLE = {1: 4, 2: 12, 3: 2, 4: 3, 9: 5, 10: 5, 11: 8}
#: Upper bound of samples a smoke run trains on (keeps each under a few CPU minutes).
SMOKE_SAMPLE_BUDGET = 6000
FAKE_FEATURES = 16


def table_of(path: Path) -> int:
    return int(re.match(r"table(\d+)-", path.name).group(1))


def table7_key(cfg: RunConfig) -> str:
    if cfg.mode != "federated":
        return "3dpw centralized" if cfg.dataset == "3dpw" else cfg.mode
    return ("3dpw " if cfg.dataset == "3dpw" else "") + f"{cfg.clients}/{cfg.per_round}"


def load(path: Path, scale: str | None = None) -> RunConfig:
    return RunConfig.from_dict(load_config_file(path, scale=scale))


class NoiseImages:
    """``n`` samples whose ``image`` is seeded noise (3, 32, 32), made when read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"image": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))}


class LabelsOnly:
    """Labels distributed like the synthetic data's (source shares, 8 scenes) and noise images."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        shares = np.array([s.share for s in SOURCES])
        self.labels = {"source": rng.choice([s.name for s in SOURCES], size=n, p=shares / shares.sum()),
                       "scene": rng.choice(SCENES, size=n)}  # fmt: skip
        self.train = NoiseImages(n)


def test_every_paper_table_has_one_config_per_row_and_model():
    counts = {t: sum(table_of(p) == t for p in FILES) for t in ROWS_PER_TABLE}
    assert counts == {t: 2 * rows for t, rows in ROWS_PER_TABLE.items()}
    for path in FILES:
        assert load(path).backbone in path.name.replace("fastmetro-s", "fastmetro").replace("tore-s", "tore")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_full_scale_config_has_the_paper_hyperparameters(path):
    cfg = load(path)
    registry = get_registry()
    for kind, name in (("backbone", cfg.backbone), ("body_model", cfg.body_model), ("partitioner", cfg.partitioner),
                       ("strategy", cfg.strategy), *(("dataset", m) for m in cfg.dataset.split(","))):  # fmt: skip
        registry.info(kind, name)
    assert (cfg.variant, cfg.encoder, cfg.input_size, cfg.body_model) == ("S", "resnet50", 224, "smpl")
    lr, length = TABLE7[(table7_key(cfg), cfg.backbone)]
    assert cfg.lr == pytest.approx(lr)
    assert (cfg.rounds if cfg.mode == "federated" else cfg.epochs) == length
    if cfg.mode == "federated":
        build_strategy(cfg)  # strategy options are valid
    if cfg.partitioner == "lda" or cfg.partitioner == "cnn-cluster":
        assert cfg.dataset == MIXED, "the paper's skewed partitions split the mixed set by source"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_smoke_scale_is_cpu_sized_and_its_partition_can_be_made(path, monkeypatch):
    # cnn-cluster: noise features stand in for the CNN's (seconds instead of a minute); its
    # options, k-means and the cluster → client assignment still run.
    monkeypatch.setattr(cnn_cluster, "encode_images", lambda data, encoder, batch_size: np.random.default_rng(0).normal(
        size=(len(data.train), FAKE_FEATURES)))  # fmt: skip
    full, cfg = load(path), load(path, "smoke")
    assert (cfg.dataset, cfg.body_model, cfg.encoder, cfg.input_size) == ("synthetic", "anny", "small", 64)
    assert (cfg.backbone, cfg.mode, cfg.partitioner, cfg.strategy, cfg.local_epochs, cfg.fraction) == (
        full.backbone, full.mode, full.partitioner, full.strategy, full.local_epochs, full.fraction)  # fmt: skip
    if cfg.mode == "federated":
        trained = cfg.rounds * cfg.local_epochs * cfg.per_round * -(-cfg.num_train // cfg.clients)
        build_strategy(cfg)
        partitioner = get_registry().get("partitioner", cfg.partitioner)
        part = partitioner(LabelsOnly(cfg.num_train), cfg.clients, cfg.seed, dict(cfg.partition_options))
        assert part.num_clients == cfg.clients
    else:
        trained = cfg.epochs * round(cfg.fraction * cfg.num_train if cfg.mode == "naive" else cfg.num_train)
    assert 0 < trained <= SMOKE_SAMPLE_BUDGET


def test_scale_overrides_merge_tables_and_unknown_scales_are_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('rounds = 2000\npartition_options = { alpha = 0.1, label = "source" }\n'
                    '[scale.smoke]\nrounds = 3\npartition_options = { min-size = 1 }\n')  # fmt: skip
    assert load_config_file(path) == {"rounds": 2000, "partition_options": {"alpha": 0.1, "label": "source"}}
    smoke = load_config_file(path, scale="smoke")
    assert smoke == {"rounds": 3, "partition_options": {"alpha": 0.1, "label": "source", "min-size": 1}}
    with pytest.raises(ConfigError, match=r"has no scale 'tiny'; its scales are: smoke"):
        load_config_file(path, scale="tiny")
    path.write_text("rounds = 3\nscale = 5\n")
    with pytest.raises(ConfigError, match=r"'scale' must be a table of named override tables"):
        load_config_file(path)
