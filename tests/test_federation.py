"""One real federated run: Flower's Simulation Engine (Ray), the real Lightning Trainer, Anny data."""

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.contracts.partition import load_partition
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.devices import CPU
from pchmr.core.engine.federation.common import sample_clients
from pchmr.core.engine.federation.simulation import ray_resources
from pchmr.core.engine.run import execute

CONFIG = dict(num_train=48, num_test=16, clients=4, per_round=2, rounds=2, batch_size=16, local_epochs=1, seed=3)


#: PYTHONPATH before and after the module's run (Flower's Ray backend sets it for Ray's workers)
PATH_AROUND_RUN: dict[str, str | None] = {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pchmr_cache):
    out = tmp_path_factory.mktemp("run") / "r"
    reports = []
    PATH_AROUND_RUN["before"] = os.environ.get("PYTHONPATH")
    result = execute(RunConfig(**CONFIG, out=str(out)), on_round=reports.append)
    PATH_AROUND_RUN["after"] = os.environ.get("PYTHONPATH")
    return result, reports


def test_a_run_leaves_this_processs_pythonpath_as_it_found_it(finished_run):
    # Flower's Ray backend sets PYTHONPATH to the driver's sys.path and leaves it: every process started
    # after the run (pip into another venv, another interpreter) would import this venv's packages
    assert PATH_AROUND_RUN["after"] == PATH_AROUND_RUN["before"]


def test_sampling_is_a_function_of_seed_and_round_only():
    a = [sample_clients(3, r, 100, 10) for r in range(1, 6)]
    b = [sample_clients(3, r, 100, 10) for r in range(1, 6)]
    assert a == b
    assert all(len(set(s)) == 10 and all(0 <= c < 100 for c in s) for s in a)
    assert len({tuple(s) for s in a}) == 5, "rounds must not repeat the same sample"
    assert sample_clients(4, 1, 100, 10) != a[0]


def _cores(cpus: int, per_round: int) -> float:
    return ray_resources(CPU, per_round, num_cpus=cpus)[1]["num_cpus"]


def test_cores_are_split_among_the_rounds_clients():
    # two sampled clients on two cores train side by side, one thread each
    assert _cores(2, 2) == 1
    assert _cores(2, 5) == 1
    # one client per round keeps every core; spare cores are shared out evenly
    assert _cores(2, 1) == 2
    assert _cores(8, 3) == 2
    assert _cores(1, 4) == 1
    with pytest.raises(ValueError, match="at least one core and one client"):
        ray_resources(CPU, 0, num_cpus=2)


def test_run_directory_has_every_artifact(finished_run):
    result, _ = finished_run
    rd = result.run_dir
    for path in (rd.config, rd.partition, rd.rounds, rd.final, rd.checkpoint, rd.model, rd.log):
        assert path.exists(), path
    config = json.loads(rd.config.read_text())
    assert config["run"]["clients"] == 4 and config["plugins"]["backbone"]["provider"].startswith("pchmr ")
    # the default CNN: pretrained on the public split, recorded by file and hash, kept frozen
    encoder = config["encoder"]
    assert encoder["source"] == "public" and encoder["frozen"] is True
    assert hashlib.sha256(Path(encoder["weights"]).read_bytes()).hexdigest() == encoder["sha256"]
    assert load_partition(rd.partition).num_clients == 4


def test_rounds_record_metrics_bytes_and_sampled_clients(finished_run):
    result, reports = finished_run
    rounds = result.run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    model_bytes = sum(t.numel() * t.element_size() for t in torch.load(result.run_dir.model).values())
    for r in rounds[1:]:
        assert r["clients"] == sample_clients(3, r["round"], 4, 2)
        assert r["bytes_sent"] == r["bytes_received"] == model_bytes * 2 * r["round"]
        assert r["wall_seconds"] >= r["round_seconds"] > 0
    for key in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck"):
        assert all(np.isfinite(r[key]) for r in rounds)
    assert [rep.server_round for rep in reports] == [0, 1, 2]
    # stateless clients (the default): each round's AdamW starts afresh (12 samples: one step)
    assert [r["optimizer_steps"] for r in rounds[1:]] == [1.0, 1.0]
    # the default cosine schedule over 2 rounds: the full rate, then half of it
    assert [r["lr"] for r in rounds[1:]] == pytest.approx([1e-3, 5e-4])


def test_rounds_record_each_sampled_clients_training_speed_and_config_its_placement(finished_run):
    result, _ = finished_run
    rounds = result.run_dir.read_rounds()
    assert "client_img_s" not in rounds[0]  # round 0 trains nobody
    for r in rounds[1:]:
        speeds = r["client_img_s"]  # partition id -> images per second of that client's fit
        assert sorted(int(p) for p in speeds) == sorted(r["clients"]) and all(v > 0 for v in speeds.values())
        # 12 images per client, one local epoch: its speed is 12 / its fit seconds, averaged by FedAvg;
        # rounds.jsonl keeps each client's speed to 3 decimals (server.client_speeds), the average unrounded
        half_unit = 5e-4
        assert min(speeds.values()) - half_unit <= r["train_img_s"] <= max(speeds.values()) + half_unit
    placement = json.loads(result.run_dir.config.read_text())["placement"]
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert placement["accelerator"] == expected and placement["precision"] == "32-true"
    assert placement["deterministic"] is False and placement["torch"] == torch.__version__


