"""``pchmr sweep SWEEP.toml --out DIR``: rows × seeds at a matched budget, run resumably.

Registered on the app in :mod:`pchmr.cli.app` with ``app.command(name="sweep")(sweep)``. The plan
(:func:`pchmr.core.engine.sweep.load_sweep`) is printed first: each row's setting, the knob the
budget set and its client optimizer steps. Every (row, seed) cell is then a run directory
``DIR/ROW/seed-S`` made by the engine ``pchmr run`` uses; finished cells are skipped, a started one
resumes from its last checkpoint, a failed one is recorded and the others still run.
``DIR/sweep.json`` holds the plan and the cells' states; ``pchmr report DIR`` reports it.

Exit codes: 2 for a sweep file or directory refused before anything ran (naming the row, key or
cell), 1 when a cell failed (all of them named), 130 when interrupted.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pchmr.cli._output import RUN_FAILED, console, exit_interrupted
from pchmr.cli._output import fail as _fail
from pchmr.core.engine.config import ConfigError
from pchmr.core.engine.sweep import LOG_FILE, PLAN_FILE, CellOutcome, SweepPlan, check_cells, load_sweep
from pchmr.report.tables import setting_label

__all__ = ["sweep"]


def sweep(
    sweep_file: Path = typer.Argument(
        ..., help="Sweep file (TOML): base, rows, seeds, budget (docs/sweep.md); or a packaged one, sweeps:NAME."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Sweep directory: one run directory per cell, DIR/ROW/seed-S, and sweep.json."
    ),
    scale: Optional[str] = typer.Option(
        None,
        "--scale",
        help="Apply \\[scale.NAME] of the sweep file and of every config file it names that has one (e.g. cpu).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (cells, budgets, what would run) and stop."),
) -> None:
    """Run every row × seed of a sweep file at a matched budget, skipping finished cells."""
    from pchmr.core.engine.registry import PluginError

    if out is None and not dry_run:
        raise _fail("--out DIR is required: the sweep directory holding every cell's run directory and sweep.json")
    if out is not None and out.exists() and not out.is_dir():
        raise _fail(f"--out {out} exists and is not a directory")
    try:
        plan = load_sweep(sweep_file, scale=scale)
        states = check_cells(plan, out) if out is not None else {}
    except (ConfigError, PluginError) as exc:
        raise _fail(str(exc)) from None
    _print_plan(plan, states)
    if dry_run:
        return
    assert out is not None
    rerun = " ".join(["pchmr sweep", shlex.quote(str(sweep_file)), "--out", shlex.quote(str(out)),
                      *(["--scale", shlex.quote(scale)] if scale else [])])  # fmt: skip
    try:
        outcomes = _run_with_progress(plan, out)
    except KeyboardInterrupt:
        console.print(
            f"interrupted; `{rerun}` continues the sweep (finished cells are skipped, the interrupted one "
            "resumes from its last checkpoint)",
            highlight=False,
        )
        raise exit_interrupted() from None
    except (ConfigError, PluginError) as exc:
        raise _fail(str(exc)) from None
    _print_summary(outcomes, out)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        names = "; ".join(f"{o.cell.name} ({o.error})" for o in failed)
        raise _fail(
            f"{len(failed)} of {len(outcomes)} cells failed: {names}. Tracebacks: {out / LOG_FILE}. "
            f"`{rerun}` retries them (finished cells are skipped)",
            code=RUN_FAILED,
        )


def _print_plan(plan: SweepPlan, states: dict[Any, str]) -> None:
    table = Table(title=f"sweep {plan.source.name}" + (f" at scale {plan.scale}" if plan.scale else ""),
                  title_justify="left")  # fmt: skip
    table.add_column("row", style="bold")
    table.add_column("setting")
    table.add_column("length", justify="right")
    table.add_column("client optimizer steps", justify="right")
    table.add_column("how they are counted")
    for row in plan.rows:
        knob = row.knob or ("rounds" if row.unit == "round" else "epochs")
        length = f"{knob} = {getattr(row.config, knob)}"
        name = row.name + (" (baseline)" if row.name == plan.baseline else "")
        steps = "?" if row.steps is None else str(row.steps)
        table.add_row(escape(name), escape(setting_label(row.config)), length, steps, escape(row.explain))
    console.print(table)
    if plan.description:
        console.print(escape(plan.description), highlight=False, soft_wrap=True)
    budget = plan.budget
    if budget is None:
        console.print("budget: none — every row runs as written (no [budget] table)", highlight=False)
    else:
        knob = f"knob: {budget.knob} (baseline rows: epochs)"
        console.print(f"budget: {budget.explain}; {knob}", highlight=False, soft_wrap=True)
    cells = len(plan.cells)
    line = f"{len(plan.rows)} rows × {len(plan.seeds)} seeds {list(plan.seeds)} = {cells} cells"
    if states:
        counts = {s: sum(1 for v in states.values() if v == s) for s in ("finished", "resume", "new")}
        line += (f": {counts['finished']} finished (skipped), {counts['resume']} to resume, "
                 f"{counts['new']} to run")  # fmt: skip
    console.print(line, highlight=False)


def _run_with_progress(plan: SweepPlan, out: Path) -> list[CellOutcome]:
    from pchmr.core.engine.federation.common import route_flower_logs
    from pchmr.core.engine.sweep import run_sweep

    route_flower_logs()
    progress = Progress(
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    cells_task = progress.add_task("[bold]cells", total=len(plan.cells), status="")
    cell_task = progress.add_task("cell", total=1, status="", visible=False)

    def on_cell(cell: Any, state: str) -> None:
        verb = {"finished": "skipping", "resume": "resuming", "new": "running"}[state]
        progress.update(cells_task, status=f"{verb} {cell.name}")
        if state != "finished":
            row = plan.row(cell.row)
            total = getattr(row.config, "rounds" if row.unit == "round" else "epochs")
            progress.reset(cell_task, total=total, visible=True, status="starting")
            progress.update(cell_task, description=f"  {cell.name} {row.unit}")

    def on_round(report: Any) -> None:
        status = f"{report.seconds:5.1f} s"
        if report.metrics:
            status += f"  MPJPE {report.metrics['mpjpe_mm']:.1f}  PA-MPJPE {report.metrics['pa_mpjpe_mm']:.1f}"
        progress.update(cell_task, completed=report.server_round, total=report.num_rounds, status=status)

    def on_status(message: str) -> None:
        progress.update(cell_task, status=message[:60])

    def on_done(outcome: CellOutcome) -> None:
        progress.update(cell_task, visible=False)
        progress.advance(cells_task)
        name = escape(outcome.cell.name)
        if outcome.status == "failed":
            progress.console.print(
                f"[red]✗[/] {name} failed after {outcome.seconds:.0f} s: {escape(str(outcome.error))}"
            )
        elif outcome.status == "skipped":
            progress.console.print(f"[dim]· {name} finished before: skipped[/]")
        else:
            progress.console.print(f"[green]✓[/] {name} {_numbers(outcome.final)}  ({outcome.seconds:.0f} s)")

    with progress:
        return run_sweep(plan, out, on_cell=on_cell, on_done=on_done, on_round=on_round, on_status=on_status)


def _numbers(final: Any) -> str:
    if not final:
        return ""
    return (
        "MPJPE / PA-MPJPE / MPVPE "
        + " / ".join(f"{final[k]:.1f}" for k in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm"))
        + " mm"
    )


def _cells(n: int) -> str:
    return f"{n} cell{'' if n == 1 else 's'}"


def _print_summary(outcomes: list[CellOutcome], out: Path) -> None:
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("finished", "skipped", "failed")}
    console.print(
        f"{_cells(counts['finished'])} run, {counts['skipped']} skipped (finished before), {counts['failed']} failed; "
        f"plan and states: {out / PLAN_FILE}; report: pchmr report {out}",
        highlight=False,
        soft_wrap=True,
    )
