"""``benchmarks/gpu_check.py`` on a machine without a GPU: it refuses in one line with exit 2, and
its step runner keeps what each step measured when a step fails, overruns or hangs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_the_check_refuses_in_one_line_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gpu_check needs a CUDA GPU: torch {torch.__version__} (")
    assert "torch.cuda.is_available() is False, 0 CUDA devices, CUDA_VISIBLE_DEVICES=''" in lines[0]
    assert not out.exists() and result.stdout == ""


def test_the_budgets_keep_the_check_within_eight_minutes(gpu_check: ModuleType) -> None:
    steps = gpu_check.gpu_steps(gpu_check.Context(Path("unused")))
    assert [step.name for step in steps] == list(gpu_check.BUDGETS)
    assert gpu_check.STARTUP_SECONDS + sum(gpu_check.BUDGETS.values()) + gpu_check.GRACE_SECONDS <= 8 * 60


def runner(gpu_check: ModuleType, out: Path, seconds: float, **kwargs: Any) -> Any:
    return gpu_check.StepRunner(out, {}, deadline=time.monotonic() + seconds, **kwargs)


def test_a_failing_step_keeps_what_it_measured_and_the_next_steps_still_run(
    gpu_check: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "check.json"

    def fails(measured: dict[str, Any]) -> None:
        measured["images_done"] = 64
        raise RuntimeError("CUDA error: out of memory")

    steps = [
        gpu_check.Step("first", 5, lambda measured: measured.update(img_s=12.5)),
        gpu_check.Step("second", 5, fails),
        gpu_check.Step("third", 5, lambda measured: measured.update(done=True)),
    ]
    failed = runner(gpu_check, out, 60, grace=1).run(steps)
    assert failed == ["second"]
    record = json.loads(out.read_text())["steps"]
    assert record["first"]["status"] == "ok" and record["first"]["measured"] == {"img_s": 12.5}
    assert record["second"]["status"] == "failed" and record["second"]["measured"] == {"images_done": 64}
    assert record["second"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert "raise RuntimeError" in "\n".join(record["second"]["traceback"])
    assert record["third"]["status"] == "ok"


def test_a_step_past_its_budget_is_interrupted_and_later_budgets_stay_reserved(
    gpu_check: ModuleType, tmp_path: Path
) -> None:
    """Deadline 4 s, grace 1 s, the last step reserves 1 s: the slow step gets 2 s, not 10."""
    out = tmp_path / "check.json"

    def slow(measured: dict[str, Any]) -> None:
        for i in range(100):
            measured["batches"] = i
            time.sleep(0.1)

    started = time.monotonic()
    steps = [gpu_check.Step("slow", 0.5, slow), gpu_check.Step("last", 1, lambda m: m.update(ran=True))]
    failed = runner(gpu_check, out, 4, grace=1).run(steps)
    assert time.monotonic() - started < 3.5
    record = json.loads(out.read_text())["steps"]
    assert failed == ["slow"] and record["slow"]["status"] == "timed out"
    assert record["slow"]["budget_s"] == pytest.approx(2, abs=0.2) and 10 <= record["slow"]["measured"]["batches"] < 30
    assert record["last"]["status"] == "ok" and record["last"]["measured"] == {"ran": True}


def test_a_step_with_no_time_left_is_skipped_as_failed(gpu_check: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    failed = runner(gpu_check, out, 1, grace=1).run([gpu_check.Step("late", 5, lambda m: m.update(ran=True))])
    record = json.loads(out.read_text())["steps"]["late"]
    assert failed == ["late"] and record["status"] == "skipped" and record["measured"] == {}


def test_a_step_that_ignores_its_interrupt_is_abandoned_after_the_grace(gpu_check: ModuleType, tmp_path: Path) -> None:
    """A step stuck where the alarm cannot stop it: the watchdog writes the record, then exits."""
    out = tmp_path / "check.json"
    stop, written = threading.Event(), []

    def hard_exit(code: int) -> None:
        written.append((code, json.loads(out.read_text())))
        stop.set()

    def stuck(measured: dict[str, Any]) -> None:
        measured["where"] = "inside a CUDA call"
        while not stop.is_set():
            try:
                time.sleep(0.05)
            except gpu_check.StepTimeout:
                pass  # as if the interrupt never reached Python

    runner(gpu_check, out, 2.5, grace=0.5, hard_exit=hard_exit).run([gpu_check.Step("stuck", 1, stuck)])
    [(code, record)] = written
    assert code == 1 and record["status"] == "failed: step stuck hung"
    assert record["steps"]["stuck"]["status"] == "hung" and record["steps"]["stuck"]["measured"]["where"]


def test_the_federated_run_is_a_run_config_once_the_placement_fields_exist(
    gpu_check: ModuleType, tmp_path: Path
) -> None:
    from pchmr.core.engine.config import RunConfig

    values = gpu_check.federated_config(tmp_path)
    assert {key: values[key] for key in gpu_check.GPU_FIELDS} == gpu_check.GPU_FIELDS
    assert values["accelerator"] == "gpu" and values["client_gpus"] == 1 / values["per_round"]
    today = RunConfig.from_dict({k: v for k, v in values.items() if k not in gpu_check.GPU_FIELDS})
    assert (today.clients, today.per_round, today.rounds, today.mode) == (10, 4, 2, "federated")
    assert Path(today.out).parent == tmp_path and not Path(today.out).exists()


def test_the_summary_reads_rates_ratios_and_the_peak_memory(gpu_check: ModuleType) -> None:
    def train(backbone: str, precision: str, step: float, peak: float) -> dict[str, Any]:
        measured = {"backbone": backbone, "variant": "S", "precision": precision, "step_img_s": step,
                    "train_img_s": step / 2, "cuda_max_allocated_mb": peak}  # fmt: skip
        return {"status": "ok", "measured": measured}

    record = {"steps": {
        "train-fastmetro-S-32-true": train("fastmetro", "32-true", 40.0, 900.0),
        "train-tore-S-32-true": train("tore", "32-true", 50.0, 800.0),
        "train-fastmetro-S-bf16-mixed": train("fastmetro", "bf16-mixed", 60.0, 700.0),
        "train-tore-S-bf16-mixed": {"status": "timed out", "measured": {"device_used_peak_mb": 2500.0}},
        "federated": {"status": "ok", "measured": {"seconds": 95.5, "device_used_peak_mb": 3100.0}},
        "deposer": {"status": "timed out", "measured": {"images_done": 128, "s_per_image": 0.4}},
    }}  # fmt: skip
    summary = gpu_check.summarise(record)
    assert summary["train_step_img_s"] == {
        "fastmetro-S": {"32-true": 40.0, "bf16-mixed": 60.0},
        "tore-S": {"32-true": 50.0},
    }
    assert summary["bf16_over_fp32"] == {"fastmetro-S": 1.5} and summary["tore_over_fastmetro"] == {"32-true": 1.25}
    assert summary["federated_seconds"] == 95.5 and summary["deposer_s_per_image"] == 0.4
    assert summary["peak_gpu_memory_mb"] == 3100.0


def test_the_gpu_steps_run_on_the_cpu_when_pointed_there(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training and DePoser steps' own code, shrunk and on the CPU: what a GPU run executes
    apart from the device (the federated step needs the placement fields of RunConfig)."""
    monkeypatch.setattr(gpu_check, "THROUGHPUT", {"encoder": "small", "input_size": 64, "batch_size": 5, "images": 50})
    monkeypatch.setattr(gpu_check, "FEDERATED", {**gpu_check.FEDERATED, "num_train": 16, "num_test": 16})
    monkeypatch.setattr(gpu_check, "DEPOSER_IMAGES", 3)
    monkeypatch.setattr(gpu_check, "DEPOSER_BATCH", 2)
    ctx = gpu_check.Context(tmp_path, accelerator="cpu")
    steps = [
        gpu_check.Step("prepare", 120, gpu_check.prepare(ctx)),
        gpu_check.Step("train-tore-S-bf16-mixed", 120, gpu_check.train(ctx, "tore", "bf16-mixed")),
        gpu_check.Step("deposer", 120, gpu_check.deposer(ctx)),
    ]
    out = tmp_path / "check.json"
    assert runner(gpu_check, out, 400).run(steps) == []
    record = json.loads(out.read_text())
    prepared, trained, fitted = (
        record["steps"][name]["measured"] for name in ("prepare", "train-tore-S-bf16-mixed", "deposer")
    )
    assert prepared == {"train": 16, "test": 16, "body_model": "anny"}
    assert trained["precision"] == "bf16-mixed" and trained["images"] == {"100": 50, "1000": 5}
    assert trained["step_img_s"] > 0 and trained["device"].startswith("CPU (")
    assert fitted["images_done"] == 3 and len(fitted["batch_seconds"]) == 2 and fitted["s_per_image"] > 0
    summary = gpu_check.summarise(record)
    assert summary["train_step_img_s"] == {"tore-S": {"bf16-mixed": round(trained["step_img_s"], 2)}}
    assert summary["deposer_s_per_image"] == fitted["s_per_image"]
