"""``pchmr profile``: bad values exit 2 naming the option before anything loads; a profile prints
the Table-13 table with the device and writes it as JSON and Markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PCHMR = [sys.executable, "-m", "pchmr.cli.app"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*PCHMR, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


BAD_VALUES = [
    (["--images", "49"], "--images must be a whole number >= 50"),
    (["--input-size", "100"], "--input-size must be a multiple of 32 and >= 32"),
    (["--precision", "fp8"], "--precision must be one of 32-true, 16-mixed, bf16-mixed, got 'fp8'"),
    (["--backbone", "fastmetro", "--backbone", "tor"], "no backbone named 'tor'"),
    (["--body-model", "nosuch"], "no body model named 'nosuch'"),
    (["--uplink-mbps", "-1"], "--uplink-mbps must be a number > 0, got -1.0"),
]
if not torch.cuda.is_available():
    BAD_VALUES.append((["--accelerator", "gpu"], "--accelerator gpu: this machine has no CUDA GPU"))


@pytest.mark.parametrize("args, message", BAD_VALUES)
def test_bad_values_exit_2_naming_the_option_and_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("profile", *args, "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.replace("\n", " ")
    assert not (tmp_path / "p").exists()


def test_a_profile_prints_the_table_and_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "p"
    args = ("--backbone", "tore", "--images", "50", "--batch-size", "10", "--threads", "1", "--out", str(out))
    result = run_cli("profile", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "device: CPU (" in result.stdout and "1 torch threads" in result.stdout
    assert "tore-S" in result.stdout and "Table 13" in result.stdout
    payload = json.loads((out / "profile.json").read_text())
    assert [row["backbone"] for row in payload["rows"]] == ["tore"]
    row = payload["rows"][0]
    assert row["images"] == {"100": 50, "1000": 5} and row["threads"] == 1 and row["batch_size"] == 10
    assert payload["meta"]["command"] == "pchmr profile " + " ".join(args)
    assert payload["settings"]["images"] == 50 and len(payload["paper_table13"]) == 6
    markdown = (out / "profile.md").read_text()
    assert "| Model | Device | 100 partition (50 img) img/s | 100 partition (50 img) s |" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("| tore-S |"))
    assert f"| {row['img_s']['100']:.2f} | {row['seconds']['100']:.1f} |" in line
