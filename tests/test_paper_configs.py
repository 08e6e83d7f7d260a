"""pchmr/configs/paper/ (``--config paper:NAME``): one config per experiment of the PCHMR paper's Tables 1-4 and 8-12.

Every file is loaded and validated at full scale and at ``--scale smoke`` without training:
RunConfig, plugin names and options, the hyperparameters of the paper's Table 7 (checked against
a transcription kept here), what the full scale starts from and trains on (against the table in
docs/paper.md), and — at smoke scale — that its partition can be made on labels distributed like
the synthetic data's. Full-scale files name files (the ImageNet weights, a pretraining run's
model); the tests run in a directory that holds stand-ins, except those checking the refusals.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.engine.config import RESNET50_IMAGENET_URL, ConfigError, RunConfig, load_config_file
from pchmr.core.engine.federation.common import build_strategy
from pchmr.core.engine.preparation import check_options
from pchmr.core.engine.profile import PAPER_IMAGES, PAPER_UPLINK_MBPS, ProfileSettings
from pchmr.core.engine.registry import get_registry
from pchmr.plugins.datasets.mixed import CATALOG
from pchmr.plugins.datasets.synthetic import SCENES, SOURCES
from pchmr.plugins.partitioners import cnn_cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pchmr" / "configs" / "paper"
PAPER_MD = ROOT / "docs" / "paper.md"
FILES = sorted(CONFIGS.glob("*.toml"))
MIXED = "h36m,up3d,coco,mpii,mpi-inf-3dhp"
PRETRAIN_SET = "h36m,up3d,coco,mpii,muco"
IMAGENET = "data/weights/resnet50-imagenet.pth"
SLUG = {"fastmetro": "fastmetro-s", "tore": "tore-s"}

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
#: Files per table: rows × models (Table 8 has TORE-S only; Table 12 adds the pretraining, its other
#: rows being Table 4's runs).
FILES_PER_TABLE = {1: 4 * 2, 2: 12 * 2, 3: 2 * 2, 4: 3 * 2, 8: 3, 9: 5 * 2, 10: 5 * 2, 11: 8 * 2, 12: 2}
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


def pretrain_dir(model: str, scale: str | None = None) -> str:
    return f"runs/paper{'-smoke' if scale else ''}/table12-{SLUG[model]}-pretrain"


@pytest.fixture
def paper_files(tmp_path, monkeypatch) -> Path:
    """A working directory holding what the configs name: the ImageNet weights file and the
    pretraining runs' model.pt (empty stand-ins: configs check that files exist, nothing reads them)."""
    (tmp_path / IMAGENET).parent.mkdir(parents=True)
    (tmp_path / IMAGENET).write_bytes(b"")
    for model in SLUG:
        for scale in (None, "smoke"):
            run = tmp_path / pretrain_dir(model, scale)
            run.mkdir(parents=True)
            (run / "model.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


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
    counts = {t: sum(table_of(p) == t for p in FILES) for t in FILES_PER_TABLE}
    assert counts == FILES_PER_TABLE
    assert len(FILES) == sum(FILES_PER_TABLE.values())
    for path in FILES:
        assert load_config_file(path)["backbone"] in path.name.replace("fastmetro-s", "fastmetro").replace(
            "tore-s", "tore"
        )


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_full_scale_config_has_the_paper_hyperparameters(path, paper_files):
    cfg = load(path)
    registry = get_registry()
    for kind, name in (("backbone", cfg.backbone), ("body_model", cfg.body_model), ("partitioner", cfg.partitioner),
                       ("strategy", cfg.strategy), *(("dataset", m) for m in cfg.dataset.split(","))):  # fmt: skip
        registry.info(kind, name)
    check_options(cfg)  # backbone, partitioner, strategy and privacy options are valid
    assert (cfg.variant, cfg.encoder, cfg.input_size, cfg.body_model) == ("S", "resnet50", 224, "smpl")
    lr, length = TABLE7[(table7_key(cfg), cfg.backbone)]
    assert cfg.lr == pytest.approx(lr)
    assert (cfg.rounds if cfg.mode == "federated" else cfg.epochs) == length
    assert (cfg.lr_schedule, cfg.batch_size) == ("constant", 16)
    if cfg.mode == "federated":  # one local epoch a round (Section 4.2.1), Table 10's E
        assert cfg.local_epochs == (int(re.search(r"-e(\d+)$", path.stem).group(1)) if table_of(path) == 10 else 1)
    if table_of(path) == 4:  # fine-tuning: the whole model from the pretraining run
        assert (cfg.init_from, cfg.encoder_weights) == (pretrain_dir(cfg.backbone), None)
        assert (CONFIGS / f"{Path(cfg.init_from).name}.toml").is_file()
    else:
        assert (cfg.init_from, cfg.encoder_weights, cfg.loads_encoder_weights) == (None, IMAGENET, True)
    assert cfg.encoder_frozen is (cfg.privacy == "dp"), "the CNN trains, except under DP-SGD (BatchNorm)"
    if cfg.mode == "federated":
        build_strategy(cfg)  # strategy options are valid
    if cfg.partitioner in ("lda", "cnn-cluster", "by-source") or (cfg.mode != "federated" and table_of(path) == 3):
        assert cfg.dataset == MIXED, "the paper's skewed partitions and Table 3 use the mixed set"
    if "," in cfg.dataset:
        assert cfg.eval_datasets == "h36m", "the paper evaluates its mixed-set rows on Human3.6M alone"
    assert dict(cfg.strategy_options) == {
        "fedavg": {}, "fedopt": {"server-opt": "adam", "server-learning-rate": 0.001}, "fedprox": {"proximal-mu": 0.01}
    }[cfg.strategy]  # fmt: skip
    if cfg.partitioner == "cnn-cluster":
        assert dict(cfg.partition_options) == {"clusters": 100, "encoder": "resnet50", "weights": IMAGENET}
    if cfg.partitioner == "natural":
        assert (dict(cfg.partition_options), cfg.clients, cfg.per_round) == ({"label": "scene"}, 20, 5)


def test_human36m_is_evaluated_on_protocol_2():
    assert all("protocol2" in layout.test for layout in CATALOG["h36m"])


def test_table8_privacy_settings_are_the_papers():
    cfgs = {p.stem.split("-")[3]: load_config_file(p) for p in FILES if table_of(p) == 8}
    assert set(cfgs) == {"fedavg", "secagg", "dp"}
    assert {c.get("privacy") for c in cfgs.values()} == {None, "secagg", "dp"}
    assert cfgs["secagg"]["privacy_options"] == {"backend": "crypten"}  # MPC with CrypTen, as the paper
    assert cfgs["dp"]["privacy_options"] == {"level": "example", "clip": 1e-6, "noise-multiplier": 1.0, "delta": 1e-6}
    base = {k: v for k, v in cfgs["fedavg"].items() if k not in ("privacy", "privacy_options", "freeze_encoder")}
    for name, cfg in cfgs.items():
        assert {k: v for k, v in cfg.items() if k in base} == base, f"{name} differs from FL beyond its privacy"
        assert (cfg["backbone"], cfg["clients"], cfg["per_round"], cfg["partitioner"]) == ("tore", 10, 10, "iid")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_smoke_scale_is_cpu_sized_and_its_partition_can_be_made(path, paper_files, monkeypatch):
    # cnn-cluster: noise features stand in for the CNN's (seconds instead of a minute); its
    # options, k-means and the cluster → client assignment still run.
    monkeypatch.setattr(cnn_cluster, "encode_images", lambda data, encoder, batch_size: np.random.default_rng(0).normal(
        size=(len(data.train), FAKE_FEATURES)))  # fmt: skip
    full, cfg = load(path), load(path, "smoke")
    assert (cfg.dataset, cfg.body_model, cfg.encoder, cfg.input_size) == ("synthetic", "anny", "small", 64)
    assert (cfg.lr_schedule, cfg.encoder_frozen, cfg.eval_datasets) == ("cosine", True, None)
    if full.init_from is None:
        assert (cfg.encoder_weights, cfg.init_from) == ("public", None)
    else:
        assert (cfg.encoder_weights, cfg.init_from) == (None, pretrain_dir(cfg.backbone, "smoke"))
    assert (cfg.backbone, cfg.mode, cfg.partitioner, cfg.strategy, cfg.local_epochs, cfg.fraction, cfg.privacy) == (
        full.backbone, full.mode, full.partitioner, full.strategy, full.local_epochs, full.fraction, full.privacy)  # fmt: skip
    check_options(cfg)
    if cfg.mode == "federated":
        trained = cfg.rounds * cfg.local_epochs * cfg.per_round * -(-cfg.num_train // cfg.clients)
        build_strategy(cfg)
        partitioner = get_registry().get("partitioner", cfg.partitioner)
        part = partitioner(LabelsOnly(cfg.num_train), cfg.clients, cfg.seed, dict(cfg.partition_options))
        assert part.num_clients == cfg.clients
    else:
        trained = cfg.epochs * round(cfg.fraction * cfg.num_train if cfg.mode == "naive" else cfg.num_train)
    assert 0 < trained <= SMOKE_SAMPLE_BUDGET


def test_the_smoke_scale_needs_no_weights_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in FILES:
        if table_of(path) != 4:  # the fine-tuning files need their smoke pretraining run
            assert load(path, "smoke").encoder_weights == "public"


def test_full_scale_without_the_imagenet_file_is_refused_saying_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load(CONFIGS / "table01-fastmetro-s-fedavg-10-10-iid.toml")
    message = str(info.value)
    assert f"no such file: {tmp_path / IMAGENET}" in message
    assert f"download {RESNET50_IMAGENET_URL}" in message and f"save it as {tmp_path / IMAGENET}" in message
    assert "pchmr downloads nothing" in message


@pytest.mark.parametrize("model", list(SLUG))
def test_fine_tuning_before_its_pretraining_run_is_refused_saying_to_run_it_first(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    path = CONFIGS / f"table04-{SLUG[model]}-fedavg-100-10-iid.toml"
    expected = f"run the training that makes it first, with --out {pretrain_dir(model)}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load(path)
    pretrain = CONFIGS / f"table12-{SLUG[model]}-pretrain.toml"
    assert f"--out {pretrain_dir(model)}" in pretrain.read_text(), "the pretraining file says where its run goes"
    assert f"paper:{pretrain.stem}" in path.read_text(), "the fine-tuning file names its pretraining"


# -- docs/paper.md -----------------------------------------------------------------------------
def docs_table() -> dict[str, dict[str, str]]:
    """docs/paper.md's table of every full-scale config: config stem → column → cell."""
    lines = PAPER_MD.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| config | paper row |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip().strip("|").split("|")), strict=True))
        rows[cells["config"].strip("`")] = cells
    return rows


