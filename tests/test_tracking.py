"""Experiment tracking (``--logger csv|tensorboard|mlflow``): what the loggers wrote, read back with
the tools' own readers (TensorBoard's ``EventAccumulator``, an MLflow file store through
``MlflowClient``, the CSV file through ``csv``), holds the same per-round values as ``rounds.jsonl``.

The option and its refusals, the record → scalars mapping and the loggers driven with records
(the privacy budget, a resume after a kill) run without training; then one tiny federated run on
Flower's Simulation Engine with all three loggers, the same run resumed after a simulated kill,
and a centralized baseline.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from pchmr.core.engine import tracking
from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.rundir import METRIC_KEYS, RunDir
from pchmr.core.engine.tracking import hyperparameters, open_tracker, round_scalars

pytest.importorskip("tensorboard", reason="pip install 'pchmr[tensorboard]' (the test extra installs it)")
pytest.importorskip("mlflow", reason="pip install 'pchmr[mlflow]' (the test extra installs it)")

ALL = ("csv", "tensorboard", "mlflow")
#: a tiny run: the encoder trains from scratch (no public pretraining), 4 clients, 2 per round
TINY = dict(
    num_train=48,
    num_test=16,
    clients=4,
    per_round=2,
    rounds=2,
    local_epochs=1,
    batch_size=16,
    encoder_weights=None,
    seed=5,
)


@pytest.fixture(autouse=True)
def _local_mlflow(monkeypatch):
    """MLflow's file store in the run directory, whatever the environment says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


# --------------------------------------------------------------------------------------
# reading back, with each tool's own reader
# --------------------------------------------------------------------------------------
Series = dict[str, dict[int, float]]  # scalar name → step → value


def read_tensorboard(run: Path) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    out: Series = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        steps = [event.step for event in events]
        assert len(steps) == len(set(steps)), f"TensorBoard {tag}: a step logged twice: {steps}"
        out[tag] = {event.step: event.value for event in events}
    return out


def tensorboard_hparams(run: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(run / "logs" / "tensorboard"))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    starts = [plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info for c in content.values()]
    params = {key: value for start in starts for key, value in start.hparams.items()}
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in params.items()}


def mlflow_client(run: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "logs" / "mlflow.json").read_text())
    return MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def read_mlflow(run: Path) -> Series:
    client, run_id = mlflow_client(run)
    out: Series = {}
    for key in client.get_run(run_id).data.metrics:
        history = client.get_metric_history(run_id, key)
        steps = [metric.step for metric in history]
        assert len(steps) == len(set(steps)), f"MLflow {key}: a step logged twice: {steps}"
        out[key] = {metric.step: metric.value for metric in history}
    return out


def read_csv(run: Path) -> Series:
    with (run / "logs" / "csv" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows]
    assert len(steps) == len(set(steps)), f"metrics.csv: a step written twice: {steps}"
    out: Series = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def expected(rounds: list[dict]) -> Series:
    out: Series = {}
    for record in rounds:
        for name, value in round_scalars(record).items():
            out.setdefault(name, {})[record["round"]] = value
    return out


def _same(got: float, want: float, exact: bool) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return got == want if exact else got == pytest.approx(want, rel=1e-6, abs=1e-6)  # TensorBoard keeps float32


def assert_logs_equal_rounds(run: Path, kinds=ALL) -> dict[str, Series]:
    """Every logger holds exactly the scalars of every ``rounds.jsonl`` record, at its round, once."""
    rounds = RunDir(run).read_rounds()
    want = expected(rounds)
    assert want, "rounds.jsonl holds records"
    readers = {"csv": read_csv, "tensorboard": read_tensorboard, "mlflow": read_mlflow}
    logs = {kind: readers[kind](run) for kind in kinds}
    for kind, got in logs.items():
        assert set(got) == set(want), f"{kind}: {sorted(set(got) ^ set(want))}"
        for name, by_step in want.items():
            assert set(got[name]) == set(by_step), f"{kind} {name}: steps {sorted(got[name])} != {sorted(by_step)}"
            for step, value in by_step.items():
                assert _same(got[name][step], value, exact=kind != "tensorboard"), (kind, name, step)
    # the must-show, spelled out for the evaluation: the same per-round values as rounds.jsonl
    for record in rounds:
        for key in METRIC_KEYS:
            for kind, got in logs.items():
                assert _same(got[f"test/{key}"][record["round"]], record[key], exact=kind != "tensorboard")
    return logs


