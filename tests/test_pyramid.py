"""The mesh pyramid builder: exact level sizes, convex down/up matrices, geometry, cache, GraphCMR files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from pchmr.core.contracts.bodymodel import MeshPyramid, sparse_bmm
from pchmr.core.kit import pyramid as pyramid_module
from pchmr.core.kit.pyramid import (
    PYRAMID_METHOD,
    build_pyramid,
    cached_pyramid,
    load_graphcmr_downsampling,
    mesh_adjacency,
)

SPHERE_LEVELS = (100, 400)
SPHERE_RADIUS = 2.0


def icosphere(subdivisions: int, radius: float = 1.0, centre=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Icosahedron subdivided ``subdivisions`` times, vertices pushed onto the sphere:
    10 * 4**s + 2 vertices, 20 * 4**s triangles."""
    t = (1.0 + 5.0**0.5) / 2.0
    verts = [
        (-1, t, 0),
        (1, t, 0),
        (-1, -t, 0),
        (1, -t, 0),
        (0, -1, t),
        (0, 1, t),
        (0, -1, -t),
        (0, 1, -t),
        (t, 0, -1),
        (t, 0, 1),
        (-t, 0, -1),
        (-t, 0, 1),
    ]
    faces = [
        (0, 11, 5),
        (0, 5, 1),
        (0, 1, 7),
        (0, 7, 10),
        (0, 10, 11),
        (1, 5, 9),
        (5, 11, 4),
        (11, 10, 2),
        (10, 7, 6),
        (7, 1, 8),
        (3, 9, 4),
        (3, 4, 2),
        (3, 2, 6),
        (3, 6, 8),
        (3, 8, 9),
        (4, 9, 5),
        (2, 4, 11),
        (6, 2, 10),
        (8, 6, 7),
        (9, 8, 1),
    ]
    points = [np.array(v, dtype=np.float64) / np.linalg.norm(v) for v in verts]
    for _ in range(subdivisions):
        midpoint: dict[tuple[int, int], int] = {}

        def middle(a: int, b: int, midpoint: dict[tuple[int, int], int] = midpoint) -> int:
            key = (min(a, b), max(a, b))
            if key not in midpoint:
                m = points[a] + points[b]
                points.append(m / np.linalg.norm(m))
                midpoint[key] = len(points) - 1
            return midpoint[key]

        faces = [
            tri
            for a, b, c in faces
            for tri in (
                (a, middle(a, b), middle(c, a)),
                (b, middle(b, c), middle(a, b)),
                (c, middle(c, a), middle(b, c)),
                (middle(a, b), middle(b, c), middle(c, a)),
            )
        ]
    return np.array(points) * radius + np.asarray(centre), np.array(faces, dtype=np.int64)


@pytest.fixture(scope="module")
def sphere() -> tuple[np.ndarray, np.ndarray]:
    return icosphere(4, radius=SPHERE_RADIUS)  # 2562 vertices, 5120 triangles


@pytest.fixture(scope="module")
def sphere_pyramid(sphere) -> MeshPyramid:
    return build_pyramid(*sphere, level_sizes=SPHERE_LEVELS)


@pytest.fixture(scope="module")
def two_spheres() -> tuple[np.ndarray, np.ndarray]:
    """A big sphere (642 vertices) at the origin, a small one (162) at x = 3, and one vertex
    on no triangle at (0, 0, 1.5), above the big sphere's north pole."""
    big_v, big_f = icosphere(3, radius=1.0)
    small_v, small_f = icosphere(2, radius=0.2, centre=(3.0, 0.0, 0.0))
    vertices = np.concatenate([big_v, small_v, [[0.0, 0.0, 1.5]]])
    return vertices, np.concatenate([big_f, small_f + len(big_v)])


def dense(matrix: torch.Tensor) -> np.ndarray:
    return matrix.to_dense().numpy().astype(np.float64)


