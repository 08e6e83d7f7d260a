"""A sweep: named rows of run options × seeds, at a matched budget of client optimizer steps.

A sweep file (TOML; ``docs/sweep.md``) names a base (a config file ``base = "…"`` and/or inline
``[options]``), rows (``[rows.NAME]``: option overrides, or ``config = "FILE"`` plus overrides),
the ``seeds`` every row runs with, an optional ``baseline`` row for the report's paired
differences, optional ``[scale.NAME]`` overrides and an optional ``[budget]``. A row's options
are, lowest first: the base file, the row's config file, ``[options]``, the row's own keys.

**Budget.** ``[budget] steps = S`` (or ``steps = "ROW"``: what that row trains as configured) and
``knob = "rounds"`` or ``"local_epochs"``: every federated row gets the value of its knob that
makes its total client optimizer steps exactly S; a baseline row (``mode = "centralized"`` or
``"naive"``) gets its ``epochs``. The count, with n training samples (``num_train``, else
``[budget] train_samples``), N clients, k per round, E local epochs, R rounds and batch B::

    federated   R · k · E · ⌈n / (N·B)⌉       (each sampled client holds an equal share, ⌈n/N⌉)
    centralized epochs · ⌈n / B⌉
    naive       epochs · ⌈max(1, round(fraction · n)) / B⌉

A knob value that is not a whole number ≥ 1 is refused, naming the row (:class:`SweepError`,
exit 2). With ``steps = "ROW"`` and n unknown, rows whose ⌈n/(N·B)⌉ is the same unknown factor
(same data, clients and batch) are still matched exactly. The count assumes equal client shares;
after a cell runs, :func:`realised_steps` counts its steps from ``partition.json`` and the seeded
client sampling, which the report compares with the plan (they differ for partitioners that make
unequal clients, such as ``lda``).

**Cells.** Every (row, seed) is an ordinary run directory ``OUT/ROW/seed-S`` made by
:func:`pchmr.core.engine.run.execute` (so ``pchmr run --resume`` works on it too). :func:`cell_state`
reads what is there: nothing (``new``), a run without ``final.json`` (``resume``: from its last
checkpoint), or a finished run (``finished``: skipped); a cell whose saved config differs from the
plan's is refused before anything runs. ``OUT/sweep.json`` holds the plan and each cell's state.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import time
import tomllib
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file
from pchmr.core.engine.packaged_configs import PackagedConfigError, resolve_config_path
from pchmr.core.kit.atomic import write_text_atomic

__all__ = [
    "KNOBS",
    "PLAN_FILE",
    "Budget",
    "Cell",
    "CellOutcome",
    "RowPlan",
    "SweepError",
    "SweepPlan",
    "cell_state",
    "check_cells",
    "load_sweep",
    "read_sweep_json",
    "realised_steps",
    "run_sweep",
    "write_sweep_json",
]

log = logging.getLogger("pchmr.sweep")

#: The sweep directory's plan and cell states.
PLAN_FILE = "sweep.json"
#: Failed cells' tracebacks.
LOG_FILE = "sweep.log"
#: What a ``[budget]`` may choose for a federated row (a baseline row always gets its epochs).
KNOBS = ("rounds", "local_epochs")
BASELINE_KNOB = "epochs"
SWEEP_KEYS = ("description", "base", "options", "rows", "seeds", "baseline", "budget", "scale")
BUDGET_KEYS = ("steps", "knob", "train_samples")
#: A row's key naming a config file (not a RunConfig field).
ROW_CONFIG_KEY = "config"
#: Fields the sweep sets for every cell itself.
OWNED_FIELDS = ("seed", "out")
#: Fields a cell's saved config may differ in from the plan: where things are, not what is trained.
LOCATION_FIELDS = ("out", "cache_dir")
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FORMAT_VERSION = 1


class SweepError(ConfigError):
    """A sweep file, its plan or its directory cannot be used as given (exit 2)."""


# --------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """``[budget]``: ``steps`` as given (a number, or a row's name), the ``knob`` federated rows
    change, ``train_samples`` for rows without ``num_train``; ``total`` the resolved number of
    client optimizer steps (None when it stays a multiple of an unknown ⌈n/(N·B)⌉)."""

    steps: int | str
    knob: str
    train_samples: int | None
    total: int | None
    explain: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RowPlan:
    """One row: its run config (``seed`` the first of the sweep's, ``out`` unset), the options the
    row itself gave, the field the budget set (None without a budget) and its planned total of
    client optimizer steps (None when the training-set size is unknown before the data loads),
    with the arithmetic in words."""

    name: str
    config: RunConfig
    given: Mapping[str, Any]
    knob: str | None
    steps: int | None
    explain: str

    @property
    def unit(self) -> str:
        return "round" if self.config.mode == "federated" else "epoch"

    def config_for(self, seed: int, path: Path) -> RunConfig:
        return self.config.replace(seed=seed, out=str(path))

    def as_dict(self) -> dict[str, Any]:
        cfg = self.config.to_dict()
        for name in OWNED_FIELDS:
            cfg.pop(name)
        return {"name": self.name, "given": dict(self.given), "knob": self.knob,
                "units": getattr(self.config, self.knob) if self.knob else None, "unit": self.unit,
                "steps": self.steps, "steps_explained": self.explain, "config": cfg}  # fmt: skip


@dataclass(frozen=True)
class Cell:
    row: str
    seed: int

    @property
    def path(self) -> Path:
        """Relative to the sweep directory."""
        return Path(self.row) / f"seed-{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.row}/seed-{self.seed}"


@dataclass(frozen=True)
class SweepPlan:
    source: Path
    description: str | None
    scale: str | None
    seeds: tuple[int, ...]
    rows: tuple[RowPlan, ...]
    budget: Budget | None
    baseline: str | None

    @property
    def cells(self) -> list[Cell]:
        """Row by row, seed by seed (a row's seeds finish together, so a partial sweep already
        has whole rows to compare)."""
        return [Cell(row.name, seed) for row in self.rows for seed in self.seeds]

    def row(self, name: str) -> RowPlan:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def cell_config(self, cell: Cell, out: Path) -> RunConfig:
        return self.row(cell.row).config_for(cell.seed, out / cell.path)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "sweep_file": str(self.source),
            "description": self.description,
            "scale": self.scale,
            "seeds": list(self.seeds),
            "baseline": self.baseline,
            "budget": None if self.budget is None else self.budget.as_dict(),
            "rows": [row.as_dict() for row in self.rows],
        }


def _error(source: Path, message: str) -> SweepError:
    return SweepError(f"sweep file {source}: {message}")


def _unknown(keys: Sequence[str], known: Sequence[str], where: str) -> str:
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"{where} has unknown key{'s' if len(keys) > 1 else ''} {', '.join(parts)}; its keys are: {', '.join(known)}"


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``, tables merged key by key (at any depth)."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _norm(options: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in options.items()}


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    if path.is_dir():
        raise SweepError(f"{what} {path} is a directory; give a TOML file (docs/sweep.md)")
    if not path.is_file():
        raise SweepError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"{what} {path} is not valid TOML: {exc}") from exc


def _scales_of(data: Mapping[str, Any]) -> set[str]:
    scales = data.get("scale", {})
    return set(scales) if isinstance(scales, Mapping) else set()


def _config_scales(path: Path) -> set[str]:
    if path.suffix == ".json" or not path.is_file():
        return set()
    try:
        return _scales_of(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError:
        return set()  # load_config_file names the error


def _config_values(path: Path, scale: str | None, source: Path, where: str) -> dict[str, Any]:
    """A config file's options, with ``[scale.NAME]`` applied when the file has that scale."""
    try:
        return load_config_file(path, scale=scale if scale in _config_scales(path) else None)
    except ConfigError as exc:
        raise _error(source, f"{where}: {exc}") from None


def _resolve_path(source: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _error(source, f"{where} must be a config file's path (TOML or JSON), got {value!r}")
    try:
        path = resolve_config_path(value)  # a packaged file, paper:NAME
    except PackagedConfigError as exc:
        raise _error(source, f"{where}: {exc}") from None
    path = path.expanduser()
    return path if path.is_absolute() else (source.parent / path)


def _seeds(source: Path, data: Mapping[str, Any]) -> tuple[int, ...]:
    if "seeds" not in data:
        inside = [k for k, v in data.items() if isinstance(v, Mapping) and "seeds" in v]
        hint = (f" (a seeds key sits inside [{inside[0]}]: in TOML, top-level keys go before the first [table])"
                if inside else "")  # fmt: skip
        raise _error(source, f"has no seeds; give the seeds every row runs with, e.g. seeds = [0, 1, 2]{hint}")
    seeds = data["seeds"]
    ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not ok or any(s < 0 for s in seeds):
        raise _error(source, f"seeds must be a non-empty list of whole numbers >= 0, e.g. [0, 1, 2], got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _error(source, f"seeds lists a seed twice: {seeds}")
    return tuple(seeds)


def load_sweep(path: str | Path, scale: str | None = None) -> SweepPlan:
    """Read and check a sweep file and resolve its budget: the :class:`SweepPlan`, or a
    :class:`SweepError` naming the file and what is wrong (the row, the key, the budget).
    ``path`` may be a packaged sweep's reference, ``sweeps:NAME``."""
    try:
        source = resolve_config_path(path)
    except PackagedConfigError as exc:
        raise SweepError(str(exc)) from None
    data = _read_toml(source, "sweep file")
    if not isinstance(data.get("scale", {}), Mapping) or not all(
        isinstance(v, Mapping) for v in data.get("scale", {}).values()
    ):
        raise _error(source, "'scale' must be a table of named override tables, e.g. [scale.cpu]")
    base_path = _resolve_path(source, data["base"], "base") if "base" in data else None
    rows_raw = data.get("rows")
    config_paths = [base_path] if base_path else []
    if isinstance(rows_raw, Mapping):
        config_paths += [
            _resolve_path(source, r[ROW_CONFIG_KEY], f"row '{n}': config")
            for n, r in rows_raw.items()
            if isinstance(r, Mapping) and ROW_CONFIG_KEY in r
        ]
    if scale is not None:
        available = _scales_of(data).union(*(_config_scales(p) for p in config_paths))
        if scale not in available:
            raise _error(
                source,
                f"no scale '{scale}' in the sweep file or the config files it names; "
                f"scales there: {', '.join(sorted(available)) or 'none'}",
            )
    if scale in _scales_of(data):
        data = _merge(data, data["scale"][scale])
    data = {k: v for k, v in data.items() if k != "scale"}
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise _error(source, _unknown(unknown, SWEEP_KEYS, "the sweep file"))
    seeds = _seeds(source, data)
    base = _config_values(base_path, scale, source, "base") if base_path else {}
    options = data.get("options", {})
    if not isinstance(options, Mapping):
        raise _error(source, f"[options] must be a table of run options, got {options!r}")
    _refuse_owned(source, _norm(options), "[options]")
    rows = data.get("rows")
    if not isinstance(rows, Mapping) or not rows:
        raise _error(source, "has no rows; give at least one [rows.NAME] table of run options, e.g. [rows.fedavg]")
    budget_raw = data.get("budget")
    if budget_raw is not None and not isinstance(budget_raw, Mapping):
        raise _error(source, f"[budget] must be a table (steps, knob), got {budget_raw!r}")
    _knob(source, budget_raw)
    configs = {name: _row_config(source, name, row, base, options, scale) for name, row in rows.items()}
    baseline = data.get("baseline")
    if baseline is not None and baseline not in rows:
        raise _error(source, f"baseline '{baseline}' is not a row; its rows are: {', '.join(rows)}")
    budget, planned = _plan_budget(source, budget_raw, configs)
    row_plans = tuple(
        RowPlan(name, planned[name][0], given, planned[name][1], planned[name][2], planned[name][3])
        for name, (_, given, _) in configs.items()
    )
    _check_plugins(source, row_plans)
    description = data.get("description")
    return SweepPlan(source.resolve(), None if description is None else str(description), scale, seeds, row_plans,
                     budget, baseline)  # fmt: skip


def _refuse_owned(source: Path, options: Mapping[str, Any], where: str) -> None:
    owned = [k for k in OWNED_FIELDS if k in options]
    if owned:
        raise _error(
            source,
            f"{where} sets {', '.join(owned)}, which the sweep sets for every cell itself "
            "(seeds = [...] for the seeds, --out for the directory)",
        )


def _knob(source: Path, budget: Mapping[str, Any] | None) -> str | None:
    if budget is None:
        return None
    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise _error(source, _unknown(unknown, BUDGET_KEYS, "[budget]"))
    if "steps" not in budget:
        raise _error(source, "[budget] has no steps: give the total client optimizer steps of every row "
                     "(steps = 480) or the row whose steps the others match (steps = \"fedavg\")")  # fmt: skip
    knob = budget.get("knob", "rounds")
    if knob not in KNOBS:
        raise _error(source, f"[budget] knob must be one of {', '.join(KNOBS)} (what federated rows change to meet "
                     f"the budget; baseline rows change their epochs), got {knob!r}")  # fmt: skip
    return str(knob)


def _row_config(
    source: Path,
    name: Any,
    row: Any,
    base: Mapping[str, Any],
    options: Mapping[str, Any],
    scale: str | None,
) -> tuple[RunConfig, dict[str, Any], set[str]]:
    where = f"row '{name}'"
    if not isinstance(name, str) or not ROW_NAME.match(name) or name in (PLAN_FILE, LOG_FILE):
        raise _error(source, f"{where}: a row's name names its directory: letters, digits, '.', '_' and '-', "
                     "starting with a letter or digit (and not sweep.json or sweep.log)")  # fmt: skip
    if not isinstance(row, Mapping):
        raise _error(source, f'{where} must be a table of run options, e.g. [rows.{name}] strategy = "fedprox"')
    given = dict(row)
    own = _norm({k: v for k, v in row.items() if k != ROW_CONFIG_KEY})
    _refuse_owned(source, own, where)
    values = dict(base)
    if ROW_CONFIG_KEY in row:
        values = _merge(values, _config_values(_resolve_path(source, row[ROW_CONFIG_KEY], where), scale, source, where))
    values = _merge(_norm(values), _norm(options))
    values = _merge(values, own)
    values.pop("seed", None)
    values.pop("out", None)
    try:
        config = RunConfig.from_dict(values)
    except ConfigError as exc:
        raise _error(source, f"{where}: {exc}") from None
    except TypeError as exc:
        raise _error(source, f"{where}: {exc}") from None
    return config, given, set(own)


# --------------------------------------------------------------------------------------
# the budget
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Count:
    """Client optimizer steps per unit of a row's knob: ``client_epochs`` × ``per_client_epoch``
    (None when the training-set size is unknown; then ``shape`` says which rows share it)."""

    field: str
    client_epochs: int
    per_client_epoch: int | None
    shape: tuple[Any, ...]
    words: str  # "2 clients × 1 local epoch × {s} steps (…)"

    def total(self, units: int) -> int | None:
        return None if self.per_client_epoch is None else units * self.client_epochs * self.per_client_epoch


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _count(cfg: RunConfig, knob: str, train_samples: int | None) -> _Count:
    """How many client optimizer steps one unit of ``knob`` (baselines: an epoch) takes."""
    n = cfg.num_train if cfg.num_train is not None else train_samples
    b = cfg.batch_size
    if cfg.mode == "federated":
        shape = ("federated", cfg.dataset, cfg.dataset_path, cfg.num_train, cfg.clients, b)
        per = None if n is None else math.ceil(n / (cfg.clients * b))
        share = (f"⌈{n}/{cfg.clients}⌉ = {math.ceil(n / cfg.clients)} samples" if n is not None
                 else f"⌈n/{cfg.clients}⌉ samples of the data's n")  # fmt: skip
        steps = _plural(per, "step") if per is not None else f"⌈n/{cfg.clients * b}⌉ steps"
        if knob == "rounds":
            ce = cfg.per_round * cfg.local_epochs
            words = f"{_plural(cfg.per_round, 'client')} × {_plural(cfg.local_epochs, 'local epoch')}"
        else:
            ce = cfg.rounds * cfg.per_round
            words = f"{_plural(cfg.rounds, 'round')} × {_plural(cfg.per_round, 'client')}"
        return _Count(knob, ce, per, shape, f"{words} × {steps} ({share} per client at batch {b})")
    if cfg.mode == "centralized":
        size, what = n, f"{n} samples" if n is not None else "the n samples of the data"
        shape = ("centralized", cfg.dataset, cfg.dataset_path, cfg.num_train, b)
    else:
        size = None if n is None else max(1, round(cfg.fraction * n))
        what = f"{size} samples ({cfg.fraction:g} of {n})" if n is not None else f"{cfg.fraction:g} of the n samples"
        shape = ("naive", cfg.dataset, cfg.dataset_path, cfg.num_train, cfg.fraction, b)
    per = None if size is None else math.ceil(size / b)
    steps = _plural(per, "step") if per is not None else "⌈size/batch⌉ steps"
    return _Count(BASELINE_KNOB, 1, per, shape, f"{steps} ({what} at batch {b})")


def _describe(units: int, count: _Count, unit: str) -> str:
    head = _plural(units, unit) if count.field != "local_epochs" else _plural(units, "local epoch")
    total = count.total(units)
    return f"{head} × {count.words}" + ("" if total is None else f" = {total}")


def _plan_budget(
    source: Path, raw: Mapping[str, Any] | None, configs: Mapping[str, tuple[RunConfig, Any, set[str]]]
) -> tuple[Budget | None, dict[str, tuple[RunConfig, str | None, int | None, str]]]:
    """The resolved budget and, per row, (config with its knob set, knob field, steps, words)."""
    train_samples = None if raw is None else raw.get("train_samples")
    if train_samples is not None and (
        isinstance(train_samples, bool) or not isinstance(train_samples, int) or train_samples < 1
    ):
        raise _error(source, f"[budget] train_samples must be a whole number >= 1, got {train_samples!r}")
    knob = "rounds" if raw is None else str(raw.get("knob", "rounds"))
    counts = {name: _count(cfg, knob, train_samples) for name, (cfg, _, _) in configs.items()}

    def units_of(name: str) -> int:
        cfg = configs[name][0]
        return int(getattr(cfg, counts[name].field))

    if raw is None:
        planned = {}
        for name, (cfg, _, _) in configs.items():
            count = counts[name]
            unit = "round" if cfg.mode == "federated" else "epoch"
            planned[name] = (cfg, None, count.total(units_of(name)), _describe(units_of(name), count, unit))
        return None, planned

    steps = raw["steps"]
    reference: str | None = None
    if isinstance(steps, str):
        if steps not in configs:
            raise _error(source, f"[budget] steps = '{steps}' is not a row; give a number of client optimizer steps "
                         f"or one of the rows: {', '.join(configs)}")  # fmt: skip
        reference = steps
        ref_count = counts[reference]
        ref_units = units_of(reference)
        total = ref_count.total(ref_units)
        # the budget in client epochs of the reference's (unknown) size when n is unknown
        ref_client_epochs = ref_units * ref_count.client_epochs
        explain = f"as row '{reference}' trains as configured: " + _describe(
            ref_units, ref_count, "round" if configs[reference][0].mode == "federated" else "epoch"
        )
    elif isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:
        total, ref_count, ref_client_epochs = steps, None, 0
        explain = f"{steps} client optimizer steps per cell"
    else:
        raise _error(source, f"[budget] steps must be a whole number >= 1 or a row's name, got {steps!r}")

    planned = {}
    for name, (cfg, _, own) in configs.items():
        count = counts[name]
        unit = "round" if cfg.mode == "federated" else "epoch"
        if count.field in own and name != reference:
            raise _error(
                source,
                f"row '{name}' sets {count.field}, which [budget] chooses for it (knob = '{knob}'; baseline rows: "
                "epochs); remove it from the row, or drop the [budget] to run the rows as written",
            )
        if total is not None and count.per_client_epoch is not None:
            per_unit = count.client_epochs * count.per_client_epoch
            units, rest = divmod(total, per_unit)
            if rest or units < 1:
                raise _error(source, _impossible(name, total, per_unit, count, unit))
        elif ref_count is not None and count.shape == ref_count.shape:
            units, rest = divmod(ref_client_epochs, count.client_epochs)
            if rest or units < 1:
                raise _error(source, _impossible(name, ref_client_epochs, count.client_epochs, count, unit,
                                                 "client epochs"))  # fmt: skip
        else:
            raise _error(
                source,
                f"row '{name}' leaves num_train unset (the whole dataset, whose size is known only once it is "
                "loaded), so its client optimizer steps cannot be counted before the sweep runs; set num_train, or "
                "give the training set's size as [budget] train_samples"
                + (f" (or match rows that share row '{reference}''s data, clients and batch)" if reference else ""),
            )
        matched = cfg.replace(**{count.field: units})
        planned[name] = (matched, count.field, count.total(units), _describe(units, count, unit))
    budget = Budget(steps, knob, train_samples, total, explain)
    return budget, planned


def _impossible(name: str, total: int, per_unit: int, count: _Count, unit: str, what: str = "steps") -> str:
    field_unit = "local epoch" if count.field == "local_epochs" else unit
    low, high = (total // per_unit) * per_unit, (total // per_unit + 1) * per_unit
    nearest = [f"{v} = {_plural(v // per_unit, field_unit)}" for v in (low, high) if v >= per_unit]
    per = f"{per_unit} client optimizer {what}" if what == "steps" else f"{per_unit} {what}"
    return (
        f"[budget] of {total} {'client optimizer steps' if what == 'steps' else what} cannot be met exactly by "
        f"row '{name}': one {field_unit} of it takes {per} ({count.words}), and {total} is not a "
        f"positive multiple of {per_unit} (nearest: {', '.join(nearest)}); change the budget or the row"
    )


def _check_plugins(source: Path, rows: Sequence[RowPlan]) -> None:
    """Unknown plugins and bad plugin options, per row, before anything runs."""
    from pchmr.core.contracts.errors import OptionError
    from pchmr.core.engine.preparation import check_plugins
    from pchmr.core.engine.registry import PluginError

    for row in rows:
        try:
            check_plugins(row.config)
        except (PluginError, OptionError, ConfigError) as exc:
            raise _error(source, f"row '{row.name}': {exc}") from None


# --------------------------------------------------------------------------------------
# the directory
# --------------------------------------------------------------------------------------
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _saved_config(cell_dir: Path, cell: Cell) -> RunConfig:
    try:
        raw = json.loads((cell_dir / "config.json").read_text())
        return RunConfig.from_saved(raw["run"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SweepError(f"cell {cell.name}: {cell_dir / 'config.json'} cannot be read as a run config ({exc}); "
                         "delete the cell's directory to run it afresh") from None  # fmt: skip


def cell_state(plan: SweepPlan, cell: Cell, out: Path) -> str:
    """``"new"``, ``"resume"`` (started, no ``final.json``) or ``"finished"``; a
    :class:`SweepError` when the cell's saved config differs from what the plan runs now."""
    cell_dir = out / cell.path
    if not cell_dir.is_dir() or not any(cell_dir.iterdir()):
        return "new"
    if (cell_dir / "config.json").is_file():
        saved = _saved_config(cell_dir, cell).to_dict()
        now = plan.cell_config(cell, out).to_dict()
        differ = [k for k in now if k not in LOCATION_FIELDS and _canonical(saved.get(k)) != _canonical(now[k])]
        if differ:
            changes = "; ".join(f"{k}: {_canonical(saved.get(k))} saved, {_canonical(now[k])} now" for k in differ)
            raise SweepError(
                f"cell {cell.name} ({cell_dir}) was run with another config than the sweep gives it now ({changes}); "
                "delete that directory to run the cell afresh, or restore the sweep file (and --scale) it was run with"
            )
    return "finished" if (cell_dir / "final.json").is_file() else "resume"


def check_cells(plan: SweepPlan, out: Path) -> dict[Cell, str]:
    """:func:`cell_state` of every cell: every mismatch is refused before any cell runs."""
    return {cell: cell_state(plan, cell, out) for cell in plan.cells}


def realised_steps(run_dir: str | Path) -> int | None:
    """The client optimizer steps a finished run took: per evaluated-to-the-end round, the sampled
    clients' ⌈size/batch⌉ × local epochs (sizes from ``partition.json``, sampling as the server
    draws it); a baseline's epochs × ⌈size/batch⌉. None without ``final.json``."""
    from pchmr.core.contracts.partition import load_partition
    from pchmr.core.engine.federation.common import sample_clients

    run_dir = Path(run_dir)
    final_path, partition_path = run_dir / "final.json", run_dir / "partition.json"
    if not final_path.is_file() or not partition_path.is_file():
        return None
    cfg = RunConfig.from_saved(json.loads((run_dir / "config.json").read_text())["run"])
    done = int(json.loads(final_path.read_text())["round"])
    per_client = [math.ceil(int(size) / cfg.batch_size) for size in load_partition(partition_path).sizes()]
    if cfg.mode != "federated":
        return done * per_client[0]
    return sum(
        cfg.local_epochs * per_client[p]
        for r in range(1, done + 1)
        for p in sample_clients(cfg.seed, r, cfg.clients, cfg.per_round)
    )


@dataclass
class CellOutcome:
    """What became of one cell in this invocation: ``finished`` (ran now), ``skipped`` (finished
    before), ``failed`` (``error`` says why; the traceback is in ``sweep.log``)."""

    cell: Cell
    status: str
    seconds: float = 0.0
    error: str | None = None
    final: Mapping[str, Any] | None = None
    steps: int | None = None


def write_sweep_json(plan: SweepPlan, out: Path, cells: Mapping[Cell, Mapping[str, Any]]) -> Path:
    """``OUT/sweep.json``: the plan and, per cell, its path, state (pending, running, finished,
    failed), seconds, error and realised steps."""
    target = out / PLAN_FILE
    body = {
        **plan.as_dict(),
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "cells": [{"row": c.row, "seed": c.seed, "path": str(c.path), **dict(cells.get(c, {}))} for c in plan.cells],
    }
    write_text_atomic(target, json.dumps(body, indent=2, default=str) + "\n")
    return target


def read_sweep_json(out: str | Path) -> dict[str, Any]:
    """A sweep directory's ``sweep.json`` (a :class:`SweepError` naming what is wrong)."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise SweepError(f"{out} is not a sweep directory: {PLAN_FILE} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SweepError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("cells"), list):
        raise SweepError(f"{path} has no rows and cells (expected the file `pchmr sweep` writes)")
    return data


def run_sweep(
    plan: SweepPlan,
    out: Path,
    *,
    execute: Callable[..., Any] | None = None,
    on_cell: Callable[[Cell, str], None] | None = None,
    on_done: Callable[[CellOutcome], None] | None = None,
    on_round: Callable[[Any], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> list[CellOutcome]:
    """Run every cell not finished yet, in :attr:`SweepPlan.cells` order, each through ``execute``
    (:func:`pchmr.core.engine.run.execute`, resuming a started cell from its checkpoint);
    finished cells are skipped. A cell that raises is recorded (``sweep.json``, its traceback in
    ``sweep.log``) and the next one runs. ``on_cell(cell, state)`` before each cell,
    ``on_done(outcome)`` after it. Mismatched cells are refused before anything runs."""
    if execute is None:
        from pchmr.core.engine.run import execute as run_execute

        execute = run_execute
    states = check_cells(plan, out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[Cell, dict[str, Any]] = {}
    previous = _previous_states(out)
    for cell, state in states.items():
        old = previous.get((cell.row, cell.seed), {})
        if state == "finished":
            record[cell] = {
                "state": "finished",
                "seconds": old.get("seconds"),
                "steps": realised_steps(out / cell.path),
            }
        else:
            record[cell] = {"state": "pending" if state == "new" else "interrupted"}
    write_sweep_json(plan, out, record)
    outcomes = []
    for cell, state in states.items():
        if on_cell is not None:
            on_cell(cell, state)
        if state == "finished":
            outcome = CellOutcome(cell, "skipped", final=_read_final(out / cell.path), steps=record[cell]["steps"])
        else:
            record[cell] = {"state": "running", "started": datetime.now(UTC).isoformat(timespec="seconds")}
            write_sweep_json(plan, out, record)
            outcome = _run_cell(plan, cell, out, state, execute, on_round, on_status)
            record[cell] = {"state": outcome.status, "seconds": round(outcome.seconds, 1), "steps": outcome.steps,
                            **({"error": outcome.error} if outcome.error else {})}  # fmt: skip
            write_sweep_json(plan, out, record)
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)
    return outcomes


def _previous_states(out: Path) -> dict[tuple[str, int], Mapping[str, Any]]:
    try:
        data = read_sweep_json(out)
    except SweepError:
        return {}
    return {(str(c.get("row")), int(c.get("seed", -1))): c for c in data["cells"] if isinstance(c, Mapping)}


def _read_final(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "final.json").read_text())
    except (OSError, ValueError):
        return None


def _run_cell(
    plan: SweepPlan,
    cell: Cell,
    out: Path,
    state: str,
    execute: Callable[..., Any],
    on_round: Callable[[Any], None] | None,
    on_status: Callable[[str], None] | None,
) -> CellOutcome:
    cell_dir = out / cell.path
    started = time.perf_counter()
    try:
        if state == "resume" and (cell_dir / "config.json").is_file():
            config = _saved_config(cell_dir, cell)  # as `pchmr run --resume` reads it
        else:
            config = plan.cell_config(cell, out)
        cell_dir.parent.mkdir(parents=True, exist_ok=True)
        result = execute(config, run_dir=cell_dir, resume=state == "resume", on_round=on_round, on_status=on_status)
    except Exception as exc:  # one failed cell must not lose the others
        seconds = time.perf_counter() - started
        message = f"{type(exc).__name__}: {exc}"
        with (out / LOG_FILE).open("a") as fh:
            fh.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')} cell {cell.name} failed after "
                     f"{seconds:.0f} s\n{traceback.format_exc()}\n")  # fmt: skip
        log.error("cell %s failed: %s", cell.name, message)
        return CellOutcome(cell, "failed", seconds, message)
    return CellOutcome(cell, "finished", time.perf_counter() - started, final=result.final,
                       steps=realised_steps(cell_dir))  # fmt: skip
