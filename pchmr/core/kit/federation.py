"""Helpers for code that speaks Flower: strategies that train every offered node, reply checking
and ordering, the client's own reason out of a Flower error, message sizes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from pchmr.core.contracts.strategy import STAGE_KEY

__all__ = [
    "failure_message",
    "flower_sampling_kwargs",
    "message_stage",
    "ordered_replies",
    "short_reason",
    "state_nbytes",
    "wait_for_nodes",
]


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def message_stage(msg: Any) -> str | None:
    """The ``pchmr-stage`` value of the first ConfigRecord of ``msg`` that has one, else None."""
    for record in msg.content.config_records.values():
        if STAGE_KEY in record:
            return str(record[STAGE_KEY])
    return None


def failure_message(
    server_round: int,
    failed: Sequence[Any],
    total: int,
    stage: str = "train",
    partition_of: Callable[[int], int] | None = None,
) -> str:
    """``round r: f of n clients failed (stage): partition …: reason; …`` for replies with errors
    (``node …`` without ``partition_of``, a node id → partition id map such as a round view's
    ``partition_id``)."""

    def who(reply: Any) -> str:
        node = reply.metadata.src_node_id
        if partition_of is not None:
            try:
                return f"partition {partition_of(node)}"
            except KeyError:
                pass
        return f"node {node}"

    reasons = "; ".join(f"{who(r)}: {short_reason(r.error.reason)}" for r in failed[:3])
    return f"round {server_round}: {len(failed)} of {total} clients failed ({stage}): {reasons}"


def ordered_replies(
    replies: Iterable[Any], grid: Any, server_round: int, stage: str = "train", allow_failures: bool = False
) -> list[Any]:
    """The successful replies sorted by their node's partition id (reproducible sums).

    ``grid`` is the round's view (it maps nodes to partitions). A reply with an error raises
    RuntimeError naming the round, stage, partitions and reasons, unless ``allow_failures``
    (protocols that tolerate dropouts then see only the successful replies).
    """
    replies = list(replies)
    failed = [r for r in replies if r.has_error()]
    if failed and not allow_failures:
        raise RuntimeError(
            failure_message(server_round, failed, len(replies), stage, getattr(grid, "partition_id", None))
        )
    ok = [r for r in replies if not r.has_error()]
    return sorted(ok, key=lambda r: grid.partition_id(r.metadata.src_node_id))


def flower_sampling_kwargs() -> dict[str, Any]:
    """Keyword arguments that make a Flower strategy train every node it is offered."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 1,
    }


def short_reason(reason: str) -> str:
    """The client's own exception message out of a Flower error reason, which on the Simulation
    Engine wraps it in Ray's tracebacks (``… ClientAppException … Message: <message>'>``)."""
    marker = "Message: "
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1].strip().removesuffix("'>")
    return reason.strip()


def wait_for_nodes(grid: Any, expected: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The grid's node ids once ``expected`` nodes are connected, or whatever is connected when
    ``timeout`` seconds have passed (the caller names what is missing). The Simulation Engine
    registers its nodes while the ServerApp already runs (about a quarter of 10,000 were there at
    the first look), and SuperNodes connect when they are ready."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(poll)
        node_ids = list(grid.get_node_ids())
    return node_ids
