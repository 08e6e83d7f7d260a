"""Backbone benchmark: training throughput and forward GFLOPs of FastMETRO and TORE (S/M/L).

    python benchmarks/backbones.py [--quick] [--threads N] [--json PATH]

Three sections, all measured in one run so that the TORE/FastMETRO ratios share the machine's
state (timings on a shared CPU are noisy; read the ratios, not the absolute numbers):

1. ``small-64``: the default encoder (small CNN, 64 px crops, 8×8 feature grid) on the Anny
   mesh pyramid (431 / 1,723 / 13,718 vertices), FastMETRO and TORE S/M/L;
2. ``resnet50-224``: the ResNet-50 encoder at 224 px (7×7 grid), same pyramid
   (``--quick``: S only);
3. ``heads``: the transformer heads alone on (16, 2048, 7, 7) features (the CNN bypassed by an
   encoder that hands over fixed features), with SMPL sizes (431 / 1,723 / 6,890), FastMETRO-S
   and TORE-S next to the issue's reference numbers for the original repositories' heads on this
   machine, plus TORE-S at other keep ratios (the token-reduction saving alone).

Training throughput: images per second of one step ``forward → loss → backward → clip (0.3) →
AdamW`` at batch 16, the median over interleaved steps (each pair of compared models takes turns,
so drifting load hits both). The loss is :meth:`pchmr.core.engine.module.HMRModule.compute_losses` (with
TORE's pruning term) for sections 1–2 and the same L1 terms written out for section 3.
Forward GFLOPs per image: :class:`torch.utils.flop_counter.FlopCounterMode` on an eval-mode
forward at batch 16 (one multiply-add = 2 FLOPs), plus the fixed sparse upsampling counted by
hand (2 · nnz · 3 per image; FlopCounterMode skips sparse products); ``trunk`` excludes the CNN.

Threads: one by default. On a 2-core machine shared with other processes, two OpenMP threads
wait on each other whenever one core is taken, and a step can take 2–40× longer than on one
thread; ``--threads 0`` keeps torch's default for a machine of your own. Warm-up steps (one per
model; none for ResNet-50 under ``--quick``) are not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pchmr.core.contracts.backbone import Backbone, BackboneOptions
from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec, MeshPyramid
from pchmr.core.engine.losses import LossWeights, weighted_l1
from pchmr.core.engine.module import HMRModule
from pchmr.core.engine.registry import get_registry
from pchmr.core.kit.encoders import FeatureEncoder
from pchmr.core.kit.geometry import project_weak_perspective
from pchmr.plugins.backbones.fastmetro import FastMETRO, make_fastmetro
from pchmr.plugins.backbones.tore import TORE, make_tore
from pchmr.testing.toys import toy_batch

BATCH = 16
VARIANTS = ("S", "M", "L")
#: Training img/s of the original repositories' heads on this machine (the issue's reference numbers).
REFERENCE_HEADS_IMG_S = {"fastmetro-S": 5.2, "tore-S": 15.1}
#: FastMETRO's and TORE's optimiser settings.
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 1e-4, 0.3
#: SMPL's pyramid sizes and joint count (FastMETRO's H36M-14 evaluation set).
SMPL_SIZES, SMPL_JOINTS = (431, 1723, 6890), 14
#: Feature map the heads section feeds: ResNet-50's output at 224 px.
HEAD_CHANNELS, HEAD_GRID, HEAD_INPUT = 2048, 7, 224
#: Nonzeros per row of the synthetic SMPL-size upsampling matrices and neighbours per coarse vertex.
SYNTHETIC_UP_NNZ, SYNTHETIC_NEIGHBOURS = 3, 6
#: TORE keep ratios compared in the heads section (0.2 is the repository's "@20%").
KEEP_RATIOS = (1.0, 0.8, 0.2)
LOSS = LossWeights()
#: (timed steps, warm-up steps) per section: --quick stays under ~3 minutes on one core.
QUICK_STEPS = {"small": (1, 1), "resnet": (1, 0), "heads": (2, 1), "keep": (0, 0)}
FULL_STEPS = {"small": (5, 1), "resnet": (3, 1), "heads": (6, 1), "keep": (4, 1)}
CONSOLE_WIDTH = 130
SECTIONS = ("small-64", "resnet50-224", "heads")


@dataclass
class Row:
    section: str
    model: str
    trunk_params_m: float
    gflops: float
    trunk_gflops: float
    img_s: float | None
    step_s: list[float]
    reference_img_s: float | None = None


# ------------------------------------------------------------------------------- measuring


def trunk_parameters(model: Backbone) -> int:
    encoder = {id(p) for p in model.encoder.parameters()}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in encoder)


def sparse_upsampling_flops(model: nn.Module) -> int:
    """2 · nnz · 3 per image for every fixed sparse upsampling buffer (FlopCounterMode skips them)."""
    return sum(6 * b._nnz() for name, b in model.named_buffers() if name.startswith("up_") and b.is_sparse)


def forward_gflops(model: Backbone, images: Tensor, before: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """(total, trunk) forward GFLOPs per image, eval mode."""
    model.eval()
    before()
    with FlopCounterMode(display=False) as counter:
        model(images)
    counts = counter.get_flop_counts()
    encoder = sum(counts.get(f"{type(model).__name__}.encoder", {}).values())
    batch = images.shape[0]
    total = counter.get_total_flops() / batch + sparse_upsampling_flops(model)
    return total / 1e9, (total - encoder / batch) / 1e9


@dataclass
class Trainee:
    """One model ready to take training steps."""

    name: str
    model: Backbone
    step: Callable[[], None]


def hmr_trainee(name: str, model: Backbone, body_model: BodyModel, batch: Mapping[str, Tensor]) -> Trainee:
    module = HMRModule(model, body_model, loss_weights=LOSS)
    optimizer = module.configure_optimizers()  # the same (fused) AdamW as training

    def step() -> None:
        module.train()
        optimizer.zero_grad(set_to_none=True)
        out = module(batch["image"])
        module.compute_losses(batch, out)["loss"].backward()
        nn.utils.clip_grad_norm_(module.parameters(), GRAD_CLIP)
        optimizer.step()

    return Trainee(name, model, step)


def interleaved_step_times(trainees: list[Trainee], steps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of each trainee, taking turns step by step."""
    for trainee in trainees:
        for _ in range(warmup):
            trainee.step()
    times: dict[str, list[float]] = {t.name: [] for t in trainees}
    for _ in range(steps):
        for trainee in trainees:
            start = time.perf_counter()
            trainee.step()
            times[trainee.name].append(time.perf_counter() - start)
    return times


