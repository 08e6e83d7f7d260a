"""One run-preparation path, used by ``pchmr run`` on either Flower engine and by the baselines.

:func:`resolve` refuses what can be refused before any heavy work (unknown plugin names, options a
plugin's declared options class refuses, an incompatible privacy mechanism); :func:`prepare` then builds the
components, makes (or, on resume, reads) the partition, writes ``config.json`` and computes the
mean-pose baselines. :func:`load_prepared` rebuilds the same from a prepared run directory, in
the process that serves it (the Deployment Engine's ServerApp).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.options import declared_options, read_options
from pchmr.core.contracts.partition import Partition, load_partition
from pchmr.core.contracts.strategy import StrategyParts
from pchmr.core.engine.baselines import baseline_partition
from pchmr.core.engine.components import (
    Components,
    build_components,
    dataset_resolution,
)
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.devices import DeviceError, Placement, client_resources, visible_gpus
from pchmr.core.engine.evaluation import mean_pose_baselines
from pchmr.core.engine.federation.cluster import check_reachable, cluster_address
from pchmr.core.engine.federation.common import build_strategy
from pchmr.core.engine.registry import get_registry
from pchmr.core.engine.rundir import RunDir
from pchmr.core.engine.tracking import check_loggers
from pchmr.core.kit.cache import default_cache_dir

__all__ = [
    "OPTION_FIELDS",
    "PreparedRun",
    "check_options",
    "check_plugins",
    "chosen_plugins",
    "describe_plugins",
    "load_prepared",
    "make_partition",
    "prepare",
    "resolve",
    "run_placement",
    "write_run_config",
]


@dataclass
class PreparedRun:
    """Everything a run needs once its directory is prepared."""

    config: RunConfig
    run_dir: RunDir
    components: Components
    partition: Partition
    strategy: StrategyParts
    baselines: dict[str, float]


def chosen_plugins(config: RunConfig) -> dict[str, str]:
    """plugin kind → the name the run uses, for every kind a run uses: what :func:`check_plugins`
    checks and what ``config.json`` records (:func:`describe_plugins`)."""
    chosen = {
        "backbone": config.backbone,
        "body_model": config.body_model,
        "dataset": dataset_resolution(config.dataset)[0],
        "partitioner": config.partitioner,
        "strategy": config.strategy,
    }
    if config.privacy is not None:
        chosen["privacy"] = config.privacy
    return chosen


#: plugin kind → the RunConfig field holding the options a user gives it.
OPTION_FIELDS = {
    "backbone": "backbone_options",
    "dataset": "dataset_options",
    "partitioner": "partition_options",
    "strategy": "strategy_options",
    "privacy": "privacy_options",
}


def check_plugins(config: RunConfig) -> None:
    """Raise :class:`~pchmr.core.engine.registry.UnknownPluginError` for any unknown plugin name,
    then :func:`check_options`; a :class:`~pchmr.core.engine.config.ConfigError` for a ``--logger``
    whose package is not installed (naming the pchmr extra that installs it)."""
    registry = get_registry()
    for kind, name in chosen_plugins(config).items():
        registry.info(kind, name)
    check_options(config)
    check_loggers(config.loggers)


def check_options(config: RunConfig) -> None:
    """Read every chosen plugin's options (:data:`OPTION_FIELDS`) through the class its factory
    declares (:class:`~pchmr.core.contracts.options.DeclaresOptions`): an
    :class:`~pchmr.core.contracts.errors.OptionError` for a bad one, before any data is prepared.
    A plugin declaring no options class receives its options unchecked, as before."""
    registry = get_registry()
    chosen = chosen_plugins(config)
    for kind, field_name in OPTION_FIELDS.items():
        if kind not in chosen:
            continue
        declared = declared_options(registry.get(kind, chosen[kind]))
        if declared is None:
            continue
        options = getattr(config, field_name)
        if kind == "dataset":  # as the factory receives them, with mixed's member list
            options = dataset_resolution(config.dataset, options, config.eval_datasets)[1]
        read_options(declared, options, plugin=chosen[kind], kind=kind)


def describe_plugins(config: RunConfig) -> dict[str, Any]:
    """Which distribution provided each plugin the run uses (written into config.json)."""
    registry = get_registry()
    return {
        kind: {"name": name, "provider": registry.info(kind, name).provider}
        for kind, name in chosen_plugins(config).items()
    }


def run_placement(config: RunConfig) -> Placement | None:
    """Where this process runs the run's server evaluation or baseline (``config.placement()``),
    checked against what the run asks of it: a :class:`~pchmr.core.engine.devices.DeviceError`
    naming the option for an accelerator this machine lacks, or a ``--client-gpus`` share Ray
    cannot give here; a Ray cluster to join (``--ray-address``/``$RAY_ADDRESS``) that nothing
    answers at (a :class:`~pchmr.core.engine.config.ConfigError`). None for a Deployment Engine run on a remote ``--superlink``: its ServerApp
    and SuperNodes resolve the placement on their own machines."""
    if config.mode == "federated" and config.engine == "deployment" and config.superlink is not None:
        return None
    placement = config.placement()
    if config.mode == "federated" and config.engine == "simulation":
        address = cluster_address(config)
        if address is not None:  # the clients' GPUs are the cluster's, checked when the run joins it
            check_reachable(address)
            return placement
    if config.client_gpus is not None:
        if not placement.on_gpu:
            raise DeviceError(
                f"--client-gpus {config.client_gpus:g} gives each simulated client a share of a GPU, but "
                f"--accelerator {config.accelerator} resolved to the {placement.accelerator}; use --accelerator gpu "
                "on a machine with one, or leave --client-gpus out"
            )
        client_resources(os.cpu_count() or 1, visible_gpus(placement), config.per_round, config.client_gpus)
    return placement


def resolve(config: RunConfig) -> tuple[RunConfig, StrategyParts]:
    """The config with its cache directory made absolute (clients in other processes read the very
    same cache) and the run's strategy; refuses unknown plugins, bad options (every chosen
    plugin's, through its declared options class) and a placement this machine cannot give
    (:func:`run_placement`) before any data is prepared."""
    check_plugins(config)
    run_placement(config)
    if config.cache_dir is None:
        config = config.replace(cache_dir=str(default_cache_dir().resolve()))
    return config, build_strategy(config)


def make_partition(config: RunConfig, data: HMRData) -> Partition:
    """The run's client partition: the partitioner plugin's for a federated run, else the baseline's
    (everything on one device, or the naive device's share)."""
    if config.mode != "federated":
        return baseline_partition(config.mode, len(data.train), config.fraction, config.seed)
    partitioner = get_registry().get("partitioner", config.partitioner)
    return partitioner(data, config.clients, config.seed, dict(config.partition_options))


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
    return {
        "weights": path,
        "sha256": digest,
        "source": config.encoder_weights if path else None,
        "frozen": config.encoder_frozen,
    }


def write_run_config(rd: RunDir, config: RunConfig, components: Components, strategy: StrategyParts) -> None:
    """config.json: the resolved options plus what was built from them (providers, loss weights, protocol)."""
    rd.write_json(
        rd.config,
        {
            "run": config.to_dict(),
            "plugins": describe_plugins(config),
            "strategy": strategy.description(),
            "loss_weights": _effective_loss_weights(components),
            "encoder": _encoder_record(config, components),
            "protocol": components.protocol().as_dict(),
            "body_model": components.body_model.describe(),
            "data": dict(components.data.protocol),
            "placement": _placement_record(config),
        },
    )


def _placement_record(config: RunConfig) -> dict[str, Any]:
    """``config.json``'s ``placement``: what this process resolved (:meth:`Placement.describe`);
    each simulated client and SuperNode resolves ``auto`` again on its own device."""
    placement = run_placement(config)
    if placement is None:
        record = {"accelerator": config.accelerator, "resolved": "by the ServerApp and each SuperNode on its machine"}
    else:
        record = placement.describe()
    return {**record, "channels_last": config.uses_channels_last}


def prepare(
    config: RunConfig,
    strategy: StrategyParts,
    rd: RunDir,
    resume: bool = False,
    status: Callable[[str], None] | None = None,
    with_baselines: bool = True,
) -> PreparedRun:
    """Build the components, make and save the partition (read it back on resume), write
    ``config.json`` (kept on resume) and compute the mean-pose baselines. ``config`` and
    ``strategy`` come from :func:`resolve`; ``rd`` exists. ``with_baselines=False`` leaves the
    baselines empty (a directory prepared for another process that computes its own)."""
    say = status or (lambda message: None)
    say("loading the body model and preparing the data (cached after the first run)")
    components = build_components(config, progress=say)
    if resume and rd.partition.exists():
        partition = load_partition(rd.partition)
    else:
        partition = make_partition(config, components.data)
        rd.write_text(rd.partition, partition.to_json())
    if not resume or not rd.config.exists():
        write_run_config(rd, config, components, strategy)
    baselines = _baselines(components) if with_baselines else {}
    return PreparedRun(config, rd, components, partition, strategy, baselines)


def load_prepared(run_dir: str | Path) -> PreparedRun:
    """The :class:`PreparedRun` of a directory :func:`prepare` wrote, rebuilt from its
    ``config.json`` and ``partition.json`` (components, strategy and baselines alike)."""
    rd = RunDir(run_dir)
    config = RunConfig.from_saved(rd.read_config()["run"])
    if not rd.partition.exists():
        raise FileNotFoundError(f"{rd.path} has no {rd.partition.name}; prepare the run directory first")
    components = build_components(config)
    strategy = build_strategy(config)
    return PreparedRun(config, rd, components, load_partition(rd.partition), strategy, _baselines(components))


def _baselines(components: Components) -> dict[str, float]:
    data = components.data
    return mean_pose_baselines(data.train, data.test, components.applied_protocol().alignment)
