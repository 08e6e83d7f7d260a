"""Experiment tracking (``--logger csv|tensorboard|mlflow``): each evaluated round through Lightning's loggers.

The run directory's ``rounds.jsonl`` stays the record of a run; a tracker shows the same records in
the tools people watch runs with. Whatever writes a record (the federated server, a baseline)
hands it to :meth:`Tracker.log_round` once it is safe on disk, and :func:`round_scalars` turns it
into scalars at ``step`` = its round (a baseline's epoch)::

    test/mpjpe_mm, test/pa_mpjpe_mm, test/mpvpe_mm, test/pck   the global model's evaluation
    train/loss, train/img_s, ...                              the clients' aggregated training metrics
    client/<partition id>/loss, client/<partition id>/img_s   each sampled client's, when released
    privacy/epsilon, privacy/delta                            the privacy budget spent so far (dp)
    round/wall_seconds, round/bytes_sent, round/lr, ...       the rest of the record, by its key

The run's config goes in once as hyperparameters (:func:`hyperparameters`: flat, ``/`` between a
table and its keys). Where each logger writes::

    RUN/logs/csv/metrics.csv, hparams.yaml         CSVLogger
    RUN/logs/tensorboard/events.out.tfevents.*     TensorBoardLogger (and hparams.yaml)
    RUN/logs/mlflow/                               MLFlowLogger's file store, unless $MLFLOW_TRACKING_URI
    RUN/logs/mlflow.json                           the MLflow run's tracking URI and id (a resume continues it)

Only the process that runs the server (or the baseline) logs; clients never open a logger. A
resumed run continues the same logs: when a logger opens, every record of ``rounds.jsonl`` whose
round it does not hold yet is logged (so a kill between a record and its flush loses nothing), and
a round it holds is never logged twice. A round is logged once its checkpoint is written, so a
logged round is never trained again. The CSV file is rewritten from ``rounds.jsonl`` when it opens
(Lightning's CSV writer starts its file anew).

A logger that fails while logging (a tracking server gone, a full disk) is named in ``run.log`` and
dropped; the run goes on, and ``rounds.jsonl`` keeps every value.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pchmr.core.engine.config import LOGGERS, ConfigError, RunConfig
from pchmr.core.engine.federation.common import EngineStopped
from pchmr.core.engine.rundir import METRIC_KEYS, RunDir

if TYPE_CHECKING:
    from pytorch_lightning.loggers import Logger

__all__ = [
    "CLIENT_KEYS",
    "EXTRAS",
    "MLFLOW_EXPERIMENT",
    "PRIVACY_KEYS",
    "Tracker",
    "check_loggers",
    "hyperparameters",
    "open_tracker",
    "round_scalars",
]

log = logging.getLogger("pchmr.tracking")

#: logger → (the module it needs, the pchmr extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}

#: rounds.jsonl keys holding one number per client (partition id → value), and their scalar names
CLIENT_KEYS = {"client_loss": "loss", "client_img_s": "img_s"}

#: rounds.jsonl keys of the privacy budget a mechanism reports (``Mechanism.round_metrics``, e.g. dp's)
PRIVACY_KEYS = ("epsilon", "delta")

#: rounds.jsonl keys that are no scalar of their own (the step; the unit; who was sampled)
_SKIPPED = ("round", "unit", "clients")

#: the scalar every logged round has: a logger holding it at a step holds that round
_MARKER = "test/" + METRIC_KEYS[0]

#: the MLflow experiment a run goes in (``$MLFLOW_EXPERIMENT_NAME`` when set)
MLFLOW_EXPERIMENT = "pchmr"


def check_loggers(names: Iterable[str]) -> None:
    """A :class:`ConfigError` naming the extra to install for a logger whose package is missing
    (``pip install 'pchmr[tensorboard]'``), before any data is prepared."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--logger must be one of {', '.join(LOGGERS)}, got '{name}'")
        module, extra = EXTRAS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--logger {name} needs the {module} package, which is not installed: pip install 'pchmr[{extra}]'"
            )


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one ``rounds.jsonl`` record, by name (see the module's docstring); values
    that are no number (None, text) are left out, a list of failures becomes its length."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _SKIPPED:
            continue
        if key == "failures" and isinstance(value, list):
            out["round/failures"] = float(len(value))
        elif key in CLIENT_KEYS and isinstance(value, Mapping):
            for partition, number in value.items():
                _put(out, f"client/{partition}/{CLIENT_KEYS[key]}", number)
        elif isinstance(value, Mapping):  # a mechanism's table of numbers (e.g. FedGH's layers)
            for name, number in value.items():
                _put(out, f"{_name(key)}/{name}", number)
        else:
            _put(out, _name(key), value)
    return out


def _name(key: str) -> str:
    if key in METRIC_KEYS:
        return f"test/{key}"
    if key in PRIVACY_KEYS:
        return f"privacy/{key}"
    if key.startswith("train_"):
        return f"train/{key[len('train_') :]}"
    return f"round/{key}"


def _put(out: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, (int, float)):  # bool included: a flag as 0/1
        out[name] = float(value)


def hyperparameters(config: RunConfig) -> dict[str, Any]:
    """The run's config as flat hyperparameters: a table's keys as ``table/key``, a list as its
    comma-separated values, None as ``"None"``."""
    out: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, Mapping):
            for sub, item in value.items():
                out[f"{key}/{sub}"] = _hyperparameter(item)
        else:
            out[key] = _hyperparameter(value)
    return out