def img_per_s(times: list[float]) -> float:
    return BATCH / statistics.median(times)


# ------------------------------------------------------------------------------- sections 1-2


def full_model_section(
    section: str, body_model: BodyModel, encoder: str, size: int, variants: tuple[str, ...], steps: int, warmup: int
) -> list[Row]:
    batch = toy_batch(body_model, BATCH, size, torch.Generator().manual_seed(0))
    rows = []
    for variant in variants:
        torch.manual_seed(0)
        options = BackboneOptions(variant=variant, encoder=encoder, input_size=size)
        models = {
            f"fastmetro-{variant}": make_fastmetro(body_model, options),
            f"tore-{variant}": make_tore(body_model, options),
        }
        flops = {name: forward_gflops(model, batch["image"]) for name, model in models.items()}
        trainees = [hmr_trainee(name, model, body_model, batch) for name, model in models.items()]
        times = interleaved_step_times(trainees, steps, warmup)
        for name, model in models.items():
            rows.append(
                Row(section, name, trunk_parameters(model) / 1e6, *flops[name], img_per_s(times[name]), times[name])
            )
        del trainees, models
    return rows


# ------------------------------------------------------------------------------- section 3


class FeatureFeeder(FeatureEncoder):
    """Bypasses the CNN: returns the features last handed to :meth:`feed`, whatever the images."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels, self.stride = channels, stride
        self.features: Tensor | None = None

    def feed(self, features: Tensor) -> None:
        self.features = features

    def forward(self, images: Tensor) -> Tensor:
        if self.features is None or self.features.shape[0] != images.shape[0]:
            raise RuntimeError("FeatureFeeder.feed(features) with the batch's size must come before forward")
        return self.features


def synthetic_smpl_pyramid(generator: torch.Generator) -> MeshPyramid:
    """SMPL-size pyramid: upsampling rows average 3 random coarser vertices, 6 neighbours each."""

    def averaging(rows: int, cols: int) -> Tensor:
        index = torch.stack(
            (
                torch.arange(rows).repeat_interleave(SYNTHETIC_UP_NNZ),
                torch.randint(0, cols, (rows * SYNTHETIC_UP_NNZ,), generator=generator),
            )
        )
        values = torch.full((rows * SYNTHETIC_UP_NNZ,), 1.0 / SYNTHETIC_UP_NNZ)
        return torch.sparse_coo_tensor(index, values, (rows, cols), check_invariants=False).coalesce()

    sizes = SMPL_SIZES
    ups = tuple(averaging(fine, coarse) for coarse, fine in zip(sizes[:-1], sizes[1:]))
    downs = tuple(averaging(coarse, fine) for coarse, fine in zip(sizes[:-1], sizes[1:]))
    v0 = sizes[0]
    neighbours = torch.randint(0, v0, (v0, SYNTHETIC_NEIGHBOURS // 2), generator=generator)
    adjacency = torch.eye(v0, dtype=torch.bool)
    adjacency[torch.arange(v0)[:, None], neighbours] = True
    adjacency |= adjacency.T.clone()
    faces = tuple(torch.zeros(0, 3, dtype=torch.int64) for _ in sizes)
    return MeshPyramid(sizes, downs, ups, adjacency, faces, method="synthetic-smpl-size")


def synthetic_head_batch(pyramid: MeshPyramid, generator: torch.Generator) -> dict[str, Tensor]:
    """A body-sized GT batch with SMPL's vertex count: joints, 2D keypoints, mesh, dense regressor."""
    extent = torch.tensor([0.25, 0.9, 0.15])
    vertices = (torch.rand(BATCH, pyramid.num_vertices[-1], 3, generator=generator) * 2 - 1) * extent
    joints = (torch.rand(BATCH, SMPL_JOINTS, 3, generator=generator) * 2 - 1) * extent
    ones = torch.ones(BATCH, SMPL_JOINTS, 1)
    regressor = torch.rand(SMPL_JOINTS, pyramid.num_vertices[-1], generator=generator)
    return {
        "features": torch.randn(BATCH, HEAD_CHANNELS, HEAD_GRID, HEAD_GRID, generator=generator),
        "images": torch.zeros(BATCH, 3, HEAD_INPUT, HEAD_INPUT),
        "joints_3d": torch.cat((joints, ones), dim=2),
        "keypoints_2d": torch.cat((1.05 * joints[..., :2], ones), dim=2),
        "vertices": vertices,
        "levels": [pyramid.downsample(vertices, level) for level in range(pyramid.levels - 1)] + [vertices],
        "has_vertices": torch.ones(BATCH),
        "regressor": regressor / regressor.sum(dim=1, keepdim=True),
    }


