"""``pchmr sweep``: the sweep file, the matched budget, the cells' states, failures, and the report
of a sweep directory (mean ± 95 % t-interval, paired differences). No test here trains a model:
tests/test_sweep_run.py runs a real sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.sweep import (
    PLAN_FILE,
    Cell,
    SweepError,
    cell_state,
    check_cells,
    load_sweep,
    run_sweep,
    write_sweep_json,
)
from pchmr.report.stats import t_quantile
from pchmr.report.sweep import load_sweep_report, report_dict, to_csv, to_latex, to_markdown

PROTOCOL = {"alignment": "mid-hip (root)", "body_model": "anny", "dataset": "synthetic", "ground_truth": "real",
            "joint_set": "anny-14"}  # fmt: skip

# 48 samples over 4 clients at batch 4: 12 samples, 3 steps per client epoch
COMMON = """
[options]
num_train = 48
num_test = 8
clients = 4
batch_size = 4
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def output(result) -> str:
    try:
        text = result.output + result.stderr
    except ValueError:  # stderr mixed into output
        text = result.output
    return " ".join(text.split())


# -- the budget ----------------------------------------------------------------------------
def test_rows_with_different_local_epochs_and_clients_per_round_get_equal_steps(tmp_path):
    sweep = write(tmp_path, """
seeds = [0, 1]
""" + COMMON + """
[budget]
steps = 72
knob = "rounds"
[rows.k2-e1]
per_round = 2
local_epochs = 1
[rows.k2-e3]
per_round = 2
local_epochs = 3
[rows.k4-e2]
per_round = 4
local_epochs = 2
[rows.central]
mode = "centralized"
[rows.naive]
mode = "naive"
fraction = 0.25
""")  # fmt: skip
    plan = load_sweep(sweep)
    rows = {row.name: row for row in plan.rows}
    assert {name: row.steps for name, row in rows.items()} == dict.fromkeys(rows, 72)
    # rounds × k × E × ⌈48/(4·4)⌉ = 72
    assert [rows[n].config.rounds for n in ("k2-e1", "k2-e3", "k4-e2")] == [12, 4, 3]
    assert [rows[n].knob for n in ("k2-e1", "k2-e3", "k4-e2")] == ["rounds"] * 3
    # baselines: epochs × ⌈samples / batch⌉: 48 / 4 = 12 steps, naive 12 samples / 4 = 3 steps
    assert (rows["central"].knob, rows["central"].config.epochs) == ("epochs", 6)
    assert rows["naive"].config.epochs == 24
    assert rows["k2-e3"].explain == (
        "4 rounds × 2 clients × 3 local epochs × 3 steps (⌈48/4⌉ = 12 samples per client at batch 4) = 72"
    )
    assert plan.budget is not None and plan.budget.total == 72
    assert [c.name for c in plan.cells][:3] == ["k2-e1/seed-0", "k2-e1/seed-1", "k2-e3/seed-0"]


def test_local_epochs_as_the_knob(tmp_path):
    sweep = write(tmp_path, """
seeds = [0]
""" + COMMON + """
[budget]
steps = 36
knob = "local_epochs"
[rows.short]
rounds = 2
per_round = 2
[rows.long]
rounds = 6
per_round = 2
""")  # fmt: skip
    rows = {row.name: row for row in load_sweep(sweep).rows}
    assert (rows["short"].config.local_epochs, rows["long"].config.local_epochs) == (3, 1)
    assert rows["short"].knob == "local_epochs" and rows["short"].steps == rows["long"].steps == 36


def test_a_budget_no_row_can_meet_exactly_is_refused_naming_the_row(tmp_path):
    sweep = write(tmp_path, """
seeds = [0]
""" + COMMON + """
[budget]
steps = 30
[rows.fine]
per_round = 2
local_epochs = 1
[rows.coarse]
per_round = 4
local_epochs = 1
""")  # fmt: skip
    with pytest.raises(SweepError) as info:
        load_sweep(sweep)
    message = str(info.value)
    assert "[budget] of 30 client optimizer steps cannot be met exactly by row 'coarse'" in message
    assert "one round of it takes 12 client optimizer steps" in message
    assert "nearest: 24 = 2 rounds, 36 = 3 rounds" in message


