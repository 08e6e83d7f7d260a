"""``pchmr profile``: the PCHMR paper's Table 13 (on-device performance) on whatever device is here.

Per backbone, at the chosen encoder, crop size, batch and precision (:class:`ProfileSettings`),
on one device (a :class:`~pchmr.core.engine.devices.Placement`):

* **seconds** of a client's local work and the **img/s** they make: 5 rounds, each a fresh Trainer
  and a fresh AdamW as a federated client gets them (:func:`~pchmr.core.engine.trainer.make_trainer`),
  whose epochs together see the images of a 100-client and of a 1000-client partition (the paper's
  4,000 and 400 images; ``images`` scales both); the paper's Throughput and Time columns are these;
* **step img/s**: the batch over the median optimizer step inside those fits (forward, loss,
  backward, clip, AdamW; timed by :class:`StepTimer`), and the **fit overhead** per round: a round's
  seconds minus its steps' (building the Trainer, ``fit``'s set-up and tear-down, loading batches);
* **inference img/s**: eval-mode forward passes without gradients;
* **bytes per round** (the model, each way) and the **upload seconds** they take at ``uplink_mbps``
  (the paper's 37.4 Mb/s, the US median uplink);
* **peak memory**: the process's peak resident set (RSS) while this backbone was profiled (Linux:
  the high-water mark is reset before each backbone; elsewhere the process's peak so far) and, on
  a GPU, CUDA's max allocated bytes;
* the device's name and, on a CPU, the threads torch uses.

One untimed warm-up fit over one batch comes first (CUDA's context, cuDNN's algorithm choice, the
allocator's first growth, lazy imports): a real client pays those once per process, and on a short
``--images`` workload they would swamp the rounds. The images are noise and the meshes the body
model's rest pose: the timings do not depend on content. Numbers on a shared machine are noisy;
``benchmarks/backbones.py`` measures the same step in a tighter loop (compare ratios).
"""

from __future__ import annotations

import math
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pchmr.core.contracts.backbone import BackboneOptions
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.engine.config import resolve_channels_last
from pchmr.core.engine.devices import Placement
from pchmr.core.engine.module import HMRModule
from pchmr.core.engine.registry import get_registry
from pchmr.core.engine.trainer import make_trainer
from pchmr.core.kit.federation import state_nbytes

__all__ = [
    "PAPER_IMAGES",
    "PAPER_TABLE13",
    "PAPER_UPLINK_MBPS",
    "PROFILE_STEPS",
    "ProfileResult",
    "ProfileSamples",
    "ProfileSettings",
    "StepTimer",
    "build_profiled_module",
    "device_name",
    "profile_backbone",
    "profile_module",
    "upload_seconds",
]

#: Images one client trains on in 5 rounds in the paper's 100- and 1000-client settings (Table 13).
PAPER_IMAGES = {"100": 4000, "1000": 400}
#: The paper's uplink (Ookla's US median, June–August 2024), megabits per second.
PAPER_UPLINK_MBPS = 37.4
#: The paper's Table 13: (model, device, 100-partition img/s, s, 1000-partition img/s, s).
PAPER_TABLE13 = (
    ("FM-S", "Jetson AGX Orin 15 W", 2.46, 1629.33, 2.42, 165.33),
    ("FM-S", "Jetson AGX Orin 50 W", 8.01, 499.67, 7.81, 51.23),
    ("FM-S", "RTX A6000 Ada", 56.59, 70.7, 48.0, 8.33),
    ("TORE-S", "Jetson AGX Orin 15 W", 3.43, 1166.06, 3.35, 119.29),
    ("TORE-S", "Jetson AGX Orin 50 W", 8.65, 461.5, 8.42, 47.49),
    ("TORE-S", "RTX A6000 Ada", 50.87, 78.67, 44.40, 9.02),
)
#: Federated rounds the paper profiles one client over.
PROFILE_ROUNDS = 5
#: Eval-mode batches timed for inference (after one warm-up batch).
INFERENCE_BATCHES = 3
#: Units of work one backbone's profile reports progress over: the warm-up fit, 5 rounds of each
#: partition setting, inference.
PROFILE_STEPS = 1 + 2 * PROFILE_ROUNDS + 1
#: Fewest ``images``: 5 rounds of the 1000-client tenth, at least one image each.
MIN_IMAGES = 10 * PROFILE_ROUNDS

