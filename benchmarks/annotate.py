"""Annotation speed on this machine: seconds per image at batch 1 and batch 64 for ``smplifyx``
and ``deposer`` (L-BFGS, strong Wolfe), next to the same fit with Adam at 200 iterations (the
SPIN SMPLify setting) and the accuracy of each, all measured in one run on the synthetic test
split (64-px crops, realistic keypoint noise, depth with unknown scale and 5 cm noise).

    nice -n 10 .venv/bin/python benchmarks/annotate.py --n 64 --out benchmarks/results/annotate.json

Ratios, not absolute times, are the claim (the machine is shared): ``batch64_speedup`` =
(s/img at batch 1) / (s/img at batch 64), and ``adam_vs_lbfgs`` = Adam's s/img over L-BFGS's.
Batch 1 is timed on ``--n1`` images (default 4) to keep the run short.
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
from pchmr.plugins.annotators.sources import (
    SyntheticDepthSource,
    SyntheticKeypointSource,
)
from pchmr.plugins.bodymodels.anny import make_anny
from pchmr.plugins.datasets.synthetic import make_synthetic

ADAM_ITERATIONS = 200


def _measure(annotator, body, items, split, batch_size: int, depth) -> dict[str, float]:
    start = time.perf_counter()
    result = annotate_items(items, annotator, body.joint_names, SyntheticKeypointSource(), depth,
                            crop_size=64, full_image=True, batch_size=batch_size)  # fmt: skip
    seconds = time.perf_counter() - start
    index = [item.index for item in result.items]
    gj = torch.from_numpy(np.array(split.array("joints_3d")[index]))[..., :3].double()
    gv = torch.from_numpy(np.array(split.array("vertices")[index])).double()
    pj, pv = torch.from_numpy(np.stack(result.joints)).double(), torch.from_numpy(np.stack(result.vertices)).double()
    return {"n": len(index), "s_per_image": seconds / len(index), "mpvpe_mm": float(mpvpe(pv, gv).mean()),
            "mpjpe_mm": float(mpjpe(pj, gj).mean()), "pa_mpjpe_mm": float(pa_mpjpe(pj, gj).mean())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="images of the batch-64 runs")
    parser.add_argument("--n1", type=int, default=4, help="images of the batch-1 runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = default_cache_dir()
    body = make_anny(BodyModelSpec(cache_dir=str(cache)))
    split = make_synthetic(DatasetSpec(image_size=64, seed=0, cache_dir=cache / "datasets"), body).test
    items = items_from_dataset(split, range(args.n))
    results: dict[str, dict[str, float]] = {}
    for name, make in (("smplifyx", make_smplifyx), ("deposer", make_deposer)):
        depth = SyntheticDepthSource() if name == "deposer" else None
        lbfgs = make(body, {"cache_dir": str(cache)})
        adam = make(body, {"cache_dir": str(cache), "adam_iterations": ADAM_ITERATIONS})
        results[f"{name}_lbfgs_batch1"] = _measure(lbfgs, body, items[: args.n1], split, 1, depth)
        results[f"{name}_lbfgs_batch64"] = _measure(lbfgs, body, items, split, 64, depth)
        results[f"{name}_adam{ADAM_ITERATIONS}_batch64"] = _measure(adam, body, items, split, 64, depth)
        for key in (f"{name}_lbfgs_batch1", f"{name}_lbfgs_batch64", f"{name}_adam{ADAM_ITERATIONS}_batch64"):
            r = results[key]
            print(
                f"{key:32s} {r['s_per_image']:7.3f} s/img  MPVPE {r['mpvpe_mm']:6.1f}  MPJPE {r['mpjpe_mm']:6.1f}  "
                f"PA-MPJPE {r['pa_mpjpe_mm']:6.1f}  (n={r['n']})",
                flush=True,
            )
    ratios = {}
    for name in ("smplifyx", "deposer"):
        b1, b64 = results[f"{name}_lbfgs_batch1"], results[f"{name}_lbfgs_batch64"]
        ratios[f"{name}_batch64_speedup"] = b1["s_per_image"] / b64["s_per_image"]
        ratios[f"{name}_adam_vs_lbfgs"] = (
            results[f"{name}_adam{ADAM_ITERATIONS}_batch64"]["s_per_image"] / b64["s_per_image"]
        )
    print(json.dumps(ratios, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"results": results, "ratios": ratios, "n": args.n, "n1": args.n1}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
