"""A federated run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends.

Real processes: ``pchmr run`` (the venv's console script) on Flower's Simulation Engine, killed
from outside with SIGKILL, then ``pchmr run --resume DIR``. One run directory is killed three
times, at the three places a kill can land:

1. during round 0's evaluation (no checkpoint yet: the resume starts from scratch);
2. just after round 1's checkpoint appears (the kill lands in round 2's training);
3. after the last round's checkpoint, before ``final.json`` (the resume only summarises);

and the fourth invocation finishes. Its ``rounds.jsonl`` metrics, ``final.json`` metrics and
``model.pt`` must equal, bit for bit, those of an uninterrupted run with the same seed.

Kill points 1 and 3 last milliseconds, so the test makes the child *wait* there: a
``sitecustomize`` module (on the child's ``PYTHONPATH``, active only when ``PCHMR_TEST_PAUSE``
is set) wraps the server's ``evaluate`` / ``RunDir.summarize``, writes a marker file and sleeps;
the test sees the marker and sends SIGKILL. Nothing in pchmr itself knows about the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pchmr.core.engine.federation import server as federation
from pchmr.core.engine.federation.common import PARTITION_KEY
from pchmr.core.engine.federation.server import DISCOVERY_PROBES, FederatedServer
from pchmr.testing.strategies import task_identity

PCHMR = Path(sys.executable).parent / "pchmr"
RUN_ARGS = (
    "--num-train",
    "32",
    "--num-test",
    "16",
    "--clients",
    "4",
    "--per-round",
    "2",
    "--rounds",
    "3",
    "--batch-size",
    "16",
    "--seed",
    "5",
)
METRICS = ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck")
RUN_TIMEOUT = 900.0
POLL = 0.1

PAUSE_HOOK = textwrap.dedent(
    '''
    """Test hook (tests/test_resume.py): pause the pchmr server at a named point so it can be killed there."""
    import os

    _SPEC = os.environ.get("PCHMR_TEST_PAUSE")
    try:  # only the pchmr CLI process: Ray's helpers must not pay for importing pchmr (30 s start-up limit)
        with open("/proc/self/cmdline", "rb") as _fh:
            _IS_PCHMR = any(os.path.basename(a) == b"pchmr" for a in _fh.read().split(b"\\0"))
    except OSError:
        _IS_PCHMR = False
    if _SPEC and _IS_PCHMR:
        import time
        from pathlib import Path

        _POINT, _MARKER = _SPEC.split("=", 1)

        def _pause():
            Path(_MARKER).write_text(str(os.getpid()))
            while True:
                time.sleep(60)

        if _POINT == "evaluate":
            from pchmr.core.engine.federation import server as _federation

            _evaluate = _federation.FederatedServer.evaluate

            def _evaluate_then_pause(self, state):
                _evaluate(self, state)  # the evaluation itself runs; the kill lands before its record
                _pause()

            _federation.FederatedServer.evaluate = _evaluate_then_pause
        elif _POINT == "summarize":
            from pchmr.core.engine import rundir as _rundir

            _rundir.RunDir.summarize = lambda self, *args, **kwargs: _pause()
    '''
)


def _env(tmp: Path, pause: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PCHMR_TEST_PAUSE", None)
    env.setdefault("RAY_worker_niceness", "0")  # Ray's +15 starves the clients on a busy machine
    if pause is not None:
        hook_dir = tmp / "hook"
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(PAUSE_HOOK)
        env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PCHMR_TEST_PAUSE"] = pause
    return env


#: Ray's own start-up gives up after a fixed 30 s (raylet registration, metrics-agent port file); on a
#: saturated shared machine that happens before pchmr runs a line of its own. Such an attempt is
#: repeated (it wrote nothing: Ray starts before round 0); any other failure fails the test.
RAY_STARTUP_FAILURES = ("timed out during startup", "Timed out waiting for file")
ATTEMPTS = 5
RAY_CHECK_EVERY = 20  # polls


class RayStartupFailed(Exception):
    pass


def _start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(PCHMR), "run", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the pchmr process, then sweep its session (Ray's helpers share the driver's fate)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(1.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exited(proc: subprocess.Popen, log: Path, what: str) -> Exception:
    text = log.read_text(errors="replace")
    if proc.returncode != 0 and _ray_failed(log):
        return RayStartupFailed(text[-2000:])
    return AssertionError(f"pchmr exited ({proc.returncode}) {what}:\n{text[-3000:]}")


def _phase(
    args: list[str], cwd: Path, log: Path, pause: str | None = None, kill_when=None, fresh: Path | None = None
) -> None:
    """Run ``pchmr run ARGS`` until ``kill_when()`` holds (then SIGKILL it) or, without it, to a clean exit.

    ``fresh``: a run directory to delete before a repeated attempt (a first run cannot be resumed
    into an empty directory twice)."""
    for attempt in range(1, ATTEMPTS + 1):
        attempt_log = log.with_name(f"{log.stem}-{attempt}.txt")
        proc = _start(args, cwd, _env(cwd, pause), attempt_log)
        try:
            _run_phase(proc, attempt_log, kill_when)
            return
        except RayStartupFailed:
            if attempt == ATTEMPTS:
                raise
            if fresh is not None:
                shutil.rmtree(fresh, ignore_errors=True)
            time.sleep(5.0)


def _ray_failed(log: Path) -> bool:
    text = log.read_text(errors="replace")
    return any(marker in text for marker in RAY_STARTUP_FAILURES)


def _run_phase(proc: subprocess.Popen, log: Path, kill_when) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    polls = 0
    try:
        while kill_when is None or not kill_when():
            if proc.poll() is not None:
                if kill_when is None and proc.returncode == 0:
                    return
                raise _exited(proc, log, "before the kill point" if kill_when else "with an error")
            polls += 1
            if polls % RAY_CHECK_EVERY == 0 and _ray_failed(log):
                # the server thread keeps waiting for nodes after Ray gave up: do not wait for it
                raise RayStartupFailed(log.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {RUN_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(POLL)
    finally:
        if proc.poll() is None:
            _kill(proc)


def _checkpoint_round(run: Path) -> int:
    path = run / "checkpoints" / "last.pt"
    if not path.exists():
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=False)["round"])


def _round_metrics(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return [{"round": r["round"], "clients": r["clients"], **{k: r[k] for k in METRICS}} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pchmr_cache) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    _phase([*RUN_ARGS, "--out", str(tmp / "run")], tmp, tmp / "log.txt", fresh=tmp / "run")
    return tmp / "run"


@pytest.mark.slow  # five real runs of one to five minutes each on a shared 2-core machine
def test_killed_three_times_and_resumed_equals_an_uninterrupted_run(reference, tmp_path, pchmr_cache):
    run, marker = tmp_path / "run", tmp_path / "paused"
    resume = ["--resume", str(run)]

    # 1. SIGKILL during round 0's evaluation: no record, no checkpoint yet.
    _phase(
        [*RUN_ARGS, "--out", str(run)], tmp_path, tmp_path / "log1.txt", f"evaluate={marker}", marker.exists, fresh=run
    )
    marker.unlink()
    assert (run / "config.json").exists() and (run / "partition.json").exists()
    assert _checkpoint_round(run) == -1 and not (run / "final.json").exists()
    assert not (run / "rounds.jsonl").exists() or (run / "rounds.jsonl").read_text().strip() == ""

    # 2. SIGKILL as soon as round 1's checkpoint is on disk: the kill lands in round 2.
    _phase(resume, tmp_path, tmp_path / "log2.txt", kill_when=lambda: _checkpoint_round(run) >= 1)
    assert 1 <= _checkpoint_round(run) < 3 and not (run / "final.json").exists()

    # 3. SIGKILL after the last round's checkpoint, before final.json is written.
    _phase(resume, tmp_path, tmp_path / "log3.txt", f"summarize={marker}", marker.exists)
    assert _checkpoint_round(run) == 3 and not (run / "final.json").exists()

    # 4. The last resume finishes.
    _phase(resume, tmp_path, tmp_path / "log4.txt")

    assert _round_metrics(run) == _round_metrics(reference)
    final, expected = (json.loads((d / "final.json").read_text()) for d in (run, reference))
    for key in (*METRICS, "round", "round0", "bytes_sent", "bytes_received"):
        assert final[key] == expected[key], key
    got, want = (torch.load(d / "model.pt", map_location="cpu") for d in (run, reference))
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"final weights differ in {len(different)} entries, e.g. {different[:3]}"


# --------------------------------------------------------------------------------------
# discovery: every (re)start maps partitions to nodes before the first round
# --------------------------------------------------------------------------------------
class _Info:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _Reply:
    def __init__(self, node_id: int, partition: int) -> None:
        self.metadata = SimpleNamespace(src_node_id=node_id)
        self.content = {"info": {PARTITION_KEY: partition}}

    def has_error(self) -> bool:
        return False


class _Grid:
    """Flower's in-memory grid as _discover sees it: node ids, the LinkState's registration order
    (``listed``, or no ``state`` at all like a Deployment-Engine grid) and query replies."""

    def __init__(self, partition_of: dict[int, int], listed: list[int] | None) -> None:
        self.partition_of = partition_of
        if listed is not None:
            self.state = SimpleNamespace(get_node_info=lambda: [_Info(n) for n in listed])
        self.asked: list[int] = []

    def get_node_ids(self) -> set[int]:
        return set(self.partition_of)

    def send_and_receive(self, messages, timeout):
        nodes = [m.metadata.dst_node_id for m in messages]
        self.asked += nodes
        return [_Reply(n, self.partition_of[n]) for n in nodes]


@pytest.fixture(autouse=True)
def _flower_task_identity():
    with task_identity():  # Flower stamps the query Messages with it
        yield


def _server(clients: int, fast: bool = True) -> SimpleNamespace:
    server = SimpleNamespace(
        config=SimpleNamespace(clients=clients, seed=1),
        fast_discovery=fast,
        node_wait_seconds=None,
        missing_nodes_hint="",
        node_binding=None,  # claims trusted, as on the Simulation Engine
    )
    server._query_partitions = lambda grid, ids: FederatedServer._query_partitions(server, grid, ids)
    return server


NODES = [9000 + 7 * i for i in range(40)]  # node of partition i, in registration order


def test_discovery_reads_the_engine_order_after_asking_only_the_probes():
    grid = _Grid({n: i for i, n in enumerate(NODES)}, listed=NODES)
    mapping = FederatedServer._discover(_server(40), grid)
    assert mapping == dict(enumerate(NODES))
    assert len(grid.asked) == DISCOVERY_PROBES and len(set(grid.asked)) == DISCOVERY_PROBES


def test_discovery_asks_every_node_when_the_order_is_wrong_or_unknown():
    shuffled = NODES[1:] + NODES[:1]  # the listing no longer matches the partitions
    for listed in (shuffled, None):
        grid = _Grid({n: i for i, n in enumerate(NODES)}, listed=listed)
        assert FederatedServer._discover(_server(40), grid) == dict(enumerate(NODES))
        assert sorted(set(grid.asked)) == sorted(NODES)
    grid = _Grid({n: i for i, n in enumerate(NODES)}, listed=NODES)
    FederatedServer._discover(_server(40, fast=False), grid)
    assert len(grid.asked) == len(NODES)


def test_discovery_waits_for_nodes_that_connect_late(monkeypatch):
    monkeypatch.setattr(federation.time, "sleep", lambda seconds: None)
    grid = _Grid({n: i for i, n in enumerate(NODES)}, listed=NODES)
    seen = iter([NODES[:10], NODES[:30]])  # the engine is still registering nodes
    grid.get_node_ids = lambda: set(next(seen, NODES))
    assert FederatedServer._discover(_server(40), grid) == dict(enumerate(NODES))


def test_discovery_names_partitions_without_a_node(monkeypatch):
    monkeypatch.setattr(federation, "NODE_WAIT_SECONDS", 0.05)
    grid = _Grid({n: i for i, n in enumerate(NODES[:39])}, listed=None)
    with pytest.raises(RuntimeError, match=r"1 of 40 client partitions have no node \(first: \[39\]\); 39 nodes"):
        FederatedServer._discover(_server(40), grid)


# --------------------------------------------------------------------------------------
# Ctrl-C: the first SIGINT stops the run at once, cleanly, and the run resumes exactly
# --------------------------------------------------------------------------------------
INTERRUPT_EXIT_SECONDS = 60.0


def _session_processes(sid: int) -> list[str]:
    """The processes still alive in session ``sid`` (the pchmr process and whatever Ray started in it)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.split(None, 2)[1:2] == [str(sid)]]


