"""What every real-dataset loader shares: annotations → crops → prepared store → Samples.

A format loader (``spin_npz``, ``metro_tsv``, ``pw3d``, ``coco``) only parses its files into an
:class:`Annotations` (per sample: an image reference, the SPIN box ``center``/``scale``, 2D
keypoints in pixels, 3D joints in metres in the camera frame, optional SMPL parameters, meta
labels — all already mapped to the body model's joint set with :mod:`pchmr.core.kit.joints`) and an
:class:`ImageSource`. :func:`prepare_split` then

* crops every image once, SPIN's way: the square box of side ``200 · scale`` pixels centred on
  ``center`` (zero padding outside the image), resized to ``image_size`` (bilinear);
* converts keypoints to crop coordinates: ``(p - center) / (100 · scale)`` ∈ [-1, 1];
* makes the 3D joints root-relative (mid-hip; a sample without both hips gets validity 0);
* when the annotation has SMPL parameters and the body model is ``smpl``, poses the GT mesh
  (neutral, or the annotated gender under the ``spin`` protocol) in the camera frame and stores
  its root-relative vertices (``has_vertices`` 1; the joints then come from that mesh when the
  format has none); otherwise ``has_vertices`` is 0 and the vertices are zeros;
* stores the GT Human3.6M pelvis (``pelvis_3d``, relative to the same mid-hip root as the
  joints, for the pelvis-aligned protocols): regressed from the GT mesh with the body model's
  ``pelvis_regressor`` where the joints come from that mesh, else the format's own (J24 index
  14 of SPIN's ``S`` / METRO's ``3d_joints``, :attr:`Annotations.pelvis`), else invalid;
* writes it all into a :mod:`pchmr.core.kit.store` keyed by the sources' SHA-256 checksums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pchmr.core.contracts.bodymodel import BodyModel, BodyModelSpec
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.errors import DatasetFormatError
from pchmr.core.contracts.options import describe_options, read_options
from pchmr.core.contracts.sample import META_KEYS, normalize_image
from pchmr.core.kit.joints import get_protocol, root_relative
from pchmr.core.kit.store import (
    ChunkSpec,
    PreparedStore,
    file_sha256,
    prepare_store,
    store_key,
)

__all__ = [
    "SPIN_BOX_PIXELS",
    "Annotations",
    "DatasetFormatError",
    "FolderImages",
    "ImageSource",
    "StoreSplit",
    "crop_image",
    "decode_image",
    "location_keys",
    "make_hmr_data",
    "parse_path_spec",
    "prepare_split",
    "read_location",
    "to_crop_coords",
]

#: SPIN's box convention: ``scale`` is the box side in units of 200 pixels.
SPIN_BOX_PIXELS = 200.0
#: 2: ``pelvis_3d`` stored (stores of version 1 are rebuilt: the version is part of the key).
PREPARED_VERSION = 2
SMPL_POSE_SIZE, SMPL_BETAS_SIZE = 72, 10
_GENDERS = {"m": "male", "male": "male", "f": "female", "female": "female"}


# ---------------------------------------------------------------------------------- inputs


@dataclass
class Annotations:
    """N samples of one split, in the body model's joint set (J joints).

    ``image`` (N,) str references for the :class:`ImageSource`; ``center`` (N, 2) and ``scale``
    (N,) the SPIN box in pixels; ``keypoints`` (N, J, 3) pixels + confidence; ``joints`` (N, J, 4)
    metres, camera frame (any origin) + validity; ``pose`` (N, 72) / ``betas`` (N, 10) SMPL
    parameters (global orientation in the camera frame) with ``has_smpl`` (N,); ``gender`` (N,)
    ``male``/``female``/``neutral``; ``labels`` (N,) str per :data:`META_KEYS`; ``pelvis``
    (N, 4) Human3.6M's pelvis, metres, same frame and origin as ``joints`` + validity (None
    when the format has none).
    """

    image: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    keypoints: np.ndarray
    joints: np.ndarray
    labels: Mapping[str, np.ndarray]
    pose: np.ndarray | None = None
    betas: np.ndarray | None = None
    has_smpl: np.ndarray | None = None
    gender: np.ndarray | None = None
    origin: str = ""
    pelvis: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.image)
        shapes = {"center": (n, 2), "scale": (n,), **({} if self.pelvis is None else {"pelvis": (n, 4)})}
        for key, shape in shapes.items():
            if getattr(self, key).shape != shape:
                raise DatasetFormatError(f"{self.origin}: '{key}' must be {shape}, got {getattr(self, key).shape}")
        for key in META_KEYS:
            if key not in self.labels or len(self.labels[key]) != n:
                raise DatasetFormatError(f"{self.origin}: label '{key}' must have {n} entries")

    def __len__(self) -> int:
        return len(self.image)

    def take(self, index: np.ndarray) -> Annotations:
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Annotations(
            image=self.image[index], center=self.center[index], scale=self.scale[index],
            keypoints=self.keypoints[index], joints=self.joints[index],
            labels={k: v[index] for k, v in self.labels.items()}, pose=pick(self.pose), betas=pick(self.betas),
            has_smpl=pick(self.has_smpl), gender=pick(self.gender), origin=self.origin, pelvis=pick(self.pelvis),
        )  # fmt: skip


class ImageSource(Protocol):
    """Reads one image by reference: (H, W, 3) uint8 RGB. ``files`` lists what it reads from."""

    files: Sequence[Path]

    def read(self, reference: str) -> np.ndarray: ...


def decode_image(data: bytes | Path, what: str) -> np.ndarray:
    """JPEG/PNG bytes or file → (H, W, 3) uint8 RGB; a clear error names ``what`` on failure."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: image file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetFormatError(f"{what}: not a readable JPEG/PNG image ({exc})") from exc


