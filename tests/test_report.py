"""``pchmr report``: loading run directories, grouping, renderers, the convergence PNG and the command."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pchmr.cli.report import report
from pchmr.core.engine.config import RunConfig
from pchmr.report.convergence import curve, plot_convergence
from pchmr.report.tables import (
    ReportError,
    build_report,
    load_run,
    setting_label,
    to_csv,
    to_json,
    to_latex,
    to_markdown,
)

PROTOCOL = {"alignment": "mid-hip (root)", "body_model": "anny", "dataset": "synthetic", "ground_truth": "real",
            "joint_set": "anny-14"}  # fmt: skip
PROTOCOL_LABEL = "synthetic · anny-14 · mid-hip (root) aligned · anny · real GT"
OTHER_PROTOCOL = {**PROTOCOL, "dataset": "h36m", "joint_set": "h36m-14"}


def make_run(
    root: Path,
    name: str,
    final: tuple[float, float, float],
    *,
    protocol: dict | None = None,
    finished: bool = True,
    start: tuple[float, float, float] = (500.0, 300.0, 600.0),
    **config,
) -> Path:
    """A run directory by hand: round 0 at ``start``, then two evaluated rounds/epochs, the last
    at ``final`` (MPJPE, PA-MPJPE, MPVPE in mm)."""
    cfg = RunConfig(**{"local_epochs": 1, **config})  # the paper's one local epoch unless the test says
    unit = "round" if cfg.mode == "federated" else "epoch"
    path = root / name
    path.mkdir(parents=True)
    protocol = PROTOCOL if protocol is None else protocol
    (path / "config.json").write_text(json.dumps({"run": cfg.to_dict(), "plugins": {}, "protocol": protocol}))
    middle = tuple((a + b) / 2 for a, b in zip(start, final))
    records = []
    for i, (mpjpe, pa, mpvpe) in enumerate([start, middle, final]):
        records.append({"round": i, "unit": unit, "mpjpe_mm": mpjpe, "pa_mpjpe_mm": pa, "mpvpe_mm": mpvpe,
                        "pck": 0.5, "wall_seconds": float(i), "bytes_sent": 0, "bytes_received": 0})  # fmt: skip
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        last = records[-1]
        summary = {"round": 2, "unit": unit, **{k: last[k] for k in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck")},
                   "round0": {k: records[0][k] for k in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck")},
                   "mean_pose_mpjpe_mm": 280.0, "mean_pose_pa_mpjpe_mm": 170.0, "wall_seconds": 2.0,
                   "bytes_sent": 0, "bytes_received": 0, "protocol": protocol}  # fmt: skip
        (path / "final.json").write_text(json.dumps(summary))
    return path


# -- labels ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, label",
    [
        (dict(clients=10, per_round=10), "FedAvg 10/10 IID"),
        (dict(mode="centralized"), "Centralized"),
        (dict(mode="naive", fraction=0.05), "Naive 5 %"),
        (dict(mode="naive", fraction=0.2), "Naive 20 %"),
        (dict(strategy="fedprox", strategy_options={"proximal-mu": 0.01}, clients=100, per_round=10,
              partitioner="lda", partition_options={"alpha": 0.5}), "FedProx μ=0.01 100/10 LDA α=0.5"),
        (dict(strategy="fedprox", partitioner="lda", clients=100, per_round=10), "FedProx μ=0.01 100/10 LDA α=0.5"),
        (dict(strategy="fedopt", strategy_options={"server-opt": "yogi"}, clients=20, per_round=5, local_epochs=2),
         "FedOpt server-opt=yogi 20/5 IID E=2"),
        (dict(partitioner="cnn-cluster", clients=100, per_round=10), "FedAvg 100/10 CNN Cluster"),
    ],
)  # fmt: skip
def test_setting_label(config, label):
    assert setting_label(RunConfig(**{"local_epochs": 1, **config})) == label


def test_the_default_runs_label_says_its_two_local_epochs():
    assert setting_label(RunConfig()) == "FedAvg 10/2 IID E=2"


# -- grouping -------------------------------------------------------------------------------
def test_seeds_share_a_cell_with_mean_and_sample_std(tmp_path):
    runs = [load_run(make_run(tmp_path, f"s{seed}", (10.0 * (seed + 1), 40.0, 70.0 + seed), seed=seed,
                              clients=10, per_round=10)) for seed in range(3)]  # fmt: skip
    rep = build_report(runs)
    (table,) = rep.tables
    assert table.rows == ("FedAvg 10/10 IID",)
    assert table.columns == ("FastMETRO-S",)
    cell = table.cells[("FedAvg 10/10 IID", "FastMETRO-S")]
    assert cell.n == 3
    assert cell.stats["mpjpe_mm"].mean == pytest.approx(20.0)
    assert cell.stats["mpjpe_mm"].std == pytest.approx(10.0)  # sample std of 10, 20, 30
    assert cell.text() == "20.0 ± 10.0 / 40.0 ± 0.0 / 71.0 ± 1.0 (n=3)"
    assert rep.warnings == ()


def test_clients_model_rows_and_model_columns(tmp_path):
    runs = [
        make_run(tmp_path, "a", (60.0, 41.0, 70.0), clients=100, per_round=10),
        make_run(tmp_path, "b", (59.0, 40.0, 69.0), clients=10, per_round=10),
        make_run(tmp_path, "c", (63.0, 43.0, 75.0), clients=10, per_round=10, backbone="tore"),
        make_run(tmp_path, "d", (61.0, 42.0, 72.0), mode="centralized"),
    ]
    (table,) = build_report([load_run(p) for p in runs], "clients-model").tables
    assert table.row_header == "Clients N/k"
    assert table.rows == ("Centralized", "10/10", "100/10")
    assert table.columns == ("FastMETRO-S", "TORE-S")
    assert table.cell_text("10/10", "TORE-S") == "63.0 / 43.0 / 75.0"
    assert table.cell_text("100/10", "TORE-S") == "—"


def test_strategy_partition_rows(tmp_path):
    runs = [
        make_run(tmp_path, "a", (57.0, 40.0, 70.0), strategy="fedprox", partitioner="lda", clients=100, per_round=10),
        make_run(tmp_path, "b", (59.0, 41.0, 70.0), clients=100, per_round=10),
        make_run(tmp_path, "c", (58.0, 40.0, 70.0), partitioner="lda", clients=100, per_round=10),
    ]
    (table,) = build_report([load_run(p) for p in runs], "strategy-partition").tables
    assert table.rows == ("IID · FedAvg", "LDA α=0.5 · FedAvg", "LDA α=0.5 · FedProx μ=0.01")


def test_different_protocols_are_separate_tables_with_a_warning(tmp_path):
    runs = [load_run(make_run(tmp_path, "a", (60.0, 40.0, 70.0))),
            load_run(make_run(tmp_path, "b", (90.0, 50.0, 99.0), protocol=OTHER_PROTOCOL))]  # fmt: skip
    rep = build_report(runs)
    assert len(rep.tables) == 2
    assert {t.protocol["dataset"] for t in rep.tables} == {"synthetic", "h36m"}
    for table in rep.tables:
        (cell,) = table.cells.values()
        assert cell.n == 1  # never averaged across protocols
    assert any("2 different evaluation protocols" in w for w in rep.warnings)
    md = to_markdown(rep)
    assert md.count("**Protocol:**") == 2
    assert "> **Warning:** runs use 2 different evaluation protocols" in md


def test_cell_mixing_more_than_seeds_is_warned(tmp_path):
    runs = [load_run(make_run(tmp_path, "a", (60.0, 40.0, 70.0), lr=1e-3)),
            load_run(make_run(tmp_path, "b", (62.0, 40.0, 70.0), lr=1e-4, seed=1))]  # fmt: skip
    rep = build_report(runs)
    assert any("differ in lr" in w for w in rep.warnings)


# -- renderers ------------------------------------------------------------------------------
@pytest.fixture
def two_seed_report(tmp_path):
    runs = [
        make_run(tmp_path, "s0", (59.0, 41.0, 70.0), seed=0, clients=10, per_round=10),
        make_run(tmp_path, "s1", (61.0, 43.0, 72.0), seed=1, clients=10, per_round=10),
        make_run(tmp_path, "c", (61.38, 41.63, 72.25), mode="centralized"),
    ]
    return build_report([load_run(p) for p in runs])


def test_markdown(two_seed_report):
    lines = to_markdown(two_seed_report).splitlines()
    assert lines[0] == f"**Protocol:** {PROTOCOL_LABEL}"
    assert lines[2:6] == [
        "| Setting | FastMETRO-S · final | FastMETRO-S · best round |",
        "|---|---:|---:|",
        # 72.25 → 72.2 (binary float, round-half-even); make_run's final round is also its best
        "| Centralized | 61.4 / 41.6 / 72.2 | 61.4 / 41.6 / 72.2 @ epoch 2 |",
        "| FedAvg 10/10 IID | 60.0 ± 1.4 / 42.0 ± 1.4 / 71.0 ± 1.4 (n=2) | "
        "60.0 ± 1.4 / 42.0 ± 1.4 / 71.0 ± 1.4 (n=2) @ rounds 2, 2 |",
    ]
    assert "_final: the last evaluated round/epoch; best round: the evaluated round/epoch after training began " \
        "with the lowest MPJPE (the PCHMR paper's Table 1 choice)" in to_markdown(two_seed_report)  # fmt: skip


def test_csv(two_seed_report):
    rows = list(csv.DictReader(io.StringIO(to_csv(two_seed_report))))
    assert [r["row"] for r in rows] == ["Centralized", "FedAvg 10/10 IID"]
    fed = rows[1]
    assert fed["protocol"] == PROTOCOL_LABEL
    assert fed["model"] == "FastMETRO-S"
    assert fed["n"] == "2"
    assert fed["cell"] == "60.0 ± 1.4 / 42.0 ± 1.4 / 71.0 ± 1.4 (n=2)"
    assert fed["mpjpe_mm_mean"] == "60.000"
    assert fed["mpjpe_mm_std"] == "1.414"
    assert rows[0]["mpjpe_mm_std"] == ""
    assert fed["best_mpjpe_mm_mean"] == "60.000" and fed["best_rounds"] == "2;2"
    assert fed["best_cell"] == "60.0 ± 1.4 / 42.0 ± 1.4 / 71.0 ± 1.4 (n=2) @ rounds 2, 2"


def test_latex(two_seed_report):
    tex = to_latex(two_seed_report)
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\begin{tabular}{lrr}" in tex
    assert r"Setting & FastMETRO-S $\cdot$ final & FastMETRO-S $\cdot$ best round \\" in tex
    assert r"FedAvg 10/10 IID & 60.0 $\pm$ 1.4 / 42.0 $\pm$ 1.4 / 71.0 $\pm$ 1.4 (n=2) & 60.0" in tex
    assert r"Protocol: synthetic $\cdot$ anny-14" in tex


def _rewrite_rounds(path, mpjpe_by_round):
    """Give the run's evaluated rounds these MPJPEs (PA-MPJPE = MPJPE / 2, MPVPE = MPJPE + 10)."""
    records = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]
    records = [{**records[-1], "round": i, "mpjpe_mm": m, "pa_mpjpe_mm": m / 2, "mpvpe_mm": m + 10}
               for i, m in enumerate(mpjpe_by_round)]  # fmt: skip
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_best_round_is_the_lowest_mpjpe_after_training_began_beside_the_final_one(tmp_path):
    # round 0 (the untrained model) is never the best, even when lowest; a tie keeps the earlier round
    path = make_run(tmp_path, "fed", (62.0, 31.0, 72.0), clients=10, per_round=10)
    _rewrite_rounds(path, [40.0, 70.0, 58.0, 61.0, 58.0, 62.0])
    run = load_run(path)
    assert run.best["round"] == 2 and run.metric("mpjpe_mm", "best") == 58.0 and run.metric("mpjpe_mm") == 62.0
    assert run.metric("pa_mpjpe_mm", "best") == 29.0, "all three metrics come from the best round"
    rep = build_report([run])
    (table,) = rep.tables
    assert table.cell_text("FedAvg 10/10 IID", "FastMETRO-S") == "62.0 / 31.0 / 72.0"
    assert table.cell_text("FedAvg 10/10 IID", "FastMETRO-S", "best") == "58.0 / 29.0 / 68.0 @ round 2"
    assert "| FedAvg 10/10 IID | 62.0 / 31.0 / 72.0 | 58.0 / 29.0 / 68.0 @ round 2 |" in to_markdown(rep)
    document = json.loads(to_json(rep))
    (cell,) = document["tables"][0]["cells"]
    assert cell["final"]["metrics"]["mpjpe_mm"]["mean"] == 62.0
    assert cell["best"]["metrics"]["mpjpe_mm"]["mean"] == 58.0 and cell["best"]["rounds"] == [2]
    assert (cell["best"]["unit"], cell["best"]["chosen_by"]) == ("round", "mpjpe_mm")
    assert document["tables"][0]["views"] == {"final": "final", "best": "best round"}
    _rewrite_rounds(path, [40.0])  # nothing evaluated after training began
    assert load_run(path).best is None
    assert build_report([load_run(path)]).tables[0].cell_text("FedAvg 10/10 IID", "FastMETRO-S", "best") == "— / — / —"


