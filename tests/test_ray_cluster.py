"""A simulation joins an existing Ray cluster (``--ray-address`` or ``$RAY_ADDRESS``) instead of
starting a private Ray: the address checks, the resource split over a cluster's nodes, and a run
against a Ray head this test starts on loopback and stops, whose metrics equal a private run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.devices import DeviceError
from pchmr.core.engine.federation.cluster import RAY_ADDRESS_ENV, cluster_address, cluster_resources
from pchmr.core.engine.run import execute


def _node(cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, "memory": 1e9}
    if gpus:
        resources["GPU"] = gpus
    return {"Alive": alive, "Resources": resources}


def test_cluster_resources_split_the_clusters_totals_and_fit_one_node():
    totals, per_client = cluster_resources([_node(4), _node(8, gpus=2)], use_gpus=True, per_round=3)
    assert totals == {"CPU": 12.0, "GPU": 2.0}
    assert per_client == {"num_cpus": 4.0, "num_gpus": pytest.approx(2 / 3)}
    # one client per round would ask for all 12 cores, which no node has: capped at the largest node
    _, alone = cluster_resources([_node(4), _node(8, gpus=2)], use_gpus=True, per_round=1)
    assert alone == {"num_cpus": 8.0, "num_gpus": 1.0}
    # --accelerator cpu: the cluster's GPUs are not handed out; dead and empty nodes do not count
    totals, cpu_only = cluster_resources(
        [_node(2, gpus=4), _node(64, alive=False), {"Alive": True, "Resources": {}}], use_gpus=False, per_round=2
    )
    assert totals == {"CPU": 2.0, "GPU": 0.0} and cpu_only == {"num_cpus": 1.0, "num_gpus": 0.0}
    _, shared = cluster_resources([_node(16, gpus=1)], use_gpus=True, per_round=4, client_gpus=0.5)
    assert shared == {"num_cpus": 4.0, "num_gpus": 0.5}


def test_a_cluster_without_cpus_or_with_too_few_gpus_is_refused_by_name():
    with pytest.raises(DeviceError, match=r"no CPU to run a client on \(1 live node\(s\)\).*ray start --address"):
        cluster_resources([_node(0, gpus=1)], use_gpus=True, per_round=2)
    with pytest.raises(DeviceError, match=r"--client-gpus 2 is more than the 1 GPU"):
        cluster_resources([_node(8, gpus=1)], use_gpus=True, per_round=2, client_gpus=2)


def test_the_address_comes_from_the_flag_then_ray_address_and_is_checked(monkeypatch):
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    assert cluster_address(RunConfig()) is None, "no address anywhere: a private Ray"
    monkeypatch.setenv(RAY_ADDRESS_ENV, "10.0.0.5:6379")
    assert cluster_address(RunConfig()) == "10.0.0.5:6379"
    assert cluster_address(RunConfig(ray_address="head:7000")) == "head:7000", "the flag wins over the variable"
    monkeypatch.setenv(RAY_ADDRESS_ENV, "ray://head:10001")
    with pytest.raises(ConfigError, match=r"\$RAY_ADDRESS must be HOST:PORT .* got 'ray://head:10001'"):
        cluster_address(RunConfig())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ray_address": "head"}, r"--ray-address must be HOST:PORT .* got 'head'"),
        ({"ray_address": "head:0"}, r"--ray-address must be HOST:PORT"),
        ({"ray_address": "head:70000"}, r"--ray-address must be HOST:PORT"),
        ({"ray_address": "head:1", "engine": "deployment"}, r"--engine deployment does not use Ray"),
        ({"ray_address": "head:1", "mode": "centralized"}, r"--mode centralized does not use Ray"),
    ],
)
def test_a_bad_ray_address_is_refused_up_front(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes)


def test_a_bad_ray_address_on_the_command_line_exits_2(tmp_path):
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    result = CliRunner().invoke(app, ["run", "--ray-address", "nohost", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "--ray-address must be HOST:PORT" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists(), "nothing was created for a refused configuration"


def test_joining_an_unreachable_cluster_is_refused_before_any_data(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    port = _free_port()  # nothing listens there
    monkeypatch.setenv(RAY_ADDRESS_ENV, f"127.0.0.1:{port}")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"--ray-address: could not join the Ray cluster at 127.0.0.1:{port}: Connection refused" in message
    assert f"ray start --head --port {port}" in message
    assert time.monotonic() - started < 30, "refused at once, not after Ray's minutes of retries"
    assert not (tmp_path / "run").exists(), "nothing was created for a refused configuration"


@pytest.fixture
def ray_head():
    """A Ray head on loopback with this machine's cores, in its own process group and temp dir
    (so no stale /tmp/ray/ray_current_cluster is left behind); yields its address, then stops it."""
    ray = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="pchmr-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={os.cpu_count()}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_until_started(proc, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_run_on_a_joined_cluster_equals_the_same_run_on_a_private_ray(tmp_path, pchmr_cache, ray_head, monkeypatch):
    import ray

    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    base = dict(num_train=16, num_test=8, clients=3, per_round=2, rounds=2, batch_size=8, seed=5)
    execute(RunConfig(**base, out=str(tmp_path / "private")))
    # Ray's own variable, as a lab's job script sets it
    monkeypatch.setenv(RAY_ADDRESS_ENV, ray_head)
    execute(RunConfig(**base, out=str(tmp_path / "cluster")))
    assert not ray.is_initialized(), "the run disconnected from the cluster"

    private, cluster = (_metrics(tmp_path / name) for name in ("private", "cluster"))
    assert [r["round"] for r in cluster["rounds"]] == [0, 1, 2]
    assert cluster == private
    log = (tmp_path / "cluster" / "run.log").read_text()
    assert f"joined the Ray cluster at {ray_head}: {os.cpu_count()} CPU(s), 0 GPU(s)" in log
    assert "joined the Ray cluster" not in (tmp_path / "private" / "run.log").read_text()
    # the head is still up after the run left it: a second run can join it
    probe = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address='{ray_head}', logging_level='ERROR'); "
         "print(int(ray.cluster_resources()['CPU']))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.strip().splitlines()[-1] == str(os.cpu_count()), probe.stderr


def _metrics(run: Path) -> dict:
    """Everything a run measured except how long it took: each round's record and final.json."""
    timing = ("seconds", "img_s")
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    rounds = [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rounds]
    final = json.loads((run / "final.json").read_text())
    final = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not any(t in k for t in timing)}
    return {"rounds": rounds, "final": final}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_started(proc: subprocess.Popen, timeout: float) -> None:
    """Until ``ray start`` says the runtime started (its node registered), reading its output on a
    thread so a silent head cannot hang the test."""
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "Ray runtime started" in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not started.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not start (exit code {proc.poll()}): {''.join(lines)[-2000:]}")