@dataclass
class FolderImages:
    """Images stored as files under ``root`` (the references are relative paths)."""

    root: Path
    listed_in: str = ""
    files: Sequence[Path] = field(default_factory=tuple)

    def read(self, reference: str) -> np.ndarray:
        path = self.root / reference
        if not path.is_file():
            raise FileNotFoundError(
                f"image '{reference}' listed in {self.listed_in or 'the annotations'} does not exist: "
                f"expected the file {path} (image root {self.root})"
            )
        return decode_image(path, str(path))

    def check_exist(self, references: Sequence[str]) -> None:
        """Fail before any work when an image is missing (naming the first few)."""
        missing = [r for r in dict.fromkeys(references) if not (self.root / r).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {self.listed_in or 'the annotations'} do not exist under "
                f"{self.root}: {shown}"
            )


# ---------------------------------------------------------------------------------- geometry


def crop_image(image: np.ndarray, center: Sequence[float], scale: float, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3) uint8: the box of side ``200 · scale`` px centred on
    ``center`` (x, y pixels; pixel i covers [i, i+1)), zero outside the image, bilinear."""
    side = SPIN_BOX_PIXELS * float(scale)
    if not side > 0:
        raise ValueError(f"crop scale must be > 0, got {scale}")
    step = side / size
    x0, y0 = float(center[0]) - side / 2.0, float(center[1]) - side / 2.0
    # PIL maps output pixel centre (u + 0.5) to input point a·(u + 0.5) + c (likewise for y).
    coeffs = (step, 0.0, x0, 0.0, step, y0)
    out = Image.fromarray(np.ascontiguousarray(image)).transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.asarray(out)


def to_crop_coords(points: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, J, ≥2) pixel points → crop coordinates (x, y in [-1, 1] over the box); extra columns kept."""
    out = np.array(points, dtype=np.float64, copy=True)
    half = (SPIN_BOX_PIXELS / 2.0) * np.asarray(scale, dtype=np.float64)[:, None, None]
    out[..., :2] = (out[..., :2] - np.asarray(center, dtype=np.float64)[:, None, :]) / half
    return out


# ---------------------------------------------------------------------------------- meshes


