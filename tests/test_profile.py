"""``pchmr profile``'s measurements on the CPU: real local rounds through Lightning, inference,
bytes and upload time, memory — on the toy body model so that it takes seconds."""

from __future__ import annotations

import pytest

from pchmr.core.engine.devices import resolve_placement
from pchmr.core.engine.profile import (
    PAPER_UPLINK_MBPS,
    PROFILE_STEPS,
    ProfileSettings,
    _batch_sizes,
    _step_img_s,
    build_profiled_module,
    profile_backbone,
    upload_seconds,
)
from pchmr.testing import ToyBodyModel


def test_upload_seconds_of_the_papers_model_at_the_papers_uplink() -> None:
    """The paper's 42 s per round at 37.4 Mb/s is ~196 MB (FastMETRO-S with ResNet-50, float32)."""
    assert upload_seconds(196_000_000, PAPER_UPLINK_MBPS) == pytest.approx(41.9, abs=0.1)
    with pytest.raises(ValueError, match=r"--uplink-mbps must be > 0, got 0"):
        upload_seconds(1, 0)


@pytest.mark.parametrize("backbone", ["fastmetro", "tore"])
def test_a_profile_of_a_backbone_measures_training_inference_and_communication(backbone: str) -> None:
    heard: list[tuple[int, int, str]] = []
    settings = ProfileSettings(images=50, batch_size=5, uplink_mbps=10.0)
    result = profile_backbone(
        backbone,
        ToyBodyModel(),
        placement=resolve_placement("cpu"),
        settings=settings,
        progress=lambda *event: heard.append(event),
    )
    assert result.images == {"100": 50, "1000": 5}
    assert all(result.seconds[k] > 0 for k in ("100", "1000"))
    assert result.train_img_s == pytest.approx(50 / result.seconds["100"])
    assert result.infer_img_s > result.img_s["1000"] > 0  # a forward alone beats a training step
    # a round's time is its steps' plus the fit's own cost (Trainer, set-up, batches): some, not all of it
    assert 0 < result.fit_overhead_s < result.seconds["100"] / 5 and result.step_img_s > 0
    assert result.bytes_per_round >= 4 * result.parameters  # float32 parameters, plus buffers
    assert result.upload_seconds == pytest.approx(result.bytes_per_round * 8 / 10e6)
    assert result.peak_rss_mb > 100 and result.cuda_max_allocated_mb is None
    assert result.threads is not None and result.device.startswith("CPU (")
    done = [event[0] for event in heard]
    assert done == sorted(done) and done[0] == 0 and heard[-1][:2] == (PROFILE_STEPS, PROFILE_STEPS)
    assert all(event[2].startswith(f"{backbone}-S: ") for event in heard)
    assert any("1000-client partition, round 5 of 5 (1 images)" in event[2] for event in heard)


def test_a_bf16_mixed_profile_trains_on_the_cpu() -> None:
    """Mixed precision through Lightning with gradient clipping: the fused AdamW (which Lightning's
    precision plugin cannot clip) is left out, and the mesh's sparse upsampling trains in float32."""
    settings = ProfileSettings(images=50, batch_size=10)
    result = profile_backbone(
        "tore", ToyBodyModel(), placement=resolve_placement("cpu", 1, "bf16-mixed"), settings=settings
    )
    assert result.precision == "bf16-mixed" and result.step_img_s > 0 and result.images == {"100": 50, "1000": 5}


def test_a_rounds_partial_last_batch_is_left_out_of_the_step_rate() -> None:
    """Rounds of 10 images at batch 4 make batches 4, 4, 2; only the 4s count: median 2 s → 2 img/s."""
    sizes = _batch_sizes(10, 4)
    assert sizes == [4, 4, 2]
    assert _step_img_s([[1.0, 3.0, 0.1], [2.0, 2.0, 0.1]], sizes) == pytest.approx(4 / 2.0)
    assert _step_img_s([[0.5], [1.5], [1.0]], _batch_sizes(3, 8)) == pytest.approx(3 / 1.0)  # no full batch


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"images": 10},
            r"--images must be a whole number >= 50 \(5 rounds, a tenth for the 1000-client partition\), got 10",
        ),
        ({"images": 60.5}, r"--images must be a whole number >= 50 .*got 60.5"),
        ({"batch_size": 0}, r"--batch-size must be a whole number >= 1, got 0"),
        ({"input_size": 100}, r"--input-size must be a multiple of 32 and >= 32 \(64 or 224 usual\), got 100"),
        ({"uplink_mbps": 0.0}, r"--uplink-mbps must be a number > 0, got 0.0"),
        ({"uplink_mbps": float("nan")}, r"--uplink-mbps must be a number > 0, got nan"),
    ],
)
def test_settings_refuse_bad_values_naming_the_flag(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProfileSettings(**values)  # type: ignore[arg-type]


def test_a_variant_the_backbone_does_not_know_is_refused_naming_the_flags() -> None:
    with pytest.raises(
        ValueError, match=r"backbone tore refuses --variant XL --encoder small --input-size 64: .*variant"
    ):
        build_profiled_module("tore", ToyBodyModel(), ProfileSettings(variant="XL"))