def test_kept_client_optimizer_continues_where_the_last_round_stopped(tmp_path, pchmr_cache):
    """--client-optimizer keep: the client's AdamW state survives in Flower's node context."""
    config = RunConfig(
        num_train=32,
        num_test=8,
        clients=1,
        per_round=1,
        rounds=2,
        batch_size=16,
        local_epochs=1,
        seed=3,
        client_optimizer="keep",
        out=str(tmp_path / "keep"),
    )
    rounds = execute(config).run_dir.read_rounds()
    assert [r["optimizer_steps"] for r in rounds[1:]] == [2.0, 4.0]
    with pytest.raises(Exception, match="--client-optimizer must be one of reset, keep"):
        RunConfig(client_optimizer="sometimes")


def test_training_changes_the_global_model_and_final_json_has_the_protocol(finished_run):
    result, _ = finished_run
    final = result.final
    rounds = result.run_dir.read_rounds()
    assert final["mpjpe_mm"] == rounds[-1]["mpjpe_mm"]
    assert final["round0"]["mpjpe_mm"] == rounds[0]["mpjpe_mm"]
    assert final["mpjpe_mm"] != final["round0"]["mpjpe_mm"]
    assert final["protocol"] == {
        "dataset": "synthetic",
        "joint_set": "anny-14",
        "alignment": "mid-hip (root)",
        "body_model": "anny",
        "ground_truth": "real",
    }
    assert final["mean_pose_mpjpe_mm"] > 0 and final["mean_pose_pa_mpjpe_mm"] > 0


def test_existing_run_directory_is_not_overwritten(finished_run):
    from pchmr.core.engine.config import ConfigError

    result, _ = finished_run
    with pytest.raises(ConfigError, match="already exists and is not empty; pass --resume"):
        execute(RunConfig(**CONFIG, out=str(result.run_dir.path)))


def test_a_diverged_round_stops_the_run_with_one_clear_error_and_saves_nothing_of_it(tmp_path, pchmr_cache):
    """lr 1e30 turns the clients' losses into NaN in round 1: each client refuses to send NaN
    weights; with every sampled client failed even the default tolerance (one reply) is not met, and
    the CLI prints one message naming the round, the partitions and their reason (not
    Ray's tracebacks), exits 1, and keeps round 0's record only."""
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    out = tmp_path / "run"
    args = [
        "run",
        "--num-train",
        "16",
        "--num-test",
        "8",
        "--clients",
        "2",
        "--per-round",
        "2",
        "--rounds",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e30",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert (
        "error: round 1: 2 of 2 sampled clients failed (train), 0 replied and at least one is needed "
        "(--min-fit-fraction unset): partition 0:" in message
    ), message
    assert "training loss became nan" in message and "lower the learning rate" in message
    assert "Traceback" not in result.output and "ClientAppActor" not in result.output
    assert "Traceback" in (out / "run.log").read_text(), "the tracebacks are kept in the run's log"
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0], "the broken round is neither evaluated nor recorded"
    assert not (out / "final.json").exists() and not (out / "checkpoints" / "last.pt").exists()


def test_a_non_finite_aggregate_or_prediction_is_refused_with_its_names():
    from pchmr.core.engine.federation.server import _check_finite

    _check_finite(3, {"a": torch.ones(2), "steps": torch.tensor(4)})
    with pytest.raises(
        FloatingPointError, match=r"round 3: .* non-finite values in 2 of 3 entries \(first: b, c\).*--resume"
    ):
        _check_finite(
            3, {"a": torch.ones(2), "b": torch.tensor([0.0, float("nan")]), "c": torch.tensor([float("inf")])}
        )


def test_a_failing_simulation_engine_is_reported_with_its_cause(tmp_path, pchmr_cache, monkeypatch):
    """Ray cannot place a client asking for 100 CPUs: Flower stops with "An error was encountered"
    wrapped twice; the run reports the engine's own reason, promptly."""
    from pchmr.core.engine.federation import simulation as federation

    monkeypatch.setattr(federation, "client_resources", lambda *args: {"num_cpus": 100.0, "num_gpus": 0.0})
    cfg = RunConfig(
        num_train=16, num_test=8, clients=2, per_round=2, rounds=1, batch_size=8, seed=5, out=str(tmp_path / "run")
    )
    with pytest.raises(
        RuntimeError, match=r"Simulation Engine \(Ray\) stopped before the run finished: ValueError: ActorPool is empty"
    ):
        execute(cfg)
    # the ServerApp thread was waiting for its nodes (for up to 600 s): it ends at once instead of
    # holding the process open
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _other_live_threads():
        time.sleep(0.2)
    assert not _other_live_threads()


def _other_live_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