class _GroundTruthMeshes:
    """Poses GT SMPL meshes with the run's body model (or its male/female siblings)."""

    def __init__(self, body_model: BodyModel, gendered: bool) -> None:
        self.body_model = body_model
        self.gendered = gendered
        self._models: dict[str, BodyModel] = {}

    def _model(self, gender: str) -> BodyModel:
        if not self.gendered or gender not in ("male", "female"):
            return self.body_model
        if gender not in self._models:
            from pchmr.plugins.bodymodels.smpl import make_smpl

            source = Path(str(getattr(self.body_model, "source", "")))
            model_dir = source.parent.parent if source.parent.name == "smpl" else source.parent
            self._models[gender] = make_smpl(BodyModelSpec(model_dir=str(model_dir), extra={"gender": gender}))
        return self._models[gender]

    def __call__(self, pose: np.ndarray, betas: np.ndarray, gender: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 72), (B, 10), (B,) → root-relative vertices (B, V, 3) and joints (B, J, 3), metres."""
        verts = np.zeros((len(pose), self.body_model.num_vertices, 3), np.float32)
        joints = np.zeros((len(pose), self.body_model.num_joints, 3), np.float32)
        for g in np.unique(gender):
            rows = np.flatnonzero(gender == g)
            model = self._model(str(g))
            with torch.no_grad():
                out = model(
                    global_orient=torch.as_tensor(pose[rows, :3], dtype=torch.float32),
                    body_pose=torch.as_tensor(pose[rows, 3:], dtype=torch.float32),
                    betas=torch.as_tensor(betas[rows], dtype=torch.float32),
                )
                root = self.body_model.root(out.joints)
            verts[rows] = (out.vertices - root).numpy()
            joints[rows] = (out.joints - root).numpy()
        return verts, joints


# ---------------------------------------------------------------------------------- prepare


def _labels_array(values: np.ndarray) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=str)


def prepare_split(
    annotations: Annotations,
    images: ImageSource,
    *,
    spec: DatasetSpec,
    body_model: BodyModel,
    name: str,
    sources: Sequence[Path],
    protocol: str = "metro",
    progress: Callable[[int, int], None] | None = None,
) -> PreparedStore:
    """Prepare (or reopen) the store of one split; see the module docstring."""
    n = len(annotations)
    if n == 0:
        raise DatasetFormatError(f"{annotations.origin}: no samples to prepare")
    size = spec.image_size
    cache_root = Path(spec.cache_dir).expanduser()
    checksums = {str(p): file_sha256(p, cache_root) for p in sources}
    selection = hashlib.sha256(np.ascontiguousarray(annotations.image).astype(str).tobytes()).hexdigest()[:16]
    smpl_gt = body_model.name == "smpl" and annotations.pose is not None and annotations.has_smpl is not None
    gendered = smpl_gt and get_protocol(protocol).gt_mesh == "gendered"
    identity = {
        "format": name, "version": PREPARED_VERSION, "sources": checksums, "image_size": size,
        "body_model": body_model.name, "num_vertices": body_model.num_vertices, "joints": list(body_model.joint_names),
        "joint_source": str(getattr(body_model, "joint_source", "")), "samples": n, "selection": selection,
        "gendered": gendered,
    }  # fmt: skip
    directory = cache_root / f"{name}-{store_key(identity)}"

    meshes = _GroundTruthMeshes(body_model, gendered) if smpl_gt else None
    has_smpl = np.zeros(n, bool) if annotations.has_smpl is None else annotations.has_smpl.astype(bool)
    gender = np.full(n, "neutral") if annotations.gender is None else annotations.gender.astype(str)
    keypoints = to_crop_coords(annotations.keypoints, annotations.center, annotations.scale).astype(np.float32)
    joints = annotations.joints.astype(np.float64).copy()
    pelvis = np.zeros((n, 4)) if annotations.pelvis is None else annotations.pelvis.astype(np.float64).copy()
    pelvis_row = getattr(body_model, "pelvis_regressor", None)
    if meshes is not None:  # joints (and pelvis) of the GT mesh where the format has no 3D joints
        need = has_smpl & ~(joints[:, :, 3] > 0).any(axis=1)
        for start in range(0, n, 256):
            rows = np.flatnonzero(need[start : start + 256]) + start
            if len(rows):
                mesh_vertices, mesh_joints = meshes(annotations.pose[rows], annotations.betas[rows], gender[rows])
                joints[rows, :, :3], joints[rows, :, 3] = mesh_joints, 1.0
                pelvis[rows] = _mesh_pelvis(mesh_vertices, pelvis_row)
    pelvis = _pelvis_relative(pelvis, joints, body_model.root_joints).astype(np.float32)
    joints = root_relative(joints, body_model.joint_names, _root_names(body_model)).astype(np.float32)
    arrays = {
        "keypoints_2d": keypoints, "joints_3d": joints, "pelvis_3d": pelvis,
        "has_vertices": (has_smpl if meshes is not None else np.zeros(n, bool)).astype(np.float32),
        "center": annotations.center.astype(np.float64), "scale": annotations.scale.astype(np.float64),
        "image_ref": _labels_array(annotations.image),
        **{f"label_{k}": _labels_array(annotations.labels[k]) for k in META_KEYS},
    }  # fmt: skip
    chunked = {"images": ChunkSpec((size, size, 3), "uint8")}
    if meshes is not None:
        chunked["vertices"] = ChunkSpec((body_model.num_vertices, 3), "float32")

    def produce(start: int, stop: int) -> dict[str, np.ndarray]:
        out = {"images": np.zeros((stop - start, size, size, 3), np.uint8)}
        last_ref, last_image = None, None
        for k, i in enumerate(range(start, stop)):
            ref = str(annotations.image[i])
            if ref != last_ref:  # consecutive samples of one image share its decoding
                last_ref, last_image = ref, images.read(ref)
            out["images"][k] = crop_image(last_image, annotations.center[i], annotations.scale[i], size)
        if meshes is not None:
            verts = np.zeros((stop - start, body_model.num_vertices, 3), np.float32)
            rows = np.flatnonzero(has_smpl[start:stop])
            if len(rows):
                idx = rows + start
                verts[rows] = meshes(annotations.pose[idx], annotations.betas[idx], gender[idx])[0]
            out["vertices"] = verts
        return out

    info = {"format": name, "sources": checksums, "image_size": size, "body_model": body_model.name,
            "protocol": protocol, "gendered_gt": gendered, "origin": annotations.origin,
            "gendered_meshes": int((has_smpl & np.isin(gender, ("male", "female"))).sum()) if gendered else 0}  # fmt: skip
    return prepare_store(directory, num_samples=n, arrays=arrays, chunked=chunked, produce=produce, info=info,
                         on_progress=progress)  # fmt: skip


def _root_names(body_model: BodyModel) -> tuple[str, ...]:
    return tuple(body_model.joint_names[i] for i in body_model.root_joints)


def _mesh_pelvis(vertices: np.ndarray, pelvis_row: torch.Tensor | None) -> np.ndarray:
    """(B, V, 3) GT vertices → (B, 4) their Human3.6M pelvis + validity (0 without the row)."""
    out = np.zeros((len(vertices), 4))
    if pelvis_row is not None:
        out[:, :3] = np.einsum("v,bvc->bc", pelvis_row.detach().cpu().numpy().astype(np.float64), vertices)
        out[:, 3] = 1.0
    return out


def _pelvis_relative(pelvis: np.ndarray, joints: np.ndarray, root: Sequence[int]) -> np.ndarray:
    """(N, 4) pelvis and (N, J, 4) joints in one frame → the pelvis relative to the joints' root
    (mean of ``root``); invalid (all zeros) where the pelvis or the root is."""
    ok = (pelvis[:, 3] > 0) & (joints[:, list(root), 3] > 0).all(axis=1)
    out = np.zeros_like(pelvis)
    out[ok, :3] = pelvis[ok, :3] - joints[ok][:, list(root), :3].mean(axis=1)
    out[ok, 3] = 1.0
    return out


# ---------------------------------------------------------------------------------- reading


class StoreSplit(Dataset):
    """Samples (:mod:`pchmr.core.contracts.sample`) read from a prepared store; no image decoding."""

    def __init__(self, store: PreparedStore, num_vertices: int) -> None:
        self.store = store
        self.num_vertices = num_vertices
        self.labels = {key: store.arrays[f"label_{key}"] for key in META_KEYS}
        self._zeros = torch.zeros(num_vertices, 3)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.store)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for a split of {n}")
        i = int(index) % n
        arrays = self.store.arrays
        has_vertices = float(arrays["has_vertices"][i])
        if "vertices" in self.store.chunked_names:
            vertices = torch.from_numpy(np.array(self.store.chunked("vertices")[i]))
        else:
            vertices = self._zeros.clone()
        return {
            "image": normalize_image(torch.from_numpy(np.array(self.store.chunked("images")[i]))),
            "keypoints_2d": torch.from_numpy(arrays["keypoints_2d"][i].copy()),
            "joints_3d": torch.from_numpy(arrays["joints_3d"][i].copy()),
            "pelvis_3d": torch.from_numpy(arrays["pelvis_3d"][i].copy()),
            "vertices": vertices,
            "has_vertices": torch.tensor(has_vertices),
            "index": torch.tensor(i, dtype=torch.int64),
            "meta": {key: str(self.labels[key][i]) for key in META_KEYS},
        }


def make_hmr_data(
    name: str, train: PreparedStore, test: PreparedStore, body_model: BodyModel, protocol: str, extra: Mapping[str, Any]
) -> HMRData:
    """HMRData over two prepared stores; ``protocol`` names the evaluation protocol."""
    train_split, test_split = StoreSplit(train, body_model.num_vertices), StoreSplit(test, body_model.num_vertices)
    joints = train.arrays["joints_3d"]
    valid = joints[..., 3:] > 0
    counts = valid.sum(axis=0)
    mean = np.where(counts > 0, (joints[..., :3] * valid).sum(axis=0) / np.maximum(counts, 1), 0.0)
    with_3d = (test.arrays["joints_3d"][..., 3] > 0).any(axis=1)
    has_pelvis = test.arrays["pelvis_3d"][:, 3] > 0
    has_vertices = bool((test.arrays["has_vertices"] > 0).any())
    proto = get_protocol(protocol)
    description = {
        "dataset": f"{name}, {proto.name} protocol", "gt": "real", "protocol": proto.name,
        "protocol_details": proto.describe(), "num_train": len(train), "num_test": len(test),
        "test_has_3d_joints": bool(with_3d.any()), "body_model": body_model.name,
        "test_has_vertices": has_vertices,
        "gt_mesh": ("gendered" if test.info.get("gendered_meshes") else "neutral") if has_vertices else "none",
        "test_with_3d": int(with_3d.sum()), "test_without_pelvis": int((with_3d & ~has_pelvis).sum()),
    }  # fmt: skip
    return HMRData(
        train=train_split, test=test_split, labels=dict(train_split.labels), protocol=description,
        train_mean_joints=mean.astype(np.float32),
        extra={"train_store": str(train.directory), "test_store": str(test.directory), **extra},
    )  # fmt: skip


# ---------------------------------------------------------------------------------- paths


def location_keys(declared: type) -> tuple[str, ...]:
    """The ``key=value`` keys of a format plugin's ``--dataset`` path: the fields of its options class."""
    return tuple(f.name for f in dataclasses.fields(declared))


