"""The dataset contract: prepared splits of Samples plus the labels partitioners read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from torch.utils.data import Dataset

from pchmr.core.contracts.bodymodel import BodyModel

__all__ = ["DatasetFactory", "DatasetSpec", "ExpectedFile", "FileChecker", "HMRData", "label_values"]


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset factory receives.

    ``path`` is the plugin-specific location (``spin-npz:PATH`` on the command line puts PATH
    here; the synthetic dataset ignores it). ``cache_dir`` is where prepared data live; a
    dataset prepares once and reads the cache afterwards. ``image_size`` is the square crop
    side in pixels the backbone expects.
    """

    image_size: int
    seed: int
    cache_dir: Path
    path: str | None = None
    num_train: int | None = None
    num_test: int | None = None
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass
class HMRData:
    """The prepared data of one dataset.

    * ``train`` / ``test``: map-style datasets of Samples (:mod:`pchmr.core.contracts.sample`);
    * ``labels``: for each ``meta`` key, a (N_train,) array of string labels of the *train*
      split, index-aligned with ``train`` (what partitioners split on, without touching images);
    * ``protocol``: JSON-able; the dataset name (``dataset``), the ground-truth kind (``gt``:
      ``real`` or ``pseudo``) and anything else that must be printed next to a number computed
      on ``test``;
    * ``train_mean_joints``: optional (J, 3) mean of the training split's valid joints
      (root-relative metres, camera frame); ``extra``: anything plugin-specific (cache paths).
    """

    train: Dataset
    test: Dataset
    labels: Mapping[str, np.ndarray]
    protocol: Mapping[str, object]
    train_mean_joints: np.ndarray | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.train)  # type: ignore[arg-type]
        for key, values in self.labels.items():
            if len(values) != n:
                raise ValueError(f"labels[{key!r}] has {len(values)} entries for {n} training samples")


@runtime_checkable
class DatasetFactory(Protocol):
    """``factory(spec, body_model) -> HMRData``; raises with the file and the expectation on bad data."""

    def __call__(self, spec: DatasetSpec, body_model: BodyModel) -> HMRData: ...


@dataclass(frozen=True)
class ExpectedFile:
    """One file (or image folder) a dataset reads under a data root, and whether it is there.

    ``role`` is ``train``, ``test``, ``images`` or ``test images``; ``format`` the layout that
    reads it (a dataset plugin's name); ``obtain`` says where a user gets it (nothing is
    downloaded). ``required``: the loader needs it, given what else is there (a test file the
    format can do without, by splitting its training file, is not required; its images are when
    it is present). A layout is usable when its training file is present and every required
    file is: ``pchmr data check`` and the loader apply that one rule."""

    dataset: str
    format: str
    role: str
    path: Path
    present: bool
    obtain: str
    required: bool = True


@runtime_checkable
class FileChecker(Protocol):
    """Optional capability of a dataset factory that reads a data root: an ``expected_files``
    attribute ``(root: Path) -> list[ExpectedFile]`` listing what it would read there
    (``pchmr data check ROOT`` prints it). It never reads the files, only looks for them."""

    def expected_files(self, root: Path) -> list[ExpectedFile]: ...


def label_values(labels: Mapping[str, np.ndarray], key: str) -> Sequence[str]:
    """Sorted distinct values of one label, with a clear error for an unknown label."""
    if key not in labels:
        raise KeyError(f"no label {key!r}; this dataset has {sorted(labels)}")
    return sorted(set(labels[key].tolist()))
