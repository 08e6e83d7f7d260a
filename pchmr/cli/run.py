"""``pchmr run``: one experiment → a run directory.

Registered on the app in :mod:`pchmr.cli.app` with ``app.command(name="run")(run)``. Its flags are
``RunConfig``'s fields, each declared once in :mod:`pchmr.core.engine.config` with its help and how
the command line reads it (:mod:`pchmr.cli.config_flags` builds them); ``--config``, ``--scale`` and
``--resume`` are the command's own. A config file's values come first, flags win.

Exit codes: 2 for a refused configuration (bad value, unknown plugin, missing file), 1 for a run
that failed once started (diverged, too many clients failed), as ``run.log`` explains, 130 after
Ctrl-C (``interrupted; resume with `pchmr run --resume RUN_DIR```, no traceback).
"""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pchmr.cli._output import RUN_FAILED, console, err_console, exit_interrupted
from pchmr.cli._output import fail as _fail
from pchmr.cli.config_flags import GivenFlags, with_config_flags
from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file
from pchmr.core.engine.federation.common import route_flower_logs
from pchmr.core.kit.atomic import WriteError

__all__ = ["run"]


_METRIC_LABELS = {
    "mpjpe_mm": "MPJPE (mm)",
    "pa_mpjpe_mm": "PA-MPJPE (mm)",
    "mpvpe_mm": "MPVPE (mm)",
    "pck": "PCK@150mm",
}


@with_config_flags(RunConfig)
def run(
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="TOML or JSON file of options, or a packaged config (paper:NAME; pchmr configs list); flags override it.",
    ),
    scale: Optional[str] = typer.Option(
        None, "--scale", help="Apply the config file's \\[scale.NAME] overrides (e.g. smoke)."
    ),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    *,
    flags: GivenFlags,
) -> None:
    """Run one experiment and write its run directory."""
    from pchmr.core.engine.registry import PluginError
    from pchmr.core.engine.run import default_run_dir, execute, resume_config

    run_dir: Path | None = None
    try:
        if resume is not None:
            cfg = resume_config(resume)
            run_dir = resume
        else:
            if scale is not None and config is None:
                raise ConfigError("--scale needs --config: a scale is a table of overrides inside a config file")
            values = load_config_file(config, scale=scale) if config else {}
            cfg = RunConfig.from_dict(flags.over(values))
            run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        _run_with_progress(cfg, run_dir, resume is not None, execute)
    except KeyboardInterrupt:
        raise _interrupted(run_dir) from None
    except (ConfigError, PluginError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    except WriteError as exc:  # a full disk or a file system gone read-only: the files before it are whole
        raise _fail(str(exc), code=RUN_FAILED) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except (FloatingPointError, RuntimeError) as exc:  # the run failed (diverged, a client failed)
        raise _fail(f"{exc} (the run directory's run.log has the tracebacks)", code=RUN_FAILED) from None


def _interrupted(run_dir: Path | None) -> typer.Exit:
    """After Ctrl-C: the resume hint (the run directory when it holds a started run; nothing is
    half-written: every file a run resumes from is replaced atomically, a round is recorded whole
    or not at all) and exit code 130, without a traceback; a further Ctrl-C is ignored while the
    process exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if run_dir is not None and (run_dir / "config.json").is_file():
        hint = f"interrupted; resume with `pchmr run --resume {shlex.quote(str(run_dir))}`"
    else:
        hint = "interrupted before the run started: nothing to resume"
    err_console.print(hint, highlight=False, soft_wrap=True)
    return exit_interrupted()


def _run_with_progress(cfg: RunConfig, run_dir: Path | None, resume: bool, execute: Any) -> None:
    """Run ``execute`` (:func:`pchmr.core.engine.run.execute`) under a progress bar of rounds
    (baselines: epochs), then print the final table."""
    route_flower_logs()
    progress = Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    unit, total = ("round", cfg.rounds) if cfg.mode == "federated" else ("epoch", cfg.epochs)
    progress.columns[0].text_format = f"[bold]{unit}"  # type: ignore[attr-defined]
    task = progress.add_task("rounds", total=total, status="starting")
    started = False

    def start() -> None:  # on the run's first word: a refusal before it shows no progress bar
        nonlocal started
        if not started:
            progress.start()
            started = True

    def on_round(report: Any) -> None:
        start()
        status = f"{report.seconds:5.1f} s"
        if report.metrics:
            status += "  " + "  ".join(
                f"{_METRIC_LABELS[k].split(' ')[0]} {report.metrics[k]:.1f}"
                for k in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm")
            )
        failures = getattr(report, "failures", None)
        if failures:
            failed = ", ".join(str(f["partition"]) for f in failures[:8]) + ("…" if len(failures) > 8 else "")
            status += f"  [yellow]{len(failures)} of {len(report.sampled)} failed (partition {failed})[/]"
        progress.update(task, completed=report.server_round, status=status)

    def on_status(message: str) -> None:
        start()
        progress.console.print(f"[dim]{message}[/]")

    try:
        result = execute(cfg, run_dir=run_dir, resume=resume, on_round=on_round, on_status=on_status)
    finally:
        progress.stop()
    _print_final(result.final, result.run_dir.path, result.seconds)


def _print_final(final: dict[str, Any], path: Path, seconds: float) -> None:
    """The table of ``final.json``: round 0, final and mean-pose baseline per metric."""
    proto = final["protocol"]
    table = Table(
        title=f"Global model after {final.get('unit', 'round')} {final['round']}",
        caption=(
            f"protocol: {proto['dataset']} test · joints {proto['joint_set']} · {proto['alignment']} aligned · "
            f"body model {proto['body_model']} · {proto['ground_truth']} GT · PCK at 150 mm"
        ),
    )
    table.add_column("metric")
    table.add_column(f"{final.get('unit', 'round')} 0", justify="right")
    table.add_column("final", justify="right")
    table.add_column("mean-pose baseline", justify="right")
    baseline = {"mpjpe_mm": final.get("mean_pose_mpjpe_mm"), "pa_mpjpe_mm": final.get("mean_pose_pa_mpjpe_mm")}
    for key, label in _METRIC_LABELS.items():
        fmt = "{:.3f}" if key == "pck" else "{:.1f}"
        base = baseline.get(key)
        table.add_row(
            label, fmt.format(final["round0"][key]), fmt.format(final[key]), "—" if base is None else fmt.format(base)
        )
    console.print(table)
    if final.get("stopped"):
        console.print(f"[bold yellow]stopped early:[/] {final['stopped']}", highlight=False, soft_wrap=True)
    console.print(f"run directory: {path}  ({seconds:.0f} s)")
