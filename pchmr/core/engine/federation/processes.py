"""Flower processes on this machine: a SuperLink and SuperNodes on loopback, started as process
groups and stopped with everything they started; ports, environment and log tails."""

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
from typing import IO, Any

from pchmr.core.engine.federation.common import (
    PARTITION_KEY,
)
from pchmr.core.engine.federation.nodeauth import LocalPKI

__all__ = [
    "LOG_TAIL_LINES",
    "LOOPBACK",
    "POLL_SECONDS",
    "START_TIMEOUT_SECONDS",
    "STOP_GRACE_SECONDS",
    "DeploymentError",
    "LocalDeployment",
    "deployment_env",
    "free_port",
    "live_in_group",
    "tail",
    "write_flwr_home",
]

log = logging.getLogger("pchmr.deployment")


LOOPBACK = "127.0.0.1"


START_TIMEOUT_SECONDS = 60.0  # SuperLink listening / SuperNode registered


STOP_GRACE_SECONDS = 10.0  # SIGTERM, then SIGKILL


POLL_SECONDS = 0.2


LOG_TAIL_LINES = 40


_NODE_REGISTERED = "SuperNode ID:"  # what flower-supernode logs once the SuperLink accepted it


_NO_UV_SYNC = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


#: The SuperLink connection name written into a private ``$FLWR_HOME/config.toml``.
CONNECTION_NAME = "pchmr"


class DeploymentError(RuntimeError):
    """A SuperLink/SuperNode did not start, or the run submitted with ``flwr run`` failed."""


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
            raise DeploymentError(
                f"{proc.name} exited (code {proc.popen.returncode}) before {what}:\n{tail(proc.log_path)}"
            )
        if time.monotonic() > deadline:
            raise DeploymentError(f"{proc.name} did not report {what} within {timeout:.0f} s:\n{tail(proc.log_path)}")
        time.sleep(POLL_SECONDS)


def write_flwr_home(
    flwr_home: Path, connection_address: str, insecure: bool = True, root_certificates: Path | None = None
) -> Path:
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


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on loopback, for as long as the ``with`` lasts.

    SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N"``. Logs go to
    ``log_dir`` (``superlink.log``, ``supernode-<i>.log``). ``address`` is the SuperLink's one
    HTTP address (Fleet, Control and Runtime APIs), usable as :func:`run_deployment`'s
    ``connection_address``.

    With ``pki`` (:class:`~pchmr.core.engine.federation.nodeauth.LocalPKI`) the SuperLink speaks
    TLS with the PKI's server certificate and authenticates SuperNodes
    (``--enable-supernode-auth``): node ``i``'s public key is registered through the Control API
    (:meth:`register`) and the node signs with its private key. Without it everything is
    plaintext on loopback and any node is accepted.
    """

    num_nodes: int
    log_dir: Path
    flwr_home: Path | None = None
    pki: LocalPKI | None = None
    start_timeout: float = START_TIMEOUT_SECONDS
    processes: list[_Process] = field(default_factory=list, init=False)
    address: str = field(default="", init=False)

    def __enter__(self) -> LocalDeployment:
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
        if self.pki is None:
            security = ["--insecure"]
        else:
            security = [
                "--ssl-ca-certfile",
                str(self.pki.ca_certificate),
                "--ssl-certfile",
                str(self.pki.server_certificate),
                "--ssl-keyfile",
                str(self.pki.server_key),
                "--enable-supernode-auth",
            ]
        link = _start(
            "superlink",
            [
                _flower_exe("flower-superlink"),
                *security,
                "--disable-runtime-dependency-installation",
                "--host",
                LOOPBACK,
                "--port",
                str(port),
            ],
            self.log_dir / "superlink.log",
            env,
        )
        self.processes.append(link)
        _wait_until(lambda: _port_open(LOOPBACK, port), link, f"listening on {self.address}", self.start_timeout)
        write_flwr_home(
            Path(self.flwr_home),  # type: ignore[arg-type]  # set by __enter__
            self.address,
            insecure=self.pki is None,
            root_certificates=None if self.pki is None else self.pki.ca_certificate,
        )
        if self.pki is not None:
            for index in range(self.num_nodes):
                self.register(self.pki.node_public_key(index))
        nodes = [self.start_node(i, env=env) for i in range(self.num_nodes)]
        for node in nodes:
            self.wait_registered(node)

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``);
        returns the node id Flower ties to that key."""
        import json

        argv = [_flower_exe("flwr"), "supernode", "register", str(public_key), CONNECTION_NAME, "--format", "json"]
        done = subprocess.run(
            argv, env=deployment_env(self.flwr_home), capture_output=True, text=True, timeout=self.start_timeout
        )
        try:
            return int(json.loads(done.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(
                f"registering the SuperNode key {public_key} failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-2000:]}"
            ) from None

    def start_node(
        self,
        partition: int,
        private_key: Path | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> _Process:
        """Start a SuperNode claiming ``partition``; with a PKI it signs with ``private_key``
        (default: node ``partition``'s key). Logs to ``supernode-<name or partition>.log``."""
        name = str(partition) if name is None else name
        log_path = self.log_dir / f"supernode-{name}.log"
        log_path.write_bytes(b"")  # a fresh log, so registration is detected for this process only
        if self.pki is None:
            security = ["--insecure"]
        else:
            key = self.pki.node_private_key(partition) if private_key is None else private_key
            security = ["--root-certificates", str(self.pki.ca_certificate), "--auth-supernode-private-key", str(key)]
        node = _start(
            f"supernode-{name}",
            [
                _flower_exe("flower-supernode"),
                *security,
                "--superlink",
                self.address,
                "--host",
                LOOPBACK,
                "--port",
                str(free_port()),
                "--node-config",
                f"{PARTITION_KEY}={partition} num-partitions={self.num_nodes}",
            ],
            log_path,
            deployment_env(self.flwr_home) if env is None else env,
        )
        self.processes.append(node)
        return node

    def wait_registered(self, node: _Process) -> None:
        """Wait until ``node`` logged that the SuperLink accepted it."""
        _wait_until(
            lambda: _NODE_REGISTERED in node.log_path.read_text(errors="replace"),
            node,
            "registering with the SuperLink",
            self.start_timeout,
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        _stop_all(self.processes)
        self.processes.clear()
