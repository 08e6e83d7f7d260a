"""Plots and summary numbers of a client partition.

* :func:`plot_partition` writes two PNGs: per-client label histograms (stacked bars, clients on
  x; past :data:`MAX_BARS` clients only the largest are drawn, and the title says so) and the
  sorted client sizes (the long tail, log y).
* :func:`plot_embedding` writes a 2-D PCA of feature vectors coloured by cluster (``cnn-cluster``,
  with :func:`pchmr.plugins.partitioners.cnn_cluster.cluster_features`).
* :func:`label_entropy`: mean over clients of the entropy (bits) of the client's label
  distribution — log2(#values) for uniform clients, 0 when every client holds a single value.
* :func:`gini`: Gini coefficient of client sizes — 0 for equal clients, → 1 when one client
  holds everything.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing global changes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pchmr.core.contracts.partition import Partition

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MAX_BARS", "client_label_counts", "gini", "label_entropy", "plot_embedding", "plot_partition"]

#: Clients drawn in a histogram; beyond this only the largest are shown.
MAX_BARS = 50
DPI = 120
#: Space above the tallest bar, as a factor of its height.
HEADROOM = 1.05
#: Qualitative colours for up to this many label values, a sampled continuous map beyond.
QUALITATIVE_COLOURS = 20
#: Parameters not worth a place in a title (they are in partition.json).
_TITLE_SKIP = {"seed", "num_clients", "num_samples", "weights", "weights_sha256", "init", "kmeans_init", "batch_size",
               "feature_dim", "draws"}  # fmt: skip
#: Title characters per inch of figure width (9 pt font) before wrapping.
TITLE_CHARS_PER_INCH = 13


# ----------------------------------------------------------------------------- numbers
def client_label_counts(partition: Partition, labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(values, counts)``: sorted distinct label values of the partitioned samples and the
    (num_clients, num_values) int64 matrix of how many samples of each value every client holds."""
    labels = np.asarray(labels).astype(str)
    covered = np.concatenate(partition.clients) if partition.num_clients else np.zeros(0, np.int64)
    if covered.size and covered.max() >= len(labels):
        raise ValueError(f"the partition indexes sample {int(covered.max())} but only {len(labels)} labels were given")
    values, codes = np.unique(labels, return_inverse=True)
    counts = np.stack([np.bincount(codes[idx], minlength=len(values)) for idx in partition.clients])
    return [str(v) for v in values], counts.astype(np.int64)


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """(K, V) counts → (K,) entropy in bits of each row's distribution."""
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=1)


def label_entropy(partition: Partition, labels: Mapping[str, np.ndarray], key: str) -> float:
    """Mean over clients of the entropy (bits) of the client's ``labels[key]`` distribution."""
    if key not in labels:
        raise KeyError(f"no label {key!r}; available labels: {sorted(labels)}")
    _, counts = client_label_counts(partition, labels[key])
    return float(_entropy_bits(counts).mean())


