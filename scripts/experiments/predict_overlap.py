"""Does ``pchmr predict`` draw a run's mesh on the person? IoU of the drawn mesh with the body.

Writes the first ``--n`` test images of a finished run's synthetic dataset as PNG files, runs
``pchmr predict`` on them, reads each overlay back (the pixels it changed) and prints the IoU with
the body's exact silhouette, beside the same drawings with projection bugs and another image's
drawing (:mod:`pchmr.testing.overlap`). The numbers justify tests/test_predict_overlap.py's bar.

    .venv/bin/python scripts/experiments/predict_overlap.py --checkpoint RUN_DIR --out /tmp/overlap
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pchmr.core.contracts.sample import denormalize_image
from pchmr.core.engine.inference import load_trained
from pchmr.testing.overlap import body_masks, overlap_study, read_drawings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a finished run directory on synthetic data")
    parser.add_argument("--out", type=Path, required=True, help="scratch directory (replaced)")
    parser.add_argument("--n", type=int, default=16, help="test images (default 16)")
    args = parser.parse_args()
    trained = load_trained(args.checkpoint, with_data=True)
    test = trained.components.data.test
    if not hasattr(test, "array"):
        sys.exit(f"{args.checkpoint} was not trained on the synthetic dataset: its bodies' silhouettes are unknown")
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "images").mkdir(parents=True)
    images = [args.out / "images" / f"t{i:03d}.png" for i in range(args.n)]
    for i, path in enumerate(images):
        Image.fromarray(denormalize_image(test[i]["image"]).numpy()).save(path)
    pchmr = [sys.executable, "-m", "pchmr.cli.app"]
    predict = [*pchmr, "predict", str(args.out / "images"), "--checkpoint", str(args.checkpoint)]
    subprocess.run([*predict, "--out", str(args.out / "pred")], check=True)
    bodies = body_masks(test, trained.faces, range(args.n))
    drawn = read_drawings(args.out / "pred", images)
    print(f"drawn mesh {np.mean([d.sum() for d in drawn]):.0f} px, body {np.mean([b.sum() for b in bodies]):.0f} px")
    print(f"{'IoU with the body':32s} {'mean':>6s} {'min':>6s} {'median':>6s} {'max':>6s}  own wins")
    study = overlap_study(drawn, bodies)
    for name, values in study.items():
        wins = "" if name == "own" else f"{int((study['own'] > values).sum()):>3d}/{args.n}"
        print(
            f"{name:32s} {values.mean():6.3f} {values.min():6.3f} {np.median(values):6.3f} {values.max():6.3f}  {wins}"
        )


if __name__ == "__main__":
    main()
