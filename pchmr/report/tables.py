"""Result tables of several run directories, grouped the way the PCHMR paper groups them.

* :func:`load_run` reads one run directory (``config.json``, ``rounds.jsonl``, ``final.json``;
  see :mod:`pchmr.core.engine.rundir`) into a :class:`RunSummary`.
* :func:`setting_label` names a run's setting: ``"Centralized"``, ``"Naive 5 %"``,
  ``"FedAvg 10/10 IID"``, ``"FedProx μ=0.01 100/10 LDA α=0.5"``.
* :func:`build_report` groups runs into :class:`ResultTable` s: one table per evaluation protocol
  (numbers of different protocols never share a column), rows chosen by ``group_by``
  (:data:`GROUP_BY`), one column per model (backbone + variant). A cell holds
  "MPJPE / PA-MPJPE / MPVPE" in mm with one decimal; runs sharing a cell (seeds) give
  mean ± sample std and their count n.
* Renderers, each a pure function of a :class:`Report`: :func:`to_rich`, :func:`to_markdown`,
  :func:`to_csv`, :func:`to_latex` (booktabs).

Every model column comes twice (:data:`VIEWS`): the **final** evaluated round of each run
(``final.json``), and its **best round** — the evaluated round (epoch) after training began with
the lowest MPJPE, the PCHMR paper's choice for Table 1 (each run's best evaluation); the
three metrics of that column all come from that round, which the cell names. A run without
``final.json`` (killed, or still running) is refused unless ``include_unfinished`` is set; it then
contributes its last evaluated round (and its best so far) and its cell is marked with
:data:`UNFINISHED_MARK`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.rundir import HistoryError, parse_rounds

__all__ = [
    "GROUP_BY",
    "TABLE_METRICS",
    "UNFINISHED_MARK",
    "VIEWS",
    "Cell",
    "Report",
    "ReportError",
    "ResultTable",
    "RunSummary",
    "Stat",
    "build_report",
    "config_differences",
    "find_runs",
    "footnotes",
    "load_run",
    "model_label",
    "protocol_label",
    "repetition_groups",
    "repetition_key",
    "run_names",
    "setting_label",
    "to_csv",
    "to_json",
    "to_latex",
    "to_markdown",
    "to_rich",
]

#: The metrics of a table cell, in order ("MPJPE / PA-MPJPE / MPVPE", mm).
TABLE_METRICS = ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm")
METRIC_TITLES = {"mpjpe_mm": "MPJPE", "pa_mpjpe_mm": "PA-MPJPE", "mpvpe_mm": "MPVPE"}
CELL_TITLE = " / ".join(METRIC_TITLES[m] for m in TABLE_METRICS) + " (mm)"
#: The two numbers of each run a table shows, per model column: the final evaluated round, and the
#: best round (lowest MPJPE among the evaluated rounds after training began, the paper's Table 1 choice).
VIEWS = ("final", "best")
VIEW_TITLES = {"final": "final", "best": "best round"}
#: The metric that picks the best round.
BEST_BY = "mpjpe_mm"
#: Appended to a cell holding at least one unfinished run.
UNFINISHED_MARK = "*"
MISSING = "—"
DECIMALS = 1
PROTOCOL_KEYS = ("dataset", "joint_set", "alignment", "body_model", "ground_truth")
#: RunConfig fields that may differ between runs sharing a cell (they are repetitions; the trackers
#: a run logged to change nothing it computes).
REPEAT_FIELDS = ("seed", "out", "cache_dir", "dataset_path", "loggers")

STRATEGY_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedopt": "FedOpt", "fedgh": "FedGH"}
PARTITION_NAMES = {"iid": "IID", "lda": "LDA", "cnn-cluster": "CNN Cluster", "by-source": "By source",
                   "natural": "Natural"}  # fmt: skip
BACKBONE_NAMES = {"fastmetro": "FastMETRO", "tore": "TORE"}
#: Options shown with a Greek letter; a missing one is shown with its plugin's default
#: (pchmr.plugins.strategies.fedprox.DEFAULT_PROXIMAL_MU, pchmr.plugins.partitioners.lda.DEFAULT_ALPHA).
STRATEGY_SYMBOLS = {"fedprox": ("proximal-mu", "μ", 0.01)}
PARTITION_SYMBOLS = {"lda": ("alpha", "α", 0.5)}
#: Options never worth a place in a label.
LABEL_SKIP = {"seed", "weights", "batch-size", "label"}

#: group-by → (row header, title)
GROUP_BY = {
    "setting-model": "Setting",
    "clients-model": "Clients N/k",
    "strategy-partition": "Partition · Strategy",
}
MODE_RANK = {"centralized": 0, "naive": 1, "federated": 2}
#: Row order of strategies (the paper's FedAvg, FedOpt, FedProx; others after, by name).
STRATEGY_RANK = {"fedavg": 0, "fedopt": 1, "fedprox": 2, "fedgh": 3}
VARIANT_RANK = {"S": 0, "M": 1, "L": 2}


class ReportError(ValueError):
    """A path is not a usable run directory, or a report option has a bad value."""


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSummary:
    """One run directory. ``final`` is ``final.json`` (for an unfinished run: its last evaluated
    round, with ``finished`` False); ``rounds`` the records of ``rounds.jsonl``."""

    path: Path
    config: RunConfig
    final: Mapping[str, Any]
    rounds: tuple[Mapping[str, Any], ...]
    protocol: Mapping[str, Any]
    finished: bool = True

    @property
    def unit(self) -> str:
        """``"round"`` (federated) or ``"epoch"`` (baselines)."""
        return str(self.final.get("unit") or (self.rounds[-1].get("unit") if self.rounds else None) or
                   ("round" if self.config.mode == "federated" else "epoch"))  # fmt: skip

    def metric(self, key: str, view: str = "final") -> float | None:
        """``key`` (mm) of the final round, or with ``view="best"`` of :attr:`best` (None if none)."""
        record = self.final if view == "final" else self.best
        return None if record is None else _finite(record.get(key))

    @property
    def best(self) -> Mapping[str, Any] | None:
        """The evaluated round (epoch) with the lowest MPJPE after training began (round >= 1; round 0
        is the model before any training), the earliest on a tie: the paper's Table 1 choice. For an
        unfinished run, the best so far; None when no such round has a finite MPJPE (e.g. a run
        directory of another pchmr version without ``rounds.jsonl``)."""
        scored = [r for r in self.rounds if _round_number(r) >= 1 and _finite(r.get(BEST_BY)) is not None]
        return min(scored, key=lambda r: (_finite(r.get(BEST_BY)), _round_number(r))) if scored else None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _round_number(record: Mapping[str, Any]) -> int:
    try:
        return int(record.get("round", -1))
    except (TypeError, ValueError):
        return -1


def _read_json(path: Path, run: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{run}: {path.name} is not valid JSON ({exc})") from exc


def _read_rounds(path: Path, run: Path) -> list[dict[str, Any]]:
    """``rounds.jsonl`` read as a resume reads it (:func:`~pchmr.core.engine.rundir.parse_rounds`):
    every record is written whole, so a line that cannot be read is named, never dropped."""
    if not path.exists():
        return []
    try:
        return parse_rounds(path.read_bytes(), path)
    except HistoryError as exc:
        raise ReportError(f"{run}: cannot report a run whose history cannot be read: {exc}") from None


def _check_final(final: Any, run: Path) -> dict[str, Any]:
    """``final.json``'s content when it is the JSON object ``pchmr run`` writes (the metrics as
    numbers), else a :class:`ReportError` naming what it holds."""
    expected = "expected the JSON object `pchmr run` writes (round, metrics, protocol)"
    if not isinstance(final, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(final), "number")
        raise ReportError(f"{run}: final.json is a JSON {kind}, {expected}")
    for key in ("mpjpe_mm", "pa_mpjpe_mm"):
        value = final.get(key)
        if key not in final or isinstance(value, bool) or not isinstance(value, (int, float)):
            got = "no" if key not in final else f"a non-number {json.dumps(value)} as"
            raise ReportError(f"{run}: final.json has {got} '{key}', {expected}")
    return final


def _run_config(data: Mapping[str, Any], run: Path) -> RunConfig:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    try:
        return RunConfig.from_saved({k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise ReportError(f"{run}: config.json holds a run config pchmr cannot read: {exc}") from exc


def load_run(path: str | Path, include_unfinished: bool = False) -> RunSummary:
    """Read one run directory; :class:`ReportError` naming ``path`` if it is not a finished run
    (or, with ``include_unfinished``, has no evaluated round at all)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} does not exist or is not a directory (expected a pchmr run directory)")
    config_path, final_path = path / "config.json", path / "final.json"
    if not config_path.is_file():
        raise ReportError(f"{path} is not a pchmr run directory: config.json is missing")
    raw = _read_json(config_path, path)
    if not isinstance(raw, dict) or not isinstance(raw.get("run"), dict):
        raise ReportError(f"{path}: config.json has no 'run' table (expected the file `pchmr run` writes)")
    config = _run_config(raw["run"], path)
    rounds = tuple(_read_rounds(path / "rounds.jsonl", path))
    if final_path.is_file():
        final = _check_final(_read_json(final_path, path), path)
        finished = True
    elif include_unfinished:
        if not rounds:
            raise ReportError(f"{path} is an unfinished run with no evaluated round in rounds.jsonl: nothing to report")
        final = dict(rounds[-1])
        finished = False
    else:
        done = f"last evaluated {rounds[-1].get('unit', 'round')} {rounds[-1].get('round')}" if rounds else "no round"
        raise ReportError(
            f"{path} is an unfinished run (final.json is missing; {done}); "
            "finish it with `pchmr run --resume` or pass --include-unfinished"
        )
    protocol = final.get("protocol") or raw.get("protocol") or {}
    return RunSummary(path, config, final, rounds, dict(protocol), finished)


