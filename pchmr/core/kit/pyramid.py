"""Build, cache and load the coarse/middle/full mesh pyramid of any triangle-mesh topology.

Method (``MeshPyramid.method == "qem-fast-simplification"``), applied level by level from the
full mesh towards the coarse one (full → ``level_sizes[-1]`` → … → ``level_sizes[0]``):

1. **Clusters.** Only vertices used by a triangle take part (unreferenced vertices and
   faceless leftovers are not carried to the coarser level). The mesh, centred and scaled to
   unit size, is simplified with quadric-error-metric edge collapses by the ``fast-simplification``
   package (Garland & Heckbert QEM, Forstmann's fast variant). We ask for the collapse history,
   and keep the shortest prefix of it that leaves *exactly* the requested number of vertex
   clusters (connected components of the collapsed edges), so level sizes are met exactly.
2. **Coarse vertices.** As in COMA's ``mesh_sampling`` (the method behind GraphCMR's SMPL
   pyramid), every coarse vertex *is* one fine vertex: the member of its cluster that
   minimises the cluster's summed face quadric, plus a small pull to the cluster centroid
   that breaks ties on flat regions. ``down`` is therefore one-hot (a convex combination).
   Coarse vertices are numbered in the order of their fine vertex.
3. **Coarse faces.** The fine triangles with their corners relabelled by cluster, minus
   degenerate triangles and duplicates.
4. **Up matrices.** Every fine vertex (unreferenced ones included) is written as the
   barycentric coordinates of its closest point on the coarse mesh (exact nearest triangle,
   closest point clamped to that triangle), as COMA and GraphCMR do. A coarse level without
   triangles falls back to the nearest coarse vertex.

So ``up @ down`` reproduces each fine vertex by its closest point on the coarse surface, and
every row of every matrix sums to 1. ``adjacency`` is the coarse mesh's edge graph with the
diagonal set. The pyramid is computed once per topology and stored by :func:`cached_pyramid`.

A user's GraphCMR ``mesh_downsampling.npz`` is read instead by :func:`load_graphcmr_downsampling`,
as it is: its upsampling rows (COMA's weights, some negative) sum to 0.83–1.05, not 1.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import fast_simplification
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from pchmr.core.contracts.bodymodel import MeshPyramid
from pchmr.core.kit.safe_pickle import SPARSE_PICKLE, safe_load_npz

__all__ = [
    "DEFAULT_LEVEL_SIZES",
    "GRAPHCMR_METHOD",
    "GRAPHCMR_ROW_SUM_RANGE",
    "PYRAMID_METHOD",
    "PYRAMID_VERSION",
    "build_pyramid",
    "cached_pyramid",
    "load_graphcmr_downsampling",
    "mesh_adjacency",
]

_log = logging.getLogger(__name__)

#: Bump whenever the construction changes: it is part of the cache key.
PYRAMID_VERSION = 1
PYRAMID_METHOD = "qem-fast-simplification"
GRAPHCMR_METHOD = "graphcmr-mesh-downsampling"
#: Arrays of GraphCMR's mesh_downsampling.npz: adjacency, up, down (sparse, per level), faces.
_GRAPHCMR_ARRAYS = ("A", "U", "D", "F")
#: Coarse-first vertex counts of the levels below the full mesh (FastMETRO's SMPL sizes).
DEFAULT_LEVEL_SIZES: tuple[int, ...] = (431, 1723)

#: fast-simplification aggressiveness settings tried in turn (its default is 7): lower keeps
#: the shape better but may stall before reaching a small target.
_SIMPLIFY_AGGRESSION: tuple[float, ...] = (4.0, 7.0, 10.0)
#: Weight of the squared distance to the cluster centroid added to the quadric error when
#: picking a cluster's coarse vertex (unit-size mesh): breaks ties on flat regions.
_CENTROID_PULL = 0.01
#: Decimals kept of the unit-size coordinates the simplifier sees (1e-9 of the mesh size).
_UNIT_DECIMALS = 9
#: Candidate coarse triangles checked per fine vertex before the exactness test.
_NEAREST_TRIANGLE_CANDIDATES = 8
#: Barycentric weights below this are dropped (and the row renormalised) to keep ``up`` sparse.
_MIN_WEIGHT = 1e-6
#: Vertex coordinates are rounded to this many decimals (micrometres) for the cache key.
_HASH_DECIMALS = 6
#: What reading a partial, corrupt or foreign cache file can raise.
_UNREADABLE_CACHE = (OSError, EOFError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile)
#: The row sums a GraphCMR file's ``D``/``U`` rows may have. GraphCMR's own SMPL file (the one
#: FastMETRO ships) has one-hot ``D`` rows and ``U`` rows of COMA's barycentric weights of a
#: projection, some negative, summing to 0.83–1.05; FastMETRO uses them as they are. Outside
#: this band a row does not interpolate (a scaled, transposed or foreign matrix).
GRAPHCMR_ROW_SUM_RANGE = (0.5, 1.5)


def build_pyramid(
    vertices: np.ndarray, faces: np.ndarray, level_sizes: Sequence[int] = DEFAULT_LEVEL_SIZES
) -> MeshPyramid:
    """Build the mesh pyramid of one topology (method: see the module docstring).

    Args:
        vertices: (V, 3) float rest-pose vertices, metres (only the shape matters, not the unit).
        faces: (F, 3) int triangles indexing ``vertices``.
        level_sizes: coarse-first vertex counts of the levels *below* the full mesh, strictly
            increasing, each at most the number of vertices used by a triangle.

    Returns:
        A :class:`MeshPyramid` with ``len(level_sizes) + 1`` levels, the last the full mesh
        (all V vertices, unreferenced ones included, and ``faces`` unchanged).
    """
    points, tris = _check_mesh(vertices, faces)
    sizes = _check_level_sizes(level_sizes)
    level_points, level_faces = [points], [tris]
    downs: list[sp.csr_matrix] = []
    ups: list[sp.csr_matrix] = []
    for target in reversed(sizes):
        fine_points, fine_faces = level_points[-1], level_faces[-1]
        reps, coarse_faces = _simplify_level(fine_points, fine_faces, target)
        coarse_points = fine_points[reps]
        downs.append(_one_hot_rows(reps, len(fine_points)))
        ups.append(_up_matrix(fine_points, coarse_points, coarse_faces))
        level_points.append(coarse_points)
        level_faces.append(coarse_faces)
    level_faces.reverse()
    return MeshPyramid(
        num_vertices=tuple(len(p) for p in reversed(level_points)),
        down=tuple(_to_torch_sparse(m) for m in reversed(downs)),
        up=tuple(_to_torch_sparse(m) for m in reversed(ups)),
        adjacency=mesh_adjacency(level_faces[0], sizes[0]),
        faces=tuple(torch.from_numpy(np.ascontiguousarray(f, dtype=np.int64)) for f in level_faces),
        method=PYRAMID_METHOD,
    )


def cached_pyramid(
    vertices: np.ndarray,
    faces: np.ndarray,
    cache_dir: str | Path,
    level_sizes: Sequence[int] = DEFAULT_LEVEL_SIZES,
) -> MeshPyramid:
    """:func:`build_pyramid`, stored once per topology as ``cache_dir/pyramid-<key>.npz``.

    The key is the SHA-256 of the faces, the vertices rounded to micrometres, the level sizes
    and :data:`PYRAMID_VERSION`. The file is written atomically (temporary file, then
    ``os.replace``); a file that cannot be read back as a valid pyramid of this key is
    rebuilt and overwritten, never trusted.
    """
    points, tris = _check_mesh(vertices, faces)
    sizes = _check_level_sizes(level_sizes)
    key = _cache_key(points, tris, sizes)
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"pyramid-{key[:24]}.npz"
    if path.exists():
        try:
            return _read_cache(path, key)
        except _UNREADABLE_CACHE as exc:  # rebuilt, never trusted
            _log.warning("mesh pyramid cache %s is unusable (%s: %s); rebuilding it", path, type(exc).__name__, exc)
    pyramid = build_pyramid(points, tris, sizes)
    _write_cache(path, key, pyramid)
    return pyramid


def load_graphcmr_downsampling(path: str | Path) -> MeshPyramid:
    """Read GraphCMR's ``mesh_downsampling.npz`` (SMPL: 6890 → 1723 → 431) as a MeshPyramid.

    The file (user-supplied; it is not shipped with pchmr) holds object arrays of SciPy sparse
    matrices ordered from the full mesh down: ``A[i]`` the adjacency of level i, ``D[i]``
    (V_{i+1}, V_i) the downsampling and ``U[i]`` (V_i, V_{i+1}) the upsampling from level i+1
    to i, and ``F[i]`` the faces of level i (GraphCMR's file also has ``M``, pickled psbody
    meshes, which is never read). pchmr orders levels coarse first, so the lists are reversed.
    Its object arrays are unpickled allowing NumPy arrays and SciPy sparse matrices only
    (:func:`~pchmr.core.kit.safe_pickle.safe_load_npz`): a file naming any other class or
    function raises :class:`~pchmr.core.kit.safe_pickle.UnsafeFileError` before it runs.

    The matrices are used as they are, as FastMETRO does: GraphCMR's ``U`` rows are COMA's
    barycentric weights (some negative) summing to 0.83–1.05, not exactly 1. Refused: wrong
    shapes, non-finite weights, a row without weight, and a row summing outside
    :data:`GRAPHCMR_ROW_SUM_RANGE`. The row-sum range of each matrix is logged (INFO).
    """
    path = Path(path)
    try:
        read = safe_load_npz(path, _GRAPHCMR_ARRAYS, what="GraphCMR mesh_downsampling.npz", allowed=SPARSE_PICKLE)
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"cannot read GraphCMR mesh downsampling file {path}: {exc}") from exc
    missing = [name for name in _GRAPHCMR_ARRAYS if name not in read]
    if missing:
        raise ValueError(
            f"{path} is not a GraphCMR mesh_downsampling.npz: missing array(s) "
            f"{', '.join(repr(m) for m in missing)}; expected {', '.join(map(repr, _GRAPHCMR_ARRAYS))}"
        )
    arrays = {name: list(read[name]) for name in _GRAPHCMR_ARRAYS}
    adjacency, ups, downs, faces = arrays["A"], arrays["U"], arrays["D"], arrays["F"]
    levels = len(faces)
    if levels < 2 or len(downs) != levels - 1 or len(ups) != levels - 1:
        raise ValueError(
            f"{path}: expected L face arrays and L-1 'U' and 'D' matrices (L >= 2), got "
            f"{len(faces)} faces, {len(ups)} U and {len(downs)} D"
        )
    down = [_sparse(d, f"{path} D[{i}]") for i, d in enumerate(downs)]
    up = [_sparse(u, f"{path} U[{i}]") for i, u in enumerate(ups)]
    sizes = [int(down[0].shape[1])] + [int(m.shape[0]) for m in down]  # full first, from D
    for i in range(levels - 1):
        expected = {"D": (sizes[i + 1], sizes[i]), "U": (sizes[i], sizes[i + 1])}
        for name, matrix in (("D", down[i]), ("U", up[i])):
            if matrix.shape != expected[name]:
                raise ValueError(
                    f"{path}: {name}[{i}] must be {expected[name][0]} × {expected[name][1]} (levels of "
                    f"{' → '.join(map(str, sizes))} vertices, from D), got {matrix.shape[0]} × {matrix.shape[1]}"
                )
    for name, matrices in (("D", down), ("U", up)):
        for i, matrix in enumerate(matrices):
            low, high = _checked_rows(matrix, f"{path} {name}[{i}]")
            negative = int((matrix.data < 0).sum())
            _log.info(
                "%s %s[%d] (%d × %d): rows sum to %.4g–%.4g, %d negative weights; used as they are",
                path.name, name, i, *matrix.shape, low, high, negative,
            )  # fmt: skip
    level_faces = [_faces(f, n, f"{path} F[{i}]") for i, (f, n) in enumerate(zip(faces, sizes))]
    coarse_adjacency = sp.csr_matrix(adjacency[-1]) if adjacency else None
    if coarse_adjacency is None or coarse_adjacency.shape != (sizes[-1], sizes[-1]):
        raise ValueError(f"{path}: the last 'A' entry must be the ({sizes[-1]}, {sizes[-1]}) coarse adjacency")
    dense = torch.from_numpy(coarse_adjacency.toarray() != 0)
    dense = dense | dense.T | torch.eye(sizes[-1], dtype=torch.bool)
    return MeshPyramid(
        num_vertices=tuple(reversed(sizes)),
        down=tuple(_to_torch_sparse(m) for m in reversed(down)),
        up=tuple(_to_torch_sparse(m) for m in reversed(up)),
        adjacency=dense,
        faces=tuple(reversed(level_faces)),
        method=GRAPHCMR_METHOD,
    )


def _sparse(matrix: object, what: str) -> sp.csr_matrix:
    """A GraphCMR matrix as CSR float64, or a ValueError naming it."""
    if not sp.issparse(matrix):
        raise ValueError(f"{what}: expected a SciPy sparse matrix, got {type(matrix).__name__}")
    return sp.csr_matrix(matrix, dtype=np.float64)


def _faces(faces: object, num_vertices: int, what: str) -> torch.Tensor:
    """A GraphCMR level's (F, 3) faces (GraphCMR stores uint32) as int64, indices checked."""
    tris = np.asarray(faces)
    if tris.ndim != 2 or tris.shape[1] != 3 or not np.issubdtype(tris.dtype, np.integer):
        raise ValueError(f"{what}: expected (F, 3) integer triangles, got shape {tris.shape} dtype {tris.dtype}")
    tris = tris.astype(np.int64)
    if tris.size and (tris.min() < 0 or tris.max() >= num_vertices):
        raise ValueError(f"{what}: indexes vertices {tris.min()}..{tris.max()}, the level has {num_vertices}")
    return torch.from_numpy(tris)


