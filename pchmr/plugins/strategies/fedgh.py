"""``fedgh``: Federated Gradient Harmonization, as pchmr specifies it.

FedGH is Ni, Xiang, Jiang, Sun and Cui, "Federated Learning for Human Pose Estimation on Non-IID
Data via Gradient Coordination", Sensors 25(14):4372, 2025 (not Yi et al.'s 2023 FedGH). Its
abstract says that FedGH "coordinates update directions by measuring client gradient
discrepancies and integrating gradient-projection correction with a parameter-reconstruction
mechanism"; the equations are not public. pchmr's version follows Zhang et al.'s gradient
harmonization (arXiv 2309.06692), i.e. PCGrad applied to client updates. Every choice marked
*(inferred)* below is ours, is an option where it can be, and is listed in ``describe``.

Round t, with global model w and the K replies sorted by partition id:

1. Deltas. Δ_k = w_k − w for every *trainable parameter* of the model: the state-dict entries
   :func:`pchmr.core.kit.state.trainable_state_keys` names, learnt from the module the runtime
   builds (the ``fedgh-entries`` mechanism's ``prepare_module``). Every other entry (BatchNorm's
   running statistics and ``num_batches_tracked``, frozen parameters, constant buffers) is a
   statistic, not a descent direction: it gets the weighted average Σ_k p_k b_k of step 5, as
   FedAvg gives it, never a projection, η or a server-optimiser step. Without a module (FedGH
   used on bare arrays, as in the strategy contract suite) every floating-point entry is
   harmonized and integer ones averaged.
2. Discrepancy. The Gram matrix G_ij = ⟨Δ_i, Δ_j⟩ over the whole flattened trainable model gives
   the pairwise cosines cos_ij = G_ij / (‖Δ_i‖‖Δ_j‖) *(inferred: cosine similarity as the
   measure)*. A pair conflicts when G_ij < 0. Logged every round and returned as metrics
   (:class:`RoundStats`); with ``granularity`` = ``layer`` also per entry (:class:`LayerStats`).
3. Projection order. For each client i, a permutation of the other clients drawn from a generator
   seeded by (run seed, t) *(inferred; as PCGrad shuffles its tasks)*. It only matters with K ≥ 3.
4. Gradient-projection correction (PCGrad against the *original* deltas, *inferred*). Start from
   Δ'_i = Δ_i; for j in i's order, if ⟨Δ'_i, Δ_j⟩ < 0 then Δ'_i ← Δ'_i − ⟨Δ'_i, Δ_j⟩/‖Δ_j‖² · Δ_j.
   Option ``granularity``: ``model`` (default) projects the whole flattened update; ``layer``
   runs steps 2–4 separately for each trainable state-dict entry (a weight and its bias are
   separate entries), with the same orders *(inferred)*.
5. Weights. p_k ∝ n_k (the reply's ``num-examples``) — option ``weighting`` = ``examples``
   (default) | ``uniform`` (p_k = 1/K) *(inferred)*.
6. Parameter reconstruction. h = Σ_k p_k Δ'_k; with option ``restore-norm`` (default false) h is
   rescaled to the norm of the plain average, h ← h · ‖Σ_k p_k Δ_k‖ / ‖h‖, per projected group
   (the whole model, or each entry with ``granularity=layer``; a group without projections or with
   h = 0 is left as it is) *(inferred: one reading of "parameter reconstruction": projection
   removes the conflicting components and so shortens the step, the reconstruction gives the
   step FedAvg's length back in the harmonized direction)*. Then w ← w + η h, η = option
   ``server-learning-rate`` (default 1.0). With option ``server-opt`` = ``adam`` | ``yogi`` |
   ``adagrad`` h is instead Flower's FedOpt pseudo-gradient (see
   :mod:`pchmr.plugins.strategies.fedopt`; ``server-learning-rate``, ``beta-1``, ``beta-2``,
   ``tau`` then configure that optimiser). Default ``none``.

When no pair conflicts, Δ'_k = Δ_k and (η = 1, no server optimiser) FedGH is FedAvg.

Statistics (every round, on the trainable entries; the ``fedgh-*`` keys of the MetricRecord
``aggregate_train`` returns, which the runtime writes into ``rounds.jsonl`` as ``fedgh_*``):
``conflict-fraction`` (conflicting pairs / pairs), ``conflicting-pairs``, ``pairs``,
``mean-cosine``, ``min-cosine``, ``projections``, ``norm-ratio`` (‖h‖ / ‖Σ p_k Δ_k‖ before
``restore-norm``), ``harmonized-entries`` and ``averaged-entries``. With ``granularity=layer``
also ``layers-in-conflict`` (entries with a conflicting pair), ``layer-conflict-fraction-mean``,
``-max`` and ``-weighted`` (by entry size), the five entries with the highest conflict fraction
(``fedgh-top-conflict-layers``, a name → fraction mapping, from the ``fedgh-entries`` mechanism:
a Flower MetricRecord holds no names), and the full per-entry table in the log (``run.log``).
The log also holds every round's K×K cosine matrix with the clients' partition ids.

Cost: every Δ'_i stays in the span of the original deltas, Δ'_i = Σ_m A_im Δ_m, and
⟨Δ'_i, Δ_j⟩ = (A G)_ij, so step 4 runs on K×K matrices; the model is touched by one Gram product
per state-dict entry (O(K²P)) and one K-vector–matrix product (O(KP)), in float64, entry by entry
(never a K×P copy of the whole model).

FedGH compares individual updates: ``requires_individual_updates`` is True, and secure
aggregation refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.options import option, read_options
from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.core.kit.federation import flower_sampling_kwargs
from pchmr.core.kit.state import trainable_state_keys
from pchmr.plugins.strategies.fedopt import (
    NUM_EXAMPLES_KEY,
    SERVER_OPTIMIZERS,
    FedOptOptions,
    ServerOptimizerState,
    make_server_optimizer,
    read_server_optimizer,
)

__all__ = [
    "FedGH",
    "FedGHAdagrad",
    "FedGHAdam",
    "FedGHOptions",
    "FedGHYogi",
    "Harmonization",
    "HarmonizedEntries",
    "LayerStats",
    "RoundStats",
    "fedgh",
    "harmonize",
    "pcgrad_coefficients",
    "projection_orders",
]

log = logging.getLogger("pchmr.strategies.fedgh")

GRANULARITIES = ("model", "layer")
WEIGHTINGS = ("examples", "uniform")
SERVER_OPTS = ("none", *SERVER_OPTIMIZERS)
DEFAULT_SERVER_LEARNING_RATE = 1.0
PARTITION_KEY = "partition-id"
#: Mixed into the projection-order seed so that it is independent of other (seed, round) streams.
_ORDER_STREAM = 0x6647
_SEED_MASK = (1 << 64) - 1
#: Metric names FedGH adds to the aggregated train metrics.
METRIC_PREFIX = "fedgh-"
#: The ``fedgh-entries`` mechanism's round metric: the most conflicting layers, name → conflict fraction.
TOP_LAYERS_KEY = "fedgh-top-conflict-layers"
#: How many layers :data:`TOP_LAYERS_KEY` names.
TOP_LAYERS = 5


@dataclass(frozen=True)
class Harmonization:
    """FedGH's settings (see the module docstring for their meaning)."""

    granularity: str = "model"
    weighting: str = "examples"
    server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE
    seed: int = 0
    restore_norm: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if not self.server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {self.server_learning_rate!r}")


