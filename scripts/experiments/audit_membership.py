"""Membership inference against example-level DP at several noise multipliers, over seeds.

For each seed and each noise multiplier z (``none``: no DP), trains an overfitted small run (one
client, one round of ``--epochs`` local epochs on ``--num-train`` samples: every sample seen every
epoch, as in a device's personalisation) and audits its final model with ``pchmr audit --attack
membership`` (the loss attack and the reference-calibrated one). Prints a table per z: ε (δ = 1e-5),
test MPJPE, and the AUC and TPR at 1 % FPR of each attack as the mean over seeds with a 95 % t
interval (each seed's own bootstrap interval is in its audit.json). Finished runs and audits are
reused, so the script resumes where it stopped.

    .venv/bin/python scripts/experiments/audit_membership.py --out /tmp/mi --seeds 1 2 3 --z none 0.5 2 8

docs/privacy.md ("What leaks") reports its output.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _interval(values: list[float]) -> str:
    """The mean over seeds with its 95 % t interval (pchmr's own, as the paper tables'), clipped to [0, 1]."""
    from pchmr.report.stats import interval

    spread = interval(values)
    if spread.half_width is None:
        return f"{spread.mean:.3f}"
    low, high = max(spread.low, 0.0), min(spread.high, 1.0)  # AUCs and rates lie in [0, 1]
    return f"{spread.mean:.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the runs and audits (reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--z", nargs="+", default=["none", "0.5", "2", "8"], help="noise multipliers; none: no DP")
    parser.add_argument("--num-train", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--shadows", type=int, default=2)
    args = parser.parse_args()
    pchmr = [sys.executable, "-m", "pchmr.cli.app"]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        for z in args.z:
            run = args.out / f"run-s{seed}-z{z}"
            audit = args.out / f"run-s{seed}-z{z}-mi"
            timing = args.out / f"run-s{seed}-z{z}.seconds.json"
            seconds = json.loads(timing.read_text()) if timing.is_file() else {}
            if not (run / "final.json").is_file():
                privacy = [] if z == "none" else [
                    "--privacy", "dp", "--privacy-option", "level=example", "--privacy-option", f"noise-multiplier={z}",
                ]  # fmt: skip
                seconds["train"] = _run(
                    [*pchmr, "run", "--clients", "1", "--per-round", "1", "--rounds", "1",
                     "--local-epochs", str(args.epochs), "--num-train", str(args.num_train), "--num-test", "16",
                     "--batch-size", "8", "--backbone-option", "encoder_norm=group", "--encoder-weights", "none",
                     "--seed", str(seed), *privacy, "--out", str(run)],
                    args.out / f"run-s{seed}-z{z}.log",
                )  # fmt: skip
            if not (audit / "audit.json").is_file():
                seconds["audit"] = _run(
                    [*pchmr, "audit", str(run), "--attack", "membership", "--attack-option",
                     f"candidates={args.num_train}", "--attack-option", f"shadows={args.shadows}",
                     "--seed", str(seed), "--out", str(audit), "--overwrite"],
                    args.out / f"run-s{seed}-z{z}-mi.log",
                )  # fmt: skip
            timing.write_text(json.dumps(seconds))
            final = json.loads((run / "final.json").read_text())
            report = json.loads((audit / "audit.json").read_text())
            last = json.loads((run / "rounds.jsonl").read_text().strip().splitlines()[-1])
            row = {"epsilon": last.get("epsilon", math.inf), "mpjpe_mm": final["mpjpe_mm"], **seconds}
            for m in report["measurements"]:
                row[f"{m['metric']} {m['notes']['attack']}"] = m["value"]
            results.setdefault(z, []).append(row)
            print(f"seed {seed} z {z}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    columns = ["auc loss", "auc calibrated", "tpr@1%fpr loss", "tpr@1%fpr calibrated"]
    print()
    print("| z | ε (δ=1e-5) | test MPJPE mm | " + " | ".join(columns) + " | train s | audit s |")
    print("|---" * (len(columns) + 5) + "|")
    for z, rows in results.items():
        eps = [r["epsilon"] for r in rows]
        cells = [_interval([r[c] for r in rows]) for c in columns]
        times = [f"{np.nanmean([r.get(k, math.nan) for r in rows]):.0f}" for k in ("train", "audit")]
        print(f"| {z} | {np.mean(eps):.3g} | {np.mean([r['mpjpe_mm'] for r in rows]):.0f} | "
              + " | ".join(cells) + f" | {' | '.join(times)} |")  # fmt: skip
    print(f"\n{len(args.seeds)} seeds; intervals: mean ± t(0.975, n−1)·s/√n over seeds")


if __name__ == "__main__":
    main()