def read_location(plugin: str, spec: DatasetSpec, declared: type) -> dict[str, str]:
    """Where a format plugin reads: the ``--dataset`` path (:func:`parse_path_spec`, keys
    :func:`location_keys`) and ``spec.options`` (which win; a named dataset sets ``source`` and
    ``images`` that way), read together through the plugin's options class ``declared``: types,
    ranges, choices and its rules are checked (``OptionError``). Values are strings; a bare path
    is ``main``."""
    where = parse_path_spec(spec.path, plugin, location_keys(declared))
    spelled = {}  # a field's name or key, normalised → its key as declared
    for declared_field, info in zip(dataclasses.fields(declared), describe_options(declared)):
        spelled[declared_field.name.replace("_", "-")] = spelled[info.key.replace("_", "-")] = info.key
    values: dict[str, object] = {}
    for source in ({k: v for k, v in where.items() if k != "main"}, spec.options or {}):
        for key, value in source.items():
            values[spelled.get(str(key).strip().replace("_", "-"), str(key))] = value
    options = read_options(declared, values, plugin=plugin, kind="dataset")
    out = {"main": where["main"]} if "main" in where else {}
    out.update({key: str(value) for key, value in dataclasses.asdict(options).items() if value is not None})
    return out


def parse_path_spec(path: str | None, plugin: str, keys: Sequence[str]) -> dict[str, str]:
    """``PATH`` or ``key=value,key=value`` (keys among ``keys``) → dict; a bare PATH is ``main``.

    Example: ``train=h36m_train.npz,test=h36m_valid_protocol2.npz,images=/data/h36m``.
    """
    if not path:
        raise DatasetFormatError(
            f"dataset '{plugin}' needs a location: --dataset {plugin}:PATH or {plugin}:"
            + ",".join(f"{k}=..." for k in keys)
        )
    if "=" not in path:
        return {"main": path}
    out: dict[str, str] = {}
    for part in path.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise DatasetFormatError(
                f"dataset '{plugin}': cannot read '{part}' in '{path}'; expected key=value with keys {', '.join(keys)}"
            )
        out[key] = value.strip()
    return out


def split_indices(n: int, seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of one file's N samples (sorted indices; ≥ 1 test sample)."""
    if n < 2:
        raise DatasetFormatError(f"a single file needs at least 2 samples to split into train and test, got {n}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1])).permutation(n)
    num_test = max(1, round(n * test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def limit(index: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """At most ``count`` of ``index`` (a seeded choice, kept in file order)."""
    if count is None or count >= len(index):
        return index
    chosen = np.random.default_rng(np.random.SeedSequence([seed, 0x11A])).choice(len(index), size=count, replace=False)
    return index[np.sort(chosen)]


def gender_names(values: np.ndarray) -> np.ndarray:
    """SPIN/3DPW gender codes ('m', 'f', b'm', 'male' …) → 'male'/'female'/'neutral'."""
    out = []
    for v in values:
        s = v.decode() if isinstance(v, bytes) else str(v)
        out.append(_GENDERS.get(s.strip().lower(), "neutral"))
    return np.asarray(out)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields the ``(done, total)`` callback :func:`prepare_split` takes."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
