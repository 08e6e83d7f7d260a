"""The run's placement reaches every place a model runs, on this CPU-only machine: a mixed-precision
fit through the engine, evaluation under autocast, annotators moved by their capability, the
refusal of an accelerator the machine lacks (exit 2, before any data), and a run directory saved
before the placement options resuming. The GPU path itself: benchmarks/gpu_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.engine.components import build_components, make_loader
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.devices import Placement, resolve_placement
from pchmr.core.engine.evaluation import evaluate
from pchmr.core.engine.run import execute, resume_config
from pchmr.core.engine.trainer import make_trainer

PCHMR = [sys.executable, "-m", "pchmr.cli.app"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
#: What a run config.json of pchmr before the placement options held.
PLACEMENT_KEYS = ("accelerator", "devices", "precision", "client_gpus", "deterministic", "loader_workers")


def _mean_training_loss(module, dataset) -> float:
    module.eval()
    with torch.no_grad():
        losses = [float(module.compute_losses(b, module(b["image"]))["loss"]) for b in make_loader(dataset, 16, False)]
    module.train()
    return float(np.mean(losses))


def test_bf16_mixed_precision_on_the_cpu_trains_through_the_engine_and_its_loss_falls(pchmr_cache):
    config = RunConfig(num_train=32, num_test=8, precision="bf16-mixed", seed=0)
    placement = config.placement()
    assert placement.trainer_kwargs() == {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}
    components = build_components(config)
    module = components.make_module()
    dtypes: set[torch.dtype] = set()
    linear = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype) if module.training else None)
    before = _mean_training_loss(module, components.data.train)
    loader = make_loader(components.data.train, 8, shuffle=True, seed=1, placement=placement)
    make_trainer(max_epochs=2, grad_clip=module.optim.grad_clip, placement=placement).fit(module, loader)
    after = _mean_training_loss(module, components.data.train)
    assert dtypes == {torch.bfloat16}, f"the fit's linear layers computed in {dtypes}, not under bf16 autocast"
    assert after < 0.8 * before, f"mean training loss {before:.1f} → {after:.1f}"


def test_evaluation_under_bf16_autocast_gives_float32_metrics_near_the_32_bit_ones(pchmr_cache):
    config = RunConfig(num_train=16, num_test=16, seed=0)
    components = build_components(config)
    module = components.make_module()
    loader = make_loader(components.data.test, 8, shuffle=False)
    full = evaluate(module, loader, resolve_placement("cpu"))
    mixed = evaluate(module, loader, resolve_placement("cpu", precision="bf16-mixed"))
    assert full == evaluate(module, loader)  # a 32-bit placement on the module's own device changes nothing
    assert mixed != full, "bf16 autocast left the metrics bit-identical: it was not applied"
    for key in ("mpjpe_mm", "pa_mpjpe_mm"):
        assert mixed[key] == pytest.approx(full[key], rel=0.05)
    assert next(module.parameters()).device.type == "cpu" and next(module.parameters()).dtype == torch.float32


class _CpuOnly:
    """An annotator double without the DeviceAnnotator capability."""

    name = "cpu-only"

    def fit(self, batch):  # never called here
        raise AssertionError("no batch expected")

    def describe(self) -> dict[str, object]:
        return {"annotator": self.name}


class _Recorder(_CpuOnly):
    """An annotator double with the capability, recording where it was asked to fit."""

    name = "recorder"

    def __init__(self) -> None:
        self.moved_to: list[torch.device] = []

    def to_device(self, device: torch.device) -> None:
        self.moved_to.append(device)


def test_an_annotator_with_the_device_capability_is_moved_once_and_others_stay_on_the_cpu(caplog):
    from pchmr.core.engine.annotation import _place

    recorder = _Recorder()
    assert _place(recorder, resolve_placement("cpu")) is None and recorder.moved_to == []  # the CPU: nothing moves
    assert _place(recorder, Placement("mps", 1, "32-true")) == torch.device("mps")
    assert recorder.moved_to == [torch.device("mps")]
    assert _place(_CpuOnly(), Placement("mps", 1, "32-true")) is None
    assert "cpu-only cannot move to the mps (no to_device): fitting on the CPU" in caplog.text


def _cli(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PCHMR_CACHE_DIR": str(cache)}
    return subprocess.run([*PCHMR, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@NO_GPU
@pytest.mark.parametrize(
    "command",
    [
        ["run", "--out", "r"],
        ["annotate", "synthetic", "--out", "r"],
        ["personalize", "--checkpoint", "missing-run", "--data", "missing-labels"],
    ],
    ids=["run", "annotate", "personalize"],
)
def test_asking_for_a_gpu_on_a_machine_without_one_exits_2_before_any_data(tmp_path, command):
    cache = tmp_path / "cache"
    result = _cli(*command, "--accelerator", "gpu", cwd=tmp_path, cache=cache)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "--accelerator gpu: this machine has no CUDA GPU that torch can use" in message
    assert "available: cpu" in message and "Use --accelerator auto or cpu" in message
    assert not (tmp_path / "r").exists() and not cache.exists(), "nothing may be prepared for a refused placement"


def test_annotation_refuses_mixed_precision_before_any_data(tmp_path):
    cache = tmp_path / "cache"
    result = _cli("annotate", "synthetic", "--out", "r", "--precision", "bf16-mixed", cwd=tmp_path, cache=cache)
    assert result.returncode == 2, result.stderr
    assert "--precision bf16-mixed: annotation fits in 32-bit only" in " ".join(result.stderr.split())
    assert not cache.exists()


def test_a_run_saved_before_the_placement_options_resumes_and_finishes(tmp_path, pchmr_cache):
    """A naive baseline of 2 epochs, stopped after the first; its config.json rewritten as older
    pchmr wrote it (no placement keys, no placement record). Resuming reads it as a CPU run."""
    out = tmp_path / "old"
    first = execute(RunConfig(mode="naive", fraction=0.5, epochs=1, num_train=32, num_test=8, out=str(out)))
    assert first.run_dir.read_rounds()[-1]["round"] == 1
    saved = json.loads(first.run_dir.config.read_text())
    assert saved["placement"]["accelerator"] in ("cpu", "gpu") and saved["placement"]["precision"] == "32-true"
    for key in PLACEMENT_KEYS:
        del saved["run"][key]
    del saved["placement"]
    saved["run"]["epochs"] = 2  # as if the run was killed after its first of two epochs
    first.run_dir.config.write_text(json.dumps(saved))
    config = resume_config(out)
    assert config.accelerator == "cpu" and config.precision == "32-true"
    resumed = execute(config, run_dir=out, resume=True)
    rounds = resumed.run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2] and resumed.final["round"] == 2
    assert all(r["train_img_s"] > 0 for r in rounds[1:])  # the baseline's one device, per epoch


def test_deterministic_with_loader_workers_gives_the_plain_cpu_runs_metrics_and_restores_torch(tmp_path, pchmr_cache):
    """On the CPU --deterministic changes nothing but torch's flags, and loader workers change
    nothing but who loads: the shuffle order is the seed's. The flags are on during the run only."""
    base = dict(mode="naive", fraction=0.5, epochs=1, num_train=16, num_test=8)
    plain = execute(RunConfig(**base, out=str(tmp_path / "plain")))
    seen: list[bool] = []
    config = RunConfig(**base, deterministic=True, loader_workers=1, out=str(tmp_path / "d"))
    result = execute(config, on_round=lambda report: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True, True], "round 0's evaluation and the epoch ran without torch's deterministic algorithms"
    placement = json.loads(result.run_dir.config.read_text())["placement"]
    assert placement["deterministic"] is True and placement["loader_workers"] == 1
    assert not torch.are_deterministic_algorithms_enabled(), "the run left torch's deterministic mode on"
    for key in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck"):
        assert result.final[key] == plain.final[key], key


