"""What both secure-aggregation backends share: the validated options, the fixed-point codec over
Z_2^64, the masks (HKDF-SHA256 then AES-256-CTR), the layout of a client's vector and the
decoding of the revealed sum into the wrapped strategy's aggregate (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pchmr.core.contracts.options import option, read_options

__all__ = [
    "BACKENDS",
    "WEIGHTING_KEY",
    "FixedPointCodec",
    "Layout",
    "SecAggSettings",
    "SecureAggregate",
    "aggregate_with_strategy",
    "client_weight",
    "decode_sum",
    "encode_update",
    "mask_stream",
    "read_settings",
]

BACKENDS = ("flower", "crypten")
DEFAULT_NUM_SHARES = 1.0  # Flower's float form: a fraction of the sampled clients (1.0: all of them)
DEFAULT_THRESHOLD = 0.5  # a fraction of the shares
DEFAULT_CLIPPING_RANGE = 8.0
DEFAULT_QUANTIZATION_RANGE = 2**32
DEFAULT_MAX_WEIGHT = 2**20  # samples per client
DEFAULT_PARTIES = 2
DEFAULT_PRECISION_BITS = 24
#: Fixed-point scale of the training metrics in the trailer.
METRIC_SCALE = 2**24
#: Sums must stay below this in absolute value (int64 with one bit of headroom).
_RING_LIMIT = 2**62
NUM_EXAMPLES_KEY = "num-examples"
PARTITION_KEY = "partition-id"
#: Train-config key: ``examples`` (default) weights each client by its sample count;
#: ``uniform`` gives every client weight 1 and shares no training metrics (for a wrapper such as
#: client-placement DP, whose noise calibration assumes an unweighted sum).
WEIGHTING_KEY = "secagg-weighting"
WEIGHTINGS = ("examples", "uniform")
MASK_INFO = b"pchmr-secagg/v1/"


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SecAggSettings:
    """``--privacy-option`` values of ``secagg`` (``--strategy-option`` of the ``secagg`` strategy);
    see ``docs/privacy.md`` for each. Counts and fractions follow Flower: an int counts, a float
    in (0, 1] is a fraction."""

    backend: str = option(
        "flower", choices=BACKENDS, help="flower: Flower's SecAgg+ (survives dropouts); crypten: CrypTen parties"
    )
    num_shares: int | float = option(
        DEFAULT_NUM_SHARES, help="flower: shares per client, a count >= 3 or a fraction of the sampled clients"
    )
    reconstruction_threshold: int | float = option(
        DEFAULT_THRESHOLD, help="flower: shares needed to reconstruct, a count >= 2 or a fraction of num-shares"
    )
    clipping_range: float = option(
        DEFAULT_CLIPPING_RANGE, low=0.0, low_open=True, help="flower: update values are clipped to ± this"
    )
    quantization_range: int = option(
        DEFAULT_QUANTIZATION_RANGE, low=2, help="flower: quantization levels over the clipping range"
    )
    max_weight: int = option(
        DEFAULT_MAX_WEIGHT, low=1, help="largest sample count of one client (bounds the sums against overflow)"
    )
    timeout: float | None = option(
        None, low=0.0, low_open=True, default_text="the runtime's", help="seconds each stage waits for replies"
    )
    parties: int = option(DEFAULT_PARTIES, low=2, high=8, help="crypten: computation parties")
    precision_bits: int = option(
        DEFAULT_PRECISION_BITS, low=8, high=32, help="crypten: fractional bits of the fixed-point encoding"
    )

    def __post_init__(self) -> None:
        for key, minimum in (("num-shares", 3), ("reconstruction-threshold", 2)):
            value = getattr(self, key.replace("-", "_"))
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise ValueError(f"'{key}' as a fraction must lie in (0, 1], got {value!r}")
            if isinstance(value, int) and value < minimum:
                raise ValueError(f"'{key}' as a count must be >= {minimum} (or a fraction in (0, 1]), got {value!r}")
        counts = self.num_shares, self.reconstruction_threshold
        if all(isinstance(c, int) for c in counts) and counts[1] >= counts[0]:
            raise ValueError(f"'reconstruction-threshold' ({counts[1]}) must be less than 'num-shares' ({counts[0]})")

    def codec(self, per_round: int) -> FixedPointCodec:
        """The fixed-point encoding of this backend, checked against int64 overflow for ``per_round`` clients."""
        if self.backend == "flower":
            codec = FixedPointCodec(
                float_scale=self.quantization_range / (2.0 * self.clipping_range),
                float_clip=self.clipping_range,
                int_scale=1,
                metric_scale=METRIC_SCALE,
                max_weight=self.max_weight,
            )
        else:
            scale = 2**self.precision_bits
            # the largest clip for which per_round clients of max_weight cannot overflow the ring
            clip = _RING_LIMIT / (2.0 * scale * self.max_weight * per_round)
            codec = FixedPointCodec(
                float_scale=float(scale),
                float_clip=clip,
                int_scale=scale,
                metric_scale=scale,
                max_weight=self.max_weight,
            )
        codec.check_capacity(per_round)
        return codec

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "privacy": "secagg",
            "backend": self.backend,
            "max-weight": self.max_weight,
            "masks": "HKDF-SHA256 -> AES-256-CTR over Z_2^64",
        }
        if self.backend == "flower":
            out.update(
                {
                    "num-shares": self.num_shares,
                    "reconstruction-threshold": self.reconstruction_threshold,
                    "clipping-range": self.clipping_range,
                    "quantization-range": self.quantization_range,
                    "timeout": self.timeout,
                    "protocol": "Flower SecAgg+ (flwr 1.41/1.42) with pchmr's masking stages",
                }
            )
        else:
            out.update(
                {
                    "parties": self.parties,
                    "precision-bits": self.precision_bits,
                    "protocol": "additive sharing among CrypTen parties (crypten 0.4.1)",
                    # the parties are the server's child processes: whoever runs the server holds every
                    # party's key, so the non-collusion the protocol assumes does not hold (docs/privacy.md)
                    "secagg_parties": "simulated (server's process tree)",
                }
            )
        return out


def read_settings(options: Mapping[str, Any], per_round: int) -> SecAggSettings:
    """:class:`SecAggSettings` read from ``options`` for ``per_round`` sampled clients: an
    :class:`~pchmr.core.contracts.errors.OptionError` naming the option, a ``ValueError`` for
    fewer than 2 clients per round or sums that could overflow."""
    settings = read_options(SecAggSettings, options, plugin="secagg", kind="privacy")
    if per_round < 2:
        raise ValueError(
            f"secure aggregation needs at least 2 clients per round (the sum of one client is that client's update); got --per-round {per_round}"
        )
    settings.codec(per_round)  # overflow check
    return settings


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------
def mask_stream(secret: bytes, label: bytes, count: int) -> np.ndarray:
    """``count`` uniform uint64 words from a shared ``secret`` (any length, all of it used).

    key = HKDF-SHA256(secret, info = ``MASK_INFO + label``, 32 bytes); words = the AES-256-CTR
    keystream under that key (zero nonce: every (secret, label) pair has its own key).
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if not secret:
        raise ValueError("mask_stream needs a non-empty shared secret")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MASK_INFO + label).derive(bytes(secret))
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    out = bytearray(count * 8 + 15)  # update_into wants block_size - 1 spare bytes
    encryptor.update_into(bytes(count * 8), out)
    return np.frombuffer(out, dtype=np.uint64, count=count).copy()


