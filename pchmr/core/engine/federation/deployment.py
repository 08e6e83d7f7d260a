"""The federation on Flower's Deployment Engine: a SuperLink, SuperNodes, and ``flwr run``.

The Simulation Engine (:func:`pchmr.core.engine.federation.simulation.run_simulation`) runs every client in
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
  ``pchmr.core.engine.run.execute`` calls for ``engine == "deployment"``.

A SuperNode starts a fresh ClientApp process for every message, so each client pays the
imports and the model/data construction once per round (tens of seconds on a small CPU) on
top of its local training; the Simulation Engine keeps them in its Ray actors.

Runtime dependency installation (``uv sync``) is always disabled: pchmr and its torch are
already installed wherever the apps run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pchmr.core.engine.config import RunConfig, is_loopback
from pchmr.core.engine.federation.client import make_client_app
from pchmr.core.engine.federation.common import (
    RUN_DIR_KEY,
    RoundReport,
)
from pchmr.core.engine.federation.nodeauth import (
    NODE_KEYS_FILE,
    LocalPKI,
    read_binding,
    read_node_keys,
    write_binding,
)
from pchmr.core.engine.federation.processes import (
    CONNECTION_NAME,
    POLL_SECONDS,
    DeploymentError,
    LocalDeployment,
    _flower_exe,
    _start,
    _stop_all,
    deployment_env,
    tail,
    write_flwr_home,
)
from pchmr.core.engine.federation.server import FederatedServer
from pchmr.core.engine.preparation import load_prepared, prepare, resolve
from pchmr.core.engine.rundir import METRIC_KEYS, RunDir, detach_log

__all__ = [
    "DeploymentError",
    "LocalDeployment",
    "NodeLocalRunDir",
    "build_server",
    "client_app",
    "deployment_env",
    "federate_on_deployment",
    "prepare_run_dir",
    "run_deployment",
    "server_app",
    "write_app_dir",
    "write_flwr_home",
]

log = logging.getLogger("pchmr.deployment")

#: Subdirectory of the run directory that holds the generated app, FLWR_HOME and logs.
DEPLOY_SUBDIR = "deployment"
APP_PUBLISHER = "pchmr"
APP_NAME = "pchmr-federation"
NODE_WAIT_SECONDS = 120.0  # the ServerApp waits this long for every partition's SuperNode


# --------------------------------------------------------------------------------------
# the apps
# --------------------------------------------------------------------------------------
def build_server(run_dir: str | os.PathLike[str]) -> FederatedServer:
    """The :class:`FederatedServer` of a run directory prepared by :func:`prepare_run_dir` (or by
    ``pchmr run --engine deployment``), rebuilt from it as the run preparation built it
    (:func:`~pchmr.core.engine.preparation.load_prepared`). It waits :data:`NODE_WAIT_SECONDS` for
    the SuperNodes and, when some never connect, says how to start them."""
    prepared = load_prepared(run_dir)
    server = FederatedServer(prepared.run_dir, prepared.components, prepared.strategy, baselines=prepared.baselines)
    server.node_wait_seconds = NODE_WAIT_SECONDS
    server.node_binding = read_binding(prepared.run_dir.path)  # node-keys.json: partitions bound to node keys
    clients = prepared.config.clients
    server.missing_nodes_hint = (
        f"; start one flower-supernode per client partition (--node-config partition-id=0..{clients - 1})"
    )
    return server


def prepare_run_dir(config: RunConfig, run_dir: str | os.PathLike[str]) -> RunDir:
    """Write ``config.json`` and ``partition.json`` as ``pchmr run`` does, without federating:
    what the ServerApp and each SuperNode read. Returns the run directory.

    ``config`` is a federated :class:`~pchmr.core.engine.config.RunConfig`; its ``cache_dir`` is
    resolved to an absolute path so the Flower processes read the same prepared data.
    """
    if config.mode != "federated":
        raise ValueError(f"the Deployment Engine runs federated experiments only, got mode '{config.mode}'")
    config, strategy = resolve(config)
    rd = RunDir(run_dir).create()
    prepare(config, strategy, rd, with_baselines=False)
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
            server.main(grid)
            if server.error is not None:
                raise server.error
        finally:
            detach_log(handler)

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
serverapp = "pchmr.core.engine.federation.deployment:server_app"
clientapp = "pchmr.core.engine.federation.deployment:client_app"

[tool.flwr.app.config]
{RUN_DIR_KEY} = "{run_dir_value}"
"""
    )
    return app_dir


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
                self.on_round(
                    RoundReport(
                        self.seen,
                        self.num_rounds,
                        metrics,
                        float(record.get("round_seconds", 0.0)),
                        list(record.get("clients", [])),
                        list(record.get("failures", [])),
                    )
                )


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
    insecure: bool = False,
    node_auth: bool = False,
    node_keys: Path | None = None,
) -> dict[str, Any]:
    """``pchmr run --engine deployment``: federate a prepared run directory on the Deployment Engine.

    Without ``superlink``, start a SuperLink and ``num_clients`` SuperNodes on loopback
    (:class:`LocalDeployment`, logs in ``RUN/deployment/``) for the run and stop them after;
    with ``node_auth`` that SuperLink speaks TLS and authenticates the SuperNodes with keys made
    in ``RUN/deployment/pki`` (kept for a resumed run), partition ``i`` bound to node ``i``'s key.
    With ``superlink`` (``host:port`` of a running SuperLink whose SuperNodes are started on
    the devices), submit to it — over TLS verified with ``root_certificates`` when given, with
    the partitions bound to the keys of ``node_keys`` (a TOML file) when given. A SuperLink on
    loopback may be reached without TLS; any other needs ``root_certificates`` or ``insecure``
    (then plaintext, with a warning in the log), else a ValueError says so.
    Returns ``final.json``'s content.
    """
    rd = RunDir(run_dir)
    if superlink is not None:
        if node_auth:
            raise ValueError("node_auth sets up the SuperLink started on loopback; for a remote one give node_keys")
        if root_certificates is None and not is_loopback(superlink):
            if not insecure:
                raise ValueError(
                    f"the SuperLink {superlink} is not on this machine and no root certificates are given: the "
                    "models would travel in plaintext; pass root_certificates (--root-certificates CA.pem) or "
                    "insecure=True (--insecure)"
                )
            log.warning(
                "talking to the SuperLink at %s WITHOUT TLS (--insecure): the models travel in plaintext, anyone on "
                "the path can read and alter them",
                superlink,
            )
        if node_keys is not None:
            if root_certificates is None:
                raise ValueError(
                    "node_keys needs TLS (root_certificates): Flower authenticates SuperNodes over TLS only"
                )
            _bind(rd, read_node_keys(node_keys, num_clients), f"--node-keys {node_keys}")
        return run_deployment(
            rd.path,
            superlink,
            timeout=timeout,
            insecure=root_certificates is None,
            root_certificates=root_certificates,
            on_round=on_round,
        )
    if node_keys is not None:
        raise ValueError("node_keys binds partitions at a remote SuperLink (superlink=...); on loopback use node_auth")
    pki = None
    if node_auth:
        pki = LocalPKI(rd.path / DEPLOY_SUBDIR / "pki").ensure(num_clients)
        _bind(rd, pki.binding(num_clients), f"the keys in {pki.directory}")
    with LocalDeployment(num_nodes=num_clients, log_dir=rd.path / DEPLOY_SUBDIR, pki=pki) as link:
        return run_deployment(
            rd.path,
            link.address,
            timeout=timeout,
            insecure=pki is None,
            root_certificates=None if pki is None else pki.ca_certificate,
            on_round=on_round,
        )


def _bind(rd: RunDir, binding: dict[int, str], source: str) -> None:
    """Write the run's ``node-keys.json``; a resumed run whose binding changes says so in the log."""
    earlier = read_binding(rd.path)
    if earlier is not None and earlier != binding:
        changed = sorted(p for p in set(earlier) | set(binding) if earlier.get(p) != binding.get(p))
        log.warning(
            "%s rebinds partition(s) %s to other node keys than this run's %s had",
            source,
            ", ".join(str(p) for p in changed),
            NODE_KEYS_FILE,
        )
    write_binding(rd.path, binding)
    log.info("%d partitions bound to SuperNode keys (%s, from %s)", len(binding), NODE_KEYS_FILE, source)
