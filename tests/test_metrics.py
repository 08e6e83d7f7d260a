"""Metric functions against a plain NumPy reference (Procrustes by SVD with the reflection fix)."""

import numpy as np
import pytest
import torch

from pchmr.core.kit.metrics import (
    MPJPE,
    PAMPJPE,
    PCK,
    mpjpe,
    mpvpe,
    pa_mpjpe,
    pck,
    procrustes_align,
    root_align,
)


def numpy_procrustes(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Textbook similarity Procrustes (Umeyama), one sample."""
    mu_p, mu_g = pred.mean(0), gt.mean(0)
    p, g = pred - mu_p, gt - mu_g
    u, s, vt = np.linalg.svd(g.T @ p)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, 1.0, d])
    rot = u @ fix @ vt
    scale = np.trace(np.diag(s) @ fix) / (p**2).sum()
    return scale * p @ rot.T + mu_g


def test_mpjpe_is_mean_euclidean_distance_in_millimetres():
    pred = torch.zeros(1, 2, 3)
    gt = torch.tensor([[[0.003, 0.004, 0.0], [0.0, 0.0, 0.010]]])  # 5 mm and 10 mm
    assert mpjpe(pred, gt).tolist() == pytest.approx([7.5])
    assert mpvpe(pred, gt).tolist() == pytest.approx([7.5])


def test_mpjpe_ignores_invalid_joints_and_gives_nan_when_none_is_valid():
    pred = torch.zeros(2, 2, 3)
    gt = torch.tensor([[[0.005, 0, 0], [1.0, 0, 0]], [[1.0, 0, 0], [1.0, 0, 0]]])
    valid = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = mpjpe(pred, gt, valid)
    assert out[0].item() == pytest.approx(5.0)
    assert torch.isnan(out[1])


def test_pa_mpjpe_matches_numpy_reference_on_random_data():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(16, 14, 3))
    gt = rng.normal(size=(16, 14, 3))
    expected = [np.linalg.norm(numpy_procrustes(p, g) - g, axis=-1).mean() * 1000 for p, g in zip(pred, gt)]
    got = pa_mpjpe(torch.tensor(pred), torch.tensor(gt)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_pa_mpjpe_is_zero_for_a_rotated_scaled_translated_copy_but_not_a_mirror():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(1, 20, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    pred = 0.7 * gt @ q.T + np.array([0.1, -0.2, 0.3])
    assert pa_mpjpe(torch.tensor(pred), torch.tensor(gt)).item() == pytest.approx(0.0, abs=1e-6)
    mirrored = gt * np.array([-1.0, 1.0, 1.0])  # a reflection must not be "aligned away"
    assert pa_mpjpe(torch.tensor(mirrored), torch.tensor(gt)).item() > 1.0
    ref = np.linalg.norm(numpy_procrustes(mirrored[0], gt[0]) - gt[0], axis=-1).mean() * 1000
    assert pa_mpjpe(torch.tensor(mirrored), torch.tensor(gt)).item() == pytest.approx(ref, rel=1e-6)


def test_procrustes_with_mask_ignores_outlier_joint():
    rng = np.random.default_rng(2)
    gt = torch.tensor(rng.normal(size=(1, 10, 3)))
    pred = gt.clone() * 2.0
    pred[0, 3] += 100.0
    valid = torch.ones(1, 10)
    valid[0, 3] = 0
    aligned = procrustes_align(pred, gt, valid)
    keep = valid[0].bool()
    torch.testing.assert_close(aligned[0, keep], gt[0, keep])


def test_pck_counts_joints_under_threshold():
    pred = torch.zeros(1, 4, 3)
    gt = torch.tensor([[[0.1, 0, 0], [0.149, 0, 0], [0.151, 0, 0], [1.0, 0, 0]]])
    assert pck(pred, gt).item() == pytest.approx(0.5)


def test_root_align_subtracts_mid_hip():
    joints = torch.tensor([[[1.0, 0, 0], [3.0, 2, 0], [9.0, 9, 9]]])
    out = root_align(joints, joints, root=(0, 1))
    torch.testing.assert_close(out[0, 0], torch.tensor([-1.0, -1.0, 0.0]))


def test_torchmetrics_classes_average_over_samples_across_updates():
    metric = MPJPE()
    metric.update(torch.zeros(1, 1, 3), torch.tensor([[[0.002, 0, 0]]]))
    metric.update(torch.zeros(2, 1, 3), torch.tensor([[[0.004, 0, 0]], [[0.006, 0, 0]]]))
    assert metric.compute().item() == pytest.approx(4.0)
    pa = PAMPJPE()
    rng = np.random.default_rng(3)
    x, y = torch.tensor(rng.normal(size=(4, 6, 3))), torch.tensor(rng.normal(size=(4, 6, 3)))
    pa.update(x, y)
    assert pa.compute().item() == pytest.approx(pa_mpjpe(x, y).mean().item(), rel=1e-5)
    p = PCK(threshold=0.5)
    p.update(torch.zeros(1, 2, 3), torch.tensor([[[0.1, 0, 0], [0.9, 0, 0]]]))
    assert p.compute().item() == pytest.approx(0.5)


def test_shape_mismatch_is_refused_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 3\) and \(2, 4, 3\)"):
        mpjpe(torch.zeros(2, 3, 3), torch.zeros(2, 4, 3))