# --------------------------------------------------------------------------------------
# the shared vector
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where each state entry and metric sits in the shared vector (public structure, no values).

    ``entries``: (name, shape, is_float) in state-dict order; ``metrics``: metric names (sorted).
    An entry is floating-point when both the global and the client's value are; otherwise (e.g.
    BatchNorm's ``num_batches_tracked``, an int64 buffer that Flower's FedAvg turns into float64 in
    the global model) it is an integer entry, encoded exactly relative to ``rint(global)``.
    The trailer after the entries is [n, clipped, then (n·m, n·finite) per metric].
    """

    entries: tuple[tuple[str, tuple[int, ...], bool], ...]
    metrics: tuple[str, ...]

    @property
    def body_size(self) -> int:
        return int(sum(math.prod(shape) for _, shape, _ in self.entries))

    @property
    def size(self) -> int:
        return self.body_size + 2 + 2 * len(self.metrics)

    def metric_names(self) -> list[str]:
        return list(self.metrics)


@dataclass(frozen=True)
class FixedPointCodec:
    """Scales of the shared vector: floats ``round(clip(Δ)·float_scale)``, integers
    ``Δ·int_scale``, metrics ``round(m·metric_scale)``; every value then times n ≤ ``max_weight``."""

    float_scale: float
    float_clip: float
    int_scale: int
    metric_scale: int
    max_weight: int

    def check_capacity(self, per_round: int) -> None:
        """ValueError when ``per_round`` clients of ``max_weight`` samples could overflow the int64 sum."""
        worst = per_round * self.max_weight * self.float_clip * self.float_scale
        if worst >= _RING_LIMIT:
            raise ValueError(
                f"secure sums could overflow: {per_round} clients x max-weight {self.max_weight} x "
                f"{self.float_clip:g} x scale {self.float_scale:g} = {worst:.3g} >= 2^62; lower "
                "quantization-range, clipping-range or max-weight"
            )

    @property
    def tolerance(self) -> float:
        """Largest rounding error of one floating-point entry of the average (no clipping)."""
        return 0.5 / self.float_scale


def _numpy(value: Any) -> np.ndarray:
    """A tensor or array as a numpy array (same shape and dtype)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def encode_update(
    codec: FixedPointCodec,
    global_state: Mapping[str, Any],
    new_state: Mapping[str, Any],
    num_examples: int,
    metrics: Mapping[str, float],
) -> tuple[Layout, np.ndarray]:
    """A client's vector (uint64, ``layout.size``) for the update ``new_state − global_state``.

    States map names to tensors/arrays of equal shapes; ``metrics`` are the training metrics
    (``num-examples`` and ``partition-id`` are left out: the first is n, the second identifies).
    """
    n = int(num_examples)
    if not 1 <= n <= codec.max_weight:
        raise ValueError(f"a client's sample count must lie in [1, max-weight={codec.max_weight}], got {num_examples}")
    if set(new_state) != set(global_state):
        raise ValueError(
            f"the new state has other entries than the global one: {sorted(set(new_state) ^ set(global_state))[:3]}"
        )
    entries, parts, clipped = [], [], 0
    for name, global_value in global_state.items():
        g_array, w_array = _numpy(global_value), _numpy(new_state[name])
        if g_array.shape != w_array.shape:
            raise ValueError(
                f"state entry '{name}' has shape {w_array.shape} in the update and {g_array.shape} in the global model"
            )
        g, w = g_array.reshape(-1), w_array.reshape(-1)
        is_float = bool(np.issubdtype(g.dtype, np.floating) and np.issubdtype(w.dtype, np.floating))
        entries.append((name, tuple(int(s) for s in g_array.shape), is_float))
        if is_float:
            delta = w.astype(np.float64) - g.astype(np.float64)
            over = int(np.count_nonzero(np.abs(delta) > codec.float_clip))
            if over:
                clipped += over
                np.clip(delta, -codec.float_clip, codec.float_clip, out=delta)
            q = np.rint(delta * codec.float_scale).astype(np.int64)
        else:
            q = (np.rint(w).astype(np.int64) - np.rint(g).astype(np.int64)) * codec.int_scale
        parts.append(q * n)
    names = sorted(k for k in metrics if k not in (NUM_EXAMPLES_KEY, PARTITION_KEY))
    trailer = [n * codec.int_scale, clipped * codec.int_scale]
    for key in names:
        value = float(metrics[key])
        finite = math.isfinite(value)
        trailer += [n * round(value * codec.metric_scale) if finite else 0, n * codec.int_scale if finite else 0]
    parts.append(np.asarray(trailer, dtype=np.int64))
    vector = np.concatenate(parts).view(np.uint64)
    return Layout(tuple(entries), tuple(names)), vector


