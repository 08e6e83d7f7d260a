"""The partitioner contract and the on-disk ``partition.json``.

A partitioner splits the training split's sample indices into client sets. Most read only the
``meta`` labels (``data.labels``); feature-based ones (``cnn-cluster``) may read the training
images (``data.train``). It must be deterministic in ``seed`` and return disjoint, non-empty
clients covering a subset of the samples (usually all of them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from pchmr.core.contracts.dataset import HMRData

__all__ = ["ExplainedPartitioner", "Partition", "PartitionError", "Partitioner", "load_partition", "save_partition"]


class PartitionError(ValueError):
    """A partition cannot be made with these options (raised before any training starts)."""


@dataclass(frozen=True)
class Partition:
    """``clients[c]`` is a sorted int64 array of training-sample indices of client ``c``."""

    clients: tuple[np.ndarray, ...]
    method: str
    params: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for cid, idx in enumerate(self.clients):
            if len(idx) == 0:
                raise PartitionError(f"client {cid} of the '{self.method}' partition holds no sample")
            overlap = seen.intersection(idx.tolist())
            if overlap:
                raise PartitionError(f"client {cid} shares samples {sorted(overlap)[:5]} with another client")
            seen.update(idx.tolist())

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def sizes(self) -> np.ndarray:
        return np.array([len(c) for c in self.clients], dtype=np.int64)

    def to_json(self) -> str:
        body = {
            "method": self.method,
            "params": dict(self.params),
            "num_clients": self.num_clients,
            "clients": {str(cid): [int(i) for i in idx] for cid, idx in enumerate(self.clients)},
        }
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return json.dumps({**body, "sha256": digest}, sort_keys=True, indent=1) + "\n"


@runtime_checkable
class Partitioner(Protocol):
    """``partitioner(data, num_clients, seed, options) -> Partition``.

    ``data`` is the dataset's :class:`~pchmr.core.contracts.dataset.HMRData`: ``data.labels`` maps each
    ``meta`` key to a (N,) array of string labels of the training split, ``data.train`` holds
    its Samples. ``options`` holds partitioner-specific values (e.g. ``alpha``, ``label``).
    Raise :class:`PartitionError` naming the option and the valid range for impossible
    requests — before any training starts.
    """

    def __call__(self, data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition: ...


@runtime_checkable
class ExplainedPartitioner(Protocol):
    """Optional capability: a partitioner that can also return what it computed to decide (a
    feature-based one: the features and their clusters) as an attribute
    ``with_details(data, num_clients, seed, options) -> (Partition, details)``. ``details`` has
    ``features`` (N, D) and ``cluster_ids`` (N,) arrays; ``pchmr partition`` plots them."""

    def with_details(
        self, data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]
    ) -> tuple[Partition, Any]: ...


def save_partition(partition: Partition, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(partition.to_json())
    tmp.replace(path)


def load_partition(path: Path) -> Partition:
    data = json.loads(Path(path).read_text())
    body = {k: v for k, v in data.items() if k != "sha256"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if digest != data.get("sha256"):
        raise PartitionError(f"{path}: content hash mismatch; the partition file was modified or truncated")
    clients: Sequence[np.ndarray] = [
        np.asarray(data["clients"][str(c)], dtype=np.int64) for c in range(int(data["num_clients"]))
    ]
    return Partition(tuple(clients), data["method"], data["params"])