def run_names(runs: Sequence[RunSummary]) -> dict[Path, str]:
    """A short name per run directory for messages and figures: its path below the directory all of
    ``runs`` share (``fedavg/seed-0`` in a sweep), or its own name when that is all they share."""
    paths = [r.path for r in runs]
    if len(paths) < 2:
        return {p: p.name for p in paths}
    common = Path(os.path.commonpath([str(p) for p in paths]))
    return {p: (str(p.relative_to(common)) if p != common else p.name) for p in paths}


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself if it holds ``config.json``, else its immediate subdirectories that do
    (so ``pchmr report runs/`` works); :class:`ReportError` if neither."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist (expected a pchmr run directory)")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory (expected a pchmr run directory)")
    if (path / "config.json").is_file():
        return [path]
    children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    if not children:
        raise ReportError(f"{path} is not a pchmr run directory: config.json is missing (and no subdirectory has one)")
    return children


# --------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _options_label(options: Mapping[str, Any], symbols: tuple[str, str, float] | None) -> list[str]:
    parts = []
    rest = dict(options)
    if symbols is not None:
        key, symbol, default = symbols
        value = rest.pop(key, rest.pop(key.replace("-", "_"), default))
        parts.append(f"{symbol}={_fmt(value)}")
    parts += [f"{k}={_fmt(v)}" for k, v in sorted(rest.items()) if k not in LABEL_SKIP]
    return parts


