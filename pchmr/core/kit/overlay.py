"""Pictures of a predicted mesh: drawn over its image through the model's weak-perspective camera
(front), beside a side view, and written as ``.obj`` / ``.ply`` files.

Every function takes numpy arrays in the model's frame (metres, x right, y down, z forward),
vertices root-relative as the camera expects: crop coordinates ``uv = s * xyz[:2] + (tx, ty)``
in [-1, 1] across the image. The weak-perspective projection is rendered with the pinhole
rasteriser of :mod:`pchmr.core.kit.render` by moving the mesh :data:`FAR` metres away and
scaling the focal length to match, which is orthographic to within ``depth / FAR`` (0.1 % for a
body 1 m deep).

A fit with a perspective camera (``pchmr annotate``'s annotators) is drawn with
:func:`draw_mesh` through its own :class:`~pchmr.core.kit.render.PinholeCamera`, and its side
view with :func:`side_layers`: several root-relative meshes (a fit and its ground truth) turned
90° about the vertical axis through their common root, orthographic at a given scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pchmr.core.kit.render import PinholeCamera, face_shading, rasterize_faces

__all__ = [
    "FAR",
    "GT_COLOR",
    "MESH_COLOR",
    "MeshLayer",
    "draw_mesh",
    "front_and_side",
    "mesh_mask",
    "overlay_mesh",
    "side_layers",
    "side_view",
    "turn_to_side",
    "write_mesh",
]

#: How far (metres) the mesh is moved to render a weak-perspective camera with a pinhole one.
FAR = 1000.0
#: The predicted mesh's colour (RGB in [0, 1]); ground truth is drawn in :data:`GT_COLOR`.
MESH_COLOR = (0.55, 0.75, 0.95)
GT_COLOR = (0.95, 0.7, 0.45)
#: The side view's background.
SIDE_BACKGROUND = 235


Box = tuple[float, float, float]  # (x0, y0, side): the square crop the camera's [-1, 1] spans, in image pixels


def _weak_perspective(camera: np.ndarray, height: int, width: int, box: Box | None = None) -> PinholeCamera:
    """The pinhole camera at :data:`FAR` that renders ``camera`` (s, tx, ty in crop coordinates)
    into an ``height`` x ``width`` image whose crop is ``box`` (default: the whole image, square)."""
    s, tx, ty = (float(c) for c in camera)
    if not np.isfinite([s, tx, ty]).all() or s <= 0:
        raise ValueError(f"a weak-perspective camera needs a positive finite scale, got (s, tx, ty) = {camera}")
    x0, y0, side = (0.0, 0.0, float(width)) if box is None else (float(b) for b in box)
    if box is None and height != width:
        raise ValueError(f"a {height}x{width} image is not a square crop: give the crop box (x0, y0, side)")
    focal = s * side / 2.0 * FAR
    return PinholeCamera(
        fx=focal, fy=focal, cx=x0 + (tx + 1.0) * side / 2.0, cy=y0 + (ty + 1.0) * side / 2.0, height=height, width=width
    )


def _faces_buffer(
    vertices: np.ndarray, faces: np.ndarray, camera: np.ndarray, height: int, width: int, box: Box | None = None
) -> np.ndarray:
    far = np.asarray(vertices, dtype=np.float64) + np.array([0.0, 0.0, FAR])
    return rasterize_faces(far, faces, _weak_perspective(camera, height, width, box))


def mesh_mask(
    vertices: np.ndarray, faces: np.ndarray, camera: np.ndarray, height: int, width: int, box: Box | None = None
) -> np.ndarray:
    """(H, W) bool: the pixels the mesh covers through ``camera`` (s, tx, ty) of crop ``box``."""
    return _faces_buffer(vertices, faces, camera, height, width, box) >= 0


def _shade(
    vertices: np.ndarray, faces: np.ndarray, buffer: np.ndarray, color: tuple[float, float, float]
) -> np.ndarray:
    covered = buffer >= 0
    visible = buffer[covered]
    shade = np.zeros(len(faces))
    used = np.unique(visible)
    shade[used] = face_shading(np.asarray(vertices, dtype=np.float64) + np.array([0.0, 0.0, FAR]), faces[used])
    return np.asarray(color)[None, :] * shade[visible][:, None]


def overlay_mesh(
    image: np.ndarray,
    vertices: np.ndarray,
    faces: np.ndarray,
    camera: np.ndarray,
    color: tuple[float, float, float] = MESH_COLOR,
    alpha: float = 0.7,
    box: Box | None = None,
) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with the shaded mesh blended over it (``alpha`` of the mesh);
    ``camera`` is the prediction's, for the crop ``box`` of the image (default: the whole image)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    faces = np.asarray(faces, dtype=np.int64)
    buffer = _faces_buffer(vertices, faces, camera, height, width, box)
    out = image.astype(np.float64) / 255.0
    covered = buffer >= 0
    out[covered] = (1.0 - alpha) * out[covered] + alpha * _shade(vertices, faces, buffer, color)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def side_view(
    vertices: np.ndarray,
    faces: np.ndarray,
    camera: np.ndarray,
    height: int,
    width: int,
    color: tuple[float, float, float] = MESH_COLOR,
    box: Box | None = None,
) -> np.ndarray:
    """The mesh turned 90° about the vertical axis (seen from its right), at the front view's
    scale and height, centred, on a light background: depth errors the front view hides show here."""
    v = np.asarray(vertices, dtype=np.float64)
    centre = v.mean(axis=0)
    turned = v - centre
    turned = np.stack([-turned[:, 2], turned[:, 1], turned[:, 0]], axis=1)  # rotate about y: depth → x
    front = _weak_perspective(camera, height, width, box)
    s_px = front.fx / FAR
    pixel = PinholeCamera(
        fx=front.fx, fy=front.fy, cx=width / 2.0, cy=front.cy + s_px * centre[1], height=height, width=width
    )
    faces = np.asarray(faces, dtype=np.int64)
    buffer = rasterize_faces(turned + np.array([0.0, 0.0, FAR]), faces, pixel)
    out = np.full((height, width, 3), SIDE_BACKGROUND / 255.0)
    covered = buffer >= 0
    out[covered] = _shade(turned, faces, buffer, color)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def draw_mesh(
    canvas: np.ndarray,
    vertices: np.ndarray,
    faces: np.ndarray,
    camera: PinholeCamera,
    color: tuple[float, float, float] = MESH_COLOR,
    alpha: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """``canvas`` (H, W, 3) uint8 with the shaded mesh drawn through the pinhole ``camera`` (the
    camera's H and W are the canvas's), ``alpha`` of the mesh over the canvas, and the (H, W) bool
    mask of the pixels the mesh covers. ``vertices`` are camera-frame points in metres in front
    of the camera (a fit's root-relative vertices plus its translation)."""
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError(f"canvas must be (H, W, 3) uint8, got {canvas.shape} {canvas.dtype}")
    if canvas.shape[:2] != (camera.height, camera.width):
        raise ValueError(f"canvas is {canvas.shape[:2]}, the camera renders {(camera.height, camera.width)}")
    v = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    buffer = rasterize_faces(v, faces, camera)
    covered = buffer >= 0
    out = canvas.astype(np.float64) / 255.0
    if covered.any():
        visible = buffer[covered]
        used = np.unique(visible)
        shade = np.zeros(len(faces))
        shade[used] = face_shading(v, faces[used])
        out[covered] = (1.0 - alpha) * out[covered] + alpha * np.asarray(color)[None, :] * shade[visible][:, None]
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8), covered


