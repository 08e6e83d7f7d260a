"""``lda``: Dirichlet label skew over any ``meta`` label (``--partitioner lda``).

For every value ``k`` of the label (sorted), the samples of class ``k`` are shuffled and cut
into ``num_clients`` consecutive runs whose lengths follow proportions ``p_k ~ Dir(alpha·1)``
drawn over the clients: the per-class construction popularised by Yurochkin et al. 2019 and
Hsu et al. 2019 ("latent Dirichlet allocation" partitions). Small ``alpha`` gives each client
few classes *and* a long tail of client sizes (a client's size is the sum of its shares of every
class); ``alpha`` → ∞ tends to an IID split into equal clients.

If a draw leaves some client with fewer than ``min-size`` samples the proportions are drawn
again (the same seeded stream continues, so the result stays deterministic), at most
:data:`MAX_DRAWS` times; then :class:`PartitionError` says how far the best draw was and what to
change. Very small ``alpha`` with many clients and few classes cannot be met (e.g. α = 0.1 over
100 clients and 4 sources of 2000 samples: the best of 1000 draws leaves 15 clients short).

Options (kebab-case): ``alpha`` (> 0, default :data:`DEFAULT_ALPHA`), ``label`` (a key of
``data.labels``, default ``"source"``), ``min-size`` (≥ 1, default :data:`DEFAULT_MIN_SIZE`).

Why not flwr-datasets' ``DirichletPartitioner``: it partitions a Hugging Face ``datasets.Dataset``
(pulling in ``datasets`` and ``pyarrow``) while pchmr partitions a (N,) array of labels; it
rebalances by default (``self_balancing``, which flattens the size long tail we want to study),
does not shuffle a class before cutting it, retries a fixed 10 times with warnings and raises a
bare ``ValueError``. The construction itself is a dozen lines, written here on numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.partition import Partition, PartitionError
from pchmr.plugins.partitioners._options import check_num_clients, label_option

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_LABEL",
    "DEFAULT_MIN_SIZE",
    "MAX_DRAWS",
    "LDAOptions",
    "dirichlet_split",
    "lda",
    "pchmr_partitioners",
]

DEFAULT_ALPHA = 0.5
DEFAULT_LABEL = "source"
DEFAULT_MIN_SIZE = 2
#: Dirichlet draws tried before giving up on ``min-size``.
MAX_DRAWS = 1000


@dataclass(frozen=True)
class LDAOptions:
    """``--partition-option`` values of ``lda``."""

    alpha: float = option(
        DEFAULT_ALPHA, low=0.0, low_open=True, help="Dirichlet concentration: small = skewed clients and sizes"
    )
    label: str = option(DEFAULT_LABEL, help="the meta label whose values are skewed over the clients")
    min_size: int = option(DEFAULT_MIN_SIZE, low=1, help="fewest samples per client; the draw is repeated until met")


# ----------------------------------------------------------------------------- the split
def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One Dirichlet draw: ``num_clients`` sorted int64 index arrays (some possibly empty).

    ``labels`` (N,); for each distinct value (sorted), its indices are shuffled with ``rng`` and
    cut at ``round(cumsum(p) · n_k)`` for ``p ~ Dir(alpha)`` over the clients.
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


def lda(data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition:
    """Dirichlet(alpha) skew of ``label`` over ``num_clients`` clients of at least ``min-size`` samples."""
    opts = read_options(LDAOptions, options, plugin="lda", kind="partitioner")
    alpha, min_size, key = opts.alpha, opts.min_size, opts.label
    labels = label_option("lda", data, key)
    n = len(labels)
    check_num_clients("lda", num_clients, n)
    if min_size * num_clients > n:
        raise PartitionError(
            f"lda: min-size={min_size} × {num_clients} clients needs {min_size * num_clients} samples, "
            f"the training split has {n}; lower min-size or --clients"
        )
    rng = np.random.default_rng(seed)
    fewest_short = num_clients
    for draw in range(1, MAX_DRAWS + 1):
        clients = dirichlet_split(labels, num_clients, alpha, rng)
        short = sum(len(c) < min_size for c in clients)
        if short == 0:
            params = {"seed": seed, "num_clients": num_clients, "num_samples": n, "label": key, "alpha": alpha,
                      "min_size": min_size, "draws": draw, "classes": sorted(set(labels.tolist()))}  # fmt: skip
            return Partition(tuple(clients), "lda", params)
        fewest_short = min(fewest_short, short)
    raise PartitionError(
        f"lda: no Dirichlet draw with alpha={alpha:g} gave all {num_clients} clients at least min-size={min_size} "
        f"samples in {MAX_DRAWS} draws (best draw: {fewest_short} clients short) from {n} samples of "
        f"{len(set(labels.tolist()))} '{key}' classes; raise alpha, lower --clients or min-size"
    )


lda.options = LDAOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_partitioners() -> dict[str, object]:
    return {"lda": lda}