def _hyperparameter(value: Any) -> Any:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --------------------------------------------------------------------------------------
# the loggers
# --------------------------------------------------------------------------------------
class _Sink:
    """One Lightning logger and the steps it already holds."""

    kind = ""

    def __init__(self, logger: Logger, logged: set[int]) -> None:
        self.logger = logger
        self.logged = logged

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.logger.log_metrics(dict(scalars), step=step)
        self.logged.add(step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.logger.log_hyperparams(dict(params))

    def flush(self) -> None:
        self.logger.save()

    def close(self, status: str) -> None:
        self.logger.finalize(status)


class _CsvSink(_Sink):
    kind = "csv"

    @classmethod
    def open(cls, logs: Path) -> _CsvSink:
        from pytorch_lightning.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(logs), name="csv", version="")
        with warnings.catch_warnings():  # it starts metrics.csv anew, and says so: the tracker rewrites it
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            _ = logger.experiment
        return cls(logger, set())

    def close(self, status: str) -> None:
        self.logger.finalize(status)
        self.logger.save()  # hparams.yaml and any rows not written yet, whatever the status


class _TensorBoardSink(_Sink):
    kind = "tensorboard"

    @classmethod
    def open(cls, logs: Path) -> _TensorBoardSink:
        from pytorch_lightning.loggers import TensorBoardLogger

        directory = logs / "tensorboard"
        logged = _tensorboard_steps(directory) if directory.is_dir() else set()
        # flush_secs: the tracker flushes after every round itself
        logger = TensorBoardLogger(save_dir=str(logs), name="tensorboard", version="", default_hp_metric=False)
        return cls(logger, logged)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """The config into hparams.yaml and into TensorBoard's HParams plugin (its session start),
        with the evaluation metrics as the session's metrics."""
        from torch.utils.tensorboard.summary import hparams

        self.logger.log_hyperparams(dict(params))  # hparams.yaml, on save
        experiment, start, end = hparams(dict(params), {f"test/{key}": 0.0 for key in METRIC_KEYS})
        writer = self.logger.experiment._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary)

    def flush(self) -> None:
        self.logger.experiment.flush()