@dataclass
class SecureAggregate:
    """What the server learns from a round: the weighted average update and the totals."""

    deltas: dict[str, np.ndarray]  # name → float64 average update Σ n_k Δ_k / Σ n_k (entry's shape)
    num_examples: float  # Σ n_k
    clipped: int  # values clipped to the clipping range, over all clients
    metrics: dict[str, float]  # n-weighted average of every metric (NaN when no client had a finite value)
    num_clients: int
    integer_entries: frozenset[str] = frozenset()  # entries averaged as integers: new = rint(global) + delta


def decode_sum(layout: Layout, values: np.ndarray, scales: FixedPointCodec, num_clients: int) -> SecureAggregate:
    """The aggregate from the revealed sum. ``values`` is either the uint64 ring sum or the
    float64 already divided by a common scale (then ``scales`` has all scales 1)."""
    if values.size != layout.size:
        raise ValueError(f"the revealed sum has {values.size} values; the layout expects {layout.size}")
    if values.dtype == np.uint64:
        values = values.view(np.int64).astype(np.float64)
    trailer = values[layout.body_size :]
    total_n = float(trailer[0]) / scales.int_scale
    if not total_n > 0:
        raise RuntimeError(f"the revealed sum says the clients hold {total_n} samples; secure aggregation needs > 0")
    deltas: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, is_float in layout.entries:
        size = math.prod(shape)
        block = values[offset : offset + size]
        scale = scales.float_scale if is_float else scales.int_scale
        deltas[name] = (block / (scale * total_n)).reshape(shape)
        offset += size
    metrics = {}
    for index, key in enumerate(layout.metrics):
        weighted, weight = trailer[2 + 2 * index], trailer[3 + 2 * index] / scales.int_scale
        metrics[key] = float(weighted / scales.metric_scale / weight) if weight > 0 else float("nan")
    integers = frozenset(name for name, _, is_float in layout.entries if not is_float)
    return SecureAggregate(deltas, total_n, round(trailer[1] / scales.int_scale), metrics, num_clients, integers)


