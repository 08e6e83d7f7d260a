"""The ``crypten`` secure-aggregation backend: additive secret sharing among CrypTen parties.

Roles. P computation parties (``parties`` option, default 2) run as separate processes started
by the server on first use; each holds an X25519 key pair whose private half never leaves it,
and together they form a CrypTen (0.4.1) MPC world over torch.distributed (gloo). The server
relays messages between clients and parties and sees neither the parties' keys nor the
clients' shares in the clear.

Round r:

1. The server sends the wrapped strategy's train messages with the parties' public keys.
2. Client k trains, encodes its weighted update x_k (:func:`~pchmr.plugins.privacy.secagg.codec.encode_update`,
   fixed point with ``precision-bits`` fractional bits), draws an ephemeral X25519 key e_k and
   derives one pad per party, pad_{k,i} = :func:`~pchmr.plugins.privacy.secagg.codec.mask_stream` of the
   key agreed between e_k and party i. Its additive shares over Z_2^64 are
   s_{k,i} = pad_{k,i} for i ≥ 1 and s_{k,0} = x_k − Σ_{i≥1} s_{k,i}; it uploads e_k's public key
   and s_{k,0} encrypted for party 0 as c_k = s_{k,0} + pad_{k,0}. Nothing else leaves the client.
3. The server forwards every e_k to every party and every c_k to party 0. Party i ≥ 1
   regenerates its shares from the pads; party 0 decrypts s_{k,0} = c_k − pad_{k,0}.
4. Each party wraps its share of each client as a CrypTen ``ArithmeticSharedTensor``
   (``from_shares``), adds them with CrypTen's arithmetic (the sum of the clients' sharings),
   and the parties reveal only that sum (``get_plain_text``, decoded with the fixed-point decode
   of :mod:`~pchmr.plugins.privacy.secagg.crypten_compat`). Party 0 returns it to the server.

Who learns what: the server sees c_k (x_k plus pads it cannot derive) and the revealed sum;
party 0 sees s_{k,0} (x_k minus pads it cannot derive); party i ≥ 1 sees pads only. An update is
exposed only if the server and all P parties collude. Clients that fail in a round are left
out (the parties only regenerate shares for the clients the server lists), so dropouts cost
nothing; fewer than 2 surviving clients stop the round, since their sum would be one update.

CrypTen is imported through :func:`~pchmr.plugins.privacy.secagg.crypten_compat.ensure_crypten` when
this module is imported.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import tempfile
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from pchmr.core.contracts.strategy import STAGE_KEY, RoundResult
from pchmr.core.kit.federation import short_reason
from pchmr.plugins.privacy.secagg.codec import (
    FixedPointCodec,
    Layout,
    SecAggSettings,
    aggregate_with_strategy,
    check_layout,
    client_weight,
    decode_sum,
    encode_update,
    layout_to_config,
    mask_stream,
    payload_bytes,
    server_layout,
)
from pchmr.plugins.privacy.secagg.crypten_compat import ensure_crypten

ensure_crypten()  # pinned version check, import shim and decode fix, before anything uses CrypTen

__all__ = ["STAGE", "CrypTenClient", "CrypTenProtocol", "PartyPool"]

log = logging.getLogger("pchmr.secagg")

#: ``pchmr-stage`` of this backend's train messages.
STAGE = "crypten-share"
#: ConfigRecord of this backend in train messages and replies.
RECORD = "pchmr-crypten"
PAD_LABEL = b"crypten/share-pad/round-"
#: Seconds to wait for the parties to start (imports torch and CrypTen, joins the gloo world).
PARTY_START_TIMEOUT = 600.0
MIN_CLIENTS = 2
_UNIT = FixedPointCodec(float_scale=1.0, float_clip=float("inf"), int_scale=1, metric_scale=1, max_weight=1)


def _pad_label(server_round: int) -> bytes:
    return PAD_LABEL + str(int(server_round)).encode()


def _agree(private_key: Any, public_bytes: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return private_key.exchange(X25519PublicKey.from_public_bytes(bytes(public_bytes)))


def _public_bytes(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------------------
# the parties
# --------------------------------------------------------------------------------------
def _party_main(rank: int, world_size: int, rendezvous: str, conn: Any) -> None:
    """One computation party (a spawned process): join the CrypTen world, publish a public key,
    then add and reveal the clients' sharings round after round until told to stop."""
    try:
        os.environ.update(DISTRIBUTED_BACKEND="gloo", RENDEZVOUS=rendezvous, WORLD_SIZE=str(world_size), RANK=str(rank))
        crypten = ensure_crypten()
        import torch
        from crypten.mpc.primitives import ArithmeticSharedTensor
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        torch.set_num_threads(1)
        crypten.init()
        key = X25519PrivateKey.generate()
        conn.send(("key", _public_bytes(key)))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            _, server_round, ephemerals, size, precision = command
            total = None
            for ephemeral in ephemerals:
                pad = mask_stream(_agree(key, ephemeral), _pad_label(server_round), size)
                share = np.subtract(conn.recv()[1], pad) if rank == 0 else pad
                sharing = ArithmeticSharedTensor.from_shares(
                    torch.from_numpy(share.view(np.int64)), precision=precision
                )
                total = sharing if total is None else total + sharing
            plain = total.get_plain_text()
            conn.send(("sum", plain.numpy() if rank == 0 else None))
        crypten.uninit()
    except BaseException:  # report to the server instead of dying silently
        conn.send(("error", f"party {rank}: {traceback.format_exc()}"))


