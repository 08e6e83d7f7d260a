"""``by-source``: every client holds samples of a single source (``--partitioner by-source``).

The mixed-dataset setting of the PCHMR paper: each source dataset (``label``, default
``source``) is owned by one or more clients, never shared. Clients are allocated to sources in
proportion to their sizes by largest-remainder (Hamilton) rounding with at least one client per
source (:func:`allocate_clients`); within a source its samples are shuffled with ``seed`` and dealt
into near-equal clients (sizes differ by at most one). Clients are numbered source by source,
sources in sorted order; ``params["client_values"]`` names the source of every client.

Options: ``label`` (a key of ``data.labels``, default :data:`DEFAULT_LABEL`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.partition import Partition, PartitionError
from pchmr.plugins.partitioners._options import check_num_clients, label_option

__all__ = ["DEFAULT_LABEL", "BySourceOptions", "allocate_clients", "by_source", "pchmr_partitioners"]

DEFAULT_LABEL = "source"


@dataclass(frozen=True)
class BySourceOptions:
    """``--partition-option`` values of ``by-source``."""

    label: str = option(DEFAULT_LABEL, help="the meta label naming each sample's source; no value is shared")


def allocate_clients(sizes: Sequence[int], num_clients: int) -> list[int]:
    """Clients per source, proportional to ``sizes``, each ≥ 1, summing to ``num_clients``.

    Quotas ``q_s = num_clients · n_s / N``; start from ``max(1, floor(q_s))``; hand missing
    clients to the largest remainders ``q_s - a_s`` (ties: larger source, then earlier one);
    if the minimum of one pushed the total over, take clients back from the sources most
    above their quota among those holding more than one. Example: sizes (50, 30, 15, 5) and
    9 clients → quotas (4.5, 2.7, 1.35, 0.45) → start (4, 2, 1, 1) → (4, 3, 1, 1).
    """
    counts = np.asarray(sizes, dtype=np.int64)
    if len(counts) == 0 or (counts < 1).any():
        raise ValueError(f"every source needs at least one sample, got sizes {list(map(int, counts))}")
    if num_clients < len(counts):
        raise ValueError(f"{num_clients} clients cannot cover {len(counts)} sources with one client each")
    quotas = num_clients * counts / counts.sum()
    seats = np.maximum(1, np.floor(quotas).astype(np.int64))
    order = range(len(counts))
    while seats.sum() < num_clients:
        best = max(order, key=lambda s: (quotas[s] - seats[s], counts[s], -s))
        seats[best] += 1
    while seats.sum() > num_clients:
        best = max((s for s in order if seats[s] > 1), key=lambda s: (seats[s] - quotas[s], -counts[s], s))
        seats[best] -= 1
    return [int(x) for x in seats]


def by_source(data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition:
    """Single-source clients, allocated to sources by size and split IID within a source."""
    key = read_options(BySourceOptions, options, plugin="by-source", kind="partitioner").label
    labels = label_option("by-source", data, key)
    check_num_clients("by-source", num_clients, len(labels))
    values = sorted(set(labels.tolist()))
    if num_clients < len(values):
        raise PartitionError(
            f"by-source: '{key}' has {len(values)} values ({', '.join(values)}), each needs its own client; "
            f"--clients must be at least {len(values)}, got {num_clients}"
        )
    members = [np.flatnonzero(labels == value) for value in values]
    seats = allocate_clients([len(m) for m in members], num_clients)
    rng = np.random.default_rng(seed)
    clients: list[np.ndarray] = []
    client_values: list[str] = []
    for value, indices, count in zip(values, members, seats):
        shuffled = rng.permutation(indices)
        clients.extend(np.sort(chunk).astype(np.int64) for chunk in np.array_split(shuffled, count))
        client_values.extend([value] * count)
    params = {"seed": seed, "num_clients": num_clients, "num_samples": len(labels), "label": key,
              "allocation": dict(zip(values, seats)), "client_values": client_values}  # fmt: skip
    return Partition(tuple(clients), "by-source", params)


by_source.options = BySourceOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_partitioners() -> dict[str, object]:
    return {"by-source": by_source}