def head_loss(model: Backbone, batch: Mapping[str, object]) -> Tensor:
    """FastMETRO's training terms written out (3D joints from tokens and from the mesh, vertices per
    level, 2D projection) with pchmr's default weights, plus the backbone's extra terms."""
    out = model(batch["images"])
    gt_joints = batch["joints_3d"][..., :3]
    regressed = torch.einsum("jv,bvc->bjc", batch["regressor"], out.vertices[-1])
    loss = LOSS.joints_3d * weighted_l1(out.joints, gt_joints) + LOSS.reg_joints_3d * weighted_l1(regressed, gt_joints)
    for weight, pred, gt in zip(LOSS.vertex_levels, out.vertices, batch["levels"]):
        loss = loss + LOSS.vertices * weight * weighted_l1(pred, gt)
    kp = batch["keypoints_2d"]
    loss = loss + LOSS.joints_2d * weighted_l1(project_weak_perspective(out.joints, out.camera), kp[..., :2])
    for value in model.extra_losses(out, batch).values():
        loss = loss + value
    return loss


def head_trainee(name: str, model: Backbone, feeder: FeatureFeeder, batch: Mapping[str, object]) -> Trainee:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True)

    def step() -> None:
        model.train()
        feeder.feed(batch["features"])
        optimizer.zero_grad(set_to_none=True)
        head_loss(model, batch).backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return Trainee(name, model, step)


