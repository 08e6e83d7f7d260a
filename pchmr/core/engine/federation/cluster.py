"""Joining a running Ray cluster (``--ray-address`` or ``$RAY_ADDRESS``) for the Simulation
Engine: where it is, whether anything answers there, and how its nodes' CPUs and GPUs are split
among a round's clients. No Ray or Flower import: the run's preparation checks the address
before any data is read."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pchmr.core.engine.config import ConfigError, check_ray_address
from pchmr.core.engine.devices import DeviceError, client_resources

if TYPE_CHECKING:
    from pchmr.core.engine.config import RunConfig

__all__ = ["CONNECT_SECONDS", "RAY_ADDRESS_ENV", "check_reachable", "cluster_address", "cluster_resources"]

#: Ray's own variable naming the cluster to join (used when ``--ray-address`` is not given).
RAY_ADDRESS_ENV = "RAY_ADDRESS"
#: How long the head's port may take to accept a connection before the run gives up on it.
CONNECT_SECONDS = 10.0


def cluster_address(config: RunConfig) -> str | None:
    """The Ray cluster a simulation joins: ``--ray-address``, else Ray's own ``RAY_ADDRESS``
    when set, else None (a private Ray on this machine). A ConfigError names a malformed one."""
    if config.ray_address is not None:
        return check_ray_address(config.ray_address)
    from_env = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    return check_ray_address(from_env, f"${RAY_ADDRESS_ENV}") if from_env else None


def check_reachable(address: str) -> None:
    """A :class:`~pchmr.core.engine.config.ConfigError` naming ``address`` when nothing accepts a
    connection there (checked before any data is read: Ray's own ``ray.init`` keeps retrying an
    absent head for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise ConfigError(
            f"--ray-address: could not join the Ray cluster at {address}: {exc.strerror or exc}; is its head running "
            f"(`ray start --head --port {port}`) and reachable from here?"
        ) from exc


def cluster_resources(
    nodes: Iterable[Mapping[str, Any]], use_gpus: bool, per_round: int, client_gpus: float | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """(the cluster's CPUs and GPUs, one client's Ray resources) for a cluster of ``nodes`` (as
    ``ray.nodes()`` lists them; dead and resource-less nodes are skipped).

    The same split as on one machine (:func:`~pchmr.core.engine.devices.client_resources`) over
    the cluster's totals, with a client's cores capped at the largest node's: Ray places a client
    on one node. ``use_gpus`` False (``--accelerator cpu``/``mps``) gives the clients no GPU.
    """
    alive = [dict(node["Resources"]) for node in nodes if node.get("Alive", True) and node.get("Resources")]
    cpus = int(sum(resources.get("CPU", 0) for resources in alive))
    gpus = float(sum(resources.get("GPU", 0) for resources in alive)) if use_gpus else 0.0
    if cpus < 1:
        raise DeviceError(
            f"the Ray cluster has no CPU to run a client on ({len(alive)} live node(s)); start its worker "
            "nodes with `ray start --address HEAD:PORT`"
        )
    per_client = client_resources(cpus, gpus, per_round, client_gpus)
    largest = max(int(resources.get("CPU", 0)) for resources in alive)
    per_client["num_cpus"] = float(max(1, min(int(per_client["num_cpus"]), largest)))
    return {"CPU": float(cpus), "GPU": gpus}, per_client