@dataclass(frozen=True)
class LayerStats:
    """One trainable state-dict entry's discrepancy in one round (``granularity=layer``).

    ``size`` is its number of values; the other fields as in :class:`RoundStats`, on this
    entry's deltas alone; ``norm_ratio`` is ‖Σ p_k Δ'_k‖ / ‖Σ p_k Δ_k‖ of the entry."""

    name: str
    size: int
    pairs: int
    conflicting_pairs: int
    conflict_fraction: float
    mean_cosine: float
    min_cosine: float
    projections: int
    norm_ratio: float


@dataclass(frozen=True)
class RoundStats:
    """One round's update discrepancy over the trainable entries (whole-model deltas, whatever the
    granularity), and with ``granularity=layer`` each entry's (:attr:`layers`, state-dict order).

    ``conflict_fraction`` = conflicting pairs / pairs (pairs with a negative dot product);
    ``mean_cosine`` and ``min_cosine`` over the K(K−1)/2 pairs (a zero delta has cosine 0 with
    everything; NaN with fewer than 2 clients); ``projections`` = projections applied in step 4
    (summed over the layers with ``granularity=layer``); ``norm_ratio`` = ‖Σ p_k Δ'_k‖ / ‖Σ p_k Δ_k‖
    before ``restore-norm`` (1 when the average delta is 0); ``harmonized_entries`` /
    ``averaged_entries``: state-dict entries harmonized / averaged as FedAvg does (buffers);
    ``cosines``: the K×K pairwise cosines (clients in partition order; logged, not a metric).
    """

    server_round: int
    clients: int
    pairs: int
    conflicting_pairs: int
    conflict_fraction: float
    mean_cosine: float
    min_cosine: float
    projections: int
    norm_ratio: float
    harmonized_entries: int = 0
    averaged_entries: int = 0
    layers: tuple[LayerStats, ...] = ()
    cosines: tuple[tuple[float, ...], ...] = ()

    def as_metrics(self) -> dict[str, float]:
        """The ``fedgh-*`` numbers of the round's MetricRecord (layer summary with ``layers``)."""
        skip = ("server_round", "layers", "cosines")
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if self.layers:
            rates = np.array([layer.conflict_fraction for layer in self.layers])
            sizes = np.array([layer.size for layer in self.layers], dtype=np.float64)
            values["layers_in_conflict"] = int(sum(layer.conflicting_pairs > 0 for layer in self.layers))
            values["layer_conflict_fraction_mean"] = float(rates.mean())
            values["layer_conflict_fraction_max"] = float(rates.max())
            values["layer_conflict_fraction_weighted"] = float(rates @ sizes / sizes.sum()) if sizes.sum() else 0.0
        return {METRIC_PREFIX + name.replace("_", "-"): float(value) for name, value in values.items()}

    def top_layers(self, count: int = TOP_LAYERS) -> dict[str, float]:
        """Up to ``count`` entries with a conflicting pair, name → conflict fraction, the most
        conflicting first (ties: the lower mean cosine, then the name)."""
        conflicting = [layer for layer in self.layers if layer.conflicting_pairs > 0]
        ranked = sorted(conflicting, key=lambda layer: (-layer.conflict_fraction, layer.mean_cosine, layer.name))
        return {layer.name: layer.conflict_fraction for layer in ranked[:count]}

    def layer_table(self) -> str:
        """Every entry's statistics as a text table (one line per entry, state-dict order)."""
        width = max([len("layer"), *(len(layer.name) for layer in self.layers)])
        head = f"{'layer':<{width}} {'size':>10} {'conflicting':>11} {'pairs':>5} {'rate':>6} "
        head += f"{'mean cos':>9} {'min cos':>8} {'proj':>5} {'norm ratio':>10}"
        rows = [
            f"{layer.name:<{width}} {layer.size:>10d} {layer.conflicting_pairs:>11d} {layer.pairs:>5d} "
            f"{layer.conflict_fraction:>6.3f} {layer.mean_cosine:>9.4f} {layer.min_cosine:>8.4f} "
            f"{layer.projections:>5d} {layer.norm_ratio:>10.4f}"
            for layer in self.layers
        ]
        return "\n".join([head, *rows])


