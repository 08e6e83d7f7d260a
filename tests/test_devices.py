"""The placement helper: resolving --accelerator/--devices/--precision, Ray's per-client resources,
mixed precision and device moves. CUDA-only behaviour is checked with torch's CUDA probes patched
(the logic), and for real by benchmarks/gpu_check.py on a machine with a GPU."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from pchmr.core.engine import devices
from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.devices import DeviceError, client_resources, resolve_placement
from pchmr.core.engine.federation.simulation import ray_resources
from pchmr.core.engine.preparation import run_placement


@pytest.fixture
def two_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports two CUDA devices (nothing is ever moved to them in these tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_on_a_machine_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    placement = resolve_placement("auto")
    assert placement.accelerator == "cpu" and placement.device == torch.device("cpu")
    assert placement.trainer_kwargs() == {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
    assert placement.loader_kwargs() == {"pin_memory": False}


def test_asking_for_a_gpu_without_one_names_the_option_and_what_is_available() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match=r"--accelerator gpu: this machine has no CUDA GPU .*available: cpu"):
        resolve_placement("gpu")


def test_auto_is_the_gpu_when_torch_sees_one(two_fake_gpus: None) -> None:
    placement = resolve_placement("auto", devices=2, precision="bf16-mixed")
    assert placement.trainer_kwargs() == {"accelerator": "gpu", "devices": 2, "precision": "bf16-mixed"}
    assert placement.device == torch.device("cuda")
    assert placement.loader_kwargs() == {"pin_memory": True}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accelerator": "tpu"}, r"--accelerator must be one of auto, cpu, gpu, mps, got 'tpu'"),
        ({"precision": "64"}, r"--precision must be one of 32-true, 16-mixed, bf16-mixed, got '64'"),
        ({"devices": 0}, r"--devices must be a whole number >= 1, got 0"),
        ({"accelerator": "cpu", "devices": 2}, r"more than one device needs --accelerator gpu"),
    ],
)
def test_bad_values_are_refused_by_option(kwargs: dict, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        resolve_placement(**kwargs)


def test_more_gpus_than_visible_are_refused(two_fake_gpus: None) -> None:
    with pytest.raises(DeviceError, match=r"--devices 3: only 2 CUDA device\(s\) are visible"):
        resolve_placement("gpu", devices=3)


@pytest.mark.parametrize(
    ("cpus", "gpus", "per_round", "client_gpus", "expected"),
    [
        (2, 0, 2, None, {"num_cpus": 1.0, "num_gpus": 0.0}),  # this machine, the default run
        (2, 0, 10, None, {"num_cpus": 1.0, "num_gpus": 0.0}),  # more clients than cores
        (16, 1, 4, None, {"num_cpus": 4.0, "num_gpus": 0.25}),  # four clients share one GPU
        (16, 4, 2, None, {"num_cpus": 8.0, "num_gpus": 1.0}),  # at most one GPU each
        (16, 1, 4, 0.5, {"num_cpus": 4.0, "num_gpus": 0.5}),  # the user's share: two at a time
    ],
)
def test_client_resources_split_the_machine_among_the_rounds_clients(
    cpus: int, gpus: float, per_round: int, client_gpus: float | None, expected: dict
) -> None:
    assert client_resources(cpus, gpus, per_round, client_gpus) == expected


def test_a_client_gpu_share_larger_than_the_cluster_is_refused() -> None:
    with pytest.raises(DeviceError, match=r"--client-gpus 0.5 is more than the 0 GPU\(s\) Ray has"):
        client_resources(2, 0, 2, client_gpus=0.5)


def test_bf16_autocast_computes_a_linear_layer_in_bfloat16_on_the_cpu() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with resolve_placement("cpu", precision="bf16-mixed").autocast():
        mixed = layer(x)
    with resolve_placement("cpu").autocast():
        full = layer(x)
    assert mixed.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(mixed.float(), full, rtol=2e-2, atol=2e-2)


def test_to_moves_nested_batches_and_leaves_other_values() -> None:
    placement = resolve_placement("cpu")
    batch = {"image": torch.zeros(2, 3), "meta": {"subject": ["a", "b"]}, "pair": (torch.ones(1), 3)}
    moved = placement.to(batch)
    assert moved["image"].device == torch.device("cpu") and moved["meta"] == {"subject": ["a", "b"]}
    assert isinstance(moved["pair"], tuple) and moved["pair"][1] == 3


def test_deterministic_algorithms_can_be_switched_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == devices.CUBLAS_WORKSPACE
    finally:
        devices.deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_float16_mixed_precision_on_the_cpu_is_refused_with_the_alternative() -> None:
    with pytest.raises(DeviceError, match=r"--precision 16-mixed: .* needs a GPU.*use --precision bf16-mixed"):
        resolve_placement("cpu", precision="16-mixed")


def test_loader_workers_and_determinism_reach_the_loader_and_the_trainer() -> None:
    placement = resolve_placement("cpu", loader_workers=2, deterministic=True)
    assert placement.loader_kwargs() == {"pin_memory": False, "num_workers": 2, "persistent_workers": True}
    assert placement.trainer_kwargs()["deterministic"] is True
    assert "deterministic" not in resolve_placement("cpu").trainer_kwargs()  # Lightning's default, as before
    described = placement.describe()
    assert described["loader_workers"] == 2 and described["deterministic"] is True and described["threads"] >= 1


def test_ray_gets_no_gpu_and_the_cpu_split_of_today_on_a_cpu_placement() -> None:
    machine, client = ray_resources(resolve_placement("cpu"), per_round=2, num_cpus=2)
    assert machine == {"num_cpus": 2, "num_gpus": 0}
    assert client == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_ray_gets_every_visible_gpu_and_clients_share_them(two_fake_gpus: None) -> None:
    placement = resolve_placement("gpu")
    machine, client = ray_resources(placement, per_round=4, num_cpus=16)
    assert machine == {"num_cpus": 16, "num_gpus": 2}
    assert client == {"num_cpus": 4.0, "num_gpus": 0.5}  # four clients on two GPUs: two per GPU
    _, given = ray_resources(placement, per_round=4, client_gpus=0.25, num_cpus=16)
    assert given == {"num_cpus": 4.0, "num_gpus": 0.25}


def test_determinism_is_switched_on_for_a_block_and_the_previous_settings_come_back() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    with devices.determinism(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    with devices.determinism(False):
        assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"accelerator": "tpu"}, r"--accelerator must be one of auto, cpu, gpu, mps, got 'tpu'"),
        ({"precision": "fp8"}, r"--precision must be one of 32-true, 16-mixed, bf16-mixed, got 'fp8'"),
        ({"devices": 2}, r"--devices 2: each trainer of a run uses one device"),
        ({"loader_workers": -1}, r"--loader-workers must be a whole number >= 0, got -1"),
        ({"client_gpus": 1.5}, r"--client-gpus must be a fraction of one GPU in \(0, 1\]"),
        ({"client_gpus": 0.5, "mode": "centralized"}, r"--client-gpus shares GPUs .*--mode centralized has none"),
        ({"client_gpus": 0.5, "engine": "deployment"}, r"--client-gpus .*--engine deployment has none"),
    ],
)
def test_run_config_refuses_placement_values_by_option(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(**options)


def test_a_client_gpu_share_on_a_cpu_placement_is_refused_before_any_data(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = RunConfig(accelerator="cpu", client_gpus=0.5, out=str(tmp_path / "run"))
    with pytest.raises(DeviceError, match=r"--client-gpus 0.5 .* but --accelerator cpu resolved to the cpu"):
        run_placement(config)


def test_a_config_saved_before_the_placement_options_resumes_on_the_cpu_as_it_ran() -> None:
    saved = RunConfig(rounds=5).to_dict()
    for key in ("accelerator", "devices", "precision", "client_gpus", "deterministic", "loader_workers"):
        del saved[key]
    old = RunConfig.from_saved(saved)
    assert (old.accelerator, old.devices, old.precision, old.client_gpus) == ("cpu", 1, "32-true", None)
    assert not old.deterministic and old.loader_workers == 0
    current = RunConfig(accelerator="auto", precision="bf16-mixed")
    assert RunConfig.from_saved(current.to_dict()) == current


def test_the_pyramid_and_an_observation_batch_stay_themselves_on_their_own_device() -> None:
    from pchmr.core.contracts.annotation import ObservationBatch
    from pchmr.testing import ToyBodyModel

    pyramid = ToyBodyModel().pyramid()
    assert pyramid.to(torch.device("cpu")) is pyramid
    batch = ObservationBatch(("a",), torch.zeros(1, 2, 3), torch.ones(1, 3), torch.ones(1, 2), torch.ones(1, 2))
    assert batch.to(torch.device("cpu")) is batch


ROOT = Path(__file__).resolve().parents[1] / "pchmr"
#: Ways of choosing a device by hand: each would make a GPU run differ from the CPU's code path.
HAND_PLACEMENT = {
    "a Trainer accelerator": re.compile(r"\baccelerator\s*=\s*['\"]"),
    "a .cuda() move": re.compile(r"\.cuda\("),
    "a device by name": re.compile(r"torch\.device\(\s*['\"]|\bdevice\s*=\s*['\"]|\.to\(\s*['\"](cuda|cpu|mps)"),
    "a Trainer built by hand": re.compile(r"\b(pl\.|lightning\.)?Trainer\("),
    "an autocast by hand": re.compile(r"torch\.autocast\(|torch\.(cpu|cuda)\.amp\."),
    "loader feeding by hand": re.compile(r"\b(pin_memory|num_workers)\s*="),
}
#: The one helper, and the one place a Trainer is built.
PLACEMENT_HOMES = {
    ROOT / "core/engine/devices.py": set(HAND_PLACEMENT),
    ROOT / "core/engine/trainer.py": {"a Trainer built by hand"},
}


def _sources() -> list[Path]:
    return sorted(
        p
        for part in ("core/engine", "plugins", "cli")
        for p in (ROOT / part).rglob("*.py")
        if "__pycache__" not in str(p)
    )


@pytest.mark.parametrize(
    "line",
    [
        'pl.Trainer(accelerator="cpu", devices=1)',
        "module.cuda()",
        'x = torch.zeros(3, device="cuda")',
        "batch.to('cpu')",
        'with torch.autocast("cuda"):',
        "DataLoader(data, num_workers=4)",
    ],
)
def test_hand_placement_patterns_catch_what_they_name(line: str) -> None:
    assert any(pattern.search(line) for pattern in HAND_PLACEMENT.values())


def test_no_engine_plugin_or_command_code_chooses_a_device_by_hand() -> None:
    found = []
    for path in _sources():
        allowed = PLACEMENT_HOMES.get(path, set())
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, pattern in HAND_PLACEMENT.items():
                if what not in allowed and pattern.search(code):
                    found.append(f"{path.relative_to(ROOT.parent)}:{number}: {what}: {line.strip()}")
    assert not found, "place models through pchmr.core.engine.devices (Placement):\n" + "\n".join(found)


def test_every_trainer_evaluation_and_loader_of_a_run_is_given_its_placement() -> None:
    """Calls of make_trainer, evaluate and make_loader pass a placement (keyword, or evaluate's
    third argument): a call without one would train or evaluate on the CPU whatever --accelerator."""
    missing = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in ("make_trainer", "evaluate", "make_loader"):
                continue
            if getattr(getattr(node.func, "value", None), "id", None) == "self":
                continue  # a method of that name (FederatedServer.evaluate passes its placement on)
            given = any(k.arg == "placement" for k in node.keywords) or (name == "evaluate" and len(node.args) >= 3)
            if not given:
                missing.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {name}(...)")
    assert not missing, "calls without a placement:\n" + "\n".join(missing)
