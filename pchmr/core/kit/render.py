"""A small vectorised CPU triangle rasteriser with a z-buffer and Lambertian face shading.

Camera model: a perspective pinhole camera in the OpenCV frame (x right, y down, z forward),
vertices given in that frame in metres. Image coordinates are *continuous*: the image spans
``[0, W] x [0, H]`` and pixel ``(row i, column j)`` has its centre at ``(j + 0.5, i + 0.5)``;
a point projects to ``u = fx * x / z + cx``, ``v = fy * y / z + cy``. Crop coordinates in
``[-1, 1]`` (:mod:`pchmr.core.contracts.sample`) are then ``2 * u / W - 1`` and ``2 * v / H - 1``.

The rasteriser enumerates, for every triangle, the pixel centres inside its screen bounding
box (one flat array of (triangle, pixel) candidates, no per-pixel Python loop), keeps the
centres inside the triangle (edge functions with a small tolerance, so that triangles sharing
an edge leave no cracks), and resolves visibility per pixel with a scatter-max on the
perspective-correct inverse depth (``np.maximum.at``). Ties go to the larger triangle index, so the output is
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PinholeCamera", "project_points", "rasterize_faces", "render_mesh", "to_crop_coordinates"]

#: Triangles with a vertex closer than this (metres) to the camera plane are skipped.
NEAR_PLANE = 1e-3
#: Tolerance of the inside test, in units of the barycentric coordinates.
INSIDE_EPS = 1e-6
#: Light direction in the camera frame, pointing *from* the surface *towards* the light:
#: from slightly above (-y) and left (-x) of the camera (-z).
DEFAULT_LIGHT = (-0.35, -0.55, -1.0)
#: Fraction of a face's colour that is lit regardless of its orientation.
DEFAULT_AMBIENT = 0.35


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics of a pinhole camera: focal lengths and principal point in pixels
    (continuous image coordinates, see the module docstring) for an image of
    ``height`` x ``width`` pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int

    @classmethod
    def square(cls, size: int, focal: float, cx: float | None = None, cy: float | None = None) -> PinholeCamera:
        """A ``size`` x ``size`` camera with equal focal lengths, centred unless told."""
        half = size / 2.0
        return cls(focal, focal, half if cx is None else cx, half if cy is None else cy, size, size)


def project_points(points: np.ndarray, camera: PinholeCamera) -> np.ndarray:
    """(..., 3) camera-frame points (metres, z > 0) → (..., 2) continuous pixel coordinates."""
    pts = np.asarray(points, dtype=np.float64)
    z = pts[..., 2]
    if np.any(z <= 0):
        raise ValueError("project_points needs points in front of the camera (z > 0)")
    u = camera.fx * pts[..., 0] / z + camera.cx
    v = camera.fy * pts[..., 1] / z + camera.cy
    return np.stack([u, v], axis=-1)


def to_crop_coordinates(pixels: np.ndarray, camera: PinholeCamera) -> np.ndarray:
    """(..., 2) continuous pixel coordinates → crop coordinates in [-1, 1] at the image edges."""
    px = np.asarray(pixels, dtype=np.float64)
    return np.stack([2.0 * px[..., 0] / camera.width - 1.0, 2.0 * px[..., 1] / camera.height - 1.0], axis=-1)


def _check_inputs(vertices: np.ndarray, faces: np.ndarray) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be (V, 3) camera-frame points, got shape {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be (F, 3) vertex indices, got shape {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"faces index vertices outside [0, {len(vertices)}), got range [{faces.min()}, {faces.max()}]")


def rasterize_faces(vertices: np.ndarray, faces: np.ndarray, camera: PinholeCamera) -> np.ndarray:
    """Visible triangle per pixel.

    Args:
        vertices: (V, 3) camera-frame points in metres.
        faces: (F, 3) integer vertex indices.
        camera: the intrinsics and image size.
    Returns:
        (H, W) int64, the index of the nearest triangle covering each pixel centre, -1 where
        no triangle does.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    _check_inputs(vertices, faces)
    height, width = camera.height, camera.width
    face_buffer = np.full(height * width, -1, dtype=np.int64)
    if len(faces) == 0:
        return face_buffer.reshape(height, width)

    # Project the vertices once, then work on one contiguous array per triangle corner.
    z = vertices[:, 2]
    in_front = z > NEAR_PLANE
    inv_z_v = 1.0 / np.where(in_front, z, 1.0)
    u_v = camera.fx * vertices[:, 0] * inv_z_v + camera.cx
    v_v = camera.fy * vertices[:, 1] * inv_z_v + camera.cy
    i0, i1, i2 = faces[:, 0], faces[:, 1], faces[:, 2]
    u0, u1, u2 = u_v[i0], u_v[i1], u_v[i2]
    v0, v1, v2 = v_v[i0], v_v[i1], v_v[i2]
    # Pixel columns j with centre j + 0.5 inside [min u, max u], clipped to the image.
    col0 = np.maximum(np.ceil(np.minimum(np.minimum(u0, u1), u2) - 0.5), 0)
    col1 = np.minimum(np.floor(np.maximum(np.maximum(u0, u1), u2) - 0.5), width - 1)
    row0 = np.maximum(np.ceil(np.minimum(np.minimum(v0, v1), v2) - 0.5), 0)
    row1 = np.minimum(np.floor(np.maximum(np.maximum(v0, v1), v2) - 0.5), height - 1)
    area = (u1 - u0) * (v2 - v0) - (u2 - u0) * (v1 - v0)
    valid = (col1 >= col0) & (row1 >= row0) & (np.abs(area) > 1e-12) & in_front[i0] & in_front[i1] & in_front[i2]
    face_ids = np.nonzero(valid)[0]
    if len(face_ids) == 0:
        return face_buffer.reshape(height, width)
    u = np.stack([u0[face_ids], u1[face_ids], u2[face_ids]], axis=1)
    v = np.stack([v0[face_ids], v1[face_ids], v2[face_ids]], axis=1)
    inv_z = inv_z_v[faces[face_ids]]
    area = area[face_ids]
    col0, col1 = col0[face_ids].astype(np.int64), col1[face_ids].astype(np.int64)
    row0, row1 = row0[face_ids].astype(np.int64), row1[face_ids].astype(np.int64)

    # One flat array of (triangle, candidate pixel) pairs.
    box_w = col1 - col0 + 1
    counts = box_w * (row1 - row0 + 1)
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    local = np.arange(owner.size) - starts[owner]
    cols = col0[owner] + local % box_w[owner]
    rows = row0[owner] + local // box_w[owner]
    px, py = cols + 0.5, rows + 0.5

    uo, vo = u[owner], v[owner]
    inv_area = 1.0 / area[owner]
    # Barycentric coordinates from the edge functions (sign-normalised by the signed area).
    b0 = ((uo[:, 1] - px) * (vo[:, 2] - py) - (uo[:, 2] - px) * (vo[:, 1] - py)) * inv_area
    b1 = ((uo[:, 2] - px) * (vo[:, 0] - py) - (uo[:, 0] - px) * (vo[:, 2] - py)) * inv_area
    b2 = 1.0 - b0 - b1
    inside = (b0 >= -INSIDE_EPS) & (b1 >= -INSIDE_EPS) & (b2 >= -INSIDE_EPS)
    owner, b0, b1, b2 = owner[inside], b0[inside], b1[inside], b2[inside]
    pixel = rows[inside] * width + cols[inside]
    # Inverse depth is affine in screen space: the perspective-correct visibility key.
    depth_key = b0 * inv_z[owner, 0] + b1 * inv_z[owner, 1] + b2 * inv_z[owner, 2]

    nearest = np.full(height * width, -np.inf)
    np.maximum.at(nearest, pixel, depth_key)
    winner = depth_key >= nearest[pixel]
    np.maximum.at(face_buffer, pixel[winner], face_ids[owner[winner]])
    return face_buffer.reshape(height, width)


