"""Option parsing shared by pchmr's partitioners.

Every partitioner receives its options as a mapping of kebab-case keys (``--partition-option
key=value`` on the command line, ``partition_options`` in a config file). These helpers refuse
unknown keys, resolve a ``label`` against ``data.labels``, parse numbers with a range and check
the client count, each with a :class:`~pchmr.core.contracts.partition.PartitionError` naming the
partitioner, the option, the value and what is expected.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.partition import PartitionError

__all__ = ["check_num_clients", "check_option_keys", "label_option", "number_option"]


def check_option_keys(method: str, options: Mapping[str, object], allowed: tuple[str, ...]) -> None:
    """Refuse option keys ``method`` does not know, listing the ones it does."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise PartitionError(f"the {method} partitioner has no option {unknown}; its options are: {known}")


def label_option(method: str, data: HMRData, options: Mapping[str, object], default: str) -> tuple[str, np.ndarray]:
    """``(key, labels)`` of the ``label`` option (default ``default``): a (N,) str array of the train split."""
    key = options.get("label", default)
    if not isinstance(key, str) or key not in data.labels:
        available = ", ".join(sorted(data.labels)) or "none"
        raise PartitionError(f"{method}: no label {key!r} in this dataset; label= must be one of: {available}")
    values = np.asarray(data.labels[key]).astype(str)
    return key, values


def number_option(
    method: str, options: Mapping[str, object], key: str, default: float, *, integer: bool, minimum: float, strict: bool
) -> float | int:
    """A numeric option: int or float (numeric strings accepted), ``> minimum`` if ``strict`` else ``>= minimum``."""
    raw = options.get(key, default)
    kind = "an integer" if integer else "a number"
    relation = ">" if strict else ">="
    try:
        if isinstance(raw, bool):
            raise TypeError
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PartitionError(f"{method}: {key}={raw!r} is not {kind}; expected {kind} {relation} {minimum:g}") from None
    if not np.isfinite(value) or (integer and not value.is_integer()):
        raise PartitionError(f"{method}: {key}={raw!r} is not {kind}; expected {kind} {relation} {minimum:g}")
    if (value <= minimum) if strict else (value < minimum):
        raise PartitionError(f"{method}: {key}={raw!r} is out of range; expected {kind} {relation} {minimum:g}")
    return int(value) if integer else value


def check_num_clients(method: str, num_clients: int, num_samples: int) -> None:
    """Refuse fewer than one client or more clients than training samples."""
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool) or num_clients < 1:
        raise PartitionError(f"{method}: --clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_samples:
        raise PartitionError(
            f"{method}: cannot split {num_samples} training samples into {num_clients} non-empty clients"
        )
