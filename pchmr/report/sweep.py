"""The report of a sweep directory (``pchmr sweep``'s ``DIR``, read through its ``sweep.json``).

Per row and metric (MPJPE, PA-MPJPE, MPVPE in mm, PCK at 150 mm) of the cells' final evaluated
round: the mean over seeds ± the half-width of its 95 % confidence interval by Student's t with
n − 1 degrees of freedom (:mod:`pchmr.report.stats`; n is shown, and n = 1 shows the value alone).
With a baseline row (the sweep file's ``baseline``, or ``--baseline ROW``), each other row's
paired difference row − baseline, matched by seed, with its own t-interval, marked with
:data:`EXCLUDES_ZERO` when that interval excludes 0.

Rows are grouped into one table per evaluation protocol, like every pchmr table: numbers of
different protocols never share a column, and a difference is only taken within the baseline's
protocol. Each row also shows its planned client optimizer steps; when a cell's realised steps
(:func:`pchmr.core.engine.sweep.realised_steps`) differ, the row says so and a warning explains.

Renderers, each a pure function of a :class:`SweepReport`: :func:`to_rich`, :func:`to_markdown`,
:func:`to_json`, :func:`to_csv`, :func:`to_latex`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pchmr.core.engine.sweep import PLAN_FILE, SweepError, read_sweep_json, realised_steps
from pchmr.report.stats import CONFIDENCE, Interval, interval, paired_difference
from pchmr.report.tables import (
    ReportError,
    RunSummary,
    latex_escape,
    load_run,
    protocol_label,
    setting_label,
)

__all__ = [
    "DIFF_HEADER",
    "EXCLUDES_ZERO",
    "MAIN_HEADER",
    "SWEEP_METRICS",
    "SweepReport",
    "SweepRow",
    "SweepTable",
    "diff_rows",
    "is_sweep_dir",
    "load_sweep_report",
    "main_rows",
    "sweep_notes",
    "to_csv",
    "to_json",
    "to_latex",
    "to_markdown",
    "to_rich",
]

#: metric → column title.
SWEEP_METRICS = {"mpjpe_mm": "MPJPE (mm)", "pa_mpjpe_mm": "PA-MPJPE (mm)", "mpvpe_mm": "MPVPE (mm)",
                 "pck": "PCK@150mm"}  # fmt: skip
DECIMALS = {"pck": 3}
#: Appended to a paired difference whose confidence interval excludes 0.
EXCLUDES_ZERO = "*"
UNFINISHED_MARK = "†"
MISSING = "—"


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


@dataclass(frozen=True)
class SweepRow:
    """One row of the sweep: its finished (or, when asked, unfinished) cells by seed, each
    metric's :class:`Interval` over them, and, when the report has a baseline in this row's
    protocol, each metric's paired difference against it (with the seeds paired)."""

    name: str
    setting: str
    runs: Mapping[int, RunSummary]
    missing: tuple[int, ...]
    planned_steps: int | None
    realised_steps: Mapping[int, int | None]
    stats: Mapping[str, Interval]
    difference: Mapping[str, tuple[Interval, tuple[int, ...]]] | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def unfinished(self) -> bool:
        return any(not run.finished for run in self.runs.values())

    def values(self, metric: str) -> dict[int, float]:
        out = {}
        for seed, run in self.runs.items():
            value = run.metric(metric)
            if value is not None:
                out[seed] = value
        return out

    @property
    def steps_text(self) -> str:
        planned = MISSING if self.planned_steps is None else str(self.planned_steps)
        realised = sorted({s for s in self.realised_steps.values() if s is not None})
        if not realised or realised == [self.planned_steps]:
            return planned
        shown = str(realised[0]) if len(realised) == 1 else f"{realised[0]}–{realised[-1]}"
        return f"{planned} (ran {shown})"


@dataclass(frozen=True)
class SweepTable:
    protocol: Mapping[str, Any]
    rows: tuple[SweepRow, ...]
    baseline: str | None

    @property
    def protocol_label(self) -> str:
        return protocol_label(self.protocol)


