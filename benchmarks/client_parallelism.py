"""Two clients side by side with one thread each vs one client with every thread.

The question behind :func:`pchmr.core.engine.devices.client_resources`: on a machine with C cores
and k >= C sampled clients per round, does a round train more images per second when C clients
run at once with one torch thread each, or when they run one after another with C threads?

One run measures both, interleaved so that they share the machine's state:

* ``serial``: one process, ``--threads`` (default: all cores) torch threads, ``--steps`` training
  steps of the default run's FastMETRO-S ``HMRModule`` (batch 16, all losses, clip 0.3, AdamW);
* ``parallel``: as many processes as cores, one thread each, the same steps each, started
  together; throughput = all their images / the slowest one's wall time.

Each configuration is measured ``--repeats`` times (alternating) and the median is reported,
with the ratio parallel / serial. Data: the synthetic default (prepared on first use).

    python benchmarks/client_parallelism.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _train_steps(threads: int, steps: int, seed: int, queue: mp.Queue[tuple[float, int]]) -> None:
    import torch

    torch.set_num_threads(threads)
    from pchmr.core.engine.components import build_components, make_loader
    from pchmr.core.engine.config import RunConfig

    components = build_components(RunConfig(seed=seed))
    module = components.make_module()
    optimizer = module.configure_optimizers()
    batches = iter(make_loader(components.data.train, components.config.batch_size, shuffle=True, seed=seed))

    def step() -> int:
        batch = next(batches)
        terms = module.compute_losses(batch, module(batch["image"]))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), module.optim.grad_clip)
        optimizer.step()
        return len(batch["image"])

    module.train()
    step()  # warm-up, untimed
    start = time.perf_counter()
    images = sum(step() for _ in range(steps))
    queue.put((time.perf_counter() - start, images))


def measure(processes: int, threads: int, steps: int) -> float:
    """Images per second of ``processes`` concurrent trainers with ``threads`` threads each."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue[tuple[float, int]] = ctx.Queue()
    workers = [ctx.Process(target=_train_steps, args=(threads, steps, 1 + i, queue)) for i in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise RuntimeError(f"a benchmark worker failed with exit code {w.exitcode}")
    return sum(images for _, images in results) / max(seconds for seconds, _ in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--threads", type=int, default=cores, help="threads of the serial client (default: all cores)")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per process")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "client_parallelism.json")
    args = parser.parse_args()
    if cores < 2:
        raise SystemExit("this benchmark compares parallel and serial clients: it needs at least 2 cores")
    serial, parallel = [], []
    for _ in range(args.repeats):
        serial.append(measure(1, args.threads, args.steps))
        parallel.append(measure(cores, 1, args.steps))
    result = {
        "cores": cores,
        "serial_threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "serial_img_per_s": statistics.median(serial),
        "parallel_img_per_s": statistics.median(parallel),
        "all_serial": serial,
        "all_parallel": parallel,
        "load_average": os.getloadavg(),
    }
    result["ratio_parallel_over_serial"] = result["parallel_img_per_s"] / result["serial_img_per_s"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"serial ({args.threads} threads): {result['serial_img_per_s']:.2f} img/s   "
        f"parallel ({cores} x 1 thread): {result['parallel_img_per_s']:.2f} img/s   "
        f"ratio {result['ratio_parallel_over_serial']:.2f}   -> {args.json}"
    )


if __name__ == "__main__":
    main()