def reconstruct(pyr: MeshPyramid, vertices: np.ndarray, level: int) -> np.ndarray:
    """Full mesh → level ``level`` → full mesh."""
    x = torch.from_numpy(vertices).float()[None]
    return pyr.upsample(pyr.downsample(x, level), level)[0].double().numpy()


def sampled_surface(vertices: np.ndarray, faces: np.ndarray, steps: int = 10) -> np.ndarray:
    """Points on every triangle at barycentric grid (i, j, k) / steps, i + j + k = steps."""
    grid = np.array([(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)]) / steps
    return np.einsum("gk,fkc->fgc", grid, vertices[faces]).reshape(-1, 3)


# ----------------------------------------------------------------------------- structure


def test_level_sizes_are_exactly_the_requested_ones_plus_the_full_mesh(sphere, sphere_pyramid):
    _vertices, faces = sphere

    assert sphere_pyramid.num_vertices == (100, 400, 2562)
    assert sphere_pyramid.method == PYRAMID_METHOD
    assert torch.equal(sphere_pyramid.faces[-1], torch.from_numpy(faces))
    for level, tris in enumerate(sphere_pyramid.faces):
        assert tris.dtype == torch.int64
        assert int(tris.max()) < sphere_pyramid.num_vertices[level]


def test_every_down_and_up_row_is_a_convex_combination(sphere_pyramid):
    for matrices in (sphere_pyramid.down, sphere_pyramid.up):
        for matrix in matrices:
            assert matrix.is_sparse and matrix.dtype == torch.float32
            values = dense(matrix)
            assert (values >= 0).all()
            np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-6)


def test_down_picks_distinct_fine_vertices(sphere_pyramid):
    for matrix in sphere_pyramid.down:
        values = dense(matrix)
        assert ((values == 1.0).sum(axis=1) == 1).all()  # one-hot rows
        picked = values.argmax(axis=1)
        assert len(np.unique(picked)) == len(picked)


def test_coarse_vertices_lie_on_the_sphere_and_reconstruct_themselves(sphere, sphere_pyramid):
    vertices, _ = sphere
    picked = dense(sphere_pyramid.down[1]).argmax(axis=1)  # full-mesh vertices kept at level 1

    coarse = sphere_pyramid.downsample(torch.from_numpy(vertices).float()[None], 1)[0].numpy()
    rebuilt = reconstruct(sphere_pyramid, vertices, 1)

    np.testing.assert_allclose(np.linalg.norm(coarse, axis=1), SPHERE_RADIUS, rtol=1e-6)
    np.testing.assert_allclose(rebuilt[picked], vertices[picked], atol=1e-5)


@pytest.mark.parametrize("level, coarse_vertices, slack", [(0, 100, 1.25), (1, 400, 1.0)])
def test_up_after_down_reconstructs_the_sphere(sphere, sphere_pyramid, level, coarse_vertices, slack):
    # A uniform triangulation of the sphere with n vertices has 2n - 4 triangles of area
    # 4 pi r^2 / (2n - 4); equilateral ones have circumradius rho = edge / sqrt(3) and bulge the
    # sphere by the sagitta r - sqrt(r^2 - rho^2). The mean error must stay below that. Level 0
    # is made from level 1's vertices only (two successive simplifications): 25% slack.
    area = 4 * np.pi / (2 * coarse_vertices - 4)
    rho = np.sqrt(4 * area / np.sqrt(3)) / np.sqrt(3)
    sagitta = 1.0 - np.sqrt(1.0 - rho**2)  # relative to the radius

    rebuilt = reconstruct(sphere_pyramid, sphere[0], level)
    relative_error = np.linalg.norm(rebuilt - sphere[0], axis=1) / SPHERE_RADIUS

    assert relative_error.mean() < slack * sagitta
    assert relative_error.max() < 3 * sagitta


