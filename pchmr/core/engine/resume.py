"""What ``pchmr run --resume`` checks before it changes anything in a run directory.

A resume truncates ``rounds.jsonl`` to the checkpoint's round and rewrites ``final.json``: done
on a history it misread, that would destroy results. So before the run log is opened or any file
is touched, :func:`check_resumable` reads the whole history and refuses (a
:class:`~pchmr.core.engine.rundir.HistoryError`, exit 2) when

* a ``rounds.jsonl`` line is not one JSON object with an integer ``round`` in increasing order
  (:meth:`~pchmr.core.engine.rundir.RunDir.read_rounds`; a cut-off last line says to delete it);
* ``partition.json`` is not the partition the saved config makes: its hash, method, client count,
  seed or an option the config gives differs;
* the checkpoint's round does not fit the config (beyond its rounds or epochs), or the history
  does not fit the checkpoint: an evaluated round at or before it is missing, or records go
  more than one round past it (a resume would drop them).

Once the model is built, :func:`check_checkpoint_state` refuses a federated checkpoint whose
state keys or shapes are not the model's (another backbone, variant or body model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from pchmr.core.contracts.partition import PartitionError, load_partition
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.rundir import HistoryError, RunDir

__all__ = ["check_checkpoint_state", "check_partition", "check_resumable", "completed_round"]

_UNCHANGED = "nothing was changed"


def check_resumable(rd: RunDir, config: RunConfig) -> None:
    """Refuse to resume ``rd`` with ``config`` (its saved config) when its history is unreadable
    or does not belong to the config (see the module docstring)."""
    records = rd.read_rounds()
    if rd.partition.exists():
        check_partition(rd, config)
    done = completed_round(rd, config)
    total = config.rounds if config.mode == "federated" else config.epochs
    unit = "round" if config.mode == "federated" else "epoch"
    source = rd.checkpoint if config.mode == "federated" else rd.path / "checkpoints" / "progress.json"
    if done is not None and not 1 <= done <= total:
        raise HistoryError(
            f"{source} holds {unit} {done}, but the config runs {total} {unit}s (--{unit}s {total}): the checkpoint "
            f"is not this run's; {_UNCHANGED}"
        )
    last_done = -1 if done is None else done
    beyond = [int(r["round"]) for r in records if int(r["round"]) > last_done + 1]
    if beyond:
        weights = rd.checkpoint if config.mode == "federated" else rd.lightning_checkpoint
        held = f"{unit} {done} in {source}" if done is not None else f"no checkpoint ({weights} is missing)"
        raise HistoryError(
            f"{rd.rounds} has records up to {unit} {beyond[-1]}, but the run directory holds {held}: resuming would "
            f"drop {len(beyond)} record(s) the checkpoint cannot reproduce; {_UNCHANGED}"
        )
    if done is not None:
        have = {int(r["round"]) for r in records}
        expected = [0, *(r for r in range(1, done + 1) if r % config.eval_every == 0 or r == total)]
        missing = [r for r in expected if r not in have]
        if missing:
            raise HistoryError(
                f"{rd.rounds} lacks the record of {unit} {missing[0]}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, evaluated before the checkpoint "
                f"of {unit} {done}: the history is incomplete, so final.json could not be trusted; {_UNCHANGED}"
            )


def completed_round(rd: RunDir, config: RunConfig) -> int | None:
    """The round (baselines: epoch) the run directory's checkpoint completed, None without one;
    a :class:`HistoryError` for a checkpoint that cannot be read."""
    if config.mode == "federated":
        if not rd.checkpoint.exists():
            return None
        try:
            checkpoint = rd.load_checkpoint()
        except Exception as exc:  # a torn or foreign file: torch raises many kinds of error
            raise HistoryError(f"{rd.checkpoint} cannot be read ({exc}); {_UNCHANGED}") from None
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state"), Mapping):
            raise HistoryError(f"{rd.checkpoint} holds no 'state' of weights: not a pchmr checkpoint; {_UNCHANGED}")
        return _whole(checkpoint.get("round"), rd.checkpoint, "round")
    if not rd.lightning_checkpoint.exists():
        return None
    progress = rd.path / "checkpoints" / "progress.json"
    if not progress.exists():
        raise HistoryError(
            f"{rd.lightning_checkpoint} has no {progress.name} beside it: the epoch it completed is unknown; {_UNCHANGED}"
        )
    try:
        data = json.loads(progress.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HistoryError(f"{progress} is not valid JSON ({exc}); {_UNCHANGED}") from None
    return _whole(data.get("epoch") if isinstance(data, dict) else None, progress, "epoch")


def _whole(value: Any, path: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HistoryError(f"{path} has '{key}': {value!r}, expected a whole number; {_UNCHANGED}")
    return value


def check_partition(rd: RunDir, config: RunConfig) -> None:
    """``partition.json`` is intact (its sha256) and was made by ``config``: the partitioner (a
    baseline's mode), the client count, the seed and every numeric, boolean or ``label`` option
    the config gives that the file records."""
    try:
        partition = load_partition(rd.partition)
    except (PartitionError, KeyError, TypeError, ValueError) as exc:
        raise HistoryError(f"{exc}; {_UNCHANGED}" if isinstance(exc, PartitionError)
                           else f"{rd.partition} cannot be read ({exc}); {_UNCHANGED}") from None  # fmt: skip
    params = dict(partition.params)
    if config.mode == "federated":
        expected: dict[str, tuple[str, Any, Any]] = {
            "method": ("--partitioner", config.partitioner, partition.method),
            "clients": ("--clients", config.clients, partition.num_clients),
        }
        if "seed" in params:
            expected["seed"] = ("--seed", config.seed, params["seed"])
        recorded = {str(k).replace("-", "_"): v for k, v in params.items()}
        for key, value in dict(config.partition_options).items():
            name = str(key).replace("-", "_")
            if name in recorded and _comparable(value) and _differs(value, recorded[name]):
                expected[name] = (f"--partition-option {key}", value, recorded[name])
    else:
        expected = {
            "method": ("--mode", config.mode, partition.method),
            "clients": ("clients of a baseline", 1, partition.num_clients),
        }
        if config.mode == "naive":
            expected["fraction"] = ("--fraction", config.fraction, params.get("fraction"))
            expected["seed"] = ("--seed", config.seed, params.get("seed"))
    wrong = [f"{flag} {want!r} in config.json but {got!r} in partition.json" for flag, want, got in expected.values()
             if _differs(want, got)]  # fmt: skip
    if wrong:
        raise HistoryError(
            f"{rd.partition} was not made by {rd.config} ({'; '.join(wrong)}): the run directory's files do not "
            f"belong together, so resuming would train another partition than the rounds so far; {_UNCHANGED}"
        )


def _comparable(value: Any) -> bool:
    return isinstance(value, (bool, int, float)) or (isinstance(value, str) and "/" not in value)


def _differs(want: Any, got: Any) -> bool:
    if isinstance(want, (int, float)) and isinstance(got, (int, float)) and not isinstance(want, bool):
        return float(want) != float(got)
    return want != got


def check_checkpoint_state(rd: RunDir, model_state: Mapping[str, torch.Tensor]) -> None:
    """A federated checkpoint's ``state`` has exactly ``model_state``'s keys and shapes (the model
    the saved config builds); a :class:`HistoryError` naming the first differences otherwise."""
    if not rd.checkpoint.exists():
        return
    checkpoint = rd.load_checkpoint()
    state = checkpoint["state"] if checkpoint is not None else {}
    missing = [k for k in model_state if k not in state]
    extra = [k for k in state if k not in model_state]
    shapes = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's entries missing (first: {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} entries the model does not have (first: {', '.join(extra[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} of other shapes (first: {'; '.join(shapes[:3])})")
    if problems:
        raise HistoryError(
            f"{rd.checkpoint} does not fit the model {rd.config} builds: {'; '.join(problems)}; the checkpoint is "
            "not this run's; nothing but run.log was changed"
        )
