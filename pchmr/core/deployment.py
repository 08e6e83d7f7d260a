"""The federation on Flower's Deployment Engine: a SuperLink, SuperNodes, and ``flwr run``.

The Simulation Engine (:func:`pchmr.core.federation.run_simulation`) runs every client in
Ray actors of one process tree. Here each client is a Flower SuperNode — a long-running
process that may live on another device — and the server half runs as a ServerApp that
the SuperLink starts when ``flwr run`` submits the app:

* :data:`server_app` / :data:`client_app` are the module-level apps named in the generated
  app's ``pyproject.toml``; both find the prepared run directory (``config.json``,
  ``partition.json``) through the run config key ``pchmr-run-dir``. A SuperNode may
  override it with ``--node-config 'pchmr-run-dir="/local/copy"'`` (the directory on *its*
  disk that holds the copies of those two files);
* :class:`LocalDeployment` starts a SuperLink and N SuperNodes on loopback (for tests and
  the demo) and stops all of them on exit;
* :func:`run_deployment` writes a tiny Flower app directory and a private ``FLWR_HOME``,
  runs ``flwr run APP pchmr --stream`` and returns when ``final.json`` exists;
* :func:`federate_on_deployment` is the two combined (or a remote SuperLink): what
  ``pchmr.core.run.execute`` calls for ``engine == "deployment"``.

A SuperNode starts a fresh ClientApp process for every message, so each client pays the
imports and the model/data construction once per round (tens of seconds on a small CPU) on
top of its local training; the Simulation Engine keeps them in its Ray actors.

Runtime dependency installation (``uv sync``) is always disabled: pchmr and its torch are
already installed wherever the apps run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pchmr.core.federation import (
    PARTITION_KEY,
    RUN_DIR_KEY,
    FederatedServer,
    RoundReport,
    build_strategy,
    make_client_app,
)
from pchmr.core.rundir import METRIC_KEYS, RunDir

__all__ = [
    "DeploymentError",
    "LocalDeployment",
    "NodeLocalRunDir",
    "build_server",
    "client_app",
    "deployment_env",
    "federate_on_deployment",
    "run_deployment",
    "prepare_run_dir",
    "server_app",
    "write_app_dir",
    "write_flwr_home",
]

log = logging.getLogger("pchmr.deployment")

LOOPBACK = "127.0.0.1"
#: The SuperLink connection name written into the private ``$FLWR_HOME/config.toml``.
CONNECTION_NAME = "pchmr"
#: Subdirectory of the run directory that holds the generated app, FLWR_HOME and logs.
DEPLOY_SUBDIR = "deployment"
APP_PUBLISHER = "pchmr"
APP_NAME = "pchmr-federation"
NODE_WAIT_SECONDS = 120.0  # the ServerApp waits this long for every partition's SuperNode
START_TIMEOUT_SECONDS = 60.0  # SuperLink listening / SuperNode registered
STOP_GRACE_SECONDS = 10.0  # SIGTERM, then SIGKILL
POLL_SECONDS = 0.2
LOG_TAIL_LINES = 40
_NODE_REGISTERED = "SuperNode ID:"  # what flower-supernode logs once the SuperLink accepted it
_NO_UV_SYNC = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


class DeploymentError(RuntimeError):
    """A SuperLink/SuperNode did not start, or the run submitted with ``flwr run`` failed."""


# --------------------------------------------------------------------------------------
# the apps
# --------------------------------------------------------------------------------------
def _wait_for_nodes(grid: Any, expected: int, timeout: float = NODE_WAIT_SECONDS) -> None:
    """Block until ``expected`` SuperNodes are connected (a node may register late)."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            return
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"only {connected} of {expected} SuperNodes connected to the SuperLink within {timeout:.0f} s; "
                f"start one flower-supernode per client partition (partition-id=0..{expected - 1})"
            )
        time.sleep(1.0)


