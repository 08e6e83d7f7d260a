"""Fake SMPL model files: SMPL's exact pickle layout with made-up values, for tests and demos.

SMPL's own files are licence-restricted (https://smpl.is.tue.mpg.de, registration required)
and never ship with pchmr. :func:`write_fake_smpl` writes a pickle that a real SMPL loader
(``smplx.SMPL(model_path=...)``, pchmr's ``smpl`` body model) reads exactly like the real
``basicmodel_*_lbs_10_207_0_v1.*.pkl`` / ``SMPL_<GENDER>.pkl`` files:

==================== =============================== =========================================
key                  type, shape                     fake content
==================== =============================== =========================================
``v_template``       float64 (6890, 3)               a closed 1.7 m ellipsoid, y up, feet at
                                                     y ≈ -1.15 (SMPL's rest frame: y up, the
                                                     body facing +z, its left side at +x)
``f``                uint32 (13776, 3)               a genus-0 latitude/longitude tessellation:
                                                     82 rings of 84 vertices plus 2 poles, so
                                                     V = 6890 and F = 2V - 4 = 13776 (SMPL's
                                                     counts), outward-oriented
``shapedirs``        float64 (6890, 3, 10)           beta 0 scales the body, beta 1 its girth,
                                                     the rest are small random fields
``posedirs``         float64 (6890, 3, 207)          small random corrective offsets
``J_regressor``      scipy.sparse.csc (24, 6890)     non-negative rows summing to 1 over the
                                                     vertices around each joint target
``J_regressor_prior`` same                           same as ``J_regressor``
``J``                float64 (24, 3)                 ``J_regressor @ v_template``
``weights``          float64 (6890, 24)              each vertex skinned to its 4 nearest
                                                     joints, rows summing to 1
``weights_prior``    same                            same as ``weights``
``kintree_table``    uint32 (2, 24)                  SMPL's real kinematic tree (row 0: parents,
                                                     the root's stored as 2**32 - 1; row 1: ids)
``vert_sym_idxs``    int64 (6890,)                   the mirror (x → -x) of every vertex
``bs_style``         str                             ``'lbs'``
``bs_type``          str                             ``'lrotmin'``
``pose_training_info`` dict (6 entries)              placeholder values (real files describe
                                                     their training set here; no loader reads it)
==================== =============================== =========================================

Real v1.0.0 files store ``v_template``, ``weights``, ``posedirs`` and ``shapedirs`` as chumpy
``Ch`` objects (``chumpy.ch.Ch``, the array in its ``x`` attribute); ``chumpy=True`` writes them
that way (without needing chumpy installed) so that loaders can be tested on that layout.
"""

from __future__ import annotations

import contextlib
import copyreg
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

__all__ = [
    "FAKE_SMPL_FILE_NAMES",
    "NUM_SMPL_FACES",
    "NUM_SMPL_JOINTS",
    "NUM_SMPL_VERTICES",
    "SMPL_PARENTS",
    "fake_smpl_data",
    "fake_smpl_mesh",
    "write_fake_graphcmr_downsampling",
    "write_fake_h36m_regressor",
    "write_fake_smpl",
]

NUM_SMPL_VERTICES = 6890
NUM_SMPL_FACES = 13776
NUM_SMPL_JOINTS = 24
NUM_SMPL_BETAS = 10
NUM_POSE_BASIS = 9 * (NUM_SMPL_JOINTS - 1)  # 207: one 3×3 rotation minus identity per non-root joint
#: SMPL's kinematic tree: the parent of each of its 24 joints (-1 for the pelvis).
SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)
#: What SMPL's pickles store as the root's parent in ``kintree_table`` (uint32 of -1).
ROOT_PARENT_UINT32 = 2**32 - 1
#: The file name :func:`write_fake_smpl` uses per gender (smplx's own naming).
FAKE_SMPL_FILE_NAMES = {"neutral": "SMPL_NEUTRAL.pkl", "male": "SMPL_MALE.pkl", "female": "SMPL_FEMALE.pkl"}

