"""The PCHMR paper's pipeline closed (its Fig. 2) on synthetic devices: each device annotates its
own images, the devices train one global model federatedly on those pseudo-labels, and the model
is evaluated against real ground truth — beside the same federation trained on true labels.

1. Devices: device d (1..D) holds ``--images`` images of the synthetic dataset's training split
   of seed d (its own renders and its own 24 body shapes); the test images are the synthetic test
   split of seed ``--test-seed`` (0), which no device holds. Each device annotates its images
   with each annotator, exactly as a user would::

       pchmr annotate synthetic --annotator deposer --data-option seed=d --data-option split=train \\
           --data-option num_train=IMAGES --data-option num_test=1 --crop-size 64 --out OUT/labels/deposer/device-d

2. The global model the devices start from (``--base-images`` > 0; the paper's appendix C
   pre-trains federatedly, then fine-tunes on locally annotated data at lr 1e-4): a federation on
   the synthetic training split of ``--base-seed`` (100: people no device and no test image has)::

       pchmr run --dataset synthetic --num-train BASE_IMAGES --clients 10 --per-round 2 ... --seed 100 --out OUT/base

3. Federations, identical but for the labels, one per (labels, seed), each starting from the base
   model (``--init-from OUT/base --freeze-encoder``; from scratch with ``--base-images 0``)::

       pchmr run --dataset pseudo-labels:root=OUT/labels/deposer,test-seed=0 --partitioner natural \\
           --partition-option label=device --clients D --per-round D ... --seed S --out OUT/runs/deposer-sS

   ``smplifyx`` reads OUT/labels/smplifyx; ``gt`` reads OUT/labels/deposer with ``labels=gt``:
   the images DePoser annotated, with their true labels (3D joints, mesh, 2D keypoints).

4. The table (``OUT/pipeline.md``, ``OUT/pipeline.json``): per label source the final real-GT
   MPJPE / PA-MPJPE, mean ± 95 % Student-t interval over the seeds (n − 1 degrees of freedom),
   the start (round 0: the base model, or the untrained one), the paired per-seed differences
   (same seed = same initial weights, client sampling and shuffling), and the training labels'
   own error against the truth.

Everything finished is reused (an annotated device, a run with final.json; a started run is
resumed), so an interrupted study continues where it stopped. Commands and wall times go to
``OUT/steps.jsonl``.

    nice -n 10 .venv/bin/python scripts/experiments/pipeline.py --out runs/pipeline
    .venv/bin/python scripts/experiments/pipeline.py --out runs/pipeline --table   # the table only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ANNOTATORS = ("deposer", "smplifyx")
#: label source → the annotation directory its federation reads and the dataset's labels option.
LABELS: Mapping[str, tuple[str, str]] = {"deposer": ("deposer", "pseudo"), "smplifyx": ("smplifyx", "pseudo"),
                                         "gt": ("deposer", "gt")}  # fmt: skip
LABEL_NAMES = {"deposer": "DePoser labels", "smplifyx": "SMPLify-X labels", "gt": "true labels"}
METRICS = ("mpjpe_mm", "pa_mpjpe_mm")
PAIRS = (("deposer", "smplifyx"), ("deposer", "gt"), ("smplifyx", "gt"))


# ---------------------------------------------------------------------------------- statistics
def t_quantile(dof: int, confidence: float = 0.95) -> float:
    """Student's t quantile t_{(1 + confidence) / 2, dof} (4.303 for dof 2 at 95 %)."""
    from scipy.stats import t

    return float(t.ppf((1.0 + confidence) / 2.0, dof))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t interval, t_{n−1} · s / √n (NaN for n < 2)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    return mean, t_quantile(n - 1, confidence) * statistics.stdev(values) / math.sqrt(n)


def mean_ci_text(values: Sequence[float]) -> str:
    mean, half = t_interval(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.1f}" if math.isnan(half) else f"{mean:.1f} ± {half:.1f}"


