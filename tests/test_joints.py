"""Joint sets, mappings and protocols against the indices the HMR codebases use."""

import numpy as np
import pytest

from pchmr.core.kit.joints import (
    COCO_17,
    H36M_17,
    J24,
    JOINT_SETS,
    LSP_14,
    JointSetError,
    candidate_indices,
    get_protocol,
    remap,
    root_relative,
)


def test_sizes_and_the_body_models_evaluation_set():
    sizes = {
        "lsp-14": 14,
        "j24": 24,
        "h36m-17": 17,
        "coco-17": 17,
        "openpose-25": 25,
        "openpose-18": 18,
        "mpii-16": 16,
        "smpl-24": 24,
    }
    assert {k: len(v) for k, v in JOINT_SETS.items()} == sizes
    for names in JOINT_SETS.values():
        assert len(set(names)) == len(names)
    from pchmr.plugins.bodymodels import anny, smpl

    assert anny.JOINT_NAMES == LSP_14 and smpl.JOINT_NAMES == LSP_14


def test_h36m_to_lsp_matches_metro_and_j24_matches_spin():
    # METRO/FastMETRO's H36M_J17_TO_J14 and SPIN's J24_TO_J14 (head = J24 18, "Head (H36M)").
    assert [c[0] for c in candidate_indices(H36M_17, LSP_14)] == [3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]
    assert [c[0] for c in candidate_indices(J24, LSP_14)] == [*list(range(13)), 18]
    assert candidate_indices(J24, ["head"]) == [(18, 13)]  # LSP's head top is the fallback


def test_remap_takes_the_first_valid_candidate_per_sample():
    j24 = np.zeros((2, 24, 3))
    j24[0, 18] = [10.0, 20.0, 1.0]  # H36M-style: head at 18
    j24[1, 13] = [30.0, 40.0, 1.0]  # LSP-style: head at 13, 18 empty
    j24[:, 3] = [5.0, 6.0, 1.0]  # left hip
    out = remap(j24, "j24", LSP_14)
    assert out.shape == (2, 14, 3)
    np.testing.assert_array_equal(out[:, LSP_14.index("head")], [[10, 20, 1], [30, 40, 1]])
    np.testing.assert_array_equal(out[:, LSP_14.index("left_hip")], [[5, 6, 1], [5, 6, 1]])
    assert (out[:, LSP_14.index("right_ankle")] == 0).all()


def test_coco_has_no_neck_or_head_top():
    coco = np.ones((1, 17, 3))
    coco[0, :, 0] = np.arange(17)
    out = remap(coco, COCO_17, LSP_14)
    assert out[0, LSP_14.index("neck"), 2] == 0 and out[0, LSP_14.index("head"), 2] == 0
    assert out[0, LSP_14.index("left_hip"), 0] == COCO_17.index("left_hip") == 11
    assert out[0, LSP_14.index("right_ankle"), 0] == 16


def test_bad_shapes_and_names_are_refused():
    with pytest.raises(JointSetError, match=r"\(N, 24, C>=2\)"):
        remap(np.zeros((3, 17, 3)), "j24", LSP_14)
    with pytest.raises(JointSetError, match="known sets"):
        remap(np.zeros((3, 17, 3)), "h36m", LSP_14)
    with pytest.raises(JointSetError, match="known: spin, metro"):
        get_protocol("hmr2")


def test_root_relative_subtracts_the_mid_hip_and_drops_rootless_samples():
    joints = np.zeros((2, 14, 4))
    joints[:, :, 3] = 1.0
    joints[:, :, :3] = np.arange(14)[None, :, None] * np.array([1.0, 2.0, 3.0])
    joints[1, LSP_14.index("left_hip"), 3] = 0.0
    out = root_relative(joints, LSP_14)
    mid = (2 + 3) / 2.0  # right_hip = 2, left_hip = 3
    np.testing.assert_allclose(out[0, 0, :3], [-mid, -2 * mid, -3 * mid])
    assert (out[1] == 0).all(), "a sample without both hips has no root: all invalid"


def test_protocols_differ_in_the_root():
    h36m = np.zeros((1, 17, 3))
    h36m[0, H36M_17.index("pelvis")] = [0.0, 0.1, 0.0]
    h36m[0, H36M_17.index("left_hip")] = [0.1, 0.0, 0.0]
    h36m[0, H36M_17.index("right_hip")] = [-0.1, 0.0, 0.0]
    h36m[0, H36M_17.index("head")] = [0.0, -0.7, 0.0]
    spin, mid_hip = get_protocol("spin").align(h36m), get_protocol("mid-hip").align(h36m)
    head = LSP_14.index("head")
    np.testing.assert_allclose(spin[0, head], [0.0, -0.8, 0.0])  # relative to the pelvis
    np.testing.assert_allclose(mid_hip[0, head], [0.0, -0.7, 0.0])  # relative to the mid-hip
    # METRO/FastMETRO's released evaluation also aligns at the Human3.6M pelvis (mid-hip is
    # their joint-token training target only); they differ from SPIN in the neutral GT mesh
    np.testing.assert_allclose(get_protocol("metro").align(h36m), spin)
    assert get_protocol("SPIN").gt_mesh == "gendered" and get_protocol("metro").alignment == "pelvis"
    assert get_protocol("metro").gt_mesh == "neutral"
