"""The ``flower`` secure-aggregation backend: Flower's SecAgg+ run as a pchmr round protocol.

Flower 1.41 and 1.42 ship SecAgg+ as :class:`flwr.server.workflow.SecAggPlusWorkflow` (server) and
:func:`flwr.client.mod.secaggplus_mod` (client), both written for its legacy stack
(LegacyContext + DefaultWorkflow, FitIns/FitRes records). pchmr runs the same four stages —
setup, share keys, collect masked vectors, unmask — from its own runtime:

======================  =====================================  ======================================
stage                   server (:class:`SecAggPlusProtocol`)   client (:class:`SecAggPlusClient`)
======================  =====================================  ======================================
setup                   **pchmr's** (no LegacyContext): the    Flower's ``_setup`` (two ECDH key pairs)
                        protocol sizes and neighbour ring as
                        Flower computes them
share keys              Flower's ``share_keys_stage``          Flower's ``_share_keys`` (Shamir shares
                                                               of the mask seed and of sk1, Fernet-
                                                               encrypted per neighbour)
collect masked vectors  **pchmr's**: sums uint64 vectors       **pchmr's**: local training, then the
                        modulo 2^64                            update encoded by
                                                               :func:`~pchmr.plugins.privacy.secagg.codec.encode_update`
                                                               plus the self mask, ± pairwise masks
unmask                  **pchmr's**: removes the masks with    Flower's ``_unmask``
                        the same generator
======================  =====================================  ======================================

Why pchmr owns three steps (and nothing is monkeypatched):

* Masks. Flower's ``pseudo_rand_gen`` folds the 32-byte seed into 32 bits and seeds NumPy's
  MT19937 with them: 2³² candidate seeds, brute-forceable from one masked vector. pchmr's masks
  are :func:`~pchmr.plugins.privacy.secagg.codec.mask_stream` (HKDF-SHA256 over the whole seed or
  shared key → AES-256-CTR). Both ends of every mask are pchmr's code: the client's collect
  stage and the server's unmask stage.
* Arithmetic. Flower works modulo ``modulus_range`` < 2³² and multiplies each parameter by
  n/max_weight *before* quantizing (the weight costs precision). pchmr works in Z_2^64 and
  multiplies the quantized integer by n (exact), with quantization-range 2³² by default.
* Legacy glue. The server's setup and collect stages read FitIns/FitRes through LegacyContext;
  pchmr's take the wrapped strategy's train messages (``configure_train``) and hand the
  average to its ``aggregate_train`` (:func:`~pchmr.plugins.privacy.secagg.codec.aggregate_with_strategy`).
* Dropouts. Flower's unmask asks for shares of every sampled node, so a client that drops
  before sharing its keys halts the round; pchmr's unmask recovers exactly the masks that were
  applied: a client that drops after sharing keys has its pairwise masks removed with its
  reconstructed sk1, one that drops earlier was never masked with.

Everything else — message formats, stage order checks (``check_stage``/``check_configs``), key
generation, Shamir sharing, share encryption, client state in ``context.state`` — is Flower's.
A client message of this protocol carries ``pchmr-stage = "secaggplus"`` (added by the
protocol's grid adapter) and is routed to :class:`SecAggPlusClient` by pchmr's ClientApp.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _setup,
    _share_keys,
    _unmask,
    check_configs,
    check_stage,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_separate,
)
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
    WorkflowState,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
)

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

__all__ = ["STAGE", "SecAggPlusClient", "SecAggPlusProtocol", "protocol_sizes"]

log = logging.getLogger("pchmr.secagg")

#: ``pchmr-stage`` value of this protocol's messages.
STAGE = "secaggplus"
#: ConfigRecord that carries ``pchmr-stage`` (kept out of Flower's ``secaggplus_configs``,
#: whose share-keys stage expects only public keys in it).
PCHMR_RECORD = "pchmr"
SELF_LABEL = b"secaggplus/self-mask"
PAIR_LABEL = b"secaggplus/pairwise-mask"
#: Flower's ``mod_range`` key is sent as 0: pchmr's masking stages work modulo 2^64.
UNUSED_MOD_RANGE = 0


def protocol_sizes(num_shares: int | float, threshold: int | float, num_sampled: int) -> tuple[int, int]:
    """(shares per client, reconstruction threshold) for ``num_sampled`` clients, by Flower's rules.

    A float ``num_shares`` is a fraction of the sampled clients rounded to an odd count (all of
    them when that is ≤ 2); a float ``threshold`` is a fraction of the shares, at least 2. Counts
    larger than the sample are capped at it.
    """
    if isinstance(num_shares, float):
        shares = round(num_shares * num_sampled)
        if shares < num_sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = num_sampled
    else:
        shares = num_shares
    shares = min(shares, num_sampled)
    needed = max(round(threshold * shares), 2) if isinstance(threshold, float) else threshold
    if needed > shares:
        raise ValueError(
            f"SecAgg+ needs reconstruction-threshold <= shares per client; got {needed} > {shares} "
            f"with {num_sampled} clients sampled"
        )
    return shares, needed


# --------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------
class _ProtocolGrid:
    """The round's grid view that tags every message for :class:`SecAggPlusClient` and counts bytes."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.sent = 0
        self.received = 0

    def get_node_ids(self) -> list[int]:
        return list(self._grid.get_node_ids())

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        outgoing = list(messages)
        for message in outgoing:
            message.content[PCHMR_RECORD] = ConfigRecord({STAGE_KEY: STAGE})
            self.sent += payload_bytes(message.content)
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        self.received += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class _RoundContext:
    """What Flower's inherited stages read from the LegacyContext: the current round."""

    state: RecordDict

    @classmethod
    def for_round(cls, server_round: int) -> _RoundContext:
        return cls(RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})}))

    @property
    def server_round(self) -> int:
        return int(cast(int, self.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]))


