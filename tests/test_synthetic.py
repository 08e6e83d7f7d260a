"""The embedded synthetic dataset and its CPU rasteriser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.sample import META_KEYS, denormalize_image, validate_sample
from pchmr.core.kit.render import (
    PinholeCamera,
    project_points,
    rasterize_faces,
    render_mesh,
    to_crop_coordinates,
)
from pchmr.plugins.bodymodels.anny import ACTIONS, make_anny
from pchmr.plugins.datasets import synthetic

SIZE = 64
NUM_TRAIN, NUM_TEST = 16, 8


@pytest.fixture(scope="module")
def body():
    return make_anny()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic-cache")


def spec_for(cache_dir: Path, seed: int = 3, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST) -> DatasetSpec:
    return DatasetSpec(image_size=SIZE, seed=seed, cache_dir=cache_dir, num_train=num_train, num_test=num_test)


@pytest.fixture(scope="module")
def data(body, cache_dir) -> HMRData:
    return synthetic.make_synthetic(spec_for(cache_dir), body)


# --------------------------------------------------------------------------------- renderer
def two_triangles() -> tuple[np.ndarray, np.ndarray]:
    """A far triangle (z = 4) listed after a near one (z = 2), both covering the image centre."""
    near = [[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [0.0, 1.0, 2.0]]
    far = [[-2.0, -2.0, 4.0], [2.0, -2.0, 4.0], [0.0, 2.0, 4.0]]
    return np.array(near + far), np.array([[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_near_triangle_hides_far_one_whatever_the_order(order):
    vertices, faces = two_triangles()
    camera = PinholeCamera.square(32, focal=16.0)
    buffer = rasterize_faces(vertices, faces[order], camera)
    near_index = order.index(0)
    assert buffer[16, 16] == near_index
    colors = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])[order]
    image = render_mesh(vertices, faces[order], colors, camera, light=(0.0, 0.0, -1.0), ambient=0.0)
    assert tuple(image[16, 16]) == (255, 0, 0)


def test_tessellated_square_has_no_holes_and_stays_inside():
    # A 2 m square at z = 2 m made of 12 x 12 quads (288 triangles sharing edges): every
    # pixel centre inside its image must be covered (no cracks) and nothing outside.
    n = 12
    grid = np.linspace(-1.0, 1.0, n + 1)
    xs, ys = np.meshgrid(grid, grid)
    vertices = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 2.0)], axis=1)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    camera = PinholeCamera.square(64, focal=32.0)  # x = ±1 m at 2 m → u = 32 ± 16 px
    covered = rasterize_faces(vertices, faces, camera) >= 0
    expected = np.zeros((64, 64), dtype=bool)
    expected[16:48, 16:48] = True  # pixel centres 16.5 … 47.5 lie inside [16, 48]
    np.testing.assert_array_equal(covered, expected)


def test_background_survives_outside_the_mesh_and_light_shades_faces():
    vertices, faces = two_triangles()
    camera = PinholeCamera.square(32, focal=4.0)
    background = np.full((32, 32, 3), 77, dtype=np.uint8)
    image = render_mesh(vertices, faces, np.ones((2, 3)), camera, background, light=(0.0, 0.0, -1.0), ambient=0.2)
    assert tuple(image[0, 0]) == (77, 77, 77)
    assert tuple(image[16, 16]) == (255, 255, 255)  # facing the light: fully lit
    side_lit = render_mesh(vertices, faces, np.ones((2, 3)), camera, background, light=(1.0, 0.0, -1.0), ambient=0.2)
    assert side_lit[16, 16, 0] == round(255 * (0.2 + 0.8 / np.sqrt(2)))


def test_projection_and_crop_coordinates():
    camera = PinholeCamera(fx=100.0, fy=50.0, cx=30.0, cy=20.0, height=40, width=60)
    uv = project_points(np.array([[0.2, -0.4, 2.0]]), camera)
    np.testing.assert_allclose(uv, [[40.0, 10.0]])
    np.testing.assert_allclose(to_crop_coordinates(uv, camera), [[40 / 30 - 1, 10 / 20 - 1]])
    with pytest.raises(ValueError, match="z > 0"):
        project_points(np.array([[0.0, 0.0, -1.0]]), camera)


def test_bad_renderer_inputs_are_named():
    vertices, faces = two_triangles()
    camera = PinholeCamera.square(8, focal=4.0)
    with pytest.raises(ValueError, match="face_colors must be"):
        render_mesh(vertices, faces, np.ones((3, 3)), camera)
    with pytest.raises(ValueError, match="faces index vertices outside"):
        rasterize_faces(vertices, faces + 10, camera)


# ---------------------------------------------------------------------------------- dataset
def test_samples_follow_the_schema(data, body):
    for split in (data.train, data.test):
        for i in range(len(split)):
            sample = split[i]
            validate_sample(sample, num_joints=14, num_vertices=body.num_vertices, image_size=SIZE)
            assert int(sample["index"]) == i and float(sample["has_vertices"]) == 1.0
            assert torch.all(sample["joints_3d"][:, 3] == 1) and torch.all(sample["keypoints_2d"][:, 2] == 1)
            root = sample["joints_3d"][list(body.root_joints), :3].mean(dim=0)
            torch.testing.assert_close(root, torch.zeros(3), atol=1e-5, rtol=0)
    assert len(data.train) == NUM_TRAIN and len(data.test) == NUM_TEST
    with pytest.raises(IndexError):
        data.train[NUM_TRAIN]


def test_keypoints_are_projections_of_the_stored_joints(data):
    for split in (data.train, data.test):
        joints = split.array("joints_3d")[..., :3].astype(np.float64)
        root = split.array("root_cam")[:, None].astype(np.float64)
        f, cx, cy = (split.array("camera")[:, i, None].astype(np.float64) for i in range(3))
        points = joints + root
        u = f * points[..., 0] / points[..., 2] + cx
        v = f * points[..., 1] / points[..., 2] + cy
        expected = np.stack([2 * u / SIZE - 1, 2 * v / SIZE - 1], axis=-1)
        np.testing.assert_allclose(split.array("keypoints_2d")[..., :2], expected, atol=1e-4)
        assert np.all(np.abs(expected) < 1.0)  # inside the crop


def test_vertices_fill_the_crop_and_are_consistent_with_joints(data, body):
    vertices = torch.from_numpy(np.array(data.train.array("vertices")))
    joints = torch.from_numpy(np.array(data.train.array("joints_3d")[..., :3]))
    torch.testing.assert_close(body.joints_from_vertices(vertices), joints, atol=1e-4, rtol=0)
    split = data.train
    points = np.array(split.array("vertices")) + split.array("root_cam")[:, None]
    f, cx, cy = (split.array("camera")[:, i, None] for i in range(3))
    u, v = f * points[..., 0] / points[..., 2] + cx, f * points[..., 1] / points[..., 2] + cy
    extent = np.maximum(u.max(1) - u.min(1), v.max(1) - v.min(1)) / SIZE
    assert np.all((extent > 0.69) & (extent < 0.91))
    np.testing.assert_allclose((u.max(1) + u.min(1)) / 2, SIZE / 2, atol=1e-3)


def test_rendered_body_covers_its_silhouette_and_only_it(data, body):
    """Re-derive each background from the seed and re-rasterise the stored mesh: pixels
    outside the silhouette are exactly the background, keypoints fall on the body."""
    split = data.train
    shapes = body.sample_shape(synthetic.NUM_SUBJECTS, synthetic.split_generator(3, "subjects"))
    plan = synthetic.plan_split(NUM_TRAIN, synthetic.split_generator(3, "train"), body, shapes)
    np.testing.assert_allclose(plan.pose, split.array("pose"))
    faces = body.faces.numpy()
    for i in range(NUM_TRAIN):
        rng = np.random.default_rng(int(plan.background_seed[i]))
        background = synthetic.make_background(plan.scene[i], SIZE, rng)
        f, cx, cy = split.array("camera")[i].astype(np.float64)
        vertices = split.array("vertices")[i].astype(np.float64) + split.array("root_cam")[i]
        silhouette = rasterize_faces(vertices, faces, PinholeCamera(f, f, cx, cy, SIZE, SIZE)) >= 0
        image = denormalize_image(split[i]["image"]).numpy()
        np.testing.assert_array_equal(image[~silhouette], background[~silhouette])
        assert (image[silhouette] != background[silhouette]).any(axis=-1).mean() > 0.95
        assert 0.04 < silhouette.mean() < 0.6
        pixels = np.floor((split.array("keypoints_2d")[i, :, :2] + 1) / 2 * SIZE).astype(int)
        near_body = np.zeros_like(silhouette)
        near_body[1:-1, 1:-1] = silhouette[1:-1, 1:-1] | silhouette[:-2, 1:-1] | silhouette[2:, 1:-1]
        near_body[1:-1, 1:-1] |= silhouette[1:-1, :-2] | silhouette[1:-1, 2:]
        assert near_body[pixels[:, 1], pixels[:, 0]].all()


def test_left_and_right_limbs_and_torso_sides_get_distinct_colours(body):
    colors = synthetic.face_colors(body, body.faces.numpy())
    parts, names = body.vertex_parts()
    face_part = parts[body.faces.numpy()[:, 0]]
    for limb in ("upper_arm", "forearm", "thigh", "shin"):
        left = colors[face_part == names.index(f"left_{limb}")]
        right = colors[face_part == names.index(f"right_{limb}")]
        assert np.abs(np.median(left, 0) - np.median(right, 0)).sum() > 0.5
    torso = np.unique(colors[face_part == names.index("torso")], axis=0)
    assert {tuple(c) for c in torso} >= {synthetic.PART_COLORS["torso_front"], synthetic.PART_COLORS["torso_back"]}


def test_labels_protocol_and_mean_joints(data):
    assert set(data.labels) == set(META_KEYS)
    for key, values in data.labels.items():
        assert len(values) == NUM_TRAIN
        assert [data.train[i]["meta"][key] for i in range(NUM_TRAIN)] == [str(v) for v in values]
    assert set(data.labels["action"]) <= set(ACTIONS)
    assert set(data.labels["scene"]) <= set(synthetic.SCENES)
    assert set(data.labels["source"]) <= {s.name for s in synthetic.SOURCES}
    assert all(s.startswith("subject-") for s in data.labels["subject"])
    assert data.protocol["dataset"] == "synthetic" and data.protocol["gt"] == "real"
    assert data.protocol["image_size"] == SIZE and data.protocol["seed"] == 3
    expected = np.array(data.train.array("joints_3d"))[..., :3].mean(axis=0)
    np.testing.assert_allclose(data.train_mean_joints, expected, atol=1e-6)


def test_same_seed_gives_identical_arrays_and_another_seed_differs(body, tmp_path):
    first = synthetic.make_synthetic(spec_for(tmp_path / "a", seed=5, num_train=6, num_test=2), body)
    second = synthetic.make_synthetic(spec_for(tmp_path / "b", seed=5, num_train=6, num_test=2), body)
    other = synthetic.make_synthetic(spec_for(tmp_path / "c", seed=6, num_train=6, num_test=2), body)
    for name in ("images", "keypoints_2d", "joints_3d", "vertices", "pose", "camera"):
        np.testing.assert_array_equal(first.train.array(name), second.train.array(name))
        np.testing.assert_array_equal(first.test.array(name), second.test.array(name))
        assert not np.array_equal(first.train.array(name), other.train.array(name))


def test_second_construction_reads_the_cache_without_rendering(data, body, cache_dir, monkeypatch):
    def no_rendering(*args, **kwargs):
        raise AssertionError("the cached dataset was rendered again")

    monkeypatch.setattr(synthetic, "render_mesh", no_rendering)
    again = synthetic.make_synthetic(spec_for(cache_dir), body)
    assert again.extra["cache_path"] == data.extra["cache_path"]
    np.testing.assert_array_equal(again.train.array("images"), data.train.array("images"))
    assert isinstance(again.train.array("vertices"), np.memmap)


def test_interrupted_preparation_leaves_no_trusted_cache(body, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = synthetic.render_mesh

    def render_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed while rendering")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_mesh", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_synthetic(spec_for(tmp_path, num_train=6, num_test=2), body)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render_mesh", real_render)
    data = synthetic.make_synthetic(spec_for(tmp_path, num_train=6, num_test=2), body)
    assert len(data.train) == 6 and [p.name for p in tmp_path.iterdir()] == [Path(data.extra["cache_path"]).name]


def test_split_pickles_without_copying_its_memory_maps(data):
    import pickle

    split = data.train
    split.array("vertices")
    clone = pickle.loads(pickle.dumps(split))
    assert len(pickle.dumps(split)) < 100_000
    torch.testing.assert_close(clone[3]["vertices"], split[3]["vertices"])


def test_body_model_without_samplers_is_refused(tmp_path):
    from pchmr.testing.toys import ToyBodyModel

    with pytest.raises(TypeError, match="cannot drive the synthetic dataset"):
        synthetic.make_synthetic(spec_for(tmp_path), ToyBodyModel())


def test_hook_registers_the_factory():
    assert synthetic.pchmr_datasets() == {"synthetic": synthetic.make_synthetic}


def test_2d_only_sources_keep_their_keypoints_and_lose_their_3d_labels(data, body, cache_dir, monkeypatch):
    import dataclasses

    from pchmr.core.contracts.errors import OptionError

    sources = data.labels["source"]
    chosen = sorted(set(sources))[:2]  # two of the sources the 16 samples have
    monkeypatch.setattr(synthetic, "render_mesh", lambda *a, **k: pytest.fail("the option must not re-render"))
    spec = dataclasses.replace(spec_for(cache_dir), options={"2d-only": f" {chosen[0]},{chosen[1]} ,{chosen[0]}"})
    masked = synthetic.make_synthetic(spec, body)
    assert masked.extra["cache_path"] == data.extra["cache_path"], "the same cache, masked when read"
    withheld = np.isin(sources, chosen)
    assert withheld.any() and not withheld.all()
    np.testing.assert_array_equal(masked.train.only_2d, withheld)
    for i in range(NUM_TRAIN):
        sample, full = masked.train[i], data.train[i]
        validate_sample(sample, num_joints=body.num_joints, num_vertices=body.num_vertices)
        torch.testing.assert_close(sample["keypoints_2d"], full["keypoints_2d"])
        torch.testing.assert_close(sample["image"], full["image"])
        if withheld[i]:
            assert sample["joints_3d"][:, 3].sum() == 0 and sample["has_vertices"] == 0
            assert not sample["vertices"].any() and not sample["joints_3d"].any()
        else:
            torch.testing.assert_close(sample["joints_3d"], full["joints_3d"])
            assert sample["has_vertices"] == 1
    # the test split keeps everything; the mean pose comes from the samples with 3D labels
    assert not masked.test.only_2d.any()
    expected = np.array(data.train.array("joints_3d"))[~withheld, :, :3].mean(axis=0)
    np.testing.assert_allclose(masked.train_mean_joints, expected, atol=1e-6)
    with pytest.raises(OptionError, match=r"synthetic dataset option '2d-only' must name sources among studio"):
        synthetic.make_synthetic(dataclasses.replace(spec, options={"2d-only": "studio,beach"}), body)


def test_tilted_sources_give_their_3d_labels_in_a_rotated_frame(data, body, cache_dir):
    import dataclasses

    from pchmr.core.contracts.errors import OptionError

    sources = data.labels["source"]
    tilted_source, other = sorted(set(sources))[:2]
    spec = dataclasses.replace(spec_for(cache_dir), options={"tilt": tilted_source, "tilt-degrees": "90"})
    tilted = synthetic.make_synthetic(spec, body)
    # 90° about the camera's x axis: (x, y, z) → (x, −z, y)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    for i in range(NUM_TRAIN):
        sample, full = tilted.train[i], data.train[i]
        torch.testing.assert_close(sample["keypoints_2d"], full["keypoints_2d"])
        if sources[i] == tilted_source:
            torch.testing.assert_close(
                sample["joints_3d"][:, :3], full["joints_3d"][:, :3] @ rotate.T, atol=1e-6, rtol=0
            )
            torch.testing.assert_close(sample["vertices"], full["vertices"] @ rotate.T, atol=1e-6, rtol=0)
            torch.testing.assert_close(sample["joints_3d"][:, 3], full["joints_3d"][:, 3])
        else:
            torch.testing.assert_close(sample["joints_3d"], full["joints_3d"])
    # the default 180° is OpenGL's frame: y and z negated; tests are never tilted
    opengl = synthetic.make_synthetic(dataclasses.replace(spec, options={"tilt": tilted_source}), body)
    i = int(np.flatnonzero(sources == tilted_source)[0])
    torch.testing.assert_close(
        opengl.train[i]["joints_3d"][:, :3],
        data.train[i]["joints_3d"][:, :3] * torch.tensor([1.0, -1.0, -1.0]),
        atol=1e-6,
        rtol=0,
    )
    assert not opengl.test.tilted.any()
    with pytest.raises(OptionError, match=r"'tilt' must name sources with 3D labels, got .*which '2d-only' names"):
        synthetic.make_synthetic(dataclasses.replace(spec, options={"tilt": other, "2d-only": other}), body)
    with pytest.raises(OptionError, match=r"'tilt-degrees' must be a number in \[-180, 180\]"):
        synthetic.make_synthetic(dataclasses.replace(spec, options={"tilt": other, "tilt-degrees": 200}), body)