def mesh_adjacency(faces: np.ndarray | torch.Tensor, num_vertices: int) -> torch.Tensor:
    """(num_vertices, num_vertices) bool, symmetric, diagonal set: True where an edge of a
    triangle of ``faces`` (F, 3) joins the two vertices."""
    tris = np.asarray(faces.cpu() if isinstance(faces, torch.Tensor) else faces, dtype=np.int64)
    if tris.size and (tris.ndim != 2 or tris.shape[1] != 3):
        raise ValueError(f"faces must be (F, 3) triangles, got shape {tris.shape}")
    tris = tris.reshape(-1, 3)
    if tris.size and (tris.min() < 0 or tris.max() >= num_vertices):
        raise ValueError(f"faces index vertices {tris.min()}..{tris.max()}, outside 0..{num_vertices - 1}")
    adjacency = np.eye(num_vertices, dtype=bool)
    for a, b in ((0, 1), (1, 2), (2, 0)):
        adjacency[tris[:, a], tris[:, b]] = True
        adjacency[tris[:, b], tris[:, a]] = True
    return torch.from_numpy(adjacency)


# --------------------------------------------------------------------------- input checks


def _check_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (V, 3) vertices and int64 (F, 3) faces."""
    points = np.asarray(vertices.detach().cpu() if isinstance(vertices, torch.Tensor) else vertices, dtype=np.float64)
    tris = np.asarray(faces.detach().cpu() if isinstance(faces, torch.Tensor) else faces)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"vertices must be a non-empty (V, 3) array, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("vertices contain NaN or infinite coordinates")
    if tris.ndim != 2 or tris.shape[1] != 3 or len(tris) == 0:
        raise ValueError(f"faces must be a non-empty (F, 3) array of triangles, got shape {tris.shape}")
    if not np.issubdtype(tris.dtype, np.integer):
        raise ValueError(f"faces must hold integer vertex indices, got dtype {tris.dtype}")
    tris = tris.astype(np.int64)
    if tris.min() < 0 or tris.max() >= len(points):
        raise ValueError(f"faces index vertices {tris.min()}..{tris.max()}, but there are {len(points)} vertices")
    return np.ascontiguousarray(points), np.ascontiguousarray(tris)


def _check_level_sizes(level_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in level_sizes)
    if not sizes or any(s < 3 for s in sizes) or any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(
            f"level_sizes must be coarse-first, strictly increasing vertex counts of at least 3 "
            f"(without the full level), e.g. (431, 1723); got {tuple(level_sizes)}"
        )
    return sizes


# --------------------------------------------------------------------------- simplification


def _simplify_level(points: np.ndarray, faces: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the vertices used by ``faces`` into exactly ``target`` groups.

    Returns ``reps`` (target,) ascending fine-vertex indices, one per coarse vertex, and the
    coarse faces (F_c, 3) indexing ``reps``.
    """
    used = np.unique(faces)
    if target > len(used):
        raise ValueError(
            f"cannot simplify to {target} vertices: the finer level has only {len(used)} vertices "
            "on triangles; choose smaller level_sizes"
        )
    local = np.full(len(points), -1, dtype=np.int64)
    local[used] = np.arange(len(used))
    local_faces = local[faces]
    unit = _unit_scale(points[used])
    collapses = _collapse_history(unit, local_faces, len(used) - target)
    labels = _cluster_labels(len(used), collapses, target)
    reps_local = _representatives(unit, local_faces, labels, target)
    order = np.argsort(reps_local, kind="stable")
    relabel = np.empty(target, dtype=np.int64)
    relabel[order] = np.arange(target)
    coarse_faces = _coarse_faces(relabel[labels][local_faces])
    return used[reps_local[order]], coarse_faces


