"""``cnn-cluster``: clients of visually similar images (``--partitioner cnn-cluster``).

Feature skew without labels: every training image (3, S, S) goes through a CNN encoder of
:mod:`pchmr.core.kit.encoders` (in eval mode, batches of ``batch-size`` under
``torch.no_grad``), its (C, h, w) feature grid is averaged to a C-vector, every dimension is
standardised over the split, and scikit-learn's ``MiniBatchKMeans`` groups the vectors into
``clusters`` clusters (:func:`cluster_features`). If ``clusters == num_clients`` each cluster is
one client; otherwise the clusters, largest first, are dealt to the clients round-robin.

Encoders: by default pchmr's ``small`` encoder with a fixed random initialisation seeded by the
partition seed and He-normal convolutions (random CNN features still separate brightness, layout
and texture; on the synthetic data they cluster only weakly by source or scene); with
``weights=PATH`` a local ImageNet ResNet-50 file in torchvision's layout (``encoder`` then
defaults to ``resnet50``; its sha256 is recorded). Nothing is cached: :func:`cluster_partition`
returns the features with the partition (``pchmr partition`` plots them).

Options: ``clusters`` (int ≥ ``num_clients``, default ``num_clients``), ``weights`` (path, or
``none``: unset, for a config scale overriding a file's path),
``encoder`` (``small`` or ``resnet50``), ``batch-size`` (default :data:`DEFAULT_BATCH_SIZE`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, option_error, read_options
from pchmr.core.contracts.partition import Partition, PartitionError
from pchmr.plugins.partitioners._options import check_num_clients

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "CNNClusterOptions",
    "ClusterResult",
    "assign_clusters",
    "cluster_features",
    "cluster_partition",
    "cnn_cluster",
    "encode_images",
    "pchmr_partitioners",
]

DEFAULT_BATCH_SIZE = 64
#: k-means restarts (the best inertia wins) and mini-batch size (scikit-learn's default).
KMEANS_INIT = 3
KMEANS_BATCH = 1024
#: Floor of a feature's standard deviation when standardising (constant features stay 0).
STD_EPS = 1e-8
#: scikit-learn random states must fit in 32 bits.
SKLEARN_SEED_MODULUS = 2**32
TORCH_SEED_MODULUS = 2**63
ENCODER_NAMES = ("small", "resnet50")
#: ``weights`` meaning no file: a seeded random encoder (a config file cannot write None).
NO_WEIGHTS = "none"


@dataclass(frozen=True)
class ClusterResult:
    """``features`` (N, C) standardised pooled features; ``cluster_ids`` (N,) int64 in [0, clusters)."""

    features: np.ndarray
    cluster_ids: np.ndarray
    encoder: str
    weights_sha256: str | None


def _image_size(data: HMRData) -> int:
    image = data.train[0]["image"]
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
        raise PartitionError(f"cnn-cluster needs square (3, S, S) training images, got shape {tuple(image.shape)}")
    return int(image.shape[-1])


def _build_encoder(name: str, input_size: int, weights: str | None, seed: int) -> torch.nn.Module:
    """The encoder in eval mode, loaded from ``weights`` or randomly initialised from ``seed``.

    Random convolutions get He-normal (fan-in, ReLU) weights: PyTorch's default initialisation
    shrinks the activations at every layer, and after the small encoder's dozen convolutions the
    pooled features are ~1e-6 in scale and mostly numerical noise once standardised. The global
    torch RNG is left untouched.
    """
    from pchmr.core.kit.encoders import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % TORCH_SEED_MODULUS)
        try:
            encoder = build_encoder(name, input_size, weights=weights)
        except (OSError, ValueError) as exc:
            raise PartitionError(f"cnn-cluster: cannot build the {name} encoder: {exc}") from exc
        if weights is None:
            for module in encoder.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    return encoder.eval()


def encode_images(data: HMRData, encoder: torch.nn.Module, batch_size: int) -> np.ndarray:
    """(N, C) float64: global average pool of the encoder's feature grid for every training image."""
    n = len(data.train)  # type: ignore[arg-type]
    pooled = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = torch.stack([data.train[i]["image"] for i in range(start, min(start + batch_size, n))])
            pooled.append(encoder(batch.float()).mean(dim=(2, 3)).double().numpy())
    return np.concatenate(pooled)


