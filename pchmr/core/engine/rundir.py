"""The run directory: what one ``pchmr run`` leaves behind, and how a killed run resumes.

::

    RUN/
      config.json        the resolved RunConfig plus the plugins' descriptions
      partition.json     client id -> training-sample ids (+ method, parameters, sha256)
      rounds.jsonl       one JSON object per evaluated round (round 0 = the untrained model)
      final.json         the last round's metrics, the mean-pose baselines and the protocol
      checkpoints/last.pt  global weights, the mechanisms' states and round, rewritten every round
                         (tensors, numbers and strings only: read with torch.load(weights_only=True))
      model.pt           the final global weights (a plain state dict)
      run.log            the log of the run (Flower's included)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pchmr.core.kit.safe_pickle import checkpoint_values, load_torch_file

__all__ = ["METRIC_KEYS", "RunDir"]

#: The metrics of every evaluated round (see :mod:`pchmr.core.kit.metrics`).
#: the loggers a run directory's run.log receives
_LOGGERS = ("pchmr", "flwr")

METRIC_KEYS = ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck")

_UNSAFE_CHECKPOINT_ADVICE = (
    "A checkpoint pchmr writes holds tensors, numbers and strings only, so this one was written by "
    "something else, or by a plugin that saved other objects in an older version: it cannot be "
    "resumed. Start the run again in a new --out directory; if you wrote the file yourself and "
    "trust it, convert its values to tensors, numbers and strings first."
)


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # -- paths ---------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def partition(self) -> Path:
        return self.path / "partition.json"

    @property
    def rounds(self) -> Path:
        return self.path / "rounds.jsonl"

    @property
    def final(self) -> Path:
        return self.path / "final.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def lightning_checkpoint(self) -> Path:
        """The baselines' Lightning checkpoint (weights, optimizer state, epoch)."""
        return self.path / "checkpoints" / "last.ckpt"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def log(self) -> Path:
        return self.path / "run.log"

    def create(self) -> RunDir:
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        return self

    # -- writing -------------------------------------------------------------------------
    def write_json(self, path: Path, data: Mapping[str, Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
        tmp.replace(path)

    def read_json(self, path: Path) -> dict[str, Any]:
        return json.loads(path.read_text())

    def summarize(self, extra: Mapping[str, Any], protocol: Mapping[str, Any]) -> dict[str, Any]:
        """final.json: the last evaluated round, round 0, ``extra`` (e.g. the mean-pose baselines)
        and the protocol; written to disk and returned."""
        rounds = self.read_rounds()
        last = rounds[-1]
        final = {
            "round": last["round"],
            "unit": last.get("unit", "round"),
            **{k: last[k] for k in METRIC_KEYS},
            "round0": {k: rounds[0][k] for k in METRIC_KEYS},
            **dict(extra),
            "wall_seconds": last["wall_seconds"],
            "bytes_sent": last["bytes_sent"],
            "bytes_received": last["bytes_received"],
            "protocol": dict(protocol),
            "pck_threshold_mm": 150,
        }
        self.write_json(self.final, final)
        return final

    def append_round(self, record: Mapping[str, Any]) -> None:
        with self.rounds.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_rounds(self) -> list[dict[str, Any]]:
        if not self.rounds.exists():
            return []
        out = []
        for line in self.rounds.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: everything after it is dropped
                break
        return out

    def truncate_rounds(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only records up to ``last_round`` (used when resuming)."""
        kept = [r for r in self.read_rounds() if int(r["round"]) <= last_round]
        tmp = self.rounds.with_name("rounds.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(self.rounds)
        return kept

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Write ``checkpoints/last.pt`` (atomically) in types ``torch.load(weights_only=True)``
        reads back (:func:`~pchmr.core.kit.safe_pickle.checkpoint_values`: NumPy arrays become
        tensors, NumPy scalars numbers; any other object is refused by its key, before writing)."""
        values = checkpoint_values(dict(state))
        tmp = self.checkpoint.with_name("last.pt.tmp")
        torch.save(values, tmp)
        tmp.replace(self.checkpoint)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """``checkpoints/last.pt`` (None if absent), loaded with ``weights_only=True``: a file
        that asks to run code raises :class:`~pchmr.core.kit.safe_pickle.UnsafeFileError`."""
        if not self.checkpoint.exists():
            return None
        return load_torch_file(self.checkpoint, what="pchmr checkpoint", advice=_UNSAFE_CHECKPOINT_ADVICE)

    def check_resumable(self) -> None:
        """Load the checkpoints a resume reads (``last.pt``, the baselines' ``last.ckpt``) the
        safe way, so that a refused file stops ``--resume`` before any data or engine starts."""
        self.load_checkpoint()
        if self.lightning_checkpoint.exists():
            load_torch_file(self.lightning_checkpoint, what="Lightning checkpoint", advice=_UNSAFE_CHECKPOINT_ADVICE)

    def read_config(self) -> dict[str, Any]:
        if not self.config.exists():
            raise FileNotFoundError(f"{self.path} is not a pchmr run directory: {self.config.name} is missing")
        return json.loads(self.config.read_text())

    def attach_log(self) -> logging.Handler:
        handler = logging.FileHandler(self.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        for name in _LOGGERS:
            logging.getLogger(name).addHandler(handler)
        logging.getLogger("pchmr").setLevel(logging.INFO)
        return handler


def detach_log(handler: logging.Handler) -> None:
    """Undo :meth:`RunDir.attach_log`: remove ``handler`` from pchmr's and Flower's loggers, close it."""
    for name in _LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
