"""Data benchmark: one epoch over the prepared store vs decoding and cropping the source JPEGs.

    python benchmarks/data.py [--samples 200] [--image-side 1000] [--size 224] [--json PATH]

A SPIN ``.npz`` with ``--samples`` people is generated (:func:`pchmr.testing.fake_datasets.write_spin_npz`),
its JPEGs re-encoded at ``--image-side`` pixels (Human3.6M's frames are 1000 × 1000, 3DPW's
1080 × 1920) with boxes scaled to match, and prepared into a store once (that time is reported
separately: it is paid once per crop size). Then, in one run, interleaved (``--repeats`` times
each, median kept):

* ``source``: a Dataset that, per sample, opens the JPEG, crops it SPIN's way
  (:func:`pchmr.plugins.datasets.prepared.crop_image`) and normalises it — what training without a
  store does every epoch;
* ``store``: :class:`pchmr.plugins.datasets.prepared.StoreSplit` over the memory-mapped store.

Both yield the same Sample tensors through the same ``DataLoader`` (batch 16, no workers, as
``pchmr`` trains); the ratio ``source / store`` is the number to read (absolute times depend on a
shared CPU).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.contracts.sample import META_KEYS, normalize_image
from pchmr.core.kit.joints import LSP_14
from pchmr.plugins.datasets.prepared import StoreSplit, crop_image, decode_image
from pchmr.plugins.datasets.spin_npz import make_spin_npz
from pchmr.testing.fake_datasets import IMAGE_W, write_spin_npz

BATCH = 16
JPEG_QUALITY = 90


@dataclass
class LoaderBody:
    """What the loaders read from a body model: LSP-14 joints, mid-hip root, a small mesh."""

    name: str = "bench"
    joint_names: tuple = LSP_14
    root_joints: tuple = (3, 2)
    num_vertices: int = 431

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)


class SourceSplit(Dataset):
    """The same Samples as a StoreSplit, but decoding and cropping the source JPEG every time."""

    def __init__(self, store_split: StoreSplit, image_root: Path, size: int) -> None:
        self.arrays = store_split.store.arrays
        self.root = image_root
        self.size = size
        self.num_vertices = store_split.num_vertices

    def __len__(self) -> int:
        return len(self.arrays["image_ref"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = decode_image(self.root / str(self.arrays["image_ref"][i]), "bench")
        crop = crop_image(image, self.arrays["center"][i], float(self.arrays["scale"][i]), self.size)
        return {
            "image": normalize_image(torch.from_numpy(np.array(crop))),
            "keypoints_2d": torch.from_numpy(self.arrays["keypoints_2d"][i].copy()),
            "joints_3d": torch.from_numpy(self.arrays["joints_3d"][i].copy()),
            "vertices": torch.zeros(self.num_vertices, 3),
            "has_vertices": torch.tensor(float(self.arrays["has_vertices"][i])),
            "index": torch.tensor(i, dtype=torch.int64),
            "meta": {k: str(self.arrays[f"label_{k}"][i]) for k in META_KEYS},
        }


def upscale_images(root: Path, npz: Path, side: int) -> None:
    """Re-encode every image at ``side`` px wide (aspect kept) and scale the boxes to match."""
    data = dict(np.load(npz))
    factor = side / IMAGE_W
    for name in data["imgname"]:
        path = root / str(name)
        with Image.open(path) as img:
            big = img.resize((side, round(img.height * factor)), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        path.write_bytes(buffer.getvalue())
    data["center"] = data["center"] * factor
    data["scale"] = data["scale"] * factor
    data["part"][..., :2] *= factor
    np.savez(npz, **data)


def epoch_seconds(dataset: Dataset) -> float:
    start = time.perf_counter()
    for _batch in DataLoader(dataset, batch_size=BATCH, shuffle=False, num_workers=0):
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--image-side", type=int, default=1000, help="source image width in pixels")
    parser.add_argument("--size", type=int, default=224, help="crop side (the backbone's input)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/data.json)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pchmr-bench-data-") as tmp:
        root = Path(tmp)
        npz = root / "h36m_train.npz"
        write_spin_npz(npz, args.samples, seed=0)
        upscale_images(root, npz, args.image_side)
        spec = DatasetSpec(image_size=args.size, seed=0, cache_dir=root / "cache",
                           path=f"train={npz},test={npz}", num_test=1)  # fmt: skip
        start = time.perf_counter()
        data = make_spin_npz(spec, LoaderBody())  # type: ignore[arg-type]
        prepare_s = time.perf_counter() - start
        store = data.train
        source = SourceSplit(store, root, args.size)
        a, b = store[3], source[3]
        if not all(torch.equal(a[k], b[k]) for k in ("image", "keypoints_2d", "joints_3d")):
            raise RuntimeError("store and source samples differ; the comparison would be meaningless")
        times: dict[str, list[float]] = {"source": [], "store": []}
        for _ in range(args.repeats):  # interleaved, so drifting load hits both
            times["source"].append(epoch_seconds(source))
            times["store"].append(epoch_seconds(store))
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["source"] / median["store"]
    payload = {
        "samples": args.samples, "image_side": args.image_side, "crop": args.size, "batch": BATCH,
        "threads": args.threads, "repeats": args.repeats, "prepare_once_s": round(prepare_s, 3),
        "epoch_source_s": round(median["source"], 4), "epoch_store_s": round(median["store"], 4),
        "source_over_store": round(ratio, 2), "all_epochs_s": times, "machine": platform.platform(),
    }  # fmt: skip
    print(f"epoch of {args.samples} samples, {args.image_side}px JPEGs → {args.size}px crops, batch {BATCH}:")
    print(f"  decode + crop from source: {median['source']:.3f} s   prepared store: {median['store']:.3f} s   "
          f"ratio {ratio:.1f}×   (one-time preparation {prepare_s:.2f} s)")  # fmt: skip
    path = args.json or Path(__file__).parent / "results" / "data.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