def test_the_budget_of_a_named_row_and_an_unknown_training_set_size(tmp_path):
    # no num_train: the size is unknown, but rows on the same data, clients and batch share ⌈n/(N·B)⌉
    sweep = write(tmp_path, """
seeds = [0]
[options]
clients = 10
per_round = 2
[budget]
steps = "e1"
[rows.e1]
rounds = 12
local_epochs = 1
[rows.e2]
local_epochs = 2
[rows.k4]
per_round = 4
local_epochs = 3
""")  # fmt: skip
    rows = {row.name: row for row in load_sweep(sweep).rows}
    assert [rows[n].config.rounds for n in ("e1", "e2", "k4")] == [12, 6, 2]
    assert rows["e2"].steps is None and "⌈n/80⌉ steps" in rows["e2"].explain
    # a row on other clients cannot be matched without the size
    sweep.write_text(sweep.read_text() + "\n[rows.n20]\nclients = 20\n")
    with pytest.raises(SweepError, match=r"row 'n20' leaves num_train unset .* \[budget\] train_samples"):
        load_sweep(sweep)
    # ... and can with it
    sweep.write_text(sweep.read_text().replace('steps = "e1"', 'steps = "e1"\ntrain_samples = 400'))
    rows = {row.name: row for row in load_sweep(sweep).rows}
    # e1: 12 rounds × 2 clients × 1 epoch × ⌈400/(10·8)⌉ = 120; n20: 2 clients × 2 epochs × ⌈400/(20·8)⌉ = 12 a round
    assert rows["e1"].steps == rows["n20"].steps == 120 and rows["n20"].config.rounds == 10


def test_a_row_may_not_set_what_the_budget_chooses(tmp_path):
    sweep = write(tmp_path, """
seeds = [0]
""" + COMMON + """
[budget]
steps = 24
[rows.a]
per_round = 2
[rows.b]
per_round = 2
rounds = 5
""")  # fmt: skip
    with pytest.raises(SweepError, match=r"row 'b' sets rounds, which \[budget\] chooses for it"):
        load_sweep(sweep)


def test_without_a_budget_rows_run_as_written(tmp_path):
    sweep = write(tmp_path, """
seeds = [0]
""" + COMMON + """
[rows.a]
rounds = 2
per_round = 2
local_epochs = 1
[rows.b]
rounds = 3
per_round = 2
local_epochs = 1
""")  # fmt: skip
    plan = load_sweep(sweep)
    assert plan.budget is None and [(r.knob, r.steps) for r in plan.rows] == [(None, 12), (None, 18)]


# -- the file ---------------------------------------------------------------------------------
def test_base_file_rows_config_files_options_and_scale_layer_in_order(tmp_path):
    (tmp_path / "base.toml").write_text(
        "lr = 0.01\nbatch_size = 4\nnum_train = 48\nnum_test = 8\nclients = 4\n[scale.cpu]\nlr = 0.02\n"
    )
    (tmp_path / "row.toml").write_text('strategy = "fedprox"\nlr = 0.03\nrounds = 7\n')
    sweep = write(tmp_path, """
base = "base.toml"
seeds = [0, 1, 2]
[options]
eval_every = 2
[rows.plain]
[rows.from-file]
config = "row.toml"
[rows.from-file-and-own]
config = "row.toml"
lr = 0.04
[scale.cpu]
seeds = [5]
options = { eval_every = 3 }
""")  # fmt: skip
    rows = {row.name: row.config for row in load_sweep(sweep).rows}
    assert [rows[n].lr for n in ("plain", "from-file", "from-file-and-own")] == [0.01, 0.03, 0.04]
    assert rows["from-file"].strategy == "fedprox" and rows["from-file"].rounds == 7
    assert rows["plain"].eval_every == 2
    scaled = load_sweep(sweep, scale="cpu")
    assert scaled.seeds == (5,) and scaled.scale == "cpu"
    assert {r.name: (r.config.lr, r.config.eval_every) for r in scaled.rows}["plain"] == (0.02, 3)
    with pytest.raises(
        SweepError, match=r"no scale 'gpu' in the sweep file or the config files it names; scales there: cpu"
    ):
        load_sweep(sweep, scale="gpu")