#: ``progress(done, total, message)``: ``done`` of ``total`` units finished, ``message`` the next.
OnProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ProfileSettings:
    """What ``pchmr profile`` measures at; every value is checked here, each refusal naming its flag."""

    variant: str = "S"
    encoder: str = "small"
    input_size: int = 64
    batch_size: int = 16
    images: int = PAPER_IMAGES["100"]  # the 100-client partition's; the 1000-client one has a tenth
    uplink_mbps: float = PAPER_UPLINK_MBPS
    channels_last: bool | None = None  # as `pchmr run --channels-last`: unset, on for resnet50

    def __post_init__(self) -> None:
        if not _whole(self.images) or self.images < MIN_IMAGES:
            raise ValueError(
                f"--images must be a whole number >= {MIN_IMAGES} (5 rounds, a tenth for the 1000-client "
                f"partition), got {self.images!r}"
            )
        if not _whole(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be a whole number >= 1, got {self.batch_size!r}")
        if not _whole(self.input_size) or self.input_size < 32 or self.input_size % 32:
            raise ValueError(
                f"--input-size must be a multiple of 32 and >= 32 (64 or 224 usual), got {self.input_size!r}"
            )
        if not (
            isinstance(self.uplink_mbps, (int, float)) and math.isfinite(self.uplink_mbps) and self.uplink_mbps > 0
        ):
            raise ValueError(f"--uplink-mbps must be a number > 0, got {self.uplink_mbps!r}")
        if not isinstance(self.variant, str) or not self.variant:
            raise ValueError(f"--variant must name a backbone size (S, M or L for the built-ins), got {self.variant!r}")

    def counts(self) -> dict[str, int]:
        """Partition setting → images its client trains on over the 5 rounds (before rounding up)."""
        return {"100": self.images, "1000": self.images // 10}


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ProfileSamples(Dataset):
    """``count`` Samples of noise images over the body model's rest pose (timing only)."""

    def __init__(self, body_model: BodyModel, count: int, image_size: int, seed: int = 0) -> None:
        rest = {name: torch.zeros(1, *shape) for name, shape in body_model.param_shapes.items()}
        with torch.no_grad():
            vertices = body_model(**rest).vertices[0].to(torch.float32)
            joints = body_model.joints_from_vertices(vertices[None])[0]
        root = joints[list(body_model.root_joints)].mean(dim=0)
        self.vertices, self.joints = vertices - root, joints - root
        self.count, self.image_size = count, image_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        ones = torch.ones(len(self.joints), 1)
        return {
            "image": torch.randn(3, self.image_size, self.image_size, generator=self.generator),
            "keypoints_2d": torch.cat((self.joints[:, :2].clamp(-1, 1), ones), dim=1),
            "joints_3d": torch.cat((self.joints, ones), dim=1),
            "vertices": self.vertices,
            "has_vertices": torch.tensor(1.0),
            "index": torch.tensor(index),
        }


class StepTimer(pl.Callback):
    """Seconds of every training step (``on_train_batch_start`` → ``on_train_batch_end``: forward,
    loss, backward, clip, optimizer), the batch already on the device; on a GPU both ends wait for
    the queued kernels, so a step's time is its own."""

    def __init__(self, synchronize: bool) -> None:
        self.synchronize = synchronize
        self.seconds: list[float] = []
        self._start = 0.0

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = self._now()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds.append(self._now() - self._start)


@dataclass(frozen=True)
class ProfileResult:
    """One row of the profile (a backbone on this device)."""

    backbone: str
    variant: str
    encoder: str
    channels_last: bool
    input_size: int
    batch_size: int
    precision: str
    device: str
    threads: int | None
    train_img_s: float  # the 100-client setting's img/s, fit overhead included
    step_img_s: float  # batch / median step seconds, fit overhead excluded
    fit_overhead_s: float  # per round of the 100-client setting: round seconds − its steps' seconds
    infer_img_s: float
    images: Mapping[str, int]  # partition setting → images over the 5 rounds
    seconds: Mapping[str, float]  # partition setting → measured seconds of the 5 rounds
    img_s: Mapping[str, float]  # partition setting → images / seconds
    parameters: int
    bytes_per_round: int  # the model, each way
    upload_seconds: float
    uplink_mbps: float
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None

    @property
    def model(self) -> str:
        return f"{self.backbone}-{self.variant}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def upload_seconds(nbytes: int, uplink_mbps: float) -> float:
    """Seconds to send ``nbytes`` at ``uplink_mbps`` megabits per second."""
    if not uplink_mbps > 0:
        raise ValueError(f"--uplink-mbps must be > 0, got {uplink_mbps}")
    return nbytes * 8 / (uplink_mbps * 1e6)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0: ``5`` into ``clear_refs``); False where
    that is not possible, and the peak is then the process's so far."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    """The resident-set high-water mark in MiB: ``VmHWM`` on Linux, else ``ru_maxrss`` (KiB on
    Linux, bytes on macOS)."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def _fit(module: HMRModule, data: Dataset, batch_size: int, placement: Placement, timer: StepTimer | None) -> None:
    """One local round: a fresh Trainer (and so a fresh AdamW) over ``data`` once."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, **placement.loader_kwargs())
    callbacks = [timer] if timer is not None else []
    trainer = make_trainer(
        max_epochs=1, grad_clip=module.optim.grad_clip, quiet=True, placement=placement, callbacks=callbacks
    )
    trainer.fit(module, train_dataloaders=loader)


def _local_rounds(
    module: HMRModule, data: Dataset, batch_size: int, placement: Placement, before: Callable[[int], None]
) -> tuple[list[float], list[float]]:
    """``(round seconds, step seconds)`` of :data:`PROFILE_ROUNDS` local fits over ``data``;
    ``before(r)`` is called before round ``r`` (1-based)."""
    timer = StepTimer(synchronize=placement.on_gpu)
    rounds: list[float] = []
    for r in range(1, PROFILE_ROUNDS + 1):
        before(r)
        start = time.perf_counter()
        _fit(module, data, batch_size, placement, timer)
        if placement.on_gpu:
            torch.cuda.synchronize()
        rounds.append(time.perf_counter() - start)
    return rounds, timer.seconds


@torch.no_grad()
def _inference_img_s(module: HMRModule, data: Dataset, batch_size: int, placement: Placement) -> float:
    module.eval().to(placement.device)
    batches = [next(iter(DataLoader(data, batch_size=batch_size)))["image"]] * (INFERENCE_BATCHES + 1)
    timed = 0.0
    for i, images in enumerate(batches):
        images = placement.to(images)
        start = time.perf_counter()
        with placement.autocast():
            module(images)
        if placement.on_gpu:
            torch.cuda.synchronize()
        if i:  # the first batch warms up
            timed += time.perf_counter() - start
    return INFERENCE_BATCHES * batch_size / timed


def build_profiled_module(backbone: str, body_model: BodyModel, settings: ProfileSettings) -> HMRModule:
    """The registered ``backbone`` at ``settings`` in an :class:`HMRModule`, seeded (random weights:
    the whole model trains, the CNN included). A factory's refusal (an unknown variant or encoder)
    is re-raised as ``ValueError`` naming the flags."""
    factory = get_registry().get("backbone", backbone)
    torch.manual_seed(0)
    options = BackboneOptions(variant=settings.variant, encoder=settings.encoder, input_size=settings.input_size)
    try:
        model = factory(body_model, options)
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"backbone {backbone} refuses --variant {settings.variant} --encoder {settings.encoder} "
            f"--input-size {settings.input_size}: {exc}"
        ) from exc
    module = HMRModule(model, body_model)
    if resolve_channels_last(settings.encoder, settings.channels_last):
        module.to(memory_format=torch.channels_last)  # as a run's Components.make_module does
    return module


def profile_module(
    backbone: str,
    module: HMRModule,
    body_model: BodyModel,
    *,
    placement: Placement,
    settings: ProfileSettings,
    progress: OnProgress | None = None,
) -> ProfileResult:
    """Profile ``module`` (``backbone`` at ``settings``, from :func:`build_profiled_module`) on
    ``placement`` (see the module docstring); ``progress`` hears of each of :data:`PROFILE_STEPS` units."""
    label = f"{backbone}-{settings.variant}"

    def say(done: int, message: str) -> None:
        if progress is not None:
            progress(done, PROFILE_STEPS, f"{label}: {message}")

    if placement.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    size, batch = settings.input_size, settings.batch_size
    say(0, "warm-up fit (untimed)")
    _fit(module, ProfileSamples(body_model, batch, size), batch, placement, None)
    per_round = {k: math.ceil(v / PROFILE_ROUNDS) for k, v in settings.counts().items()}
    rounds: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    for index, (setting, count) in enumerate(per_round.items()):

        def before(r: int, index: int = index, setting: str = setting, count: int = count) -> None:
            say(
                1 + index * PROFILE_ROUNDS + r - 1,
                f"{setting}-client partition, round {r} of {PROFILE_ROUNDS} ({count} images)",
            )

        data = ProfileSamples(body_model, count, size)
        rounds[setting], steps[setting] = _local_rounds(module, data, batch, placement, before)
    say(PROFILE_STEPS - 1, "inference")
    infer = _inference_img_s(module, ProfileSamples(body_model, batch, size), batch, placement)
    say(PROFILE_STEPS, "done")
    sizes = _batch_sizes(per_round["100"], batch)
    by_round = [steps["100"][i * len(sizes) : (i + 1) * len(sizes)] for i in range(PROFILE_ROUNDS)]
    nbytes = state_nbytes(module.state_dict())
    seen = {k: v * PROFILE_ROUNDS for k, v in per_round.items()}
    seconds = {k: sum(v) for k, v in rounds.items()}
    return ProfileResult(
        backbone=backbone,
        variant=settings.variant,
        encoder=settings.encoder,
        channels_last=resolve_channels_last(settings.encoder, settings.channels_last),
        input_size=size,
        batch_size=batch,
        precision=placement.precision,
        device=device_name(placement),
        threads=None if placement.on_gpu else torch.get_num_threads(),
        train_img_s=seen["100"] / seconds["100"],
        step_img_s=_step_img_s(by_round, sizes),
        fit_overhead_s=statistics.fmean(r - sum(s) for r, s in zip(rounds["100"], by_round)),
        infer_img_s=infer,
        images=seen,
        seconds=seconds,
        img_s={k: seen[k] / seconds[k] for k in seen},
        parameters=sum(p.numel() for p in module.parameters()),
        bytes_per_round=nbytes,
        upload_seconds=upload_seconds(nbytes, settings.uplink_mbps),
        uplink_mbps=settings.uplink_mbps,
        peak_rss_mb=_peak_rss_mb(),
        cuda_max_allocated_mb=torch.cuda.max_memory_allocated() / 2**20 if placement.on_gpu else None,
    )


def _batch_sizes(images: int, batch: int) -> list[int]:
    """The batches one epoch over ``images`` makes: full ones, then the remainder."""
    return [batch] * (images // batch) + ([images % batch] if images % batch else [])


def _step_img_s(by_round: list[list[float]], sizes: list[int]) -> float:
    """Images per second of the median step of the largest batch size (the full batches; a round's
    smaller last batch would flatter or wrong the rate)."""
    largest = max(sizes)
    times = [t for steps in by_round for t, n in zip(steps, sizes) if n == largest]
    return largest / statistics.median(times)


def profile_backbone(
    backbone: str,
    body_model: BodyModel,
    *,
    placement: Placement,
    settings: ProfileSettings | None = None,
    progress: OnProgress | None = None,
) -> ProfileResult:
    """Profile the registered ``backbone`` on ``placement`` at ``settings`` (default:
    :class:`ProfileSettings`'s, the paper's 4,000 images): :func:`build_profiled_module`, then
    :func:`profile_module`."""
    settings = settings or ProfileSettings()
    module = build_profiled_module(backbone, body_model, settings)
    return profile_module(backbone, module, body_model, placement=placement, settings=settings, progress=progress)


def device_name(placement: Placement) -> str:
    """The GPU's name, or ``CPU (<model name>)`` from ``/proc/cpuinfo`` (else what ``platform`` knows)."""
    if placement.on_gpu:
        return torch.cuda.get_device_name(0)
    if placement.accelerator == "mps":
        return f"Apple MPS ({platform.machine()})"
    name = ""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        name = found.group(1).strip() if found else ""
    except OSError:
        pass
    return f"CPU ({name or platform.processor() or platform.machine()})"
