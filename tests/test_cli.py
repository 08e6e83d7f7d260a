"""The command line refuses bad input before any work, naming what was wrong."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PCHMR = [sys.executable, "-m", "pchmr.cli.app"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*PCHMR, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_unknown_backbone_lists_the_registered_ones(tmp_path):
    result = run_cli("run", "--backbone", "nosuch", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode != 0
    assert "no backbone named 'nosuch'" in result.stderr
    assert "registered: fastmetro" in result.stderr and "(pchmr 0.1.0)" in result.stderr
    assert not (tmp_path / "r").exists(), "nothing may be written for a refused run"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--per-round", "0"], "--per-round must be a whole number >= 1, got 0"),
        (["--clients", "3", "--per-round", "5"], "--per-round 5 is more than --clients 3"),
        (["--strategy", "fedavgg"], "did you mean 'fedavg'"),
        (["--dataset", "nosuch:/tmp/x"], "no dataset named 'nosuch'"),
    ],
)
def test_bad_option_values_are_refused(tmp_path, args, message):
    result = run_cli("run", *args, "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.replace("\n", " ")


def test_plugins_lists_every_builtin_with_its_distribution(tmp_path):
    result = run_cli("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for kind, name in [
        ("backbone", "fastmetro"),
        ("body model", "anny"),
        ("dataset", "synthetic"),
        ("partitioner", "iid"),
        ("strategy", "fedavg"),
    ]:
        line = next((row for row in out.splitlines() if f" {name} " in row), None)
        assert line is not None, f"{name} missing from:\n{out}"
        assert kind in line and "pchmr 0.1.0" in line


def test_resume_of_a_directory_that_is_not_a_run_is_refused(tmp_path):
    result = run_cli("run", "--resume", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "is not a pchmr run directory: config.json is missing" in result.stderr


def test_plugins_options_prints_the_declared_options_of_a_plugin(tmp_path):
    result = run_cli("plugins", "--options", "fedprox", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "proximal-mu" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][:4] == ["proximal-mu", "float", "0.01", ">= 0"]
    assert "--strategy-option key=value" in result.stdout
    assert "takes no options" in run_cli("plugins", "--options", "iid", cwd=tmp_path).stdout
    ambiguous = run_cli("plugins", "--options", "secagg", cwd=tmp_path)
    assert ambiguous.returncode == 2 and "several kinds (strategy, privacy); add --kind" in ambiguous.stderr
    privacy = run_cli("plugins", "--options", "secagg", "--kind", "privacy", cwd=tmp_path)
    assert privacy.returncode == 0 and "reconstruction-threshold" in privacy.stdout
    unknown = run_cli("plugins", "--options", "fedprx", cwd=tmp_path)
    assert unknown.returncode == 2 and "did you mean 'fedprox' (strategy)?" in unknown.stderr


def test_a_bad_plugin_option_ends_the_run_with_exit_2_before_any_data_are_read(tmp_path):
    # the dataset file does not exist: reading data first would fail on it, not on the option
    args = ["--dataset", f"spin-npz:{tmp_path / 'missing.npz'}", "--backbone", "tore"]
    result = run_cli("run", *args, "--backbone-option", "keep_ration=0.5", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "tore backbone has no option 'keep_ration' (did you mean 'keep_ratio'?)" in message
    assert "missing.npz" not in message and not (tmp_path / "r").exists()
    out = ["--out", str(tmp_path / "f")]
    fedprox = run_cli("run", "--strategy", "fedprox", "--strategy-option", "proximal-mu=-1", *out, cwd=tmp_path)
    assert fedprox.returncode == 2 and not (tmp_path / "f").exists()
    assert "fedprox strategy option 'proximal-mu' must be a number >= 0, got -1" in fedprox.stderr