def _unit_scale(points: np.ndarray) -> np.ndarray:
    """Centre on the bounding box and scale its largest half-extent to 1, so that
    fast-simplification's absolute error thresholds act the same for any unit or position;
    rounded so that float noise from a translation or rescaling cannot flip a tied collapse."""
    low, high = points.min(axis=0), points.max(axis=0)
    half = float((high - low).max()) / 2.0
    unit = (points - (low + high) / 2.0) / (half if half > 0 else 1.0)
    return np.round(unit, _UNIT_DECIMALS) + 0.0


def _collapse_history(points: np.ndarray, faces: np.ndarray, needed: int) -> np.ndarray:
    """(C, 2) QEM edge collapses, C >= ``needed``, in the order fast-simplification made them.

    fast-simplification's collapse order does not depend on its target (a run to fewer
    triangles extends the history of a run to more), so one run to zero triangles gives the
    longest history; a more aggressive setting is tried only if the careful one stalls.
    """
    if needed == 0:
        return np.zeros((0, 2), dtype=np.int64)
    longest = 0
    for aggression in _SIMPLIFY_AGGRESSION:
        _, _, history = fast_simplification.simplify(
            points, faces, target_count=0, agg=aggression, return_collapses=True
        )
        if len(history) >= needed:
            return np.asarray(history, dtype=np.int64)
        longest = max(longest, len(history))
    raise ValueError(
        f"QEM simplification removed at most {longest} of the {needed} vertices needed to reach "
        f"{len(points) - needed} vertices; choose larger level_sizes"
    )


