"""``secagg``: secure aggregation — the server learns the round's weighted average, not one update.

``--privacy secagg`` appends a :class:`SecureAggregation` mechanism to an aggregation strategy
(``fedavg``, ``fedprox``, ``fedopt``): its :class:`~pchmr.core.contracts.strategy.RoundProtocol`
replaces the plain exchange of a round and its client handler is the client half; ``--strategy
secagg`` is FedAvg under it. Two backends (``--privacy-option backend=...``):

* ``flower`` (default) — Flower's SecAgg+ (:mod:`pchmr.plugins.privacy.secagg.flower`): pairwise
  masks agreed between clients, secrets Shamir-shared among neighbours so that dropouts are
  survived;
* ``crypten`` — additive secret sharing among P computation parties that add the shares with
  CrypTen (:mod:`pchmr.plugins.privacy.secagg.crypten`).

Threat model (both backends; details in ``docs/privacy.md``): the server is honest but curious —
it runs the protocol as written and tries to learn single clients' updates from everything it
sees. Clients follow the protocol; no more than the protocol's threshold collude with the server
(flower: fewer than ``reconstruction-threshold`` of a client's neighbours; crypten: the P parties
do not all collude with the server). Out of scope: a malicious server (dropping or forging
messages to unmask someone), poisoned updates, and what the average itself reveals (DP's job).

What a client secret-shares or masks is one vector over Z_2^64 (:class:`FixedPointCodec`):

* each floating-point state entry's update ``Δ = w_new − w_global``, clipped to
  ``[−clip, clip]`` and rounded to the grid ``1/scale``, times the client's sample count n;
* each integer entry's exact update times n (e.g. BatchNorm's ``num_batches_tracked``);
* a trailer: n, the number of clipped values, and for every training metric m (``train-loss``,
  ``fit-seconds``, …) n·round(m·metric_scale) and n·[m is finite].

Sums wrap modulo 2^64, so the plaintext sum is exact as long as it fits an int64, which the
settings check (``max-weight`` bounds n). The server divides the revealed sum by Σn, adds it to
the global model and hands the result to the wrapped strategy's ``aggregate_train`` as the one
reply of the round (weight Σn): FedAvg and FedProx return it, FedOpt steps from it.

Tolerance against plain FedAvg (floating-point entries): |secure − plain| ≤ 1/(2·scale) +
float32 rounding, i.e. clipping-range / quantization-range for ``flower`` (8/2³² ≈ 1.9e-9 with the
defaults) and 2^-(precision-bits+1) + 2⁻²⁴·max|Δ| for ``crypten`` (its plaintext is decoded in
float32), provided no value was clipped (``secagg_clipped`` in rounds.jsonl counts them).

Masks and pads come from :func:`mask_stream`: HKDF-SHA256 over the *full* shared secret, then
the AES-256-CTR keystream — not NumPy's MT19937 seeded with 32 bits as in Flower's
``pseudo_rand_gen``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.strategy import (
    ClientHandler,
    IncompatibleError,
    RoundProtocol,
    StrategyConfig,
    StrategyParts,
    UpdateInfo,
)
from pchmr.plugins.privacy.secagg.codec import SecAggSettings, read_settings

__all__ = ["SecureAggregation", "secagg"]


# --------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------
class SecureAggregation(Mechanism):
    """Secure aggregation as a mechanism: the backend's round protocol (server) and its client
    handler (one stage), described by the settings."""

    name = "secagg"

    def __init__(
        self, protocol: RoundProtocol, handlers: Mapping[str, ClientHandler], settings: SecAggSettings
    ) -> None:
        self.protocol = protocol
        self.handlers = dict(handlers)
        self.settings = settings

    def describe(self) -> Mapping[str, Any]:
        return self.settings.describe()

    def round_protocol(self) -> RoundProtocol:
        return self.protocol

    def client_handlers(self) -> Mapping[str, ClientHandler]:
        return self.handlers

    def server_view(
        self,
        updates: Sequence[Mapping[str, Any]],
        global_state: Mapping[str, Any],
        infos: Sequence[UpdateInfo],
        generator: Any = None,
    ) -> Any:
        """``pchmr audit``: what the server holds after the masking stage of one round.

        Each client's vector (:func:`~pchmr.plugins.privacy.secagg.codec.encode_update`: the update,
        clipped, quantised and weighted by n) plus its pairwise masks, ``+mask(s_ij)`` towards every
        later client and ``-mask(s_ij)`` towards every earlier one (:func:`mask_stream`; ``s_ij`` a
        secret only clients i and j hold, drawn here from ``generator``) — Flower's backend; the
        crypten backend's shares are as uniform. ``uploads[i]`` is one masked vector read as an
        update (n taken as 1): the most the server can make of it alone. ``total`` is the revealed
        sum decoded as the protocol decodes it: the clients' weighted average update."""
        import os

        import numpy as np
        import torch

        from pchmr.core.contracts.attack import ServerView
        from pchmr.plugins.privacy.secagg.codec import decode_sum, encode_update, mask_stream

        k = len(updates)
        if k < 2:
            raise ValueError(f"secure aggregation runs over at least 2 clients; the audit gave {k}")
        codec = self.settings.codec(max(k, infos[0].per_round))
        names = list(updates[0])
        base = {name: global_state[name].detach().double().cpu() for name in names}
        vectors, layout = [], None
        for update, info in zip(updates, infos, strict=True):
            new = {name: base[name] + update[name].detach().double().cpu() for name in names}
            layout, vector = encode_update(codec, base, new, info.num_examples, {})
            vectors.append(vector)
        generator = generator or torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "big"))
        pair_secrets = {
            (i, j): torch.randint(0, 256, (32,), generator=generator, dtype=torch.uint8).numpy().tobytes()
            for i in range(k)
            for j in range(i + 1, k)
        }
        size = vectors[0].size
        masked = [v.copy() for v in vectors]
        with np.errstate(over="ignore"):
            for (i, j), secret in pair_secrets.items():
                stream = mask_stream(secret, b"audit", size)
                masked[i] += stream  # uint64 arithmetic wraps modulo 2^64, as the protocol's sums do
                masked[j] -= stream
            revealed = masked[0].copy()
            for vector in masked[1:]:
                revealed += vector
        body = layout.body_size
        uploads = []
        for vector in masked:
            values = vector[:body].view(np.int64).astype(np.float64) / codec.float_scale
            out, offset = {}, 0
            for name, shape, _ in layout.entries:
                count = int(np.prod(shape))
                out[name] = torch.from_numpy(values[offset : offset + count].reshape(shape).copy())
                offset += count
            uploads.append(out)
        total = {name: torch.from_numpy(delta) for name, delta in decode_sum(layout, revealed, codec, k).deltas.items()}
        details = {"backend": self.settings.backend, "clients": k, "masks": "pairwise, HKDF-SHA256 -> AES-256-CTR"}
        return ServerView("secagg", tuple(uploads), total, details)


