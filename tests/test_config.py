"""Option validation happens before anything runs, with messages naming the option."""

import pytest

from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file


def test_defaults_are_the_embedded_default_run():
    cfg = RunConfig()
    assert (cfg.backbone, cfg.body_model, cfg.dataset, cfg.strategy, cfg.partitioner) == (
        "fastmetro",
        "anny",
        "synthetic",
        "fedavg",
        "iid",
    )
    assert cfg.per_round <= cfg.clients


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"per_round": 0}, r"--per-round must be a whole number >= 1, got 0"),
        ({"clients": 4, "per_round": 5}, r"--per-round 5 is more than --clients 4"),
        ({"rounds": -1}, r"--rounds must be a whole number >= 1"),
        ({"lr": float("nan")}, r"--lr must be a positive number"),
        ({"input_size": 50}, r"--input-size must be a multiple of 32"),
        ({"clients": True}, r"--clients must be a whole number"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes)


def test_round_trip_through_dict_and_unknown_keys_refused():
    cfg = RunConfig(clients=20, per_round=4, strategy_options={"proximal-mu": 0.1})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown config keys \['colour'\]"):
        RunConfig.from_dict({"colour": "red"})


def test_config_file_toml_with_kebab_keys(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('clients = 100\nper-round = 10\nstrategy = "fedavg"\n')
    cfg = RunConfig.from_dict(load_config_file(path))
    assert (cfg.clients, cfg.per_round) == (100, 10)
    bad = tmp_path / "bad.toml"
    bad.write_text("clients = = 3")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_eval_datasets_name_members_of_the_mixed_dataset():
    cfg = RunConfig(dataset="h36m,up3d,coco", eval_datasets="h36m")
    assert cfg.eval_datasets == "h36m"
    assert RunConfig(dataset="h36m,coco", eval_datasets="all").eval_datasets is None  # TOML's way to say unset
    with pytest.raises(ConfigError, match="--eval-datasets must name distinct members of --dataset h36m,coco.*: 3dpw"):
        RunConfig(dataset="h36m,coco", eval_datasets="3dpw")
    with pytest.raises(ConfigError, match="--eval-datasets must name distinct members"):
        RunConfig(dataset="h36m,coco", eval_datasets="h36m,h36m")


def test_missing_model_files_are_refused_naming_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no such file: .*resnet50-imagenet\.pth\)\. The resnet50 encoder starts from "
                       r"torchvision's ImageNet ResNet-50 state dict: download https://download\.pytorch\.org/models/"
                       r"resnet50-0676ba61\.pth .*pchmr downloads nothing, and save it as .*resnet50-imagenet\.pth"):  # fmt: skip
        RunConfig(encoder="resnet50", input_size=224, encoder_weights="data/weights/resnet50-imagenet.pth")
    with pytest.raises(ConfigError, match="does not exist yet: this run fine-tunes a trained model, so run the training "
                       "that makes it first, with --out runs/pre"):  # fmt: skip
        RunConfig(init_from="runs/pre")
    (tmp_path / "runs" / "pre").mkdir(parents=True)
    (tmp_path / "runs" / "pre" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"that run has not finished .* `pchmr run --resume runs/pre`"):
        RunConfig(init_from="runs/pre")
    (tmp_path / "runs" / "pre" / "model.pt").write_bytes(b"")
    assert RunConfig(init_from="runs/pre").init_from == "runs/pre"


def test_a_saved_config_reads_without_the_files_it_names(tmp_path):
    """A report, a client on another node or a resume reads config.json; the weights and the model the
    run started from served when it started and need not be there any more."""
    saved = RunConfig(encoder="resnet50", input_size=224, encoder_weights="public").to_dict()
    saved.update(encoder_weights=str(tmp_path / "gone.pth"), init_from=str(tmp_path / "gone-run"))
    cfg = RunConfig.from_saved(saved)
    assert (cfg.encoder_weights, cfg.init_from) == (str(tmp_path / "gone.pth"), str(tmp_path / "gone-run"))
    with pytest.raises(ConfigError, match="--init-from must be a run directory"):
        RunConfig.from_dict(saved)  # a new run still checks them
