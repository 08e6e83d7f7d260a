"""Privacy benchmark: round time of secure aggregation (flower, crypten) and DP-FedAvg vs plain FedAvg.

    python benchmarks/privacy.py [--clients 10] [--fit-seconds S] [--json PATH]

Everything is measured in one run, so the ratios share the machine's state (read the ratios,
not the absolute seconds, on a shared CPU):

1. the model: FastMETRO-S as the default run builds it (its state dict: ~10 M float32 values);
2. one local fit: ``pchmr.core.engine.federation.client.local_fit`` of client 0 for one epoch in the default
   run (synthetic data, 64 px, batch 16) — or ``--fit-seconds`` to reuse a measured value;
3. the aggregation path of one round with ``--clients`` clients (default 10) and synthetic
   updates (global + 0.01·N(0, 1)) in place of training: plain FedAvg (configure_train → each
   client builds its reply ArrayRecord → aggregate_train) and each secure-aggregation backend
   (the real round protocol and client handlers: encoding, key agreement, Shamir shares,
   AES-CTR masks or CrypTen sharing, unmasking/reveal), all through an in-process grid (no
   network or Ray serialisation, for either side). CrypTen's party start-up is one-off per run
   and reported apart; the DP-FedAvg server work is :func:`pchmr.plugins.privacy.dp.dp_overhead`.

Round-time ratio, as pchmr's Simulation Engine runs a round on one machine (clients one after
the other): ``(K·fit + path) / (K·fit + plain path)``. With clients on their own devices
(``parallel``): ``(fit + client work / K + server work) / (fit + plain path)``, the client work
of a backend being the time spent inside its client handlers minus the training stand-in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("PCHMR_CACHE_DIR", "/tmp/pchmr-cache")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.core.engine.config import RunConfig
from pchmr.core.kit.federation import flower_sampling_kwargs
from pchmr.plugins.privacy.secagg import secagg


class _Context:
    def __init__(self, partition: int) -> None:
        self.state = RecordDict()
        self.node_config = {"partition-id": partition}


class TimedGrid:
    """In-process grid: messages go straight to ``handler(msg, context, None)``; time inside
    handlers is the clients' (``client_seconds``)."""

    def __init__(self, handler: Any, num_clients: int) -> None:
        self.handler = handler
        self.nodes = {100 + p: p for p in range(num_clients)}
        self.contexts = {nid: _Context(p) for nid, p in self.nodes.items()}
        self.client_seconds = 0.0
        self._ids = 0

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def partition_id(self, node_id: int) -> int:
        return self.nodes[node_id]

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self._ids += 1
            message.metadata.__dict__["_message_id"] = f"m{self._ids}"  # what the SuperLink sets
            nid = message.metadata.dst_node_id
            start = time.perf_counter()
            replies.append(self.handler(message, self.contexts[nid], None))
            self.client_seconds += time.perf_counter() - start
        return replies


def default_model_state() -> tuple[dict[str, torch.Tensor], RunConfig]:
    from pchmr.core.engine.components import build_components

    config = RunConfig()
    components = build_components(config.replace(cache_dir=os.environ["PCHMR_CACHE_DIR"]))
    return {k: v.detach().clone() for k, v in components.make_module().state_dict().items()}, config


def measure_local_fit(config: RunConfig) -> float:
    """Seconds of one real local fit (client 0, one epoch) in the default run."""
    from pchmr.core.engine.components import build_components
    from pchmr.core.engine.federation.client import ClientRuntime, local_fit
    from pchmr.core.engine.federation.mechanisms import MechanismRuntime
    from pchmr.core.engine.preparation import make_partition
    from pchmr.core.engine.trainer import quiet_lightning

    quiet_lightning()
    config = config.replace(cache_dir=os.environ["PCHMR_CACHE_DIR"])
    components = build_components(config)
    partition = make_partition(config, components.data)
    parts = StrategyParts(name="fedavg", server=None)
    runtime = ClientRuntime(components, partition, parts, components.make_module(), MechanismRuntime(parts))
    state = {k: v.detach().clone() for k, v in runtime.module.state_dict().items()}
    start = time.perf_counter()
    local_fit(runtime, state, 0, 1, {"local-epochs": 1})
    return time.perf_counter() - start