def _cluster_labels(n_points: int, collapses: np.ndarray, target: int) -> np.ndarray:
    """(n_points,) cluster id in [0, target) after the shortest collapse prefix that leaves
    exactly ``target`` clusters (each collapse merges at most two clusters, so one exists)."""

    def components(prefix: int) -> tuple[int, np.ndarray]:
        edges = collapses[:prefix]
        graph = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n_points, n_points))
        return connected_components(graph, directed=False)

    low, high = 0, len(collapses)
    if components(high)[0] > target:
        raise ValueError(f"the collapse history cannot reduce {n_points} vertices to {target}")
    while low < high:  # smallest prefix with at most `target` clusters
        mid = (low + high) // 2
        if components(mid)[0] <= target:
            high = mid
        else:
            low = mid + 1
    count, labels = components(low)
    if count != target:
        raise RuntimeError(f"collapse prefix gave {count} clusters instead of {target}")
    return labels.astype(np.int64)


def _representatives(points: np.ndarray, faces: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """(count,) the member of each cluster with the least summed-quadric error (+ centroid pull)."""
    n = len(points)
    corners = points[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    unit_normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    planes = np.concatenate([unit_normals, -(unit_normals * corners[:, 0]).sum(axis=1, keepdims=True)], axis=1)
    face_quadrics = (planes[:, :, None] * planes[:, None, :]).reshape(-1, 16)
    rows = faces.ravel()
    cols = np.repeat(np.arange(len(faces)), 3)
    incidence = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, len(faces)))
    membership = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(count, n))
    cluster_quadrics = membership @ (incidence @ face_quadrics)
    sizes = np.asarray(membership.sum(axis=1)).ravel()
    centroids = (membership @ points) / sizes[:, None]
    homogeneous = np.concatenate([points, np.ones((n, 1))], axis=1)
    quadric = cluster_quadrics[labels].reshape(n, 4, 4)
    error = np.einsum("ni,nij,nj->n", homogeneous, quadric, homogeneous)
    score = error + _CENTROID_PULL * ((points - centroids[labels]) ** 2).sum(axis=1)
    order = np.lexsort((score, labels))
    first = np.searchsorted(labels[order], np.arange(count))
    return order[first]


