"""One experiment end to end: validate, prepare, partition, federate, write the run directory.

Everything that can be refused is refused before any data is prepared: unknown plugin names,
bad option values, a partition that cannot be made.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pchmr.core.engine.baselines import run_baseline
from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.devices import determinism
from pchmr.core.engine.federation.common import RoundReport
from pchmr.core.engine.federation.deployment import federate_on_deployment
from pchmr.core.engine.federation.server import FederatedServer
from pchmr.core.engine.federation.simulation import run_simulation
from pchmr.core.engine.preparation import prepare, resolve
from pchmr.core.engine.resume import check_checkpoint_state, check_resumable
from pchmr.core.engine.rundir import RunDir, detach_log

__all__ = ["RunResult", "default_run_dir", "execute", "resume_config"]

log = logging.getLogger("pchmr.run")


@dataclass
class RunResult:
    run_dir: RunDir
    final: dict[str, Any]
    seconds: float


def default_run_dir(config: RunConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return (
        Path("runs")
        / f"{stamp}-{config.backbone}{config.variant.lower()}-{config.strategy}-{config.partitioner}-s{config.seed}"
    )


def resume_config(run_dir: Path) -> RunConfig:
    """The config of the run in ``run_dir`` (:meth:`RunDir.run_config`: refusals name its config.json)."""
    return RunDir(run_dir).run_config()


def execute(
    config: RunConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    on_round: Callable[[RoundReport], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    federate: Callable[[FederatedServer], None] | None = None,
) -> RunResult:
    """Run (or resume) one experiment; returns the run directory and ``final.json``'s content.

    ``federate`` runs a federated experiment's prepared server on an engine that already exists: the
    Flower app's ServerApp (:mod:`pchmr.cli.flower_app`, under ``flwr run``) passes one that drives
    the server on the grid Flower gave it; by default the Simulation Engine is started here
    (:func:`~pchmr.core.engine.federation.simulation.run_simulation`), or the Deployment Engine for
    ``engine == "deployment"``."""
    status = on_status or (lambda message: None)
    config, strategy = resolve(config)  # refuses bad plugins and options before any heavy work
    if run_dir is None:
        run_dir = Path(config.out) if config.out else default_run_dir(config)
    rd = RunDir(run_dir)
    if rd.path.exists() and not rd.path.is_dir():
        raise ConfigError(f"run directory {rd.path} is a file, not a directory; choose another --out")
    if resume:
        check_resumable(rd, config)  # before anything is written, the log included
    elif rd.path.exists() and any(rd.path.iterdir()):
        raise ConfigError(
            f"run directory {rd.path} already exists and is not empty; pass --resume to continue it or choose another --out"
        )
    made = _topmost_missing(rd.path)  # what a refusal below removes again: runs/ too when this made it
    try:
        rd.create()
    except OSError as exc:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise ConfigError(
            f"cannot create the run directory {rd.path}: {exc.strerror or exc} ({exc.filename}); choose another --out"
        ) from None
    handler = rd.attach_log()
    started = time.perf_counter()
    set_up = False
    try:
        if resume:  # a checkpoint that asks to run code is refused before any data or engine starts
            rd.check_resumable()
        with determinism(config.deterministic):  # --deterministic: this process's part of the run
            prepared = prepare(config, strategy, rd, resume=resume, status=status)
            if config.mode == "federated" and config.engine == "deployment" and federate is None:
                set_up = True
                status(f"federating {config.clients} clients on Flower's Deployment Engine")
                federate_on_deployment(
                    rd.path.resolve(),
                    config.clients,
                    superlink=config.superlink,
                    root_certificates=Path(config.root_certificates) if config.root_certificates else None,
                    insecure=config.insecure,
                    node_auth=config.node_auth,
                    node_keys=Path(config.node_keys) if config.node_keys else None,
                    on_round=on_round,
                )
            elif config.mode == "federated":
                server = FederatedServer(
                    rd, prepared.components, strategy, on_round=on_round, baselines=prepared.baselines
                )
                if resume:
                    check_checkpoint_state(rd, server.module.state_dict())
                set_up = True  # the server accepted the model (mechanisms, checkpoint): the run starts
                status(f"federating {config.clients} clients, {config.per_round} per round, {config.rounds} rounds")
                (run_simulation if federate is None else federate)(server)
            else:
                set_up = True
                size = prepared.partition.sizes()[0]
                status(f"{config.mode} baseline: one trainer on {size} samples, {config.epochs} epochs")
                run_baseline(rd, prepared.components, prepared.partition, on_round, prepared.baselines)
    finally:
        detach_log(handler)
        if not set_up and not resume:
            # refused before anything ran (bad data, partition, model options or a mechanism the model
            # cannot take): leave no half-made directory behind, so the same --out works once the input
            # is fixed; a directory that existed (empty) before stays, emptied of what this run wrote
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            else:
                for child in rd.path.iterdir():
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    final = json.loads(rd.final.read_text())
    return RunResult(rd, final, time.perf_counter() - started)


def _topmost_missing(path: Path) -> Path | None:
    """The top-most directory of ``path`` that does not exist yet (``path`` itself, or a parent such
    as the default ``runs/``), None when ``path`` exists."""
    made = None
    probe = path
    while not probe.exists() and probe != probe.parent:
        made, probe = probe, probe.parent
    return made
