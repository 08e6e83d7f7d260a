"""The placement helper: resolving --accelerator/--devices/--precision, Ray's per-client resources,
mixed precision and device moves. CUDA-only behaviour is checked with torch's CUDA probes patched
(the logic), and for real by benchmarks/gpu_check.py on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

from pchmr.core.engine import devices
from pchmr.core.engine.devices import DeviceError, client_resources, resolve_placement


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