class SyntheticTrainer:
    """Training stand-in: client p returns global + its precomputed update (no work)."""

    def __init__(self, global_state: dict[str, torch.Tensor], num_clients: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.states = []
        for _ in range(num_clients):
            self.states.append(
                {
                    k: (v + 0.01 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v.clone()
                    for k, v in global_state.items()
                }
            )
        self.seconds = 0.0

    def __call__(
        self, runtime: Any, msg: Message, context: _Context
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        start = time.perf_counter()
        p = int(context.node_config["partition-id"])
        result = (
            self.states[p],
            {"num-examples": 100.0, "train-loss": 1.0, "fit-seconds": 0.0, "partition-id": float(p)},
        )
        self.seconds += time.perf_counter() - start
        return result


def plain_round(global_state: dict[str, torch.Tensor], trainer: SyntheticTrainer, num_clients: int) -> dict[str, float]:
    server = FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples")

    def handler(msg: Message, context: _Context, runtime: Any) -> Message:
        new_state, metrics = trainer(runtime, msg, context)
        return Message(RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)}), reply_to=msg)

    grid = TimedGrid(handler, num_clients)
    start = time.perf_counter()
    arrays = ArrayRecord(global_state)
    messages = list(server.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    replies = grid.send_and_receive(messages)
    server.aggregate_train(1, replies)
    total = time.perf_counter() - start
    return {"path_s": total, "client_s": grid.client_seconds - trainer.seconds, "server_s": total - grid.client_seconds}


def secure_round(
    global_state: dict[str, torch.Tensor], trainer: SyntheticTrainer, num_clients: int, options: dict
) -> dict[str, float]:
    parts = StrategyParts(name="fedavg", server=FedAvg(**flower_sampling_kwargs(), weighted_by_key="num-examples"))
    wrapped = secagg(parts, StrategyConfig(num_clients, num_clients, 1, 0, options))
    mechanism = wrapped.mechanism("secagg")
    handler = next(iter(mechanism.client_handlers().values()))
    handler.train = trainer
    protocol = mechanism.round_protocol()
    out: dict[str, float] = {}
    if hasattr(protocol, "start"):
        start = time.perf_counter()
        protocol.start()
        out["startup_s"] = time.perf_counter() - start
    try:
        grid = TimedGrid(handler, num_clients)
        trainer.seconds = 0.0
        start = time.perf_counter()
        protocol.run_round(grid, 1, ArrayRecord(global_state), ConfigRecord({"server-round": 1}), 3600.0)
        total = time.perf_counter() - start
    finally:
        if hasattr(protocol, "close"):
            protocol.close()
    client = grid.client_seconds - trainer.seconds
    out.update({"path_s": total, "client_s": client, "server_s": total - grid.client_seconds})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10, help="clients per round (default 10)")
    parser.add_argument("--fit-seconds", type=float, default=None, help="reuse a measured local fit (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/privacy.json)")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    k = args.clients

    global_state, config = default_model_state()
    num_params = sum(v.numel() for v in global_state.values())
    fit = args.fit_seconds if args.fit_seconds is not None else measure_local_fit(config)
    print(f"FastMETRO-S state: {num_params:,} values; local fit (client 0, 1 epoch): {fit:.2f} s", flush=True)

    trainer = SyntheticTrainer(global_state, k)
    paths = {"plain": plain_round(global_state, trainer, k)}
    print(f"plain FedAvg path: {paths['plain']['path_s']:.2f} s", flush=True)
    for backend in ("flower", "crypten"):
        paths[backend] = secure_round(global_state, trainer, k, {"backend": backend})
        print(f"secagg {backend} path: {paths[backend]['path_s']:.2f} s", flush=True)
    plain_path = paths["plain"]["path_s"]
    rows = {}
    for backend in ("flower", "crypten"):
        p = paths[backend]
        rows[backend] = {
            **p,
            "ratio_simulation": (k * fit + p["path_s"]) / (k * fit + plain_path),
            "ratio_parallel": (fit + p["client_s"] / k + p["server_s"]) / (fit + plain_path),
        }
    from pchmr.plugins.privacy.dp import dp_overhead

    dp = dp_overhead(num_params, per_round=k)
    rows["dp"] = {**dp, "ratio_simulation": (k * fit + plain_path + dp["dp_minus_plain_s"]) / (k * fit + plain_path)}
    print("\nround-time ratio vs plain FedAvg (1.00 = no overhead)")
    print(f"{'mechanism':<16}{'path s':>9}{'client s':>10}{'server s':>10}{'simulation':>12}{'parallel':>10}")
    for name, row in rows.items():
        if name == "dp":
            print(f"{'dp (server)':<16}{row['dp_s']:>9.2f}{'':>10}{'':>10}{row['ratio_simulation']:>12.3f}{'':>10}")
        else:
            print(
                f"{'secagg ' + name:<16}{row['path_s']:>9.2f}{row['client_s']:>10.2f}{row['server_s']:>10.2f}"
                f"{row['ratio_simulation']:>12.3f}{row['ratio_parallel']:>10.3f}"
            )
    faster = min(("flower", "crypten"), key=lambda b: rows[b]["ratio_simulation"])
    print(f"faster backend: {faster} ({rows[faster]['ratio_simulation']:.3f}x; the paper measured 1.90x)")
    payload = {
        "command": "python benchmarks/privacy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "clients_per_round": k,
        "num_params": num_params,
        "fit_seconds": fit,
        "plain": paths["plain"],
        **rows,
    }
    path = args.json or Path(__file__).parent / "results" / "privacy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