def test_up_uses_the_closest_point_of_the_coarse_surface(sphere, sphere_pyramid):
    vertices, _ = sphere
    coarse = sphere_pyramid.downsample(torch.from_numpy(vertices).float()[None], 1)[0].double().numpy()
    samples = sampled_surface(coarse, sphere_pyramid.faces[1].numpy())

    rebuilt = dense(sphere_pyramid.up[1]) @ coarse
    claimed = np.linalg.norm(rebuilt - vertices, axis=1)
    sampled, _ = cKDTree(samples).query(vertices)

    # The claimed point is on the surface, so it can be no farther than any sampled point.
    assert (claimed <= sampled + 1e-5).all()


def test_nearest_triangle_search_looks_past_the_nearest_centroids():
    # One big triangle in z = 0 and ten small ones hovering 0.6 above the query point: their
    # centroids are nearer than the big triangle's (3.3, 3.3, 0), yet the big one is closest.
    big = [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]
    small = [[[6 + 0.1 * i, 1.0, 0.6], [6.05 + 0.1 * i, 1.0, 0.6], [6 + 0.1 * i, 1.05, 0.6]] for i in range(10)]
    vertices = np.concatenate([big, np.reshape(small, (-1, 3))])
    faces = np.arange(len(vertices)).reshape(-1, 3)

    index, bary = pyramid_module._closest_triangles(np.array([[6.0, 1.0, 0.05]]), vertices, faces)

    assert index.tolist() == [0]
    np.testing.assert_allclose(bary, [[0.3, 0.6, 0.1]], atol=1e-12)  # (6, 1, 0) = 0.6 b + 0.1 c


def test_adjacency_is_the_coarse_edge_graph_with_the_diagonal(sphere_pyramid):
    expected = np.eye(100, dtype=bool)
    for a, b, c in sphere_pyramid.faces[0].tolist():
        for i, j in ((a, b), (b, c), (c, a)):
            expected[i, j] = expected[j, i] = True

    adjacency = sphere_pyramid.adjacency

    assert adjacency.dtype == torch.bool
    assert torch.equal(adjacency, adjacency.T)
    np.testing.assert_array_equal(adjacency.numpy(), expected)


def test_mesh_adjacency_of_two_triangles():
    adjacency = mesh_adjacency(np.array([[0, 1, 2], [0, 2, 3]]), num_vertices=5)

    expected = np.array(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(adjacency.numpy(), expected)


def test_mesh_adjacency_rejects_out_of_range_faces():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        mesh_adjacency(np.array([[0, 1, 3]]), num_vertices=3)


# ----------------------------------------------------------------------------- equivariance


def test_pyramid_maps_a_translated_mesh_to_the_translated_result(sphere, sphere_pyramid):
    shift = np.array([0.5, -1.25, 3.0])

    moved = reconstruct(sphere_pyramid, sphere[0] + shift, 0)
    still = reconstruct(sphere_pyramid, sphere[0], 0)

    np.testing.assert_allclose(moved, still + shift, atol=1e-5)


def test_building_from_a_translated_mesh_gives_the_same_pyramid(sphere, sphere_pyramid):
    shifted = build_pyramid(sphere[0] + np.array([0.5, -1.25, 3.0]), sphere[1], level_sizes=SPHERE_LEVELS)

    for mine, theirs in zip(sphere_pyramid.down + sphere_pyramid.up, shifted.down + shifted.up):
        np.testing.assert_allclose(dense(mine), dense(theirs), atol=1e-5)


# ----------------------------------------------------------------------------- awkward meshes


def test_two_components_and_an_unreferenced_vertex(two_spheres):
    vertices, faces = two_spheres
    lonely = len(vertices) - 1

    pyr = build_pyramid(vertices, faces, level_sizes=(40, 160))
    coarse = pyr.downsample(torch.from_numpy(vertices).float()[None], 0)[0].double().numpy()
    up = dense(pyr.up[1]) @ dense(pyr.up[0])  # coarse → full

    assert pyr.num_vertices == (40, 160, 805)
    np.testing.assert_allclose(up.sum(axis=1), 1.0, atol=1e-6)
    assert dense(pyr.down[1])[:, lonely].sum() == 0  # not carried to coarser levels
    small = np.linalg.norm(coarse - [3.0, 0.0, 0.0], axis=1) < 0.21
    assert 0 < small.sum() < 40  # both spheres survive
    # Fine vertices draw only on coarse vertices of their own sphere.
    assert (up[642:804][:, ~small] == 0).all()
    assert (up[:642][:, small] == 0).all()
    # The lonely vertex above the north pole lands on the big sphere's top.
    rebuilt = up[lonely] @ coarse
    assert up[lonely][small].sum() == 0
    assert 0.9 < rebuilt[2] <= 1.0 and np.hypot(rebuilt[0], rebuilt[1]) < 0.3


def test_level_sizes_must_increase_and_fit_the_mesh(sphere):
    with pytest.raises(ValueError, match="strictly increasing"):
        build_pyramid(*sphere, level_sizes=(400, 100))
    with pytest.raises(ValueError, match="only 2562 vertices on triangles"):
        build_pyramid(*sphere, level_sizes=(100, 3000))


# ----------------------------------------------------------------------------- cache


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("pyramid-*.npz"))


