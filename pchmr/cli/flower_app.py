"""The Flower app of a pchmr checkout: what ``flwr run .`` runs (``[tool.flwr.app]`` in
``pyproject.toml``).

``flwr run . --run-config "rounds=1 seed=3"`` submits the app to a SuperLink (by default a local
one in simulation mode, which ``flwr`` starts); Flower's simulation runtime then loads
:data:`server_app` and :data:`client_app` from the installed pchmr:

* the run config (``[tool.flwr.app.config]`` fused with ``--run-config``) holds ``pchmr run``'s
  options under the names of its flags without the dashes (``num-train``, ``per-round``,
  ``strategy-option = "mu=0.01"``, ``freeze-encoder = true``), ``""`` for an option left unset,
  plus ``config`` and ``scale`` (a pchmr config file, or a packaged one such as ``paper:NAME``, and
  its scale, as ``--config``/``--scale``).
  :func:`config_from_run_config` reads it exactly as ``pchmr run`` reads its flags
  (:class:`~pchmr.cli.config_flags.GivenFlags`, :class:`~pchmr.core.engine.config.RunConfig`), so a
  bad value gets ``pchmr run``'s refusal;
* the ServerApp checks that the federation has one SuperNode per client (``num-supernodes`` =
  ``clients``, asked of a node before any data is read), then runs
  :func:`pchmr.core.engine.run.execute` with the grid Flower gave it: the same preparation,
  :class:`~pchmr.core.engine.federation.server.FederatedServer` and run directory as ``pchmr run``
  (``out``; unset: ``runs/flwr-<run id>``, relative to the SuperLink's working directory);
* the ClientApp is :func:`~pchmr.core.engine.federation.client.make_client_app`'s, reading the run
  directory the ServerApp prepared; each client trains with the torch threads ``pchmr run`` would
  give it (the machine's cores shared among the round's clients), so both give the same metrics.

Options that choose another engine (``engine``, ``superlink``, ``ray-address``, ...) or a baseline
(``mode``) are not run-config keys: here Flower's SuperLink is the engine; a config file setting
them is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from pchmr.cli.config_flags import ConfigFlag, GivenFlags, config_flags
from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file
from pchmr.core.engine.federation.client import CLIENT_THREADS_ENV, make_client_app
from pchmr.core.engine.federation.common import RUN_DIR_KEY, RoundReport
from pchmr.core.engine.federation.server import FederatedServer
from pchmr.core.engine.run_options import KeyValues, NameAndPath, PathValue, Repeated, Switch
from pchmr.core.engine.rundir import RunDir
from pchmr.core.kit.federation import short_reason, wait_for_nodes

__all__ = [
    "APP_KEYS",
    "NOT_IN_APP",
    "app_config_defaults",
    "app_flags",
    "app_run_dir",
    "check_federation_size",
    "client_app",
    "client_share",
    "config_from_run_config",
    "server_app",
]

#: RunConfig fields that are not run-config keys of the app, and why (a config file setting them is refused).
NOT_IN_APP = {
    "mode": "the app federates; baselines run with `pchmr run --mode`",
    "engine": "the engine is the SuperLink `flwr run` submits to",
    "superlink": "the SuperLink is `flwr run`'s connection",
    "root_certificates": "TLS to the SuperLink is `flwr run`'s connection's",
    "insecure": "TLS to the SuperLink is `flwr run`'s connection's",
    "node_auth": "SuperNode authentication is the SuperLink's",
    "node_keys": "SuperNode authentication is the SuperLink's",
    "ray_address": "Flower's simulation runtime starts its own Ray",
    "client_gpus": "a client's GPU share is the federation's (--federation-config client-resources-num-gpus)",
}

#: RunConfig fields of the baselines alone: no run-config keys (a config file may hold them; federated training
#: ignores them).
BASELINE_ONLY = ("epochs", "fraction")

#: The app's own keys (beside RunConfig's): a pchmr config file and its scale, as `--config`/`--scale`.
APP_KEYS = {"config": "", "scale": ""}

#: Directory of a run whose ``out`` is unset, relative to the SuperLink's working directory.
DEFAULT_OUT = "runs/flwr-{run_id}"

#: The message content key of the federation-size probe (answered by :class:`_AppClient` itself).
_PROBE = "pchmr-federation"
_NUM_PARTITIONS = "num-partitions"
#: seconds the ServerApp waits for a first SuperNode
NODE_WAIT_SECONDS = 600.0


def app_flags() -> tuple[ConfigFlag, ...]:
    """``pchmr run``'s flags that are run-config keys of the app (all but those of :data:`NOT_IN_APP`
    and :data:`BASELINE_ONLY`)."""
    return config_flags(
        RunConfig, [f.name for f in fields(RunConfig) if f.name not in NOT_IN_APP and f.name not in BASELINE_ONLY]
    )


def _key(flag: ConfigFlag) -> str:
    return flag.names[0].removeprefix("--")


def app_config_defaults() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` as it must read: every key with RunConfig's default (``""``
    where that is unset or empty), then :data:`APP_KEYS`."""
    defaults = {f.name: f.default for f in fields(RunConfig)}
    out: dict[str, Any] = {}
    for flag in app_flags():
        value = None if flag.shortcut is not None else defaults[flag.field]
        out[_key(flag)] = "" if value is None or value is MISSING or value == () else value
    return {**out, **APP_KEYS}


