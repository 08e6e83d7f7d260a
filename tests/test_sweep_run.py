"""A real sweep through the command line: 2 rows (the centralized and the naive baseline, the
cheapest real runs) × 2 seeds at a matched budget, its report, and a rerun after one cell lost its
final.json and another its whole directory; failed cells."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app

PCHMR = [sys.executable, "-m", "pchmr.cli.app"]

# 16 samples at batch 8: the centralized baseline takes 2 optimizer steps an epoch, the naive one
# (half the samples) 1; a budget of 2 steps is 1 epoch of the one and 2 of the other.
SWEEP = """
seeds = [0, 1]
baseline = "central"

[options]
num_train = 16
num_test = 8
batch_size = 8
encoder_weights = "none"   # no public-encoder pretraining on a cold cache: the test stays a few tiny runs

[budget]
steps = 2

[rows.naive]
mode = "naive"
fraction = 0.5

[rows.central]
mode = "centralized"
"""


def pchmr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The ``pchmr`` console entry in a process of its own, in ``cwd``."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*PCHMR, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)


def pchmr_here(*args: str, cwd: Path) -> SimpleNamespace:
    """The same command line run in this process (no second start of torch and the body model)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow  # five tiny baseline runs and a resumed one: about a minute of CPU
def test_a_sweep_runs_reports_and_reruns_only_what_is_missing(tmp_path, pchmr_cache):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    # in a process of its own, through the console entry
    first = pchmr("sweep", "sweep.toml", "--out", "out", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 cells run, 0 skipped (finished before), 0 failed" in " ".join(first.stdout.split())
    out = tmp_path / "out"
    plan = json.loads((out / "sweep.json").read_text())
    assert [(c["path"], c["state"], c["steps"]) for c in plan["cells"]] == [
        ("naive/seed-0", "finished", 2), ("naive/seed-1", "finished", 2),
        ("central/seed-0", "finished", 2), ("central/seed-1", "finished", 2),
    ]  # fmt: skip
    assert [(r["name"], r["knob"], r["units"], r["steps"]) for r in plan["rows"]] == [
        ("naive", "epochs", 2, 2), ("central", "epochs", 1, 2)
    ]  # fmt: skip
    # every cell is an ordinary run directory at the resolved length
    naive = json.loads((out / "naive" / "seed-1" / "config.json").read_text())["run"]
    assert (naive["seed"], naive["epochs"], naive["mode"]) == (1, 2, "naive")
    assert [r["round"] for r in map(json.loads, (out / "naive/seed-1/rounds.jsonl").read_text().splitlines())] == [
        0,
        1,
        2,
    ]

    report = pchmr_here("report", "out", "--out", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "paired difference vs central" in report.stdout
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["baseline"] == "central" and data["interval"]["confidence"] == 0.95
    (table,) = data["tables"]
    assert table["protocol_label"].startswith("synthetic · anny-14")
    rows = {row["row"]: row for row in table["rows"]}
    for row in rows.values():
        mpjpe = row["metrics"]["mpjpe_mm"]
        assert row["n"] == 2 and row["planned_steps"] == 2 and row["realised_steps"] == {"0": 2, "1": 2}
        assert mpjpe["half_width"] is not None and mpjpe["low"] < mpjpe["mean"] < mpjpe["high"]
    diff = rows["naive"]["difference"]["metrics"]["mpjpe_mm"]
    by_seed = [rows["naive"]["metrics"]["mpjpe_mm"]["by_seed"][s] - rows["central"]["metrics"]["mpjpe_mm"]["by_seed"][s]
               for s in ("0", "1")]  # fmt: skip
    assert diff["seeds"] == [0, 1] and diff["values"] == pytest.approx(by_seed)
    assert "difference" not in rows["central"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| central (baseline) | Centralized | 2 | 2 |" in md and "**Paired difference vs central**" in md

    # a killed cell (no final.json) and a lost one (no directory); the other two are finished
    kept = {name: mtimes(out / name) for name in ("naive/seed-0", "central/seed-0")}
    resumed_before = mtimes(out / "naive/seed-1")
    old_final = json.loads((out / "naive/seed-1/final.json").read_text())
    (out / "naive/seed-1/final.json").unlink()
    shutil.rmtree(out / "central/seed-1")
    dry = pchmr_here("sweep", "sweep.toml", "--out", "out", "--dry-run", cwd=tmp_path)
    assert "2 finished (skipped), 1 to resume, 1 to run" in " ".join(dry.stdout.split())
    second = pchmr_here("sweep", "sweep.toml", "--out", "out", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    text = " ".join(second.stdout.split())
    assert "2 cells run, 2 skipped (finished before), 0 failed" in text
    assert "naive/seed-0 finished before: skipped" in text and "central/seed-0 finished before: skipped" in text
    assert {name: mtimes(out / name) for name in kept} == kept, "a finished cell was touched"
    # resumed from its checkpoint at the last epoch, not trained again: same partition, config, checkpoint, numbers
    resumed_after = mtimes(out / "naive/seed-1")
    for name in ("partition.json", "config.json", "checkpoints/last.ckpt"):
        assert resumed_after[name] == resumed_before[name], name
    resumed = json.loads((out / "naive/seed-1/final.json").read_text())
    assert resumed["mpjpe_mm"] == old_final["mpjpe_mm"] and resumed["round"] == 2
    assert (out / "central/seed-1/final.json").is_file()
    states = [c["state"] for c in json.loads((out / "sweep.json").read_text())["cells"]]
    assert states == ["finished"] * 4

    # the sweep file changed under a finished cell: refused before anything runs
    (tmp_path / "sweep.toml").write_text(SWEEP.replace("batch_size = 8", "batch_size = 8\nlr = 0.002"))
    changed = pchmr_here("sweep", "sweep.toml", "--out", "out", cwd=tmp_path)
    assert changed.returncode == 2
    assert "cell naive/seed-0" in changed.stderr and "lr: 0.001 saved, 0.002 now" in " ".join(changed.stderr.split())


def test_failed_cells_are_recorded_named_and_exit_1(tmp_path, pchmr_cache):
    # the dataset plugin exists (the plan accepts it), its file does not: each cell fails as it loads the data
    (tmp_path / "sweep.toml").write_text(f"""
seeds = [0, 1]
[options]
mode = "centralized"
epochs = 1
[rows.broken]
dataset = "spin-npz"
dataset_path = "{tmp_path / 'missing.npz'}"
""")  # fmt: skip
    result = pchmr_here("sweep", "sweep.toml", "--out", "out", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "2 of 2 cells failed: broken/seed-0 (" in message and "broken/seed-1 (" in message
    assert "missing.npz" in message and "retries them" in message
    cells = json.loads((tmp_path / "out" / "sweep.json").read_text())["cells"]
    assert [c["state"] for c in cells] == ["failed", "failed"] and all("missing.npz" in c["error"] for c in cells)
    assert "Traceback" in (tmp_path / "out" / "sweep.log").read_text()