def aggregate_with_strategy(
    server: Any, server_round: int, template: Any, global_arrays: Any, aggregate: SecureAggregate
) -> tuple[Any, dict[str, float]]:
    """Hand the wrapped Flower strategy the secure average as the round's only reply.

    ``template``: one of this round's train messages (the reply is addressed as its answer);
    ``global_arrays``: the round's global ArrayRecord. Returns the strategy's new ArrayRecord and
    the round's metrics (the clients' averaged metrics, the strategy's own, and secagg's).
    """
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    averaged = {}
    for name, array in global_arrays.items():
        base = array.numpy()
        start = base.astype(np.float64)
        new = (np.rint(start) if name in aggregate.integer_entries else start) + aggregate.deltas[name]
        if np.issubdtype(base.dtype, np.floating):
            new = new.astype(base.dtype)
        averaged[name] = Array(np.array(new, order="C"))  # (ascontiguousarray would make a 0-d entry 1-d)
    metrics = {
        NUM_EXAMPLES_KEY: aggregate.num_examples,
        **{k: v for k, v in aggregate.metrics.items() if math.isfinite(v)},
    }
    reply = Message(RecordDict({"arrays": ArrayRecord(averaged), "metrics": MetricRecord(metrics)}), reply_to=template)
    new_arrays, train_metrics = server.aggregate_train(server_round, [reply])
    if new_arrays is None:
        raise RuntimeError(f"round {server_round}: the wrapped strategy returned no aggregate for the secure average")
    out = {
        key: float(value)
        for key, value in dict(train_metrics or {}).items()
        if key not in (NUM_EXAMPLES_KEY, PARTITION_KEY)
    }
    out.update({"secagg-clients": float(aggregate.num_clients), "secagg-clipped": float(aggregate.clipped)})
    return new_arrays, out


def client_weight(train_config: Mapping[str, Any], metrics: Mapping[str, float]) -> tuple[int, dict[str, float]]:
    """(weight n, metrics to share) of a client under the round's ``secagg-weighting``."""
    weighting = str(train_config.get(WEIGHTING_KEY, "examples"))
    if weighting not in WEIGHTINGS:
        raise ValueError(f"train config '{WEIGHTING_KEY}' must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if weighting == "uniform":
        return 1, {}
    return int(metrics[NUM_EXAMPLES_KEY]), dict(metrics)


def payload_bytes(content: Any) -> int:
    """Bytes a message's records carry: array data plus bytes values of config records."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(item) if isinstance(item, (bytes, str)) else 8 for item in items)
    return total


def layout_to_config(layout: Layout) -> dict[str, Any]:
    """The layout as ConfigRecord values (sent by clients beside their vector)."""
    return {
        "layout-names": [name for name, _, _ in layout.entries],
        "layout-metrics": list(layout.metrics),
        "layout-kinds": "".join("f" if is_float else "i" for _, _, is_float in layout.entries),
    }


def check_layout(layout: Layout, record: Mapping[str, Any], node_id: int) -> Layout:
    """The server's layout with the entry kinds and metrics a client reported (``record``: its
    ConfigRecord from :func:`layout_to_config`); ValueError when the entries differ."""
    names = list(record["layout-names"])
    kinds = str(record.get("layout-kinds", ""))
    if names != [name for name, _, _ in layout.entries] or len(kinds) != len(names) or set(kinds) - {"f", "i"}:
        raise ValueError(f"node {node_id} encoded other state entries than the global model's")
    entries = tuple((name, shape, kind == "f") for (name, shape, _), kind in zip(layout.entries, kinds))
    return Layout(entries, tuple(record.get("layout-metrics", [])))


def server_layout(global_arrays: Any) -> Layout:
    """The entries part of the layout, from the round's global ArrayRecord."""
    entries = []
    for name, array in global_arrays.items():
        value = array.numpy()
        entries.append((name, tuple(int(s) for s in value.shape), bool(np.issubdtype(value.dtype, np.floating))))
    return Layout(tuple(entries), ())