@dataclass(frozen=True)
class SweepReport:
    path: Path
    plan: Mapping[str, Any]
    baseline: str | None
    tables: tuple[SweepTable, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    confidence: float = CONFIDENCE

    @property
    def seeds(self) -> list[int]:
        return list(self.plan.get("seeds", []))

    @property
    def runs(self) -> list[RunSummary]:
        return [run for table in self.tables for row in table.rows for run in row.runs.values()]


def _metric_text(stat: Interval, metric: str, signed: bool = False) -> str:
    return stat.text(DECIMALS.get(metric, 1), signed=signed)


def load_sweep_report(
    path: str | Path, baseline: str | None = None, include_unfinished: bool = False, confidence: float = CONFIDENCE
) -> SweepReport:
    """Read a sweep directory: its plan (``sweep.json``) and every cell's run directory. The
    baseline is ``baseline`` if given, else the sweep file's; :class:`ReportError` for an
    unknown one, or a sweep with no finished cell at all."""
    path = Path(path)
    try:
        plan = read_sweep_json(path)
    except SweepError as exc:
        raise ReportError(str(exc)) from None
    row_names = [str(r["name"]) for r in plan["rows"]]
    chosen = baseline if baseline is not None else plan.get("baseline")
    if chosen is not None and chosen not in row_names:
        raise ReportError(f"--baseline '{chosen}' is not a row of the sweep in {path}; its rows are: "
                          f"{', '.join(row_names)}")  # fmt: skip
    warnings: list[str] = []
    seeds = [int(s) for s in plan.get("seeds", [])]
    rows: list[tuple[SweepRow, str]] = []
    for entry in plan["rows"]:
        name = str(entry["name"])
        runs: dict[int, RunSummary] = {}
        missing: list[int] = []
        realised: dict[int, int | None] = {}
        for seed in seeds:
            cell_dir = path / name / f"seed-{seed}"
            if not (cell_dir / "final.json").is_file() and not (
                include_unfinished and (cell_dir / "rounds.jsonl").is_file()
            ):
                missing.append(seed)
                continue
            try:
                run = load_run(cell_dir, include_unfinished=include_unfinished)
            except ReportError as exc:
                warnings.append(f"row '{name}' seed {seed} left out: {exc}")
                missing.append(seed)
                continue
            runs[seed] = run
            realised[seed] = realised_steps(cell_dir) if run.finished else None
            if not run.finished:
                warnings.append(f"row '{name}' seed {seed} is unfinished: its last evaluated {run.unit} "
                                f"{run.final.get('round')} is included (marked {UNFINISHED_MARK})")  # fmt: skip
        if missing:
            warnings.append(f"row '{name}': no finished cell for seed{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} (failed or not run yet: rerun `pchmr sweep`); "
                            f"n = {len(runs)}")  # fmt: skip
        planned = entry.get("steps")
        off = {s: v for s, v in realised.items() if v is not None and planned is not None and v != planned}
        if off:
            warnings.append(
                f"row '{name}': the cells ran {', '.join(f'{v} (seed {s})' for s, v in sorted(off.items()))} client "
                f"optimizer steps, not the planned {planned}: the plan counts every client as holding an equal "
                "share of the training set (a partitioner with unequal clients, a dataset with fewer samples than "
                "num_train, or a run stopped early makes them differ)"
            )
        setting = setting_label(next(iter(runs.values())).config) if runs else MISSING
        stats = {m: interval(list(_values(runs, m).values()), confidence) for m in SWEEP_METRICS}
        protocol = json.dumps(dict(next(iter(runs.values())).protocol), sort_keys=True) if runs else "{}"
        if runs and len({json.dumps(dict(r.protocol), sort_keys=True) for r in runs.values()}) > 1:
            warnings.append(f"row '{name}': its cells were evaluated under different protocols; the first is shown")
        rows.append((SweepRow(name, setting, runs, tuple(missing), planned, realised, stats), protocol))
    if not any(row.runs for row, _ in rows):
        raise ReportError(f"the sweep in {path} has no finished cell yet: run `pchmr sweep` (it writes "
                          f"{PLAN_FILE} first), or pass --include-unfinished")  # fmt: skip
    by_protocol: dict[str, list[SweepRow]] = {}
    for row, protocol in rows:
        if row.runs:
            by_protocol.setdefault(protocol, []).append(row)
    if len(by_protocol) > 1:
        warnings.append(f"the rows use {len(by_protocol)} different evaluation protocols and are shown in separate "
                        "tables, never in one column")  # fmt: skip
    tables = []
    for protocol, members in by_protocol.items():
        base = next((r for r in members if r.name == chosen), None)
        if chosen is not None and base is None:
            warnings += [f"row '{r.name}' has no paired difference: baseline '{chosen}' was evaluated under another "
                         "protocol (or has no finished cell)" for r in members]  # fmt: skip
        if base is not None:
            members = [_with_difference(r, base, confidence, warnings) if r is not base else r for r in members]
        tables.append(SweepTable(json.loads(protocol), tuple(members), chosen if base is not None else None))
    return SweepReport(path, plan, chosen, tuple(tables), tuple(warnings), confidence)


def _values(runs: Mapping[int, RunSummary], metric: str) -> dict[int, float]:
    return {seed: v for seed, run in runs.items() if (v := run.metric(metric)) is not None}


def _with_difference(row: SweepRow, base: SweepRow, confidence: float, warnings: list[str]) -> SweepRow:
    difference = {m: paired_difference(row.values(m), base.values(m), confidence) for m in SWEEP_METRICS}
    paired = difference["mpjpe_mm"][1]
    unpaired = sorted(set(row.runs) ^ set(base.runs))
    if unpaired:
        warnings.append(f"row '{row.name}' vs baseline '{base.name}': seed{'s' if len(unpaired) > 1 else ''} "
                        f"{', '.join(map(str, unpaired))} finished on one side only and {'are' if len(unpaired) > 1 else 'is'} "
                        f"left out of the paired difference (pairs: {len(paired)})")  # fmt: skip
    return SweepRow(row.name, row.setting, row.runs, row.missing, row.planned_steps, row.realised_steps, row.stats,
                    difference)  # fmt: skip


# --------------------------------------------------------------------------------------
# renderers
# --------------------------------------------------------------------------------------
def _percent(report: SweepReport) -> str:
    return f"{report.confidence * 100:g} %"


def sweep_notes(report: SweepReport) -> list[str]:
    """What the cells hold, the budget and the marks, one line each (every rendering ends with them)."""
    notes = [
        f"cells: final evaluated round (baselines: epoch) of each seed; mean ± half-width of the {_percent(report)} "
        "confidence interval by Student's t with n − 1 degrees of freedom over the n seeds (n = 1: the value alone, "
        "no interval); lower is better for the mm metrics, higher for PCK",
    ]
    budget = report.plan.get("budget")
    if budget:
        notes.append(f"matched budget: {budget.get('explain')} (knob: {budget.get('knob')}; baseline rows: epochs)")
    else:
        notes.append("no matched budget: the rows ran as written (see the client steps column)")
    if report.baseline is not None:
        notes.append(
            f"Δ: paired difference row − {report.baseline}, per seed (the same seed draws the same partition, client "
            f"sampling and initialisation), with its own t-interval; {EXCLUDES_ZERO} the {_percent(report)} interval "
            "excludes 0"
        )
    if any(row.unfinished for t in report.tables for row in t.rows):
        notes.append(f"{UNFINISHED_MARK} includes an unfinished cell (its last evaluated round)")
    return notes


def _row_label(row: SweepRow, table: SweepTable) -> str:
    label = row.name + (" (baseline)" if row.name == table.baseline else "")
    return label + (UNFINISHED_MARK if row.unfinished else "")


def main_rows(table: SweepTable) -> list[list[str]]:
    """The cells of ``table``'s rows under :data:`MAIN_HEADER`."""
    return [[_row_label(row, table), row.setting, str(row.n), row.steps_text,
             *(_metric_text(row.stats[m], m) for m in SWEEP_METRICS)] for row in table.rows]  # fmt: skip


MAIN_HEADER = ("row", "setting", "n", "client steps", *SWEEP_METRICS.values())
DIFF_HEADER = ("row", "pairs", *(f"Δ {title}" for title in SWEEP_METRICS.values()))


def _diff_text(stat: Interval, metric: str) -> str:
    text = _metric_text(stat, metric, signed=True)
    return text + EXCLUDES_ZERO if stat.excludes_zero else text


def diff_rows(table: SweepTable) -> list[list[str]]:
    """The paired differences of ``table``'s rows under :data:`DIFF_HEADER` (none without a baseline)."""
    out = []
    for row in table.rows:
        if row.difference is None:
            continue
        pairs = len(row.difference["mpjpe_mm"][1])
        out.append([row.name, str(pairs), *(_diff_text(row.difference[m][0], m) for m in SWEEP_METRICS)])
    return out


def to_rich(report: SweepReport) -> list[Any]:
    """rich renderables: per protocol the rows' table and, with a baseline, the differences; then
    warnings and notes."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    for table in report.tables:
        t = Table(title=f"sweep {report.path.name} · protocol: {table.protocol_label}", title_justify="left",
                  caption=f"mean ± {_percent(report)} CI over seeds (Student's t, n − 1 dof)")  # fmt: skip
        for i, header in enumerate(MAIN_HEADER):
            t.add_column(header, justify="left" if i < 2 else "right", style="bold" if i == 0 else None)
        for cells in main_rows(table):
            t.add_row(*cells)
        out.append(t)
        diffs = diff_rows(table)
        if diffs:
            d = Table(title=f"paired difference vs {table.baseline} (row − {table.baseline}, matched by seed)",
                      title_justify="left",
                      caption=f"{EXCLUDES_ZERO}: the {_percent(report)} interval excludes 0")  # fmt: skip
            for i, header in enumerate(DIFF_HEADER):
                d.add_column(header, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
            for cells in diffs:
                d.add_row(*cells)
            out.append(d)
    out += [Text(f"warning: {w}", style="yellow") for w in report.warnings]
    out += [Text(n, style="dim") for n in sweep_notes(report)]
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "---|" * left + "---:|" * (len(header) - left)]  # fmt: skip
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(report: SweepReport) -> str:
    """Per protocol: a ``**Protocol:**`` line, the rows' table and, with a baseline, the
    differences' table; warnings as quotes; the method as notes."""
    lines: list[str] = []
    for table in report.tables:
        lines += [f"**Protocol:** {_md(table.protocol_label)}", ""]
        lines += _md_table(MAIN_HEADER, main_rows(table), 2)
        lines.append("")
        diffs = diff_rows(table)
        if diffs:
            lines += [f"**Paired difference vs {_md(str(table.baseline))}** (row − {_md(str(table.baseline))}, "
                      f"matched by seed; {_md(EXCLUDES_ZERO)} the {_percent(report)} interval excludes 0)", ""]  # fmt: skip
            lines += _md_table(DIFF_HEADER, diffs, 1)
            lines.append("")
    lines += [f"> **Warning:** {_md(w)}" for w in report.warnings]
    if report.warnings:
        lines.append("")
    lines += [f"_{_md(n)}_" for n in sweep_notes(report)]
    return "\n".join(lines) + "\n"


def report_dict(report: SweepReport) -> dict[str, Any]:
    """Everything of :func:`to_json` as a dict."""
    tables = []
    for table in report.tables:
        rows = []
        for row in table.rows:
            entry: dict[str, Any] = {
                "row": row.name,
                "setting": row.setting,
                "n": row.n,
                "seeds": sorted(row.runs),
                "missing_seeds": list(row.missing),
                "unfinished_seeds": sorted(s for s, r in row.runs.items() if not r.finished),
                "planned_steps": row.planned_steps,
                "realised_steps": {str(s): v for s, v in sorted(row.realised_steps.items())},
                "runs": {str(s): str(r.path) for s, r in sorted(row.runs.items())},
                "metrics": {
                    m: row.stats[m].as_dict() | {"by_seed": {str(s): v for s, v in sorted(row.values(m).items())}}
                    for m in SWEEP_METRICS
                },
            }
            if row.difference is not None:
                entry["difference"] = {
                    "baseline": table.baseline,
                    "metrics": {
                        m: stat.as_dict() | {"seeds": list(seeds), "excludes_zero": stat.excludes_zero}
                        for m, (stat, seeds) in row.difference.items()
                    },
                }
            rows.append(entry)
        tables.append({"protocol": dict(table.protocol), "protocol_label": table.protocol_label,
                       "baseline": table.baseline, "rows": rows})  # fmt: skip
    return {
        "sweep": str(report.path),
        "sweep_file": report.plan.get("sweep_file"),
        "scale": report.plan.get("scale"),
        "seeds": report.seeds,
        "budget": report.plan.get("budget"),
        "baseline": report.baseline,
        "values": "final evaluated round of each cell",
        "interval": {
            "confidence": report.confidence,
            "method": "Student's t, n − 1 degrees of freedom, over seeds; "
            "paired differences: the same over per-seed differences row − baseline",
        },
        "units": {m: ("fraction of joints within 150 mm" if m == "pck" else "mm") for m in SWEEP_METRICS},
        "tables": tables,
        "warnings": list(report.warnings),
    }


def to_json(report: SweepReport) -> str:
    return json.dumps(report_dict(report), indent=2) + "\n"


CSV_HEADER = ("protocol", "row", "setting", "metric", "n", "mean", "std", "ci_low", "ci_high", "baseline", "pairs",
              "diff_mean", "diff_ci_low", "diff_ci_high", "diff_excludes_zero", "planned_steps", "seeds")  # fmt: skip


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def to_csv(report: SweepReport) -> str:
    """Long format: one line per row and metric, with the interval and (with a baseline) the
    paired difference's."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for table in report.tables:
        for row in table.rows:
            for metric in SWEEP_METRICS:
                s = row.stats[metric]
                diff = row.difference[metric] if row.difference is not None else None
                d = diff[0] if diff else None
                writer.writerow([table.protocol_label, row.name, row.setting, metric, s.n, _num(s.mean), _num(s.std),
                                 _num(s.low), _num(s.high), table.baseline or "", len(diff[1]) if diff else "",
                                 _num(d.mean if d else None), _num(d.low if d else None), _num(d.high if d else None),
                                 "" if d is None else int(d.excludes_zero),
                                 "" if row.planned_steps is None else row.planned_steps,
                                 ";".join(map(str, sorted(row.runs)))])  # fmt: skip
    return buf.getvalue()


def to_latex(report: SweepReport) -> str:
    """Per protocol a booktabs table of the rows and, with a baseline, one of the differences."""
    blocks = []
    for table in report.tables:
        specs = [(MAIN_HEADER, main_rows(table), 2, f"Mean $\\pm$ {_percent(report)} confidence interval over seeds "
                  "(Student's t, n$-$1 dof)")]  # fmt: skip
        diffs = diff_rows(table)
        if diffs:
            specs.append((DIFF_HEADER, diffs, 1, f"Paired difference row $-$ {latex_escape(str(table.baseline))} "
                          f"matched by seed; {EXCLUDES_ZERO}: the interval excludes 0"))  # fmt: skip
        for header, rows, left, caption in specs:
            lines = [r"\begin{table}[t]", r"\centering",
                     r"\begin{tabular}{" + "l" * left + "r" * (len(header) - left) + "}", r"\toprule",
                     " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]  # fmt: skip
            lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
            lines += [r"\bottomrule", r"\end{tabular}",
                      r"\caption{" + caption + ". Protocol: " + latex_escape(table.protocol_label) + ".}",
                      r"\end{table}"]  # fmt: skip
            blocks.append("\n".join(lines))
    out = "\n\n".join(blocks) + "\n"
    return "".join(f"% warning: {w}\n" for w in report.warnings) + out
