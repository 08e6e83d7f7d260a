"""The client half: a Flower ClientApp whose train handler runs HMRModule's local epochs."""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from pchmr.core.contracts.mechanism import RoundContext
from pchmr.core.contracts.partition import Partition, load_partition
from pchmr.core.contracts.strategy import StrategyParts, UpdateInfo
from pchmr.core.engine.components import Components, build_components, make_loader
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.devices import Placement, deterministic_algorithms
from pchmr.core.engine.federation.common import (
    PARTITION_KEY,
    RUN_DIR_KEY,
    SPEED_METRIC,
    ClientDropout,
    build_strategy,
    drops_out,
)
from pchmr.core.engine.federation.mechanisms import MechanismRuntime
from pchmr.core.engine.module import HMRModule
from pchmr.core.engine.rundir import RunDir
from pchmr.core.engine.trainer import CPU, LearningRate, make_trainer, quiet_lightning
from pchmr.core.kit.federation import message_stage
from pchmr.core.kit.seeds import derive_seed

__all__ = [
    "CLIENT_THREADS_ENV",
    "OPTIMIZER_STATE_KEY",
    "ClientFailed",
    "ClientRuntime",
    "load_optimizer_state",
    "local_fit",
    "make_client_app",
    "store_optimizer_state",
    "train_locally",
    "withheld_errors",
]