def _tensorboard_steps(directory: Path) -> set[int]:
    """The steps at which the event files in ``directory`` hold :data:`_MARKER`, read with
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    if _MARKER not in accumulator.Tags().get("scalars", []):
        return set()
    return {int(event.step) for event in accumulator.Scalars(_MARKER)}


class _MlflowSink(_Sink):
    kind = "mlflow"

    def __init__(self, logger: Logger, logged: set[int], fresh: bool) -> None:
        super().__init__(logger, logged)
        self.fresh = fresh

    @classmethod
    def open(cls, rd: RunDir, logs: Path) -> _MlflowSink:
        from pytorch_lightning.loggers import MLFlowLogger

        state_file = logs / "mlflow.json"
        saved = rd.read_json(state_file) if state_file.is_file() else {}
        uri = saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or (logs / "mlflow").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 asks for this opt-in before it uses a file store (its "maintenance mode" backend)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logging.getLogger("pytorch_lightning.loggers.mlflow").setLevel(logging.ERROR)  # "creating experiment"
        logger = MLFlowLogger(
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT,
            run_name=rd.path.resolve().name,
            tracking_uri=uri,
            tags={"pchmr.run_dir": str(rd.path.resolve())},
            run_id=saved.get("run_id"),
        )
        run_id = logger.run_id  # creates the experiment and the run when new
        client = logger.experiment
        if saved:
            client.update_run(run_id, status="RUNNING")  # a resumed run runs again
            logged = {int(metric.step) for metric in client.get_metric_history(run_id, _MARKER)}
        else:
            rd.write_json(state_file, {"tracking_uri": uri, "experiment_id": logger.experiment_id, "run_id": run_id})
            logged = set()
        return cls(logger, logged, fresh=not saved)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        if self.fresh:  # MLflow's parameters are set once per run
            super().log_hyperparams(params)

    def flush(self) -> None:  # each log_batch is written when it returns
        pass


_STATUS = {"success": "success", "failed": "failed", "interrupted": "KILLED"}


class Tracker:
    """The run's loggers (none: every call does nothing). Use as a context manager: leaving it
    finalizes each logger, ``success``, ``failed`` or (Ctrl-C, a stopped engine) ``interrupted``."""

    def __init__(self, sinks: Iterable[_Sink] = ()) -> None:
        self.sinks = list(sinks)

    @property
    def kinds(self) -> list[str]:
        return [sink.kind for sink in self.sinks]

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log ``record`` (a ``rounds.jsonl`` record) at step ``record["round"]`` on every logger
        that does not hold that step yet; a logger that fails is named in the log and dropped."""
        if not self.sinks:
            return
        step = int(record["round"])
        scalars = round_scalars(record)
        for sink in list(self.sinks):
            if step in sink.logged:
                continue
            try:
                sink.log(step, scalars)
                sink.flush()
            except Exception as exc:
                self._drop(sink, f"logging round {step}", exc)

    def log_rounds(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.log_round(record)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        for sink in list(self.sinks):
            if sink.logged:  # a resumed log has them
                continue
            try:
                sink.log_hyperparams(params)
                sink.flush()
            except Exception as exc:
                self._drop(sink, "logging the hyperparameters", exc)

    def close(self, status: str = "success") -> None:
        """Finalize every logger with ``status`` (``success``, ``failed``, ``interrupted``)."""
        for sink in self.sinks:
            try:
                sink.close(_STATUS.get(status, status))
            except Exception as exc:
                log.warning("the %s logger failed to close (%s: %s)", sink.kind, type(exc).__name__, exc)
        self.sinks = []

    def _drop(self, sink: _Sink, doing: str, exc: Exception) -> None:
        log.error(
            "the %s logger failed %s and is dropped for the rest of the run (rounds.jsonl keeps every value): %s: %s",
            sink.kind,
            doing,
            type(exc).__name__,
            exc,
        )
        self.sinks.remove(sink)
        try:
            sink.close("failed")
        except Exception:
            log.debug("closing the failed %s logger", sink.kind, exc_info=True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.close("success")
        elif issubclass(kind, (KeyboardInterrupt, SystemExit, EngineStopped)):  # Lightning exits on Ctrl-C
            self.close("interrupted")
        else:
            self.close("failed")


def open_tracker(config: RunConfig, rd: RunDir) -> Tracker:
    """The loggers ``config.loggers`` names, writing under ``RUN/logs``, each brought up to date
    with ``rounds.jsonl`` as it stands (call it after a resume has cut the records to its
    checkpoint), and the config logged as hyperparameters where a log is new."""
    if not config.loggers:
        return Tracker()
    check_loggers(config.loggers)
    logs = rd.path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sinks: list[_Sink] = []
    try:
        for kind in config.loggers:
            if kind == "csv":
                sinks.append(_CsvSink.open(logs))
            elif kind == "tensorboard":
                sinks.append(_TensorBoardSink.open(logs))
            else:
                sinks.append(_MlflowSink.open(rd, logs))
    except BaseException:
        Tracker(sinks).close("failed")
        raise
    tracker = Tracker(sinks)
    tracker.log_hyperparams(hyperparameters(config))
    tracker.log_rounds(rd.read_rounds())
    names = ", ".join(tracker.kinds)
    log.info("tracking with %s under %s", names, logs)
    return tracker
