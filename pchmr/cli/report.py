"""``pchmr report RUN...``: result tables and a convergence plot from run directories.

Registered on the app in :mod:`pchmr.cli.app` with ``app.command()(report)``. A RUN may also be
a directory of run directories (``pchmr report runs/``), or a sweep directory (``pchmr sweep``'s
``--out``, holding ``sweep.json``), reported alone: per row and metric the mean ± 95 % confidence
interval over seeds and, against ``--baseline ROW`` (default: the sweep file's ``baseline``), the
paired per-seed difference (:mod:`pchmr.report.sweep`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from pchmr.cli._outdir import OVERWRITE_HELP, check_out_dir, output_dir
from pchmr.cli._output import RUN_FAILED
from pchmr.cli._output import console as _console
from pchmr.cli._output import fail as _fail
from pchmr.core.kit.atomic import WriteError, write_text_atomic
from pchmr.report.convergence import CONVERGENCE_METRICS, plot_convergence
from pchmr.report.sweep import is_sweep_dir
from pchmr.report.tables import (
    GROUP_BY,
    ReportError,
    RunSummary,
    build_report,
    find_runs,
    load_run,
    to_csv,
    to_json,
    to_latex,
    to_markdown,
    to_rich,
)

__all__ = ["FORMATS", "report"]

#: --formats value → file written into --out.
FORMATS = {"md": "report.md", "csv": "report.csv", "tex": "report.tex", "png": "convergence.png", "json": "report.json"}
#: --formats when not given: run directories, a sweep directory.
DEFAULT_FORMATS = "md,csv,tex,png"
DEFAULT_SWEEP_FORMATS = "md,json,csv,tex,png"


def _parse_formats(formats: str) -> list[str]:
    chosen = [f.strip().lower().lstrip(".") for f in formats.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise _fail(f"--formats '{formats}' has unknown or no formats {unknown}; choose from: {', '.join(FORMATS)}")
    return list(dict.fromkeys(chosen))


def _load(paths: list[Path], include_unfinished: bool) -> list[RunSummary]:
    dirs: list[Path] = []
    for path in paths:
        dirs += find_runs(path)
    unique = list(dict.fromkeys(p.resolve() for p in dirs))
    return [load_run(p, include_unfinished=include_unfinished) for p in unique]


def report(
    runs: list[Path] = typer.Argument(
        ..., help="Run directories (or directories holding run directories), or one sweep directory."
    ),
    group_by: Optional[str] = typer.Option(
        None, "--group-by", help=f"Rows × model columns: {', '.join(GROUP_BY)} (default setting-model)."
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="Directory for report.md/.csv/.tex, convergence.png (report.json with --formats json; a sweep writes it by default).",
    ),
    formats: Optional[str] = typer.Option(
        None,
        "--formats",
        help=f"Files to write with --out: {', '.join(FORMATS)} (default {DEFAULT_FORMATS}; a sweep also json).",
    ),
    metric: str = typer.Option(
        "pa_mpjpe_mm", "--metric", help=f"Metric of the convergence plot: {', '.join(CONVERGENCE_METRICS)}."
    ),
    include_unfinished: bool = typer.Option(
        False, "--include-unfinished", help="Report runs without final.json at their last evaluated round (marked *)."
    ),
    baseline: Optional[str] = typer.Option(
        None,
        "--baseline",
        help="Sweep directory: the row every other row is compared with, per seed (default: the sweep file's baseline).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Tables (MPJPE / PA-MPJPE / MPVPE, mean ± std over seeds, one per protocol; each model's final and best
    round side by side) and a convergence plot of runs; for a sweep directory, mean ± 95 % CI per row and paired
    differences against a baseline row."""
    if out is not None:
        check_out_dir(out, overwrite)  # before any run is read
    if metric not in CONVERGENCE_METRICS:
        raise _fail(f"unknown --metric '{metric}'; choose one of: {', '.join(CONVERGENCE_METRICS)}")
    sweeps = [p for p in runs if is_sweep_dir(p)]
    if sweeps:
        if len(runs) > 1:
            raise _fail(
                f"{sweeps[0]} is a sweep directory (it holds sweep.json): report it alone, not with {len(runs) - 1} other path(s)"
            )
        if group_by is not None:
            raise _fail("--group-by groups run directories; a sweep directory's rows are the sweep file's rows")
        _report_sweep(sweeps[0], out, _parse_formats(formats or DEFAULT_SWEEP_FORMATS), metric,
                      include_unfinished, baseline, overwrite)  # fmt: skip
        return
    if baseline is not None:
        raise _fail("--baseline names a row of a sweep directory (one holding sweep.json, written by `pchmr sweep`)")
    group_by = group_by or "setting-model"
    if group_by not in GROUP_BY:
        raise _fail(f"unknown --group-by '{group_by}'; choose one of: {', '.join(GROUP_BY)}")
    chosen = _parse_formats(formats or DEFAULT_FORMATS)
    try:
        summaries = _load(runs, include_unfinished)
        result = build_report(summaries, group_by)
    except ReportError as exc:
        raise _fail(str(exc)) from exc
    for renderable in to_rich(result):
        _console.print(renderable)
    if out is None:
        return
    writers = {"md": to_markdown, "csv": to_csv, "tex": to_latex, "json": to_json}
    _write_report(out, overwrite, chosen, writers, result, lambda target: plot_convergence(summaries, target, metric))


def _write_report(out: Path, overwrite: bool, chosen: list[str], writers: dict[str, Any], result: Any,
                  plot: Callable[[Path], Any]) -> None:  # fmt: skip
    """Write the ``chosen`` formats into ``out`` (:func:`~pchmr.cli._outdir.output_dir`: refused when
    it is not empty without ``--overwrite``, removed again when this call made it and a write fails)."""
    try:
        with output_dir(out, overwrite):
            for fmt in chosen:
                target = out / FORMATS[fmt]
                if fmt == "png":
                    try:
                        plot(target)
                    except ReportError as exc:
                        raise _fail(str(exc)) from exc
                else:
                    write_text_atomic(target, writers[fmt](result))
                _console.print(f"wrote {target}", highlight=False)
    except WriteError as exc:
        raise _fail(str(exc), code=RUN_FAILED) from None


def _report_sweep(
    path: Path,
    out: Path | None,
    chosen: list[str],
    metric: str,
    include_unfinished: bool,
    baseline: str | None,
    overwrite: bool = False,
) -> None:
    from pchmr.report import sweep as sweep_report

    try:
        result = sweep_report.load_sweep_report(path, baseline=baseline, include_unfinished=include_unfinished)
    except ReportError as exc:
        raise _fail(str(exc)) from None
    for renderable in sweep_report.to_rich(result):
        _console.print(renderable)
    if out is None:
        return
    writers = {"md": sweep_report.to_markdown, "csv": sweep_report.to_csv, "tex": sweep_report.to_latex,
               "json": sweep_report.to_json}  # fmt: skip
    _write_report(out, overwrite, chosen, writers, result, lambda target: plot_convergence(result.runs, target, metric))