@dataclass
class _RoundState(WorkflowState):
    """Flower's workflow state plus what pchmr's stages keep."""

    train_content: dict[int, RecordDict] = field(default_factory=dict)
    share_active: set[int] = field(default_factory=set)
    server_layout: Layout | None = None  # from the global model (entries only)
    layout: Layout | None = None  # as the clients reported it (entry kinds, metrics)
    total: np.ndarray | None = None
    result: Any = None


class SecAggPlusProtocol(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow as a :class:`~pchmr.core.contracts.strategy.RoundProtocol` around ``server``
    (a Flower message-API strategy); see the module docstring for the stages pchmr owns."""

    def __init__(self, server: Any, settings: SecAggSettings, codec: FixedPointCodec) -> None:
        super().__init__(
            settings.num_shares,
            settings.reconstruction_threshold,
            max_weight=float(settings.max_weight),
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            modulus_range=2**64,
            timeout=settings.timeout,
        )
        self.server = server
        self.codec = codec
        self._timeout_option = settings.timeout

    # -- the round -----------------------------------------------------------------------
    def run_round(self, grid: Any, server_round: int, arrays: Any, train_config: Any, timeout: float) -> RoundResult:
        self.timeout = self._timeout_option if self._timeout_option is not None else timeout
        messages = list(self.server.configure_train(server_round, arrays, train_config, grid))
        if not messages:
            raise RuntimeError(f"round {server_round}: the strategy configured no client")
        wire = _ProtocolGrid(grid)
        context = _RoundContext.for_round(server_round)
        state = _RoundState(train_content={m.metadata.dst_node_id: m.content for m in messages})
        state.server_layout = server_layout(arrays)
        for step in (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage):
            if not step(wire, context, state):
                reasons = (
                    "; ".join(str(f) for f in state.failures[:3])
                    or "too few clients left for the reconstruction threshold"
                )
                raise RuntimeError(
                    f"round {server_round}: secure aggregation (SecAgg+) halted in {step.__name__}: "
                    f"{len(state.active_node_ids)} of {len(messages)} clients active, threshold {state.threshold}; {reasons}"
                )
        new_arrays, metrics = aggregate_with_strategy(self.server, server_round, messages[0], arrays, state.result)
        metrics["secagg-dropped"] = float(len(messages) - state.result.num_clients)
        return RoundResult(new_arrays, metrics, wire.sent, wire.received)

    # -- stage 0 -------------------------------------------------------------------------
    def setup_stage(self, grid: Any, context: Any, state: WorkflowState) -> bool:  # type: ignore[override]
        """Protocol sizes and the neighbour ring (Flower's rules), then collect public keys."""
        state = cast(_RoundState, state)
        sampled = sorted(state.train_content)
        if len(sampled) < 2:
            log.error("SecAgg+ needs at least 2 clients, got %d", len(sampled))
            return False
        state.num_shares, state.threshold = protocol_sizes(self.num_shares, self.reconstruction_threshold, len(sampled))
        state.clipping_range, state.quantization_range = self.clipping_range, self.quantization_range
        state.mod_range, state.max_weight = self.modulus_range, self.max_weight
        order = list(sampled)
        random.shuffle(order)
        half = state.num_shares // 2
        state.nid_to_neighbours = {
            nid: {order[(i + offset) % len(order)] for offset in range(-half, half + 1)} for i, nid in enumerate(order)
        }
        state.sampled_node_ids = set(sampled)
        config = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(sampled),
            Key.SHARE_NUMBER: state.num_shares,
            Key.THRESHOLD: state.threshold,
            Key.CLIPPING_RANGE: float(self.clipping_range),
            Key.TARGET_RANGE: int(self.quantization_range),
            Key.MOD_RANGE: UNUSED_MOD_RANGE,
            Key.MAX_WEIGHT: float(self.max_weight),
        }
        replies = grid.send_and_receive(
            [self._message(nid, ConfigRecord(dict(config)), context) for nid in sampled], timeout=self.timeout
        )
        state.active_node_ids = set()
        for reply in replies:
            if reply.has_error():
                state.failures.append(Exception(short_reason(reply.error.reason)))
                continue
            keys = reply.content.config_records[RECORD_KEY_CONFIGS]
            nid = reply.metadata.src_node_id
            state.nid_to_publickeys[nid] = [cast(bytes, keys[Key.PUBLIC_KEY_1]), cast(bytes, keys[Key.PUBLIC_KEY_2])]
            state.active_node_ids.add(nid)
        return self._check_threshold(state)

    # -- stage 2 -------------------------------------------------------------------------
    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: WorkflowState) -> bool:  # type: ignore[override]
        """Send each client the strategy's train content plus its forwarded key shares; sum the
        masked vectors modulo 2^64."""
        state = cast(_RoundState, state)
        state.share_active = set(state.active_node_ids)
        messages = []
        for nid in sorted(state.active_node_ids):
            config = ConfigRecord(
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.CIPHERTEXT_LIST: state.forward_ciphertexts[nid],
                    Key.SOURCE_LIST: state.forward_srcs[nid],
                }
            )
            content = RecordDict({**dict(state.train_content[nid].items()), RECORD_KEY_CONFIGS: config})
            messages.append(
                Message(
                    content=content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(context.server_round)
                )
            )
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        state.forward_ciphertexts, state.forward_srcs = {}, {}
        state.active_node_ids = set()
        total: np.ndarray | None = None
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            if reply.has_error():
                state.failures.append(Exception(short_reason(reply.error.reason)))
                continue
            nid = reply.metadata.src_node_id
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            layout = check_layout(cast(Layout, state.server_layout), record, nid)
            if total is not None and layout != state.layout:
                raise ValueError(
                    f"node {nid} reported other entry kinds or training metrics than the other clients: {layout.metrics}"
                )
            state.layout = layout
            vector = np.frombuffer(cast(list, record[Key.MASKED_PARAMETERS])[0], dtype=np.uint64)
            if vector.size != layout.size:
                raise ValueError(
                    f"node {nid} sent a masked vector of {vector.size} values; the layout has {layout.size}"
                )
            total = vector.copy() if total is None else np.add(total, vector, out=total)
            state.active_node_ids.add(nid)
        state.total = total
        return self._check_threshold(state)

    # -- stage 3 -------------------------------------------------------------------------
    def unmask_stage(self, grid: Any, context: Any, state: WorkflowState) -> bool:  # type: ignore[override]
        """Collect shares of the active clients' mask seeds and of the dropped clients' sk1;
        remove every mask that was applied; decode the sum."""
        state = cast(_RoundState, state)
        active = set(state.active_node_ids)
        dropped = state.share_active - active  # dropped after sharing keys: their pairwise masks are in the sum
        messages = []
        for nid in sorted(active):
            neighbours = state.nid_to_neighbours[nid]
            config = ConfigRecord(
                {
                    Key.STAGE: Stage.UNMASK,
                    Key.ACTIVE_NODE_ID_LIST: sorted(neighbours & active),
                    Key.DEAD_NODE_ID_LIST: sorted(neighbours & dropped),
                }
            )
            messages.append(self._message(nid, config, context))
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        shares: dict[int, list[bytes]] = {nid: [] for nid in active | dropped}
        for reply in replies:
            if reply.has_error():
                state.failures.append(Exception(short_reason(reply.error.reason)))
                continue
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            for owner, share in zip(
                cast(list, record[Key.NODE_ID_LIST]), cast(list, record[Key.SHARE_LIST]), strict=True
            ):
                shares[int(owner)].append(cast(bytes, share))
        short = sorted(nid for nid, got in shares.items() if len(got) < state.threshold)
        if short:
            state.failures.append(Exception(f"fewer than {state.threshold} shares for node(s) {short[:5]}"))
            return False
        total = cast(np.ndarray, state.total)
        size = total.size
        for nid in sorted(active):
            np.subtract(total, mask_stream(combine_shares(shares[nid]), SELF_LABEL, size), out=total)
        for dead in sorted(dropped):
            sk1 = bytes_to_private_key(combine_shares(shares[dead]))
            for other in sorted((state.nid_to_neighbours[dead] & active) - {dead}):
                pair = generate_shared_key(sk1, bytes_to_public_key(state.nid_to_publickeys[other][0]))
                mask = mask_stream(pair, PAIR_LABEL, size)
                # `other` added the mask when other > dead and subtracted it otherwise
                if other > dead:
                    np.subtract(total, mask, out=total)
                else:
                    np.add(total, mask, out=total)
        state.result = decode_sum(cast(Layout, state.layout), total, self.codec, len(active))
        if dropped:
            log.info("round %d: SecAgg+ recovered %d dropped client(s)", context.server_round, len(dropped))
        return True

    def _message(self, nid: int, config: ConfigRecord, context: Any) -> Message:
        return Message(
            content=RecordDict({RECORD_KEY_CONFIGS: config}),
            dst_node_id=nid,
            message_type=MessageType.TRAIN,
            group_id=str(context.server_round),
        )


