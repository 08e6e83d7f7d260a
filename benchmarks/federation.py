"""Federated runtime overhead: round time vs the clients' own training time, and scaling in N.

One run of this script measures, on Flower's Simulation Engine (Ray) with pchmr's real
:class:`~pchmr.core.engine.federation.server.FederatedServer` and ClientApp (FastMETRO-S, small encoder, 64 px
synthetic data):

* **(a) overhead ratio** at N = 10 clients, k = 5 per round, ``--fit-samples`` samples per
  client: round wall time ÷ the summed ``trainer.fit`` time of the round's clients (aim ≤ 1.10);
* **(b), (c) scaling in N**: the same k and per-client work (``--scale-samples`` each) at
  N = 10, 1,000 and 10,000: steady-state round time and peak resident memory vs N = 10
  (aim ≤ 1.10× time, ≤ 1 GiB more).
* **discovery**: the server's partition → node map. By default pchmr reads the Simulation
  Engine's node order and confirms it with 16 queries; the ``query-N…`` rows (one round) ask every
  node instead, as pchmr did before, to show what that costs in Flower's in-memory LinkState.

Every configuration runs in its own process (its own Ray session), started by this script; the
parent samples the resident memory of that process's whole session (the server, Ray's GCS and
raylet, the client actor) every 0.2 s. The server side is instrumented from outside (wrapped
methods): start-up (Ray + the Simulation Engine until the first query), discovery (one query per
node), configure/aggregate, server-side (de)serialisation of the model, evaluation. The clients'
``fit-seconds`` is the weighted mean over the round's clients (Flower's metric aggregation); all
clients hold the same number of samples, so the sum is k × the mean.

Data: one cached synthetic training pool (``--pool`` samples, rendered once), cut into
contiguous blocks: client c holds samples [c·s, (c+1)·s). The partition is written by this script
(disjoint and non-empty like every pchmr partition); unused samples are never read (memory-mapped).

    python benchmarks/federation.py                       # about 15-25 minutes on 2 shared cores
    python benchmarks/federation.py --sizes 10,1000       # skip N = 10,000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1024 * 1024
GIB = 1024 * MIB
RSS_SAMPLE_SECONDS = 0.2
DEFAULT_SIZES = (10, 1000, 10_000)
DEFAULT_PER_ROUND = 5
DEFAULT_ROUNDS = 4
DEFAULT_FIT_SAMPLES = 32
DEFAULT_SCALE_SAMPLES = 1
DEFAULT_POOL = 10_000
DEFAULT_SEED = 0
NUM_TEST = 16
BATCH_SIZE = 16
AIM_RATIO = 1.10
AIM_TIME = 1.10
AIM_EXTRA_MEMORY = 1 * GIB


@dataclass(frozen=True)
class Setting:
    """One federation to measure: N clients, k per round, s samples per client."""

    label: str
    clients: int
    per_round: int
    samples: int
    rounds: int
    fast_discovery: bool = True


# --------------------------------------------------------------------------------------
# child: one federation, instrumented
# --------------------------------------------------------------------------------------
def _timed(record: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)

    return wrapper


def run_setting(setting: Setting, pool: int, seed: int, out: Path) -> dict[str, Any]:
    """Run one federation in this process and return its measurements."""
    import resource

    import torch

    from pchmr.core.contracts.partition import Partition, save_partition
    from pchmr.core.engine.components import build_components
    from pchmr.core.engine.config import RunConfig
    from pchmr.core.engine.federation.common import build_strategy
    from pchmr.core.engine.federation.server import FederatedServer
    from pchmr.core.engine.federation.simulation import run_simulation
    from pchmr.core.engine.preparation import write_run_config
    from pchmr.core.engine.rundir import RunDir
    from pchmr.core.kit.cache import default_cache_dir
    from pchmr.core.kit.federation import state_nbytes

    if setting.clients * setting.samples > pool:
        raise ValueError(
            f"{setting.label}: {setting.clients} clients × {setting.samples} samples need a pool of at least "
            f"{setting.clients * setting.samples}, got --pool {pool}"
        )
    config = RunConfig(
        num_train=pool,
        num_test=NUM_TEST,
        clients=setting.clients,
        per_round=setting.per_round,
        rounds=setting.rounds,
        batch_size=BATCH_SIZE,
        seed=seed,
        eval_every=1,
        cache_dir=str(default_cache_dir().resolve()),
        out=str(out),
    )
    rd = RunDir(out).create()
    handler = rd.attach_log()
    t_build = time.perf_counter()
    components = build_components(config)
    s = setting.samples
    blocks = tuple(np.arange(c * s, (c + 1) * s, dtype=np.int64) for c in range(setting.clients))
    save_partition(Partition(blocks, "benchmark-blocks", {"samples_per_client": s}), rd.partition)
    strategy = build_strategy(config)
    write_run_config(rd, config, components, strategy)
    build_seconds = time.perf_counter() - t_build

    server = FederatedServer(rd, components, strategy)
    server.fast_discovery = setting.fast_discovery
    timings: dict[str, list[float]] = {
        k: [] for k in ("discover", "evaluate", "configure", "aggregate", "save", "to_torch")
    }
    from flwr.app import ArrayRecord

    # every server-side ArrayRecord → torch conversion (the global state each round and the byte counts)
    to_torch = ArrayRecord.to_torch_state_dict
    ArrayRecord.to_torch_state_dict = _timed(timings["to_torch"], to_torch)
    server._discover = _timed(timings["discover"], server._discover)  # type: ignore[method-assign]
    server.evaluate = _timed(timings["evaluate"], server.evaluate)  # type: ignore[method-assign]
    server.rd.save_checkpoint = _timed(timings["save"], server.rd.save_checkpoint)  # type: ignore[method-assign]
    flower = strategy.server
    flower.configure_train = _timed(timings["configure"], flower.configure_train)
    flower.aggregate_train = _timed(timings["aggregate"], flower.aggregate_train)
    first_query: list[float] = []
    discover = server._discover

    def _mark_then_discover(grid: Any) -> Any:
        first_query.append(time.perf_counter())
        return discover(grid)

    server._discover = _mark_then_discover  # type: ignore[method-assign]
    t_sim = time.perf_counter()
    try:
        run_simulation(server)
    finally:
        ArrayRecord.to_torch_state_dict = to_torch
    total = time.perf_counter() - t_sim
    handler.close()

    rounds = [r for r in rd.read_rounds() if r["round"] > 0]
    state = torch.load(rd.model, map_location="cpu", weights_only=True)
    serialisation = _serialisation_seconds(state)
    return {
        "label": setting.label,
        "clients": setting.clients,
        "per_round": setting.per_round,
        "samples_per_client": s,
        "rounds": setting.rounds,
        "build_seconds": build_seconds,
        "startup_seconds": first_query[0] - t_sim if first_query else float("nan"),
        "simulation_seconds": total,
        "timings": timings,
        "round_seconds": [r["round_seconds"] for r in rounds],
        "fit_seconds_mean": [r["fit_seconds"] for r in rounds],
        "model_bytes": state_nbytes(state),
        "serialisation_seconds": serialisation,
        "driver_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _serialisation_seconds(state: Any) -> dict[str, float]:
    """Server-side cost of one model message: ArrayRecord from a state dict and back (median of 5)."""
    from flwr.app import ArrayRecord

    to_record, from_record = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        record = ArrayRecord(state)
        t1 = time.perf_counter()
        record.to_torch_state_dict()
        t2 = time.perf_counter()
        to_record.append(t1 - t0)
        from_record.append(t2 - t1)
    return {"to_record": statistics.median(to_record), "from_record": statistics.median(from_record)}


# --------------------------------------------------------------------------------------
# parent: one child per setting, session memory sampled from /proc
# --------------------------------------------------------------------------------------
def _session_rss(session: int) -> int:
    """Summed resident bytes of every process in ``session`` (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            with open(f"/proc/{entry.name}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue  # the process ended between listing and reading
    return total


def measure(setting: Setting, pool: int, seed: int, work: Path) -> dict[str, Any]:
    """Run ``setting`` in a child process; add the session's peak resident memory."""
    result_path = work / f"{setting.label}.json"
    log_path = work / f"{setting.label}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps(setting.__dict__),
        "--pool",
        str(pool),
        "--seed",
        str(seed),
        "--child-out",
        str(work / setting.label),
        "--child-result",
        str(result_path),
    ]
    # Ray starts its workers 15 niceness levels below the driver's: on a shared machine the clients'
    # training would then get less CPU than the server. Same niceness for both.
    # On a machine shared with other jobs, Ray's default OOM threshold (95 % of the machine's memory,
    # counting everyone's processes) kills the client actor; 98 % lets the benchmark through.
    env = {
        **os.environ,
        "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
        "RAY_memory_usage_threshold": os.environ.get("RAY_memory_usage_threshold", "0.98"),
    }
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _session_rss(proc.pid))
            time.sleep(RSS_SAMPLE_SECONDS)
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{setting.label} failed with exit code {proc.returncode}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["session_peak_rss_bytes"] = peak
    return result