def assert_same_pyramid(a: MeshPyramid, b: MeshPyramid) -> None:
    assert a.num_vertices == b.num_vertices and a.method == b.method
    assert torch.equal(a.adjacency, b.adjacency)
    for x, y in zip(a.faces, b.faces):
        assert torch.equal(x, y)
    for x, y in zip(a.down + a.up, b.down + b.up):
        assert torch.equal(x.to_dense(), y.to_dense())


def test_cached_pyramid_is_read_back_identically(sphere, tmp_path, monkeypatch):
    built = cached_pyramid(*sphere, cache_dir=tmp_path, level_sizes=SPHERE_LEVELS)
    assert len(cache_files(tmp_path)) == 1
    assert not list(tmp_path.glob("*.tmp"))

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(pyramid_module, "build_pyramid", must_not_build)
    loaded = cached_pyramid(*sphere, cache_dir=tmp_path, level_sizes=SPHERE_LEVELS)

    assert_same_pyramid(built, loaded)


def test_a_corrupt_cache_file_is_rebuilt(sphere, tmp_path):
    built = cached_pyramid(*sphere, cache_dir=tmp_path, level_sizes=SPHERE_LEVELS)
    (path,) = cache_files(tmp_path)
    path.write_bytes(path.read_bytes()[:500])  # a partial write

    rebuilt = cached_pyramid(*sphere, cache_dir=tmp_path, level_sizes=SPHERE_LEVELS)

    assert_same_pyramid(built, rebuilt)
    assert path.stat().st_size > 500  # rewritten in full


def test_other_level_sizes_get_their_own_cache_file(sphere, tmp_path):
    cached_pyramid(*sphere, cache_dir=tmp_path, level_sizes=SPHERE_LEVELS)
    other = cached_pyramid(*sphere, cache_dir=tmp_path, level_sizes=(50, 200))

    assert other.num_vertices == (50, 200, 2562)
    assert len(cache_files(tmp_path)) == 2


# ----------------------------------------------------------------------------- GraphCMR files