def cluster_features(
    data: HMRData,
    num_clusters: int,
    seed: int,
    *,
    encoder: str = "small",
    weights: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ClusterResult:
    """Encode, pool and standardise every training image, then MiniBatchKMeans into ``num_clusters``."""
    from sklearn.cluster import MiniBatchKMeans

    model = _build_encoder(encoder, _image_size(data), weights, seed)
    raw = encode_images(data, model, batch_size)
    features = (raw - raw.mean(axis=0)) / np.maximum(raw.std(axis=0), STD_EPS)
    kmeans = MiniBatchKMeans(
        n_clusters=num_clusters, random_state=seed % SKLEARN_SEED_MODULUS, n_init=KMEANS_INIT, batch_size=KMEANS_BATCH
    )
    ids = kmeans.fit_predict(features).astype(np.int64)
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest() if weights else None
    return ClusterResult(features, ids, encoder, digest)


def assign_clusters(cluster_ids: np.ndarray, num_clusters: int, num_clients: int) -> list[int]:
    """Client of every cluster: the identity if the counts match, else clusters sorted by size
    (largest first, ties by id) dealt round-robin to the clients."""
    if num_clusters == num_clients:
        return list(range(num_clusters))
    sizes = np.bincount(cluster_ids, minlength=num_clusters)
    order = sorted(range(num_clusters), key=lambda k: (-sizes[k], k))
    client_of = [0] * num_clusters
    for rank, cluster in enumerate(order):
        client_of[cluster] = rank % num_clients
    return client_of


@dataclass(frozen=True)
class CNNClusterOptions:
    """``--partition-option`` values of ``cnn-cluster``."""

    clusters: int | None = option(
        None,
        low=1,
        default_text="--clients",
        help="k-means clusters (>= --clients), dealt to the clients largest first",
    )
    weights: str | None = option(
        None,
        help="a local state dict of the encoder (torchvision's resnet50 layout for encoder=resnet50); "
        "'none': a seeded random encoder (a config file's way to unset it)",
    )
    encoder: str | None = option(
        None, choices=ENCODER_NAMES, default_text="resnet50 with weights, else small", help="the CNN feature encoder"
    )
    batch_size: int = option(DEFAULT_BATCH_SIZE, low=1, help="images per encoder forward pass")


def _options(options: Mapping[str, object], num_clients: int) -> tuple[int, str, str | None, int]:
    opts = read_options(CNNClusterOptions, options, plugin="cnn-cluster", kind="partitioner")
    clusters = num_clients if opts.clusters is None else opts.clusters
    if clusters < num_clients:
        rule = f"at least --clients {num_clients} (every client needs a cluster)"
        raise option_error("cnn-cluster", "partitioner", "clusters", rule, clusters)
    weights = None if opts.weights is None or opts.weights.strip().lower() == NO_WEIGHTS else opts.weights
    if weights is not None and not Path(weights).is_file():
        raise option_error(
            "cnn-cluster", "partitioner", "weights", "an existing file (the encoder's state dict) or 'none'", weights
        )
    encoder = opts.encoder or ("resnet50" if weights is not None else "small")
    return clusters, encoder, weights, opts.batch_size


def cnn_cluster(data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition:
    """Cluster CNN features into ``clusters`` groups and hand whole clusters to clients."""
    return cluster_partition(data, num_clients, seed, options)[0]


def cluster_partition(
    data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]
) -> tuple[Partition, ClusterResult]:
    """:func:`cnn_cluster` and the features it clustered (for plots, without encoding twice)."""
    n = len(data.train)  # type: ignore[arg-type]
    check_num_clients("cnn-cluster", num_clients, n)
    clusters, encoder, weights, batch_size = _options(options, num_clients)
    if clusters > n:
        raise PartitionError(f"cnn-cluster: clusters={clusters} is more than the {n} training samples")
    result = cluster_features(data, clusters, seed, encoder=encoder, weights=weights, batch_size=batch_size)
    client_of = np.asarray(assign_clusters(result.cluster_ids, clusters, num_clients), dtype=np.int64)
    owner = client_of[result.cluster_ids]
    parts = tuple(np.flatnonzero(owner == c).astype(np.int64) for c in range(num_clients))
    empty = [c for c, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(
            f"cnn-cluster: k-means left clients {empty[:5]} without samples ({len(empty)} of {num_clients}); "
            "lower --clients or raise clusters"
        )
    params = {"seed": seed, "num_clients": num_clients, "num_samples": n, "clusters": clusters, "encoder": encoder,
              "weights": weights, "weights_sha256": result.weights_sha256, "batch_size": batch_size,
              "init": "he-normal from seed" if weights is None else "weights file",
              "feature_dim": int(result.features.shape[1]), "kmeans_init": KMEANS_INIT,
              "cluster_sizes": np.bincount(result.cluster_ids, minlength=clusters).tolist(),
              "cluster_to_client": client_of.tolist()}  # fmt: skip
    return Partition(parts, "cnn-cluster", params), result


cnn_cluster.with_details = cluster_partition  # type: ignore[attr-defined]  # ExplainedPartitioner
cnn_cluster.options = CNNClusterOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_partitioners() -> dict[str, object]:
    return {"cnn-cluster": cnn_cluster}
