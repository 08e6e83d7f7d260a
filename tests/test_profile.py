"""``pchmr profile``'s measurements on the CPU: real local rounds through Lightning, inference,
bytes and upload time, memory — on the toy body model so that it takes seconds."""

from __future__ import annotations

import pytest

from pchmr.core.engine.devices import resolve_placement
from pchmr.core.engine.profile import PAPER_UPLINK_MBPS, profile_backbone, upload_seconds
from pchmr.testing import ToyBodyModel


def test_upload_seconds_of_the_papers_model_at_the_papers_uplink() -> None:
    """The paper's 42 s per round at 37.4 Mb/s is ~196 MB (FastMETRO-S with ResNet-50, float32)."""
    assert upload_seconds(196_000_000, PAPER_UPLINK_MBPS) == pytest.approx(41.9, abs=0.1)
    with pytest.raises(ValueError, match=r"--uplink-mbps must be > 0, got 0"):
        upload_seconds(1, 0)


@pytest.mark.parametrize("backbone", ["fastmetro", "tore"])
def test_a_profile_of_a_backbone_measures_training_inference_and_communication(backbone: str) -> None:
    result = profile_backbone(
        backbone, ToyBodyModel(), placement=resolve_placement("cpu"), images=50, batch_size=5, uplink_mbps=10.0
    )
    assert result.images == {"100": 50, "1000": 5}
    assert all(result.seconds[k] > 0 for k in ("100", "1000"))
    assert result.train_img_s == pytest.approx(50 / result.seconds["100"])
    assert result.infer_img_s > result.img_s["1000"] > 0  # a forward alone beats a training step
    assert result.bytes_per_round >= 4 * result.parameters  # float32 parameters, plus buffers
    assert result.upload_seconds == pytest.approx(result.bytes_per_round * 8 / 10e6)
    assert result.peak_rss_mb > 100 and result.cuda_max_allocated_mb is None
    assert result.threads is not None and result.device.startswith("CPU")


def test_too_few_images_are_refused() -> None:
    with pytest.raises(ValueError, match=r"--images must be a whole number >= 50"):
        profile_backbone("fastmetro", ToyBodyModel(), placement=resolve_placement("cpu"), images=10)