def heads_section(steps: int, warmup: int, keep_ratio_steps: int, keep_ratio_warmup: int) -> list[Row]:
    generator = torch.Generator().manual_seed(0)
    pyramid = synthetic_smpl_pyramid(generator)
    batch = synthetic_head_batch(pyramid, generator)
    feeders: dict[str, FeatureFeeder] = {}
    models: dict[str, Backbone] = {}
    torch.manual_seed(0)
    for name, build in (
        ("fastmetro-S", lambda f: FastMETRO(pyramid, SMPL_JOINTS, f, HEAD_INPUT, 1)),
        ("tore-S", lambda f: TORE(pyramid, SMPL_JOINTS, f, HEAD_INPUT, 1, keep_ratio=0.8)),
    ):
        feeders[name] = FeatureFeeder(HEAD_CHANNELS, 32)
        models[name] = build(feeders[name])
    rows = heads_rows(models, feeders, batch, steps, warmup, reference=True)
    ratio_models = {}
    ratio_feeders = {}
    for ratio in KEEP_RATIOS:
        name = f"tore-S@{ratio:g}"
        ratio_feeders[name] = FeatureFeeder(HEAD_CHANNELS, 32)
        ratio_models[name] = TORE(pyramid, SMPL_JOINTS, ratio_feeders[name], HEAD_INPUT, 1, keep_ratio=ratio)
    rows += heads_rows(ratio_models, ratio_feeders, batch, keep_ratio_steps, keep_ratio_warmup, reference=False)
    return rows


def heads_rows(
    models: Mapping[str, Backbone], feeders: Mapping[str, FeatureFeeder], batch: Mapping[str, object],
    steps: int, warmup: int, reference: bool,
) -> list[Row]:  # fmt: skip
    section = "heads" if reference else "heads-keep"
    flops = {
        name: forward_gflops(model, batch["images"], lambda f=feeders[name]: f.feed(batch["features"]))
        for name, model in models.items()
    }
    times = {name: [] for name in models}
    if steps:
        trainees = [head_trainee(n, m, feeders[n], batch) for n, m in models.items()]
        times = interleaved_step_times(trainees, steps, warmup)
    return [
        Row(
            section,
            name,
            trunk_parameters(model) / 1e6,
            *flops[name],
            img_per_s(times[name]) if times[name] else None,
            times[name],
            REFERENCE_HEADS_IMG_S.get(name) if reference else None,
        )
        for name, model in models.items()
    ]


# ------------------------------------------------------------------------------- report