def strategy_label(cfg: RunConfig) -> str:
    """``"FedAvg"``, ``"FedProx μ=0.01"``, ``"FedOpt server-opt=yogi"``."""
    name = STRATEGY_NAMES.get(cfg.strategy, cfg.strategy)
    return " ".join([name, *_options_label(cfg.strategy_options, STRATEGY_SYMBOLS.get(cfg.strategy))])


def partition_label(cfg: RunConfig) -> str:
    """``"IID"``, ``"LDA α=0.5"``, ``"CNN Cluster clusters=10"``."""
    name = PARTITION_NAMES.get(cfg.partitioner, cfg.partitioner)
    return " ".join([name, *_options_label(cfg.partition_options, PARTITION_SYMBOLS.get(cfg.partitioner))])


def baseline_label(cfg: RunConfig) -> str:
    if cfg.mode == "centralized":
        return "Centralized"
    if cfg.mode == "naive":
        return f"Naive {cfg.fraction * 100:g} %"
    raise ReportError(f"run mode '{cfg.mode}' is not a baseline (expected centralized or naive)")


def setting_label(cfg: RunConfig) -> str:
    """The setting of a run as the paper names it: ``"Centralized"``, ``"Naive 5 %"``,
    ``"FedAvg 10/10 IID"``, ``"FedProx μ=0.01 100/10 LDA α=0.5"``; more than one local epoch
    adds ``" E=2"``."""
    if cfg.mode != "federated":
        return baseline_label(cfg)
    label = f"{strategy_label(cfg)} {cfg.clients}/{cfg.per_round} {partition_label(cfg)}"
    return label + (f" E={cfg.local_epochs}" if cfg.local_epochs != 1 else "")