@pytest.mark.parametrize(
    "top, tables, message",
    [
        ("", "[rows.a]\nstrategy_option = 1\n", "row 'a': unknown config keys ['strategy_option']"),
        ("", "[rows.a]\nstrategy = 'fedprox'\nstrategy_options = { proximal-mu = -1 }\n",
         "row 'a': fedprox strategy option 'proximal-mu' must be a number >= 0, got -1"),
        ("", "[rows.a]\nstrategy = 'fedprx'\n", "row 'a': no strategy named 'fedprx'"),
        ("", "[rows.a]\nper_round = 20\n", "row 'a': --per-round 20 is more than --clients 4"),
        ("", "[rows.a]\nseed = 3\n", "row 'a' sets seed, which the sweep sets for every cell itself"),
        ("", "[rows.'a b']\n", "row 'a b': a row's name names its directory"),
        ("seed = [1]\n", "[rows.a]\n", "unknown key 'seed' (did you mean 'seeds'?)"),
        ("baseline = 'fedavg'\n", "[rows.a]\n", "baseline 'fedavg' is not a row; its rows are: a"),
        ("", "[budget]\nsteps = 'b'\n[rows.a]\n", "[budget] steps = 'b' is not a row"),
        ("", "[budget]\nsteps = 12\nknob = 'epochs'\n[rows.a]\n", "[budget] knob must be one of rounds, local_epochs"),
        ("", "", "has no rows"),
    ],
)  # fmt: skip
def test_a_bad_sweep_file_exits_2_naming_what_is_wrong(tmp_path, top, tables, message):
    seeds = "" if top.startswith("seed =") else "seeds = [0]\n"
    sweep = write(tmp_path, seeds + top + COMMON + tables)
    result = CliRunner().invoke(app, ["sweep", str(sweep), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, output(result)
    assert message in output(result)
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused sweep"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[rows.a]\n", "has no seeds; give the seeds every row runs with, e.g. seeds = [0, 1, 2]"),
        ("seeds = []\n[rows.a]\n", "seeds must be a non-empty list of whole numbers >= 0"),
        ("seeds = [1, 1]\n[rows.a]\n", "seeds lists a seed twice: [1, 1]"),
        ("seeds = [0]\nbase = 'missing.toml'\n[rows.a]\n", "missing.toml does not exist"),
        ("seeds = [0\n", "is not valid TOML"),
        ("[options]\nlr = 0.01\nseeds = [0]\n[rows.a]\n", "a seeds key sits inside [options]: in TOML, top-level"),
    ],
)  # fmt: skip
def test_seeds_and_files_are_checked(tmp_path, text, message):
    result = CliRunner().invoke(app, ["sweep", str(write(tmp_path, text)), "--dry-run"])
    assert result.exit_code == 2, output(result)
    assert message in output(result)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    sweep = write(tmp_path, """
seeds = [0, 1]
baseline = "a"
""" + COMMON + """
[budget]
steps = 24
[rows.a]
per_round = 2
local_epochs = 1
[rows.b]
mode = "centralized"
""")  # fmt: skip
    result = CliRunner().invoke(app, ["sweep", str(sweep), "--out", str(tmp_path / "out"), "--dry-run"],
                                env={"COLUMNS": "250"})  # fmt: skip
    assert result.exit_code == 0, output(result)
    text = output(result)
    assert "a (baseline)" in text and "FedAvg 4/2 IID" in text and "rounds = 4" in text and "epochs = 2" in text
    assert "budget: 24 client optimizer steps per cell" in text
    assert "2 rows × 2 seeds [0, 1] = 4 cells: 0 finished (skipped), 0 to resume, 4 to run" in text
    assert not (tmp_path / "out").exists()
    assert "--out DIR is required" in output(CliRunner().invoke(app, ["sweep", str(sweep)]))


