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