def model_label(cfg: RunConfig) -> str:
    """``"FastMETRO-S"``, ``"TORE-M"``."""
    return f"{BACKBONE_NAMES.get(cfg.backbone, cfg.backbone)}-{cfg.variant}"


def protocol_label(protocol: Mapping[str, Any]) -> str:
    """One line, as :meth:`pchmr.core.kit.metrics.Protocol.label` writes it (unknown keys appended)."""
    if not protocol:
        return "unknown protocol (no protocol recorded)"
    p = {k: protocol.get(k, "?") for k in PROTOCOL_KEYS}
    text = (f"{p['dataset']} · {p['joint_set']} · {p['alignment']} aligned · {p['body_model']} · "
            f"{p['ground_truth']} GT")  # fmt: skip
    extra = [f"{k}={v}" for k, v in sorted(protocol.items()) if k not in PROTOCOL_KEYS]
    return " · ".join([text, *extra])


def _protocol_key(protocol: Mapping[str, Any]) -> str:
    return _canonical(dict(protocol))


def _row_key(group_by: str) -> Callable[[RunConfig], str]:
    def clients(cfg: RunConfig) -> str:
        return f"{cfg.clients}/{cfg.per_round}" if cfg.mode == "federated" else baseline_label(cfg)

    def strategy_partition(cfg: RunConfig) -> str:
        return f"{partition_label(cfg)} · {strategy_label(cfg)}" if cfg.mode == "federated" else baseline_label(cfg)

    rows = {"setting-model": setting_label, "clients-model": clients, "strategy-partition": strategy_partition}
    return rows[group_by]


def _options_order(options: Mapping[str, Any]) -> tuple:
    """Plugin options in an order numbers sort by value (LDA α=1 before α=10), by key."""
    out = []
    for key, value in sorted(options.items()):
        number = _finite(value) if not isinstance(value, bool) else None
        out.append((key, 0, number, "") if number is not None else (key, 1, 0.0, _canonical(value)))
    return tuple(out)


def _sort_key(group_by: str) -> Callable[[RunSummary], tuple]:
    def key(run: RunSummary) -> tuple:
        c = run.config
        strategy = (STRATEGY_RANK.get(c.strategy, len(STRATEGY_RANK)), c.strategy, _options_order(c.strategy_options))
        partition = (c.partitioner, _options_order(c.partition_options))
        clients = (c.clients, c.per_round)
        if group_by == "strategy-partition":
            federated = (*partition, *strategy, *clients)
        elif group_by == "clients-model":
            federated = (*clients, *strategy, *partition)
        else:
            federated = (*strategy, *clients, *partition)
        naive_fraction = c.fraction if c.mode == "naive" else 0.0
        return (MODE_RANK.get(c.mode, len(MODE_RANK)), naive_fraction, *federated, c.local_epochs)

    return key