# -- cells --------------------------------------------------------------------------------------
def fake_cell(out: Path, config: RunConfig, cell: Cell, values: tuple[float, float, float, float] | None) -> Path:
    """A cell's run directory by hand: config.json, rounds.jsonl and (with ``values``: MPJPE,
    PA-MPJPE, MPVPE, PCK) final.json."""
    path = out / cell.path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"run": config.to_dict(), "protocol": PROTOCOL}))
    if values is None:
        return path
    keys = ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck")
    record = {"round": 1, "unit": "round", **dict(zip(keys, values)), "wall_seconds": 1.0}
    (path / "rounds.jsonl").write_text(json.dumps(record) + "\n")
    final = {**record, "round0": dict(zip(keys, values)), "protocol": PROTOCOL, "bytes_sent": 0, "bytes_received": 0}
    (path / "final.json").write_text(json.dumps(final))
    return path


SMALL = (
    """
seeds = [0, 1, 2]
baseline = "fedavg"
"""
    + COMMON
    + """per_round = 2
local_epochs = 1
[budget]
steps = 12
[rows.fedavg]
[rows.fedprox]
strategy = "fedprox"
"""
)


def test_cell_states_and_a_changed_config_refused_before_anything_runs(tmp_path):
    plan = load_sweep(write(tmp_path, SMALL))
    out = tmp_path / "out"
    cells = plan.cells
    fake_cell(out, plan.cell_config(cells[0], out), cells[0], (1.0, 1.0, 1.0, 0.5))
    fake_cell(out, plan.cell_config(cells[1], out), cells[1], None)
    assert [cell_state(plan, c, out) for c in cells[:3]] == ["finished", "resume", "new"]
    # where the cell lives and the cache may differ; what it trains may not
    moved = plan.cell_config(cells[2], out).replace(out="/elsewhere", cache_dir="/other-cache")
    fake_cell(out, moved, cells[2], None)
    assert cell_state(plan, cells[2], out) == "resume"
    changed = plan.cell_config(cells[3], out).replace(lr=0.5)
    fake_cell(out, changed, cells[3], (1.0, 1.0, 1.0, 0.5))
    with pytest.raises(SweepError, match=r"cell fedprox/seed-0 .* another config .*lr: 0.5 saved, 0.001 now"):
        check_cells(plan, out)
    calls = []
    with pytest.raises(SweepError):
        run_sweep(plan, out, execute=lambda *a, **k: calls.append(a))
    assert calls == [] and not (out / PLAN_FILE).exists()


def test_a_failed_cell_is_recorded_and_the_others_still_run(tmp_path):
    plan = load_sweep(write(tmp_path, SMALL))
    out = tmp_path / "out"
    done = plan.cells[0]
    fake_cell(out, plan.cell_config(done, out), done, (1.0, 1.0, 1.0, 0.5))
    ran = []

    class Result:
        def __init__(self, final):
            self.final = final

    def execute(config, run_dir, resume, on_round, on_status):
        ran.append((run_dir.relative_to(out).as_posix(), resume))
        if config.strategy == "fedprox" and config.seed == 1:
            raise RuntimeError("client 3 failed in round 2")
        cell = Cell(run_dir.parent.name, config.seed)
        fake_cell(out, config, cell, (2.0, 2.0, 2.0, 0.5))
        return Result({"mpjpe_mm": 2.0})

    outcomes = run_sweep(plan, out, execute=execute)
    assert [(o.cell.name, o.status) for o in outcomes] == [
        ("fedavg/seed-0", "skipped"), ("fedavg/seed-1", "finished"), ("fedavg/seed-2", "finished"),
        ("fedprox/seed-0", "finished"), ("fedprox/seed-1", "failed"), ("fedprox/seed-2", "finished"),
    ]  # fmt: skip
    assert ran[0] == ("fedavg/seed-1", False) and len(ran) == 5
    assert outcomes[4].error == "RuntimeError: client 3 failed in round 2"
    saved = json.loads((out / PLAN_FILE).read_text())
    states = {(c["row"], c["seed"]): c for c in saved["cells"]}
    assert states[("fedprox", 1)]["state"] == "failed" and "client 3 failed" in states[("fedprox", 1)]["error"]
    assert states[("fedavg", 0)]["state"] == "finished" and states[("fedavg", 0)]["path"] == "fedavg/seed-0"
    assert "RuntimeError: client 3 failed in round 2" in (out / "sweep.log").read_text()
    assert saved["rows"][1]["config"]["rounds"] == 2 and saved["budget"]["total"] == 12