def _interrupt_after_round_one(args: list[str], cwd: Path, log: Path) -> tuple[int, float, subprocess.Popen]:
    """Start ``pchmr run ARGS``, wait for round 1's record, send SIGINT to its process group (what
    a terminal's Ctrl-C does: Ray's workers get it too); (exit code, seconds to exit, the process)."""
    run = Path(args[args.index("--out") + 1])
    for attempt in range(1, ATTEMPTS + 1):
        shutil.rmtree(run, ignore_errors=True)
        proc = _start(args, cwd, _env(cwd, None), log)
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while not ((run / "rounds.jsonl").exists() and len((run / "rounds.jsonl").read_text().splitlines()) >= 2):
                if proc.poll() is not None:
                    raise _exited(proc, log, "before round 1 was recorded")
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(POLL)
        except RayStartupFailed:
            if attempt == ATTEMPTS:
                raise
            time.sleep(5.0)
            continue
        except BaseException:
            _kill(proc)
            raise
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=INTERRUPT_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise AssertionError(
                f"still running {INTERRUPT_EXIT_SECONDS:.0f} s after SIGINT:\n{log.read_text()[-3000:]}"
            ) from None
        return code, time.monotonic() - start, proc
    raise AssertionError("unreachable")


@pytest.mark.slow  # one interrupted run, its resume, and the uninterrupted reference
def test_ctrl_c_exits_130_at_once_without_traceback_and_the_resumed_run_equals_an_uninterrupted_one(
    reference, tmp_path, pchmr_cache
):
    run, log = tmp_path / "run", tmp_path / "interrupted.txt"
    code, seconds, proc = _interrupt_after_round_one([*RUN_ARGS, "--out", str(run)], tmp_path, log)
    text = log.read_text(errors="replace")
    assert code == 130, text[-3000:]
    assert f"interrupted; resume with `pchmr run --resume {run}`" in " ".join(text.split()), text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    deadline = time.monotonic() + 30
    while _session_processes(proc.pid) and time.monotonic() < deadline:  # Ray's helpers end with the run
        time.sleep(0.5)
    assert not _session_processes(proc.pid), _session_processes(proc.pid)
    # nothing half-written: the checkpoint is a complete round, every record a whole line
    done = _checkpoint_round(run)
    assert done >= 1 and not (run / "final.json").exists()
    rounds = [json.loads(line)["round"] for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert rounds[: done + 1] == list(range(done + 1))
    print(f"SIGINT → exit 130 in {seconds:.1f} s, checkpoint of round {done}")

    _phase(["--resume", str(run)], tmp_path, tmp_path / "resumed.txt")
    assert _round_metrics(run) == _round_metrics(reference)
