"""Where a model runs: the one helper every training, evaluation, fitting and inference path asks.

``--accelerator auto|cpu|gpu|mps``, ``--devices N`` and ``--precision 32-true|16-mixed|bf16-mixed``
resolve once into a :class:`Placement`; Lightning Trainers take :meth:`Placement.trainer_kwargs`,
hand-written loops (server evaluation, annotation fitting, inference) move tensors with
:meth:`Placement.to` and compute under :meth:`Placement.autocast`. A CUDA run therefore changes
only the device: the code paths are the ones the CPU tests run.

Simulated clients ask Ray for a share of the GPUs (:func:`client_resources`); a SuperNode uses
its own device (its process resolves ``auto`` on its machine).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ACCELERATORS",
    "CPU",
    "PRECISIONS",
    "DeviceError",
    "Placement",
    "available_accelerators",
    "check_placement_options",
    "client_resources",
    "determinism",
    "deterministic_algorithms",
    "resolve_placement",
    "visible_gpus",
]

#: What ``--accelerator`` accepts; ``auto`` is a CUDA GPU when torch sees one, else the CPU.
ACCELERATORS = ("auto", "cpu", "gpu", "mps")
#: What ``--precision`` accepts (Lightning's names). On a CPU both mixed modes compute in bfloat16.
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
#: cuBLAS needs a fixed workspace to be deterministic (CUDA docs, "Reproducibility").
CUBLAS_WORKSPACE = ":4096:8"


class DeviceError(ValueError):
    """An accelerator, device count or precision this machine cannot provide; the message names
    the option, what was asked, and what is available."""


def available_accelerators() -> list[str]:
    """The accelerators torch can use on this machine, CPU first."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("gpu")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def _torch_build() -> str:
    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'a CPU-only build'})"


@dataclass(frozen=True)
class Placement:
    """A resolved accelerator (``cpu``, ``gpu`` or ``mps``), device count and precision, and how
    the device is fed (``loader_workers`` DataLoader processes) and whether it must repeat itself
    exactly (``deterministic``)."""

    accelerator: str
    devices: int
    precision: str
    loader_workers: int = 0
    deterministic: bool = False

    @property
    def device(self) -> torch.device:
        """The torch device of the first (or only) device."""
        return torch.device({"cpu": "cpu", "gpu": "cuda", "mps": "mps"}[self.accelerator])

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "gpu"

    def trainer_kwargs(self) -> dict[str, Any]:
        """``accelerator``, ``devices`` and ``precision`` for a Lightning ``Trainer``, and
        ``deterministic=True`` when asked for (Lightning then switches torch's deterministic
        algorithms on and fixes cuBLAS's workspace)."""
        kwargs: dict[str, Any] = {"accelerator": self.accelerator, "devices": self.devices, "precision": self.precision}
        if self.deterministic:
            kwargs["deterministic"] = True
        return kwargs

    def loader_kwargs(self) -> dict[str, Any]:
        """DataLoader settings that feed this device: pinned host memory on a GPU (so
        :meth:`to` copies asynchronously), and ``loader_workers`` worker processes (kept for
        the loader's life) when asked for; on the CPU with no workers, DataLoader's defaults."""
        kwargs: dict[str, Any] = {"pin_memory": self.on_gpu}
        if self.loader_workers > 0:
            kwargs.update(num_workers=self.loader_workers, persistent_workers=True)
        return kwargs

    def to(self, batch: Any) -> Any:
        """``batch`` (a tensor, or a mapping/list/tuple of them) on this device; tensors from
        pinned memory are copied without blocking the host."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=self.on_gpu)
        if isinstance(batch, Mapping):
            return {key: self.to(value) for key, value in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to(value) for value in batch)
        return batch

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for hand-written loops, as Lightning applies it to a fit: float16 on a
        GPU for ``16-mixed``, bfloat16 for ``bf16-mixed`` (and for ``16-mixed`` on a CPU, which has
        no float16 autocast); nothing for ``32-true``."""
        if self.precision == "32-true":
            yield
            return
        dtype = torch.float16 if self.precision == "16-mixed" and self.accelerator != "cpu" else torch.bfloat16
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    def describe(self) -> dict[str, Any]:
        """What ran where, for ``config.json`` and ``pchmr profile``."""
        out: dict[str, Any] = {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "precision": self.precision,
            "loader_workers": self.loader_workers,
            "deterministic": self.deterministic,
            "torch": torch.__version__,
        }
        if self.on_gpu:
            out["device_name"] = torch.cuda.get_device_name(0)
        else:
            out["threads"] = torch.get_num_threads()
        return out