#: Tessellation: rings of constant latitude between the poles and vertices per ring
#: (2 + 82 · 84 = 6890 vertices; 2 · 82 · 84 = 13776 triangles).
_RINGS, _SEGMENTS = 82, 84
#: Ellipsoid half-extents (x, y, z) and centre height, metres: 50 cm wide, 1.7 m tall, 28 cm deep,
#: feet at y = -1.15 as in SMPL's template.
_HALF_EXTENTS = (0.25, 0.85, 0.14)
_CENTRE_Y = -0.30
#: Rest positions (x, y) of SMPL's 24 joints on the fake body, metres (z = 0): left at +x, arms
#: hanging along the ellipsoid's sides.
_JOINT_TARGETS_XY = (
    (0.0, -0.22), (0.07, -0.31), (-0.07, -0.31), (0.0, -0.10), (0.09, -0.70), (-0.09, -0.70),
    (0.0, 0.03), (0.06, -1.05), (-0.06, -1.05), (0.0, 0.10), (0.05, -1.10), (-0.05, -1.10),
    (0.0, 0.29), (0.07, 0.22), (-0.07, 0.22), (0.0, 0.42), (0.16, 0.20), (-0.16, 0.20),
    (0.20, -0.02), (-0.20, -0.02), (0.21, -0.28), (-0.21, -0.28), (0.21, -0.36), (-0.21, -0.36),
)  # fmt: skip
#: Joints whose regressor also looks at z, and their z (metres): the feet (SMPL joints 10, 11,
#: at the ball of the foot) lie in front of the ankles, as on a body facing +z.
_JOINT_TARGETS_Z = {10: 0.08, 11: 0.08}
#: Width (metres) of the slab kernel picking the vertices a joint is regressed from.
_REGRESSOR_WIDTH_M = 0.05
_REGRESSOR_CUTOFF = 1e-2
#: Skinning: joints per vertex and the width (metres) of the distance softmax.
_SKIN_JOINTS = 4
_SKIN_WIDTH_M = 0.12
#: Scale of the random shape fields (beta ≥ 2) and pose correctives, metres.
_SHAPE_NOISE_M = 0.004
_POSE_NOISE_M = 0.001
#: Per unit beta: relative change of the whole body (beta 0) and of its girth (beta 1).
_BETA_SCALE = 0.05

#: GraphCMR's SMPL pyramid sizes, full mesh first (its file's order).
GRAPHCMR_SIZES = (NUM_SMPL_VERTICES, 1723, 431)


# --------------------------------------------------------------------------- the mesh


def fake_smpl_mesh() -> tuple[np.ndarray, np.ndarray]:
    """The fake template: (6890, 3) float64 vertices (metres, y up) and (13776, 3) uint32
    outward-oriented triangles of a closed latitude/longitude ellipsoid."""
    theta = np.pi * np.arange(1, _RINGS + 1) / (_RINGS + 1)  # polar angle from the top
    phi = 2.0 * np.pi * np.arange(_SEGMENTS) / _SEGMENTS  # phi = 0 points to +x
    t, p = np.meshgrid(theta, phi, indexing="ij")
    unit = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], axis=-1).reshape(-1, 3)
    unit = np.concatenate([[[0.0, 1.0, 0.0]], unit, [[0.0, -1.0, 0.0]]])
    vertices = unit * np.array(_HALF_EXTENTS) + np.array([0.0, _CENTRE_Y, 0.0])

    top, bottom = 0, len(unit) - 1
    ring = lambda i: 1 + i * _SEGMENTS + np.arange(_SEGMENTS)  # noqa: E731
    nxt = lambda i: 1 + i * _SEGMENTS + (np.arange(_SEGMENTS) + 1) % _SEGMENTS  # noqa: E731
    faces = [np.stack([np.full(_SEGMENTS, top), ring(0), nxt(0)], axis=1)]
    for i in range(_RINGS - 1):
        a, b, c, d = ring(i), nxt(i), ring(i + 1), nxt(i + 1)
        faces += [np.stack([a, c, b], axis=1), np.stack([b, c, d], axis=1)]
    faces.append(np.stack([np.full(_SEGMENTS, bottom), nxt(_RINGS - 1), ring(_RINGS - 1)], axis=1))
    tris = np.concatenate(faces)
    return vertices, _orient_outward(unit, tris).astype(np.uint32)


