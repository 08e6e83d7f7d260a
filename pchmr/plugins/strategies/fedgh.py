"""``fedgh``: Federated Gradient Harmonization, as pchmr specifies it.

FedGH is Ni, Xiang, Jiang, Sun and Cui, "Federated Learning for Human Pose Estimation on Non-IID
Data via Gradient Coordination", Sensors 25(14):4372, 2025 (not Yi et al.'s 2023 FedGH). Its
abstract says that FedGH "coordinates update directions by measuring client gradient
discrepancies and integrating gradient-projection correction with a parameter-reconstruction
mechanism"; the equations are not public. pchmr's version follows Zhang et al.'s gradient
harmonization (arXiv 2309.06692), i.e. PCGrad applied to client updates. Every choice marked
*(inferred)* below is ours, is an option where it can be, and is listed in ``describe``.

Round t, with global model w and the K replies sorted by partition id:

1. Deltas. Δ_k = w_k − w for every floating-point entry of the state dict. Integer entries (e.g.
   BatchNorm's ``num_batches_tracked``) are not harmonized: they are averaged with the weights p_k
   of step 5, as FedAvg does *(inferred)*.
2. Discrepancy. The Gram matrix G_ij = ⟨Δ_i, Δ_j⟩ over the whole flattened model gives the pairwise
   cosines cos_ij = G_ij / (‖Δ_i‖‖Δ_j‖) *(inferred: cosine similarity as the measure)*. A pair
   conflicts when G_ij < 0. Logged every round and returned as metrics (:class:`RoundStats`).
3. Projection order. For each client i, a permutation of the other clients drawn from a generator
   seeded by (run seed, t) *(inferred; as PCGrad shuffles its tasks)*. It only matters with K ≥ 3.
4. Gradient-projection correction (PCGrad against the *original* deltas, *inferred*). Start from
   Δ'_i = Δ_i; for j in i's order, if ⟨Δ'_i, Δ_j⟩ < 0 then Δ'_i ← Δ'_i − ⟨Δ'_i, Δ_j⟩/‖Δ_j‖² · Δ_j.
   Option ``granularity``: ``model`` (default) projects the whole flattened update; ``layer``
   runs steps 2–4 separately for each floating-point state-dict entry (a weight and its bias are
   separate entries), with the same orders *(inferred)*.
5. Weights. p_k ∝ n_k (the reply's ``num-examples``) — option ``weighting`` = ``examples``
   (default) | ``uniform`` (p_k = 1/K) *(inferred)*.
6. Parameter reconstruction. w ← w + η Σ_k p_k Δ'_k, η = option ``server-learning-rate``
   (default 1.0) *(inferred reading of "parameter reconstruction")*. With option ``server-opt`` =
   ``adam`` | ``yogi`` | ``adagrad`` the harmonized delta Σ_k p_k Δ'_k is instead Flower's FedOpt
   pseudo-gradient (see :mod:`pchmr.plugins.strategies.fedopt`; ``server-learning-rate``,
   ``beta-1``, ``beta-2``, ``tau`` then configure that optimiser). Default ``none``.

When no pair conflicts, Δ'_k = Δ_k and (η = 1, no server optimiser) FedGH is FedAvg.

Cost: every Δ'_i stays in the span of the original deltas, Δ'_i = Σ_m A_im Δ_m, and
⟨Δ'_i, Δ_j⟩ = (A G)_ij, so step 4 runs on K×K matrices; the model is touched by one Gram product
per state-dict entry (O(K²P)) and one K-vector–matrix product (O(KP)), in float64, entry by entry
(never a K×P copy of the whole model).

FedGH compares individual updates: ``requires_individual_updates`` is True, and secure
aggregation refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
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


@dataclass(frozen=True)
class Harmonization:
    """FedGH's settings (see the module docstring for their meaning)."""

    granularity: str = "model"
    weighting: str = "examples"
    server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if not self.server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {self.server_learning_rate!r}")


