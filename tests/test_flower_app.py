"""The Flower app of the checkout (``flwr run .``, pchmr/cli/flower_app.py): its pyproject tables,
its run config read as ``pchmr run``'s flags, Flower's reporting off, and — slow — ``flwr run .``
against ``pchmr run`` with the same options and seed: identical metrics."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

from pchmr._flower_env import TELEMETRY_ENV, UPDATE_CHECK_ENV
from pchmr.cli.flower_app import (
    APP_KEYS,
    NOT_IN_APP,
    app_config_defaults,
    app_run_dir,
    config_from_run_config,
)
from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file
from pchmr.core.engine.federation.processes import deployment_env, free_port, live_in_group

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# one round of two clients on 16 images each, one local epoch (two optimizer steps); the CNN from scratch (no public
# pretraining in a fresh cache)
OPTIONS = dict(
    num_train=32, num_test=8, clients=2, per_round=2, rounds=1, local_epochs=1, batch_size=8, seed=7,
    encoder_weights="none",
)  # fmt: skip
RUN_TIMEOUT_SECONDS = 600.0  # ~70 s measured for each run
#: rounds.jsonl keys that measure time, not the training
TIMING_KEYS = {"wall_seconds", "round_seconds", "fit_seconds", "train_img_s", "client_img_s"}


# --------------------------------------------------------------------------------------
# the app's tables and run config
# --------------------------------------------------------------------------------------
def test_pyproject_declares_the_app_with_runconfigs_options_and_defaults():
    app = PYPROJECT["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "pchmr.cli.flower_app:server_app",
        "clientapp": "pchmr.cli.flower_app:client_app",
    }
    expected = app_config_defaults()
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in expected.items())
    assert app["config"] == expected, f"[tool.flwr.app.config] must read (pchmr/cli/flower_app.py):\n{lines}"
    assert expected["clients"] == RunConfig().clients and expected["num-train"] == "" and expected["logger"] == ""
    # Flower 1.41 would move a [tool.flwr.federations] table into ~/.flwr and comment it out here
    assert "federations" not in PYPROJECT["tool"]["flwr"]


def test_flower_validates_the_app_and_bundles_no_copy_of_pchmr():
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    _, warnings = load_and_validate(ROOT / "pyproject.toml", check_module=True)  # raises when invalid
    assert warnings == []
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT)))
    # the app's modules come from the installed pchmr: a bundled copy would shadow it on sys.path
    assert sorted(fab.namelist()) == [".info/CONTENT", "README.md", "pyproject.toml"]


def test_run_config_is_read_as_pchmr_runs_flags(tmp_path):
    run_config = dict(app_config_defaults())
    assert config_from_run_config(run_config) == RunConfig()  # the table's defaults are pchmr run's
    run_config.update(
        {
            "num-train": 32,
            "rounds": 1,
            "strategy": "fedprox",
            "strategy-option": "mu=0.01",
            "server-opt": "",
            "partition-option": "alpha=0.5 min-size=2",
            "partitioner": "lda",
            "dataset": "synthetic:/data/x",
            "freeze-encoder": False,
            "logger": "csv, tensorboard",
            "lr": 1,
            "out": "runs/demo",
        }
    )
    config = config_from_run_config(run_config)
    assert config == RunConfig(
        num_train=32,
        rounds=1,
        strategy="fedprox",
        strategy_options={"mu": 0.01},
        partitioner="lda",
        partition_options={"alpha": 0.5, "min-size": 2},
        dataset="synthetic",
        dataset_path="/data/x",
        freeze_encoder=False,
        loggers=("csv", "tensorboard"),
        lr=1,
        out="runs/demo",
    )
    assert app_run_dir(config, 42) == Path("runs/demo").absolute()
    assert app_run_dir(RunConfig(), 42) == Path("runs/flwr-42").absolute()
    # a pchmr config file and its scale, keys over it as flags over --config
    file = tmp_path / "exp.toml"
    file.write_text("rounds = 9\nclients = 4\nepochs = 3\n[scale.smoke]\nrounds = 2\nper_round = 1\n")
    config = config_from_run_config({"config": str(file), "scale": "smoke", "clients": 3})
    assert (config.rounds, config.clients, config.per_round) == (2, 3, 1)
    # a packaged paper config by reference, as pchmr run --config paper:NAME reads it
    ref = "paper:table02-fastmetro-s-fedprox-100-10-iid"
    config = config_from_run_config({"config": ref, "scale": "smoke", "rounds": 1})
    assert config == RunConfig.from_dict({**load_config_file(ref, scale="smoke"), "rounds": 1})
    assert (config.strategy, config.clients, config.rounds) == ("fedprox", 20, 1)


@pytest.mark.parametrize(
    ("run_config", "words"),
    [
        ({"rounds": 0}, "--rounds must be a whole number >= 1, got 0"),
        ({"clients": 2, "per-round": 3}, "--per-round 3 is more than --clients 2"),
        ({"backbone": 3}, "backbone must be a string"),
        ({"strategy-option": 3}, "strategy-option must be key=value pairs"),
        ({"strategy-option": "mu"}, "--strategy-option expects key=value"),
        ({"freeze-encoder": "yes"}, "freeze-encoder must be true or false"),
        ({"scale": "smoke"}, "scale needs config"),
        ({"rouds": 1}, "rouds are not pchmr options"),
        ({"engine": "deployment"}, "engine are not pchmr options"),
    ],
)
def test_a_bad_run_config_gets_pchmrs_refusal(run_config, words):
    with pytest.raises(ConfigError) as refused:
        config_from_run_config(run_config)
    assert words in str(refused.value)


def test_a_config_file_choosing_another_engine_or_a_baseline_is_refused(tmp_path):
    file = tmp_path / "exp.toml"
    for line, name in (('mode = "centralized"', "mode"), ('ray_address = "10.0.0.5:6379"', "ray_address")):
        file.write_text(line + "\n")
        with pytest.raises(ConfigError, match=f"sets {name} "):
            config_from_run_config({"config": str(file)})
    assert set(NOT_IN_APP) & set(app_config_defaults()) == set() and set(APP_KEYS) <= set(app_config_defaults())


# --------------------------------------------------------------------------------------
# Flower's telemetry and update check
# --------------------------------------------------------------------------------------
def _child_env(code: str, **env: str) -> dict[str, str]:
    """The Flower variables a child of ``python -c code`` sees, started in an environment without
    them plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in (TELEMETRY_ENV, UPDATE_CHECK_ENV)}
    child = (
        f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {(TELEMETRY_ENV, UPDATE_CHECK_ENV)!r}}}))"
    )
    probe = f"{code}\nimport subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)"
    done = subprocess.run(
        [sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_flower_reporting_is_off_in_pchmrs_processes_unless_the_user_turned_it_on():
    off = {TELEMETRY_ENV: "0", UPDATE_CHECK_ENV: "1"}
    assert _child_env("import pchmr") == off
    assert _child_env("from pchmr.core.engine.federation.processes import deployment_env") == off
    # flwr imported first: its telemetry module read the variable already; pchmr turns its copy off
    code = "import flwr.supercore.telemetry as t\nimport pchmr\nassert t.FLWR_TELEMETRY_ENABLED == '0', t.FLWR_TELEMETRY_ENABLED"
    assert _child_env(code) == off
    # the user's choice stands
    assert _child_env("import pchmr", FLWR_TELEMETRY_ENABLED="1") == {TELEMETRY_ENV: "1", UPDATE_CHECK_ENV: "1"}
    assert _child_env("import pchmr", FLWR_DISABLE_UPDATE_CHECK="0")[UPDATE_CHECK_ENV] == "0"


# --------------------------------------------------------------------------------------
# flwr run . against pchmr run
# --------------------------------------------------------------------------------------
def _superlink_pids(flwr_home: Path) -> list[int]:
    """Pids of the local SuperLinks ``flwr run`` started for ``flwr_home`` (their log file is in it)."""
    marker = str(flwr_home / "local-superlink")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any("flower-superlink" in part for part in cmdline) and any(marker in part for part in cmdline):
                pids.append(int(entry.name))
    return pids


def _stop_group(pgid: int, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while live_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def flower_app_env(tmp_path_factory, pchmr_cache):
    """``flwr``'s environment with a private FLWR_HOME and free ports for the local SuperLink that
    ``flwr run`` starts; that SuperLink (and the SuperExec it starts) is stopped at the end."""
    home = tmp_path_factory.mktemp("flwr-home")
    env = deployment_env(home)  # no runtime dependency installation, this venv's scripts first
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    env["PCHMR_CACHE_DIR"] = str(pchmr_cache)
    yield env, home
    started = _superlink_pids(home)
    for pid in started:
        _stop_group(pid)  # flwr starts it in a session of its own: its group is its pid
    deadline = time.monotonic() + 20  # the SuperExec follows its SuperLink within seconds
    while time.monotonic() < deadline and _alive_with(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]):
        time.sleep(0.5)
    assert started, "flwr run started no local SuperLink for this FLWR_HOME"
    assert not _alive_with(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]), (
        "the local SuperLink or its SuperExec outlived the test"
    )


def _alive_with(port: str) -> list[int]:
    """Pids of processes whose command line names 127.0.0.1:``port`` (the SuperLink, its SuperExec)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"127.0.0.1:{port}".encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _flwr_run(env: dict[str, str], cwd: Path, run_config: str, federation_config: str) -> tuple[str, float]:
    started = time.perf_counter()
    argv = [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "--run-config", run_config,
            "--federation-config", federation_config, "--stream"]  # fmt: skip
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    log = done.stdout + done.stderr
    (cwd / "flwr-run.log").write_text(log)
    assert done.returncode == 0, log[-4000:]
    return log, time.perf_counter() - started


def _run_config(options: dict) -> str:
    return " ".join(f"{key.replace('_', '-')}={json.dumps(value)}" for key, value in options.items())


@pytest.fixture(scope="module")
def both_runs(flower_app_env, tmp_path_factory):
    """The same options and seed through ``pchmr run`` and through ``flwr run .`` (its run directory
    left at the default, ``runs/flwr-<run id>`` in the SuperLink's working directory)."""
    env, _ = flower_app_env
    work = tmp_path_factory.mktemp("flwr-work")
    started = time.perf_counter()
    pchmr_dir = work / "pchmr-run"
    argv = [str(Path(sys.executable).parent / "pchmr"), "run", "--out", str(pchmr_dir)]
    for key, value in OPTIONS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    pchmr_seconds = time.perf_counter() - started
    # Flower's default client resources (2 CPUs): the clients still train with pchmr run's threads
    log, flwr_seconds = _flwr_run(env, work, _run_config(OPTIONS), f"num-supernodes={OPTIONS['clients']}")
    run_id = re.search(r"Successfully started run (\d+)", log).group(1)
    print(f"pchmr run {pchmr_seconds:.0f} s, flwr run . {flwr_seconds:.0f} s")
    return pchmr_dir, work / "runs" / f"flwr-{run_id}", log


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


@pytest.mark.slow
def test_flwr_run_gives_the_metrics_of_pchmr_run_with_the_same_options_and_seed(both_runs):
    pchmr_dir, flwr_dir, log = both_runs
    assert (flwr_dir / "final.json").is_file(), log[-4000:]
    ours, theirs = _records(pchmr_dir), _records(flwr_dir)
    assert [r["round"] for r in ours] == [0, 1] and ours[1]["clients"] == [0, 1] and ours[1]["optimizer_steps"] == 2
    print(json.dumps({"pchmr run": ours, "flwr run .": theirs}))
    assert ours == theirs  # every metric, loss, byte count and sampled client, exactly
    final = [json.loads((d / "final.json").read_text()) for d in (pchmr_dir, flwr_dir)]
    keys = ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck", "round0", "mean_pose_mpjpe_mm", "protocol")
    assert {k: final[0][k] for k in keys} == {k: final[1][k] for k in keys}
    models = [torch.load(d / "model.pt", weights_only=True) for d in (pchmr_dir, flwr_dir)]
    assert models[0].keys() == models[1].keys() and all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    configs = [json.loads((d / "config.json").read_text())["run"] for d in (pchmr_dir, flwr_dir)]
    assert {**configs[0], "out": None} == {**configs[1], "out": None}
    assert "pchmr: round 1/1" in log  # the ServerApp's progress reaches `flwr run --stream`


@pytest.mark.slow
def test_a_federation_of_another_size_than_clients_is_refused_before_any_data(flower_app_env, both_runs, tmp_path):
    env, _ = flower_app_env
    out = tmp_path / "refused"
    log, seconds = _flwr_run(env, tmp_path, _run_config({**OPTIONS, "out": str(out)}), "num-supernodes=3")
    assert "the federation has 3 SuperNodes (num-supernodes) but the run has clients=2" in log, log[-4000:]
    assert '--federation-config "num-supernodes=2 client-resources-num-cpus=1"' in log
    assert not out.exists()  # refused before the run directory was made
    print(f"refused in {seconds:.0f} s")