def secagg(parts: StrategyParts, config: StrategyConfig) -> StrategyParts:
    """Append :class:`SecureAggregation` (the backend chosen by option ``backend``) to ``parts``.

    Refuses (IncompatibleError) a strategy that needs individual client updates, and one that
    already has a round protocol or client handlers (two protocols cannot both run a round).
    """
    if parts.requires_individual_updates:
        raise IncompatibleError(
            f"strategy '{parts.name}' compares individual client updates on the server, which secure "
            "aggregation exists to hide (the server only ever sees the sum); use fedavg, fedprox or fedopt with --privacy secagg"
        )
    if any(m.round_protocol() is not None or m.client_handlers() for m in parts.mechanisms):
        raise IncompatibleError(
            f"strategy '{parts.name}' already runs its own round protocol; secure aggregation cannot replace it"
        )
    settings = read_settings(config.options, config.per_round)
    codec = settings.codec(config.per_round)
    if settings.backend == "flower":
        from pchmr.plugins.privacy.secagg.flower import (
            STAGE,
            SecAggPlusClient,
            SecAggPlusProtocol,
        )

        protocol: Any = SecAggPlusProtocol(parts.server, settings, codec)
        handlers = {STAGE: SecAggPlusClient()}
    else:
        from pchmr.plugins.privacy.secagg.crypten_compat import CrypTenUnavailableError, CrypTenVersionError

        try:
            from pchmr.plugins.privacy.secagg.crypten import (
                STAGE,
                CrypTenClient,
                CrypTenProtocol,
            )
        except (CrypTenUnavailableError, CrypTenVersionError) as exc:
            # CrypTen is optional (the crypten extra plus a --no-deps install): without it this backend
            # is refused like a bad option, before any data is read; backend=flower needs nothing more
            raise OptionError(f"secagg privacy option 'backend' crypten cannot run here: {exc}") from None

        protocol = CrypTenProtocol(parts.server, settings, codec, num_rounds=config.num_rounds)
        handlers = {STAGE: CrypTenClient(codec)}
    return parts.with_mechanism(SecureAggregation(protocol, handlers, settings), name=f"{parts.name}+secagg")


secagg.options = SecAggSettings  # type: ignore[attr-defined]  # DeclaresOptions


@hookimpl
def pchmr_privacy() -> dict[str, object]:
    return {"secagg": secagg}