def _coarse_faces(relabelled: np.ndarray) -> np.ndarray:
    """Drop degenerate and duplicate triangles (keeping the first one's orientation)."""
    a, b, c = relabelled.T
    kept = relabelled[(a != b) & (b != c) & (c != a)]
    if len(kept) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    _, first = np.unique(np.sort(kept, axis=1), axis=0, return_index=True)
    return kept[np.sort(first)]


def _one_hot_rows(columns: np.ndarray, width: int) -> sp.csr_matrix:
    """(len(columns), width) selection matrix: row i has a 1 in column ``columns[i]``."""
    rows = np.arange(len(columns))
    return sp.csr_matrix((np.ones(len(columns)), (rows, columns)), shape=(len(columns), width))


# --------------------------------------------------------------------------- up-sampling


def _up_matrix(fine: np.ndarray, coarse: np.ndarray, coarse_faces: np.ndarray) -> sp.csr_matrix:
    """(V_fine, V_coarse): barycentric weights of each fine vertex's closest coarse-surface point."""
    n_fine = len(fine)
    if len(coarse_faces) == 0:
        _, nearest = cKDTree(coarse).query(fine)
        return _one_hot_rows(np.asarray(nearest, dtype=np.int64), len(coarse))
    face_index, weights = _closest_triangles(fine, coarse, coarse_faces)
    weights = np.where(weights < _MIN_WEIGHT, 0.0, weights)
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(n_fine), 3)
    matrix = sp.csr_matrix((weights.ravel(), (rows, coarse_faces[face_index].ravel())), shape=(n_fine, len(coarse)))
    matrix.eliminate_zeros()
    return matrix


