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