# --------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------
TrainFn = Callable[[Any, Message, Any], tuple[dict[str, Any], dict[str, float]]]


def _default_train(runtime: Any, msg: Message, context: Any) -> tuple[dict[str, Any], dict[str, float]]:
    return runtime.train(msg, context)


class SecAggPlusClient:
    """The client half: a pchmr client handler (``(msg, context, runtime) -> reply``) following
    Flower's ``secaggplus_mod`` stage by stage; ``train`` runs local training (pchmr's
    :func:`~pchmr.core.engine.federation.client.train_locally` by default) in the collect stage."""

    def __init__(self, train: TrainFn | None = None) -> None:
        self.train = train or _default_train

    def __call__(self, msg: Message, context: Any, runtime: Any) -> Message:
        records = context.state.config_records
        if RECORD_KEY_STATE not in records:
            records[RECORD_KEY_STATE] = ConfigRecord({})
        state = SecAggPlusState(**records[RECORD_KEY_STATE])
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        check_stage(state.current_stage, configs)
        state.current_stage = cast(str, configs.pop(Key.STAGE))
        check_configs(state.current_stage, configs)
        if state.current_stage == Stage.SETUP:
            state.nid = msg.metadata.dst_node_id
            result = _setup(state, configs)
        elif state.current_stage == Stage.SHARE_KEYS:
            result = _share_keys(state, configs)
        elif state.current_stage == Stage.COLLECT_MASKED_VECTORS:
            new_state, metrics = self.train(runtime, msg, context)
            global_state = msg.content["arrays"].to_torch_state_dict()
            weight, shared = client_weight(msg.content["config"], metrics)
            result = masked_update(state, configs, global_state, new_state, weight, shared)
        else:
            result = _unmask(state, configs)
        records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
        return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(result, False)}), reply_to=msg)