def gini(sizes: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative ``sizes``: mean absolute difference over twice the mean."""
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    if x.size == 0 or (x < 0).any() or x.sum() == 0:
        raise ValueError(f"gini needs at least one size, all >= 0 and not all 0, got {x.tolist()[:10]}")
    n = x.size
    ranks = np.arange(1, n + 1)
    return float(2.0 * (ranks * x).sum() / (n * x.sum()) - (n + 1) / n)


# ----------------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colours(count: int) -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    if count <= QUALITATIVE_COLOURS:
        return [tuple(colormaps["tab20" if count > 10 else "tab10"](i)) for i in range(count)]
    return [tuple(colormaps["turbo"](t)) for t in np.linspace(0.05, 0.95, count)]


def _describe(partition: Partition) -> str:
    """``"lda (alpha=0.1, label=source)"``: the method and its scalar parameters."""
    scalars = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(partition.params.items())
               if k not in _TITLE_SKIP and isinstance(v, (str, int, float)) and not isinstance(v, bool)]  # fmt: skip
    return f"{partition.method} ({', '.join(scalars)})" if scalars else partition.method


def _title(fig: Figure, ax: object, *lines: str) -> None:
    """Set a 9 pt title, each line wrapped to the figure's width."""
    width = int(fig.get_figwidth() * TITLE_CHARS_PER_INCH)
    ax.set_title("\n".join(textwrap.fill(line, width) for line in lines), fontsize=9)  # type: ignore[attr-defined]


def _plain_log_ticks(ax: object) -> None:
    """Log-scale y ticks at 1-2-5 steps written as plain numbers (20, 50, 100), minor ones unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # type: ignore[attr-defined]
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # type: ignore[attr-defined]
    ax.yaxis.set_minor_formatter(NullFormatter())  # type: ignore[attr-defined]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_label_histogram(partition: Partition, labels: np.ndarray, label_key: str, out_path: Path) -> Path:
    """Stacked bars of every client's label counts (the :data:`MAX_BARS` largest if more clients)."""
    values, counts = client_label_counts(partition, labels)
    shown = np.arange(partition.num_clients)
    note = f"{partition.num_clients} clients"
    if partition.num_clients > MAX_BARS:
        shown = np.argsort(-counts.sum(axis=1), kind="stable")[:MAX_BARS]
        note = f"the {MAX_BARS} largest of {partition.num_clients} clients"
    fig = _figure(max(6.0, 0.18 * len(shown) + 3.0), 4.2)
    ax = fig.subplots()
    bottom = np.zeros(len(shown))
    positions = np.arange(len(shown))
    for v, (value, colour) in enumerate(zip(values, _colours(len(values)))):
        ax.bar(positions, counts[shown, v], bottom=bottom, color=colour, label=value, width=0.85)
        bottom += counts[shown, v]
    ax.set_ylim(0, HEADROOM * bottom.max())
    ax.set_xticks(positions, [str(c) for c in shown], rotation=90 if len(shown) > 20 else 0, fontsize=7)
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    entropy = float(_entropy_bits(counts).mean())
    _title(
        fig,
        ax,
        f"{_describe(partition)}: '{label_key}' per client, {note}",
        f"mean entropy {entropy:.2f} bits (uniform over {len(values)} values: {np.log2(len(values)):.2f})",
    )
    ax.legend(title=label_key, fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              ncol=1 if len(values) <= 12 else 2)  # fmt: skip
    return _save(fig, out_path)


def plot_size_tail(partition: Partition, out_path: Path) -> Path:
    """Client sizes sorted in decreasing order (log y), with their Gini coefficient."""
    sizes = np.sort(partition.sizes())[::-1]
    fig = _figure(6.0, 3.8)
    ax = fig.subplots()
    ranks = np.arange(1, len(sizes) + 1)
    ax.bar(ranks, sizes, width=1.0 if len(sizes) > MAX_BARS else 0.8, color="tab:blue", edgecolor="none")
    ax.axhline(sizes.mean(), color="tab:red", linestyle="--", linewidth=1, label=f"mean {sizes.mean():.1f}")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("client rank (largest first)")
    ax.set_ylabel("samples (log)")
    _title(
        fig,
        ax,
        f"{_describe(partition)}: client sizes, {len(sizes)} clients",
        f"Gini {gini(sizes):.3f}, min {sizes.min()}, max {sizes.max()}",
    )
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_partition(partition: Partition, labels: Mapping[str, np.ndarray], label_key: str, out_dir: Path) -> list[Path]:
    """Write ``partition-<label_key>-histogram.png`` and ``partition-sizes.png`` into ``out_dir``."""
    if label_key not in labels:
        raise KeyError(f"no label {label_key!r} to plot; available labels: {sorted(labels)}")
    out_dir = Path(out_dir)
    return [
        plot_label_histogram(partition, labels[label_key], label_key, out_dir / f"partition-{label_key}-histogram.png"),
        plot_size_tail(partition, out_dir / "partition-sizes.png"),
    ]


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(points (N, 2), explained (2,))``: projection on the two leading principal axes and
    the fraction of the variance each explains."""
    centred = features - features.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    explained = variance[:2] / max(variance.sum(), np.finfo(float).tiny)
    points = centred @ vt[:2].T
    if points.shape[1] < 2:  # a single feature: pad the second axis
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
        explained = np.pad(explained, (0, 2 - explained.shape[0]))
    return points, explained


def plot_embedding(features: np.ndarray, cluster_ids: np.ndarray, out_path: Path) -> Path:
    """2-D PCA of ``features`` (N, C), one colour per ``cluster_ids`` (N,) value."""
    features = np.asarray(features, dtype=np.float64)
    cluster_ids = np.asarray(cluster_ids)
    if features.ndim != 2 or len(features) != len(cluster_ids) or len(features) < 2:
        raise ValueError(f"plot_embedding needs (N, C) features with N >= 2 and (N,) cluster ids, got "
                         f"{features.shape} and {cluster_ids.shape}")  # fmt: skip
    points, explained = pca_2d(features)
    clusters = np.unique(cluster_ids)
    fig = _figure(6.5, 5.0)
    ax = fig.subplots()
    for cluster, colour in zip(clusters, _colours(len(clusters))):
        mask = cluster_ids == cluster
        ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colour, alpha=0.7, label=f"{cluster} ({mask.sum()})")
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    _title(fig, ax, f"PCA of {len(features)} pooled CNN features ({features.shape[1]}-D), {len(clusters)} clusters")
    if len(clusters) <= 2 * QUALITATIVE_COLOURS:
        ax.legend(title="cluster (size)", fontsize=7, title_fontsize=8, markerscale=2, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0), ncol=1 if len(clusters) <= 15 else 2)  # fmt: skip
    return _save(fig, Path(out_path))