class PartyPool:
    """P party processes (spawned, daemonic) and the pipes the server relays through."""

    def __init__(self, parties: int, timeout: float = PARTY_START_TIMEOUT) -> None:
        context = multiprocessing.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="pchmr-crypten-")
        rendezvous = f"file://{os.path.join(self._dir, 'rendezvous')}"
        self._conns, self._processes = [], []
        for rank in range(parties):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_party_main,
                args=(rank, parties, rendezvous, theirs),
                daemon=True,
                name=f"pchmr-crypten-party-{rank}",
            )
            process.start()
            self._conns.append(ours)
            self._processes.append(process)
        self.public_keys = [self._receive(rank, "key", timeout) for rank in range(parties)]
        self.relayed_bytes = 0
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _receive(self, rank: int, expected: str, timeout: float) -> Any:
        conn = self._conns[rank]
        if not conn.poll(timeout):
            raise TimeoutError(f"CrypTen party {rank} did not answer within {timeout:.0f} s (expected '{expected}')")
        kind, payload = conn.recv()
        if kind == "error":
            raise RuntimeError(f"CrypTen party failed: {payload}")
        if kind != expected:
            raise RuntimeError(f"CrypTen party {rank} sent '{kind}', expected '{expected}'")
        return payload

    def reveal_sum(
        self, server_round: int, uploads: list[tuple[bytes, np.ndarray]], size: int, precision: int, timeout: float
    ) -> np.ndarray:
        """Forward the clients' (ephemeral key, c_k) to the parties; the revealed sum, float64 (size,)."""
        ephemerals = [ephemeral for ephemeral, _ in uploads]
        with self._lock:
            for conn in self._conns:
                conn.send(("round", server_round, ephemerals, size, precision))
                self.relayed_bytes += sum(len(e) for e in ephemerals)
            for _, ciphertext in uploads:
                self._conns[0].send(("share", ciphertext))
                self.relayed_bytes += ciphertext.nbytes
            results = [self._receive(rank, "sum", timeout) for rank in range(len(self._conns))]
        return np.asarray(results[0], dtype=np.float64)

    def close(self) -> None:
        for conn, process in zip(self._conns, self._processes):
            if process.is_alive():
                try:
                    conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        self._processes = []