# --------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------
@dataclass
class ClientRuntime:
    """A client process's state, built once from the run directory: the run's components, the
    partition, the (privacy-wrapped) strategy, the loops over its mechanisms, the HMRModule
    local training reuses (built with the strategy's mechanisms) and where it trains (resolved
    in this process: a Ray actor sees the GPU share Ray gave it, a SuperNode its own machine)."""

    components: Components
    partition: Partition
    strategy: StrategyParts
    module: HMRModule
    mechanisms: MechanismRuntime
    placement: Placement = CPU
    #: the optimizer state at the end of this process's last local fit (``client_optimizer="keep"``)
    last_optimizer_state: dict[str, Any] | None = None

    def train(self, msg: Any, context: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """:func:`train_locally` for this runtime (what round protocols' client handlers call)."""
        return train_locally(self, msg, context)


_RUNTIMES: dict[str, ClientRuntime] = {}


_RUNTIME_LOCK = threading.Lock()


def _ray_assigned_cpus() -> int | None:
    """The CPUs Ray assigned this client's actor, on a joined Ray cluster (whose workers do not
    inherit the driver's :data:`CLIENT_THREADS_ENV`); None outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return int(cpus) if cpus >= 1 else None


def _client_runtime(run_dir: str) -> ClientRuntime:
    """Built once per process (Ray actor or SuperNode) from the run directory's files."""
    with _RUNTIME_LOCK:
        if run_dir not in _RUNTIMES:
            quiet_lightning()
            threads = os.environ.get(CLIENT_THREADS_ENV) or _ray_assigned_cpus()
            if threads:
                torch.set_num_threads(int(threads))
            if not Path(run_dir).is_dir():
                raise FileNotFoundError(
                    f"the run directory {run_dir} is not on this node ({socket.gethostname()}): a client reads the "
                    "run's config and partition from it, so on a Ray cluster it must be at the same path on every "
                    "node (a shared filesystem)"
                )
            rd = RunDir(run_dir)
            config = RunConfig.from_saved(rd.read_config()["run"])
            placement = config.placement()  # this process's device: `auto` resolves here
            if placement.deterministic:
                deterministic_algorithms(True)
            components = build_components(config, pretrained=False)  # the server sends every weight
            strategy = build_strategy(config)  # quiet: the server half's construction warnings are not the client's
            mechanisms = MechanismRuntime(strategy)
            module = components.make_module(mechanisms=strategy.mechanisms)
            mechanisms.prepare_module(module)
            partition = load_partition(rd.partition)
            _RUNTIMES[run_dir] = ClientRuntime(components, partition, strategy, module, mechanisms, placement=placement)
        return _RUNTIMES[run_dir]


class _OptimizerCarry(pl.Callback):
    """Loads a client's saved optimizer state into the fit's fresh optimizer and keeps the final one."""

    def __init__(self, state: Mapping[str, Any] | None) -> None:
        self.state = state
        self.final: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            trainer.optimizers[0].load_state_dict(self.state)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final = trainer.optimizers[0].state_dict()


#: Key of the client's kept optimizer state in Flower's node context (``context.state``).
OPTIMIZER_STATE_KEY = "pchmr-optimizer"


def load_optimizer_state(context: Any) -> dict[str, Any] | None:
    """The optimizer state this client kept in its node context, or None (first round)."""
    record = context.state.config_records.get(OPTIMIZER_STATE_KEY)
    if record is None:
        return None
    return torch.load(io.BytesIO(record["state"]), map_location="cpu", weights_only=True)  # type: ignore[arg-type]


def store_optimizer_state(context: Any, state: Mapping[str, Any]) -> None:
    """Keep ``state`` (an optimizer ``state_dict``) in the node context for the client's next round."""
    from flwr.app import ConfigRecord

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    context.state.config_records[OPTIMIZER_STATE_KEY] = ConfigRecord({"state": buffer.getvalue()})


def local_fit(
    runtime: ClientRuntime,
    state: Mapping[str, torch.Tensor],
    partition_id: int,
    server_round: int,
    config: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """E local epochs of HMRModule on this client's data, starting from ``state``, inside
    ``module.round(RoundContext(...))`` (the mechanisms' loss and training-step hooks receive it).

    ``optimizer_state`` (an AdamW ``state_dict`` kept from the client's previous round) is loaded
    into the fit's optimizer; the optimizer's final state is left in ``runtime.last_optimizer_state``
    and its step count in the metrics (``optimizer-steps``); the fit's speed, examples × epochs /
    fit seconds, is ``train-img-s``. The fit runs on ``runtime.placement``."""
    cfg = runtime.components.config
    module = runtime.module
    module.load_state_dict(state)
    global_state = {k: v.detach().clone() for k, v in state.items()}  # the round's start (proximal terms)
    seed = derive_seed(cfg.seed, server_round, partition_id)
    torch.manual_seed(seed)
    dataset = runtime.components.client_dataset(runtime.partition, partition_id)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=seed, placement=runtime.placement)
    epochs = int(config.get("local-epochs", cfg.local_epochs))
    lr = float(config.get("lr", module.optim.lr))  # this round's rate (--lr-schedule), the same on every client
    carry = _OptimizerCarry(optimizer_state)
    trainer = make_trainer(
        max_epochs=epochs,
        grad_clip=module.optim.grad_clip,
        quiet=True,
        callbacks=[carry, LearningRate(lambda _: lr)],
        placement=runtime.placement,
    )
    context = RoundContext(
        server_round=server_round,
        partition_id=partition_id,
        local_epochs=epochs,
        lr=lr,
        config=dict(config),
        global_state=global_state,
    )
    start = time.perf_counter()
    with module.round(context):
        trainer.fit(module, train_dataloaders=loader)
    fit_seconds = time.perf_counter() - start
    loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    new_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    runtime.last_optimizer_state = carry.final
    steps = [float(s["step"]) for s in (carry.final or {}).get("state", {}).values() if "step" in s]
    metrics = {
        "num-examples": float(len(dataset)),
        "train-loss": loss,
        "fit-seconds": fit_seconds,
        "optimizer-steps": max(steps, default=0.0),
        SPEED_METRIC: len(dataset) * epochs / fit_seconds if fit_seconds > 0 else 0.0,
    }
    return new_state, metrics


def train_locally(runtime: ClientRuntime, msg: Any, context: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local training for a train message (content ``"arrays"``: the global model, ``"config"``:
    the round's train config with ``server-round``), then the mechanisms' ``transform_update``.

    A client that ``--client-dropout`` drops this round raises :class:`ClientDropout` before training.

    Returns the new state dict (what the client would send) and its metrics
    (``num-examples``, ``train-loss``, ``fit-seconds``, ``train-img-s``, ``partition-id``). Round protocols call
    this from their client handlers.
    """
    pid = int(context.node_config[PARTITION_KEY])
    config = dict(msg.content["config"])
    global_state = msg.content["arrays"].to_torch_state_dict()
    server_round = int(config["server-round"])
    cfg = runtime.components.config
    if drops_out(cfg.seed, server_round, pid, cfg.client_dropout):
        # before any training, like a device that went away: Flower returns the error as the reply (the
        # server names the partition)
        raise ClientDropout(
            f"simulated device failure in round {server_round} (--client-dropout {cfg.client_dropout:g})"
        )
    keep = cfg.client_optimizer == "keep"
    new_state, metrics = local_fit(
        runtime, global_state, pid, server_round, config, load_optimizer_state(context) if keep else None
    )
    final_optimizer_state, runtime.last_optimizer_state = runtime.last_optimizer_state, None  # hold no stale copy
    if keep and final_optimizer_state is not None:
        store_optimizer_state(context, final_optimizer_state)
    info = UpdateInfo(
        server_round=server_round,
        partition_id=pid,
        num_examples=int(metrics["num-examples"]),
        num_clients=cfg.clients,
        per_round=cfg.per_round,
        config=config,
    )
    new_state = runtime.mechanisms.transform_update(new_state, global_state, info)
    metrics["partition-id"] = float(pid)
    return new_state, metrics


class ClientFailed(RuntimeError):
    """What leaves a client that failed under a round protocol (secure aggregation): that it
    failed and in which stage, nothing of its error (see :func:`withheld_errors`)."""


@contextmanager
def withheld_errors(stage: str) -> Iterator[None]:
    """Under a round protocol the server is to learn only aggregates, so a client's own error
    text (a diverged loss names every loss term's value, other errors its data or paths) stays on
    the device: the error is logged here (the SuperNode's log; a Ray worker's log in a
    simulation) and :class:`ClientFailed`, naming only the stage, is raised in its place, without
    the original as its cause (Flower sends the reply's reason and its traceback to the server).
    A :class:`ClientDropout` passes as it is: its text follows from the run's config alone."""
    try:
        yield
    except ClientDropout:
        raise
    except Exception:
        _client_log.error("this client failed in stage '%s' (its error stays on this device)", stage, exc_info=True)
        failed = ClientFailed(
            f"the client failed in stage '{stage}'; under secure aggregation its error stays on the device "
            "(the SuperNode's log)"
        )
        raise failed from None


_client_log = logging.getLogger("pchmr.federation.client")


def _chain(mods: Sequence[Callable[..., Any]], call_next: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``call_next`` wrapped by ``mods`` so that ``mods[0]`` runs first (outermost)."""
    handler = call_next
    for mod in reversed(list(mods)):
        handler = (lambda m, nxt: lambda msg, ctx: m(msg, ctx, nxt))(mod, handler)
    return handler


def make_client_app(run_dir: str | Path | None = None) -> Any:
    """The ClientApp: ``query`` answers the node's partition id, ``train`` runs :func:`train_locally`
    (or the mechanisms' client handler named by the message's ``pchmr-stage``). Every message goes
    through the mechanisms' ``client_mods`` (one mod of this app looks them up in the client runtime).

    ``run_dir`` is baked in for the Simulation Engine; on the Deployment Engine it comes from
    the run config key ``pchmr-run-dir``.
    """
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp

    fixed_dir = None if run_dir is None else str(run_dir)

    def _dir(context: Context) -> str:
        return fixed_dir or str(context.run_config[RUN_DIR_KEY])

    def strategy_mods(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        mods = _client_runtime(_dir(context)).mechanisms.client_mods
        return _chain(mods, call_next)(msg, context) if mods else call_next(msg, context)

    app = ClientApp(mods=[strategy_mods])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[PARTITION_KEY])
        return Message(RecordDict({"info": ConfigRecord({PARTITION_KEY: pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        runtime = _client_runtime(_dir(context))
        stage = message_stage(msg)
        if stage is not None:
            handler = runtime.mechanisms.client_handlers.get(stage)
            if handler is None:
                raise KeyError(
                    f"a message asks for client stage '{stage}', but strategy '{runtime.strategy.name}' "
                    f"has handlers only for {sorted(runtime.mechanisms.client_handlers)}"
                )
            if runtime.mechanisms.round_protocol is None:
                return handler(msg, context, runtime)
            with withheld_errors(stage):
                return handler(msg, context, runtime)
        new_state, metrics = train_locally(runtime, msg, context)
        content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return app


#: Environment variable telling a client process how many torch threads its local training uses.
CLIENT_THREADS_ENV = "PCHMR_CLIENT_THREADS"