def build_server(run_dir: str | os.PathLike[str]) -> FederatedServer:
    """The :class:`FederatedServer` of a run directory prepared by ``pchmr.core.run.execute``.

    Built exactly as ``execute`` builds it: components and strategy from ``config.json``'s
    ``run`` section, with the mean-pose baselines of the train/test split.
    """
    from pchmr.core.config import RunConfig
    from pchmr.core.experiment import build_components, mean_pose_baselines

    rd = RunDir(run_dir)
    config = RunConfig.from_saved(rd.read_config()["run"])
    if not rd.partition.exists():
        raise FileNotFoundError(f"{rd.path} has no {rd.partition.name}; prepare the run directory first")
    components = build_components(config)
    strategy = build_strategy(config)
    baselines = mean_pose_baselines(components.data.train, components.data.test, components.applied_protocol().alignment)
    return FederatedServer(rd, components, strategy, baselines=baselines)


def prepare_run_dir(config: Any, run_dir: str | os.PathLike[str]) -> RunDir:
    """Write ``config.json`` and ``partition.json`` as ``pchmr.core.run.execute`` does, without
    federating: what the ServerApp and each SuperNode read. Returns the run directory.

    ``config`` is a federated :class:`~pchmr.core.config.RunConfig`; its ``cache_dir`` is
    resolved to an absolute path so the Flower processes read the same prepared data.
    """
    from pchmr.core.experiment import build_components, default_cache_dir
    from pchmr.core.partition import save_partition
    from pchmr.core.run import check_plugins, make_partition, write_run_config

    if config.mode != "federated":
        raise ValueError(f"the Deployment Engine runs federated experiments only, got mode '{config.mode}'")
    check_plugins(config)
    if config.cache_dir is None:
        config = config.replace(cache_dir=str(default_cache_dir().resolve()))
    strategy = build_strategy(config)
    rd = RunDir(run_dir).create()
    components = build_components(config)
    save_partition(make_partition(config, components.data), rd.partition)
    write_run_config(rd, config, components, strategy)
    return rd


