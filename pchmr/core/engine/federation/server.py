"""The server half: FederatedServer drives the rounds and writes the run directory."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pchmr.core.contracts.strategy import PrivacyBudgetExhausted, StrategyParts
from pchmr.core.engine.components import Components, make_loader
from pchmr.core.engine.devices import deterministic_algorithms
from pchmr.core.engine.evaluation import evaluate
from pchmr.core.engine.federation.common import (
    PARTITION_KEY,
    ROUND_TIMEOUT,
    SPEED_METRIC,
    EngineStopped,
    RoundReport,
    required_replies,
    sample_clients,
)
from pchmr.core.engine.federation.mechanisms import STATES_KEY, MechanismRuntime
from pchmr.core.engine.federation.nodeauth import bind_claims
from pchmr.core.engine.rundir import RunDir
from pchmr.core.engine.tracking import Tracker, open_tracker
from pchmr.core.engine.trainer import lr_factor
from pchmr.core.kit.federation import (
    ordered_replies,
    short_reason,
    state_nbytes,
    wait_for_nodes,
)
from pchmr.core.kit.seeds import derive_seed

__all__ = [
    "CLIENT_LOSS_KEY",
    "CLIENT_SPEED_KEY",
    "DISCOVERY_PROBES",
    "NODE_WAIT_SECONDS",
    "FederatedServer",
    "client_losses",
    "client_speeds",
    "partition_claims",
]

log = logging.getLogger("pchmr.federation")


_EVAL_BATCH = 64


#: partitions whose nodes confirm the Simulation Engine's node order (FederatedServer._discover)
DISCOVERY_PROBES = 16


#: seconds discovery waits for all N nodes to be connected
NODE_WAIT_SECONDS = 600.0


_NOTHING_SAVED = (
    "nothing of this round was saved: the checkpoint of the round before is kept (`pchmr run --resume RUN_DIR` "
    "continues from it); lower --lr, or the privacy noise"
)


_ROUND_NOT_SAVED = (
    "nothing of this round was saved: the checkpoint of the round before is kept; `pchmr run --resume RUN_DIR` "
    "runs the round again with the same clients (and --client-dropout's same draws)"
)


def _describe(failures: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """``partition 7: reason; partition 9: reason`` (the first ``limit``, then how many more)."""
    text = "; ".join(f"partition {f['partition']}: {f['error']}" for f in failures[:limit])
    return text + (f"; and {len(failures) - limit} more (run.log)" if len(failures) > limit else "")


def _check_finite(server_round: int, state: Mapping[str, torch.Tensor]) -> None:
    """FloatingPointError naming the entries of an aggregated model that hold NaN or ±inf."""
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise FloatingPointError(
            f"round {server_round}: the aggregated global model holds non-finite values in {len(bad)} of "
            f"{len(state)} entries (first: {', '.join(bad[:3])}); {_NOTHING_SAVED}"
        )


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
        self._failed: dict[int, str] = {}

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def partition_id(self, node_id: int) -> int:
        if node_id not in self._partition_of:
            raise KeyError(f"node {node_id} is not one of this round's sampled nodes {self._nodes}")
        return self._partition_of[node_id]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """The wrapped grid's, noting every sampled client that failed: a reply with an error, or
        no reply at all before ``timeout`` (:attr:`failures`, by partition id)."""
        outgoing = list(messages)
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        answered = {reply.metadata.src_node_id for reply in replies}
        for reply in replies:
            if reply.has_error():
                self._fail(reply.metadata.src_node_id, short_reason(reply.error.reason))
        for message in outgoing:
            if message.metadata.dst_node_id not in answered:
                self._fail(message.metadata.dst_node_id, "no reply" + (f" within {timeout:.0f} s" if timeout else ""))
        return replies

    def _fail(self, node_id: int, reason: str) -> None:
        partition = self._partition_of.get(node_id)
        if partition is not None:
            self._failed.setdefault(partition, reason)  # its first failure: later stages only follow from it

    @property
    def failures(self) -> list[dict[str, Any]]:
        """``{"partition": id, "error": reason}`` of each sampled client that failed this round, by partition."""
        return [{"partition": p, "error": self._failed[p]} for p in sorted(self._failed)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class FederatedServer:
    """Drives the rounds; writes rounds.jsonl, checkpoints and final.json into the run directory."""

    #: read the Simulation Engine's node order instead of asking every node (see :meth:`_discover`)
    fast_discovery: bool = True
    #: seconds discovery waits for all N nodes to connect (None: :data:`NODE_WAIT_SECONDS`)
    node_wait_seconds: float | None = None
    #: appended to the error naming partitions without a node (e.g. how to start SuperNodes)
    missing_nodes_hint: str = ""
    #: partition id → fingerprint of the SuperNode key bound to it (the Deployment Engine with node
    #: authentication, :mod:`~pchmr.core.engine.federation.nodeauth`); None: claims are trusted
    node_binding: dict[int, str] | None = None

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
        self.mechanisms = MechanismRuntime(strategy)
        self.module = components.make_module()
        self.mechanisms.prepare_module(self.module)  # refuses an incompatible model before any round
        #: where this process evaluates the global model (the module waits on the CPU in between)
        self.placement = self.config.placement()
        if self.placement.deterministic:  # this process's evaluations (a Deployment ServerApp's too)
            deterministic_algorithms(True)
        self.test_loader = make_loader(components.data.test, _EVAL_BATCH, shuffle=False, placement=self.placement)
        self.error: BaseException | None = None
        #: the run's loggers (``--logger``), opened once the run directory is resumed
        self.tracker = Tracker()
        self._untracked: list[dict[str, Any]] = []  # records not logged yet: each is, once its round is saved
        #: set when :meth:`main` returns, whatever way
        self.finished = threading.Event()

    # -- helpers -------------------------------------------------------------------------
    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.module.load_state_dict(state)
        return evaluate(self.module, self.test_loader, self.placement)

    def _discover(self, grid: Any) -> dict[int, int]:
        """partition id → node id.

        Asking all N nodes costs O(N²) on the Simulation Engine: Flower's in-memory LinkState
        scans every stored message for every node on each delivery sweep (measured in
        benchmarks/federation.py). That engine registers node i with ``partition-id`` i and
        lists its nodes in registration order, so this order is used once the nodes of a seeded
        sample of :data:`DISCOVERY_PROBES` partitions confirm it. Anywhere else (the Deployment
        Engine), with ``fast_discovery`` off, or on any mismatch, every node is asked once.
        """
        timeout = NODE_WAIT_SECONDS if self.node_wait_seconds is None else self.node_wait_seconds
        node_ids = wait_for_nodes(grid, self.config.clients, timeout)
        fast = self.fast_discovery and self.node_binding is None
        ordered = _registration_order(grid, node_ids) if fast else None
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
                f"{len(node_ids)} nodes are connected{self.missing_nodes_hint}"
                + (
                    "; only a node registered with the key bound to a partition (node-keys.json) may hold it, the "
                    "log names every refused claim"
                    if self.node_binding is not None
                    else ""
                )
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
        claims: list[tuple[int, int]] = []
        for reply in grid.send_and_receive(messages, timeout=600):
            if reply.has_error():
                reason = short_reason(reply.error.reason)
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: {reason}")
            claims.append((int(reply.metadata.src_node_id), int(reply.content["info"][PARTITION_KEY])))
        if self.node_binding is not None:  # a claim counts only from the node registered with the partition's key
            keys = {int(node.node_id): bytes(node.public_key) for node in grid.get_nodes()}
            claims = bind_claims(claims, keys, self.node_binding)
        return partition_claims(claims)

    # -- the loop ------------------------------------------------------------------------
    def main(self, grid: Any) -> None:
        status = "failed"
        try:
            self._main(grid)
            status = "success"
        except EngineStopped as exc:  # the engine failed or the run was interrupted: its caller says which
            log.info("server stopped: %s", exc)
            self.error = exc
            status = "interrupted"
        except BaseException as exc:  # surfaced by run_simulation's caller
            log.exception("server failed")
            self.error = exc
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        finally:
            self.tracker.close(status)
            self.finished.set()

    def _main(self, grid: Any) -> None:
        from flwr.app import ArrayRecord, ConfigRecord

        cfg = self.config
        start_round, state, elapsed, sent, received = self._restore()
        self.tracker = open_tracker(cfg, self.rd)  # after the restore cut rounds.jsonl to the checkpoint
        node_of = self._discover(grid)
        arrays = ArrayRecord(state)
        if start_round == 0:
            self._record(0, state, elapsed, 0.0, sent, received, [])
            self._track()
            start_round = 1
        stopped: str | None = None
        for server_round in range(start_round, cfg.rounds + 1):
            try:
                self.mechanisms.before_round(server_round)
            except PrivacyBudgetExhausted as exc:
                stopped = exc.message
                log.warning("stopping before round %d: %s", server_round, stopped)
                break
            t0 = time.perf_counter()
            sampled = sample_clients(cfg.seed, server_round, cfg.clients, cfg.per_round)
            random.seed(derive_seed(cfg.seed, server_round, 7))
            lr = cfg.lr * lr_factor(cfg.lr_schedule, server_round, cfg.rounds)
            train_config = ConfigRecord({"local-epochs": cfg.local_epochs, "lr": lr, **self.mechanisms.train_config()})
            view = _SubsetGrid(grid, [node_of[p] for p in sampled], {node_of[p]: p for p in sampled})
            protocol = self.mechanisms.round_protocol
            if protocol is not None:
                train_config["server-round"] = server_round
                try:
                    result = protocol.run_round(view, server_round, arrays, train_config, ROUND_TIMEOUT)
                except Exception as exc:  # e.g. secure aggregation below its own threshold: name the partitions
                    if not view.failures:
                        raise
                    raise RuntimeError(f"{exc} (failed: {_describe(view.failures)}); {_ROUND_NOT_SAVED}") from exc
                self._check_replies(server_round, len(sampled), view.failures)
                arrays = result.arrays
                sent += int(result.bytes_sent)
                received += int(result.bytes_received)
                extra = {key.replace("-", "_"): float(value) for key, value in result.metrics.items()}
            else:
                arrays, extra, round_sent, round_received = self._train_round(view, server_round, arrays, train_config)
                sent += round_sent
                received += round_received
            failures = view.failures
            extra["aggregated"] = len(sampled) - len(failures)
            extra["failures"] = failures  # type: ignore[assignment]  # a list of {partition, error}
            if failures:
                log.warning(
                    "round %d: %d of %d sampled clients failed, %d replies aggregated: %s",
                    server_round,
                    len(failures),
                    len(sampled),
                    len(sampled) - len(failures),
                    _describe(failures, limit=len(failures)),
                )
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
            self.rd.save_checkpoint(
                {
                    "round": server_round,
                    "state": state,
                    "elapsed": elapsed,
                    "sent": sent,
                    "received": received,
                    STATES_KEY: self.mechanisms.state_dict(),
                }
            )
            self._track()  # the round is saved: it is never trained again
            self.on_round(RoundReport(server_round, cfg.rounds, metrics, round_seconds, sampled, failures))
        if stopped is not None:
            self._record_stop(state, elapsed, sent, received)
            self._track()
        self.rd.save_model(state)
        self._finish(state, stopped)

    def _train_round(
        self, view: _SubsetGrid, server_round: int, arrays: Any, train_config: Any
    ) -> tuple[Any, dict[str, float], int, int]:
        """configure_train → send_and_receive → aggregate_train; returns the new global arrays,
        the round's extra metrics and the bytes sent/received."""
        messages = list(self.strategy.server.configure_train(server_round, arrays, train_config, view))
        replies = ordered_replies(
            view.send_and_receive(messages, timeout=ROUND_TIMEOUT), view, server_round, allow_failures=True
        )
        self._check_replies(server_round, len(messages), view.failures)
        new_arrays, train_metrics = self.strategy.server.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: the strategy returned no aggregate")
        sent = state_nbytes(arrays.to_torch_state_dict()) * len(messages)
        received = sum(state_nbytes(r.content["arrays"].to_torch_state_dict()) for r in replies)
        extras = _round_extras(train_metrics)
        released = [reply.content["metrics"] for reply in replies if "metrics" in reply.content]
        speeds = client_speeds(released)
        if speeds:
            extras[CLIENT_SPEED_KEY] = speeds  # type: ignore[assignment]  # one number per partition
        losses = client_losses(released)
        if losses:
            extras[CLIENT_LOSS_KEY] = losses  # type: ignore[assignment]
        return new_arrays, extras, sent, received

    def _check_replies(self, server_round: int, sampled: int, failures: Sequence[Mapping[str, Any]]) -> None:
        """Refuse to aggregate a round in which fewer than :func:`required_replies` of the
        ``sampled`` clients trained (``--min-fit-fraction``): a RuntimeError naming the failed
        partitions and their errors; nothing of the round is saved."""
        if not failures:
            return
        fraction = self.config.min_fit_fraction
        need, got = required_replies(sampled, fraction), sampled - len(failures)
        if got >= need:
            return
        rule = (
            f"--min-fit-fraction {fraction:g} needs {need}"
            if fraction is not None
            else "at least one is needed (--min-fit-fraction unset)"
        )
        raise RuntimeError(
            f"round {server_round}: {len(failures)} of {sampled} sampled clients failed (train), {got} replied and "
            f"{rule}: {_describe(failures)}; {_ROUND_NOT_SAVED}"
        )

    def _round_metrics(self, server_round: int) -> dict[str, Any]:
        return {key.replace("-", "_"): value for key, value in self.mechanisms.round_metrics(server_round).items()}

    def _record_stop(self, state: Mapping[str, torch.Tensor], elapsed: float, sent: int, received: int) -> None:
        """Before a clean stop: make sure the last completed round is evaluated in rounds.jsonl."""
        rounds = self.rd.read_rounds()
        done = self.rd.load_checkpoint()
        completed = int(done["round"]) if done is not None else 0
        if rounds and rounds[-1]["round"] == completed:
            return
        sampled = (
            sample_clients(self.config.seed, completed, self.config.clients, self.config.per_round) if completed else []
        )
        self._record(
            completed,
            state,
            elapsed,
            0.0,
            sent,
            received,
            sampled,
            self._round_metrics(completed) if completed else None,
        )

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
        try:
            self.mechanisms.restore(ckpt)
        except ValueError as exc:
            raise ValueError(f"cannot resume from {self.rd.checkpoint}: {exc}") from exc
        log.info("resuming after round %d", done)
        return done + 1, ckpt["state"], float(ckpt["elapsed"]), int(ckpt["sent"]), int(ckpt["received"])

    def _record(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        elapsed: float,
        round_seconds: float,
        sent: int,
        received: int,
        sampled: list[int],
        extra: Mapping[str, float] | None = None,
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
        self._untracked.append(record)
        if server_round == 0:
            self.on_round(RoundReport(0, self.config.rounds, metrics, 0.0, []))
        return metrics

    def _track(self) -> None:
        """Hand the records written since the last call to the run's loggers."""
        pending, self._untracked = self._untracked, []
        self.tracker.log_rounds(pending)

    def _finish(self, state: Mapping[str, torch.Tensor], stopped: str | None = None) -> None:
        final = self.rd.summarize(self.baselines, self.components.protocol().as_dict())
        if stopped is not None:
            self.rd.write_json(self.rd.final, {**final, "stopped": stopped})


def partition_claims(claims: Iterable[tuple[int, int]]) -> dict[int, int]:
    """partition id → node id from the nodes' own claims, ``(node id, partition id)`` pairs.

    A node's partition id is what it says it holds (its ``--node-config partition-id``): nothing
    else ties a SuperNode to a partition. When several nodes claim one partition, the one with the
    smallest node id keeps it (a fixed rule: which one holds the partition's data cannot be told
    from here) and every other claimant is refused: it is never sampled, so none of its replies
    is aggregated, and an error in the run's log names the partition and the nodes.
    """
    by_partition: dict[int, list[int]] = {}
    for node, partition in claims:
        by_partition.setdefault(partition, []).append(node)
    mapping: dict[int, int] = {}
    for partition, nodes in sorted(by_partition.items()):
        kept, *refused = sorted(set(nodes))
        mapping[partition] = kept
        if refused:
            log.error(
                "partition %d is claimed by %d nodes: node %d keeps it, node(s) %s are refused (never sampled, none "
                "of their replies aggregated); two SuperNodes were started with the same --node-config partition-id, "
                "or one impersonates another: stop the duplicate",
                partition,
                1 + len(refused),
                kept,
                ", ".join(str(n) for n in refused),
            )
    return mapping


def _registration_order(grid: Any, node_ids: Sequence[int]) -> list[int] | None:
    """The node ids in registration order when ``grid`` is Flower's in-memory grid (the
    Simulation Engine, whose LinkState keeps its nodes in a dict by registration), else None."""
    get_node_info = getattr(getattr(grid, "state", None), "get_node_info", None)
    if get_node_info is None:
        return None
    ordered = [int(info.node_id) for info in get_node_info()]
    return ordered if sorted(ordered) == sorted(int(n) for n in node_ids) else None


#: rounds.jsonl key of each sampled client's training images per second, by partition id
CLIENT_SPEED_KEY = "client_img_s"


#: rounds.jsonl key of each sampled client's training loss (its last epoch's mean), by partition id
CLIENT_LOSS_KEY = "client_loss"


def client_speeds(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """partition id (a string: a JSON key) → the ``train-img-s`` that client's reply reports
    (:func:`~pchmr.core.engine.federation.client.local_fit`), for the replies that carry both;
    a mechanism that releases less (DP's equal weights, secure aggregation's sums) leaves them out."""
    return {partition: round(value, 3) for partition, value in _per_client(metrics, SPEED_METRIC).items()}


def client_losses(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """partition id → the ``train-loss`` that client's reply reports, as :func:`client_speeds`."""
    return _per_client(metrics, "train-loss")


def _per_client(metrics: Iterable[Mapping[str, Any]], key: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in metrics:
        if key in record and PARTITION_KEY in record:
            out[str(int(record[PARTITION_KEY]))] = float(record[key])
    return dict(sorted(out.items(), key=lambda item: int(item[0])))


def _round_extras(train_metrics: Any) -> dict[str, float]:
    """The clients' aggregated training metrics and the strategy's own (e.g. FedGH's conflict
    rate), as flat ``train_*`` / strategy-named keys for rounds.jsonl."""
    if train_metrics is None:
        return {}
    skip = ("num-examples", "partition-id")
    return {key.replace("-", "_"): value for key, value in dict(train_metrics).items() if key not in skip}
