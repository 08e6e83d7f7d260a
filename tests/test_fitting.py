"""The fitting core: energies with hand-computed values, depth alignment, priors, and a fit that
recovers a known body (fake SMPL files, so no licence-restricted data and no Anny build)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from pchmr.core.contracts.annotation import ObservationBatch
from pchmr.core.contracts.bodymodel import BodyModelSpec
from pchmr.plugins.annotators.bodies import make_fit_body
from pchmr.plugins.annotators.deposer import make_deposer, make_smplifyx
from pchmr.plugins.annotators.fitting import (
    FitConfig,
    Fitter,
    StageWeights,
    align_depth,
    geman_mcclure,
    silog,
)
from pchmr.plugins.annotators.priors import (
    GaussianMixturePrior,
    JointLimitPrior,
    load_smplify_gmm,
)
from pchmr.testing.fake_smpl import write_fake_smpl


@pytest.fixture(scope="module")
def fake_smpl(tmp_path_factory):
    from pchmr.plugins.bodymodels.smpl import make_smpl

    directory = tmp_path_factory.mktemp("smpl")
    write_fake_smpl(directory)
    return make_smpl(BodyModelSpec(model_dir=str(directory), cache_dir=str(directory / "cache")))


# ------------------------------------------------------------------------------ energies
def test_geman_mcclure_is_half_sigma_squared_at_sigma_and_bounded():
    sigma = 10.0
    values = geman_mcclure(torch.tensor([0.0, sigma**2, 1e12]), sigma)
    assert values[0] == 0.0
    assert values[1] == pytest.approx(sigma**2 / 2)
    assert values[2] == pytest.approx(sigma**2, rel=1e-6)


def test_silog_eigen_hand_values_and_scale_invariance_at_lambda_one():
    d = torch.tensor([[0.0, 0.0, 3.0]])
    valid = torch.ones(1, 3)
    # n·[mean(d²) − λ mean(d)²] = 3·[3 − 0.5·1] = 7.5
    assert float(silog(d, valid, 0.5)) == pytest.approx(7.5)
    assert float(silog(d, valid, 0.0)) == pytest.approx(9.0)
    shifted = silog(d + 7.0, valid, 1.0)
    assert float(shifted) == pytest.approx(float(silog(d, valid, 1.0)))


def test_silog_printed_form_prefers_a_quarter_rms_error_over_a_perfect_fit():
    valid = torch.ones(1, 4)
    perfect = silog(torch.zeros(1, 4), valid, 0.5, "printed")
    quarter = silog(torch.full((1, 4), 0.25), valid, 0.5, "printed")
    assert float(perfect) == pytest.approx(0.0, abs=1e-5)
    assert float(quarter) == pytest.approx(4 * (0.0625 - 0.125))  # n·(1/16 − ½·¼) < 0
    assert float(quarter) < float(perfect)


def test_silog_ignores_images_with_too_few_valid_depths():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert float(silog(d, torch.tensor([[1.0, 1.0, 0.0, 0.0]]), 0.5)) == 0.0
    assert float(silog(d, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.0)) == pytest.approx(1 + 4 + 9)


def test_align_depth_recovers_unknown_scale_and_shift():
    z = torch.tensor([[3.0, 3.2, 2.9, 3.5, 3.1]])
    valid = torch.ones_like(z)
    assert torch.allclose(align_depth(z, 0.25 * z, valid, "scale"), z, atol=1e-5)
    assert torch.allclose(align_depth(z, 2.0 * z + 5.0, valid, "affine"), z, atol=1e-4)
    assert torch.allclose(align_depth(z, 2.0 * z, valid, "metric"), 2.0 * z)


def test_align_depth_scale_uses_the_median_so_one_wrong_depth_does_not_move_it():
    z = torch.tensor([[3.0, 3.2, 2.9, 3.5, 3.1]])
    observed = 2.0 * z
    observed[0, 0] = 100.0
    aligned = align_depth(z, observed, torch.ones_like(z), "scale")
    assert torch.allclose(aligned[0, 1:], z[0, 1:], atol=1e-5)


# -------------------------------------------------------------------------------- priors
def test_single_gaussian_prior_is_half_the_squared_distance():
    prior = GaussianMixturePrior(np.zeros((1, 3)), np.eye(3)[None], np.ones(1))
    x = torch.tensor([[1.0, 2.0, 2.0]])
    assert float(prior(x)) == pytest.approx(4.5)


def test_mixture_prior_takes_the_best_component():
    prior = GaussianMixturePrior(np.array([[0.0], [10.0]]), np.ones((2, 1, 1)), np.array([0.5, 0.5]))
    assert float(prior(torch.tensor([[10.0]]))) == pytest.approx(0.0)
    assert float(prior(torch.tensor([[9.0]]))) == pytest.approx(0.5)


def test_joint_limits_penalise_only_outside_the_range_plus_the_weak_rest_pull():
    prior = JointLimitPrior(np.array([-1.0]), np.array([1.0]), rest_weight=0.0)
    assert float(prior(torch.tensor([[0.9]]))) == 0.0
    assert float(prior(torch.tensor([[1.5]]))) == pytest.approx(50.0 * 0.25)


def test_smplify_gmm_pickle_is_loaded_and_a_wrong_layout_refused(tmp_path):
    good = tmp_path / "gmm_08.pkl"
    with good.open("wb") as fh:
        pickle.dump(
            {"means": np.zeros((2, 69)), "covars": np.stack([np.eye(69)] * 2), "weights": np.array([0.5, 0.5])}, fh
        )
    prior = load_smplify_gmm(good)
    assert prior.dim == 69
    assert float(prior(torch.ones(1, 69))) == pytest.approx(69 / 2, rel=1e-5)
    bad = tmp_path / "bad.pkl"
    with bad.open("wb") as fh:
        pickle.dump({"means": np.zeros((2, 10)), "covars": np.zeros((2, 10, 10)), "weights": np.ones(2)}, fh)
    with pytest.raises(ValueError, match=r"\(K, 69\)"):
        load_smplify_gmm(bad)
    with pytest.raises(FileNotFoundError, match="gmm_08.pkl"):
        load_smplify_gmm(tmp_path / "missing.pkl")


def test_options_are_validated_with_the_known_names(fake_smpl):
    with pytest.raises(
        ValueError, match="deposer annotator has no option 'no_such_option'; its options are: optimizer"
    ):
        make_deposer(fake_smpl, {"pose_prior": "l2", "no_such_option": 1})
    with pytest.raises(ValueError, match=r"smplifyx annotator option 'depth_weight' must be 0 \(.*use the deposer"):
        make_smplifyx(fake_smpl, {"pose_prior": "l2", "depth_weight": 1.0})
    with pytest.raises(
        ValueError, match="deposer annotator option 'pose_prior' must be one of gmm, limits, l2, got 'vposer'"
    ):
        make_deposer(fake_smpl, {"pose_prior": "vposer"})
    with pytest.raises(ValueError, match="silog_form"):
        FitConfig(silog_form="other")
    with pytest.raises(ValueError, match="gmm_08|pose_prior_file"):
        make_deposer(fake_smpl, {})


# ----------------------------------------------------------------------------------- fit
def _observe(fake_smpl, body_pose: torch.Tensor, yaw: float, depth: float, depth_scale: float):
    """Noise-free keypoints and scaled depths of a posed fake-SMPL body at ``depth`` metres."""
    fit_body = make_fit_body(fake_smpl, "l2")
    out = fit_body.forward(body_pose, torch.zeros(len(body_pose), 10))
    root = fake_smpl.root(out.joints)
    c, s = math.cos(yaw), math.sin(yaw)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) @ torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    cam = (out.joints - root) @ rot.T + torch.tensor([0.0, 0.0, depth])
    f = 4.0
    kp = torch.cat([f * cam[..., :2] / cam[..., 2:], torch.ones(*cam.shape[:2], 1)], dim=-1)
    batch = ObservationBatch(
        image_ids=tuple(str(i) for i in range(len(body_pose))), keypoints=kp,
        intrinsics=torch.tensor([[f, 0.0, 0.0]]).expand(len(body_pose), -1).contiguous(),
        depth=depth_scale * cam[..., 2], depth_valid=torch.ones(cam.shape[:2]), depth_invariance="scale",
    )  # fmt: skip
    return batch, (cam - cam[:, [2, 3]].mean(1, keepdim=True)), depth


def test_similar_triangles_give_the_true_depth_of_the_rest_body(fake_smpl):
    fitter = Fitter(make_fit_body(fake_smpl, "l2"), FitConfig(stages=()))
    batch, _, depth = _observe(fake_smpl, torch.zeros(1, 69), yaw=0.0, depth=6.0, depth_scale=1.0)
    depth0, xy0 = fitter.initial_camera(batch)
    assert float(depth0[0]) == pytest.approx(depth, rel=0.02)
    assert xy0.abs().max() < 0.05


def test_depth_fit_recovers_a_known_pose_better_than_2d_only(fake_smpl):
    """Both annotators on noise-free data of a posed, turned body; the depth term must not be
    worse, and the fit must reproduce the joints within a few centimetres."""
    torch.manual_seed(0)
    pose = torch.zeros(1, 69)
    pose[:, 3 * 15 + 2] = 0.6  # some arm motion (SMPL joint 16, left shoulder, about z)
    pose[:, 3 * 3 + 0] = 0.5  # left knee bent
    batch, gt, _ = _observe(fake_smpl, pose, yaw=math.radians(35), depth=5.0, depth_scale=0.3)
    stages = (StageWeights(pose=1.0, shape=1.0, bend=0.0, collision=0.0, iterations=25),)
    errors = {}
    for name, weight in (("smplifyx", 0.0), ("deposer", 1.0)):
        fitter = Fitter(make_fit_body(fake_smpl, "l2"), FitConfig(stages=stages, depth_weight=weight, orientations=2))
        result = fitter.fit(batch)
        errors[name] = float((result.joints - gt).norm(dim=-1).mean())
        assert float(result.losses["reprojection_px"].max()) < 2.0
    assert errors["deposer"] < 0.05
    assert errors["deposer"] <= errors["smplifyx"] + 0.005
