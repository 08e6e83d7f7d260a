"""``pchmr report RUN...``: result tables and a convergence plot from run directories.

Registered on the app in :mod:`pchmr.cli.app` with ``app.command()(report)``. A RUN may also be
a directory of run directories (``pchmr report runs/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pchmr.cli._output import console as _console
from pchmr.cli._output import fail as _fail
from pchmr.report.convergence import CONVERGENCE_METRICS, plot_convergence
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
    runs: list[Path] = typer.Argument(..., help="Run directories (or directories holding run directories)."),
    group_by: str = typer.Option("setting-model", "--group-by", help=f"Rows × model columns: {', '.join(GROUP_BY)}."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Directory for report.md/.csv/.tex, convergence.png (and report.json with --formats json)."
    ),
    formats: str = typer.Option(
        "md,csv,tex,png", "--formats", help=f"Files to write with --out: {', '.join(FORMATS)}."
    ),
    metric: str = typer.Option(
        "pa_mpjpe_mm", "--metric", help=f"Metric of the convergence plot: {', '.join(CONVERGENCE_METRICS)}."
    ),
    include_unfinished: bool = typer.Option(
        False, "--include-unfinished", help="Report runs without final.json at their last evaluated round (marked *)."
    ),
) -> None:
    """Tables (MPJPE / PA-MPJPE / MPVPE, mean ± std over seeds, one per protocol; each model's final and best
    round side by side) and a convergence plot of runs."""
    if group_by not in GROUP_BY:
        raise _fail(f"unknown --group-by '{group_by}'; choose one of: {', '.join(GROUP_BY)}")
    if metric not in CONVERGENCE_METRICS:
        raise _fail(f"unknown --metric '{metric}'; choose one of: {', '.join(CONVERGENCE_METRICS)}")
    chosen = _parse_formats(formats)
    try:
        summaries = _load(runs, include_unfinished)
        result = build_report(summaries, group_by)
    except ReportError as exc:
        raise _fail(str(exc)) from exc
    for renderable in to_rich(result):
        _console.print(renderable)
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    writers = {"md": to_markdown, "csv": to_csv, "tex": to_latex, "json": to_json}
    for fmt in chosen:
        target = out / FORMATS[fmt]
        if fmt == "png":
            try:
                plot_convergence(summaries, target, metric)
            except ReportError as exc:
                raise _fail(str(exc)) from exc
        else:
            target.write_text(writers[fmt](result))
        _console.print(f"wrote {target}", highlight=False)
