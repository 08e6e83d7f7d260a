"""``pchmr profile``: the PCHMR paper's Table 13 (on-device performance) on whatever device is here.

Per backbone, at the chosen encoder, crop size, batch and precision, on one device:

* **training img/s** and **seconds** of a client's local work: 5 rounds, each a fresh Trainer and a
  fresh AdamW as a federated client gets them (:func:`~pchmr.core.engine.trainer.make_trainer`),
  whose epochs together see the images of a 100-client and of a 1000-client partition (the paper's
  4,000 and 400 images; ``images`` scales both); the paper's Time column is the same quantity;
* **inference img/s**: eval-mode forward passes without gradients;
* **bytes per round** (the model, each way) and the **upload seconds** they take at ``uplink_mbps``
  (the paper's 37.4 Mb/s, the US median uplink);
* **peak memory**: the process's peak resident set (RSS) and, on a GPU, CUDA's max allocated bytes;
* the device's name and, on a CPU, the threads torch uses.

The images are noise and the meshes the body model's rest pose: the timings do not depend on
content. Numbers on a shared machine are noisy; :mod:`benchmarks/backbones.py` measures the same
step in a tighter loop (its ratios are the ones to compare).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pchmr.core.contracts.backbone import BackboneOptions
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.engine.devices import Placement
from pchmr.core.engine.module import HMRModule
from pchmr.core.engine.registry import get_registry
from pchmr.core.engine.trainer import make_trainer
from pchmr.core.kit.federation import state_nbytes

__all__ = [
    "PAPER_IMAGES",
    "PAPER_UPLINK_MBPS",
    "ProfileResult",
    "ProfileSamples",
    "profile_backbone",
    "upload_seconds",
]

#: Images one client trains on in 5 rounds in the paper's 100- and 1000-client settings (Table 13).
PAPER_IMAGES = {"100": 4000, "1000": 400}
#: The paper's uplink (Ookla's US median, June–August 2024), megabits per second.
PAPER_UPLINK_MBPS = 37.4
#: Federated rounds the paper profiles one client over.
PROFILE_ROUNDS = 5
#: Eval-mode batches timed for inference (after one warm-up batch).
INFERENCE_BATCHES = 3


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


@dataclass(frozen=True)
class ProfileResult:
    """One row of the profile (a backbone on this device)."""

    backbone: str
    variant: str
    encoder: str
    input_size: int
    batch_size: int
    precision: str
    device: str
    threads: int | None
    train_img_s: float
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def upload_seconds(nbytes: int, uplink_mbps: float) -> float:
    """Seconds to send ``nbytes`` at ``uplink_mbps`` megabits per second."""
    if not uplink_mbps > 0:
        raise ValueError(f"--uplink-mbps must be > 0, got {uplink_mbps}")
    return nbytes * 8 / (uplink_mbps * 1e6)


def _peak_rss_mb() -> float:
    """The process's peak resident set in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _local_rounds(module: HMRModule, data: Dataset, batch_size: int, placement: Placement, rounds: int) -> float:
    """Seconds of ``rounds`` local fits, each over ``data`` once with a fresh Trainer and AdamW."""
    start = time.perf_counter()
    for _ in range(rounds):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, **placement.loader_kwargs())
        trainer = make_trainer(max_epochs=1, grad_clip=module.optim.grad_clip, quiet=True, placement=placement)
        trainer.fit(module, train_dataloaders=loader)
    if placement.on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - start


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


def profile_backbone(
    backbone: str,
    body_model: BodyModel,
    *,
    placement: Placement,
    variant: str = "S",
    encoder: str = "small",
    input_size: int = 64,
    batch_size: int = 16,
    images: int = PAPER_IMAGES["100"],
    uplink_mbps: float = PAPER_UPLINK_MBPS,
    progress: Callable[[str], None] | None = None,
) -> ProfileResult:
    """Profile one registered backbone on ``placement`` (see the module docstring).

    ``images`` is what the 100-client partition's client trains on over the 5 rounds; the
    1000-client partition's client has a tenth of it (the paper: 4,000 and 400)."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 10 * PROFILE_ROUNDS:
        raise ValueError(f"--images must be a whole number >= {10 * PROFILE_ROUNDS} (5 rounds, 1/10 for 1000 clients)")
    say = progress or (lambda message: None)
    factory = get_registry().get("backbone", backbone)
    torch.manual_seed(0)
    options = BackboneOptions(variant=variant, encoder=encoder, input_size=input_size)
    module = HMRModule(factory(body_model, options), body_model)
    if placement.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    counts = {"100": images, "1000": images // 10}
    seconds: dict[str, float] = {}
    for setting, count in counts.items():
        per_round = ProfileSamples(body_model, math.ceil(count / PROFILE_ROUNDS), input_size)
        say(f"{backbone}-{variant}: {PROFILE_ROUNDS} rounds over {count} images ({setting}-client partition)")
        seconds[setting] = _local_rounds(module, per_round, batch_size, placement, PROFILE_ROUNDS)
    say(f"{backbone}-{variant}: inference")
    infer = _inference_img_s(module, ProfileSamples(body_model, batch_size, input_size), batch_size, placement)
    state = module.state_dict()
    nbytes = state_nbytes(state)
    seen = {k: math.ceil(v / PROFILE_ROUNDS) * PROFILE_ROUNDS for k, v in counts.items()}
    return ProfileResult(
        backbone=backbone,
        variant=variant,
        encoder=encoder,
        input_size=input_size,
        batch_size=batch_size,
        precision=placement.precision,
        device=_device_name(placement),
        threads=None if placement.on_gpu else torch.get_num_threads(),
        train_img_s=seen["100"] / seconds["100"],
        infer_img_s=infer,
        images=seen,
        seconds=seconds,
        img_s={k: seen[k] / seconds[k] for k in seen},
        parameters=sum(p.numel() for p in module.parameters()),
        bytes_per_round=nbytes,
        upload_seconds=upload_seconds(nbytes, uplink_mbps),
        uplink_mbps=uplink_mbps,
        peak_rss_mb=_peak_rss_mb(),
        cuda_max_allocated_mb=torch.cuda.max_memory_allocated() / 2**20 if placement.on_gpu else None,
    )


def _device_name(placement: Placement) -> str:
    if placement.on_gpu:
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"