def object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def write_fake_graphcmr(path: Path) -> dict[str, list]:
    """GraphCMR's layout on a 6 → 4 → 3 vertex toy: levels ordered full first, D[i] maps
    level i to i+1, U[i] maps level i+1 back to i, A[i] and F[i] belong to level i."""
    d0 = sp.csc_matrix(np.eye(6)[[0, 2, 3, 5]])  # (4, 6)
    d1 = sp.csc_matrix(np.eye(4)[[0, 1, 3]])  # (3, 4)
    u0 = sp.csc_matrix(
        np.array([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.25, 0.75], [0, 0, 0, 1]])
    )  # (6, 4)
    u1 = sp.csc_matrix(np.array([[1, 0, 0], [0, 1, 0], [0.2, 0.3, 0.5], [0, 0, 1]]))  # (4, 3)
    f0 = np.array([[0, 1, 2], [1, 3, 2], [2, 3, 4], [3, 5, 4]], dtype=np.int32)
    f1 = np.array([[0, 1, 2], [1, 3, 2]], dtype=np.int32)
    f2 = np.array([[0, 1, 2]], dtype=np.int32)
    adjacency = [
        sp.csc_matrix(mesh_adjacency(f, n).numpy().astype(np.float32) - np.eye(n))
        for f, n in ((f0, 6), (f1, 4), (f2, 3))
    ]
    layout = {"A": adjacency, "U": [u0, u1], "D": [d0, d1], "F": [f0, f1, f2]}
    np.savez(path, **{name: object_array(items) for name, items in layout.items()})
    return layout


def test_graphcmr_file_is_read_coarse_first(tmp_path):
    path = tmp_path / "mesh_downsampling.npz"
    layout = write_fake_graphcmr(path)

    pyr = load_graphcmr_downsampling(path)

    assert pyr.num_vertices == (3, 4, 6)
    assert pyr.method == "graphcmr-mesh-downsampling"
    np.testing.assert_allclose(dense(pyr.down[0]), layout["D"][1].toarray())
    np.testing.assert_allclose(dense(pyr.down[1]), layout["D"][0].toarray())
    np.testing.assert_allclose(dense(pyr.up[0]), layout["U"][1].toarray())
    np.testing.assert_allclose(dense(pyr.up[1]), layout["U"][0].toarray())
    np.testing.assert_array_equal(pyr.faces[0].numpy(), layout["F"][2])
    np.testing.assert_array_equal(pyr.faces[2].numpy(), layout["F"][0])
    assert pyr.adjacency.dtype == torch.bool and pyr.adjacency.all()  # one triangle: all joined
    # Full → coarse keeps full vertices 0, 2 and 5. Back up: middle = [0, 2, 0.3*2 + 0.5*5, 5]
    # = [0, 2, 3.1, 5]; full = [0, (0+2)/2, 2, 3.1, 0.25*3.1 + 0.75*5, 5].
    full = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    assert pyr.downsample(full, 0).flatten().tolist() == [0.0, 2.0, 5.0]
    np.testing.assert_allclose(
        pyr.upsample(pyr.downsample(full, 0), 0).flatten().numpy(), [0.0, 1.0, 2.0, 3.1, 4.525, 5.0], rtol=1e-6
    )


def test_graphcmr_file_without_faces_is_refused(tmp_path):
    path = tmp_path / "mesh_downsampling.npz"
    layout = write_fake_graphcmr(path)
    np.savez(path, **{name: object_array(layout[name]) for name in ("A", "U", "D")})

    with pytest.raises(ValueError, match="missing array\\(s\\) 'F'"):
        load_graphcmr_downsampling(path)