# --------------------------------------------------------------------------------------
# the option
# --------------------------------------------------------------------------------------
def test_loggers_are_named_from_the_three_choices():
    assert RunConfig().loggers == ()
    assert RunConfig(loggers=["tensorboard", "csv", "tensorboard"]).loggers == ("tensorboard", "csv")
    assert RunConfig(loggers="mlflow").loggers == ("mlflow",)  # a config file's single name
    assert RunConfig.from_dict({"loggers": ["csv", "mlflow"]}).loggers == ("csv", "mlflow")
    with pytest.raises(
        ConfigError, match=r"--logger must be one of csv, tensorboard, mlflow \(repeatable\), got 'wandb'"
    ):
        RunConfig(loggers=("csv", "wandb"))
    with pytest.raises(ConfigError, match="--logger must name trackers"):
        RunConfig(loggers=[3])
    saved = RunConfig(loggers=("csv", "mlflow")).to_dict()
    assert json.loads(json.dumps(saved))["loggers"] == ["csv", "mlflow"]
    assert RunConfig.from_saved(json.loads(json.dumps(saved))).loggers == ("csv", "mlflow")
    assert RunConfig.from_saved({k: v for k, v in saved.items() if k != "loggers"}).loggers == ()  # older runs


def test_logger_is_a_repeatable_flag_of_pchmr_run(tmp_path):
    from typer.testing import CliRunner

    from pchmr.cli.app import app
    from pchmr.cli.config_flags import config_flags

    flag = next(f for f in config_flags(RunConfig) if f.field == "loggers")
    assert flag.names == ("--logger",)
    result = CliRunner().invoke(app, ["run", "--logger", "csv", "--logger", "wandb", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "--logger must be one of csv, tensorboard, mlflow (repeatable), got 'wandb'" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "r").exists()


def test_flags_given_replace_the_config_files_list():
    from pchmr.cli.config_flags import GivenFlags, config_flags

    flags = config_flags(RunConfig, ["loggers", "rounds"])
    assert GivenFlags(flags, {"loggers": ["mlflow"], "rounds": None}).over({"loggers": ["csv"]}) == {
        "loggers": ["mlflow"]
    }
    assert GivenFlags(flags, {"loggers": [], "rounds": 4}).over({"loggers": ["csv"]}) == {
        "loggers": ["csv"],
        "rounds": 4,
    }


def test_a_repeated_flag_needs_a_tuple_field():
    from pchmr.cli.config_flags import config_flags
    from pchmr.core.engine.run_options import Repeated, run_option

    bad = dataclasses.make_dataclass("Bad", [("x", str, run_option("a", help="x.", cli=Repeated()))], frozen=True)
    with pytest.raises(TypeError, match=r"field 'x' reads a repeatable flag but is a <class 'str'>, not a tuple"):
        config_flags(bad)


def test_a_logger_whose_package_is_missing_is_refused_naming_the_extra_before_any_data(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pchmr.cli.app import app
    from pchmr.core.engine.run import execute

    monkeypatch.setitem(tracking.EXTRAS, "mlflow", ("pchmr_no_such_module", "mlflow"))
    monkeypatch.setitem(tracking.EXTRAS, "tensorboard", ("pchmr_no_such_module", "tensorboard"))
    with pytest.raises(ConfigError, match=r"--logger mlflow needs the pchmr_no_such_module package, which is not installed: pip install 'pchmr\[mlflow\]'"):  # fmt: skip
        execute(RunConfig(loggers=("csv", "mlflow"), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before the run directory, let alone the data
    result = CliRunner().invoke(app, ["run", "--logger", "tensorboard", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2, result.output
    assert "pip install 'pchmr[tensorboard]'" in " ".join(result.output.split())
    assert not (tmp_path / "cli").exists()


# --------------------------------------------------------------------------------------
# records → scalars, and the loggers driven with records
# --------------------------------------------------------------------------------------
def _record(step: int, **extra) -> dict:
    return {
        "round": step,
        "mpjpe_mm": 300.0 - step * 7.25,
        "pa_mpjpe_mm": 150.0 - step * 3.5,
        "mpvpe_mm": 310.123456789 - step,
        "pck": 0.1 + step / 100,
        "wall_seconds": 1.5 * step,
        "round_seconds": 1.5,
        "bytes_sent": 1000 * step,
        "bytes_received": 1000 * step,
        "clients": [1, 3] if step else [],
        **extra,
    }


def _dp_record(step: int) -> dict:
    return _record(
        step,
        epsilon=0.731 * step,
        delta=1e-5,
        train_loss=2.5 / step,
        aggregated=2,
        failures=[{"partition": 3, "error": "simulated"}],
        client_loss={"1": 2.25 / step, "3": 2.75 / step},
        client_img_s={"1": 40.5, "3": 39.25},
        lr=1e-3,
        top_layers={"encoder.conv1": 0.5},
        unit="round",
        note="text is no scalar",
    )


def test_a_record_becomes_named_scalars():
    scalars = round_scalars(_dp_record(2))
    assert scalars["test/mpjpe_mm"] == 300.0 - 14.5 and scalars["test/pck"] == 0.1 + 2 / 100
    assert scalars["privacy/epsilon"] == 0.731 * 2 and scalars["privacy/delta"] == 1e-5
    assert scalars["train/loss"] == 1.25
    assert scalars["client/1/loss"] == 1.125 and scalars["client/3/img_s"] == 39.25
    assert scalars["round/failures"] == 1.0 and scalars["round/aggregated"] == 2.0
    assert scalars["round/top_layers/encoder.conv1"] == 0.5 and scalars["round/lr"] == 1e-3
    assert not {"round/round", "round/clients", "round/unit", "round/note"} & set(scalars)
    assert round_scalars({"round": 1, "train_loss": None, "mpjpe_mm": 1.0}) == {"test/mpjpe_mm": 1.0}


def test_the_config_becomes_flat_hyperparameters():
    cfg = RunConfig(loggers=("csv", "mlflow"), strategy_options={"server-opt": "adam"}, num_train=8)
    params = hyperparameters(cfg)
    assert params["strategy_options/server-opt"] == "adam" and params["num_train"] == 8
    assert params["loggers"] == "csv,mlflow" and params["privacy"] == "None" and params["rounds"] == 3


def test_loggers_hold_each_record_once_across_a_resume_and_name_the_privacy_budget(tmp_path):
    """Rounds 0-2 logged, then a kill: round 3 is in rounds.jsonl but no logger flushed it. The
    reopened loggers log round 3 (and nothing twice), then round 4; MLflow continues its run."""
    run = tmp_path / "run"
    rd = RunDir(run).create()
    cfg = RunConfig(loggers=ALL, out=str(run), privacy="dp")
    records = [_record(0)] + [_dp_record(step) for step in (1, 2)]
    with open_tracker(cfg, rd) as tracker:
        for record in records:
            rd.append_round(record)
            tracker.log_round(record)
    client, run_id = mlflow_client(run)
    assert client.get_run(run_id).info.status == "FINISHED"
    logs = assert_logs_equal_rounds(run)
    assert logs["mlflow"]["privacy/epsilon"] == {1: 0.731, 2: 0.731 * 2}
    assert logs["tensorboard"]["client/3/loss"][2] == pytest.approx(1.375)

    rd.append_round(_dp_record(3))  # written, then killed before any logger had it
    with pytest.raises(KeyboardInterrupt), open_tracker(cfg, rd) as tracker:
        tracker.log_round(_dp_record(2))  # a round redone after a resume: not logged twice
        raise KeyboardInterrupt
    assert client.get_run(run_id).info.status == "KILLED"
    assert_logs_equal_rounds(run)

    with open_tracker(cfg, rd) as tracker:  # the resume that finishes
        rd.append_round(_dp_record(4))
        tracker.log_round(_dp_record(4))
    logs = assert_logs_equal_rounds(run)
    assert sorted(logs["csv"]["test/mpjpe_mm"]) == [0, 1, 2, 3, 4]
    assert mlflow_client(run)[1] == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    params = client.get_run(run_id).data.params
    assert params["privacy"] == "dp" and params["loggers"] == "csv,tensorboard,mlflow"
    assert tensorboard_hparams(run)["privacy"] == "dp"
    assert "privacy: dp" in (run / "logs" / "csv" / "hparams.yaml").read_text()


def test_a_logger_that_fails_is_dropped_and_the_others_go_on(tmp_path, caplog):
    run = tmp_path / "run"
    rd = RunDir(run).create()
    with open_tracker(RunConfig(loggers=("csv", "tensorboard"), out=str(run)), rd) as tracker:
        broken = tracker.sinks[0]
        broken.log = lambda step, scalars: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        for step in (0, 1):
            rd.append_round(_record(step))
            tracker.log_round(_record(step))
        assert tracker.kinds == ["tensorboard"]
    assert "the csv logger failed logging round 0 and is dropped" in caplog.text
    assert sorted(read_tensorboard(run)["test/mpjpe_mm"]) == [0, 1]


def test_no_logger_opens_nothing(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    with open_tracker(RunConfig(out=str(rd.path)), rd) as tracker:
        tracker.log_round(_record(0))
    assert not (rd.path / "logs").exists()


# --------------------------------------------------------------------------------------
# real runs
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def federated_run(tmp_path_factory, pchmr_cache):
    """A tiny federated run with every logger, and a copy of its run directory as it stood after
    round 1 (its checkpoint written and logged)."""
    from pchmr.core.engine.run import execute

    out = tmp_path_factory.mktemp("tracking") / "fed"
    after_round1 = out.parent / "after-round1"

    def on_round(report):
        if report.server_round == 1:
            shutil.copytree(out, after_round1)

    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        execute(RunConfig(**TINY, loggers=ALL, out=str(out)), on_round=on_round)
    return out, after_round1


@pytest.mark.slow
def test_a_federated_run_logs_the_rounds_of_rounds_jsonl_to_every_logger(federated_run):
    run, _ = federated_run
    rounds = RunDir(run).read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    logs = assert_logs_equal_rounds(run)
    for record in rounds[1:]:
        assert set(record["client_loss"]) == {str(p) for p in record["clients"]}
        for kind in ALL:
            for partition, loss in record["client_loss"].items():
                assert logs[kind][f"client/{partition}/loss"][record["round"]] == pytest.approx(loss, rel=1e-6)
            for partition, speed in record["client_img_s"].items():
                assert logs[kind][f"client/{partition}/img_s"][record["round"]] == pytest.approx(speed, rel=1e-6)
            assert logs[kind]["train/loss"][record["round"]] == pytest.approx(record["train_loss"], rel=1e-6)
    client, run_id = mlflow_client(run)
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "fed"
    assert mlflow_run.data.params["clients"] == "4" and mlflow_run.data.params["loggers"] == "csv,tensorboard,mlflow"
    assert tensorboard_hparams(run)["strategy"] == "fedavg"
    assert "per_round: 2" in (run / "logs" / "csv" / "hparams.yaml").read_text()


@pytest.mark.slow
def test_a_resumed_run_continues_its_logs_without_logging_a_round_twice(federated_run, tmp_path):
    """The run killed after round 2's record was written, before its checkpoint: the resume
    trains round 2 again and logs it once; every logger holds rounds.jsonl's rounds, each once,
    and MLflow's run is the one the run started."""
    from pchmr.core.engine.run import execute

    done, after_round1 = federated_run
    run = tmp_path / "fed"
    shutil.copytree(after_round1, run)
    state = json.loads((run / "logs" / "mlflow.json").read_text())  # the copy's own file store
    uri = state["tracking_uri"].replace(done.resolve().as_uri(), run.resolve().as_uri())
    (run / "logs" / "mlflow.json").write_text(json.dumps({**state, "tracking_uri": uri}))
    round2 = RunDir(done).read_rounds()[2]
    RunDir(run).append_round(round2)  # written just before the kill; its checkpoint never was
    assert [r["round"] for r in RunDir(run).read_rounds()] == [0, 1, 2]
    assert sorted(read_tensorboard(run)["test/mpjpe_mm"]) == [0, 1]

    execute(RunConfig.from_saved(RunDir(run).read_config()["run"]), run_dir=run, resume=True)
    rounds = RunDir(run).read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["mpjpe_mm"] == round2["mpjpe_mm"]  # the same round, trained again
    logs = assert_logs_equal_rounds(run)
    assert all(sorted(logs[kind]["test/mpjpe_mm"]) == [0, 1, 2] for kind in ALL)
    client, run_id = mlflow_client(run)
    assert run_id == state["run_id"] and client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_centralized_baseline_logs_its_epochs(tmp_path, pchmr_cache):
    from pchmr.core.engine.run import execute

    run = tmp_path / "central"
    cfg = RunConfig(
        mode="centralized", epochs=2, num_train=16, num_test=16, batch_size=16, encoder_weights=None, out=str(run)
    )
    execute(cfg.replace(loggers=ALL))
    rounds = RunDir(run).read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[1]["unit"] == "epoch"
    logs = assert_logs_equal_rounds(run)
    assert sorted(logs["tensorboard"]["train/loss"]) == [1, 2]
    assert read_mlflow(run)["round/lr"][2] == pytest.approx(rounds[2]["lr"])