# --------------------------------------------------------------------------------------
# The same logic on a CUDA GPU (skipped here; the CPU tests above check it on every machine)
# --------------------------------------------------------------------------------------
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
def test_cuda_mixed_precision_fit_and_evaluation_through_the_engine(pchmr_cache):
    config = RunConfig(num_train=32, num_test=16, accelerator="gpu", precision="bf16-mixed", seed=0)
    placement = config.placement()
    components = build_components(config)
    module = components.make_module()
    before = evaluate(module, make_loader(components.data.test, 8, False, placement=placement), placement)
    loader = make_loader(components.data.train, 8, shuffle=True, seed=1, placement=placement)
    make_trainer(max_epochs=3, grad_clip=module.optim.grad_clip, placement=placement).fit(module, loader)
    after = evaluate(module, make_loader(components.data.test, 8, False, placement=placement), placement)
    assert after["mpjpe_mm"] < before["mpjpe_mm"]
    assert next(module.parameters()).device.type == "cpu"  # Lightning and evaluate hand the module back


@CUDA
def test_cuda_annotation_fits_like_the_cpu(pchmr_cache):
    from pchmr.core.contracts.bodymodel import BodyModelSpec
    from pchmr.core.engine.registry import get_registry
    from pchmr.testing import contract_observations

    registry = get_registry()
    spec = BodyModelSpec(cache_dir=str(Path(pchmr_cache) / "pyramids"))
    options = {"pose_prior": "l2", "iterations": 10, "orientations": 2, "camera_iterations": 10}
    cpu = registry.get("annotator", "deposer")(registry.get("body_model", "anny")(spec), options)
    gpu = registry.get("annotator", "deposer")(registry.get("body_model", "anny")(spec), options)
    gpu.to_device(torch.device("cuda"))
    rest = lambda b: {"pose": torch.zeros(b, 104, 3), "phenotype": torch.full((b, 6), 0.5)}  # noqa: E731
    observations = contract_observations(cpu.fitter.body.body_model, rest)
    on_cpu, on_gpu = cpu.fit(observations), gpu.fit(observations.to(torch.device("cuda")))
    assert on_gpu.joints.device.type == "cuda"
    assert float((on_gpu.joints.cpu() - on_cpu.joints).norm(dim=-1).mean()) < 0.01  # metres


