"""DePoser vs SMPLify-X on synthetic images with known meshes, and a depth-noise sweep.

Each configuration fits the first ``--n`` images of the default synthetic dataset's test split
(64-pixel crops, seed 0) with realistic keypoint noise (4 px per coordinate at 224-px scale,
5 % missing joints, 2 % outliers) and, for deposer, per-joint depth with Gaussian noise and an
unknown scale. One JSON line per configuration (with per-image errors) is appended to
``--out``; ``--table`` prints the markdown tables from that file.

    nice -n 10 .venv/bin/python scripts/experiments/deposer_vs_smplifyx.py --config main --n 200
    nice -n 10 .venv/bin/python scripts/experiments/deposer_vs_smplifyx.py --config sweep --n 64
    .venv/bin/python scripts/experiments/deposer_vs_smplifyx.py --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pchmr.core.contracts.bodymodel import BodyModelSpec
from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.engine.annotation import annotate_items, items_from_dataset
from pchmr.core.kit.cache import default_cache_dir
from pchmr.core.kit.metrics import mpjpe, mpvpe, pa_mpjpe
from pchmr.plugins.annotators.deposer import make_deposer, make_smplifyx
from pchmr.plugins.annotators.sources import SyntheticDepthSource, SyntheticKeypointSource
from pchmr.plugins.bodymodels.anny import make_anny
from pchmr.plugins.datasets.synthetic import make_synthetic

CONFIGS = {
    "main": [("smplifyx", {}, {}), ("deposer", {}, {"noise_m": 0.05})],
    "sweep": [("deposer", {}, {"noise_m": s}) for s in (0.0, 0.1, 0.2, 0.4)]
    + [("deposer", {}, {"noise_m": 0.05, "invariance": "affine"})],
    "limits": [("smplifyx", {"pose_prior": "limits"}, {}), ("deposer", {"pose_prior": "limits"}, {"noise_m": 0.05})],
    "printed": [("deposer", {"silog_form": "printed"}, {"noise_m": 0.05})],
}


def run(config: str, n: int, out: Path) -> None:
    torch.set_num_threads(1)
    cache = default_cache_dir()
    body = make_anny(BodyModelSpec(cache_dir=str(cache)))
    data = make_synthetic(DatasetSpec(image_size=64, seed=0, cache_dir=cache / "datasets"), body)
    split = data.test
    items = items_from_dataset(split, range(min(n, len(split))))
    gj = torch.from_numpy(np.asarray(split.array("joints_3d")[: len(items)]))[..., :3].double()
    gv = torch.from_numpy(np.asarray(split.array("vertices")[: len(items)])).double()
    keypoints = SyntheticKeypointSource()
    for name, options, depth_options in CONFIGS[config]:
        make = make_deposer if name == "deposer" else make_smplifyx
        annotator = make(body, {**options, "cache_dir": str(cache)})
        depth = SyntheticDepthSource(**depth_options) if name == "deposer" else None
        start = time.perf_counter()
        result = annotate_items(items, annotator, body.joint_names, keypoints, depth, crop_size=64, full_image=True)
        seconds = time.perf_counter() - start
        index = [item.index for item in result.items]
        pj, pv = (
            torch.from_numpy(np.stack(result.joints)).double(),
            torch.from_numpy(np.stack(result.vertices)).double(),
        )
        per = {
            "mpvpe_mm": mpvpe(pv, gv[index]),
            "mpjpe_mm": mpjpe(pj, gj[index]),
            "pa_mpjpe_mm": pa_mpjpe(pj, gj[index]),
        }
        record = {
            "config": config,
            "annotator": name,
            "options": options,
            "depth": depth_options,
            "n": len(index),
            "failed": sum(r.status != "ok" for r in result.records),
            "seconds": seconds,
            "index": index,
            **{k: float(v.mean()) for k, v in per.items()},
            "per_image": {k: v.tolist() for k, v in per.items()},
        }
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(
            f"{name} {options} {depth_options}: n={len(index)} {seconds:.0f}s MPVPE {record['mpvpe_mm']:.1f} "
            f"MPJPE {record['mpjpe_mm']:.1f} PA-MPJPE {record['pa_mpjpe_mm']:.1f}",
            flush=True,
        )


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| config | annotator | options | depth | n | MPVPE | MPJPE | PA-MPJPE | s/img |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['annotator']} | {r['options'] or '-'} | {r['depth'] or '-'} | {r['n']} | "
            f"{r['mpvpe_mm']:.1f} | {r['mpjpe_mm']:.1f} | {r['pa_mpjpe_mm']:.1f} | {r['seconds'] / r['n']:.2f} |"
        )
    base = next((r for r in rows if r["annotator"] == "smplifyx" and not r["options"]), None)
    if base is None:
        return
    print("\nOn the same images as each row (smplifyx baseline restricted to them):")
    print(
        "| depth | n | smplifyx MPVPE | deposer MPVPE | Δ | smplifyx MPJPE | deposer MPJPE | Δ | smplifyx PA | deposer PA | Δ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    where = {i: k for k, i in enumerate(base["index"])}
    for r in rows:
        if r["annotator"] != "deposer" or r["options"]:
            continue
        pick = [where[i] for i in r["index"] if i in where]
        keys = ("mpvpe_mm", "mpjpe_mm", "pa_mpjpe_mm")
        b = {k: float(np.mean(np.asarray(base["per_image"][k])[pick])) for k in keys}
        cells = " | ".join(f"{b[k]:.1f} | {r[k]:.1f} | {r[k] - b[k]:+.1f}" for k in keys)
        print(f"| {r['depth']} | {len(pick)} | {cells} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="main")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("/tmp/deposer/experiments.jsonl"))
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        table(args.out)
    else:
        run(args.config, args.n, args.out)