# --------------------------------------------------------------------------------------
# the algorithm on plain arrays
# --------------------------------------------------------------------------------------
def projection_orders(num_clients: int, seed: int, server_round: int) -> list[list[int]]:
    """For each client i, the other clients in the order i projects against them (step 3)."""
    rng = np.random.default_rng([seed & _SEED_MASK, server_round, _ORDER_STREAM])
    orders = []
    for i in range(num_clients):
        others = np.array([j for j in range(num_clients) if j != i], dtype=np.int64)
        orders.append([int(j) for j in rng.permutation(others)])
    return orders


def pcgrad_coefficients(gram: np.ndarray, orders: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
    """Step 4 on the Gram matrix: A (K, K) with Δ'_i = Σ_m A_im Δ_m, and the number of projections.

    ``gram`` (K, K) holds ⟨Δ_i, Δ_j⟩; ``orders[i]`` lists the clients i projects against. A zero
    Δ_j (G_jj = 0) never conflicts.
    """
    k = gram.shape[0]
    coeffs = np.eye(k)
    projections = 0
    for i in range(k):
        for j in orders[i]:
            dot = float(coeffs[i] @ gram[:, j])
            if dot < 0.0 and gram[j, j] > 0.0:
                coeffs[i, j] -= dot / gram[j, j]
                projections += 1
    return coeffs, projections


def client_weights(num_examples: Sequence[float], weighting: str) -> np.ndarray:
    """p (K,) summing to 1: ∝ ``num_examples`` or uniform."""
    counts = np.asarray(num_examples, dtype=np.float64)
    if weighting == "uniform":
        return np.full(len(counts), 1.0 / len(counts))
    if np.any(counts < 0) or not counts.sum() > 0:
        raise AggregationError(
            reason=f"FedGH needs non-negative '{NUM_EXAMPLES_KEY}' with a positive sum, got {counts.tolist()}"
        )
    return counts / counts.sum()


def _deltas(global_value: np.ndarray, clients: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    """(K, n) float64: the clients' entry ``key`` minus the global one, flattened."""
    flat = np.asarray(global_value, dtype=np.float64).reshape(-1)
    out = np.empty((len(clients), flat.size))
    for i, client in enumerate(clients):
        np.subtract(np.asarray(client[key], dtype=np.float64).reshape(-1), flat, out=out[i])
    return out


def _check_shapes(global_arrays: Mapping[str, np.ndarray], clients: Sequence[Mapping[str, np.ndarray]]) -> None:
    for index, client in enumerate(clients):
        if set(client) != set(global_arrays):
            extra, missing = sorted(set(client) - set(global_arrays)), sorted(set(global_arrays) - set(client))
            raise AggregationError(
                reason=f"FedGH: reply {index} has other arrays than the global model (extra {extra[:3]}, missing {missing[:3]})"
            )
        for key, value in global_arrays.items():
            if np.shape(client[key]) != np.shape(value):
                raise AggregationError(
                    reason=f"FedGH: reply {index} array '{key}' has shape {np.shape(client[key])}, the global one {np.shape(value)}"
                )


def _pair_stats(gram: np.ndarray) -> tuple[int, int, float, float]:
    """(pairs, conflicting pairs, mean cosine, min cosine) of a Gram matrix."""
    k = gram.shape[0]
    upper = np.triu_indices(k, 1)
    if k < 2:
        return 0, 0, float("nan"), float("nan")
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scale = np.outer(norms, norms)[upper]
    dots = gram[upper]
    cosines = np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)
    return len(dots), int(np.sum(dots < 0)), float(cosines.mean()), float(cosines.min())


def _cosines(gram: np.ndarray) -> np.ndarray:
    """(K, K) cosines of a Gram matrix (0 where a delta is zero)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scale = np.outer(norms, norms)
    return np.divide(gram, scale, out=np.zeros_like(gram), where=scale > 0)


def _ratio(numerator_sq: float, denominator_sq: float) -> float:
    """sqrt(numerator_sq / denominator_sq), 1 when the denominator is 0."""
    return float(np.sqrt(max(numerator_sq, 0.0) / denominator_sq)) if denominator_sq > 0 else 1.0


def harmonized_keys(
    global_arrays: Mapping[str, np.ndarray], parameter_keys: Collection[str] | None = None
) -> list[str]:
    """The entries FedGH harmonizes, in state-dict order: the floating-point ones among
    ``parameter_keys`` (every floating-point entry when None)."""
    floating = [key for key, value in global_arrays.items() if np.issubdtype(np.asarray(value).dtype, np.floating)]
    return floating if parameter_keys is None else [key for key in floating if key in parameter_keys]


def harmonize(
    global_arrays: Mapping[str, np.ndarray],
    clients: Sequence[Mapping[str, np.ndarray]],
    weights: np.ndarray,
    orders: Sequence[Sequence[int]],
    granularity: str = "model",
    server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE,
    server_round: int = 0,
    *,
    parameter_keys: Collection[str] | None = None,
    restore_norm: bool = False,
) -> tuple[dict[str, np.ndarray], RoundStats]:
    """Steps 1–6 on numpy arrays: the new global arrays and the round's :class:`RoundStats`.

    ``clients[k]`` maps the same names as ``global_arrays`` to arrays of the same shapes; ``weights``
    (K,) are the p_k; ``orders`` come from :func:`projection_orders`; ``parameter_keys`` names the
    trainable parameters (None: every floating-point entry). Harmonized entries keep the global
    dtypes; the others are the weighted average Σ p_k b_k of the clients' values (floating ones in
    their dtype, integer ones as float64, as Flower's FedAvg returns them).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    _check_shapes(global_arrays, clients)
    weights = np.asarray(weights, dtype=np.float64)
    k = len(clients)
    keys = harmonized_keys(global_arrays, parameter_keys)
    grams = {}
    for key in keys:
        deltas = _deltas(global_arrays[key], clients, key)
        grams[key] = deltas @ deltas.T
    model_gram = sum(grams.values(), np.zeros((k, k)))
    groups = {"model": keys} if granularity == "model" else {key: [key] for key in keys}
    combined: dict[str, np.ndarray] = {}  # key → c = pᵀA of its group (K,), rescaled by restore-norm
    projections, harmonized_sq = 0, 0.0
    layers: list[LayerStats] = []
    for name, members in groups.items():
        gram = sum((grams[key] for key in members), np.zeros((k, k)))
        coeffs, count = pcgrad_coefficients(gram, orders)
        c = weights @ coeffs
        group_sq, average_sq = float(c @ gram @ c), float(weights @ gram @ weights)
        projections += count
        harmonized_sq += group_sq
        if restore_norm and count and group_sq > 0:
            c = c * np.sqrt(average_sq / group_sq)
        combined.update(dict.fromkeys(members, c))
        if granularity == "layer":
            pairs, conflicting, mean_cos, min_cos = _pair_stats(gram)
            layers.append(
                LayerStats(
                    name=name,
                    size=int(np.asarray(global_arrays[name]).size),
                    pairs=pairs,
                    conflicting_pairs=conflicting,
                    conflict_fraction=conflicting / pairs if pairs else 0.0,
                    mean_cosine=mean_cos,
                    min_cosine=min_cos,
                    projections=count,
                    norm_ratio=_ratio(group_sq, average_sq),
                )
            )
    out: dict[str, np.ndarray] = {}
    for key, value in global_arrays.items():
        value = np.asarray(value)
        if key in combined:
            step = combined[key] @ _deltas(value, clients, key)
            new = value.astype(np.float64).reshape(-1) + server_learning_rate * step
            out[key] = new.reshape(value.shape).astype(value.dtype)
        else:  # buffers, frozen and integer entries: FedAvg's weighted average
            average = sum(w * np.asarray(client[key], dtype=np.float64) for w, client in zip(weights, clients))
            floating = np.issubdtype(value.dtype, np.floating)
            out[key] = np.asarray(average).astype(value.dtype) if floating else np.asarray(average)
    pairs, conflicting, mean_cos, min_cos = _pair_stats(model_gram)
    stats = RoundStats(
        server_round=server_round,
        clients=k,
        pairs=pairs,
        conflicting_pairs=conflicting,
        conflict_fraction=conflicting / pairs if pairs else 0.0,
        mean_cosine=mean_cos,
        min_cosine=min_cos,
        projections=projections,
        norm_ratio=_ratio(harmonized_sq, float(weights @ model_gram @ weights)),
        harmonized_entries=len(keys),
        averaged_entries=len(global_arrays) - len(keys),
        layers=tuple(layers),
        cosines=tuple(map(tuple, _cosines(model_gram).tolist())),
    )
    return out, stats


# --------------------------------------------------------------------------------------
# the Flower strategy
# --------------------------------------------------------------------------------------
def _metric_record(content: Any) -> Any:
    return next(iter(content.metric_records.values()))


def _by_partition(replies: list[Message]) -> list[Message]:
    """Replies sorted by partition id when every reply reports one (else in arrival order)."""
    if all(PARTITION_KEY in _metric_record(r.content) for r in replies):
        return sorted(replies, key=lambda r: float(_metric_record(r.content)[PARTITION_KEY]))
    return list(replies)


class FedGH(FedAvg):
    """Flower's FedAvg with :func:`harmonize` as its aggregation (see the module docstring).

    ``parameter_keys`` names the trainable entries (set by the ``fedgh-entries`` mechanism from
    the server's module; None: every floating-point entry is harmonized). ``last_round_stats``
    holds the latest :class:`RoundStats` (``round_stats`` all of them); the MetricRecord returned
    by ``aggregate_train`` carries them as ``fedgh-*`` keys besides the clients' averaged metrics.
    """

    def __init__(self, *, harmonization: Harmonization | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.harmonization = harmonization or Harmonization()
        self.parameter_keys: frozenset[str] | None = None
        self.global_arrays: dict[str, np.ndarray] | None = None
        self.last_round_stats: RoundStats | None = None
        self.round_stats: list[RoundStats] = []

    def summary(self) -> None:
        log.info("FedGH settings: %s", self.harmonization)
        super().summary()

    def averaged_keys(self) -> frozenset[str]:
        """The floating-point entries of the round's global model that FedGH averages instead of
        harmonizing (buffers, frozen parameters); a server optimiser must not step them either."""
        if self.global_arrays is None:
            return frozenset()
        floating = set(harmonized_keys(self.global_arrays))
        return frozenset(floating - set(harmonized_keys(self.global_arrays, self.parameter_keys)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """Remember the round's global arrays, then configure like FedAvg."""
        self.global_arrays = {key: array.numpy() for key, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Harmonize the replies' deltas against the global arrays of ``configure_train``."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        if self.global_arrays is None:
            raise AggregationError(reason="FedGH: no global arrays; configure_train must run before aggregate_train")
        contents = [reply.content for reply in _by_partition(valid)]
        clients = [
            {key: array.numpy() for key, array in next(iter(content.array_records.values())).items()}
            for content in contents
        ]
        h = self.harmonization
        weights = client_weights([float(_metric_record(c)[self.weighted_by_key]) for c in contents], h.weighting)
        orders = projection_orders(len(clients), h.seed, server_round)
        new_arrays, stats = harmonize(
            self.global_arrays,
            clients,
            weights,
            orders,
            h.granularity,
            h.server_learning_rate,
            server_round,
            parameter_keys=self.parameter_keys,
            restore_norm=h.restore_norm,
        )
        self.last_round_stats = stats
        self.round_stats.append(stats)
        log.info(
            "round %d: %d of %d client pairs conflict (%.0f%%), mean cosine %.3f, %d projections, norm ratio %.3f "
            "(%d entries harmonized, %d averaged)",
            server_round,
            stats.conflicting_pairs,
            stats.pairs,
            100 * stats.conflict_fraction,
            stats.mean_cosine,
            stats.projections,
            stats.norm_ratio,
            stats.harmonized_entries,
            stats.averaged_entries,
        )
        partitions = [int(float(_metric_record(c).get(PARTITION_KEY, index))) for index, c in enumerate(contents)]
        log.info(
            "round %d pairwise cosines of the clients' updates (partitions %s):\n%s",
            server_round,
            partitions,
            "\n".join(" ".join(f"{value:7.3f}" for value in row) for row in stats.cosines),
        )
        if stats.layers:
            in_conflict = sum(layer.conflicting_pairs > 0 for layer in stats.layers)
            log.info(
                "round %d per-layer conflicts (%d of %d layers have a conflicting pair):\n%s",
                server_round,
                in_conflict,
                len(stats.layers),
                stats.layer_table(),
            )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        for name, value in stats.as_metrics().items():
            metrics[name] = value
        record = ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in new_arrays.items()})
        return record, metrics


class HarmonizedEntries(Mechanism):
    """FedGH's view of the model, as a mechanism: ``prepare_module`` tells the server which entries
    are trainable parameters (:func:`~pchmr.core.kit.state.trainable_state_keys`; the others are
    averaged), and with ``granularity=layer`` ``round_metrics`` puts the round's most conflicting
    layers into ``rounds.jsonl`` (:data:`TOP_LAYERS_KEY`, name → conflict fraction). Keeps no state."""

    name = "fedgh-entries"

    def __init__(self, server: FedGH) -> None:
        self.server = server

    def describe(self) -> dict[str, Any]:
        return {
            "harmonized": "trainable parameters (pchmr.core.kit.state.trainable_state_keys of the server's module)",
            "averaged": "every other entry (BatchNorm statistics and counters, frozen parameters): "
            "weighted average as in FedAvg",
            "round-metrics": f"{TOP_LAYERS_KEY} (granularity=layer): up to {TOP_LAYERS} layers, name -> conflict fraction",
        }

    def prepare_module(self, module: Any) -> None:
        self.server.parameter_keys = trainable_state_keys(module)

    def round_metrics(self, server_round: int) -> Mapping[str, Any]:
        stats = self.server.last_round_stats
        if stats is None or stats.server_round != server_round or not stats.layers:
            return {}
        return {TOP_LAYERS_KEY: stats.top_layers()}


def _harmonized_optimizer(base: type[FedOpt]) -> type[FedOpt]:
    """``base`` (a Flower FedOpt) whose client average is FedGH's harmonized one.

    The MRO is (composite, base, FedOpt, FedGH, FedAvg): ``base.aggregate_train`` takes its
    pseudo-gradient from ``FedGH.aggregate_train``, which therefore runs with η = 1.
    """

    def __init__(self: Any, *, harmonization: Harmonization | None = None, **kwargs: Any) -> None:
        base.__init__(self, **kwargs)
        self.harmonization = replace(harmonization or Harmonization(), server_learning_rate=1.0)

    name = f"FedGH{base.__name__[3:]}"
    return type(
        name,
        (base, FedGH),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"Flower's {base.__name__} stepping on FedGH's harmonized delta.",
        },
    )


#: ``server-opt`` → FedGH composed with Flower's FedAdam / FedYogi / FedAdagrad.
FedGHAdam = _harmonized_optimizer(FedAdam)
FedGHYogi = _harmonized_optimizer(FedYogi)
FedGHAdagrad = _harmonized_optimizer(FedAdagrad)
HARMONIZED_OPTIMIZERS: Mapping[str, type[FedOpt]] = {"adam": FedGHAdam, "yogi": FedGHYogi, "adagrad": FedGHAdagrad}

_INFERRED = {
    "discrepancy": "pairwise cosine similarity of whole-model client deltas; a pair conflicts when their dot product < 0",
    "projection": "PCGrad against the original deltas: for each j in client i's order, if <delta'_i, delta_j> < 0 "
    "then delta'_i -= <delta'_i, delta_j>/|delta_j|^2 delta_j (after Zhang et al., arXiv 2309.06692)",
    "order": "each client projects against the others in a permutation seeded by (seed, round)",
    "reconstruction": "w <- w + server-learning-rate * sum_k p_k delta'_k (or a FedOpt step on that delta)",
    "parameters": "only trainable parameters are harmonized; buffers (BatchNorm statistics, counters) and frozen "
    "entries get the weighted average as in FedAvg",
    "restore-norm": "an option: the harmonized delta rescaled to the norm of the plain weighted average, per "
    "projected group (one reading of 'parameter reconstruction')",
}


@dataclass(frozen=True)
class FedGHOptions(FedOptOptions):
    """``--strategy-option`` values of ``fedgh`` (see the module docstring); with ``server-opt``
    none, ``server-learning-rate`` is η of step 6, else the options configure Flower's optimiser."""

    server_opt: str = option(
        "none", choices=SERVER_OPTS, help="a Flower server optimiser stepping on the harmonized delta"
    )
    server_learning_rate: float | None = option(
        None,
        low=0.0,
        low_open=True,
        default_text=f"{DEFAULT_SERVER_LEARNING_RATE:g} (server-opt none), else Flower's",
        help="server step size η",
    )
    granularity: str = option("model", choices=GRANULARITIES, help="project the whole model's update or each layer's")
    weighting: str = option("examples", choices=WEIGHTINGS, help="client weights p_k: by sample count or uniform")
    restore_norm: bool = option(
        False,
        help="rescale the harmonized delta to the plain average's norm (per projected group): one reading of "
        "the paper's 'parameter reconstruction'",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.server_opt == "none":
            given = [
                f"'{key}'" for key in ("beta-1", "beta-2", "tau") if getattr(self, key.replace("-", "_")) is not None
            ]
            if given:
                verb = "needs" if len(given) == 1 else "need"
                raise ValueError(f"{' and '.join(given)} {verb} server-opt adam, yogi or adagrad")


def fedgh(config: StrategyConfig) -> StrategyParts:
    """Server: :class:`FedGH` (or FedGHAdam/Yogi/Adagrad with ``server-opt``); mechanisms: the
    optimiser's state (``fedgh``, with ``server-opt``) and :class:`HarmonizedEntries`; the client
    adds nothing."""
    options = read_options(FedGHOptions, config.options, plugin="fedgh", kind="strategy")
    granularity, weighting, server_opt = options.granularity, options.weighting, options.server_opt
    restore = options.restore_norm
    chosen: dict[str, Any] = {"granularity": granularity, "weighting": weighting, "restore-norm": restore}
    if server_opt == "none":
        given_eta = options.server_learning_rate
        eta = DEFAULT_SERVER_LEARNING_RATE if given_eta is None else given_eta
        harmonization = Harmonization(granularity, weighting, eta, config.seed, restore)
        server: FedGH = FedGH(**flower_sampling_kwargs(), weighted_by_key=NUM_EXAMPLES_KEY, harmonization=harmonization)
        mechanisms: tuple[Mechanism, ...] = ()
        chosen.update({"server-opt": "none", "server-learning-rate": eta})
        server_text = "pchmr.plugins.strategies.fedgh.FedGH (a flwr.serverapp.strategy.FedAvg subclass)"
    else:
        optimizer = read_server_optimizer(options)
        harmonization = Harmonization(granularity, weighting, 1.0, config.seed, restore)
        server = make_server_optimizer(optimizer, HARMONIZED_OPTIMIZERS[server_opt], harmonization=harmonization)  # type: ignore[assignment]  # a FedGH subclass
        mechanisms = (ServerOptimizerState(server, optimizer, "fedgh"),)
        chosen.update(optimizer.describe())
        server_text = (
            f"pchmr.plugins.strategies.fedgh.{type(server).__name__} "
            f"(flwr.serverapp.strategy.{optimizer.flower_class.__name__} on the harmonized delta)"
        )
    return StrategyParts(
        name="fedgh",
        server=server,
        mechanisms=(*mechanisms, HarmonizedEntries(server)),
        requires_individual_updates=True,
        describe={
            "server": server_text,
            "paper": "Ni, Xiang, Jiang, Sun, Cui: Federated Learning for Human Pose Estimation on Non-IID Data "
            "via Gradient Coordination. Sensors 25(14):4372, 2025",
            "options": {key: {"value": value, "inferred": True} for key, value in chosen.items()},
            "inferred": dict(_INFERRED),
            "seed": config.seed,
        },
    )


fedgh.options = FedGHOptions  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_strategies() -> dict[str, object]:
    return {"fedgh": fedgh}