# --------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------
class CrypTenProtocol:
    """The server half (a :class:`~pchmr.core.contracts.strategy.RoundProtocol`) around the Flower strategy ``server``."""

    def __init__(
        self, server: Any, settings: SecAggSettings, codec: FixedPointCodec, num_rounds: int | None = None
    ) -> None:
        self.server = server
        self.settings = settings
        self.codec = codec
        self.num_rounds = num_rounds  # the parties stop after this round (None: at exit)
        self.pool: PartyPool | None = None

    def start(self) -> PartyPool:
        """The party processes (started on the first call)."""
        if self.pool is None:
            log.info("starting %d CrypTen parties", self.settings.parties)
            self.pool = PartyPool(self.settings.parties)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def run_round(self, grid: Any, server_round: int, arrays: Any, train_config: Any, timeout: float) -> RoundResult:
        try:
            return self._run_round(grid, server_round, arrays, train_config, timeout)
        except BaseException:
            self.close()  # a failed round ends the run: do not leave the parties behind
            raise
        finally:
            if self.num_rounds is not None and server_round >= self.num_rounds:
                self.close()

    def _run_round(self, grid: Any, server_round: int, arrays: Any, train_config: Any, timeout: float) -> RoundResult:
        pool = self.start()
        wait = self.settings.timeout if self.settings.timeout is not None else timeout
        messages = list(self.server.configure_train(server_round, arrays, train_config, grid))
        if not messages:
            raise RuntimeError(f"round {server_round}: the strategy configured no client")
        sent = 0
        for message in messages:
            message.content[RECORD] = ConfigRecord({STAGE_KEY: STAGE, "party-keys": list(pool.public_keys)})
            sent += payload_bytes(message.content)
        replies = sorted(grid.send_and_receive(messages, timeout=wait), key=lambda r: r.metadata.src_node_id)
        ok = [r for r in replies if not r.has_error()]
        if len(ok) < MIN_CLIENTS:
            reasons = "; ".join(
                f"node {r.metadata.src_node_id}: {short_reason(r.error.reason)}" for r in replies if r.has_error()
            )
            raise RuntimeError(
                f"round {server_round}: {len(ok)} of {len(messages)} clients answered; secure aggregation needs at "
                f"least {MIN_CLIENTS} (a sum of one is that client's update). {reasons}"
            )
        layout: Layout = server_layout(arrays)
        uploads = []
        for index, reply in enumerate(ok):
            record = reply.content.config_records[RECORD]
            reported = check_layout(server_layout(arrays), record, reply.metadata.src_node_id)
            if index and reported != layout:
                raise ValueError(
                    f"node {reply.metadata.src_node_id} reported other entry kinds or training metrics than the other clients"
                )
            layout = reported
            share = np.frombuffer(record["share"], dtype=np.uint64)
            if share.size != layout.size:
                raise ValueError(
                    f"node {reply.metadata.src_node_id} sent a share of {share.size} values; the layout has {layout.size}"
                )
            uploads.append((bytes(record["ephemeral-key"]), share))
        received = sum(payload_bytes(r.content) for r in ok)
        relayed_before = pool.relayed_bytes
        values = pool.reveal_sum(server_round, uploads, layout.size, self.settings.precision_bits, wait)
        aggregate = decode_sum(layout, values, _UNIT, len(ok))
        new_arrays, metrics = aggregate_with_strategy(self.server, server_round, messages[0], arrays, aggregate)
        metrics["secagg-dropped"] = float(len(messages) - len(ok))
        metrics["secagg-party-bytes"] = float(pool.relayed_bytes - relayed_before)
        return RoundResult(new_arrays, metrics, sent, received)


# --------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------
TrainFn = Callable[[Any, Message, Any], tuple[dict[str, Any], dict[str, float]]]


def _default_train(runtime: Any, msg: Message, context: Any) -> tuple[dict[str, Any], dict[str, float]]:
    return runtime.train(msg, context)


class CrypTenClient:
    """The client half (a pchmr client handler): local training, then the shares of step 2."""

    def __init__(self, codec: FixedPointCodec, train: TrainFn | None = None) -> None:
        self.codec = codec
        self.train = train or _default_train

    def __call__(self, msg: Message, context: Any, runtime: Any) -> Message:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        party_keys = [bytes(key) for key in msg.content.config_records[RECORD]["party-keys"]]
        if len(party_keys) < 2:
            raise ValueError(f"the crypten backend needs at least 2 parties' keys, the server sent {len(party_keys)}")
        server_round = int(msg.content["config"]["server-round"])
        new_state, metrics = self.train(runtime, msg, context)
        global_state = msg.content["arrays"].to_torch_state_dict()
        weight, shared = client_weight(msg.content["config"], metrics)
        layout, vector = encode_update(self.codec, global_state, new_state, weight, shared)
        ephemeral = X25519PrivateKey.generate()
        for party, key in enumerate(party_keys):
            pad = mask_stream(_agree(ephemeral, key), _pad_label(server_round), vector.size)
            # party 0's share is x − Σ_{i≥1} pad_i, sent encrypted with its own pad
            if party == 0:
                np.add(vector, pad, out=vector)
            else:
                np.subtract(vector, pad, out=vector)
        record = ConfigRecord(
            {"ephemeral-key": _public_bytes(ephemeral), "share": vector.tobytes(), **layout_to_config(layout)}
        )
        return Message(RecordDict({RECORD: record}), reply_to=msg)
