"""One experiment end to end: validate, prepare, partition, federate, write the run directory.

Everything that can be refused is refused before any data is prepared: unknown plugin names,
bad option values, a partition that cannot be made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pchmr.core.baselines import baseline_partition, run_baseline
from pchmr.core.config import ConfigError, RunConfig
from pchmr.core.data import HMRData
from pchmr.core.experiment import (
    Components,
    build_components,
    dataset_resolution,
    default_cache_dir,
    describe_plugins,
    mean_pose_baselines,
)
from pchmr.core.federation import FederatedServer, RoundReport, build_strategy, run_simulation
from pchmr.core.partition import Partition, load_partition, save_partition
from pchmr.core.registry import get_registry
from pchmr.core.rundir import RunDir
from pchmr.core.strategy import StrategyParts

__all__ = ["RunResult", "check_plugins", "default_run_dir", "execute", "resume_config"]

log = logging.getLogger("pchmr.run")


@dataclass
class RunResult:
    run_dir: RunDir
    final: dict[str, Any]
    seconds: float


def check_plugins(config: RunConfig) -> None:
    """Raise :class:`~pchmr.core.registry.UnknownPluginError` for any unknown plugin name."""
    registry = get_registry()
    for kind, name in (
        ("backbone", config.backbone),
        ("body_model", config.body_model),
        ("dataset", dataset_resolution(config.dataset)[0]),
        ("partitioner", config.partitioner),
        ("strategy", config.strategy),
    ):
        registry.info(kind, name)
    if config.privacy is not None:
        registry.info("privacy", config.privacy)


def default_run_dir(config: RunConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.backbone}{config.variant.lower()}-{config.strategy}-{config.partitioner}-s{config.seed}"


def resume_config(run_dir: Path) -> RunConfig:
    return RunConfig.from_saved(RunDir(run_dir).read_config()["run"])


def _effective_loss_weights(components: Components) -> dict[str, Any]:
    """The weights the run trains with: LossWeights plus the backbone's own terms (their base
    weight, the user's override winning, and the epoch-0 factor of their schedule)."""
    module = components.make_module()
    weights = module.loss_weights.as_dict()
    base = module.backbone.extra_loss_weights(0)
    ramp = module.backbone.extra_loss_schedule(0)
    weights["extra"] = {name: module.loss_weights.extra.get(name, value) for name, value in base.items()}
    weights["extra_schedule_at_epoch_0"] = {name: ramp.get(name, 1.0) for name in base}
    return weights


def _encoder_record(config: RunConfig, components: Components) -> dict[str, Any]:
    """Where the CNN's initial weights came from (file and SHA-256) and whether it trains."""
    path = components.encoder_weights
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    return {"weights": path, "sha256": digest, "source": config.encoder_weights if path else None,
            "frozen": config.encoder_frozen}


def write_run_config(rd: RunDir, config: RunConfig, components: Components, strategy: StrategyParts) -> None:
    """config.json: the resolved options plus what was built from them (providers, loss weights, protocol)."""
    rd.write_json(
        rd.config,
        {
            "run": config.to_dict(),
            "plugins": describe_plugins(config),
            "strategy": dict(strategy.describe),
            "loss_weights": _effective_loss_weights(components),
            "encoder": _encoder_record(config, components),
            "protocol": components.protocol().as_dict(),
            "body_model": components.body_model.describe(),
            "data": dict(components.data.protocol),
        },
    )


def make_partition(config: RunConfig, data: HMRData) -> Partition:
    partitioner = get_registry().get("partitioner", config.partitioner)
    return partitioner(data, config.clients, config.seed, dict(config.partition_options))


def execute(
    config: RunConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    on_round: Callable[[RoundReport], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> RunResult:
    """Run (or resume) one experiment; returns the run directory and ``final.json``'s content."""
    status = on_status or (lambda message: None)
    check_plugins(config)
    if config.cache_dir is None:  # clients in other processes must read the very same cache
        config = config.replace(cache_dir=str(default_cache_dir().resolve()))
    strategy = build_strategy(config)  # validates strategy and privacy options (and their compatibility) before any heavy work
    if run_dir is None:
        run_dir = Path(config.out) if config.out else default_run_dir(config)
    rd = RunDir(run_dir)
    if not resume and rd.path.exists() and any(rd.path.iterdir()):
        raise ConfigError(f"run directory {rd.path} already exists and is not empty; pass --resume to continue it or choose another --out")
    created = not rd.path.exists()
    rd.create()
    handler = rd.attach_log()
    started = time.perf_counter()
    set_up = False
    try:
        status("loading the body model and preparing the data (cached after the first run)")
        components = build_components(config, progress=status)
        if resume and rd.partition.exists():
            partition = load_partition(rd.partition)
        else:
            partition = (
                make_partition(config, components.data)
                if config.mode == "federated"
                else baseline_partition(config.mode, len(components.data.train), config.fraction, config.seed)
            )
            save_partition(partition, rd.partition)
        if not resume or not rd.config.exists():
            write_run_config(rd, config, components, strategy)
        baselines = mean_pose_baselines(components.data.train, components.data.test, components.applied_protocol().alignment)
        set_up = True
        if config.mode == "federated" and config.engine == "deployment":
            from pchmr.core.deployment import federate_on_deployment

            status(f"federating {config.clients} clients on Flower's Deployment Engine")
            federate_on_deployment(
                rd.path.resolve(), config.clients, superlink=config.superlink,
                root_certificates=Path(config.root_certificates) if config.root_certificates else None,
                on_round=on_round,
            )
        elif config.mode == "federated":
            server = FederatedServer(rd, components, strategy, on_round=on_round, baselines=baselines)
            status(f"federating {config.clients} clients, {config.per_round} per round, {config.rounds} rounds")
            run_simulation(server)
        else:
            size = partition.sizes()[0]
            status(f"{config.mode} baseline: one trainer on {size} samples, {config.epochs} epochs")
            run_baseline(rd, components, partition, on_round, baselines)
    finally:
        for name in ("pchmr", "flwr"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        if not set_up and created and not resume:
            # refused before anything ran (bad data, partition or model options): leave no half-made
            # directory behind, so the same --out works once the input is fixed
            shutil.rmtree(rd.path, ignore_errors=True)
    final = json.loads(rd.final.read_text())
    return RunResult(rd, final, time.perf_counter() - started)
