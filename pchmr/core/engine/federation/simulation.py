"""The federation on Flower's Simulation Engine (Ray), on this machine."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pchmr.core.engine.devices import Placement, client_resources, visible_gpus
from pchmr.core.engine.federation.client import CLIENT_THREADS_ENV, make_client_app
from pchmr.core.engine.federation.cluster import check_reachable, cluster_address, cluster_resources
from pchmr.core.engine.federation.common import EngineStopped, log, route_flower_logs
from pchmr.core.engine.federation.server import FederatedServer
from pchmr.core.engine.perf import ALLOCATOR_ENV, tune_allocator

if TYPE_CHECKING:
    from pchmr.core.engine.config import RunConfig

__all__ = [
    "STOP_WAIT_SECONDS",
    "EngineStopped",
    "StoppableGrid",
    "make_server_app",
    "ray_resources",
    "run_simulation",
]


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
        # also after the last reply: a Ctrl-C sets ``stop`` before the clients it killed can report
        # failing, so replies that arrive after it never reach an aggregate
        self._check()
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


def ray_resources(
    placement: Placement, per_round: int, client_gpus: float | None = None, num_cpus: int | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """(``num_cpus``/``num_gpus`` for ``ray.init``, one client's Ray resources) on this machine.

    Ray gets every core and, on a GPU placement, every GPU torch sees (none otherwise). Each
    client asks for :func:`~pchmr.core.engine.devices.client_resources`: an equal share of the
    cores, and ``client_gpus`` of a GPU or, by default, an equal share of the GPUs among the
    round's ``per_round`` clients. Raises :class:`~pchmr.core.engine.devices.DeviceError` for a
    GPU share Ray cannot give.
    """
    cpus = num_cpus or os.cpu_count() or 1
    gpus = visible_gpus(placement)
    return {"num_cpus": cpus, "num_gpus": gpus}, client_resources(cpus, gpus, per_round, client_gpus)


def _join_cluster(address: str, config: RunConfig, verbose: bool) -> dict[str, float]:
    """Connect this process to the Ray cluster at ``address`` (Flower then uses that connection
    instead of starting Ray) and return one client's resources from the cluster's.

    The cluster's workers do not inherit this process's environment: Ray's runtime environment
    carries the import path (as Flower's own ``ray.init`` does) and the allocator settings; each
    client takes its thread count from the CPUs Ray assigned it."""
    import ray

    check_reachable(address)
    env = {key: os.environ[key] for key in (*ALLOCATOR_ENV, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO") if key in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": env},
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
        )
    except (ConnectionError, RuntimeError) as exc:
        raise RuntimeError(
            f"could not join the Ray cluster at {address}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; is its head running "
            f"(`ray start --head --port {address.rpartition(':')[2]}`) and reachable from here?"
        ) from exc
    try:
        totals, per_client = cluster_resources(
            ray.nodes(), config.accelerator in ("auto", "gpu"), config.per_round, config.client_gpus
        )
    except BaseException:
        ray.shutdown()
        raise
    log.info(
        "joined the Ray cluster at %s: %d CPU(s), %g GPU(s); each client asks for %s",
        address,
        int(totals["CPU"]),
        totals["GPU"],
        per_client,
    )
    return per_client


def run_simulation(server: FederatedServer, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Run the federation on Flower's Simulation Engine (Ray): on a private Ray on this machine,
    or on the cluster :func:`cluster_address` names.

    The cores and GPUs are split among the round's clients (:func:`ray_resources`, on a cluster
    :func:`cluster_resources`): with k sampled clients and at least k cores, k clients train side
    by side with one share each; on a GPU, Ray sets each client's ``CUDA_VISIBLE_DEVICES`` to its
    share and the client process resolves ``--accelerator auto`` there. Flower's and Ray's
    console output is kept to errors unless ``verbose``; ``run.log`` gets Flower's log in full.
    """
    # Flower 1.41/1.42 marks flwr.simulation.run_simulation deprecated ("use `flwr run` in the CLI instead") and
    # offers no Python replacement: the supported path is `flwr run` submitting an app to a SuperLink in
    # simulation mode, whose flwr-simulation process loads the ServerApp and ClientApp by module reference and
    # starts Ray with the federation's settings (num-supernodes, client resources, num_cpus/num_gpus,
    # logging). pchmr's Flower app runs that way (`flwr run .`, pchmr/cli/flower_app.py, the same metrics).
    # This engine stays on run_simulation because going through a SuperLink would lose what it does here:
    # the ServerApp in this process (the CLI's progress callbacks, SIGINT stopping the grid before an
    # interrupted round is aggregated), a private Ray listening on loopback only (`_node_ip_address`,
    # `_loopback_ray`: Flower's simulation config cannot pass them) or a joined Ray cluster with a runtime
    # environment (--ray-address), and no SuperLink left running on fixed ports after the run. It logs
    # Flower's deprecation warning to run.log.
    from flwr.simulation import run_simulation as flwr_run_simulation

    tune_allocator()  # before Ray starts its workers, which inherit the environment
    # a client asking for no GPU keeps the CUDA_VISIBLE_DEVICES it inherits (and Ray's notice quiet)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    placement = server.placement
    # Ray runs its workers 15 niceness levels below the driver; here the workers are the clients,
    # whose local training is the round's work
    os.environ.setdefault("RAY_worker_niceness", "0")
    route_flower_logs(verbose)
    address = cluster_address(server.config)
    if address is None:
        machine, per_client = ray_resources(placement, server.config.per_round, server.config.client_gpus, num_cpus)
        init_args: dict[str, Any] = {
            # a private Ray: without an address, ray.init joins whatever cluster
            # /tmp/ray/ray_current_cluster names (a stale one refuses num_cpus)
            "address": "local",
            **machine,
            "include_dashboard": False,
            # every Ray server (GCS, raylets, workers, agents) listens on the node's address:
            # loopback, with _loopback_ray keeping Ray from swapping it for a routable one
            "_node_ip_address": LOOPBACK_IP,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        }
    else:
        per_client = _join_cluster(address, server.config, verbose)
        init_args = {}  # Flower starts no Ray when one is connected
    client_app = make_client_app(server.rd.path.resolve())
    backend_config = {"client_resources": per_client, "init_args": init_args}
    previous = os.environ.get(CLIENT_THREADS_ENV)
    # Flower's Ray backend sets this process's PYTHONPATH to its sys.path (for Ray's workers) and leaves it
    # set: put it back after the run, or every process started later (pip, another interpreter) imports
    # from this environment's site-packages
    previous_path = os.environ.get("PYTHONPATH")
    # read by each client process of a private Ray (its workers inherit it); a cluster's clients
    # read the CPUs Ray assigned them
    if address is None:
        os.environ[CLIENT_THREADS_ENV] = str(int(per_client["num_cpus"]))
    stop = threading.Event()
    try:
        with _stop_on_interrupt(stop), _loopback_ray(address is None):
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
    except BaseException:  # Ctrl-C: the ServerApp thread would wait for the dead clients' replies (a day)
        stop.set()
        server.finished.wait(STOP_WAIT_SECONDS)  # its last words go to run.log, not to a detached logger
        raise
    finally:
        if address is not None:
            _leave_cluster()
        for name, value in ((CLIENT_THREADS_ENV, previous), ("PYTHONPATH", previous_path)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if server.error is not None:
        raise server.error


#: the address a private Ray's servers listen on: nothing outside this machine reaches them
LOOPBACK_IP = "127.0.0.1"


@contextmanager
def _loopback_ray(private: bool) -> Iterator[None]:
    """While the block runs (``private``: Flower starts a Ray of this run's own), Ray keeps a
    loopback ``_node_ip_address``.

    Ray's servers listen on the node's address, but ``ray.init`` replaces a loopback one with
    this machine's routable address unless Ray's single-machine mode is on (its default on
    macOS and Windows: ``ray_constants.ENABLE_RAY_CLUSTER`` False, environment variable
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). That mode is switched on here for this process
    (the constant is read when ``ray.init`` runs) and the processes Ray starts (the variable),
    and restored after. A joined cluster (``private`` False) is left as it is.
    """
    if not private:
        yield
        return
    from ray._private import ray_constants

    name = getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    previous_env = os.environ.get(name)
    previous = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = previous
        if previous_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous_env


#: seconds an interrupted run waits for the ServerApp thread to notice (it may be evaluating)
STOP_WAIT_SECONDS = 5.0


@contextmanager
def _stop_on_interrupt(stop: threading.Event) -> Iterator[None]:
    """While the block runs, SIGINT sets ``stop`` first and then does what it did before (Python's
    KeyboardInterrupt). Set at the signal itself, ``stop`` is seen by the ServerApp thread before
    any reply of a client the same Ctrl-C killed (a terminal sends it to Ray's workers too), so an
    interrupted round is never aggregated with those as failures; Flower's clean-up (``ray.shutdown``)
    runs after. Only in the main thread (where Python delivers signals)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # SIGINT ignored (SIG_IGN) or not Python's to handle: nothing to chain
        return

    def interrupted(signum: int, frame: Any) -> None:
        stop.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _leave_cluster() -> None:
    """Disconnect from the joined cluster (Flower does on a normal end; not when it failed
    early); the cluster itself keeps running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