def _client_codec(state: SecAggPlusState) -> FixedPointCodec:
    """The encoding the server announced in the setup stage."""
    clip, levels = float(state.clipping_range), int(state.target_range)
    if not (clip > 0 and levels >= 2 and math.isfinite(state.max_weight) and state.max_weight >= 1):
        raise ValueError(
            f"SecAgg+ setup announced an unusable encoding: clipping {clip}, quantization {levels}, max weight {state.max_weight}"
        )
    from pchmr.plugins.privacy.secagg.codec import METRIC_SCALE

    return FixedPointCodec(
        float_scale=levels / (2.0 * clip),
        float_clip=clip,
        int_scale=1,
        metric_scale=METRIC_SCALE,
        max_weight=int(state.max_weight),
    )


def masked_update(
    state: SecAggPlusState,
    configs: ConfigRecord,
    global_state: Any,
    new_state: Any,
    weight: int,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """pchmr's collect stage on the client: store the neighbours' key shares (as Flower does),
    encode the update with ``weight`` (and ``metrics``), add the self mask and the pairwise
    masks (+ towards smaller node ids)."""
    ciphertexts = cast(list, configs[Key.CIPHERTEXT_LIST])
    sources = cast(list, configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < state.threshold:
        raise ValueError(
            f"node {state.nid}: {len(ciphertexts)} neighbours shared keys; the threshold needs {state.threshold - 1}"
        )
    for src, ciphertext in zip(sources, ciphertexts, strict=True):
        plain = decrypt(state.ss2_dict[src], ciphertext)
        actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(plain)
        if actual_src != src or dst != state.nid:
            raise ValueError(
                f"node {state.nid}: a key share labelled {src}->{state.nid} decrypts as {actual_src}->{dst}"
            )
        state.rd_seed_share_dict[src] = seed_share
        state.sk1_share_dict[src] = sk1_share
    layout, vector = encode_update(_client_codec(state), global_state, new_state, weight, metrics)
    np.add(vector, mask_stream(state.rd_seed, SELF_LABEL, vector.size), out=vector)
    sk1 = bytes_to_private_key(state.sk1)
    for src in sources:
        pair = generate_shared_key(sk1, bytes_to_public_key(state.public_keys_dict[src][0]))
        mask = mask_stream(pair, PAIR_LABEL, vector.size)
        if state.nid > src:
            np.add(vector, mask, out=vector)
        else:
            np.subtract(vector, mask, out=vector)
    return {Key.MASKED_PARAMETERS: [vector.tobytes()], **layout_to_config(layout)}
