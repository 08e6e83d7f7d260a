"""GPU check: pchmr's GPU path, measured in one unattended run of at most 8 minutes on one GPU.

    python benchmarks/gpu_check.py --out gpu_check.json

Without a CUDA GPU it refuses at once: exit 2 and one line saying what torch sees. On a GPU it runs
these steps in order, each within a time budget, rewriting ``--out`` (JSON) after every step:

=========================  ===============================================================================
``environment``            torch, CUDA, cuDNN, the GPU (name, memory, compute capability), nvidia-smi's driver
``prepare``                Anny and the synthetic data (400 train / 256 test crops at 64 px); a fresh machine
                           builds its caches here (Anny's ~85 s, the renders)
``train-<model>-<prec>``   FastMETRO-S and TORE-S with ResNet-50 at 224 px, batch 32, in 32-true and bf16-mixed:
                           ``pchmr.core.engine.profile`` (5 Lightning rounds of 64 images and of 7, inference),
                           training img/s with and without Lightning's per-fit cost
``federated``              ``execute(RunConfig(...))``: 10 clients, 4 per round, 2 rounds of 1 local epoch,
                           FastMETRO-S (small CNN, 64 px), the 4 clients sharing the GPU (``client_gpus`` 0.25)
``deposer``                DePoser on 256 images at batch 64 through the engine's annotation pipeline: s/image
=========================  ===============================================================================

Every step records ``cuda_max_allocated_mb`` (this process) and ``device_used_peak_mb`` (the whole
GPU, sampled every 0.25 s: the federated clients run in Ray's worker processes). A step may use its
budget plus what earlier steps left unused, never the time the later steps' budgets reserve; one
that overruns is interrupted (``timed out``), one that cannot be interrupted is abandoned
``GRACE_SECONDS`` later (``hung``: the JSON is written, the process exits). A failed step keeps what
it measured before failing, and the next steps still run.

Exit codes: 0 every step ok (or skipped, e.g. bf16 on a GPU without it); 1 a step failed, timed out
or hung (named on stderr; its error and traceback are in the JSON); 2 no GPU, or bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The whole check, imports included, on one GPU.
MAX_SECONDS = 8 * 60
#: Allowance for Python's and torch's imports before the first step.
STARTUP_SECONDS = 15
#: How long after its budget a step that ignores the interrupt is abandoned.
GRACE_SECONDS = 20
#: Seconds per step (a step also gets what earlier ones left unused).
BUDGETS = {
    "environment": 10,
    "prepare": 110,
    "train-fastmetro-S-32-true": 35,
    "train-tore-S-32-true": 35,
    "train-fastmetro-S-bf16-mixed": 35,
    "train-tore-S-bf16-mixed": 35,
    "federated": 120,
    "deposer": 60,
}
THROUGHPUT = {"encoder": "resnet50", "input_size": 224, "batch_size": 32, "images": 320}
#: The federated run, without the placement fields (a RunConfig of today's pchmr).
FEDERATED = {
    "backbone": "fastmetro",
    "clients": 10,
    "per_round": 4,
    "rounds": 2,
    "local_epochs": 1,
    "batch_size": 16,
    "num_train": 400,
    "num_test": 256,
    "encoder_weights": "none",
    "seed": 0,
}
#: The placement fields another change adds to RunConfig; read only inside the GPU path.
GPU_FIELDS = {"accelerator": "gpu", "devices": 1, "precision": "32-true", "client_gpus": 0.25, "deterministic": False}
DEPOSER_IMAGES, DEPOSER_BATCH, DEPOSER_CROP = 256, 64, 64
MEMORY_SAMPLE_SECONDS = 0.25


class StepTimeout(BaseException):
    """A step ran past its budget (a BaseException, so library code catching Exception lets it by)."""


class StepSkipped(Exception):
    """A step that does not apply to this GPU (the message says why); not a failure."""


@dataclass(frozen=True)
class Step:
    name: str
    budget: float
    run: Callable[[dict[str, Any]], None]  # fills the dict with what it measured, as it goes


def gpu_refusal() -> str | None:
    """None on a machine with a CUDA GPU torch can use; else the one-line refusal."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"torch.cuda.is_available() is False, {torch.cuda.device_count()} CUDA devices"
    seen += f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    hint = "" if torch.version.cuda else "; install the CUDA build (PCHMR_TORCH=cuda bash scripts/install.sh)"
    return f"gpu_check needs a CUDA GPU: torch {torch.__version__} ({build}) sees none ({seen}){hint}"


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class StepRunner:
    """Runs steps under budgets before ``deadline`` (a ``clock`` reading), recording each in
    ``record["steps"]`` and writing ``out`` after each; ``hard_exit`` ends a hung step's process."""

    def __init__(self, out: Path, record: dict[str, Any], deadline: float, *, grace: float = GRACE_SECONDS,
                 hard_exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.out, self.record, self.deadline, self.grace = out, record, deadline, grace
        self.hard_exit, self.clock = hard_exit, clock
        self.lock = threading.Lock()
        record.setdefault("steps", {})

    def write(self) -> None:
        with self.lock:
            write_record(self.out, self.record)

    def run(self, steps: list[Step]) -> list[str]:
        """Run every step; the names of those that failed, timed out or had no time left."""
        failed = []
        for index, step in enumerate(steps):
            reserved = sum(later.budget for later in steps[index + 1 :])
            budget = self.deadline - self.grace - self.clock() - reserved
            if not self._one(step, budget):
                failed.append(step.name)
        return failed

    def _one(self, step: Step, budget: float) -> bool:
        measured: dict[str, Any] = {}
        entry: dict[str, Any] = {"status": "running", "budget_s": round(budget, 1), "measured": measured}
        self.record["steps"][step.name] = entry
        if budget <= 0:
            entry.update(status="skipped", ok=False, error="no time left before the 8-minute limit")
            self.write()
            return False
        self.write()
        print(f"gpu_check: {step.name} (budget {budget:.0f} s)", flush=True)
        watchdog = threading.Timer(budget + self.grace, self._abandon, args=(step.name,))
        watchdog.daemon = True
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        start = self.clock()
        watchdog.start()
        signal.setitimer(signal.ITIMER_REAL, budget)
        try:
            step.run(measured)
            entry.update(status="ok", ok=True)
        except StepTimeout:
            entry.update(status="timed out", ok=False, error=f"ran past its {budget:.0f} s budget")
        except StepSkipped as exc:
            entry.update(status="skipped", ok=True, error=str(exc))
        except Exception as exc:
            entry.update(status="failed", ok=False, error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc().splitlines()[-25:])  # fmt: skip
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            watchdog.cancel()
            entry["seconds"] = round(self.clock() - start, 2)
            self.write()
        print(f"gpu_check: {step.name} {entry['status']} in {entry['seconds']:.1f} s"
              + (f": {entry['error']}" if "error" in entry else ""), flush=True)  # fmt: skip
        return bool(entry["ok"])

    def _abandon(self, name: str) -> None:
        """The watchdog: the step ignored its interrupt; record it, write, and end the process."""
        entry = self.record["steps"][name]
        entry.update(status="hung", ok=False, error=f"still running {self.grace:.0f} s past its budget; abandoned")
        self.record["status"] = f"failed: step {name} hung"
        self.write()
        print(f"gpu_check: step {name} hung past its budget; wrote {self.out}; exiting", file=sys.stderr, flush=True)
        self.hard_exit(1)


def _raise_timeout(signum: int, frame: object) -> None:
    raise StepTimeout


@contextlib.contextmanager
def gpu_memory(measured: dict[str, Any]) -> Iterator[None]:
    """Record this process's CUDA max allocated MiB and the whole GPU's sampled peak in use."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            free, total = torch.cuda.mem_get_info()
            peak[0] = max(peak[0], total - free)
            stop.wait(MEMORY_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join(timeout=2)
        measured["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        measured["device_used_peak_mb"] = round(peak[0] / 2**20, 1)


def federated_config(workdir: Path, accelerator: str = "gpu") -> dict[str, Any]:
    """The federated step's RunConfig values: :data:`FEDERATED`, the placement fields, a fresh run directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return {**FEDERATED, **GPU_FIELDS, "accelerator": accelerator, "out": str(workdir / f"federated-{stamp}")}


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers to read first: training img/s per model and precision (steps alone and whole
    rounds), bf16's speed-up, TORE over FastMETRO, the federated run's seconds, DePoser's s/image,
    and the peak GPU memory of any step."""
    steps = record.get("steps", {})
    out: dict[str, Any] = {"train_step_img_s": {}, "train_round_img_s": {}}
    for name, entry in steps.items():
        measured = entry.get("measured", {})
        if name.startswith("train-") and entry.get("status") == "ok":
            model, precision = f"{measured['backbone']}-{measured['variant']}", measured["precision"]
            out["train_step_img_s"].setdefault(model, {})[precision] = round(measured["step_img_s"], 2)
            out["train_round_img_s"].setdefault(model, {})[precision] = round(measured["train_img_s"], 2)
    rates = out["train_step_img_s"]
    out["bf16_over_fp32"] = {m: round(r["bf16-mixed"] / r["32-true"], 3) for m, r in rates.items()
                             if {"bf16-mixed", "32-true"} <= set(r)}  # fmt: skip
    if "fastmetro-S" in rates and "tore-S" in rates:
        out["tore_over_fastmetro"] = {p: round(rates["tore-S"][p] / rates["fastmetro-S"][p], 3)
                                      for p in rates["fastmetro-S"] if p in rates["tore-S"]}  # fmt: skip
    fed, dep = steps.get("federated", {}), steps.get("deposer", {})
    if fed.get("status") == "ok":
        out["federated_seconds"] = fed["measured"].get("seconds")
    if dep.get("measured", {}).get("s_per_image") is not None:
        out["deposer_s_per_image"] = dep["measured"]["s_per_image"]
    peaks = [e["measured"][k] for e in steps.values() for k in ("cuda_max_allocated_mb", "device_used_peak_mb")
             if k in e.get("measured", {})]  # fmt: skip
    out["peak_gpu_memory_mb"] = max(peaks) if peaks else None
    return out


# ----------------------------------------------------------------------------------- the GPU steps


class Context:
    """What the steps share: the work directory, the device (``gpu``; ``cpu`` lets the tests run
    the same steps here), the body model and the data (each loaded once)."""

    def __init__(self, workdir: Path, accelerator: str = "gpu") -> None:
        self.workdir, self.accelerator = workdir, accelerator
        self._components: Any = None
        self._body: Any = None

    def placement(self, precision: str = "32-true") -> Any:
        from pchmr.core.engine.devices import resolve_placement

        return resolve_placement(self.accelerator, 1, precision)

    def memory(self, measured: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        """:func:`gpu_memory` on a GPU; nothing to record on the CPU."""
        return gpu_memory(measured) if self.accelerator == "gpu" else contextlib.nullcontext()

    def components(self) -> Any:
        """Body model and the federated run's synthetic data, as ``pchmr run`` builds them."""
        if self._components is None:
            from pchmr.core.engine.components import build_components
            from pchmr.core.engine.config import RunConfig

            self._components = build_components(RunConfig.from_dict(FEDERATED), with_model=False)
        return self._components

    def body_model(self) -> Any:
        """The run's body model, without the data when ``prepare`` did not finish."""
        if self._components is not None:
            return self._components.body_model
        if self._body is None:
            from pchmr.core.contracts.bodymodel import BodyModelSpec
            from pchmr.core.engine.config import RunConfig
            from pchmr.core.engine.registry import get_registry
            from pchmr.core.kit.cache import default_cache_dir

            factory = get_registry().get("body_model", RunConfig().body_model)
            self._body = factory(BodyModelSpec(cache_dir=str(default_cache_dir())))
        return self._body


def environment(measured: dict[str, Any]) -> None:
    import importlib.metadata as md

    import torch

    props = torch.cuda.get_device_properties(0)
    measured.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    pchmr=md.version("pchmr"), gpus=torch.cuda.device_count(), name=props.name,
                    memory_mb=round(props.total_memory / 2**20), capability=f"{props.major}.{props.minor}",
                    bf16=torch.cuda.is_bf16_supported(), cpus=os.cpu_count(), threads=torch.get_num_threads())  # fmt: skip
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        measured["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.strip()


def prepare(ctx: Context) -> Callable[[dict[str, Any]], None]:
    def run(measured: dict[str, Any]) -> None:
        data = ctx.components().data
        measured.update(train=len(data.train), test=len(data.test), body_model=ctx.components().body_model.name)

    return run


def train(ctx: Context, backbone: str, precision: str) -> Callable[[dict[str, Any]], None]:
    def run(measured: dict[str, Any]) -> None:
        import torch

        from pchmr.core.engine.profile import ProfileSettings, profile_backbone

        placement = ctx.placement(precision)
        if placement.on_gpu and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
            raise StepSkipped(f"{torch.cuda.get_device_name(0)} has no bfloat16 support")
        with ctx.memory(measured):
            result = profile_backbone(backbone, ctx.body_model(), placement=placement,
                                      settings=ProfileSettings(**THROUGHPUT))  # fmt: skip
        measured.update(result.as_dict())

    return run


def federated(ctx: Context) -> Callable[[dict[str, Any]], None]:
    def run(measured: dict[str, Any]) -> None:
        import gc

        import torch

        from pchmr.core.engine.config import RunConfig
        from pchmr.core.engine.run import execute

        gc.collect()
        torch.cuda.empty_cache()  # the training steps' cached blocks, for the clients' processes
        values = federated_config(ctx.workdir, ctx.accelerator)
        measured["config"] = values
        config = RunConfig.from_dict(values)  # the placement fields exist once that change is merged
        rounds: list[dict[str, Any]] = []
        measured["rounds"] = rounds

        def on_round(report: Any) -> None:
            rounds.append({"round": report.server_round, "seconds": report.seconds, "metrics": report.metrics})
            print(f"  federated: round {report.server_round} in {report.seconds:.1f} s", flush=True)

        with ctx.memory(measured):
            result = execute(config, on_round=on_round, on_status=lambda m: print(f"  federated: {m}", flush=True))
        measured.update(seconds=round(result.seconds, 2), final={k: v for k, v in result.final.items() if k != "protocol"},
                        run_dir=str(result.run_dir.path))  # fmt: skip
        rows = (result.run_dir.path / "rounds.jsonl").read_text().splitlines()
        measured["rounds_jsonl"] = [json.loads(row) for row in rows if row.strip()]
        saved = json.loads((result.run_dir.path / "config.json").read_text())
        measured["config_json_placement"] = {k: saved.get("run", {}).get(k) for k in GPU_FIELDS}

    return run


def deposer(ctx: Context) -> Callable[[dict[str, Any]], None]:
    def run(measured: dict[str, Any]) -> None:
        import inspect

        from pchmr.core.engine.annotation import annotate_items, items_from_dataset
        from pchmr.core.engine.registry import get_registry
        from pchmr.core.kit.cache import default_cache_dir

        registry, parts = get_registry(), ctx.components()
        annotator = registry.get("annotator", "deposer")(parts.body_model, {"cache_dir": str(default_cache_dir())})
        keypoints = registry.get("keypoint_source", "synthetic")()
        depth = registry.get("depth_source", "synthetic")()
        items = items_from_dataset(parts.data.test, range(min(DEPOSER_IMAGES, len(parts.data.test))))
        extra: dict[str, Any] = {}
        if "placement" in inspect.signature(annotate_items).parameters:
            extra["placement"] = ctx.placement()
        measured["device"] = ctx.accelerator if extra else "cpu: annotate_items takes no placement in this pchmr"
        batches: list[float] = []
        measured.update(images=len(items), batch_size=DEPOSER_BATCH, images_done=0, batch_seconds=batches)
        start = last = time.perf_counter()

        def progress(count: int) -> None:
            nonlocal last
            now = time.perf_counter()
            batches.append(round(now - last, 3))
            last = now
            measured["images_done"] += count
            measured["s_per_image"] = round((now - start) / measured["images_done"], 4)

        with ctx.memory(measured):
            annotate_items(items, annotator, parts.body_model.joint_names, keypoints, depth, crop_size=DEPOSER_CROP,
                           full_image=True, batch_size=DEPOSER_BATCH, progress=progress, **extra)  # fmt: skip

    return run


def gpu_steps(ctx: Context) -> list[Step]:
    steps = [Step("environment", BUDGETS["environment"], environment),
             Step("prepare", BUDGETS["prepare"], prepare(ctx))]  # fmt: skip
    for precision in ("32-true", "bf16-mixed"):
        for backbone in ("fastmetro", "tore"):
            name = f"train-{backbone}-S-{precision}"
            steps.append(Step(name, BUDGETS[name], train(ctx, backbone, precision)))
    steps += [
        Step("federated", BUDGETS["federated"], federated(ctx)),
        Step("deposer", BUDGETS["deposer"], deposer(ctx)),
    ]
    return steps


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON written after every step")
    parser.add_argument("--workdir", type=Path, default=None, help="the federated run's directory (default: OUT's stem + -work)")  # fmt: skip
    args = parser.parse_args(argv)
    refusal = gpu_refusal()
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    workdir = args.workdir or args.out.with_name(args.out.stem + "-work")
    record: dict[str, Any] = {"script": "benchmarks/gpu_check.py", "started": datetime.now(UTC).isoformat(),
                              "max_seconds": MAX_SECONDS, "status": "running", "steps": {}}  # fmt: skip
    runner = StepRunner(args.out, record, deadline=started + MAX_SECONDS)
    try:
        failed = runner.run(gpu_steps(Context(workdir)))
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        runner.write()
        print(f"gpu_check: interrupted; wrote {args.out}", file=sys.stderr)
        return 130
    record["summary"] = summarise(record)
    record["status"] = "ok" if not failed else f"failed: {', '.join(failed)}"
    record["seconds"] = round(time.monotonic() - started, 1)
    runner.write()
    print(json.dumps(record["summary"], indent=1))
    if failed:
        print(f"gpu_check: step(s) failed: {', '.join(failed)} (errors in {args.out})", file=sys.stderr)
        return 1
    print(f"gpu_check: every step ok in {record['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
