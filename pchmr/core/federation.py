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
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from pchmr.core.config import RunConfig
from pchmr.core.experiment import Components, build_components, derive_seed, make_loader
from pchmr.core.hmr import HMRModule, evaluate, make_trainer, quiet_lightning
from pchmr.core.partition import Partition, load_partition
from pchmr.core.perf import tune_allocator
from pchmr.core.registry import get_registry
from pchmr.core.rundir import RunDir
from pchmr.core.strategy import StrategyConfig, StrategyParts

__all__ = ["FederatedServer", "make_client_app", "make_server_app", "run_simulation", "build_strategy"]

log = logging.getLogger("pchmr.federation")

PARTITION_KEY = "partition-id"
RUN_DIR_KEY = "pchmr-run-dir"
_EVAL_BATCH = 64


def build_strategy(config: RunConfig) -> StrategyParts:
    factory = get_registry().get("strategy", config.strategy)
    return factory(
        StrategyConfig(
            num_clients=config.clients,
            per_round=config.per_round,
            num_rounds=config.rounds,
            seed=config.seed,
            options=dict(config.strategy_options),
        )
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
class _ClientRuntime:
    components: Components
    partition: Partition
    strategy: StrategyParts
    module: HMRModule


_RUNTIMES: dict[str, _ClientRuntime] = {}
_RUNTIME_LOCK = threading.Lock()


def _client_runtime(run_dir: str) -> _ClientRuntime:
    """Built once per process (Ray actor or SuperNode) from the run directory's files."""
    with _RUNTIME_LOCK:
        if run_dir not in _RUNTIMES:
            quiet_lightning()
            rd = RunDir(run_dir)
            config = RunConfig.from_dict(rd.read_config()["run"])
            components = build_components(config)
            flwr_logger = logging.getLogger("flwr")
            level = flwr_logger.level
            flwr_logger.setLevel(logging.ERROR)  # the server half's construction warnings are not the client's
            try:
                strategy = build_strategy(config)
            finally:
                flwr_logger.setLevel(level)
            module = components.make_module(loss_terms=strategy.loss_terms)
            _RUNTIMES[run_dir] = _ClientRuntime(components, load_partition(rd.partition), strategy, module)
        return _RUNTIMES[run_dir]


def local_fit(
    runtime: _ClientRuntime, state: Mapping[str, torch.Tensor], partition_id: int, server_round: int,
    config: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """E local epochs of HMRModule on this client's data, starting from ``state``."""
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
    trainer = make_trainer(max_epochs=epochs, grad_clip=module.optim.grad_clip, quiet=True)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_seconds = time.perf_counter() - start
    loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    new_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    metrics = {"num-examples": float(len(dataset)), "train-loss": loss, "fit-seconds": fit_seconds}
    return new_state, metrics


def make_client_app(run_dir: str | Path | None = None) -> Any:
    """The ClientApp: ``query`` answers the node's partition id, ``train`` runs :func:`local_fit`.

    ``run_dir`` is baked in for the Simulation Engine; on the Deployment Engine it comes from
    the run config key ``pchmr-run-dir``.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    fixed_dir = None if run_dir is None else str(run_dir)

    def _dir(context: Context) -> str:
        return fixed_dir or str(context.run_config[RUN_DIR_KEY])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[PARTITION_KEY])
        return Message(RecordDict({"info": ConfigRecord({PARTITION_KEY: pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        runtime = _client_runtime(_dir(context))
        pid = int(context.node_config[PARTITION_KEY])
        config = dict(msg.content["config"])
        state = msg.content["arrays"].to_torch_state_dict()
        new_state, metrics = local_fit(runtime, state, pid, int(config["server-round"]), config)
        metrics["partition-id"] = float(pid)
        content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return app


# --------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------
class _SubsetGrid:
    """A view of a Flower Grid that shows a strategy only the round's sampled nodes."""

    def __init__(self, grid: Any, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._nodes = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


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
        self.test_loader = make_loader(components.data.test, _EVAL_BATCH, shuffle=False)
        self.error: BaseException | None = None

    # -- helpers -------------------------------------------------------------------------
    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.module.load_state_dict(state)
        return evaluate(self.module, self.test_loader)

    def _discover(self, grid: Any) -> dict[int, int]:
        """partition id → node id, asking every node once."""
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.common import MessageType

        node_ids = list(grid.get_node_ids())
        messages = [
            Message(RecordDict({"info": ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in node_ids
        ]
        mapping: dict[int, int] = {}
        for reply in grid.send_and_receive(messages, timeout=600):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: {reply.error.reason}")
            mapping[int(reply.content["info"][PARTITION_KEY])] = reply.metadata.src_node_id
        missing = sorted(set(range(self.config.clients)) - set(mapping))
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {self.config.clients} client partitions have no node (first: {missing[:5]}); "
                f"{len(node_ids)} nodes are connected"
            )
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
        model_bytes = state_nbytes(state)
        if start_round == 0:
            self._record(0, state, elapsed, 0.0, sent, received, [])
            start_round = 1
        for server_round in range(start_round, cfg.rounds + 1):
            t0 = time.perf_counter()
            sampled = sample_clients(cfg.seed, server_round, cfg.clients, cfg.per_round)
            random.seed(derive_seed(cfg.seed, server_round, 7))
            train_config = ConfigRecord({"local-epochs": cfg.local_epochs, **dict(self.strategy.train_config)})
            view = _SubsetGrid(grid, [node_of[p] for p in sampled])
            messages = list(self.strategy.server.configure_train(server_round, arrays, train_config, view))
            replies = list(grid.send_and_receive(messages, timeout=24 * 3600))
            failed = [r for r in replies if r.has_error()]
            if failed:
                reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed[:3])
                raise RuntimeError(f"round {server_round}: {len(failed)} of {len(replies)} clients failed: {reasons}")
            replies.sort(key=lambda r: float(r.content["metrics"]["partition-id"]))
            new_arrays, train_metrics = self.strategy.server.aggregate_train(server_round, replies)
            if new_arrays is None:
                raise RuntimeError(f"round {server_round}: the strategy returned no aggregate")
            arrays = new_arrays
            sent += model_bytes * len(messages)
            received += sum(state_nbytes(r.content["arrays"].to_torch_state_dict()) for r in replies)
            state = arrays.to_torch_state_dict()
            round_seconds = time.perf_counter() - t0
            elapsed += round_seconds
            evaluate_now = server_round % cfg.eval_every == 0 or server_round == cfg.rounds
            extra = _round_extras(train_metrics)
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
        torch.save(state, self.rd.model)
        self._finish(state)

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
        metrics = self.evaluate(state)
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

    def _finish(self, state: Mapping[str, torch.Tensor]) -> None:
        self.rd.summarize(self.baselines, self.components.protocol().as_dict())


def _round_extras(train_metrics: Any) -> dict[str, float]:
    """The clients' aggregated training metrics and the strategy's own (e.g. FedGH's conflict
    rate), as flat ``train_*`` / strategy-named keys for rounds.jsonl."""
    if train_metrics is None:
        return {}
    skip = ("num-examples", "partition-id")
    return {key.replace("-", "_"): value for key, value in dict(train_metrics).items() if key not in skip}


def make_server_app(server: FederatedServer) -> Any:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server.main(grid)

    return app


def run_simulation(server: FederatedServer, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Run the federation on Flower's Simulation Engine (Ray) on this machine.

    One client trains at a time with every core (local training is the round's work; running
    k clients side by side on a 2-core machine only splits the same cores). Flower's and Ray's
    console output is kept to errors unless ``verbose``; ``run.log`` gets Flower's log in full.
    """
    import os

    from flwr.simulation import run_simulation as flwr_run_simulation
    from flwr.supercore.logger import console_handler

    tune_allocator()  # before Ray starts its workers, which inherit the environment
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here: keep Ray's notice quiet
    cpus = num_cpus or os.cpu_count() or 1
    client_app = make_client_app(server.rd.path.resolve())
    backend_config = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }
    if not verbose:
        console_handler.setLevel(logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.INFO)
    flwr_run_simulation(
        server_app=make_server_app(server),
        client_app=client_app,
        num_supernodes=server.config.clients,
        backend_name="ray",
        backend_config=backend_config,
    )
    if server.error is not None:
        raise server.error