# --------------------------------------------------------------------------------------
# grouping
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof 1; None for n = 1) of n values, mm."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        vals = [v for v in values if v is not None]
        if not vals:
            return cls(None, None, 0)
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        return cls(mean, std, len(vals))

    def text(self) -> str:
        if self.mean is None:
            return MISSING
        out = f"{self.mean:.{DECIMALS}f}"
        return out if self.std is None else f"{out} ± {self.std:.{DECIMALS}f}"


@dataclass(frozen=True)
class Cell:
    """The runs of one (row, model) cell and their statistics per :data:`TABLE_METRICS`: ``stats``
    of their final rounds, ``best_stats`` of their best rounds (:attr:`RunSummary.best`)."""

    runs: tuple[RunSummary, ...]
    stats: Mapping[str, Stat]
    best_stats: Mapping[str, Stat] = field(default_factory=dict)

    @classmethod
    def of(cls, runs: Sequence[RunSummary]) -> Cell:
        return cls(
            tuple(runs),
            {m: Stat.of([r.metric(m) for r in runs]) for m in TABLE_METRICS},
            {m: Stat.of([r.metric(m, "best") for r in runs]) for m in TABLE_METRICS},
        )

    def stats_of(self, view: str = "final") -> Mapping[str, Stat]:
        return self.stats if view == "final" else self.best_stats

    @property
    def best_rounds(self) -> tuple[int | None, ...]:
        """Each run's best round (None for a run without one), in the cell's run order."""
        return tuple(None if r.best is None else _round_number(r.best) for r in self.runs)

    def best_where(self) -> str:
        """``"round 180"``, ``"epochs 55, 60"``: where the best-round numbers come from."""
        rounds = [str(n) for n in self.best_rounds if n is not None]
        if not rounds:
            return ""
        unit = self.runs[0].unit
        return f"{unit}{'s' if len(rounds) > 1 else ''} {', '.join(rounds)}"

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def unfinished(self) -> bool:
        return any(not r.finished for r in self.runs)

    def text(self, view: str = "final") -> str:
        """``"59.3 / 41.5 / 70.2"``; several runs: ``"59.3 ± 0.4 / 41.5 ± 0.2 / 70.2 ± 0.3 (n=3)"``;
        :data:`UNFINISHED_MARK` appended when a run is unfinished. ``view="best"``: the best rounds'
        numbers followed by where they come from, ``"58.9 / 41.0 / 70.1 @ round 180"``."""
        stats = self.stats_of(view)
        body = " / ".join(stats[m].text() for m in TABLE_METRICS)
        if self.n > 1:
            body += f" (n={self.n})"
        if view == "best" and self.best_where():
            body += f" @ {self.best_where()}"
        return body + (UNFINISHED_MARK if self.unfinished else "")


@dataclass(frozen=True)
class ResultTable:
    """Runs of one protocol: ``rows`` × ``columns`` (models); ``cells[(row, column)]``."""

    protocol: Mapping[str, Any]
    row_header: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    cells: Mapping[tuple[str, str], Cell]

    @property
    def protocol_label(self) -> str:
        return protocol_label(self.protocol)

    def cell_text(self, row: str, column: str, view: str = "final") -> str:
        cell = self.cells.get((row, column))
        return cell.text(view) if cell is not None else MISSING

    def headers(self) -> list[str]:
        """The row header, then each model's columns, one per :data:`VIEWS`: ``"FastMETRO-S · final"``,
        ``"FastMETRO-S · best round"``."""
        return [self.row_header, *(f"{column} · {VIEW_TITLES[view]}" for column in self.columns for view in VIEWS)]

    def row_texts(self, row: str) -> list[str]:
        """``row``'s label, then its cells in :meth:`headers` order."""
        return [row, *(self.cell_text(row, column, view) for column in self.columns for view in VIEWS)]