def _orient_outward(unit: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Flip the triangles whose normal points towards the centre of the unit sphere."""
    a, b, c = unit[faces[:, 0]], unit[faces[:, 1]], unit[faces[:, 2]]
    inward = (np.cross(b - a, c - a) * (a + b + c)).sum(axis=1) < 0
    out = faces.copy()
    out[inward] = faces[inward][:, [0, 2, 1]]
    return out


def _mirror_indices() -> np.ndarray:
    """(6890,) index of each vertex's mirror under x → -x (phi → pi - phi)."""
    k = np.arange(_SEGMENTS)
    mirrored_k = (_SEGMENTS // 2 - k) % _SEGMENTS
    rings = 1 + np.arange(_RINGS)[:, None] * _SEGMENTS + mirrored_k[None]
    return np.concatenate([[0], rings.ravel(), [NUM_SMPL_VERTICES - 1]]).astype(np.int64)


def _joint_regressor(vertices: np.ndarray) -> sp.csc_matrix:
    """(24, 6890) rows of a slab kernel around each joint's (x, y): the vertices nearest in x
    and y, front and back alike, so each joint lands inside the body at z ≈ 0 (the feet, see
    :data:`_JOINT_TARGETS_Z`, also weigh z and land in front)."""
    targets = np.array(_JOINT_TARGETS_XY)
    d2 = (vertices[None, :, 0] - targets[:, None, 0]) ** 2 + (vertices[None, :, 1] - targets[:, None, 1]) ** 2
    for joint, z in _JOINT_TARGETS_Z.items():
        d2[joint] += (vertices[:, 2] - z) ** 2
    weights = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / _REGRESSOR_WIDTH_M**2)
    weights[weights < _REGRESSOR_CUTOFF] = 0.0
    return sp.csc_matrix(weights / weights.sum(axis=1, keepdims=True))


def _skinning_weights(vertices: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """(6890, 24): a softmax of -distance² over each vertex's 4 nearest joints."""
    d2 = ((vertices[:, None] - joints[None]) ** 2).sum(axis=2)
    nearest = np.argsort(d2, axis=1)[:, :_SKIN_JOINTS]
    rows = np.arange(len(vertices))[:, None]
    logits = -(d2[rows, nearest] - d2[rows, nearest[:, :1]]) / _SKIN_WIDTH_M**2
    weights = np.zeros_like(d2)
    weights[rows, nearest] = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def _shape_dirs(vertices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    centre = np.array([0.0, _CENTRE_Y, 0.0])
    dirs = _SHAPE_NOISE_M * rng.standard_normal((NUM_SMPL_VERTICES, 3, NUM_SMPL_BETAS))
    dirs[:, :, 0] = _BETA_SCALE * (vertices - centre)
    dirs[:, :, 1] = _BETA_SCALE * (vertices - centre) * np.array([1.0, 0.0, 1.0])
    return dirs


def fake_smpl_data(gender: str = "neutral", seed: int = 0) -> dict[str, object]:
    """The dictionary :func:`write_fake_smpl` pickles (plain numpy / SciPy values)."""
    if gender not in FAKE_SMPL_FILE_NAMES:
        raise ValueError(f"gender must be one of {sorted(FAKE_SMPL_FILE_NAMES)}, got {gender!r}")
    rng = np.random.default_rng(seed)
    vertices, faces = fake_smpl_mesh()
    regressor = _joint_regressor(vertices)
    joints = np.asarray(regressor @ vertices)
    weights = _skinning_weights(vertices, joints)
    kintree = np.array([SMPL_PARENTS, range(NUM_SMPL_JOINTS)], dtype=np.int64)
    kintree[0, 0] = ROOT_PARENT_UINT32
    return {
        "v_template": vertices,
        "f": faces,
        "shapedirs": _shape_dirs(vertices, rng),
        "posedirs": _POSE_NOISE_M * rng.standard_normal((NUM_SMPL_VERTICES, 3, NUM_POSE_BASIS)),
        "J_regressor": regressor,
        "J_regressor_prior": regressor.copy(),
        "J": joints,
        "weights": weights,
        "weights_prior": weights.copy(),
        "kintree_table": kintree.astype(np.uint32),
        "vert_sym_idxs": _mirror_indices(),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "pose_training_info": {
            "source": "pchmr fake SMPL (not SMPL: made-up values)",
            "gender": gender,
            "seed": seed,
            "num_vertices": NUM_SMPL_VERTICES,
            "num_joints": NUM_SMPL_JOINTS,
            "num_betas": NUM_SMPL_BETAS,
        },
    }


# --------------------------------------------------------------------------- writing


def write_fake_smpl(
    directory: str | Path, gender: str = "neutral", seed: int = 0, *, file_name: str | None = None, chumpy: bool = False
) -> Path:
    """Write a fake SMPL model file into ``directory`` and return its path.

    Args:
        directory: created if missing.
        gender: ``neutral``, ``male`` or ``female``; picks the default file name
            (:data:`FAKE_SMPL_FILE_NAMES`, e.g. ``SMPL_NEUTRAL.pkl``) and is recorded in the file.
        seed: seeds the random shape and pose fields (the mesh and joints do not depend on it).
        file_name: another name, e.g. ``basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl``.
        chumpy: store ``v_template``, ``weights``, ``posedirs`` and ``shapedirs`` as chumpy
            ``Ch`` objects, as SMPL's v1.0.0 files do (chumpy need not be installed).

    The pickle uses protocol 2 (SMPL's files were written by Python 2); pchmr reads it, as it reads
    the real files, through ``pchmr.core.kit.safe_pickle.safe_load`` (latin-1, allowlisted types only).
    """
    data = fake_smpl_data(gender, seed)
    path = Path(directory) / (file_name or FAKE_SMPL_FILE_NAMES[gender])
    path.parent.mkdir(parents=True, exist_ok=True)
    if chumpy:
        with _chumpy_stand_in() as ch_class:
            for key in ("v_template", "weights", "posedirs", "shapedirs"):
                data[key] = ch_class(data[key])
            with path.open("wb") as stream:
                pickle.dump(data, stream, protocol=2)
    else:
        with path.open("wb") as stream:
            pickle.dump(data, stream, protocol=2)
    return path


@contextlib.contextmanager
def _chumpy_stand_in() -> Iterator[type]:
    """A class pickled as ``chumpy.ch.Ch`` with chumpy's state layout (``x`` holds the array),
    importable as such only inside this context (pickle checks that the name resolves)."""
    saved = {name: sys.modules.get(name) for name in ("chumpy", "chumpy.ch")}
    package, module = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x: np.ndarray) -> None:
            self.x = np.asarray(x)

        def __reduce_ex__(self, protocol: int) -> tuple[object, ...]:
            state = {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
                     "_make_dense": False, "_make_sparse": False}  # fmt: skip
            return copyreg.__newobj__, (type(self),), state

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    module.Ch = Ch  # type: ignore[attr-defined]
    package.ch = module  # type: ignore[attr-defined]
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = package, module
    try:
        yield Ch
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def write_fake_h36m_regressor(directory: str | Path, seed: int = 0) -> Path:
    """Write ``J_regressor_h36m.npy``: a (17, 6890) float64 regressor in Human3.6M's joint order
    (pelvis, right hip/knee/ankle, left hip/knee/ankle, spine, thorax, nose, head top, left
    shoulder/elbow/wrist, right shoulder/elbow/wrist), rows summing to 1, built on the fake mesh.
    ``seed`` jitters the joint targets by up to 1 cm."""
    rng = np.random.default_rng(seed)
    vertices, _ = fake_smpl_mesh()
    smpl_targets = np.array(_JOINT_TARGETS_XY)
    # H36M joint → fake-mesh (x, y) target, from SMPL's joints where they coincide.
    from_smpl = {0: 0, 1: 2, 2: 5, 3: 8, 4: 1, 5: 4, 6: 7, 7: 6, 8: 12, 11: 16, 12: 18, 13: 20, 14: 17, 15: 19, 16: 21}
    targets = np.zeros((17, 2))
    for h36m, smpl in from_smpl.items():
        targets[h36m] = smpl_targets[smpl]
    targets[9] = (0.0, 0.45)  # nose
    targets[10] = (0.0, 0.52)  # head top
    targets += rng.uniform(-0.01, 0.01, targets.shape)
    d2 = ((vertices[None, :, :2] - targets[:, None]) ** 2).sum(axis=2)
    weights = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / _REGRESSOR_WIDTH_M**2)
    weights[weights < _REGRESSOR_CUTOFF] = 0.0
    path = Path(directory) / "J_regressor_h36m.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, weights / weights.sum(axis=1, keepdims=True))
    return path


def write_fake_graphcmr_downsampling(path: str | Path, sizes: tuple[int, ...] = GRAPHCMR_SIZES, seed: int = 0) -> Path:
    """Write a file in the layout of GraphCMR's ``mesh_downsampling.npz`` (full mesh first),
    the one FastMETRO ships for SMPL: object arrays ``A`` (per-level adjacency, symmetric, every
    edge stored as 2.0, zero diagonal), ``D`` ((V_{i+1}, V_i) one-hot downsampling), ``U``
    ((V_i, V_{i+1}) upsampling), all SciPy sparse (CSR), ``F`` (per-level uint32 faces) and ``M``
    (GraphCMR's pickled ``__main__.MyMesh`` objects, which cannot be unpickled elsewhere: no
    loader may read them).

    ``U`` is shaped like GraphCMR's: 3 weights per row (COMA's barycentric coordinates of a
    projection onto a coarse triangle), one row in seven with a negative weight, row sums near 1
    and spread over 0.83–1.05 (row 0 sums to 0.83, row 1 to 1.05), not exactly 1. ``D`` keeps
    the first V_{i+1} vertices. Level 0 has the fake SMPL faces when ``sizes[0]`` is 6890, the
    others a strip of triangles. Only for tests of the loader path: the values are not a
    meaningful pyramid.
    """
    rng = np.random.default_rng(seed)
    faces = [fake_smpl_mesh()[1].astype(np.int64) if sizes[0] == NUM_SMPL_VERTICES else _strip(sizes[0])]
    faces += [_strip(n) for n in sizes[1:]]
    downs, ups = [], []
    for fine, coarse in zip(sizes, sizes[1:]):
        downs.append(sp.csr_matrix((np.ones(coarse), (np.arange(coarse), np.arange(coarse))), shape=(coarse, fine)))
        ups.append(_graphcmr_up(fine, coarse, rng))
    adjacency = [2.0 * _adjacency(f, n) for f, n in zip(faces, sizes)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _main_stand_in("MyMesh") as my_mesh:
        meshes = _objects([my_mesh() for _ in sizes])
        np.savez(path, A=_objects(adjacency), U=_objects(ups), M=meshes, D=_objects(downs),
                 F=_objects([f.astype(np.uint32) for f in faces]))  # fmt: skip
    return path


def _graphcmr_up(fine: int, coarse: int, rng: np.random.Generator) -> sp.csr_matrix:
    """(fine, coarse) with 3 weights per row like GraphCMR's ``U`` (see the writer)."""
    bary = rng.dirichlet((2.0, 2.0, 2.0), size=fine)
    outside = np.arange(fine) % 7 == 3  # the projection falls outside the triangle
    bary[outside] = bary[outside] @ np.array([[1.4, 0.0, -0.4], [0.0, 1.0, 0.0], [-0.2, 0.0, 1.2]])
    sums = rng.uniform(0.99, 1.01, fine)
    sums[rng.random(fine) < 0.01] = rng.uniform(0.83, 1.05)
    sums[:2] = 0.83, 1.05
    weights = bary / bary.sum(axis=1, keepdims=True) * sums[:, None]
    columns = (np.arange(fine)[:, None] + np.arange(3)) % coarse
    return sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(fine), 3), columns.ravel())), shape=(fine, coarse))


@contextlib.contextmanager
def _main_stand_in(name: str) -> Iterator[type]:
    """A class pickled as ``__main__.<name>`` (as GraphCMR's ``M`` objects were), resolvable
    only inside this context: unpickling it later fails, as reading the real ``M`` does."""
    main = sys.modules["__main__"]
    stand_in = type(name, (), {"__module__": "__main__"})
    had, previous = hasattr(main, name), getattr(main, name, None)
    setattr(main, name, stand_in)
    try:
        yield stand_in
    finally:
        if had:
            setattr(main, name, previous)
        else:
            delattr(main, name)


def _strip(n: int) -> np.ndarray:
    i = np.arange(n - 2)
    return np.stack([i, i + 1, i + 2], axis=1).astype(np.int64)


def _adjacency(faces: np.ndarray, n: int) -> sp.csr_matrix:
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    a = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return ((a + a.T) > 0).astype(np.float64).tocsr()


def _objects(items: list[object]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out
