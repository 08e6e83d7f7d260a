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

Every file is written atomically (:mod:`pchmr.core.kit.atomic`: a temporary file, fsync, rename):
a kill or a full disk leaves the previous version whole, and a ``rounds.jsonl`` record is either
all there or not at all. :meth:`RunDir.read_rounds` therefore refuses any line it cannot read
(:class:`HistoryError`, naming the file, the line and what was expected) instead of dropping it
and what follows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.kit.atomic import append_line_atomic, torch_save_atomic, write_text_atomic
from pchmr.core.kit.safe_pickle import checkpoint_values, load_torch_file

__all__ = ["METRIC_KEYS", "HistoryError", "RunDir"]

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

#: what to do about a checkpoint torch cannot read at all (empty, truncated, not from torch.save)
_DAMAGED_CHECKPOINT_ADVICE = (
    "pchmr writes its checkpoints atomically, so this one was changed after it was written (a disk error, a "
    "copy cut short, another program): it cannot be resumed. Restore it from a copy, or start the run again "
    "in a new --out directory."
)


class HistoryError(ValueError):
    """A run directory's history cannot be read or does not fit the run: a malformed
    ``rounds.jsonl`` line, a ``partition.json`` or checkpoint that is not the config's. Nothing
    was changed on disk."""


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

    @property
    def resume_hint(self) -> str:
        """What a failed write's message ends with: how to continue the run."""
        return f"free space and resume with pchmr run --resume {self.path}"

    # -- writing (every write atomic: pchmr.core.kit.atomic) ------------------------------
    def write_json(self, path: Path, data: Mapping[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
        write_text_atomic(path, text, hint=self.resume_hint)

    def write_text(self, path: Path, text: str) -> None:
        write_text_atomic(path, text, hint=self.resume_hint)

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
        line = json.dumps(record, sort_keys=True, default=_json_default)
        append_line_atomic(self.rounds, line, hint=self.resume_hint)

    def read_rounds(self) -> list[dict[str, Any]]:
        """Every record of ``rounds.jsonl`` (none when it is missing); a :class:`HistoryError`
        naming the line for anything that is not one JSON object per line with an integer
        ``round`` greater than the line before's. Blank lines are skipped."""
        if not self.rounds.exists():
            return []
        return parse_rounds(self.rounds.read_bytes(), self.rounds)

    def truncate_rounds(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only records up to ``last_round`` (used when resuming)."""
        kept = [r for r in self.read_rounds() if int(r["round"]) <= last_round]
        self.write_text(self.rounds, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        return kept

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Write ``checkpoints/last.pt`` atomically in types ``torch.load(weights_only=True)``
        reads back (:func:`~pchmr.core.kit.safe_pickle.checkpoint_values`: NumPy arrays become
        tensors, NumPy scalars numbers; any other object is refused by its key, before writing)."""
        torch_save_atomic(checkpoint_values(dict(state)), self.checkpoint, hint=self.resume_hint)

    def save_model(self, state: Mapping[str, torch.Tensor]) -> None:
        """``model.pt``: the final global weights (a plain state dict)."""
        torch_save_atomic(dict(state), self.model, hint=self.resume_hint)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """``checkpoints/last.pt`` (None if absent), loaded with ``weights_only=True``: a file
        that asks to run code raises :class:`~pchmr.core.kit.safe_pickle.UnsafeFileError`."""
        if not self.checkpoint.exists():
            return None
        return load_torch_file(
            self.checkpoint,
            what="pchmr checkpoint",
            advice=_UNSAFE_CHECKPOINT_ADVICE,
            damaged=_DAMAGED_CHECKPOINT_ADVICE,
        )

    def check_resumable(self) -> None:
        """Load the checkpoints a resume reads (``last.pt``, the baselines' ``last.ckpt``) the
        safe way, so that a refused file stops ``--resume`` before any data or engine starts."""
        self.load_checkpoint()
        if self.lightning_checkpoint.exists():
            load_torch_file(
                self.lightning_checkpoint,
                what="Lightning checkpoint",
                advice=_UNSAFE_CHECKPOINT_ADVICE,
                damaged=_DAMAGED_CHECKPOINT_ADVICE,
            )

    def read_config(self) -> dict[str, Any]:
        """``config.json``, checked to be the file pchmr writes (a JSON object with a ``run`` table)."""
        if self.path.exists() and not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is a file, not a run directory (expected a pchmr run's --out)")
        if not self.config.exists():
            raise FileNotFoundError(f"{self.path} is not a pchmr run directory: {self.config.name} is missing")
        try:
            data = json.loads(self.config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HistoryError(f"{self.config} is not valid JSON ({exc}); it is not a config pchmr wrote") from None
        if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
            raise HistoryError(f"{self.config} has no 'run' table of options; it is not a config pchmr wrote")
        return data

    def run_config(self, **overrides: Any) -> RunConfig:
        """The :class:`RunConfig` ``config.json`` saved (:meth:`RunConfig.from_saved`), with
        ``overrides`` of its options (e.g. ``init_from=None`` where ``model.pt`` holds every
        weight); a :class:`~pchmr.core.engine.config.ConfigError` naming the file when it holds a
        value pchmr cannot run with (the file was edited or not written by pchmr)."""
        data = self.read_config()
        run = data["run"]
        if overrides and isinstance(run, dict):
            run = {**run, **overrides}
        try:
            return RunConfig.from_saved(run)
        except ConfigError as exc:
            raise ConfigError(f"{self.config} holds a run config pchmr cannot read: {exc}") from None

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


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
_CUT_OFF_FIX = "delete that line (the records before it are kept) and resume again"


def parse_rounds(raw: bytes, path: Path) -> list[dict[str, Any]]:
    """The records of a ``rounds.jsonl`` whose bytes are ``raw`` (see :meth:`RunDir.read_rounds`)."""
    lines = raw.split(b"\n")
    cut_off = bool(lines) and lines[-1].strip() != b""  # the file does not end with a newline
    out: list[dict[str, Any]] = []
    previous: tuple[int, int] | None = None  # (round, line number)
    for number, raw_line in enumerate(lines, start=1):
        if not raw_line.strip():
            continue
        where = f"{path} line {number}"
        last = number == len(lines)
        try:
            record = json.loads(raw_line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if last and cut_off:
                raise HistoryError(
                    f"{where} is cut off (the file ends in the middle of a record, as after a crash while it "
                    f"was written): expected one whole JSON object per line; {_CUT_OFF_FIX}"
                ) from None
            what = (
                f"not JSON ({exc.msg} at column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            )
            raise HistoryError(
                f"{where} is {what}, expected one JSON object per line with an integer 'round'; nothing was changed"
            ) from None
        if not isinstance(record, dict):
            raise HistoryError(
                f"{where} is a JSON {_JSON_TYPES.get(type(record), 'value')}, expected a JSON object with an integer 'round'; "
                "nothing was changed"
            )
        value = record.get("round")
        if "round" not in record or isinstance(value, bool) or not isinstance(value, int) or value < 0:
            got = "has no 'round'" if "round" not in record else f"has 'round': {json.dumps(value)}"
            raise HistoryError(f"{where} {got}, expected an integer 'round' >= 0; nothing was changed")
        if previous is not None and value <= previous[0]:
            kind = "repeats" if value == previous[0] else "goes back to"
            raise HistoryError(
                f"{where} {kind} round {value} after round {previous[0]} on line {previous[1]}, expected rounds in "
                "increasing order; nothing was changed"
            )
        previous = (value, number)
        out.append(record)
    return out


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
