"""``pchmr report RUN...``: result tables and a convergence plot from run directories.

Registered on the app in :mod:`pchmr.cli.app` with ``app.command()(report)``. A RUN may also be
a directory of run directories (``pchmr report runs/``), or a sweep directory (``pchmr sweep``'s
``--out``, holding ``sweep.json``), reported alone: per row and metric the mean ± 95 % confidence
interval over seeds and, against ``--baseline ROW`` (default: the sweep file's ``baseline``), the
paired per-seed difference (:mod:`pchmr.report.sweep`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from pchmr.cli._options import check_number
from pchmr.cli._outdir import OVERWRITE_HELP, check_out_dir, output_dir
from pchmr.cli._output import RUN_FAILED
from pchmr.cli._output import console as _console
from pchmr.cli._output import fail as _fail
from pchmr.core.kit.atomic import WriteError, write_bytes_atomic
from pchmr.report.alpha import ALPHA_METRICS, alpha_data, plot_alpha
from pchmr.report.convergence import CONVERGENCE_METRICS, plot_convergence
from pchmr.report.predictions import GRID_SAMPLES, PredictionGrid, plot_grid, prediction_grid
from pchmr.report.sweep import is_sweep_dir
from pchmr.report.tables import (
    GROUP_BY,
    ReportError,
    RunSummary,
    build_report,
    find_runs,
    footnotes,
    load_run,
    repetition_groups,
    to_csv,
    to_json,
    to_latex,
    to_markdown,
    to_rich,
)

__all__ = ["FORMATS", "HTML_FILE", "report"]

#: --formats value → file written into --out.
FORMATS = {"md": "report.md", "csv": "report.csv", "tex": "report.tex", "png": "convergence.png", "json": "report.json",
           "alpha": "metric_vs_alpha.png", "grid": "predictions.png"}  # fmt: skip
#: The page --html writes into its directory.
HTML_FILE = "index.html"
#: --formats when not given: run directories, a sweep directory.
DEFAULT_FORMATS = "md,csv,tex,png"
DEFAULT_SWEEP_FORMATS = "md,json,csv,tex,png"
_PNG_FORMATS = ("png", "alpha", "grid")


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


@dataclass
class _Result:
    """What one report shows, whatever its source (run directories or a sweep)."""

    runs: list[RunSummary]
    writers: dict[str, Callable[[Any], str]]
    result: Any
    title: str
    blocks: list[Any]
    warnings: list[str]
    notes: list[str]
    figures: dict[str, bytes] = field(default_factory=dict)


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
        help=f"Files to write with --out: {', '.join(FORMATS)} (default {DEFAULT_FORMATS}; a sweep also json). alpha: "
        "MPJPE and PA-MPJPE against the LDA α (runs at 2 or more α values needed); grid: test images with each "
        "run's predicted mesh and the ground truth (reads every run's model.pt and the test data).",
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
    html: Optional[Path] = typer.Option(
        None,
        "--html",
        metavar="DIR",
        help=f"Write DIR/{HTML_FILE}: one self-contained page (the tables with their protocols, the convergence and "
        "metric-vs-α plots, the prediction grid, every run's config); no server, nothing loaded from elsewhere.",
    ),
    grid_samples: int = typer.Option(
        GRID_SAMPLES,
        "--grid-samples",
        help="Test images per run in the prediction grid (--formats grid and --html; 0 leaves it out of --html).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP.replace("--out", "--out or --html")),
) -> None:
    """Tables (MPJPE / PA-MPJPE / MPVPE, mean ± std over seeds, one per protocol; each model's final and best
    round side by side) and a convergence plot of runs; for a sweep directory, mean ± 95 % CI per row and paired
    differences against a baseline row. With --html, all of it on one static page."""
    if out is not None:
        check_out_dir(out, overwrite)  # before any run is read
    if html is not None:
        check_out_dir(html, overwrite, "--html")
    if metric not in CONVERGENCE_METRICS:
        raise _fail(f"unknown --metric '{metric}'; choose one of: {', '.join(CONVERGENCE_METRICS)}")
    problem = check_number("--grid-samples", grid_samples, 0, whole=True)
    if problem or isinstance(grid_samples, bool):
        raise _fail(problem or f"--grid-samples must be a whole number >= 0, got {grid_samples}")
    sweeps = [p for p in runs if is_sweep_dir(p)]
    if sweeps:
        if len(runs) > 1:
            raise _fail(
                f"{sweeps[0]} is a sweep directory (it holds sweep.json): report it alone, not with {len(runs) - 1} other path(s)"
            )
        if group_by is not None:
            raise _fail("--group-by groups run directories; a sweep directory's rows are the sweep file's rows")
        chosen = _parse_formats(formats or DEFAULT_SWEEP_FORMATS)
        shown = _sweep_result(sweeps[0], baseline, include_unfinished)
    else:
        if baseline is not None:
            raise _fail(
                "--baseline names a row of a sweep directory (one holding sweep.json, written by `pchmr sweep`)"
            )
        group_by = group_by or "setting-model"
        if group_by not in GROUP_BY:
            raise _fail(f"unknown --group-by '{group_by}'; choose one of: {', '.join(GROUP_BY)}")
        chosen = _parse_formats(formats or DEFAULT_FORMATS)
        shown = _runs_result(runs, group_by, include_unfinished)
    if "grid" in chosen and out is not None and grid_samples < 1:
        raise _fail(f"--formats grid draws --grid-samples test images per run: give 1 or more, got {grid_samples}")
    for renderable in shown.writers["rich"](shown.result):
        _console.print(renderable)
    files: dict[Path, bytes] = {}
    grid: list[PredictionGrid | ReportError] = []  # drawn once, when first needed
    if out is not None:
        for fmt in chosen:
            if fmt in _PNG_FORMATS:
                try:
                    files[out / FORMATS[fmt]] = _png(fmt, shown, metric, grid_samples, grid)
                except ReportError as exc:
                    raise _fail(f"{FORMATS[fmt]}: {exc}") from None
            else:
                files[out / FORMATS[fmt]] = shown.writers[fmt](shown.result).encode()
    if html is not None:
        files[html / HTML_FILE] = _page(shown, metric, grid_samples, grid).encode()
    if files:
        _write(files, [(d, flag) for d, flag in ((out, "--out"), (html, "--html")) if d is not None], overwrite)


def _runs_result(paths: list[Path], group_by: str, include_unfinished: bool) -> _Result:
    from pchmr.report.html import report_blocks, report_title

    try:
        summaries = _load(paths, include_unfinished)
        result = build_report(summaries, group_by)
    except ReportError as exc:
        raise _fail(str(exc)) from exc
    writers = {"rich": to_rich, "md": to_markdown, "csv": to_csv, "tex": to_latex, "json": to_json}
    return _Result(summaries, writers, result, report_title([r.path for r in summaries]), report_blocks(result),
                   list(result.warnings), footnotes(result))  # fmt: skip


def _sweep_result(path: Path, baseline: str | None, include_unfinished: bool) -> _Result:
    from pchmr.report import sweep as sweep_report
    from pchmr.report.html import sweep_blocks

    try:
        result = sweep_report.load_sweep_report(path, baseline=baseline, include_unfinished=include_unfinished)
    except ReportError as exc:
        raise _fail(str(exc)) from None
    writers = {"rich": sweep_report.to_rich, "md": sweep_report.to_markdown, "csv": sweep_report.to_csv,
               "tex": sweep_report.to_latex, "json": sweep_report.to_json}  # fmt: skip
    return _Result(list(result.runs), writers, result, f"pchmr sweep report · {path}", sweep_blocks(result),
                   list(result.warnings), sweep_report.sweep_notes(result))  # fmt: skip


def _render(draw: Callable[[Path], Any]) -> bytes:
    """A figure drawn to a temporary file and read back: written later with the other files, atomically."""
    with tempfile.TemporaryDirectory(prefix="pchmr-report-") as tmp:
        target = Path(tmp) / "figure.png"
        draw(target)
        return target.read_bytes()


def _grid(shown: _Result, samples: int, cache: list[PredictionGrid | ReportError]) -> PredictionGrid:
    """The prediction grid, drawn once per command (it loads every run's model and the test data)."""
    if not cache:
        _console.print(f"prediction grid: {samples} test images per run, reading the runs' models …", highlight=False)
        try:
            cache.append(prediction_grid(shown.runs, samples))
        except ReportError as exc:
            cache.append(exc)
    found = cache[0]
    if isinstance(found, ReportError):
        raise found
    return found


def _png(fmt: str, shown: _Result, metric: str, samples: int, cache: list[PredictionGrid | ReportError]) -> bytes:
    """The PNG of ``--formats`` value ``fmt``: ``png`` (convergence), ``alpha`` or ``grid``."""
    if fmt in shown.figures:
        return shown.figures[fmt]
    if fmt == "png":
        data = _render(lambda target: plot_convergence(shown.runs, target, metric))
    elif fmt == "alpha":
        data = _render(lambda target: plot_alpha(shown.runs, target))
    else:
        grid = _grid(shown, samples, cache)
        data = _render(lambda target: plot_grid(grid, target))
    shown.figures[fmt] = data
    return data


def _page(shown: _Result, metric: str, samples: int, cache: list[PredictionGrid | ReportError]) -> str:
    """The --html page: tables, then each figure, or the reason it was not drawn."""
    from pchmr.report.alpha import VIEW_TEXT
    from pchmr.report.html import PageFigure, render_html
    from pchmr.report.stats import CONFIDENCE

    def attempt(fmt: str) -> tuple[bytes | None, str]:
        try:
            return _png(fmt, shown, metric, samples, cache), ""
        except ReportError as exc:
            return None, str(exc)

    ci = f"{CONFIDENCE * 100:g} %"
    png, why = attempt("png")
    caption = (f"{CONVERGENCE_METRICS[metric]} of every run per evaluated round (federated) or epoch (baselines), "
               "one row of panels per protocol.")  # fmt: skip
    if any(len(group) > 1 for group in repetition_groups(shown.runs)):
        caption += f" Runs repeated over seeds: their mean with a shaded {ci} confidence band (Student's t)."
    figures = [PageFigure("convergence", "Convergence", png, f"{CONVERGENCE_METRICS[metric]} against rounds and epochs",
                          caption, why)]  # fmt: skip
    data = alpha_data(shown.runs, next(iter(ALPHA_METRICS)))
    png, why = attempt("alpha")
    caption = (f"Mean over seeds of the {VIEW_TEXT[data.view]} per α (log axis), bars: {ci} confidence interval "
               "(Student's t; one seed: no bar).")  # fmt: skip
    if data.references:
        caption += " Dashed: centralized runs of the same protocol and model, for reference."
    left_out = [f"not on the plot: {n}" for n in data.left_out] if png else []
    figures.append(PageFigure("alpha", "Metric vs LDA α", png, "MPJPE and PA-MPJPE against the LDA α of the partition",
                              caption, why, left_out))  # fmt: skip
    if samples >= 1:
        png, why = attempt("grid")
        grid = cache[0] if cache and isinstance(cache[0], PredictionGrid) else None
        notes = [*grid.notes, *(f"not shown: {n}" for n in grid.left_out)] if grid is not None else []
        figures.append(PageFigure("predictions", "Predictions", png, "test images with predicted and ground-truth meshes",
                                  "Each run's predicted mesh (blue) over the same test images and its side view, "
                                  "beside the ground truth (orange), with that image's MPJPE and PA-MPJPE.", why,
                                  notes))  # fmt: skip
    subtitle = f"{len(shown.runs)} run(s); written by pchmr {_version()}; every number is labelled with its protocol"
    return render_html(title=shown.title, runs=shown.runs, blocks=shown.blocks, figures=figures,
                       warnings=shown.warnings, notes=shown.notes, subtitle=subtitle)  # fmt: skip


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pchmr")
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def _write(files: dict[Path, bytes], dirs: Sequence[tuple[Path, str]], overwrite: bool) -> None:
    """Write ``files`` into their directories, ``dirs`` as (path, flag) (:func:`~pchmr.cli._outdir.output_dir`:
    each refused when it is not empty without ``--overwrite``, and removed again when this call made it
    and a write fails; an outer directory is entered before one inside it), each file atomically."""
    unique = {d.resolve(): (d, flag) for d, flag in reversed(dirs)}  # --out and --html the same: once, as --out
    try:
        with ExitStack() as stack:
            for d, flag in sorted(unique.values(), key=lambda item: len(item[0].resolve().parts)):
                stack.enter_context(output_dir(d, overwrite, flag))
            for target, data in files.items():
                write_bytes_atomic(target, data)
                _console.print(f"wrote {target}", highlight=False)
    except WriteError as exc:
        raise _fail(str(exc), code=RUN_FAILED) from None
