"""Smoke-scale comparison of fedavg, fedprox, fedopt (adam) and fedgh on a strongly non-IID split.

Every (strategy, seed) is one real ``pchmr run`` (through :func:`pchmr.core.engine.run.execute`, the
Simulation Engine), written to ``OUT/<strategy>-s<seed>/``; a finished run directory is reused,
so an interrupted comparison continues where it stopped. The script then prints and writes
(``OUT/strategies.md`` and ``OUT/strategies.json``) mean ± sample standard deviation over the
seeds of the final MPJPE / PA-MPJPE (mm) and, for FedGH, the fraction of conflicting client pairs
(mean over rounds, then over seeds).

Split (default): ``natural`` by ``action``: one client per pose family of the body model (Anny:
6 actions), so no two clients share an action — the strongest label skew the synthetic data
offer. The seed changes the rendered data (the dataset is seeded by the run seed), the client
sampling and the initial weights.

Strategy settings are fixed here, not tuned: fedprox μ = 0.01 (pchmr's default); fedopt with
server Adam at η = 1e-3 (Flower's default 0.1 moves every weight by about 0.1 per round, far more
than a client's own AdamW steps at lr 1e-3), β's and τ Flower's defaults; fedgh with its defaults
(model-level projection, η = 1). With one or two local steps per client FedProx's term barely acts
(its gradient is zero at the first step, where w = w_global). This is a smoke test of the machinery at toy scale: three
rounds on 60 images cannot rank strategies, and the table is reported without a winner.

    nice -n 10 python scripts/experiments/strategies.py                      # 12 runs of 2.5-6 min on 2 busy shared cores
    nice -n 10 python scripts/experiments/strategies.py --seeds 0 --rounds 2  # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: name in the table → (strategy plugin, strategy options).
STRATEGIES: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "fedprox": ("fedprox", {"proximal-mu": 0.01}),
    "fedopt-adam": ("fedopt", {"server-opt": "adam", "server-learning-rate": 1e-3}),
    "fedgh": ("fedgh", {}),
}
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_OUT = Path("runs/experiments/strategies")
CONFLICT_KEY = "fedgh_conflict_fraction"


def run_config(strategy: str, options: Mapping[str, Any], seed: int, args: argparse.Namespace, out: Path) -> Any:
    from pchmr.core.engine.config import RunConfig

    return RunConfig(
        strategy=strategy,
        strategy_options=dict(options),
        seed=seed,
        partitioner=args.partitioner,
        partition_options=dict(_parse_options(args.partition_option)),
        clients=args.clients,
        per_round=args.per_round,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        num_train=args.num_train,
        num_test=args.num_test,
        batch_size=args.batch_size,
        out=str(out),
    )


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--partition-option must be key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = _number(value)
    return out


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run (or reuse) one (strategy, seed) and return its final metrics and FedGH statistics."""
    from pchmr.core.engine.run import execute
    from pchmr.core.engine.rundir import RunDir

    strategy, options = STRATEGIES[name]
    out = args.out / f"{name}-s{seed}"
    rd = RunDir(out)
    seconds = None
    if not rd.final.exists():
        resume = rd.checkpoint.exists() or rd.config.exists()
        started = time.perf_counter()
        execute(run_config(strategy, options, seed, args, out), run_dir=out, resume=resume)
        seconds = time.perf_counter() - started
    final = rd.read_json(rd.final)
    rounds = [r for r in rd.read_rounds() if r["round"] > 0]
    conflicts = [r[CONFLICT_KEY] for r in rounds if CONFLICT_KEY in r]
    return {
        "strategy": name,
        "seed": seed,
        "mpjpe_mm": final["mpjpe_mm"],
        "pa_mpjpe_mm": final["pa_mpjpe_mm"],
        "round0_mpjpe_mm": final["round0"]["mpjpe_mm"],
        "round0_pa_mpjpe_mm": final["round0"]["pa_mpjpe_mm"],
        "mean_pose_pa_mpjpe_mm": final.get("mean_pose_pa_mpjpe_mm"),
        "conflict_fraction": statistics.fmean(conflicts) if conflicts else None,
        "seconds": seconds,
        "run_dir": str(out),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> str:
    """Markdown table: mean ± std over seeds per strategy."""
    lines = [
        "| strategy | seeds | MPJPE (mm) | PA-MPJPE (mm) | round-0 MPJPE (mm) | FedGH conflict rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in STRATEGIES:
        mine = [r for r in rows if r["strategy"] == name]
        if not mine:
            continue
        cells = []
        for key in ("mpjpe_mm", "pa_mpjpe_mm", "round0_mpjpe_mm"):
            m, s = mean_std([r[key] for r in mine])
            cells.append(f"{m:.1f} ± {s:.1f}")
        conflicts = [r["conflict_fraction"] for r in mine if r["conflict_fraction"] is not None]
        if conflicts:
            m, s = mean_std(conflicts)
            cells.append(f"{m:.2f} ± {s:.2f}")
        else:
            cells.append("—")
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated names of the table")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument("--partitioner", default="natural")
    parser.add_argument("--partition-option", action="append", default=None, help="key=value (default label=action)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=60)
    parser.add_argument("--num-test", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.partition_option is None:
        args.partition_option = ["label=action"]
    names = [n for n in args.strategies.split(",") if n]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    # Ray starts its workers 15 niceness levels below the driver's; on a shared machine the client
    # training then starves. Run the client actor at this script's own niceness instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:  # seed-major: an interrupted comparison still has every strategy at the first seeds
        for name in names:
            print(f"{name} seed {seed} ...", flush=True)
            row = run_one(name, seed, args)
            took = "reused" if row["seconds"] is None else f"{row['seconds']:.0f} s"
            print(f"  MPJPE {row['mpjpe_mm']:.1f}  PA-MPJPE {row['pa_mpjpe_mm']:.1f}  ({took})", flush=True)
            rows.append(row)
    text = table(rows, seeds)
    setting = (
        f"{args.partitioner} {' '.join(args.partition_option)}; {args.clients} clients, {args.per_round} per round, "
        f"{args.rounds} rounds, {args.local_epochs} local epoch(s), {args.num_train} train / {args.num_test} test "
        f"images, batch {args.batch_size}, seeds {', '.join(map(str, seeds))}"
    )
    print(setting)
    print(text)
    (args.out / "strategies.md").write_text(f"{setting}\n\n{text}\n")
    (args.out / "strategies.json").write_text(
        json.dumps(
            {"setting": vars(args) | {"out": str(args.out)}, "strategies": STRATEGIES, "runs": rows},
            indent=2,
            default=str,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