@dataclass(frozen=True)
class RoundStats:
    """One round's update discrepancy (whole-model deltas, whatever the granularity).

    ``conflict_fraction`` = conflicting pairs / pairs (pairs with a negative dot product);
    ``mean_cosine`` and ``min_cosine`` over the K(K−1)/2 pairs (a zero delta has cosine 0 with
    everything; NaN with fewer than 2 clients); ``projections`` = projections applied in step 4;
    ``norm_ratio`` = ‖Σ p_k Δ'_k‖ / ‖Σ p_k Δ_k‖ (1 when the average delta is 0).
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

    def as_metrics(self) -> dict[str, float]:
        fields = asdict(self)
        del fields["server_round"]
        return {METRIC_PREFIX + name.replace("_", "-"): float(value) for name, value in fields.items()}


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


def harmonize(
    global_arrays: Mapping[str, np.ndarray],
    clients: Sequence[Mapping[str, np.ndarray]],
    weights: np.ndarray,
    orders: Sequence[Sequence[int]],
    granularity: str = "model",
    server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE,
    server_round: int = 0,
) -> tuple[dict[str, np.ndarray], RoundStats]:
    """Steps 1–6 on numpy arrays: the new global arrays (the global dtypes; integer entries become
    float64 weighted averages, as in Flower's FedAvg) and the round's :class:`RoundStats`.

    ``clients[k]`` maps the same names as ``global_arrays`` to arrays of the same shapes; ``weights``
    (K,) are the p_k; ``orders`` come from :func:`projection_orders`.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    _check_shapes(global_arrays, clients)
    weights = np.asarray(weights, dtype=np.float64)
    k = len(clients)
    float_keys = [key for key, value in global_arrays.items() if np.issubdtype(np.asarray(value).dtype, np.floating)]
    grams = {}
    for key in float_keys:
        deltas = _deltas(global_arrays[key], clients, key)
        grams[key] = deltas @ deltas.T
    model_gram = sum(grams.values(), np.zeros((k, k)))
    groups = {"model": float_keys} if granularity == "model" else {key: [key] for key in float_keys}
    combined: dict[str, np.ndarray] = {}  # key → c = pᵀA of its group (K,)
    projections, harmonized_sq = 0, 0.0
    for members in groups.values():
        gram = sum((grams[key] for key in members), np.zeros((k, k)))
        coeffs, count = pcgrad_coefficients(gram, orders)
        c = weights @ coeffs
        projections += count
        harmonized_sq += float(c @ gram @ c)
        combined.update(dict.fromkeys(members, c))
    out: dict[str, np.ndarray] = {}
    for key, value in global_arrays.items():
        value = np.asarray(value)
        if key in combined:
            step = combined[key] @ _deltas(value, clients, key)
            new = value.astype(np.float64).reshape(-1) + server_learning_rate * step
            out[key] = new.reshape(value.shape).astype(value.dtype)
        else:  # integer buffers: FedAvg's weighted average
            out[key] = sum(w * np.asarray(client[key]) for w, client in zip(weights, clients))
    average_sq = float(weights @ model_gram @ weights)
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
        norm_ratio=float(np.sqrt(max(harmonized_sq, 0.0) / average_sq)) if average_sq > 0 else 1.0,
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

    ``last_round_stats`` holds the latest :class:`RoundStats` (``round_stats`` all of them); the
    MetricRecord returned by ``aggregate_train`` carries them as ``fedgh-*`` keys besides the
    clients' averaged metrics.
    """

    def __init__(self, *, harmonization: Harmonization | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.harmonization = harmonization or Harmonization()
        self.global_arrays: dict[str, np.ndarray] | None = None
        self.last_round_stats: RoundStats | None = None
        self.round_stats: list[RoundStats] = []

    def summary(self) -> None:
        log.info("FedGH settings: %s", self.harmonization)
        super().summary()

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
            self.global_arrays, clients, weights, orders, h.granularity, h.server_learning_rate, server_round
        )
        self.last_round_stats = stats
        self.round_stats.append(stats)
        log.info(
            "round %d: %d of %d client pairs conflict (%.0f%%), mean cosine %.3f, %d projections, norm ratio %.3f",
            server_round,
            stats.conflicting_pairs,
            stats.pairs,
            100 * stats.conflict_fraction,
            stats.mean_cosine,
            stats.projections,
            stats.norm_ratio,
        )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        for name, value in stats.as_metrics().items():
            metrics[name] = value
        record = ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in new_arrays.items()})
        return record, metrics


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
    "integer-buffers": "weighted average as in FedAvg (not harmonized)",
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
    """Server: :class:`FedGH` (or FedGHAdam/Yogi/Adagrad with ``server-opt``); the client adds nothing."""
    options = read_options(FedGHOptions, config.options, plugin="fedgh", kind="strategy")
    granularity, weighting, server_opt = options.granularity, options.weighting, options.server_opt
    chosen: dict[str, Any] = {"granularity": granularity, "weighting": weighting}
    if server_opt == "none":
        given_eta = options.server_learning_rate
        eta = DEFAULT_SERVER_LEARNING_RATE if given_eta is None else given_eta
        harmonization = Harmonization(granularity, weighting, eta, config.seed)
        server: FedAvg = FedGH(
            **flower_sampling_kwargs(), weighted_by_key=NUM_EXAMPLES_KEY, harmonization=harmonization
        )
        mechanisms: tuple[Mechanism, ...] = ()
        chosen.update({"server-opt": "none", "server-learning-rate": eta})
        server_text = "pchmr.plugins.strategies.fedgh.FedGH (a flwr.serverapp.strategy.FedAvg subclass)"
    else:
        optimizer = read_server_optimizer(options)
        harmonization = Harmonization(granularity, weighting, 1.0, config.seed)
        server = make_server_optimizer(optimizer, HARMONIZED_OPTIMIZERS[server_opt], harmonization=harmonization)
        mechanisms = (ServerOptimizerState(server, optimizer, "fedgh"),)
        chosen.update(optimizer.describe())
        server_text = (
            f"pchmr.plugins.strategies.fedgh.{type(server).__name__} "
            f"(flwr.serverapp.strategy.{optimizer.flower_class.__name__} on the harmonized delta)"
        )
    return StrategyParts(
        name="fedgh",
        server=server,
        mechanisms=mechanisms,
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