def _given(flag: ConfigFlag, key: str, value: Any) -> Any:
    """A run-config value as the flag's typer parameter would hold it (None: not given)."""
    form = flag.option.cli
    if isinstance(value, str) and value == "":
        return None
    if flag.shortcut is not None or isinstance(form, (NameAndPath, PathValue)):
        if not isinstance(value, str):
            raise ConfigError(f"run config {key} must be a string, got {value!r}")
        return value
    if isinstance(form, KeyValues):
        if not isinstance(value, str):
            raise ConfigError(
                f'run config {key} must be key=value pairs in one string, separated by spaces (e.g. {key}="a=1 b=x"), '
                f"got {value!r}"
            )
        return value.split()
    if isinstance(form, Repeated):
        if not isinstance(value, str):
            raise ConfigError(
                f'run config {key} must name values in one string (e.g. {key}="csv,tensorboard"), got {value!r}'
            )
        return value.replace(",", " ").split()
    if isinstance(form, Switch) and not isinstance(value, bool):
        raise ConfigError(f'run config {key} must be true or false ("" leaves it unset), got {value!r}')
    return value


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a Flower run config: the ``config`` file's values (with ``scale``),
    each non-empty key laid over them as ``pchmr run`` lays its flags over a file, then validated.
    A :class:`ConfigError` names the key and what is allowed; options that choose another engine or
    a baseline are refused, from a config file too."""
    flags = {_key(flag): flag for flag in app_flags()}
    unknown = sorted(set(run_config) - set(flags) - set(APP_KEYS))
    if unknown:
        raise ConfigError(
            f"run config key(s) {', '.join(unknown)} are not pchmr options; the keys are pchmr run's flags without "
            f"the dashes: {', '.join(sorted(flags))}, and {', '.join(APP_KEYS)}"
        )
    file, scale = (str(run_config.get(key, "") or "") for key in ("config", "scale"))
    if scale and not file:
        raise ConfigError("run config scale needs config: a scale is a table of overrides inside a config file")
    values = load_config_file(file, scale=scale or None) if file else {}
    given = {flag.param: _given(flag, key, run_config[key]) for key, flag in flags.items() if key in run_config}
    try:
        config = RunConfig.from_dict(GivenFlags(tuple(flags.values()), given).over(values))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (run config keys are pchmr run's flags without the dashes)") from None
    defaults = {f.name: f.default for f in fields(RunConfig)}
    changed = sorted(name for name in NOT_IN_APP if getattr(config, name) != defaults[name])
    if changed:
        raise ConfigError(
            f"the Flower app runs federated training on the federation `flwr run` submits to; {file or 'the config'} "
            f"sets {', '.join(changed)} ({'; '.join(NOT_IN_APP[name] for name in changed)}): leave them out, or use "
            "pchmr run"
        )
    return config


def app_run_dir(config: RunConfig, run_id: int) -> Path:
    """The run directory of the Flower run ``run_id``: ``out``, else :data:`DEFAULT_OUT`, relative
    to this process's working directory (the ServerApp's and the clients' are the SuperLink's)."""
    return Path(config.out or DEFAULT_OUT.format(run_id=run_id)).absolute()


# --------------------------------------------------------------------------------------
# the ServerApp
# --------------------------------------------------------------------------------------
def check_federation_size(grid: Grid, config: RunConfig, timeout: float = NODE_WAIT_SECONDS) -> int | None:
    """Ask one SuperNode how many partitions its federation has (``num-partitions`` of its node
    config: the simulation's ``num-supernodes``); a :class:`ConfigError` when that is not the run's
    ``clients``. None when the node does not say (a SuperNode started without it)."""
    from flwr.common import MessageType

    nodes = wait_for_nodes(grid, 1, timeout)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {timeout:.0f} s")
    probe = Message(RecordDict({_PROBE: ConfigRecord({})}), dst_node_id=nodes[0], message_type=MessageType.QUERY)
    replies = list(grid.send_and_receive([probe], timeout=timeout))
    if not replies or replies[0].has_error():
        reason = short_reason(replies[0].error.reason) if replies else f"no reply within {timeout:.0f} s"
        raise RuntimeError(f"node {nodes[0]} did not report its federation: {reason}")
    size = replies[0].content[_PROBE].get(_NUM_PARTITIONS)
    if size is None:
        return None
    clients = config.clients
    if int(size) != clients:
        raise ConfigError(
            f"the federation has {int(size)} SuperNodes (num-supernodes) but the run has clients={clients}: pchmr "
            "trains one client partition per SuperNode. Run `flwr run . --federation-config "
            f'"num-supernodes={clients} client-resources-num-cpus={client_share(config)}"` (the CPUs: each client\'s '
            f'share of this machine, as pchmr run gives it), or set `--run-config "clients={int(size)}"` (and '
            "per-round at most that)"
        )
    return int(size)


def _serve(grid: Grid) -> Any:
    def federate(server: FederatedServer) -> None:
        server.main(grid)
        if server.error is not None:
            raise server.error

    return federate


def _report(report: RoundReport) -> None:
    metrics = report.metrics or {}
    shown = "  ".join(f"{key} {metrics[key]:.1f}" for key in ("mpjpe_mm", "pa_mpjpe_mm") if key in metrics)
    log(logging.INFO, "pchmr: round %d/%d (%.1f s)  %s", report.server_round, report.num_rounds, report.seconds, shown)


def _make_server_app() -> ServerApp:
    from pchmr.core.engine.run import execute

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            config = config_from_run_config(context.run_config)
            run_dir = app_run_dir(config, context.run_id)
            check_federation_size(grid, config)
        except ConfigError as exc:
            log(logging.ERROR, "pchmr refused the run: %s", exc)
            raise
        log(logging.INFO, "pchmr: run directory %s", run_dir)
        result = execute(
            config,
            run_dir=run_dir,
            on_round=_report,
            on_status=lambda message: log(logging.INFO, "pchmr: %s", message),
            federate=_serve(grid),
        )
        final = result.final
        log(
            logging.INFO,
            "pchmr: finished after round %d: MPJPE %.1f mm, PA-MPJPE %.1f mm (%s)",
            final["round"],
            final["mpjpe_mm"],
            final["pa_mpjpe_mm"],
            result.run_dir.path,
        )

    return app


# --------------------------------------------------------------------------------------
# the ClientApp
# --------------------------------------------------------------------------------------
class _AppClient(ClientApp):  # type: ignore[misc]
    """pchmr's ClientApp (:func:`make_client_app`) under ``flwr run``: it answers the federation-size
    probe from its node config, finds the run directory (a SuperNode's ``--node-config
    pchmr-run-dir`` first, else :func:`app_run_dir`) and gives local training the threads
    ``pchmr run`` would. (Flower's simulation refuses a changed ``context.run_config``, so the
    run directory is baked into one inner app per directory.)"""

    def __init__(self) -> None:
        super().__init__()
        self._apps: dict[str, ClientApp] = {}
        self._run_dirs: dict[int, str] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        if _PROBE in message.content:
            size = context.node_config.get(_NUM_PARTITIONS)
            info = ConfigRecord({} if size is None else {_NUM_PARTITIONS: int(size)})
            return Message(RecordDict({_PROBE: info}), reply_to=message)
        local = context.node_config.get(RUN_DIR_KEY)
        run_dir = str(local) if local else self._run_dir(context)
        if run_dir not in self._apps:
            if CLIENT_THREADS_ENV not in os.environ:
                os.environ[CLIENT_THREADS_ENV] = str(_client_threads(run_dir))
            self._apps[run_dir] = make_client_app(run_dir)
        return self._apps[run_dir](message, context)

    def _run_dir(self, context: Context) -> str:
        """:func:`app_run_dir` of the run (read once per run)."""
        if context.run_id not in self._run_dirs:
            config = config_from_run_config(context.run_config)
            self._run_dirs[context.run_id] = str(app_run_dir(config, context.run_id))
        return self._run_dirs[context.run_id]


def client_share(config: RunConfig) -> int:
    """The cores (and torch threads) of one client of ``config`` on this machine, as ``pchmr run``'s
    Simulation Engine gives them (:func:`~pchmr.core.engine.federation.simulation.ray_resources`:
    the cores shared among the round's clients). Local training's results depend on the thread
    count, so the app's clients train with this many whatever Ray reserved for them."""
    from pchmr.core.engine.federation.simulation import ray_resources

    return int(ray_resources(config.placement(), config.per_round, config.client_gpus)[1]["num_cpus"])


def _client_threads(run_dir: str) -> int:
    """:func:`client_share` of the run prepared in ``run_dir``."""
    return client_share(RunConfig.from_saved(RunDir(run_dir).read_config()["run"]))


server_app = _make_server_app()
client_app = _AppClient()