def turn_to_side(vertices: np.ndarray) -> np.ndarray:
    """Camera-frame ``vertices`` turned 90° about the vertical axis through the origin (their
    root, for root-relative vertices): depth becomes x, points nearer the camera to the right,
    seen from the body's right side as :func:`side_view` does."""
    v = np.asarray(vertices, dtype=np.float64)
    return np.stack([-v[..., 2], v[..., 1], v[..., 0]], axis=-1)


@dataclass(frozen=True)
class MeshLayer:
    """One root-relative mesh of a side view (:func:`side_layers`), drawn ``alpha`` over what
    lies under it."""

    vertices: np.ndarray
    faces: np.ndarray
    color: tuple[float, float, float] = MESH_COLOR
    alpha: float = 1.0


def side_layers(
    layers: list[MeshLayer] | tuple[MeshLayer, ...],
    *,
    scale: float,
    origin: tuple[float, float],
    height: int,
    width: int,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The side view of root-relative meshes, each turned by :func:`turn_to_side` about the
    common root, orthographic at ``scale`` pixels per metre with the root at pixel ``origin``
    (u, v), drawn in order over a light background. Returns the (H, W, 3) uint8 picture and each
    layer's (H, W) bool mask (its own pixels, whatever covers them later)."""
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"a side view needs a positive finite scale (pixels per metre), got {scale}")
    camera = PinholeCamera(fx=scale * FAR, fy=scale * FAR, cx=float(origin[0]), cy=float(origin[1]),
                           height=height, width=width)  # fmt: skip
    canvas = np.full((height, width, 3), SIDE_BACKGROUND, dtype=np.uint8)
    masks = []
    for layer in layers:
        turned = turn_to_side(layer.vertices) + np.array([0.0, 0.0, FAR])
        canvas, mask = draw_mesh(canvas, turned, layer.faces, camera, layer.color, layer.alpha)
        masks.append(mask)
    return canvas, masks


def front_and_side(
    image: np.ndarray, vertices: np.ndarray, faces: np.ndarray, camera: np.ndarray, box: Box | None = None
) -> np.ndarray:
    """(H, 2W, 3) uint8: the mesh over the image, and its side view beside it."""
    height, width = image.shape[:2]
    return np.concatenate(
        [
            overlay_mesh(image, vertices, faces, camera, box=box),
            side_view(vertices, faces, camera, height, width, box=box),
        ],
        axis=1,
    )


def write_mesh(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    """Write a triangle mesh as Wavefront ``.obj`` or ASCII ``.ply`` (by the suffix)."""
    path = Path(path)
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"a mesh needs (V, 3) vertices and (F, 3) faces, got {v.shape} and {f.shape}")
    if path.suffix == ".obj":
        lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in f]
    elif path.suffix == ".ply":
        header = [
            "ply",
            "format ascii 1.0",
            f"element vertex {len(v)}",
            "property float x",
            "property float y",
            "property float z",
            f"element face {len(f)}",
            "property list uchar int vertex_indices",
            "end_header",
        ]
        lines = header + [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in v] + [f"3 {a} {b} {c}" for a, b, c in f]
    else:
        raise ValueError(f"a mesh file must end in .obj or .ply, got {path.name}")
    from pchmr.core.kit.atomic import write_text_atomic

    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def read_obj(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) vertices and (F, 3) zero-based faces of a triangle ``.obj`` (what :func:`write_mesh` writes)."""
    vertices, faces = [], []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            vertices.append([float(x) for x in parts[1:4]])
        elif parts[0] == "f":
            faces.append([int(p.split("/")[0]) - 1 for p in parts[1:4]])
    return np.asarray(vertices, dtype=np.float64).reshape(-1, 3), np.asarray(faces, dtype=np.int64).reshape(-1, 3)