def _closest_triangles(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point (N, 3): the index of the nearest triangle and the (N, 3) barycentric
    coordinates of the closest point on it.

    Exact: the nearest-centroid candidates give an upper bound d on the distance; a triangle
    with centroid c and bounding radius r can only be closer if |p - c| < d + r. Triangles are
    grouped by radius (powers of two) so each group is searched with a tight ball.
    """
    corners = vertices[faces]
    centroids = corners.mean(axis=1)
    radii = np.linalg.norm(corners - centroids[:, None], axis=2).max(axis=1)
    k = min(_NEAREST_TRIANGLE_CANDIDATES, len(faces))
    _, candidates = cKDTree(centroids).query(points, k=k)
    best, dist2, bary = _best_of_candidates(points, corners, np.asarray(candidates).reshape(len(points), k))
    reach = np.sqrt(dist2)
    groups = np.floor(np.log2(np.maximum(radii, 1e-12))).astype(np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        neighbours = cKDTree(centroids[members]).query_ball_point(points, reach + radii[members].max())
        counts = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=len(points))
        if counts.sum() == 0:
            continue
        owner = np.repeat(np.arange(len(points)), counts)
        flat = members[np.concatenate([np.asarray(n, dtype=np.int64) for n in neighbours if n])]
        pair_dist2, pair_bary = _closest_on_triangles(points[owner], corners[flat])
        order = np.lexsort((pair_dist2, owner))
        has = np.flatnonzero(counts)
        first = order[np.searchsorted(owner[order], has)]
        better = pair_dist2[first] < dist2[has]
        chosen, winners = has[better], first[better]
        best[chosen], dist2[chosen], bary[chosen] = flat[winners], pair_dist2[winners], pair_bary[winners]
    return best, bary


def _best_of_candidates(
    points: np.ndarray, corners: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest of the (N, K) candidate triangles per point: index, squared distance, barycentrics."""
    n, k = candidates.shape
    dist2, bary = _closest_on_triangles(np.repeat(points, k, axis=0), corners[candidates.ravel()])
    dist2, bary = dist2.reshape(n, k), bary.reshape(n, k, 3)
    pick = dist2.argmin(axis=1)
    rows = np.arange(n)
    return candidates[rows, pick], dist2[rows, pick], bary[rows, pick]


def _closest_on_triangles(points: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of triangle ``corners[i]`` (M, 3, 3) to ``points[i]`` (M, 3): squared
    distance (M,) and barycentric coordinates (M, 3), all >= 0 and summing to 1. The interior
    projection is used when it falls inside a non-degenerate triangle, else the nearest edge."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    e0, e1, w = b - a, c - a, points - a
    d00, d01, d11 = (e0 * e0).sum(1), (e0 * e1).sum(1), (e1 * e1).sum(1)
    d20, d21 = (w * e0).sum(1), (w * e1).sum(1)
    det = d00 * d11 - d01 * d01
    ok = det > 1e-12 * d00 * d11
    safe = np.where(ok, det, 1.0)
    v, t = (d11 * d20 - d01 * d21) / safe, (d00 * d21 - d01 * d20) / safe
    inside_bary = np.stack([1.0 - v - t, v, t], axis=1)
    inside = ok & (inside_bary >= 0).all(axis=1)
    projection = a + v[:, None] * e0 + t[:, None] * e1
    best_d2 = np.where(inside, ((points - projection) ** 2).sum(1), np.inf)
    best_bary = np.where(inside[:, None], inside_bary, 0.0)
    for start, end in ((0, 1), (1, 2), (2, 0)):
        s0, s1 = corners[:, start], corners[:, end]
        edge = s1 - s0
        length2 = (edge * edge).sum(1)
        along = np.clip(((points - s0) * edge).sum(1) / np.where(length2 > 0, length2, 1.0), 0.0, 1.0)
        d2 = ((points - s0 - along[:, None] * edge) ** 2).sum(1)
        better = d2 < best_d2
        edge_bary = np.zeros_like(best_bary)
        edge_bary[:, start], edge_bary[:, end] = 1.0 - along, along
        best_d2 = np.where(better, d2, best_d2)
        best_bary = np.where(better[:, None], edge_bary, best_bary)
    return best_d2, best_bary


# --------------------------------------------------------------------------- conversion, cache


def _to_torch_sparse(matrix: sp.spmatrix) -> torch.Tensor:
    """SciPy sparse → coalesced torch sparse COO float32."""
    coo = sp.coo_matrix(matrix)
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()


def _checked_rows(matrix: sp.csr_matrix, what: str) -> tuple[float, float]:
    """The (lowest, highest) row sum of a GraphCMR matrix; a ValueError names a non-finite
    weight, a row without weight or a row summing outside :data:`GRAPHCMR_ROW_SUM_RANGE`."""
    if not np.isfinite(matrix.data).all():
        raise ValueError(f"{what}: holds NaN or infinite weights; expected finite interpolation weights")
    if matrix.shape[0] == 0:
        return 1.0, 1.0
    weight = np.asarray(abs(matrix).sum(axis=1)).ravel()
    if (weight == 0).any():
        row = int(np.argmax(weight == 0))
        raise ValueError(f"{what}: row {row} has no weight; every row must interpolate from at least one vertex")
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    low, high = GRAPHCMR_ROW_SUM_RANGE
    outside = (sums < low) | (sums > high)
    if outside.any():
        row = int(np.argmax(outside))
        raise ValueError(
            f"{what}: row {row} sums to {sums[row]:.4g}; rows must sum to about 1, between {low} and {high} "
            "(GraphCMR's own SMPL file: 0.83–1.05)"
        )
    return float(sums.min()), float(sums.max())


def _cache_key(points: np.ndarray, faces: np.ndarray, sizes: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(faces, dtype=np.int64).tobytes())
    digest.update((np.round(points, _HASH_DECIMALS) + 0.0).astype(np.float64).tobytes())
    digest.update(repr(sizes).encode())
    digest.update(f"pyramid-v{PYRAMID_VERSION}".encode())
    return digest.hexdigest()


def _write_cache(path: Path, key: str, pyramid: MeshPyramid) -> None:
    arrays: dict[str, np.ndarray] = {
        "key": np.array(key),
        "method": np.array(pyramid.method),
        "num_vertices": np.array(pyramid.num_vertices, dtype=np.int64),
        "adjacency": pyramid.adjacency.numpy(),
    }
    for level, faces in enumerate(pyramid.faces):
        arrays[f"faces_{level}"] = faces.numpy()
    for name, matrices in (("down", pyramid.down), ("up", pyramid.up)):
        for level, matrix in enumerate(matrices):
            arrays[f"{name}_{level}_indices"] = matrix.indices().numpy()
            arrays[f"{name}_{level}_values"] = matrix.values().numpy()
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez_compressed(stream, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, key: str) -> MeshPyramid:
    with np.load(path, allow_pickle=False) as data:
        if str(data["key"]) != key:
            raise ValueError(f"stored key {str(data['key'])[:12]}… differs from {key[:12]}…")
        sizes = tuple(int(n) for n in data["num_vertices"])
        matrices: dict[str, list[torch.Tensor]] = {"down": [], "up": []}
        for level in range(len(sizes) - 1):
            coarse, fine = sizes[level], sizes[level + 1]
            for name, shape in (("down", (coarse, fine)), ("up", (fine, coarse))):
                indices = torch.from_numpy(data[f"{name}_{level}_indices"].astype(np.int64))
                values = torch.from_numpy(data[f"{name}_{level}_values"].astype(np.float32))
                matrix = torch.sparse_coo_tensor(indices, values, shape, check_invariants=True).coalesce()
                row_sums = torch.sparse.sum(matrix, dim=1).to_dense()
                if len(row_sums) != shape[0] or not torch.allclose(row_sums, torch.ones(shape[0]), atol=1e-4):
                    raise ValueError(f"{name}[{level}] rows do not all sum to 1")
                matrices[name].append(matrix)
        faces = tuple(torch.from_numpy(data[f"faces_{level}"].astype(np.int64)) for level in range(len(sizes)))
        adjacency = torch.from_numpy(data["adjacency"].astype(bool))
        method = str(data["method"])
    return MeshPyramid(
        num_vertices=sizes,
        down=tuple(matrices["down"]),
        up=tuple(matrices["up"]),
        adjacency=adjacency,
        faces=faces,
        method=method,
    )
