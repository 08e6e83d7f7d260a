"""Channels-last (NHWC) against contiguous (NCHW) CNN training steps, interleaved in one run.

The evidence behind ``RunConfig.channels_last``'s default (on for ``resnet50``, off for ``small``):
per encoder at its usual input size, the median of interleaved training steps (forward over a
batch of noise images, a squared-feature loss, backward, SGD) in each memory format, after one
untimed warm-up step each, and the ratio. On a GPU it measures the same there (``--device cuda``).

    python benchmarks/channels_last.py                       # both encoders, ~3 minutes on one core
    python benchmarks/channels_last.py --encoders small --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from pchmr.core.kit.encoders import build_encoder

SIZES = {"small": 64, "resnet50": 224}


def _step(encoder: torch.nn.Module, images: torch.Tensor, optimizer: torch.optim.Optimizer, device: str) -> float:
    start = time.perf_counter()
    features = encoder(images)
    features = features if torch.is_tensor(features) else features[-1]
    features.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, batch: int, steps: int, device: str) -> dict[str, float]:
    """Median seconds per training step of encoder ``name`` in both memory formats, and the ratio."""
    torch.manual_seed(0)
    size = SIZES[name]
    nchw = build_encoder(name, size).to(device)
    nhwc = build_encoder(name, size).to(device)
    nhwc.load_state_dict(nchw.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size, device=device)
    runs = {
        "contiguous": (nchw, images, torch.optim.SGD(nchw.parameters(), lr=1e-4)),
        "channels_last": (nhwc, images.contiguous(memory_format=torch.channels_last), torch.optim.SGD(nhwc.parameters(), lr=1e-4)),
    }  # fmt: skip
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(steps + 1):  # the first of each is the warm-up
        for key, (encoder, x, optimizer) in runs.items():
            times[key].append(_step(encoder, x, optimizer, device))
    median = {key: statistics.median(values[1:]) for key, values in times.items()}
    return {
        "input_size": size,
        "contiguous_s": median["contiguous"],
        "channels_last_s": median["channels_last"],
        "speedup": median["contiguous"] / median["channels_last"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per format (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/channels_last.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = {name: measure(name, args.batch_size, args.steps, args.device) for name in args.encoders}
    print(f"{'encoder':<10} {'px':>4} {'NCHW s/step':>12} {'NHWC s/step':>12} {'speed-up':>9}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['input_size']:>4} {r['contiguous_s']:>12.3f} {r['channels_last_s']:>12.3f} {r['speedup']:>8.2f}x"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "results": results,
    }
    args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