def _make_server_app() -> Any:
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_dir = str(context.run_config[RUN_DIR_KEY])
        rd = RunDir(run_dir)
        handler = rd.attach_log()  # this process is the SuperLink's child: log into run.log too
        try:
            server = build_server(run_dir)
            _wait_for_nodes(grid, server.config.clients)
            server.main(grid)
            if server.error is not None:
                raise server.error
        finally:
            for name in ("pchmr", "flwr"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()

    return app


class NodeLocalRunDir(ClientApp):  # type: ignore[misc]
    """A ClientApp that lets a SuperNode's ``node_config`` ``pchmr-run-dir`` (its local copy of
    the run directory) take precedence over the run config's, then calls ``inner``."""

    def __init__(self, inner: Callable[[Message, Context], Message]) -> None:
        super().__init__()
        self._inner = inner

    def __call__(self, message: Message, context: Context) -> Message:
        local = context.node_config.get(RUN_DIR_KEY)
        if local:
            context.run_config[RUN_DIR_KEY] = str(local)
        return self._inner(message, context)


server_app = _make_server_app()
client_app = NodeLocalRunDir(make_client_app())


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------
def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def deployment_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment of every Flower process started here: no ``uv sync``, private FLWR_HOME."""
    env = dict(os.environ)
    # Flower's processes start further console scripts (flower-superexec, flwr-serverapp, ...) by name:
    # put this interpreter's bin directory first, so an un-activated venv finds its own.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[_NO_UV_SYNC] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _flower_exe(name: str) -> str:
    """The Flower console script next to this interpreter (the venv's), else on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None


def _start(name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> _Process:
    """Start ``argv`` in its own process group (so its children stop with it), output to a file."""
    log_file = log_path.open("ab")
    popen = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    return _Process(name, popen, log_path, log_file)


def _stop_all(processes: list[_Process], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for proc in processes:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        try:
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)  # also reaps grandchildren left in the group
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) did not exit after SIGKILL", proc.name, proc.popen.pid)
        if not _group_gone(proc.popen.pid, grace):  # killed grandchildren take a moment to die
            log.error("processes of %s's group %d outlived SIGKILL", proc.name, proc.popen.pid)
        proc.log_file.close()


def live_in_group(pgid: int) -> list[int]:
    """Pids of the running (not zombie) processes in process group ``pgid``, from Linux's /proc
    (empty where there is no /proc)."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return []
    live = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry.name))
    return live


def _group_gone(pgid: int, timeout: float, poll: float = 0.05) -> bool:
    """Wait until no running process is left in process group ``pgid``."""
    deadline = time.monotonic() + timeout
    while live_in_group(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def _signal_group(proc: _Process, sig: int) -> None:
    try:
        os.killpg(proc.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(predicate: Any, proc: _Process, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if not proc.alive():
            raise DeploymentError(f"{proc.name} exited (code {proc.popen.returncode}) before {what}:\n{tail(proc.log_path)}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"{proc.name} did not report {what} within {timeout:.0f} s:\n{tail(proc.log_path)}")
        time.sleep(POLL_SECONDS)


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on loopback, for as long as the ``with`` lasts.

    SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N"``. Logs go to
    ``log_dir`` (``superlink.log``, ``supernode-<i>.log``). ``address`` is the SuperLink's one
    HTTP address (Fleet, Control and Runtime APIs), usable as :func:`run_deployment`'s
    ``connection_address``.
    """

    num_nodes: int
    log_dir: Path
    flwr_home: Path | None = None
    start_timeout: float = START_TIMEOUT_SECONDS
    processes: list[_Process] = field(default_factory=list, init=False)
    address: str = field(default="", init=False)

    def __enter__(self) -> "LocalDeployment":
        if self.num_nodes < 1:
            raise ValueError(f"LocalDeployment needs at least one SuperNode, got num_nodes={self.num_nodes}")
        self.log_dir = Path(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        home = Path(self.flwr_home) if self.flwr_home is not None else self.log_dir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.flwr_home = home
        try:
            self._start_all(deployment_env(home))
        except BaseException:
            _stop_all(self.processes)
            self.processes.clear()
            raise
        return self

    def _start_all(self, env: dict[str, str]) -> None:
        port = free_port()
        self.address = f"{LOOPBACK}:{port}"
        link = _start(
            "superlink",
            [_flower_exe("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--host", LOOPBACK, "--port", str(port)],
            self.log_dir / "superlink.log",
            env,
        )
        self.processes.append(link)
        _wait_until(lambda: _port_open(LOOPBACK, port), link, f"listening on {self.address}", self.start_timeout)
        nodes = [self._start_node(i, env) for i in range(self.num_nodes)]
        for node in nodes:
            _wait_until(lambda node=node: _NODE_REGISTERED in node.log_path.read_text(errors="replace"),
                        node, "registering with the SuperLink", self.start_timeout)

    def _start_node(self, index: int, env: dict[str, str]) -> _Process:
        log_path = self.log_dir / f"supernode-{index}.log"
        log_path.write_bytes(b"")  # a fresh log, so registration is detected for this process only
        node = _start(
            f"supernode-{index}",
            [_flower_exe("flower-supernode"), "--insecure", "--superlink", self.address,
             "--host", LOOPBACK, "--port", str(free_port()),
             "--node-config", f"{PARTITION_KEY}={index} num-partitions={self.num_nodes}"],
            log_path,
            env,
        )
        self.processes.append(node)
        return node

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        _stop_all(self.processes)
        self.processes.clear()


# --------------------------------------------------------------------------------------
# submitting the run
# --------------------------------------------------------------------------------------
def write_app_dir(app_dir: Path, run_dir: Path) -> Path:
    """A minimal Flower app whose components are this module's apps (pchmr is installed).

    ``flwr run`` validates ``[project]`` name/version and ``[tool.flwr.app]`` publisher and
    components, then bundles the directory (just this ``pyproject.toml``) into a FAB.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    run_dir_value = str(Path(run_dir).resolve()).replace("\\", "\\\\").replace('"', '\\"')
    (app_dir / "pyproject.toml").write_text(
        f"""[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "pchmr's federated HMR training on Flower's Deployment Engine"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "{APP_PUBLISHER}"

[tool.flwr.app.components]
serverapp = "pchmr.core.deployment:server_app"
clientapp = "pchmr.core.deployment:client_app"

[tool.flwr.app.config]
{RUN_DIR_KEY} = "{run_dir_value}"
"""
    )
    return app_dir


def write_flwr_home(flwr_home: Path, connection_address: str, insecure: bool = True,
                    root_certificates: Path | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection ``pchmr`` set as default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION_NAME}"',
        "",
        f"[superlink.{CONNECTION_NAME}]",
        f'address = "{connection_address}"',
        f"insecure = {'true' if insecure else 'false'}",
    ]
    if root_certificates is not None:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class _RoundRelay:
    """Turns new lines of ``rounds.jsonl`` into :class:`RoundReport` calls (the CLI's progress)."""

    def __init__(self, rd: RunDir, on_round: Callable[[RoundReport], None] | None) -> None:
        self.rd = rd
        self.on_round = on_round
        self.seen = -1
        self.num_rounds = int(rd.read_config().get("run", {}).get("rounds", 0))

    def poll(self) -> None:
        if self.on_round is None or not self.rd.rounds.exists():
            return
        try:
            records = self.rd.read_rounds()
        except ValueError:  # a line being written right now
            return
        for record in records:
            if int(record["round"]) > self.seen:
                self.seen = int(record["round"])
                metrics = {k: float(record[k]) for k in METRIC_KEYS if k in record}
                self.on_round(RoundReport(self.seen, self.num_rounds, metrics, float(record.get("round_seconds", 0.0)),
                                          list(record.get("clients", []))))


def run_deployment(
    run_dir: str | os.PathLike[str],
    connection_address: str,
    app_dir: Path | None = None,
    timeout: float = 3600.0,
    insecure: bool = True,
    root_certificates: Path | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
) -> dict[str, Any]:
    """Submit the prepared run directory to a SuperLink and wait for the run to finish.

    Returns ``final.json``'s content. ``on_round`` is called for every round that appears in
    ``rounds.jsonl`` (evaluated rounds only). Raises :class:`DeploymentError` with the tail of
    ``deployment/flwr-run.log`` when ``flwr run`` fails, or when the run ends (or ``timeout``
    seconds pass) without a ``final.json``.
    """
    rd = RunDir(run_dir)
    relay = _RoundRelay(rd, on_round)  # also refuses a directory that was never prepared
    work = rd.path / DEPLOY_SUBDIR
    work.mkdir(parents=True, exist_ok=True)
    app = write_app_dir(Path(app_dir) if app_dir is not None else work / "app", rd.path)
    home = work / "flwr-home"
    write_flwr_home(home, connection_address, insecure, root_certificates)
    log_path = work / "flwr-run.log"
    if rd.final.exists():
        rd.final.unlink()  # only this run's final.json counts as done
    argv = [_flower_exe("flwr"), "run", str(app.resolve()), CONNECTION_NAME, "--stream"]
    proc = _start("flwr run", argv, log_path, deployment_env(home))
    deadline = time.monotonic() + timeout
    try:
        while proc.alive() and not rd.final.exists():
            relay.poll()
            if time.monotonic() > deadline:
                raise DeploymentError(f"the run did not finish within {timeout:.0f} s:\n{tail(log_path)}")
            time.sleep(POLL_SECONDS)
        relay.poll()
        if not rd.final.exists():
            raise DeploymentError(
                f"`flwr run` exited (code {proc.popen.returncode}) without writing {rd.final}:\n{tail(log_path)}\n"
                f"run.log:\n{tail(rd.log)}"
            )
    finally:
        _stop_all([proc])  # --stream follows the logs until the run ends; stop it once final.json is there
    return rd.read_json(rd.final)


def federate_on_deployment(
    run_dir: str | os.PathLike[str],
    num_clients: int,
    superlink: str | None = None,
    root_certificates: Path | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    timeout: float = 7 * 24 * 3600.0,
) -> dict[str, Any]:
    """``pchmr run --engine deployment``: federate a prepared run directory on the Deployment Engine.

    Without ``superlink``, start a SuperLink and ``num_clients`` SuperNodes on loopback
    (:class:`LocalDeployment`, logs in ``RUN/deployment/``) for the run and stop them after;
    with ``superlink`` (``host:port`` of a running SuperLink whose SuperNodes are started on
    the devices), submit to it — over TLS verified with ``root_certificates`` when given,
    insecure otherwise. Returns ``final.json``'s content.
    """
    rd = RunDir(run_dir)
    if superlink is not None:
        return run_deployment(rd.path, superlink, timeout=timeout, insecure=root_certificates is None,
                              root_certificates=root_certificates, on_round=on_round)
    with LocalDeployment(num_nodes=num_clients, log_dir=rd.path / DEPLOY_SUBDIR) as link:
        return run_deployment(rd.path, link.address, timeout=timeout, on_round=on_round)