@dataclass(frozen=True)
class Report:
    """Everything a renderer needs: the tables (one per protocol) and warnings to print with them."""

    group_by: str
    tables: tuple[ResultTable, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def has_unfinished(self) -> bool:
        return any(c.unfinished for t in self.tables for c in t.cells.values())


def _canonical(value: Any) -> str:
    """A comparable, sortable text of a JSON-like value."""
    return json.dumps(value, sort_keys=True, default=str)


def repetition_key(cfg: RunConfig) -> str:
    """Equal for two runs exactly when their configs differ in :data:`REPEAT_FIELDS` at most: runs
    with the same key are repetitions of one setting (seeds)."""
    return _canonical({k: v for k, v in cfg.to_dict().items() if k not in REPEAT_FIELDS})


def repetition_groups(runs: Sequence[RunSummary]) -> list[list[RunSummary]]:
    """``runs`` split into groups of repetitions: the same evaluation protocol and the same
    :func:`repetition_key`; groups in the order of their first run, runs in their given order."""
    groups: dict[tuple[str, str], list[RunSummary]] = {}
    for run in runs:
        groups.setdefault((_protocol_key(run.protocol), repetition_key(run.config)), []).append(run)
    return list(groups.values())


def config_differences(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """For config dicts that share a label: per config, the fields whose values are not all equal
    over ``configs``, as ``"lr=0.002 epochs=3"`` (empty when all are equal)."""
    if not configs:
        return []
    differing = sorted(k for k in configs[0] if len({_canonical(c.get(k)) for c in configs}) > 1)

    def text(value: Any) -> str:
        return _canonical(value) if isinstance(value, (dict, list)) else _fmt(value)

    return [" ".join(f"{k}={text(c.get(k))}" for k in differing) for c in configs]


def _differing_fields(runs: Sequence[RunSummary]) -> list[str]:
    """RunConfig fields (besides :data:`REPEAT_FIELDS`) whose values are not all equal over ``runs``."""
    dicts = [r.config.to_dict() for r in runs]
    return sorted(k for k in dicts[0] if k not in REPEAT_FIELDS and len({_canonical(d[k]) for d in dicts}) > 1)


def _column_key(cfg: RunConfig) -> tuple:
    """Models ordered by backbone name, then S < M < L (other variants after, by name)."""
    return (cfg.backbone, VARIANT_RANK.get(cfg.variant, len(VARIANT_RANK)), cfg.variant)


def _cell_warnings(row: str, column: str, runs: Sequence[RunSummary]) -> list[str]:
    out = []
    differing = _differing_fields(runs)
    if differing:
        out.append(f"cell '{row}' × {column} averages runs that differ in {', '.join(differing)} (not only the seed)")
    seeds = [r.config.seed for r in runs]
    if len(set(seeds)) < len(seeds):
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        out.append(f"cell '{row}' × {column} holds several runs with the same seed {dup}: "
                   + ", ".join(str(r.path) for r in runs))  # fmt: skip
    return out


def build_report(runs: Sequence[RunSummary], group_by: str = "setting-model") -> Report:
    """Group ``runs`` into one :class:`ResultTable` per protocol (rows by ``group_by``, columns by
    model); warnings say when protocols were split or a cell mixes more than seeds."""
    if group_by not in GROUP_BY:
        raise ReportError(f"unknown group-by '{group_by}'; choose one of: {', '.join(GROUP_BY)}")
    if not runs:
        raise ReportError("no runs to report")
    row_of, sort_key = _row_key(group_by), _sort_key(group_by)
    by_protocol: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_protocol.setdefault(_protocol_key(run.protocol), []).append(run)
    warnings: list[str] = []
    if len(by_protocol) > 1:
        labels = "; ".join(protocol_label(group[0].protocol) for group in by_protocol.values())
        warnings.append(f"runs use {len(by_protocol)} different evaluation protocols and are shown in separate "
                        f"tables, never in one column: {labels}")  # fmt: skip
    tables = []
    for group in by_protocol.values():
        ordered = sorted(group, key=sort_key)
        rows = tuple(dict.fromkeys(row_of(r.config) for r in ordered))
        by_column = sorted(ordered, key=lambda r: _column_key(r.config))
        columns = tuple(dict.fromkeys(model_label(r.config) for r in by_column))
        members: dict[tuple[str, str], list[RunSummary]] = {}
        for r in ordered:
            members.setdefault((row_of(r.config), model_label(r.config)), []).append(r)
        for (row, column), cell_runs in members.items():
            warnings += _cell_warnings(row, column, cell_runs)
        cells = {key: Cell.of(value) for key, value in members.items()}
        tables.append(ResultTable(dict(group[0].protocol), GROUP_BY[group_by], rows, columns, cells))
    return Report(group_by, tuple(tables), tuple(warnings))


# --------------------------------------------------------------------------------------
# renderers
# --------------------------------------------------------------------------------------
#: What the two columns of a model hold (a footnote of every rendering).
VIEWS_NOTE = (
    "final: the last evaluated round/epoch; best round: the evaluated round/epoch after training began with the "
    "lowest MPJPE (the PCHMR paper's Table 1 choice), all three metrics from that round, named after @"
)


def footnotes(report: Report) -> list[str]:
    """What the cells hold and what marks mean, one line each (every rendering ends with them)."""
    notes = [f"cells: {CELL_TITLE}; mean ± sample std over runs (seeds) when n > 1", VIEWS_NOTE]
    if report.has_unfinished:
        notes.append(f"{UNFINISHED_MARK} includes an unfinished run (no final.json): its last evaluated round")
    return notes


def to_rich(report: Report) -> list[Any]:
    """rich renderables: one :class:`rich.table.Table` per protocol, then warnings and notes."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    for table in report.tables:
        t = Table(title=f"protocol: {table.protocol_label}", caption=CELL_TITLE, title_justify="left")
        header, *columns = table.headers()
        t.add_column(header, style="bold")
        for column in columns:
            t.add_column(column, justify="right")
        for row in table.rows:
            t.add_row(*table.row_texts(row))
        out.append(t)
    out += [Text(f"warning: {w}", style="yellow") for w in report.warnings]
    out += [Text(n, style="dim") for n in footnotes(report)[1:]]
    return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(report: Report) -> str:
    """One Markdown table per protocol, each under a ``**Protocol:** ...`` line; warnings as quotes."""
    lines: list[str] = []
    for table in report.tables:
        lines += [f"**Protocol:** {_md_escape(table.protocol_label)}", ""]
        headers = table.headers()
        lines.append("| " + " | ".join(_md_escape(h) for h in headers) + " |")
        lines.append("|---" + "|---:" * (len(headers) - 1) + "|")
        for row in table.rows:
            lines.append("| " + " | ".join(_md_escape(c) for c in table.row_texts(row)) + " |")
        lines.append("")
    lines += [f"> **Warning:** {_md_escape(w)}" for w in report.warnings]
    if report.warnings:
        lines.append("")
    lines += [f"_{n}_" for n in footnotes(report)]
    return "\n".join(lines) + "\n"


CSV_HEADER = ("protocol", "row", "model", "n", "unfinished", "cell",
              *(f"{m}_{s}" for m in TABLE_METRICS for s in ("mean", "std")),
              "best_cell", *(f"best_{m}_{s}" for m in TABLE_METRICS for s in ("mean", "std")), "best_rounds",
              "runs")  # fmt: skip


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def to_csv(report: Report) -> str:
    """Long format, one line per non-empty cell: protocol, row, model, n, unfinished, the cell
    text, mean and std (mm, 3 decimals) of each metric of the final rounds, the same of the best
    rounds (``best_…``) with each run's best round (``;``-joined), and the run directories."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for table in report.tables:
        for row in table.rows:
            for column in table.columns:
                cell = table.cells.get((row, column))
                if cell is None:
                    continue
                stats = [_num(x) for m in TABLE_METRICS for x in (cell.stats[m].mean, cell.stats[m].std)]
                best = [_num(x) for m in TABLE_METRICS for x in (cell.best_stats[m].mean, cell.best_stats[m].std)]
                rounds = ";".join("" if n is None else str(n) for n in cell.best_rounds)
                writer.writerow([table.protocol_label, row, column, cell.n, int(cell.unfinished), cell.text(), *stats,
                                 cell.text("best"), *best, rounds, ";".join(str(r.path) for r in cell.runs)])  # fmt: skip
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "μ": r"$\mu$", "α": r"$\alpha$", "·": r"$\cdot$", "—": "---"}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(report: Report) -> str:
    """One booktabs ``table`` per protocol, the protocol in the caption; needs ``\\usepackage{booktabs}``."""
    blocks: list[str] = []
    for table in report.tables:
        headers = table.headers()
        lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
                 r"\toprule",
                 " & ".join(latex_escape(h) for h in headers) + r" \\",
                 r"\midrule"]  # fmt: skip
        for row in table.rows:
            lines.append(" & ".join(latex_escape(c) for c in table.row_texts(row)) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        caption = f"{CELL_TITLE}. Protocol: {table.protocol_label}. {VIEWS_NOTE}."
        if any(cell.unfinished for cell in table.cells.values()):
            caption += f" {UNFINISHED_MARK}: includes an unfinished run."
        lines += [r"\caption{" + latex_escape(caption) + "}", r"\end{table}"]
        blocks.append("\n".join(lines))
    out = "\n\n".join(blocks) + "\n"
    if report.warnings:
        out = "".join(f"% warning: {w}\n" for w in report.warnings) + out
    return out


def _stats_json(stats: Mapping[str, Stat]) -> dict[str, dict[str, float | None]]:
    return {m: {"mean": stats[m].mean, "std": stats[m].std, "n": stats[m].n} for m in TABLE_METRICS}


def to_json(report: Report) -> str:
    """The report as JSON: per table its protocol, rows, models and one record per non-empty cell
    with ``final`` and ``best`` (mean, sample std and count per metric, mm; ``best`` also ``rounds``,
    each run's best round, and ``unit``), the run directories; the warnings and notes."""
    tables = []
    for table in report.tables:
        cells = []
        for row in table.rows:
            for column in table.columns:
                cell = table.cells.get((row, column))
                if cell is None:
                    continue
                cells.append({
                    "row": row, "model": column, "n": cell.n, "unfinished": cell.unfinished,
                    "final": {"text": cell.text(), "metrics": _stats_json(cell.stats)},
                    "best": {"text": cell.text("best"), "metrics": _stats_json(cell.best_stats),
                             "rounds": list(cell.best_rounds), "unit": cell.runs[0].unit, "chosen_by": BEST_BY},
                    "runs": [str(r.path) for r in cell.runs],
                })  # fmt: skip
        tables.append({"protocol": dict(table.protocol), "protocol_label": table.protocol_label,
                       "row_header": table.row_header, "rows": list(table.rows), "models": list(table.columns),
                       "views": {view: VIEW_TITLES[view] for view in VIEWS}, "cells": cells})  # fmt: skip
    document = {"group_by": report.group_by, "cell_metrics": list(TABLE_METRICS), "tables": tables,
                "warnings": list(report.warnings), "notes": footnotes(report)}  # fmt: skip
    return json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n"