# -- unfinished and bad runs ----------------------------------------------------------------
def test_unfinished_run_needs_the_flag_and_is_marked(tmp_path):
    path = make_run(tmp_path, "killed", (60.0, 40.0, 70.0), finished=False)
    with pytest.raises(ReportError, match="unfinished.*final.json is missing.*--include-unfinished") as err:
        load_run(path)
    assert str(path) in str(err.value)
    run = load_run(path, include_unfinished=True)
    assert not run.finished
    assert run.protocol == PROTOCOL  # from config.json
    (table,) = build_report([run]).tables
    assert table.cell_text("FedAvg 10/2 IID", "FastMETRO-S") == "60.0 / 40.0 / 70.0*"
    assert table.cell_text("FedAvg 10/2 IID", "FastMETRO-S", "best") == "60.0 / 40.0 / 70.0 @ round 2*"
    assert "unfinished" in to_markdown(build_report([run]))


def test_bad_directories_name_the_path(tmp_path):
    with pytest.raises(ReportError, match=str(tmp_path / "nope")):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty is not a pchmr run directory: config.json is missing"):
        load_run(tmp_path / "empty")
    with pytest.raises(ReportError, match="unknown group-by 'model'.*setting-model, clients-model, strategy-partition"):
        build_report([load_run(make_run(tmp_path, "a", (1.0, 1.0, 1.0)))], "model")


