"""What pchmr's partitioners share about their options and the client count.

Every partitioner declares its options as a frozen dataclass (:mod:`pchmr.core.contracts.options`)
and reads them with ``read_options``; what only the data can tell is checked here, in the same
wording: :func:`label_option` resolves a ``label`` against ``data.labels``, and
:func:`check_num_clients` refuses impossible client counts (a
:class:`~pchmr.core.contracts.partition.PartitionError`).
"""

from __future__ import annotations

import numpy as np

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.options import option_error
from pchmr.core.contracts.partition import PartitionError

__all__ = ["check_num_clients", "label_option"]


def label_option(method: str, data: HMRData, key: str) -> np.ndarray:
    """The ``label`` option ``key`` resolved: a (N,) str array of the train split's labels;
    an :class:`~pchmr.core.contracts.errors.OptionError` naming the dataset's labels otherwise."""
    if key not in data.labels:
        available = ", ".join(sorted(data.labels)) or "none"
        raise option_error(method, "partitioner", "label", f"a label of this dataset ({available})", key)
    return np.asarray(data.labels[key]).astype(str)


def check_num_clients(method: str, num_clients: int, num_samples: int) -> None:
    """Refuse fewer than one client or more clients than training samples."""
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool) or num_clients < 1:
        raise PartitionError(f"{method}: --clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_samples:
        raise PartitionError(
            f"{method}: cannot split {num_samples} training samples into {num_clients} non-empty clients"
        )