# ---------------------------------------------------------------------------------- commands
def pchmr_executable() -> str:
    """The ``pchmr`` of this interpreter's environment (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("pchmr")
    return str(beside) if beside.exists() else "pchmr"


def device_seed(device: int) -> int:
    """Device d (1-based) renders the synthetic training split of seed d."""
    return device


def annotate_command(annotator: str, device: int, args: argparse.Namespace) -> list[str]:
    out = args.out / "labels" / annotator / f"device-{device}"
    command = [pchmr_executable(), "annotate", "synthetic", "--annotator", annotator,
               "--data-option", f"seed={device_seed(device)}", "--data-option", "split=train",
               "--data-option", f"num_train={args.images}", "--data-option", "num_test=1",
               "--crop-size", str(args.crop), "--batch-size", str(args.annotate_batch), "--out", str(out)]  # fmt: skip
    for item in args.annotate_option:
        command += ["--option", item]
    return command


def run_command(labels: str, seed: int, args: argparse.Namespace) -> list[str]:
    source, which = LABELS[labels]
    location = f"root={args.out / 'labels' / source},test-seed={args.test_seed}" + (
        ",labels=gt" if which == "gt" else ""
    )
    return [pchmr_executable(), "run", "--dataset", f"pseudo-labels:{location}", "--partitioner", "natural",
            "--partition-option", "label=device", "--clients", str(args.devices), "--per-round", str(args.per_round),
            "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--batch-size", str(args.batch_size),
            "--backbone", args.backbone, "--variant", args.variant, "--input-size", str(args.crop),
            "--num-test", str(args.test_images), "--lr", str(args.lr), "--seed", str(seed),
            "--out", str(run_dir(labels, seed, args))] + (
        ["--init-from", str(args.out / "base"), "--freeze-encoder"] if args.base_images else [])  # fmt: skip


def base_command(args: argparse.Namespace) -> list[str]:
    """The global model every federation starts from: a federation on the synthetic dataset of ``--base-seed``."""
    return [pchmr_executable(), "run", "--dataset", "synthetic", "--num-train", str(args.base_images),
            "--num-test", str(args.base_test_images), "--clients", str(args.base_clients),
            "--per-round", str(args.base_per_round), "--rounds", str(args.base_rounds),
            "--local-epochs", str(args.base_local_epochs), "--batch-size", str(args.base_batch_size),
            "--backbone", args.backbone, "--variant", args.variant, "--input-size", str(args.crop),
            "--seed", str(args.base_seed), "--out", str(args.out / "base")]  # fmt: skip


def run_dir(labels: str, seed: int, args: argparse.Namespace) -> Path:
    return args.out / "runs" / f"{labels}-s{seed}"


def execute_step(name: str, command: list[str], args: argparse.Namespace) -> float:
    """Run one command (its output to OUT/logs/NAME.log), record it in OUT/steps.jsonl, return its seconds."""
    log = args.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    with (args.out / "steps.jsonl").open("a") as steps:
        steps.write(json.dumps({"step": name, "command": shlex.join(command), "seconds": round(seconds, 1),
                                "exit": done.returncode}) + "\n")  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{name} failed (exit {done.returncode}); its log {log} ends:\n{tail}")
    print(f"  {name}: {seconds:.0f} s", flush=True)
    return seconds


def annotated(directory: Path) -> bool:
    from pchmr.core.kit.pseudo_labels import read_label_directory

    try:
        read_label_directory(directory)
    except (OSError, ValueError):
        return False
    return True


def annotate_devices(annotator: str, args: argparse.Namespace) -> None:
    for device in range(1, args.devices + 1):
        directory = args.out / "labels" / annotator / f"device-{device}"
        if annotated(directory):
            continue
        shutil.rmtree(directory, ignore_errors=True)  # an interrupted annotation
        execute_step(f"annotate-{annotator}-device-{device}", annotate_command(annotator, device, args), args)


def train_base(args: argparse.Namespace) -> None:
    out = args.out / "base"
    if not args.base_images or (out / "final.json").is_file():
        return
    command = (
        [pchmr_executable(), "run", "--resume", str(out)] if (out / "config.json").is_file() else base_command(args)
    )
    execute_step("base", command, args)


def federate(labels: str, seed: int, args: argparse.Namespace) -> None:
    out = run_dir(labels, seed, args)
    if (out / "final.json").is_file():
        return
    command = run_command(labels, seed, args)
    if (out / "config.json").is_file():  # started and stopped: continue from its last round
        command = [pchmr_executable(), "run", "--resume", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    execute_step(f"run-{labels}-s{seed}", command, args)


# ---------------------------------------------------------------------------------- the table
def label_error(root: Path) -> dict[str, Any]:
    """The training labels' own error against the truth over every device's annotated images
    (MPJPE, PA-MPJPE in mm), and the annotated / failed counts."""
    import numpy as np
    import torch

    from pchmr.core.kit.metrics import mpjpe, pa_mpjpe
    from pchmr.core.kit.pseudo_labels import read_label_directory

    per_image: dict[str, list[float]] = {key: [] for key in METRICS}
    counts: dict[str, Any] = {}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        labels = read_label_directory(directory)
        counts[directory.name] = {"annotated": len(labels), "failed": dict(labels.failures())}
        if not len(labels):
            continue
        fit = torch.from_numpy(np.asarray(labels.array("joints_3d"))[..., :3]).double()
        truth = torch.from_numpy(np.asarray(labels.array("gt_joints_3d"))[..., :3]).double()
        per_image["mpjpe_mm"] += mpjpe(fit, truth).tolist()
        per_image["pa_mpjpe_mm"] += pa_mpjpe(fit, truth).tolist()
    return {**{key: statistics.fmean(v) if v else math.nan for key, v in per_image.items()}, "devices": counts}


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Every finished run's final metrics and protocol, the label errors and the step times."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    protocols: dict[str, str] = {}
    for labels in args.labels:
        for seed in args.seeds:
            final_path = run_dir(labels, seed, args) / "final.json"
            if not final_path.is_file():
                continue
            final = json.loads(final_path.read_text())
            runs.setdefault(labels, {})[seed] = {key: final[key] for key in METRICS} | {
                "round0_mpjpe_mm": final["round0"]["mpjpe_mm"], "round0_pa_mpjpe_mm": final["round0"]["pa_mpjpe_mm"],
                "mean_pose_mpjpe_mm": final.get("mean_pose_mpjpe_mm"),
                "mean_pose_pa_mpjpe_mm": final.get("mean_pose_pa_mpjpe_mm")}  # fmt: skip
            p = final["protocol"]
            protocols[labels] = (f"{p['dataset']} · {p['joint_set']} · {p['alignment']} aligned · {p['body_model']} · "
                                 f"{p['ground_truth']} GT")  # fmt: skip
    errors = {a: label_error(args.out / "labels" / a) for a in ANNOTATORS if (args.out / "labels" / a).is_dir()}
    base = None
    if (args.out / "base" / "final.json").is_file():
        final = json.loads((args.out / "base" / "final.json").read_text())
        base = {key: final[key] for key in METRICS} | {"protocol": final["protocol"]["dataset"]}
    steps = []
    if (args.out / "steps.jsonl").is_file():
        steps = [json.loads(line) for line in (args.out / "steps.jsonl").read_text().splitlines() if line.strip()]
    return {"runs": runs, "protocols": protocols, "label_errors": errors, "base": base, "steps": steps}


def render(result: Mapping[str, Any], args: argparse.Namespace) -> str:
    """The markdown table, the paired differences, the protocols and the wall times."""
    runs, errors = result["runs"], result["label_errors"]
    lines = ["| training labels | seeds | real-GT MPJPE (mm) | real-GT PA-MPJPE (mm) | start (round 0) MPJPE / PA-MPJPE | "
             "labels' own MPJPE / PA-MPJPE (mm) |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for labels in args.labels:
        seeds = sorted(runs.get(labels, {}))
        cells = [mean_ci_text([runs[labels][s][key] for s in seeds]) for key in METRICS]
        source = LABELS[labels][0]
        own = "0 / 0" if labels == "gt" else (
            f"{errors[source]['mpjpe_mm']:.1f} / {errors[source]['pa_mpjpe_mm']:.1f}" if source in errors else "—")  # fmt: skip
        start = " / ".join(mean_ci_text([runs[labels][s][f"round0_{key}"] for s in seeds]) for key in METRICS)
        lines.append(f"| {LABEL_NAMES[labels]} | {len(seeds)} | {cells[0]} | {cells[1]} | {start} | {own} |")
    some = next((run for by_seed in runs.values() for run in by_seed.values()), None)
    if some is not None and some.get("mean_pose_mpjpe_mm") is not None:
        lines += ["", f"Mean-pose baseline (the training labels' mean joints, every test image): MPJPE "
                  f"{some['mean_pose_mpjpe_mm']:.1f}, PA-MPJPE {some['mean_pose_pa_mpjpe_mm']:.1f} mm (of the first run)."]  # fmt: skip
    if result.get("base"):
        base = result["base"]
        lines += ["", f"Base model on its own test split ({base['protocol']}): MPJPE {base['mpjpe_mm']:.1f}, "
                  f"PA-MPJPE {base['pa_mpjpe_mm']:.1f} mm."]  # fmt: skip
    pairs = [(a, b) for a, b in PAIRS if a in args.labels and b in args.labels]
    if pairs:
        lines += ["", "Paired differences (same seed), mean ± 95 % t-interval, mm:", "",
                  "| difference | seeds | MPJPE | PA-MPJPE |", "|---|---:|---:|---:|"]  # fmt: skip
    for a, b in pairs:
        seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
        cells = [mean_ci_text([runs[a][s][key] - runs[b][s][key] for s in seeds]) for key in METRICS]
        lines.append(f"| {LABEL_NAMES[a]} − {LABEL_NAMES[b]} | {len(seeds)} | {cells[0]} | {cells[1]} |")
    lines += ["", "Protocols:", ""] + [f"* {LABEL_NAMES[k]}: {v}" for k, v in result["protocols"].items()]
    counts = {a: {d: c["annotated"] for d, c in e["devices"].items()} for a, e in errors.items()}
    failed = {a: {d: c["failed"] for d, c in e["devices"].items() if c["failed"]} for a, e in errors.items()}
    lines += ["", f"Annotated images per device: {json.dumps(counts)}; failed: {json.dumps(failed)}"]
    by_kind: dict[str, float] = {}
    for step in result["steps"]:
        kind = (
            step["step"].split("-device-")[0]
            if step["step"].startswith("annotate")
            else step["step"].rsplit("-s", 1)[0]
        )
        by_kind[kind] = by_kind.get(kind, 0.0) + step["seconds"]
    total = sum(by_kind.values())
    lines += [
        "",
        f"Wall time: {total / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in by_kind.items()) + ")",
    ]
    return "\n".join(lines)


def setting_text(args: argparse.Namespace) -> str:
    return (f"{args.devices} devices × {args.images} synthetic images ({args.crop} px; device d = the training split "
            f"of seed d); test: the synthetic test split of seed {args.test_seed} ({args.test_images} images, real GT); "
            f"{args.backbone}-{args.variant}, FedAvg, natural partition by device ({args.devices} clients, "
            f"{args.per_round} per round), {args.rounds} rounds × {args.local_epochs} local epochs, batch "
            f"{args.batch_size}, lr {args.lr:g}; seeds {', '.join(map(str, args.seeds))}; "
            + (f"starting from a base model trained federatedly on {args.base_images} synthetic images of seed "
               f"{args.base_seed} ({args.base_clients} clients, {args.base_per_round} per round, {args.base_rounds} rounds "
               f"× {args.base_local_epochs} local epochs, batch {args.base_batch_size}), encoder frozen"
               if args.base_images else "from scratch (the public-pretrained CNN, frozen)"))  # fmt: skip


# ---------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--images", type=int, default=64, help="synthetic images per device")
    parser.add_argument("--crop", type=int, default=64, help="crop side in pixels (the run's --input-size)")
    parser.add_argument("--annotate-batch", type=int, default=64)
    parser.add_argument("--annotate-option", action="append", default=[], help="annotator option key=value")
    parser.add_argument("--labels", default=",".join(LABELS), help="label sources to train on: deposer,smplifyx,gt")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--per-round", type=int, default=None, help="clients per round (default: every device)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="the federations' AdamW learning rate")
    parser.add_argument("--base-images", type=int, default=2000, help="base model's training images (0: from scratch)")
    parser.add_argument(
        "--base-seed", type=int, default=100, help="the base model's run seed = its synthetic data's seed"
    )
    parser.add_argument("--base-clients", type=int, default=10)
    parser.add_argument("--base-per-round", type=int, default=2)
    parser.add_argument("--base-rounds", type=int, default=3)
    parser.add_argument("--base-local-epochs", type=int, default=2)
    parser.add_argument("--base-batch-size", type=int, default=8)
    parser.add_argument("--base-test-images", type=int, default=50)
    parser.add_argument("--backbone", default="fastmetro")
    parser.add_argument("--variant", default="S")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--test-seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only print the table of what is finished")
    args = parser.parse_args(argv)
    args.labels = [x for x in args.labels.split(",") if x]
    unknown = sorted(set(args.labels) - set(LABELS))
    if unknown:
        parser.error(f"--labels: unknown {unknown}; choose from {', '.join(LABELS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.per_round = args.devices if args.per_round is None else args.per_round
    if 1 <= args.test_seed <= args.devices:
        parser.error(f"--test-seed {args.test_seed} is a device's seed (devices use 1..{args.devices})")
    if args.base_images and args.base_seed in (args.test_seed, *range(1, args.devices + 1)):
        parser.error(f"--base-seed {args.base_seed} renders the test split's or a device's people; use another seed")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        # Ray starts its workers 15 niceness levels below the driver's; on a shared machine the
        # clients then starve the other jobs. Keep them at this script's niceness.
        os.environ.setdefault("RAY_worker_niceness", "0")
        for annotator in sorted({LABELS[labels][0] for labels in args.labels}):
            annotate_devices(annotator, args)
        train_base(args)
        for seed in args.seeds:  # seed-major: an interrupted study has every label source at the first seeds
            for labels in args.labels:
                federate(labels, seed, args)
    result = collect(args)
    text = f"{setting_text(args)}\n\n{render(result, args)}\n"
    print(text)
    (args.out / "pipeline.md").write_text(text)
    record = {"setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **result}
    (args.out / "pipeline.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