def steady(values: list[float]) -> float:
    """Median of the rounds after the first (round 1 also builds the client runtime)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def summarise(result: dict[str, Any]) -> dict[str, float]:
    k = result["per_round"]
    rounds, fits = result["round_seconds"], [k * f for f in result["fit_seconds_mean"]]
    ratios = [r / f for r, f in zip(rounds, fits)]
    t = result["timings"]
    per_round = lambda key: steady(t[key]) if t[key] else 0.0  # noqa: E731
    return {
        "round": steady(rounds),
        "first_round": rounds[0],
        "fit_sum": steady(fits),
        "ratio": steady(ratios),
        "configure": per_round("configure"),
        "aggregate": per_round("aggregate"),
        "checkpoint": per_round("save"),
        "to_torch": sum(t["to_torch"]) / max(1, result["rounds"]),
        "to_torch_calls": len(t["to_torch"]) / max(1, result["rounds"]),
        "startup": result["startup_seconds"],
        "discovery": sum(t["discover"]),
        "evaluate": statistics.median(t["evaluate"]) if t["evaluate"] else 0.0,
        "serialisation": sum(result["serialisation_seconds"].values()),
        "peak_rss": result["session_peak_rss_bytes"],
        "driver_rss": result["driver_max_rss_bytes"],
    }


ROWS = (
    ("clients N", lambda r, s, b: f"{r['clients']:,}"),
    ("per round k", lambda r, s, b: str(r["per_round"])),
    ("samples per client", lambda r, s, b: str(r["samples_per_client"])),
    ("round time (s), median of rounds 2..R", lambda r, s, b: f"{s['round']:.2f}"),
    ("Σ clients' fit time (s)", lambda r, s, b: f"{s['fit_sum']:.2f}"),
    ("(a) round ÷ Σ fit", lambda r, s, b: f"{s['ratio']:.3f}"),
    ("first round (s, builds the client runtime)", lambda r, s, b: f"{s['first_round']:.2f}"),
    ("server: configure + aggregate (s/round)", lambda r, s, b: f"{s['configure'] + s['aggregate']:.3f}"),
    ("server: checkpoint write (s/round)", lambda r, s, b: f"{s['checkpoint']:.3f}"),
    ("server: model → ArrayRecord → model, once (s)", lambda r, s, b: f"{s['serialisation']:.3f}"),
    (
        "server: ArrayRecord → torch per round (s, calls)",
        lambda r, s, b: f"{s['to_torch']:.2f}, {s['to_torch_calls']:.0f}",
    ),
    ("start-up: Ray + engine until first query (s)", lambda r, s, b: f"{s['startup']:.1f}"),
    ("discovery: one query per node (s)", lambda r, s, b: f"{s['discovery']:.1f}"),
    ("evaluation per evaluated round (s)", lambda r, s, b: f"{s['evaluate']:.2f}"),
    ("peak RSS, whole session (MiB)", lambda r, s, b: f"{s['peak_rss'] / MIB:,.0f}"),
    ("peak RSS, server process (MiB)", lambda r, s, b: f"{s['driver_rss'] / MIB:,.0f}"),
    ("(b)/(c) round time ÷ N=10's", lambda r, s, b: f"{s['round'] / b['round']:.3f}" if b else "—"),
    ("(b)/(c) peak RSS − N=10's (MiB)", lambda r, s, b: f"{(s['peak_rss'] - b['peak_rss']) / MIB:+,.0f}" if b else "—"),
)


def print_table(results: list[dict[str, Any]]) -> None:
    """One column per setting, one row per measurement (fits an 80-column terminal for 4 settings)."""
    from rich.console import Console
    from rich.table import Table

    base = next((summarise(r) for r in results if r["label"] == "scale-N10"), None)
    table = Table(title="pchmr federation overhead (Simulation Engine, FastMETRO-S small-64)")
    table.add_column("measurement")
    for r in results:
        table.add_column(r["label"], justify="right")
    summaries = [summarise(r) for r in results]
    for name, cell in ROWS:
        table.add_row(name, *(cell(r, s, base) for r, s in zip(results, summaries)))
    Console(width=max(100, 48 + 14 * len(results))).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="N values of the scaling rows")
    parser.add_argument("--per-round", type=int, default=DEFAULT_PER_ROUND, help="k, clients per round")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds per setting (median of 2..R)")
    parser.add_argument("--fit-samples", type=int, default=DEFAULT_FIT_SAMPLES, help="samples per client, row (a)")
    parser.add_argument(
        "--scale-samples", type=int, default=DEFAULT_SCALE_SAMPLES, help="samples per client, rows (b)/(c)"
    )
    parser.add_argument(
        "--query-discovery-sizes",
        default="1000",
        help="N values of one-round rows that ask every node for its partition (the pre-fast-path discovery)",
    )
    parser.add_argument("--no-overhead-row", action="store_true", help="skip row (a)")
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL, help="synthetic training samples rendered (cached)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "federation.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        setting = Setting(**json.loads(args.child))
        result = run_setting(setting, args.pool, args.seed, args.child_out)
        args.child_result.write_text(json.dumps(result))
        return 0

    sizes = [int(n) for n in args.sizes.split(",") if n]
    settings = (
        [] if args.no_overhead_row else [Setting("overhead-N10", 10, args.per_round, args.fit_samples, args.rounds)]
    )
    settings += [Setting(f"scale-N{n}", n, args.per_round, args.scale_samples, args.rounds) for n in sizes]
    settings += [
        Setting(f"query-N{n}", n, args.per_round, args.scale_samples, 1, fast_discovery=False)
        for n in (int(v) for v in args.query_discovery_sizes.split(",") if v)
    ]
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="pchmr-bench-fed-") as tmp:
        for setting in settings:
            print(
                f"running {setting.label}: N={setting.clients}, k={setting.per_round}, "
                f"{setting.samples} samples/client, {setting.rounds} rounds",
                flush=True,
            )
            started = time.perf_counter()
            try:
                results.append(measure(setting, args.pool, args.seed, Path(tmp)))
            except RuntimeError as exc:  # report the others; the failure is printed and kept in the JSON
                print(f"  FAILED: {str(exc)[-800:]}", flush=True)
                failures.append({"label": setting.label, "error": str(exc)[-4000:]})
                continue
            print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    report = {
        "results": results,
        "failures": failures,
        "summary": {r["label"]: summarise(r) for r in results},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average {load_before[0]:.1f} before, {report['load_after'][0]:.1f} after; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