def face_shading(
    vertices: np.ndarray,
    faces: np.ndarray,
    light: tuple[float, float, float] = DEFAULT_LIGHT,
    ambient: float = DEFAULT_AMBIENT,
) -> np.ndarray:
    """(F,) Lambertian intensity in [ambient, 1] of each triangle, its normal turned to face
    the camera (so the inside of an open mesh is lit like its outside)."""
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    to_camera = -tri.mean(axis=1)
    normal *= np.where(np.sum(normal * to_camera, axis=1, keepdims=True) < 0, -1.0, 1.0)
    light_dir = np.asarray(light, dtype=np.float64)
    light_dir = light_dir / np.linalg.norm(light_dir)
    lambert = np.clip(normal @ light_dir, 0.0, 1.0)
    return ambient + (1.0 - ambient) * lambert


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    face_colors: np.ndarray,
    camera: PinholeCamera,
    background: np.ndarray | None = None,
    light: tuple[float, float, float] = DEFAULT_LIGHT,
    ambient: float = DEFAULT_AMBIENT,
) -> np.ndarray:
    """Render a shaded mesh over a background.

    Args:
        vertices: (V, 3) camera-frame points in metres (OpenCV frame).
        faces: (F, 3) integer vertex indices.
        face_colors: (F, 3) RGB per triangle, floats in [0, 1] or uint8.
        camera: intrinsics and image size (H, W).
        background: (H, W, 3) uint8 image, black when None.
        light: direction towards the light in the camera frame.
        ambient: unlit fraction of the colour, in [0, 1].
    Returns:
        (H, W, 3) uint8 image.
    """
    faces = np.asarray(faces, dtype=np.int64)
    colors = np.asarray(face_colors)
    if colors.shape != (len(faces), 3):
        raise ValueError(f"face_colors must be (F, 3) = ({len(faces)}, 3), got {colors.shape}")
    colors = colors.astype(np.float64) / 255.0 if colors.dtype == np.uint8 else colors.astype(np.float64)
    shape = (camera.height, camera.width, 3)
    if background is None:
        image = np.zeros(shape, dtype=np.uint8)
    else:
        if background.shape != shape or background.dtype != np.uint8:
            raise ValueError(f"background must be a {shape} uint8 image, got {background.shape} {background.dtype}")
        image = background.copy()
    face_buffer = rasterize_faces(vertices, faces, camera)
    covered = face_buffer >= 0
    visible = face_buffer[covered]
    shade = face_shading(vertices, faces[np.unique(visible)], light, ambient)
    shaded = np.zeros((len(faces), 3))
    unique_faces = np.unique(visible)
    shaded[unique_faces] = colors[unique_faces] * shade[:, None]
    image[covered] = np.clip(np.round(shaded[visible] * 255.0), 0, 255).astype(np.uint8)
    return image
