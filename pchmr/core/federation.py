"""The federated runtime: a Flower ServerApp and ClientApp around :class:`HMRModule`.

Round r on the server:

1. sample ``per_round`` of the ``clients`` partition ids with a generator seeded by
   (run seed, r) — stateless, so a resumed run samples exactly what the killed run would have;
2. hand the strategy a view of the grid that contains only those clients' nodes, and let it
   build the train messages (``configure_train``) and aggregate the replies
   (``aggregate_train``, replies sorted by partition id so that sums are reproducible);
3. evaluate the global model on the held-out split every ``eval_every`` rounds (and at the
   last), append the metrics to ``rounds.jsonl`` and rewrite the checkpoint.

A client is a Flower node whose ``node_config`` carries ``partition-id`` (the Simulation
Engine sets it; a SuperNode gets it from ``--node-config``). The server learns which node
holds which partition with one ``query`` message per node at start-up.

Privacy hooks (see :class:`~pchmr.core.strategy.StrategyParts`): ``before_round`` runs before
step 1 (a :class:`~pchmr.core.strategy.PrivacyBudgetExhausted` stops the run cleanly, with
``"stopped"`` in final.json); a ``round_protocol`` replaces step 2; ``round_metrics`` are merged
into the round's record. On the client, one mod chains the strategy's ``client_mods`` around
every handler, train messages carrying ``pchmr-stage`` go to the strategy's ``client_handlers``,
and :func:`train_locally` applies the ``update_transforms`` after local training.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from pchmr.core.config import RunConfig
from pchmr.core.experiment import Components, build_components, derive_seed, make_loader
from pchmr.core.hmr import HMRModule, LearningRate, evaluate, lr_factor, make_trainer, quiet_lightning
from pchmr.core.partition import Partition, load_partition
from pchmr.core.perf import tune_allocator
from pchmr.core.registry import get_registry
from pchmr.core.rundir import RunDir
from pchmr.core.strategy import (
    STAGE_KEY,
    PrivacyBudgetExhausted,
    StrategyConfig,
    StrategyParts,
    UpdateInfo,
    short_reason,
)

__all__ = [
    "ClientRuntime",
    "FederatedServer",
    "build_strategy",
    "failure_message",
    "make_client_app",
    "make_server_app",
    "message_stage",
    "ordered_replies",
    "run_simulation",
    "train_locally",
]

log = logging.getLogger("pchmr.federation")

PARTITION_KEY = "partition-id"
RUN_DIR_KEY = "pchmr-run-dir"
_EVAL_BATCH = 64
#: seconds a round's send_and_receive may wait for the slowest client
ROUND_TIMEOUT = 24 * 3600.0
#: partitions whose nodes confirm the Simulation Engine's node order (FederatedServer._discover)
DISCOVERY_PROBES = 16
#: seconds discovery waits for all N nodes to be connected
NODE_WAIT_SECONDS = 600.0


_NOTHING_SAVED = (
    "nothing of this round was saved: the checkpoint of the round before is kept (`pchmr run --resume RUN_DIR` "
    "continues from it); lower --lr, or the privacy noise"
)


def _check_finite(server_round: int, state: Mapping[str, torch.Tensor]) -> None:
    """FloatingPointError naming the entries of an aggregated model that hold NaN or ±inf."""
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise FloatingPointError(
            f"round {server_round}: the aggregated global model holds non-finite values in {len(bad)} of "
            f"{len(state)} entries (first: {', '.join(bad[:3])}); {_NOTHING_SAVED}"
        )


def build_strategy(config: RunConfig) -> StrategyParts:
    """The run's strategy, wrapped by its privacy plugin when ``config.privacy`` names one.

    Raises the plugin's :class:`~pchmr.core.strategy.IncompatibleError` (a ValueError) when the
    privacy mechanism cannot wrap the strategy, so a run is refused before any heavy work.
    """
    factory = get_registry().get("strategy", config.strategy)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    # Flower warns that fraction_evaluate=0 skips federated evaluation: pchmr evaluates on the server
    flwr_logger.setLevel(logging.ERROR)
    try:
        parts = factory(_strategy_config(config, config.strategy_options))
    finally:
        flwr_logger.setLevel(level)
    if config.privacy is None:
        return parts
    privacy = get_registry().get("privacy", config.privacy)
    return privacy(parts, _strategy_config(config, config.privacy_options))


def _strategy_config(config: RunConfig, options: Mapping[str, Any]) -> StrategyConfig:
    """The run's federation shape (clients, per round, rounds, seed) with one plugin's options."""
    return StrategyConfig(
        num_clients=config.clients,
        per_round=config.per_round,
        num_rounds=config.rounds,
        seed=config.seed,
        options=dict(options),
    )


def sample_clients(seed: int, server_round: int, num_clients: int, per_round: int) -> list[int]:
    """The partition ids trained in ``server_round`` (sorted), from the run seed alone."""
    rng = np.random.default_rng(derive_seed(seed, server_round, 0x5A))
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


# --------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------
@dataclass
class ClientRuntime:
    """A client process's state, built once from the run directory: the run's components, the
    partition, the (privacy-wrapped) strategy and the HMRModule local training reuses."""

    components: Components
    partition: Partition
    strategy: StrategyParts
    module: HMRModule
    #: the optimizer state at the end of this process's last local fit (``client_optimizer="keep"``)
    last_optimizer_state: dict[str, Any] | None = None


_ClientRuntime = ClientRuntime  # the former private name

_RUNTIMES: dict[str, ClientRuntime] = {}
_RUNTIME_LOCK = threading.Lock()


def _client_runtime(run_dir: str) -> ClientRuntime:
    """Built once per process (Ray actor or SuperNode) from the run directory's files."""
    with _RUNTIME_LOCK:
        if run_dir not in _RUNTIMES:
            quiet_lightning()
            threads = os.environ.get(CLIENT_THREADS_ENV)
            if threads:
                torch.set_num_threads(int(threads))
            rd = RunDir(run_dir)
            config = RunConfig.from_saved(rd.read_config()["run"])
            components = build_components(config, pretrained=False)  # the server sends every weight
            flwr_logger = logging.getLogger("flwr")
            level = flwr_logger.level
            flwr_logger.setLevel(logging.ERROR)  # the server half's construction warnings are not the client's
            try:
                strategy = build_strategy(config)
            finally:
                flwr_logger.setLevel(level)
            module = components.make_module(loss_terms=strategy.loss_terms)
            if strategy.prepare_module is not None:
                strategy.prepare_module(module)
            _RUNTIMES[run_dir] = ClientRuntime(components, load_partition(rd.partition), strategy, module)
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
    runtime: ClientRuntime, state: Mapping[str, torch.Tensor], partition_id: int, server_round: int,
    config: Mapping[str, Any], optimizer_state: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """E local epochs of HMRModule on this client's data, starting from ``state``.

    ``optimizer_state`` (an AdamW ``state_dict`` kept from the client's previous round) is loaded
    into the fit's optimizer; the optimizer's final state is left in ``runtime.last_optimizer_state``
    and its step count in the metrics (``optimizer-steps``)."""
    cfg = runtime.components.config
    module = runtime.module
    module.load_state_dict(state)
    module.global_state = {k: v.detach().clone() for k, v in state.items()}  # for proximal terms
    module.round_config = dict(config)
    seed = derive_seed(cfg.seed, server_round, partition_id)
    torch.manual_seed(seed)
    dataset = runtime.components.client_dataset(runtime.partition, partition_id)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=seed)
    epochs = int(config.get("local-epochs", cfg.local_epochs))
    lr = float(config.get("lr", module.optim.lr))  # this round's rate (--lr-schedule), the same on every client
    carry = _OptimizerCarry(optimizer_state)
    trainer = make_trainer(
        max_epochs=epochs, grad_clip=module.optim.grad_clip, quiet=True, callbacks=[carry, LearningRate(lambda _: lr)]
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_seconds = time.perf_counter() - start
    loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    new_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    runtime.last_optimizer_state = carry.final
    steps = [float(s["step"]) for s in (carry.final or {}).get("state", {}).values() if "step" in s]
    metrics = {
        "num-examples": float(len(dataset)), "train-loss": loss, "fit-seconds": fit_seconds,
        "optimizer-steps": max(steps, default=0.0),
    }
    return new_state, metrics


def train_locally(runtime: ClientRuntime, msg: Any, context: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local training for a train message (content ``"arrays"``: the global model, ``"config"``:
    the round's train config with ``server-round``), then the strategy's update transforms.

    Returns the new state dict (what the client would send) and its metrics
    (``num-examples``, ``train-loss``, ``fit-seconds``, ``partition-id``). Round protocols call
    this from their client handlers.
    """
    pid = int(context.node_config[PARTITION_KEY])
    config = dict(msg.content["config"])
    global_state = msg.content["arrays"].to_torch_state_dict()
    server_round = int(config["server-round"])
    cfg = runtime.components.config
    keep = cfg.client_optimizer == "keep"
    new_state, metrics = local_fit(
        runtime, global_state, pid, server_round, config, load_optimizer_state(context) if keep else None
    )
    final_optimizer_state, runtime.last_optimizer_state = runtime.last_optimizer_state, None  # hold no stale copy
    if keep and final_optimizer_state is not None:
        store_optimizer_state(context, final_optimizer_state)
    info = UpdateInfo(
        server_round=server_round, partition_id=pid, num_examples=int(metrics["num-examples"]),
        num_clients=cfg.clients, per_round=cfg.per_round, config=config,
    )
    for transform in runtime.strategy.update_transforms:
        new_state = transform(new_state, global_state, info)
    metrics["partition-id"] = float(pid)
    return new_state, metrics


def message_stage(msg: Any) -> str | None:
    """The ``pchmr-stage`` value of the first ConfigRecord of ``msg`` that has one, else None."""
    for record in msg.content.config_records.values():
        if STAGE_KEY in record:
            return str(record[STAGE_KEY])
    return None


def _chain(mods: Sequence[Callable[..., Any]], call_next: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``call_next`` wrapped by ``mods`` so that ``mods[0]`` runs first (outermost)."""
    handler = call_next
    for mod in reversed(list(mods)):
        handler = (lambda m, nxt: lambda msg, ctx: m(msg, ctx, nxt))(mod, handler)
    return handler


def make_client_app(run_dir: str | Path | None = None) -> Any:
    """The ClientApp: ``query`` answers the node's partition id, ``train`` runs :func:`train_locally`
    (or the strategy's client handler named by the message's ``pchmr-stage``). Every message goes
    through the strategy's ``client_mods`` (one mod of this app looks them up in the client runtime).

    ``run_dir`` is baked in for the Simulation Engine; on the Deployment Engine it comes from
    the run config key ``pchmr-run-dir``.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    fixed_dir = None if run_dir is None else str(run_dir)

    def _dir(context: Context) -> str:
        return fixed_dir or str(context.run_config[RUN_DIR_KEY])

    def strategy_mods(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        mods = _client_runtime(_dir(context)).strategy.client_mods
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
            handler = runtime.strategy.client_handlers.get(stage)
            if handler is None:
                raise KeyError(
                    f"a message asks for client stage '{stage}', but strategy '{runtime.strategy.name}' "
                    f"has handlers only for {sorted(runtime.strategy.client_handlers)}"
                )
            return handler(msg, context, runtime)
        new_state, metrics = train_locally(runtime, msg, context)
        content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return app


# --------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------
class _SubsetGrid:
    """A view of a Flower Grid that shows a strategy only the round's sampled nodes.

    ``partition_of`` maps node id → partition id (every sampled node must be in it).
    """

    def __init__(self, grid: Any, node_ids: Iterable[int], partition_of: Mapping[int, int] | None = None) -> None:
        self._grid = grid
        self._nodes = list(node_ids)
        self._partition_of = dict(partition_of or {})

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def partition_id(self, node_id: int) -> int:
        if node_id not in self._partition_of:
            raise KeyError(f"node {node_id} is not one of this round's sampled nodes {self._nodes}")
        return self._partition_of[node_id]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def failure_message(server_round: int, failed: Sequence[Any], total: int, stage: str = "train") -> str:
    """``round r: f of n clients failed (stage): node …: reason; …`` for replies with errors."""
    reasons = "; ".join(f"node {r.metadata.src_node_id}: {short_reason(r.error.reason)}" for r in failed[:3])
    return f"round {server_round}: {len(failed)} of {total} clients failed ({stage}): {reasons}"


def ordered_replies(
    replies: Iterable[Any], grid: Any, server_round: int, stage: str = "train", allow_failures: bool = False
) -> list[Any]:
    """The successful replies sorted by their node's partition id (reproducible sums).

    ``grid`` is the round's view (it maps nodes to partitions). A reply with an error raises
    RuntimeError naming the round, stage and reasons, unless ``allow_failures`` (protocols that
    tolerate dropouts then see only the successful replies).
    """
    replies = list(replies)
    failed = [r for r in replies if r.has_error()]
    if failed and not allow_failures:
        raise RuntimeError(failure_message(server_round, failed, len(replies), stage))
    ok = [r for r in replies if not r.has_error()]
    return sorted(ok, key=lambda r: grid.partition_id(r.metadata.src_node_id))


@dataclass
class RoundReport:
    """What the server reports to the CLI after every round (for the progress display)."""

    server_round: int
    num_rounds: int
    metrics: dict[str, float] | None
    seconds: float
    sampled: list[int] = field(default_factory=list)


class FederatedServer:
    """Drives the rounds; writes rounds.jsonl, checkpoints and final.json into the run directory."""

    #: read the Simulation Engine's node order instead of asking every node (see :meth:`_discover`)
    fast_discovery: bool = True

    def __init__(
        self,
        run_dir: RunDir,
        components: Components,
        strategy: StrategyParts,
        on_round: Callable[[RoundReport], None] | None = None,
        baselines: Mapping[str, float] | None = None,
    ) -> None:
        self.rd = run_dir
        self.components = components
        self.config = components.config
        self.strategy = strategy
        self.on_round = on_round or (lambda report: None)
        self.baselines = dict(baselines or {})
        self.module = components.make_module()
        if strategy.prepare_module is not None:  # refuses an incompatible model before any round
            strategy.prepare_module(self.module)
        self.test_loader = make_loader(components.data.test, _EVAL_BATCH, shuffle=False)
        self.error: BaseException | None = None

    # -- helpers -------------------------------------------------------------------------
    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.module.load_state_dict(state)
        return evaluate(self.module, self.test_loader)

    def _discover(self, grid: Any) -> dict[int, int]:
        """partition id → node id.

        Asking all N nodes costs O(N²) on the Simulation Engine: Flower's in-memory LinkState
        scans every stored message for every node on each delivery sweep (measured in
        benchmarks/federation.py). That engine registers node i with ``partition-id`` i and
        lists its nodes in registration order, so this order is used once the nodes of a seeded
        sample of :data:`DISCOVERY_PROBES` partitions confirm it. Anywhere else (the Deployment
        Engine), with ``fast_discovery`` off, or on any mismatch, every node is asked once.
        """
        node_ids = _wait_for_nodes(grid, self.config.clients)
        ordered = _registration_order(grid, node_ids) if self.fast_discovery else None
        if ordered is not None and len(ordered) == self.config.clients:
            rng = np.random.default_rng(derive_seed(self.config.seed, 0xD15C))
            probes = [int(i) for i in rng.choice(len(ordered), size=min(DISCOVERY_PROBES, len(ordered)), replace=False)]
            answers = self._query_partitions(grid, [ordered[i] for i in probes])
            if all(answers.get(i) == ordered[i] for i in probes):
                return dict(enumerate(ordered))
            log.warning("the engine's node order does not match the nodes' partition ids; asking every node")
        mapping = self._query_partitions(grid, node_ids)
        missing = sorted(set(range(self.config.clients)) - set(mapping))
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {self.config.clients} client partitions have no node (first: {missing[:5]}); "
                f"{len(node_ids)} nodes are connected"
            )
        return mapping

    def _query_partitions(self, grid: Any, node_ids: Sequence[int]) -> dict[int, int]:
        """partition id → node id as reported by one ``query`` message to each of ``node_ids``."""
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.common import MessageType

        messages = [
            Message(RecordDict({"info": ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in node_ids
        ]
        mapping: dict[int, int] = {}
        for reply in grid.send_and_receive(messages, timeout=600):
            if reply.has_error():
                reason = short_reason(reply.error.reason)
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: {reason}")
            mapping[int(reply.content["info"][PARTITION_KEY])] = reply.metadata.src_node_id
        return mapping

    # -- the loop ------------------------------------------------------------------------
    def main(self, grid: Any) -> None:
        try:
            self._main(grid)
        except BaseException as exc:  # surfaced by run_simulation's caller
            log.exception("server failed")
            self.error = exc

    def _main(self, grid: Any) -> None:
        from flwr.app import ArrayRecord, ConfigRecord

        cfg = self.config
        start_round, state, elapsed, sent, received = self._restore()
        node_of = self._discover(grid)
        arrays = ArrayRecord(state)
        if start_round == 0:
            self._record(0, state, elapsed, 0.0, sent, received, [])
            start_round = 1
        stopped: str | None = None
        for server_round in range(start_round, cfg.rounds + 1):
            if self.strategy.before_round is not None:
                try:
                    self.strategy.before_round(server_round)
                except PrivacyBudgetExhausted as exc:
                    stopped = exc.message
                    log.warning("stopping before round %d: %s", server_round, stopped)
                    break
            t0 = time.perf_counter()
            sampled = sample_clients(cfg.seed, server_round, cfg.clients, cfg.per_round)
            random.seed(derive_seed(cfg.seed, server_round, 7))
            lr = cfg.lr * lr_factor(cfg.lr_schedule, server_round, cfg.rounds)
            train_config = ConfigRecord({"local-epochs": cfg.local_epochs, "lr": lr, **dict(self.strategy.train_config)})
            view = _SubsetGrid(grid, [node_of[p] for p in sampled], {node_of[p]: p for p in sampled})
            if self.strategy.round_protocol is not None:
                train_config["server-round"] = server_round
                result = self.strategy.round_protocol.run_round(view, server_round, arrays, train_config, ROUND_TIMEOUT)
                arrays = result.arrays
                sent += int(result.bytes_sent)
                received += int(result.bytes_received)
                extra = {key.replace("-", "_"): float(value) for key, value in result.metrics.items()}
            else:
                arrays, extra, round_sent, round_received = self._train_round(view, server_round, arrays, train_config)
                sent += round_sent
                received += round_received
            state = self._module_dtypes(arrays.to_torch_state_dict())
            _check_finite(server_round, state)
            arrays = ArrayRecord(state)
            round_seconds = time.perf_counter() - t0
            elapsed += round_seconds
            evaluate_now = server_round % cfg.eval_every == 0 or server_round == cfg.rounds
            extra.update(self._round_metrics(server_round))
            extra["lr"] = lr
            metrics = (
                self._record(server_round, state, elapsed, round_seconds, sent, received, sampled, extra)
                if evaluate_now
                else None
            )
            strategy_state = self.strategy.get_state() if self.strategy.get_state else None
            self.rd.save_checkpoint(
                {"round": server_round, "state": state, "elapsed": elapsed, "sent": sent, "received": received,
                 "strategy_state": strategy_state}
            )
            self.on_round(RoundReport(server_round, cfg.rounds, metrics, round_seconds, sampled))
        if stopped is not None:
            self._record_stop(state, elapsed, sent, received)
        torch.save(state, self.rd.model)
        self._finish(state, stopped)

    def _train_round(
        self, view: _SubsetGrid, server_round: int, arrays: Any, train_config: Any
    ) -> tuple[Any, dict[str, float], int, int]:
        """configure_train → send_and_receive → aggregate_train; returns the new global arrays,
        the round's extra metrics and the bytes sent/received."""
        messages = list(self.strategy.server.configure_train(server_round, arrays, train_config, view))
        replies = ordered_replies(view.send_and_receive(messages, timeout=ROUND_TIMEOUT), view, server_round)
        new_arrays, train_metrics = self.strategy.server.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: the strategy returned no aggregate")
        sent = state_nbytes(arrays.to_torch_state_dict()) * len(messages)
        received = sum(state_nbytes(r.content["arrays"].to_torch_state_dict()) for r in replies)
        return new_arrays, _round_extras(train_metrics), sent, received

    def _round_metrics(self, server_round: int) -> dict[str, float]:
        if self.strategy.round_metrics is None:
            return {}
        return {key.replace("-", "_"): float(value) for key, value in self.strategy.round_metrics(server_round).items()}

    def _record_stop(self, state: Mapping[str, torch.Tensor], elapsed: float, sent: int, received: int) -> None:
        """Before a clean stop: make sure the last completed round is evaluated in rounds.jsonl."""
        rounds = self.rd.read_rounds()
        done = self.rd.load_checkpoint()
        completed = int(done["round"]) if done is not None else 0
        if rounds and rounds[-1]["round"] == completed:
            return
        sampled = sample_clients(self.config.seed, completed, self.config.clients, self.config.per_round) if completed else []
        self._record(completed, state, elapsed, 0.0, sent, received, sampled, self._round_metrics(completed) if completed else None)

    def _module_dtypes(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flower's averaging turns integer buffers (BatchNorm's ``num_batches_tracked``) into
        float64; give every entry back the dtype the model holds it in."""
        reference = self.module.state_dict()
        return {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}

    def _restore(self) -> tuple[int, dict[str, torch.Tensor], float, int, int]:
        ckpt = self.rd.load_checkpoint()
        if ckpt is None:
            self.rd.truncate_rounds(-1)
            return 0, {k: v.detach().clone() for k, v in self.module.state_dict().items()}, 0.0, 0, 0
        done = int(ckpt["round"])
        self.rd.truncate_rounds(done)
        if ckpt.get("strategy_state") is not None:
            if self.strategy.set_state is None:
                raise RuntimeError(f"the checkpoint holds state of strategy '{self.strategy.name}', which cannot restore it")
            self.strategy.set_state(ckpt["strategy_state"])
        log.info("resuming after round %d", done)
        return done + 1, ckpt["state"], float(ckpt["elapsed"]), int(ckpt["sent"]), int(ckpt["received"])

    def _record(
        self, server_round: int, state: Mapping[str, torch.Tensor], elapsed: float, round_seconds: float,
        sent: int, received: int, sampled: list[int], extra: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        try:
            metrics = self.evaluate(state)
        except FloatingPointError as exc:
            where = _NOTHING_SAVED if server_round > 0 else "the initial model is broken"
            raise FloatingPointError(f"round {server_round}: {exc}; {where}") from exc
        record = {
            "round": server_round,
            **metrics,
            "wall_seconds": round(elapsed, 3),
            "round_seconds": round(round_seconds, 3),
            "bytes_sent": sent,
            "bytes_received": received,
            "clients": sampled,
            **dict(extra or {}),
        }
        self.rd.append_round(record)
        if server_round == 0:
            self.on_round(RoundReport(0, self.config.rounds, metrics, 0.0, []))
        return metrics

    def _finish(self, state: Mapping[str, torch.Tensor], stopped: str | None = None) -> None:
        final = self.rd.summarize(self.baselines, self.components.protocol().as_dict())
        if stopped is not None:
            self.rd.write_json(self.rd.final, {**final, "stopped": stopped})


def _wait_for_nodes(grid: Any, expected: int) -> list[int]:
    """The grid's node ids once ``expected`` nodes are connected (or :data:`NODE_WAIT_SECONDS` passed):
    the Simulation Engine registers its nodes while the ServerApp already runs (about a quarter of
    10,000 were there at the first look), and SuperNodes connect when they are ready."""
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    return node_ids


def _registration_order(grid: Any, node_ids: Sequence[int]) -> list[int] | None:
    """The node ids in registration order when ``grid`` is Flower's in-memory grid (the
    Simulation Engine, whose LinkState keeps its nodes in a dict by registration), else None."""
    get_node_info = getattr(getattr(grid, "state", None), "get_node_info", None)
    if get_node_info is None:
        return None
    ordered = [int(info.node_id) for info in get_node_info()]
    return ordered if sorted(ordered) == sorted(int(n) for n in node_ids) else None


def _round_extras(train_metrics: Any) -> dict[str, float]:
    """The clients' aggregated training metrics and the strategy's own (e.g. FedGH's conflict
    rate), as flat ``train_*`` / strategy-named keys for rounds.jsonl."""
    if train_metrics is None:
        return {}
    skip = ("num-examples", "partition-id")
    return {key.replace("-", "_"): value for key, value in dict(train_metrics).items() if key not in skip}


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


#: Environment variable telling a client process how many torch threads its local training uses.
CLIENT_THREADS_ENV = "PCHMR_CLIENT_THREADS"


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
    from flwr.supercore.logger import console_handler

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
            "num_cpus": cpus,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }
    if not verbose:  # client errors reach the CLI as one message; their Ray tracebacks go to run.log
        console_handler.setLevel(logging.CRITICAL)
    logging.getLogger("flwr").setLevel(logging.INFO)
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
