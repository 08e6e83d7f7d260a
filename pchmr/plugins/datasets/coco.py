"""``coco``: COCO person keypoints (2D only) from the official JSON annotations.

Layout under ROOT: ``annotations/person_keypoints_<split>.json`` and ``<split>/<file_name>``
(``train2014``/``val2014`` or ``train2017``/``val2017``). The JSON's ``images`` give ``id`` and
``file_name``; each of its ``annotations`` with ``category_id`` 1 and ``iscrowd`` 0 that passes
the ``people`` rule becomes one sample: by default (``min-keypoints``) at least ``min_keypoints``
labelled keypoints (default :data:`MIN_KEYPOINTS`); with ``people=spin``, SPIN's rule
(``datasets/preprocess/coco.py``): all 12 body joints labelled (:data:`SPIN_BODY_JOINTS`,
shoulders to ankles; the face may be unlabelled). ``keypoints`` (51 numbers: x, y, v per
COCO-17 joint; v = 0 unlabelled, 1 occluded, 2 visible → confidence 1 when v > 0), box from
``bbox`` [x, y, w, h] as SPIN crops COCO (centre of the box, side 1.2 · max(w, h)). There are no
3D labels: joints have validity 0 and ``has_vertices`` is 0; ``source`` is ``coco``;
subject/scene/action are ``unknown``.

Splits: ``train`` (default ``train2014``, or ``train2017`` when only that exists) and ``test``
(default the matching ``val2014``/``val2017``). When ``test`` is not given and the matching
validation annotations are absent, the test split is a seeded 80/20 split of the training
split by image (the people of one image stay on one side), as for the other train-only
releases; a ``test`` that is named must exist. ``pchmr data check`` applies the same rule.

Location: ``--dataset coco-json:ROOT`` (the ``coco`` folder; ``--dataset coco:DATA_ROOT`` finds
it as ``DATA_ROOT/coco``) or
``coco-json:root=ROOT,train=train2017,test=val2017[,min_keypoints=K][,people=spin][,protocol=…]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.contracts.dataset import DatasetSpec, HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option
from pchmr.core.kit.joints import COCO_17, remap
from pchmr.plugins.datasets.prepared import (
    Annotations,
    DatasetFormatError,
    FolderImages,
    limit,
    make_hmr_data,
    prepare_split,
    progress_bar,
    read_location,
    split_indices,
)

__all__ = [
    "MIN_KEYPOINTS",
    "PEOPLE_RULES",
    "SPIN_BODY_JOINTS",
    "CocoOptions",
    "load_coco",
    "make_coco",
    "pchmr_datasets",
]

MIN_KEYPOINTS = 6
BOX_FACTOR = 1.2
PERSON_CATEGORY = 1
SPLIT_NAMES = (("train2014", "val2014"), ("train2017", "val2017"))
#: The 12 body joints SPIN's COCO preprocessing requires all labelled (COCO-17 indices 5-16).
SPIN_BODY_JOINTS = COCO_17[5:]
#: Which annotated people become samples (the ``people`` option).
PEOPLE_RULES = ("min-keypoints", "spin")


@dataclass(frozen=True)
class CocoOptions:
    """Where ``coco-json`` reads: the ``key=value`` pairs of its ``--dataset`` path, or ``DatasetSpec.options``."""

    root: str | None = option(None, help="the COCO root (annotations/, train2014/, …); a bare path is the root")
    train: str | None = option(None, default_text="train2014 or train2017", help="the training split's name")
    test: str | None = option(
        None,
        default_text="val2014 or val2017; else 80/20 of train",
        help="the test split's name (unset and the matching val annotations absent: a seeded 80/20 split of train)",
    )
    min_keypoints: int | None = option(
        None, low=1, key="min_keypoints", default_text=str(MIN_KEYPOINTS),
        help="fewest labelled keypoints of a person (people=min-keypoints)",
    )  # fmt: skip
    people: str | None = option(
        None, choices=PEOPLE_RULES, default_text="min-keypoints",
        help="which people become samples: min-keypoints (at least min_keypoints of the 17 labelled) or spin "
        "(SPIN's rule: all 12 body joints, shoulders to ankles, labelled)",
    )  # fmt: skip
    protocol: str | None = option(
        None, default_text="metro", help="the evaluation protocol (a name of pchmr.core.kit.joints.PROTOCOLS)"
    )

    def __post_init__(self) -> None:
        if self.people == "spin" and self.min_keypoints is not None:
            raise ValueError(
                "'min_keypoints' applies to people=min-keypoints, not spin (which keeps the people whose 12 body "
                "joints are all labelled)"
            )


def annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"person_keypoints_{split}.json"


def load_coco(
    root: str | Path, split: str, joint_names: tuple[str, ...], min_keypoints: int = MIN_KEYPOINTS,
    people: str = "min-keypoints",
) -> tuple[Annotations, Path]:  # fmt: skip
    """The person samples of one COCO split and the JSON read; ``people`` is a rule of
    :data:`PEOPLE_RULES` (see the module docstring)."""
    if people not in PEOPLE_RULES:
        raise ValueError(f"people must be one of {', '.join(PEOPLE_RULES)}, got {people!r}")
    root = Path(root)
    path = annotation_file(root, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: COCO keypoint annotations do not exist (expected ROOT/annotations/person_keypoints_{split}.json)"
        )
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: not valid JSON (truncated?): {exc}") from exc
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise DatasetFormatError(f"{path}: expected a COCO JSON object with 'images' and 'annotations'")
    files = {}
    for image in doc["images"]:
        if "id" not in image or "file_name" not in image:
            raise DatasetFormatError(f"{path}: an entry of 'images' lacks 'id' or 'file_name': {image!r}")
        files[image["id"]] = f"{split}/{image['file_name']}"
    names, boxes, points = [], [], []
    for k, ann in enumerate(doc["annotations"]):
        if ann.get("category_id", PERSON_CATEGORY) != PERSON_CATEGORY or ann.get("iscrowd", 0):
            continue
        for key in ("image_id", "keypoints", "bbox"):
            if key not in ann:
                raise DatasetFormatError(f"{path}: annotation {k} (id {ann.get('id')}) lacks '{key}'")
        kp = np.asarray(ann["keypoints"], dtype=np.float64)
        if kp.shape != (51,):
            raise DatasetFormatError(
                f"{path}: annotation {k} 'keypoints' must hold 51 numbers (17 × x, y, v), got {kp.size}"
            )
        kp = kp.reshape(17, 3)
        labelled = kp[:, 2] > 0
        if (people == "spin" and not labelled[5:].all()) or (people != "spin" and labelled.sum() < min_keypoints):
            continue
        if ann["image_id"] not in files:
            raise DatasetFormatError(f"{path}: annotation {k} refers to image_id {ann['image_id']} not in 'images'")
        box = np.asarray(ann["bbox"], dtype=np.float64)
        if box.shape != (4,) or not (box[2:] > 0).all():
            raise DatasetFormatError(
                f"{path}: annotation {k} 'bbox' must be [x, y, w, h] with w, h > 0, got {ann['bbox']}"
            )
        names.append(files[ann["image_id"]])
        boxes.append(box)
        points.append(kp)
    n = len(names)
    if n == 0:
        wanted = (
            "all 12 body joints (shoulders to ankles) labelled, as people=spin asks"
            if people == "spin"
            else f"at least {min_keypoints} labelled keypoints"
        )
        raise DatasetFormatError(f"{path}: no person annotation with {wanted}")
    boxes_a, kp_a = np.stack(boxes), np.stack(points)
    kp_a[..., 2] = (kp_a[..., 2] > 0).astype(np.float64)
    order = np.argsort(np.array(names), kind="stable")  # samples of one image together: decoded once
    labels = {key: np.full(n, "unknown") for key in ("subject", "scene", "action")}
    labels["source"] = np.full(n, "coco")
    ann_all = Annotations(
        image=np.array(names), center=boxes_a[:, :2] + boxes_a[:, 2:] / 2.0,
        scale=BOX_FACTOR * boxes_a[:, 2:].max(axis=1) / 200.0, keypoints=remap(kp_a, COCO_17, joint_names),
        joints=np.zeros((n, len(joint_names), 4)), labels=labels, origin=str(path),
    )  # fmt: skip
    return ann_all.take(order), path


def make_coco(spec: DatasetSpec, body_model: BodyModel) -> HMRData:
    """The factory registered as ``coco-json`` (see the module docstring)."""
    where = read_location("coco-json", spec, CocoOptions)
    root = Path(where.get("root", where.get("main", ""))).expanduser()
    pair = next((p for p in SPLIT_NAMES if annotation_file(root, p[0]).is_file()), SPLIT_NAMES[0])
    train = where.get("train", pair[0])
    pair = next((p for p in SPLIT_NAMES if p[0] == train), pair)
    test = where.get("test") or (pair[1] if annotation_file(root, pair[1]).is_file() else None)
    people = where.get("people", "min-keypoints")
    min_kp = int(where.get("min_keypoints", MIN_KEYPOINTS))
    protocol = where.get("protocol", "metro")
    ann, path = load_coco(root, train, body_model.joint_names, min_kp, people)
    if test is None:  # no validation annotations: a seeded 80/20 split of train, by image
        images = np.unique(ann.image)
        train_images, test_images = split_indices(len(images), spec.seed)
        parts = {"train": (ann.take(np.flatnonzero(np.isin(ann.image, images[train_images]))), path),
                 "test": (ann.take(np.flatnonzero(np.isin(ann.image, images[test_images]))), path)}  # fmt: skip
        name = f"coco-json:{train} (seeded 80/20 split by image: no {annotation_file(root, pair[1]).name})"
    else:
        parts = {"train": (ann, path), "test": load_coco(root, test, body_model.joint_names, min_kp, people)}
        name = f"coco-json:{test}"
    counts = {"train": spec.num_train, "test": spec.num_test}
    stores = {}
    for split, (split_ann, split_path) in parts.items():
        chosen = split_ann.take(limit(np.arange(len(split_ann)), counts[split], spec.seed))
        images_of = FolderImages(root, listed_in=str(split_path))
        images_of.check_exist(chosen.image.tolist())
        with progress_bar(f"preparing coco {split_path.stem.removeprefix('person_keypoints_')} {split} "
                          f"({spec.image_size}px)") as update:  # fmt: skip
            stores[split] = prepare_split(chosen, images_of, spec=spec, body_model=body_model, name=f"coco-{split}",
                                          sources=[split_path], protocol=protocol, progress=update)  # fmt: skip
    if people == "spin":
        name += " (people=spin: all 12 body joints labelled)"
    return make_hmr_data(name, stores["train"], stores["test"], body_model, protocol, {"note": "2D keypoints only"})


make_coco.options = CocoOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_datasets() -> Mapping[str, Any]:
    return {"coco-json": make_coco}