def test_graphcmr_file_shaped_like_the_real_one_is_used_as_it_is(tmp_path, caplog):
    """GraphCMR's SMPL file (FastMETRO's): U rows with negative weights summing to 0.83–1.05, an
    unreadable 'M', uint32 faces. It is accepted and its matrices used unchanged; the row-sum
    ranges are logged."""
    import logging

    from pchmr.testing.fake_smpl import write_fake_graphcmr_downsampling

    path = write_fake_graphcmr_downsampling(tmp_path / "mesh_downsampling.npz")
    with np.load(path, allow_pickle=True, encoding="latin1") as data:  # safe: the file this test just wrote
        ups = [sp.csr_matrix(u) for u in data["U"]]
        with pytest.raises(AttributeError, match="MyMesh"):
            data["M"]  # as in the real file: never to be read
    assert [u.shape for u in ups] == [(6890, 1723), (1723, 431)]
    for u in ups:
        sums = np.asarray(u.sum(axis=1)).ravel()
        assert sums.min() == pytest.approx(0.83) and sums.max() == pytest.approx(1.05) and (u.data < 0).any()

    with caplog.at_level(logging.INFO, logger="pchmr.core.kit.pyramid"):
        pyr = load_graphcmr_downsampling(path)

    assert pyr.num_vertices == (431, 1723, 6890) and pyr.method == "graphcmr-mesh-downsampling"
    np.testing.assert_allclose(dense(pyr.up[1]), ups[0].toarray(), atol=1e-6)
    np.testing.assert_allclose(dense(pyr.up[0]), ups[1].toarray(), atol=1e-6)
    assert pyr.faces[2].dtype == torch.int64 and len(pyr.faces[2]) == 13776
    assert "U[0] (6890 × 1723): rows sum to 0.83–1.05" in caplog.text
    middle = sparse_bmm(pyr.up[0], torch.ones(1, 431, 3))
    assert float(middle.min()) == pytest.approx(0.83, abs=1e-5), "rows are applied as they are"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan", r"U\[1\]: holds NaN or infinite weights"),
        ("empty row", r"U\[1\]: row 5 has no weight"),
        ("row sum 2", r"U\[1\]: row 5 sums to 2; rows must sum to about 1, between 0.5 and 1.5"),
        ("transposed", r"U\[1\] must be 4 × 3 .*6 → 4 → 3 vertices.*got 3 × 4"),
        ("dense", r"U\[1\]: expected a SciPy sparse matrix, got ndarray"),
        ("faces", r"F\[1\]: indexes vertices 0..4, the level has 4"),
    ],
    ids=["nan", "empty-row", "row-sum-2", "transposed", "dense", "faces"],
)
def test_graphcmr_file_with_a_broken_matrix_is_refused(tmp_path, change, message):
    path = tmp_path / "mesh_downsampling.npz"
    layout = write_fake_graphcmr(path)
    u1 = layout["U"][1].toarray()
    if change == "nan":
        u1[2, 0] = np.nan
    elif change == "empty row":
        layout["U"][0] = sp.csc_matrix(np.vstack([layout["U"][0].toarray()[:5], np.zeros((1, 4))]))
        message = r"U\[0\]: row 5 has no weight"
    elif change == "row sum 2":
        layout["U"][0] = sp.csc_matrix(layout["U"][0].toarray() * np.array([[1], [1], [1], [1], [1], [2]]))
        message = r"U\[0\]: row 5 sums to 2; rows must sum to about 1, between 0.5 and 1.5"
    elif change == "transposed":
        u1 = u1.T
    elif change == "faces":
        layout["F"][1] = np.array([[0, 1, 4]], dtype=np.uint32)
    layout["U"][1] = u1 if change == "dense" else sp.csc_matrix(u1)
    np.savez(path, **{name: object_array(items) for name, items in layout.items()})

    with pytest.raises(ValueError, match=message):
        load_graphcmr_downsampling(path)


def test_sparse_products_train_under_bf16_autocast():
    """FastMETRO's and TORE's upsampling under ``--precision bf16-mixed``: two levels of sparse
    products between bfloat16 layers run in float32 (sparse products have no bfloat16 backward),
    and the gradients reach the first layer."""
    up_0 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]]).to_sparse()
    up_1 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]]).to_sparse()
    first, last = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse = first(torch.ones(4, 3, 2))  # (B, N, C), bfloat16
        middle = sparse_bmm(up_0, coarse)
        fine = sparse_bmm(up_1, middle)
        loss = last(fine).float().square().sum()  # a bfloat16 layer over the float32 result
    assert coarse.dtype == torch.bfloat16 and middle.dtype == fine.dtype == torch.float32
    assert fine.shape == (4, 4, 2)
    assert torch.allclose(middle, torch.einsum("mn,bnc->bmc", up_0.to_dense(), coarse.float()))
    loss.backward()
    assert first.weight.grad is not None and torch.isfinite(first.weight.grad).all()
