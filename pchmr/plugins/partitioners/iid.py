"""``iid``: a uniformly random split of the training samples into near-equal clients."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import NoOptions, read_options
from pchmr.core.contracts.partition import Partition
from pchmr.plugins.partitioners._options import check_num_clients


def iid(data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition:
    """Shuffle the indices with ``seed`` and deal them into ``num_clients`` sizes differing by at most one."""
    read_options(NoOptions, options, plugin="iid", kind="partitioner")
    n = len(data.train)  # type: ignore[arg-type]
    check_num_clients("iid", num_clients, n)
    order = np.random.default_rng(seed).permutation(n)
    clients = tuple(np.sort(chunk).astype(np.int64) for chunk in np.array_split(order, num_clients))
    return Partition(clients, "iid", {"seed": seed, "num_clients": num_clients, "num_samples": n})


iid.options = NoOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_partitioners() -> dict[str, object]:
    return {"iid": iid}
