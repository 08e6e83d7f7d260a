"""``natural``: one client per distinct value of a ``meta`` label (``--partitioner natural``).

The federated analogue of "one site, one dataset": with the default ``label=scene`` each client
holds every sample of one background scene. Client ``c`` holds the ``c``-th value in sorted
order (recorded in ``params["values"]``), so ``--clients`` must equal the number of values.
The split uses no randomness; ``seed`` is recorded only.

Options: ``label`` (a key of ``data.labels``, default :data:`DEFAULT_LABEL`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.partition import Partition, PartitionError
from pchmr.plugins.partitioners._options import label_option

__all__ = ["DEFAULT_LABEL", "NaturalOptions", "natural", "pchmr_partitioners"]

DEFAULT_LABEL = "scene"


@dataclass(frozen=True)
class NaturalOptions:
    """``--partition-option`` values of ``natural``."""

    label: str = option(DEFAULT_LABEL, help="the meta label: one client per distinct value")


def natural(data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition:
    """Client ``c`` = the samples whose ``label`` is the ``c``-th distinct value (sorted)."""
    key = read_options(NaturalOptions, options, plugin="natural", kind="partitioner").label
    labels = label_option("natural", data, key)
    values = sorted(set(labels.tolist()))
    if num_clients != len(values):
        raise PartitionError(
            f"natural partition by '{key}' has {len(values)} values; --clients must be {len(values)}, got {num_clients}"
        )
    clients = tuple(np.flatnonzero(labels == value).astype(np.int64) for value in values)
    params = {"seed": seed, "num_clients": num_clients, "num_samples": len(labels), "label": key, "values": values}
    return Partition(clients, "natural", params)


natural.options = NaturalOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_partitioners() -> dict[str, object]:
    return {"natural": natural}