# -- the report ------------------------------------------------------------------------------------
FEDAVG = {0: (60.0, 40.0, 70.0, 0.50), 1: (62.0, 41.0, 72.0, 0.52), 2: (58.0, 39.5, 69.0, 0.48)}
FEDPROX = {0: (58.0, 40.5, 68.0, 0.55), 1: (60.5, 40.0, 70.5, 0.56), 2: (56.5, 40.2, 67.0, 0.50)}


@pytest.fixture
def sweep_dir(tmp_path):
    plan = load_sweep(write(tmp_path, SMALL))
    out = tmp_path / "out"
    out.mkdir()
    for cell in plan.cells:
        numbers = (FEDAVG if cell.row == "fedavg" else FEDPROX)[cell.seed]
        fake_cell(out, plan.cell_config(cell, out), cell, numbers)
    write_sweep_json(plan, out, {})
    return out


def test_report_of_a_sweep_means_intervals_and_paired_differences(sweep_dir):
    report = load_sweep_report(sweep_dir)
    (table,) = report.tables
    fedavg, fedprox = table.rows
    assert (fedavg.name, fedavg.n, fedprox.setting) == ("fedavg", 3, "FedProx μ=0.01 4/2 IID")
    # MPJPE 60, 62, 58: mean 60, s = 2, half width = 4.3027 · 2 / √3 = 4.97
    assert fedavg.stats["mpjpe_mm"].mean == pytest.approx(60.0)
    assert fedavg.stats["mpjpe_mm"].half_width == pytest.approx(t_quantile(0.975, 2) * 2 / math.sqrt(3))
    assert fedavg.difference is None
    mpjpe, seeds = fedprox.difference["mpjpe_mm"]
    assert seeds == (0, 1, 2) and mpjpe.values == (-2.0, -1.5, -1.5) and mpjpe.excludes_zero
    pa, _ = fedprox.difference["pa_mpjpe_mm"]  # +0.5, −1.0, +0.7: straddles 0
    assert not pa.excludes_zero
    md = to_markdown(report)
    assert (
        "| fedavg (baseline) | FedAvg 4/2 IID | 3 | 12 | 60.0 ± 5.0 | 40.2 ± 1.9 | 70.3 ± 3.8 | 0.500 ± 0.050 |" in md
    )
    # PA-MPJPE +0.5, −1.0, +0.7: s = 0.929, half 4.303 · 0.929 / √3 = 2.3; MPVPE −2, −1.5, −2: −1.8 ± 0.7
    assert "| fedprox | 3 | −1.7 ± 0.7\\* | +0.1 ± 2.3 | −1.8 ± 0.7\\* | +0.037 ± 0.038 |" in md
    assert "**Protocol:** synthetic · anny-14 · mid-hip (root) aligned · anny · real GT" in md
    data = report_dict(report)
    row = data["tables"][0]["rows"][1]
    assert row["difference"]["metrics"]["mpjpe_mm"]["excludes_zero"] is True
    assert row["metrics"]["mpjpe_mm"]["by_seed"] == {"0": 58.0, "1": 60.5, "2": 56.5}
    assert data["interval"]["confidence"] == 0.95 and data["tables"][0]["protocol"] == PROTOCOL
    assert "fedprox,FedProx μ=0.01 4/2 IID,mpjpe_mm,3,58.3333" in to_csv(report)
    assert r"$\pm$" in to_latex(report)