def ratios(rows: list[Row]) -> list[dict[str, object]]:
    """TORE / FastMETRO per section and variant."""
    by_key = {(r.section, r.model): r for r in rows}
    out = []
    for (section, name), tore in by_key.items():
        if not name.startswith("tore-") or " " in name:
            continue
        fast = by_key.get((section, name.replace("tore-", "fastmetro-")))
        if fast is None:
            continue
        out.append(
            {
                "section": section,
                "variant": name.split("-")[1],
                "throughput_ratio": tore.img_s / fast.img_s if tore.img_s and fast.img_s else None,
                "gflops_ratio": tore.gflops / fast.gflops,
                "trunk_gflops_ratio": tore.trunk_gflops / fast.trunk_gflops,
                "params_ratio": tore.trunk_params_m / fast.trunk_params_m,
            }
        )
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_tables(console: Console, rows: list[Row], ratio_rows: list[dict[str, object]], meta: dict) -> None:
    table = Table(title=f"Backbones: batch {BATCH}, {meta['threads']} torch thread(s), load {meta['load_before']}")
    columns = ("section", "model", "trunk params (M)", "GFLOPs/img", "trunk GFLOPs/img", "train img/s",
               "issue's reference img/s", "ours / reference")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("section", "model") else "right")
    for r in rows:
        versus = r.img_s / r.reference_img_s if r.img_s and r.reference_img_s else None
        table.add_row(
            r.section, r.model, _fmt(r.trunk_params_m), _fmt(r.gflops, 3), _fmt(r.trunk_gflops, 3),
            _fmt(r.img_s), _fmt(r.reference_img_s, 1), _fmt(versus),
        )  # fmt: skip
    console.print(table)
    ratio_table = Table(title="TORE / FastMETRO (same run)")
    for column in ("section", "variant", "train img/s ×", "GFLOPs ×", "trunk GFLOPs ×", "trunk params ×"):
        ratio_table.add_column(column, justify="left" if column in ("section", "variant") else "right")
    for r in ratio_rows:
        ratio_table.add_row(
            str(r["section"]), str(r["variant"]), _fmt(r["throughput_ratio"]), _fmt(r["gflops_ratio"], 3),
            _fmt(r["trunk_gflops_ratio"], 3), _fmt(r["params_ratio"], 3),
        )  # fmt: skip
    console.print(ratio_table)
    reference = REFERENCE_HEADS_IMG_S["tore-S"] / REFERENCE_HEADS_IMG_S["fastmetro-S"]
    console.print(f"issue's reference heads ratio TORE-S / FastMETRO-S: {reference:.2f}× train img/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, ResNet-50 S only (under ~3 minutes)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the cores are shared; 0 = torch's default)"
    )
    parser.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/...)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # (timed steps, warm-up steps) per section
    steps = QUICK_STEPS if args.quick else FULL_STEPS
    console = Console(width=max(Console().width, CONSOLE_WIDTH))
    meta = {
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_before": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "steps": steps,
        "batch": BATCH,
    }
    started = time.perf_counter()
    meta["sections"] = sections
    rows: list[Row] = []
    if "small-64" in sections or "resnet50-224" in sections:
        anny = get_registry().get("body_model", "anny")(BodyModelSpec())
    if "small-64" in sections:
        console.print("[bold]small-64[/] (Anny pyramid)")
        rows += full_model_section("small-64", anny, "small", 64, VARIANTS, *steps["small"])
    if "resnet50-224" in sections:
        console.print("[bold]resnet50-224[/] (Anny pyramid)")
        variants = ("S",) if args.quick else VARIANTS
        rows += full_model_section("resnet50-224", anny, "resnet50", 224, variants, *steps["resnet"])
    if "heads" in sections:
        console.print("[bold]heads[/] (2048×7×7 features, SMPL sizes)")
        rows += heads_section(*steps["heads"], *steps["keep"])
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["load_after"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    ratio_rows = ratios(rows)
    print_tables(console, rows, ratio_rows, meta)
    path = args.json or Path(__file__).parent / "results" / ("backbones-quick.json" if args.quick else "backbones.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [asdict(r) for r in rows], "ratios": ratio_rows,
               "reference_heads_img_s": REFERENCE_HEADS_IMG_S}  # fmt: skip
    path.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {path} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
