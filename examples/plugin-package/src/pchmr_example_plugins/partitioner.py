"""``round-robin``: shuffle the training samples with the seed, then deal them to the clients in turn.

Sample ``order[k]`` goes to client ``k mod num_clients``, so client sizes differ by at most one
and client 0 is never smaller than the last one. With ``stratify=<label>`` (a key of
``data.labels``, e.g. ``source``) the order is the label's values in sorted order, each value's
samples shuffled, one after the other: dealing then gives every client the same share of every
value, up to one sample (a stratified IID split).

Only pchmr's public API is used: :class:`~pchmr.api.Partition` and
:class:`~pchmr.api.PartitionError`, :func:`~pchmr.api.option`, :func:`~pchmr.api.read_options` and
:func:`~pchmr.api.option_error` for its one option, and :func:`~pchmr.api.hookimpl`. No torch
import: a partitioner reads labels only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pchmr.api import Partition, PartitionError, hookimpl, option, option_error, read_options

if TYPE_CHECKING:  # HMRData's module imports torch; the partitioner itself does not need it
    from pchmr.api import HMRData

__all__ = ["NAME", "RoundRobinOptions", "deal_order", "pchmr_partitioners", "round_robin"]

NAME = "round-robin"


@dataclass(frozen=True)
class RoundRobinOptions:
    """The options of ``round-robin`` (``--partition-option``)."""

    stratify: str | None = option(
        None, default_text="none", help="a label key (e.g. source): every client gets the same share of its values"
    )


def deal_order(order: np.ndarray, num_clients: int) -> tuple[np.ndarray, ...]:
    """Client ``c`` gets ``order[c], order[c + num_clients], ...``, returned sorted as int64."""
    return tuple(np.sort(order[client::num_clients]).astype(np.int64) for client in range(num_clients))


def _check_clients(num_clients: object, num_samples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise PartitionError(f"{NAME}: the number of clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_samples:
        raise PartitionError(
            f"{NAME}: cannot deal {num_samples} training samples to {num_clients} clients without an empty one; "
            f"use at most {num_samples} clients"
        )


def _shuffled_order(
    labels: Mapping[str, np.ndarray], num_samples: int, stratify: str | None, rng: np.random.Generator
) -> np.ndarray:
    """(N,) permutation of the sample indices: plain, or grouped by the ``stratify`` label's values."""
    if stratify is None:
        return rng.permutation(num_samples)
    if stratify not in labels:
        available = ", ".join(sorted(labels)) or "none"
        raise option_error(NAME, "partitioner", "stratify", f"a label of this dataset ({available})", stratify)
    values = np.asarray(labels[stratify]).astype(str)
    return np.concatenate([rng.permutation(np.flatnonzero(values == value)) for value in sorted(set(values.tolist()))])


def round_robin(data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition:
    """Deal a seeded shuffle of the training samples to ``num_clients`` clients in turn.

    Only ``len(data.train)`` and ``data.labels`` are read;
    ``options`` may hold ``stratify`` (a label key). Raises ``OptionError`` for a bad option or
    an unknown label and :class:`PartitionError` for a client count outside [1, N] (both
    are ``ValueError``).
    """
    stratify = read_options(RoundRobinOptions, options, plugin=NAME, kind="partitioner").stratify
    num_samples = len(data.train)  # type: ignore[arg-type]
    _check_clients(num_clients, num_samples)
    order = _shuffled_order(data.labels, num_samples, stratify, np.random.default_rng(seed))
    params = {"seed": seed, "num_clients": int(num_clients), "num_samples": num_samples, "stratify": stratify}
    return Partition(deal_order(order, int(num_clients)), NAME, params)


round_robin.options = RoundRobinOptions  # type: ignore[attr-defined]  # the DeclaresOptions capability


@hookimpl
def pchmr_partitioners() -> dict[str, object]:
    """Offer ``round-robin``."""
    return {NAME: round_robin}