def test_report_against_another_baseline_and_with_a_missing_seed(sweep_dir):
    (sweep_dir / "fedavg" / "seed-2" / "final.json").unlink()
    report = load_sweep_report(sweep_dir, baseline="fedprox")
    fedavg, fedprox = report.tables[0].rows
    assert fedavg.n == 2 and fedavg.missing == (2,) and fedprox.difference is None
    assert fedavg.difference["mpjpe_mm"][1] == (0, 1)
    assert any("no finished cell for seed 2" in w for w in report.warnings)
    assert any("seed 2 finished on one side only" in w for w in report.warnings)


def test_report_command_on_a_sweep_directory(sweep_dir, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(sweep_dir), "--out", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, output(result)
    assert "paired difference vs fedavg" in output(result) and "−1.7 ± 0.7*" in output(result)
    assert sorted(p.name for p in out.iterdir()) == ["convergence.png", "report.csv", "report.json", "report.md",
                                                     "report.tex"]  # fmt: skip
    assert json.loads((out / "report.json").read_text())["baseline"] == "fedavg"
    one = CliRunner().invoke(
        app, ["report", str(sweep_dir), "--baseline", "fedprox", "--out", str(out), "--formats", "json", "--overwrite"]
    )  # fmt: skip (a written --out needs --overwrite)
    assert one.exit_code == 0 and json.loads((out / "report.json").read_text())["baseline"] == "fedprox"


def test_report_command_writes_a_page_of_a_sweep(sweep_dir, tmp_path):
    site = tmp_path / "site"
    result = CliRunner().invoke(app, ["report", str(sweep_dir), "--html", str(site)])
    assert result.exit_code == 0, output(result)
    html = (site / "index.html").read_text().replace("\u00a0", " ")
    assert "<h3>Protocol: synthetic · anny-14 · mid-hip (root) aligned · anny · real GT</h3>" in html
    assert "<td>fedavg (baseline)</td><td>FedAvg 4/2 IID</td>" in html
    assert "<h3>Paired difference vs fedavg (row − fedavg, matched by seed)</h3>" in html
    assert '<td class="num">−1.7 ± 0.7*</td>' in html
    assert html.count("<img ") == 1  # the convergence plot; the cells are IID and have no model.pt:
    assert "Not drawn: the metric-vs-α plot needs runs at 2 or more LDA α values" in html
    assert "Not drawn: no run to draw a prediction grid of: fedavg/seed-0 has no model.pt" in html
    assert html.count("<details ") == 6  # 2 rows × 3 seeds


@pytest.mark.parametrize(
    "args, message",
    [
        (["SWEEP", "--baseline", "fedopt"], "--baseline 'fedopt' is not a row of the sweep"),
        (["SWEEP", "--group-by", "clients-model"], "a sweep directory's rows are the sweep file's rows"),
        (["SWEEP", "SWEEP/fedavg/seed-0"], "is a sweep directory (it holds sweep.json): report it alone"),
        (["SWEEP/fedavg/seed-0", "--baseline", "fedavg"], "--baseline names a row of a sweep directory"),
        (["SWEEP/fedavg/seed-0", "--formats", "yaml"], "--formats 'yaml' has unknown or no formats"),
    ],
)
def test_report_command_bad_sweep_input_exits_2(sweep_dir, args, message):
    result = CliRunner().invoke(app, ["report", *(a.replace("SWEEP", str(sweep_dir)) for a in args)])
    assert result.exit_code == 2, output(result)
    assert message in output(result)


def test_realised_steps_count_the_sampled_clients_own_shares(tmp_path):
    import numpy as np

    from pchmr.core.contracts.partition import Partition, save_partition
    from pchmr.core.engine.federation.common import sample_clients
    from pchmr.core.engine.sweep import realised_steps

    sizes = [5, 5, 4, 10]  # unequal clients, as lda makes them: ⌈size/4⌉ = 2, 2, 1, 3 steps an epoch
    config = RunConfig(clients=4, per_round=2, local_epochs=2, batch_size=4, rounds=3, seed=3)
    run = fake_cell(tmp_path, config, Cell("lda", 3), (1.0, 1.0, 1.0, 0.5))
    chunks, start = [], 0
    for size in sizes:
        chunks.append(np.arange(start, start + size, dtype=np.int64))
        start += size
    save_partition(Partition(tuple(chunks), "lda", {}), run / "partition.json")
    final = json.loads((run / "final.json").read_text())
    (run / "final.json").write_text(json.dumps({**final, "round": 3}))
    steps = {0: 2, 1: 2, 2: 1, 3: 3}
    expected = sum(2 * steps[p] for r in (1, 2, 3) for p in sample_clients(3, r, 4, 2))
    assert realised_steps(run) == expected
    # a run that stopped early (e.g. out of privacy budget) counts the rounds it ran
    (run / "final.json").write_text(json.dumps({**final, "round": 1}))
    assert realised_steps(run) == sum(2 * steps[p] for p in sample_clients(3, 1, 4, 2))
    # a baseline: epochs × ⌈size/batch⌉ of its one device
    naive = fake_cell(tmp_path, RunConfig(mode="naive", batch_size=4, epochs=5), Cell("naive", 0), (1.0, 1.0, 1.0, 0.5))
    save_partition(Partition((np.arange(9, dtype=np.int64),), "naive", {}), naive / "partition.json")
    (naive / "final.json").write_text(json.dumps({**final, "round": 5, "unit": "epoch"}))
    assert realised_steps(naive) == 5 * 3
    assert realised_steps(tmp_path / "nowhere") is None


def test_report_says_when_cells_ran_other_steps_than_planned(sweep_dir):
    import numpy as np

    from pchmr.core.contracts.partition import Partition, save_partition

    def partition(cell: str, sizes: list[int]) -> None:
        bounds = np.cumsum([0, *sizes])
        chunks = tuple(np.arange(a, b, dtype=np.int64) for a, b in zip(bounds, bounds[1:]))
        save_partition(Partition(chunks, "iid", {}), sweep_dir / cell / "partition.json")
        final = json.loads((sweep_dir / cell / "final.json").read_text())
        (sweep_dir / cell / "final.json").write_text(json.dumps({**final, "round": 2}))

    partition("fedavg/seed-0", [12, 12, 12, 12])  # equal shares: 2 rounds × 2 clients × 3 steps, as planned
    partition("fedprox/seed-0", [40, 4, 2, 2])  # one client holds most: other counts
    report = load_sweep_report(sweep_dir)
    fedavg, fedprox = report.tables[0].rows
    assert fedavg.realised_steps[0] == 12 and fedavg.steps_text == "12"
    assert fedprox.realised_steps[0] != 12 and fedprox.steps_text == f"12 (ran {fedprox.realised_steps[0]})"
    assert any("row 'fedprox': the cells ran" in w and "not the planned 12" in w for w in report.warnings)
    assert not any("row 'fedavg': the cells ran" in w for w in report.warnings)


def test_the_example_sweep_plans_at_full_scale_and_smoke(tmp_path, monkeypatch):
    example = "sweeps:strategies"  # the packaged file, by reference; its base is paper:NAME
    # the full scale names the user's ImageNet ResNet-50 under ./data (planning checks it exists)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "weights").mkdir(parents=True)
    (tmp_path / "data" / "weights" / "resnet50-imagenet.pth").write_bytes(b"")
    full = {row.name: row for row in load_sweep(example).rows}
    assert list(full) == ["fedavg", "fedprox", "fedopt", "fedgh", "fedavg-e2"]
    # the whole dataset: matched in client epochs of the same unknown ⌈n/(N·B)⌉
    assert [full[n].config.rounds for n in full] == [2000, 2000, 2000, 2000, 1000]
    assert full["fedprox"].config.dataset == "h36m" and full["fedgh"].config.strategy == "fedgh"
    smoke = load_sweep(example, scale="smoke")
    assert smoke.seeds == (0, 1, 2) and smoke.baseline == "fedavg" and len(smoke.cells) == 15
    assert {row.steps for row in smoke.rows} == {16}
    assert [row.config.rounds for row in smoke.rows] == [4, 4, 4, 4, 2]
    assert {row.config.dataset for row in smoke.rows} == {"synthetic"}
