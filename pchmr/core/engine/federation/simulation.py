"""The federation on Flower's Simulation Engine (Ray), on this machine."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from pchmr.core.engine.federation.client import CLIENT_THREADS_ENV, make_client_app
from pchmr.core.engine.federation.common import route_flower_logs
from pchmr.core.engine.federation.server import FederatedServer
from pchmr.core.engine.perf import tune_allocator

__all__ = ["EngineStopped", "StoppableGrid", "cpus_per_client", "make_server_app", "run_simulation"]


class EngineStopped(RuntimeError):
    """The engine under the server stopped while the server waited for it."""


class StoppableGrid:
    """A grid whose waits end as soon as ``stop`` is set.

    When the Simulation Engine crashes, Flower's in-memory grid keeps polling for replies until
    the call's timeout (up to :data:`NODE_WAIT_SECONDS`), and its non-daemon ServerApp thread
    keeps the process alive that long. ``send_and_receive`` here is Flower's (push every
    message, pull replies until all arrived or ``timeout`` passed) plus a check of ``stop``
    between pulls, which raises :class:`EngineStopped`; everything else is the wrapped grid's.
    """

    def __init__(self, grid: Any, stop: threading.Event) -> None:
        self._grid = grid
        self._stop = stop

    def _check(self) -> None:
        if self._stop.is_set():
            raise EngineStopped("the Simulation Engine stopped while the server was waiting for its nodes")

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        self._check()
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            self._check()
            time.sleep(getattr(self._grid, "pull_interval", 0.1))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def make_server_app(server: FederatedServer, stop: threading.Event | None = None) -> Any:
    """The simulation's ServerApp: ``server.main`` on the grid (wrapped in a :class:`StoppableGrid`
    when ``stop`` is given)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server.main(grid if stop is None else StoppableGrid(grid, stop))

    return app


def cpus_per_client(cpus: int, per_round: int) -> int:
    """Cores each of a round's ``per_round`` clients gets when ``cpus`` cores are shared.

    Two single-threaded FastMETRO-S clients side by side train ~1.2x as many images per second
    as one client with two threads (``benchmarks/client_parallelism.py``): small matrices scale
    poorly across threads, and Lightning's per-round set-up overlaps with the other's training.
    """
    if cpus < 1 or per_round < 1:
        raise ValueError(f"need at least one core and one client per round, got {cpus} and {per_round}")
    return max(1, cpus // min(per_round, cpus))


def run_simulation(server: FederatedServer, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Run the federation on Flower's Simulation Engine (Ray) on this machine.

    The cores are split among the round's clients (:func:`cpus_per_client`): with k sampled
    clients and at least k cores, k clients train side by side with one share each. Flower's and
    Ray's console output is kept to errors unless ``verbose``; ``run.log`` gets Flower's log in full.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    tune_allocator()  # before Ray starts its workers, which inherit the environment
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here: keep Ray's notice quiet
    # Ray runs its workers 15 niceness levels below the driver; here the workers are the clients,
    # whose local training is the round's work
    os.environ.setdefault("RAY_worker_niceness", "0")
    cpus = num_cpus or os.cpu_count() or 1
    per_client = cpus_per_client(cpus, server.config.per_round)
    client_app = make_client_app(server.rd.path.resolve())
    backend_config = {
        "client_resources": {"num_cpus": per_client, "num_gpus": 0.0},
        "init_args": {
            # always a private Ray: without an address, ray.init joins whatever cluster
            # /tmp/ray/ray_current_cluster names (a stale one refuses num_cpus)
            "address": "local",
            "num_cpus": cpus,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }
    route_flower_logs(verbose)
    previous = os.environ.get(CLIENT_THREADS_ENV)
    os.environ[CLIENT_THREADS_ENV] = str(per_client)  # read by each client process (Ray workers inherit it)
    stop = threading.Event()
    try:
        flwr_run_simulation(
            server_app=make_server_app(server, stop),
            client_app=client_app,
            num_supernodes=server.config.clients,
            backend_name="ray",
            backend_config=backend_config,
        )
    except RuntimeError as exc:  # the engine itself failed: Flower wraps the cause twice
        stop.set()  # the ServerApp thread is still waiting for replies: end its wait now
        if server.error is not None:
            raise server.error from exc
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise RuntimeError(
            f"Flower's Simulation Engine (Ray) stopped before the run finished: {type(cause).__name__}: {cause}"
        ) from exc
    finally:
        if previous is None:
            os.environ.pop(CLIENT_THREADS_ENV, None)
        else:
            os.environ[CLIENT_THREADS_ENV] = previous
    if server.error is not None:
        raise server.error