@CUDA
def test_cuda_simulation_shares_the_gpu_and_records_the_placement(tmp_path, pchmr_cache):
    config = RunConfig(
        num_train=48, num_test=16, clients=4, per_round=2, rounds=1, batch_size=16, local_epochs=1, seed=3,
        accelerator="gpu", out=str(tmp_path / "gpu"),
    )  # fmt: skip
    result = execute(config)
    placement = json.loads(result.run_dir.config.read_text())["placement"]
    assert placement["accelerator"] == "gpu" and placement["device_name"]
    assert len(result.run_dir.read_rounds()[1]["client_img_s"]) == 2


def test_channels_last_is_on_for_resnet50_by_default_and_either_way_by_choice():
    assert not RunConfig().uses_channels_last, "the small CNN stays contiguous: the default run's numbers stand"
    assert RunConfig(encoder="resnet50").uses_channels_last
    assert not RunConfig(encoder="resnet50", channels_last=False).uses_channels_last
    assert RunConfig(channels_last=True).uses_channels_last
    old = RunConfig(encoder="resnet50").to_dict()
    del old["channels_last"]
    assert not RunConfig.from_saved(old).uses_channels_last, "a run saved before the option resumes as it ran"


def test_a_channels_last_model_trains_evaluates_and_exchanges_weights_with_a_contiguous_one(pchmr_cache):
    """The engine's channels-last module: its convolution weights are NHWC, a fit step and an
    evaluation run, its state dict loads into a contiguous module and back (as the server and the
    clients exchange weights), and its outputs equal the contiguous module's to round-off."""
    config = RunConfig(num_train=16, num_test=8, seed=0, channels_last=True)
    components = build_components(config)
    module = components.make_module()
    convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = build_components(config.replace(channels_last=False)).make_module()
    assert not any(
        m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
        for m in plain.modules()
        if isinstance(m, torch.nn.Conv2d)
    )
    batch = next(iter(make_loader(components.data.test, 8, shuffle=False)))
    module.eval()
    plain.eval()
    with torch.no_grad():
        ours, theirs = module(batch["image"]), plain(batch["image"])
    torch.testing.assert_close(ours.joints, theirs.joints, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.vertices[-1], theirs.vertices[-1], rtol=1e-4, atol=1e-5)
    loader = make_loader(components.data.train, 8, shuffle=True, seed=1, placement=config.placement())
    make_trainer(max_epochs=1, grad_clip=module.optim.grad_clip, placement=config.placement()).fit(module, loader)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs), "training kept the layout"
    plain.load_state_dict(module.state_dict())
    module.load_state_dict(plain.state_dict())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs), "loading kept the layout"
    metrics = evaluate(module, make_loader(components.data.test, 8, shuffle=False), placement=config.placement())
    assert np.isfinite(metrics["mpjpe_mm"])
