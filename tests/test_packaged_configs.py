"""The config files pchmr ships (pchmr/configs/COLLECTION/NAME.toml) and their references, paper:NAME.

What an installed wheel holds is checked by tests/test_wheel.py; here the lookup, its refusals
and ``pchmr configs list/show``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file
from pchmr.core.engine.packaged_configs import (
    COLLECTIONS,
    PackagedConfigError,
    packaged_configs,
    resolve_config_path,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "pchmr" / "configs"


def flat(text: str) -> str:
    return " ".join(text.split())


def test_every_packaged_file_has_a_reference_that_resolves_to_it():
    files = sorted(PACKAGED.glob("*/*.toml"))
    assert {f.parent.name for f in files} == set(COLLECTIONS)
    listed = packaged_configs()
    assert [c.path.resolve() for c in listed] == [
        f.resolve() for f in sorted(files, key=lambda f: (f.parent.name, f.name))
    ]
    assert len([c for c in listed if c.ref.startswith("paper:")]) == 83
    for config in listed:
        assert resolve_config_path(config.ref) == config.path
        assert resolve_config_path(f"{config.ref}.toml") == config.path
        assert config.summary, f"{config.ref} says what it is"


def test_a_reference_loads_as_its_file_would():
    ref = "paper:table01-fastmetro-s-fedavg-10-10-iid"
    path = PACKAGED / "paper" / "table01-fastmetro-s-fedavg-10-10-iid.toml"
    assert load_config_file(ref, scale="smoke") == load_config_file(path, scale="smoke")
    config = RunConfig.from_dict(load_config_file(ref, scale="smoke"))
    assert (config.backbone, config.mode, config.dataset) == ("fastmetro", "federated", "synthetic")


def test_paths_stay_paths(tmp_path):
    mine = tmp_path / "paper:mine.toml"  # a file whose name looks like a reference, given with its folder
    mine.write_text("rounds = 2\n")
    assert resolve_config_path(mine) == mine
    assert load_config_file(mine) == {"rounds": 2}
    assert resolve_config_path("runs/x.toml") == Path("runs/x.toml")
    assert resolve_config_path("other:thing.toml") == Path("other:thing.toml")  # not a collection


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("paper:table01-fastmetro-s-fedavg-10", "did you mean paper:table01-fastmetro-s-fedavg-10-10-iid"),
        ("paper:nothing-like-it", "`pchmr configs list paper` lists the 83 paper configs pchmr ships"),
        ("paper:", "no packaged config 'paper:'"),
        ("paper:../sweeps/strategies", "no packaged config 'paper:../sweeps/strategies'"),
        ("sweeps:strategy", "did you mean sweeps:strategies"),
    ],
)
def test_a_reference_to_no_file_is_refused_naming_what_exists(ref, expected):
    with pytest.raises(PackagedConfigError, match="no packaged config") as caught:
        resolve_config_path(ref)
    assert expected in str(caught.value)
    with pytest.raises(ConfigError, match="no packaged config"):
        load_config_file(ref)


def test_pchmr_run_refuses_an_unknown_reference_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--config", "paper:table99-nothing", "--out", str(out)])
    assert result.exit_code == 2
    assert "no packaged config 'paper:table99-nothing'" in flat(result.output)
    assert not out.exists()


def test_configs_list_names_every_reference_with_what_it_is():
    result = CliRunner().invoke(app, ["configs", "list"], terminal_width=250)
    assert result.exit_code == 0, result.output
    for config in packaged_configs():
        assert config.ref in result.output
    assert "83 paper configs" not in result.output and f"{len(packaged_configs())} packaged configs" in result.output
    narrowed = CliRunner().invoke(app, ["configs", "list", "paper", "--match", "table08"], terminal_width=250)
    assert narrowed.exit_code == 0
    assert narrowed.output.count("paper:table08-") == 3 and "table01" not in narrowed.output
    sweeps = CliRunner().invoke(app, ["configs", "list", "sweeps"], terminal_width=250)
    assert "sweeps:strategies" in sweeps.output and "FedAvg vs FedProx vs FedOpt vs FedGH" in sweeps.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["configs", "list", "papers"],
            "no collection 'papers' of packaged configs; the collections are paper, settings, sweeps",
        ),
        (["configs", "list", "--match", "table99"], "no packaged config's reference contains 'table99'"),
        (
            ["configs", "show", "table01-tore-s-centralized"],
            "is not a packaged config's reference: give COLLECTION:NAME",
        ),
        (["configs", "show", "paper:table01-tore-s-central"], "did you mean paper:table01-tore-s-centralized"),
    ],
)
def test_configs_refusals_name_what_is_wrong(args, expected):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert expected in flat(result.output)


def test_configs_show_prints_the_file_and_where_it_is(tmp_path):
    ref = "paper:table04-tore-s-fedavg-20-5-natural"
    file = PACKAGED / "paper" / "table04-tore-s-fedavg-20-5-natural.toml"
    shown = CliRunner().invoke(app, ["configs", "show", ref])
    assert shown.exit_code == 0 and shown.output == file.read_text()
    copy = tmp_path / "mine.toml"  # the copy a user edits loads like the original
    copy.write_text(shown.output)
    assert load_config_file(copy, scale="smoke") == load_config_file(ref, scale="smoke")
    where = CliRunner().invoke(app, ["configs", "show", ref, "--path"])
    assert Path(where.output.strip()) == file
    # a fine-tuning file names its pretraining by reference, as its user runs it
    assert "paper:table12-tore-s-pretrain" in shown.output