def described(cfg: RunConfig) -> dict[str, str]:
    """The config as docs/paper.md's table writes it."""
    if cfg.mode == "federated":
        clients, length = f"{cfg.clients}/{cfg.per_round}", f"{cfg.rounds} rounds"
    else:
        clients = "centralized" if cfg.mode == "centralized" else f"naive {cfg.fraction * 100:g} %"
        length = f"{cfg.epochs} epochs"
    init = f"init-from {Path(cfg.init_from).name}" if cfg.init_from else ("imagenet" if cfg.encoder_weights == IMAGENET
                                                                          else str(cfg.encoder_weights))  # fmt: skip
    return {"encoder init": init, "trainable": "no" if cfg.encoder_frozen else "yes", "lr": f"{cfg.lr:.0e}".replace(
        "e-0", "e-"), "schedule": cfg.lr_schedule, "length": length, "clients": clients, "train data": cfg.dataset,
        "eval data": cfg.eval_datasets or cfg.dataset}  # fmt: skip


def test_docs_paper_table_lists_every_full_scale_config_as_it_is(paper_files):
    """Encoder initialisation, trainability, schedule, training and evaluation data of every
    full-scale config against docs/paper.md."""
    table = docs_table()
    assert sorted(table) == [p.stem for p in FILES], "docs/paper.md's table has one row per config file"
    for path in FILES:
        row = table[path.stem]
        assert {k: row[k] for k in described(load(path))} == described(load(path)), path.stem
        if row["encoder init"].startswith("init-from "):
            assert (CONFIGS / f"{row['encoder init'].removeprefix('init-from ')}.toml").is_file()


def test_docs_paper_table13_command_is_the_papers_setting():
    block = re.search(r"```bash\n(pchmr profile [^\n]*)\n```", PAPER_MD.read_text()).group(1)
    args = shlex.split(block)[2:]
    flags: dict[str, list[str]] = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        flags.setdefault(flag, []).append(value)
    assert flags["--backbone"] == ["fastmetro", "tore"]
    settings = ProfileSettings(encoder=flags["--encoder"][0], input_size=int(flags["--input-size"][0]),
                               batch_size=int(flags["--batch-size"][0]), images=int(flags["--images"][0]),
                               uplink_mbps=float(flags["--uplink-mbps"][0]))  # fmt: skip
    assert (settings.encoder, settings.input_size) == ("resnet50", 224)
    assert settings.counts() == PAPER_IMAGES == {"100": 4000, "1000": 400}
    assert settings.uplink_mbps == PAPER_UPLINK_MBPS == 37.4


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