# -- convergence ----------------------------------------------------------------------------
def test_convergence_png(tmp_path):
    runs = [load_run(make_run(tmp_path, "fed", (60.0, 40.0, 70.0))),
            load_run(make_run(tmp_path, "cen", (55.0, 38.0, 66.0), mode="centralized"))]  # fmt: skip
    assert curve(runs[0], "pa_mpjpe_mm") == ([0, 1, 2], [300.0, 170.0, 40.0])
    assert runs[1].unit == "epoch"
    png = plot_convergence(runs, tmp_path / "out" / "conv.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ReportError, match="unknown metric 'loss'"):
        plot_convergence(runs, tmp_path / "x.png", "loss")


# -- the command ----------------------------------------------------------------------------
def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(report)

    @app.command()
    def other() -> None:  # a second command, so `report` is addressed by name as in pchmr's app
        """Unused."""

    return app


def _all_output(result) -> str:
    try:
        return result.output + result.stderr
    except ValueError:  # stderr mixed into output
        return result.output


def test_command_writes_every_format(tmp_path):
    a = make_run(tmp_path / "runs", "a", (59.0, 41.0, 70.0), seed=0)
    make_run(tmp_path / "runs", "b", (61.0, 43.0, 72.0), seed=1)
    out = tmp_path / "report"
    result = CliRunner().invoke(_app(), ["report", str(a), str(tmp_path / "runs"), "--out", str(out)])
    assert result.exit_code == 0, _all_output(result)
    assert "FedAvg 10/2 IID" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["convergence.png", "report.csv", "report.md", "report.tex"]
    # `a` given twice (itself and inside runs/) counts once
    assert "| FedAvg 10/2 IID | 60.0 ± 1.4 / 42.0 ± 1.4 / 71.0 ± 1.4 (n=2) |" in (out / "report.md").read_text()
    assert (out / "convergence.png").stat().st_size > 10_000


def test_command_writes_json_on_request(tmp_path):
    a = make_run(tmp_path, "a", (59.0, 41.0, 70.0))
    result = CliRunner().invoke(_app(), ["report", str(a), "--out", str(tmp_path / "o"), "--formats", "md,json"])
    assert result.exit_code == 0, _all_output(result)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.json", "report.md"]
    cell = json.loads((tmp_path / "o" / "report.json").read_text())["tables"][0]["cells"][0]
    assert cell["best"]["rounds"] == [2] and cell["final"]["text"] == "59.0 / 41.0 / 70.0"
    assert "best round" in result.output


def test_command_formats_subset(tmp_path):
    a = make_run(tmp_path, "a", (59.0, 41.0, 70.0))
    result = CliRunner().invoke(_app(), ["report", str(a), "--out", str(tmp_path / "o"), "--formats", "csv",
                                         "--group-by", "clients-model"])  # fmt: skip
    assert result.exit_code == 0, _all_output(result)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["report.csv"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["MISSING"], "/missing does not exist"),
        (["EMPTY"], "is not a pchmr run directory"),
        (["RUN", "--group-by", "model"], "unknown --group-by 'model'; choose one of: setting-model, clients-model"),
        (["RUN", "--formats", "md,pdf"], "choose from: md, csv, tex, png"),
        (["RUN", "--metric", "loss"], "unknown --metric 'loss'"),
        (["UNFINISHED"], "--include-unfinished"),
    ],
)
def test_command_bad_input_exits_2(tmp_path, args, expected):
    paths = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"),
             "RUN": str(make_run(tmp_path, "run", (1.0, 1.0, 1.0))),
             "UNFINISHED": str(make_run(tmp_path, "unf", (1.0, 1.0, 1.0), finished=False))}  # fmt: skip
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(_app(), ["report", *(paths.get(a, a) for a in args)])
    assert result.exit_code == 2
    assert expected in " ".join(_all_output(result).split())
