"""The anny body model plugin: frame conversion, joints, differentiability, poses, pyramid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.contracts.bodymodel import BodyModelSpec
from pchmr.plugins.bodymodels import anny as anny_plugin
from pchmr.plugins.bodymodels.anny import (
    ACTIONS,
    JOINT_NAMES,
    AnnyBodyModel,
    flip_pose,
    make_anny,
)

J = {name: i for i, name in enumerate(JOINT_NAMES)}


@pytest.fixture(scope="module")
def body() -> AnnyBodyModel:
    return make_anny()


@pytest.fixture(scope="module")
def coco(body: AnnyBodyModel) -> dict[str, np.ndarray]:
    """Anny's own COCO keypoints of the rest mesh, in pchmr's body frame."""
    weights, labels = anny_plugin._coco_regressor(body.anny)
    points = weights.numpy() @ body.rest_vertices().astype(np.float64)
    return dict(zip(labels, points))


def zero_pose(batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, 104, 3)


def test_rest_mesh_is_y_up_facing_plus_z_with_left_at_plus_x(body, coco):
    with torch.no_grad():
        joints = body(pose=zero_pose()).joints[0].numpy()
    pelvis = joints[[J["left_hip"], J["right_hip"]]].mean(axis=0)
    assert joints[J["head"], 1] > pelvis[1] + 0.4  # head above pelvis: y up
    assert joints[J["left_ankle"], 1] < pelvis[1] - 0.6
    assert coco["nose"][2] > coco["left_ear"][2] + 0.05  # the face looks towards +z
    assert coco["left_big_toe"][2] > coco["left_heel"][2] + 0.1  # toes point towards +z
    assert joints[J["left_hip"], 0] > 0.03 > -0.03 > joints[J["right_hip"], 0]  # left at +x


def test_height_is_metres(body):
    vertices = body.rest_vertices()
    height = vertices[:, 1].max() - vertices[:, 1].min()
    assert 1.4 < height < 2.0


def test_joint_regressor_rows_sum_to_one(body):
    regressor = body.joint_regressor
    assert regressor.shape == (14, body.num_vertices) and regressor.dtype == torch.float32
    torch.testing.assert_close(regressor.sum(dim=1), torch.ones(14), atol=1e-4, rtol=0)


def test_joints_are_the_regressor_applied_to_vertices(body, coco):
    with torch.no_grad():
        joints = body(pose=zero_pose()).joints[0].numpy()
    np.testing.assert_allclose(joints[J["neck"]], (coco["left_shoulder"] + coco["right_shoulder"]) / 2, atol=1e-4)
    np.testing.assert_allclose(joints[J["head"]], (coco["left_ear"] + coco["right_ear"]) / 2, atol=1e-4)
    np.testing.assert_allclose(joints[J["right_wrist"]], coco["right_wrist"], atol=1e-4)


def test_forward_outputs_float32_batches(body):
    out = body(pose=zero_pose(3), phenotype=torch.full((3, 6), 0.5))
    assert out.vertices.shape == (3, 13718, 3) and out.vertices.dtype == torch.float32
    assert out.joints.shape == (3, 14, 3) and out.joints.dtype == torch.float32
    assert body.faces.shape == (27420, 3) and body.num_vertices == 13718


def test_forward_is_differentiable_in_pose_and_phenotype(body):
    pose = zero_pose(2).requires_grad_(True)
    phenotype = torch.full((2, 6), 0.5, requires_grad=True)
    out = body(pose=pose, phenotype=phenotype)
    out.joints[:, J["left_ankle"], 2].sum().backward()
    knee = body.bone_labels.index("lowerleg01.L")
    assert torch.isfinite(pose.grad).all()
    # Flexing the left knee (+x) moves the left ankle backwards: a negative derivative.
    assert pose.grad[0, knee, 0] < -0.1
    assert phenotype.grad.abs().sum() > 0


def test_knee_flexion_sign_and_magnitude(body):
    pose = zero_pose()
    pose[0, body.bone_labels.index("lowerleg01.L"), 0] = math.pi / 2
    with torch.no_grad():
        rest = body(pose=zero_pose()).joints[0]
        bent = body(pose=pose).joints[0]
    shin = (rest[J["left_ankle"]] - rest[J["left_knee"]]).norm()
    # The shin swings 90° backwards: the ankle ends up about one shin length behind the knee.
    assert bent[J["left_ankle"], 2] < bent[J["left_knee"], 2] - 0.8 * shin
    torch.testing.assert_close(bent[J["right_ankle"]], rest[J["right_ankle"]])


def test_root_rotation_turns_the_whole_body(body):
    pose = zero_pose()
    pose[0, 0] = torch.tensor([0.0, math.pi, 0.0])  # half a turn about the vertical axis
    with torch.no_grad():
        rest = body(pose=zero_pose()).joints[0]
        turned = body(pose=pose).joints[0]
    assert turned[J["left_hip"], 0] < 0 < turned[J["right_hip"], 0]
    expected = rest * torch.tensor([-1.0, 1.0, -1.0])
    torch.testing.assert_close(turned, expected, atol=2e-3, rtol=0)


def test_root_is_mid_hip(body):
    with torch.no_grad():
        joints = body(pose=torch.from_numpy(body.sample_pose(4, np.random.default_rng(0), "walk"))).joints
    expected = (joints[:, J["left_hip"]] + joints[:, J["right_hip"]]) / 2
    torch.testing.assert_close(body.root(joints)[:, 0], expected)


def test_flip_permutation_is_an_involution_swapping_sides(body):
    perm = body.flip_permutation
    assert [perm[p] for p in perm] == list(range(14))
    for i, name in enumerate(JOINT_NAMES):
        mirrored = JOINT_NAMES[perm[i]]
        assert mirrored == name.replace("left", "@").replace("right", "left").replace("@", "right")


def test_flipped_pose_gives_mirrored_joints(body):
    pose = body.sample_pose(3, np.random.default_rng(1), "kick")
    with torch.no_grad():
        joints = body(pose=torch.from_numpy(pose)).joints
        flipped = body(pose=torch.from_numpy(flip_pose(pose, body.bone_labels))).joints
    mirrored = flipped[:, list(body.flip_permutation)] * torch.tensor([-1.0, 1.0, 1.0])
    torch.testing.assert_close(mirrored, joints, atol=2e-3, rtol=0)


@pytest.mark.parametrize("action", ACTIONS)
def test_sample_pose_is_deterministic_with_zero_root(body, action):
    first = body.sample_pose(5, np.random.default_rng(7), action)
    second = body.sample_pose(5, np.random.default_rng(7), action)
    assert first.shape == (5, 104, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert np.all(first[:, 0] == 0)
    assert np.all(np.linalg.norm(first, axis=-1) < math.pi)


def test_action_families_look_like_their_names(body):
    rng = np.random.default_rng(3)
    with torch.no_grad():
        reach = body(pose=torch.from_numpy(body.sample_pose(16, rng, "reach"))).joints
        squat = body(pose=torch.from_numpy(body.sample_pose(16, rng, "squat"))).joints
        stand = body(pose=torch.from_numpy(body.sample_pose(16, rng, "stand"))).joints
    head_y = reach[:, J["head"], 1]
    assert (reach[:, J["left_wrist"], 1] > head_y).all() and (reach[:, J["right_wrist"], 1] > head_y).all()
    assert (stand[:, J["left_wrist"], 1] < stand[:, J["left_shoulder"], 1] - 0.3).all()  # arms down

    def thigh_drop(joints):
        return joints[:, J["left_hip"], 1] - joints[:, J["left_knee"], 1]

    assert (thigh_drop(squat) < 0.2).all() and (thigh_drop(stand) > 0.3).all()


def test_unknown_action_and_bad_parameters_are_refused(body):
    with pytest.raises(ValueError, match="unknown action 'dance'"):
        body.sample_pose(1, np.random.default_rng(0), "dance")
    with pytest.raises(TypeError, match="unknown parameters \\['betas'\\]"):
        body(pose=zero_pose(), betas=torch.zeros(1, 10))
    with pytest.raises(ValueError, match="'pose' must be \\(B, 104, 3\\)"):
        body(pose=torch.zeros(1, 24, 3))
    with pytest.raises(ValueError, match="'phenotype' must be \\(1, 6\\)"):
        body(pose=zero_pose(), phenotype=torch.zeros(1, 5))


def test_vertex_parts_put_left_limbs_at_plus_x(body):
    parts, names = body.vertex_parts()
    rest = body.rest_vertices()
    assert parts.shape == (13718,) and set(np.unique(parts)) == set(range(len(names)))
    for limb in ("upper_arm", "forearm", "hand", "thigh", "shin", "foot"):
        assert rest[parts == names.index(f"left_{limb}"), 0].mean() > 0.05
        assert rest[parts == names.index(f"right_{limb}"), 0].mean() < -0.05


def test_pyramid_is_cached_under_the_spec_cache_dir(tmp_path: Path):
    body = make_anny(BodyModelSpec(cache_dir=str(tmp_path)))
    pyramid = body.pyramid()
    assert pyramid.num_vertices == (431, 1723, 13718)
    assert len(list(tmp_path.glob("pyramid-*"))) == 1
    assert body.pyramid() is pyramid
    again = make_anny(BodyModelSpec(cache_dir=str(tmp_path))).pyramid()
    torch.testing.assert_close(again.adjacency, pyramid.adjacency)


def test_factory_is_registered_and_reuses_the_built_anny():
    factory = anny_plugin.pchmr_body_models()["anny"]
    first, second = factory(BodyModelSpec()), factory(BodyModelSpec())
    assert isinstance(first, AnnyBodyModel) and first.name == "anny"
    assert first.anny is second.anny
    assert first.state_dict() == {} and list(first.parameters()) == []  # nothing to federate