def check_placement_options(
    accelerator: str, devices: int, precision: str, loader_workers: int = 0, client_gpus: float | None = None
) -> None:
    """Refuse values no machine accepts (:class:`DeviceError` naming the option and what is
    allowed), without looking at this machine's hardware: what a saved config can be checked with
    anywhere."""
    if accelerator not in ACCELERATORS:
        raise DeviceError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise DeviceError(f"--devices must be a whole number >= 1, got {devices!r}")
    if isinstance(loader_workers, bool) or not isinstance(loader_workers, int) or loader_workers < 0:
        raise DeviceError(f"--loader-workers must be a whole number >= 0, got {loader_workers!r}")
    if client_gpus is not None and (
        isinstance(client_gpus, bool) or not isinstance(client_gpus, (int, float)) or not 0.0 < client_gpus <= 1.0
    ):
        raise DeviceError(
            f"--client-gpus must be a fraction of one GPU in (0, 1] (e.g. 0.25: four clients per GPU), got {client_gpus!r}"
        )


#: One CPU, 32-bit, no workers: where anything runs unless told otherwise (the tested default).
CPU = Placement("cpu", 1, "32-true")


def resolve_placement(
    accelerator: str = "auto",
    devices: int = 1,
    precision: str = "32-true",
    *,
    loader_workers: int = 0,
    deterministic: bool = False,
) -> Placement:
    """The :class:`Placement` for these options on this machine.

    ``auto`` becomes ``gpu`` when torch sees a CUDA device, else ``cpu`` (never ``mps``: ask for it).
    Raises :class:`DeviceError` for an accelerator the machine lacks, more devices than it has,
    float16 mixed precision on a CPU (Lightning has no float16 autocast there), or an unknown
    value, naming the option and what is available.
    """
    check_placement_options(accelerator, devices, precision, loader_workers)
    available = available_accelerators()
    chosen = ("gpu" if "gpu" in available else "cpu") if accelerator == "auto" else accelerator
    if chosen not in available:
        raise DeviceError(
            f"--accelerator {accelerator}: this machine has no {'CUDA GPU' if chosen == 'gpu' else chosen.upper()} "
            f"that torch can use ({_torch_build()}); available: {', '.join(available)}. Use --accelerator auto or cpu"
            + (", or install the CUDA build (PCHMR_TORCH=cuda bash scripts/install.sh)" if chosen == "gpu" else "")
        )
    if chosen == "gpu" and devices > torch.cuda.device_count():
        raise DeviceError(f"--devices {devices}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if chosen != "gpu" and devices != 1:
        raise DeviceError(f"--devices {devices}: more than one device needs --accelerator gpu (got {chosen})")
    if chosen == "cpu" and precision == "16-mixed":
        raise DeviceError(
            f"--precision 16-mixed: float16 mixed precision needs a GPU, and --accelerator {accelerator} "
            "resolved to the cpu; use --precision bf16-mixed (bfloat16 autocast) or 32-true on the CPU"
        )
    return Placement(chosen, devices, precision, loader_workers=loader_workers, deterministic=bool(deterministic))


def visible_gpus(placement: Placement) -> int:
    """The CUDA devices this process may hand out (to Ray) on ``placement``: every GPU torch sees
    when it is a GPU placement, else none."""
    return torch.cuda.device_count() if placement.on_gpu else 0


def client_resources(cpus: int, gpus: float, per_round: int, client_gpus: float | None = None) -> dict[str, float]:
    """Ray resources of one simulated client when ``per_round`` clients train side by side on
    ``cpus`` cores and ``gpus`` GPUs.

    Cores: an equal share, at least one (two single-threaded FastMETRO-S clients train ~1.2x as
    fast as one client with two threads, ``benchmarks/client_parallelism.py``). GPUs:
    ``client_gpus`` when given (a fraction of one GPU, or whole GPUs), else the round's clients
    share the GPUs evenly (``gpus / per_round``, at most one each); none without GPUs.
    """
    if cpus < 1 or per_round < 1:
        raise ValueError(f"need at least one core and one client per round, got {cpus} and {per_round}")
    if gpus < 0:
        raise ValueError(f"the number of GPUs cannot be negative, got {gpus}")
    cores = max(1, cpus // min(per_round, cpus))
    if client_gpus is not None:
        if client_gpus < 0 or (client_gpus > 1 and not float(client_gpus).is_integer()):
            raise DeviceError(f"--client-gpus must be a fraction in [0, 1] or a whole number, got {client_gpus}")
        if client_gpus > gpus:
            raise DeviceError(f"--client-gpus {client_gpus} is more than the {gpus:g} GPU(s) Ray has")
        share = float(client_gpus)
    else:
        share = min(1.0, gpus / per_round) if gpus > 0 else 0.0
    return {"num_cpus": float(cores), "num_gpus": share}


def deterministic_algorithms(enabled: bool) -> None:
    """``--deterministic``: torch's deterministic algorithms (warn-only where none exists), cuDNN
    without autotuning, and the fixed cuBLAS workspace CUDA requires (set before CUDA starts)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = enabled


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """:func:`deterministic_algorithms` for the block when ``enabled`` (a run with
    ``--deterministic``), then torch's previous settings back (the cuBLAS variable stays set:
    CUDA reads it once)."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
