"""``pchmr audit RUN_DIR --attack NAME [--attack-option k=v] --out DIR``: attack a finished run.

The attack (a plugin of kind ``attack``, :mod:`pchmr.core.contracts.attack`) works through the
run as :class:`~pchmr.core.engine.audit.RunAudit` shows it. ``--out`` gets ``audit.json`` (every
measurement with its setting, interval and trial count, the per-trial rows, the attacker's
assumptions, the run's protocol, the seed), ``audit.md`` (the table) and the attack's pictures as
PNGs; the table is printed with the protocol under it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from pchmr.cli._options import parse_options
from pchmr.cli._outdir import OVERWRITE_HELP, output_dir
from pchmr.cli._output import console as _console
from pchmr.cli._output import err_console
from pchmr.cli._output import fail as _fail

__all__ = ["audit"]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _interval(low: float | None, high: float | None) -> str:
    return f"[{low:.3g}, {high:.3g}]" if low is not None and high is not None else "—"


def audit(
    run_dir: Path = typer.Argument(..., help="A finished run directory (config.json, partition.json, model.pt)."),
    attack: str = typer.Option(..., "--attack", help="Attack plugin (pchmr plugins --kind attack)."),
    attack_option: list[str] = typer.Option([], "--attack-option", help="Attack option key=value (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Directory for audit.json, audit.md and the pictures."),
    seed: int = typer.Option(0, "--seed", min=0, help="The audit's seed: samples, noise, masks, restarts."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder, if not the run's."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Measure what an attacker recovers from a finished run (privacy audit)."""
    from pchmr.core.contracts.errors import OptionError
    from pchmr.core.engine.audit import AuditError, RunAudit, report_json, run_attack
    from pchmr.core.engine.config import ConfigError
    from pchmr.core.engine.registry import PluginError, get_registry
    from pchmr.core.kit.atomic import write_bytes_atomic, write_text_atomic

    options = parse_options(attack_option, "--attack-option", _fail)
    try:
        factory = get_registry().get("attack", attack)
        chosen = factory(options)
    except (PluginError, OptionError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if not run_dir.is_dir():
        raise _fail(f"RUN_DIR {run_dir} is not a directory; give a finished run directory")
    with output_dir(out, overwrite) as directory:
        try:
            target = RunAudit(run_dir, seed=seed, cache_dir=cache_dir)
            with _console.status(f"{attack} on {run_dir}") as status:
                report = run_attack(chosen, target, progress=lambda text: status.update(f"{attack}: {text}"))
        except (AuditError, ConfigError, PluginError, OptionError, FileNotFoundError) as exc:
            raise _fail(str(exc)) from None
        table = Table(title=f"{report.attack} · threat model: {report.threat_model} · {run_dir}")
        for column in ("setting", "metric", "value", "95 % interval", "n"):
            table.add_column(column, justify="right" if column in ("value", "n") else "left")
        lines = ["| setting | metric | value | 95 % interval | n |", "|---|---|---|---|---|"]
        for m in report.measurements:
            cells = (m.setting, m.metric, f"{m.value:.4g}", _interval(m.low, m.high), str(m.n))
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
        protocol = " · ".join(str(v) for v in target.protocol.values() if v)
        _console.print(table)
        _console.print(f"protocol: {protocol}; seed {seed}; {report.seconds:.0f} s", highlight=False)
        for assumption in report.assumptions:
            err_console.print(f"assumes: {assumption}", highlight=False, soft_wrap=True)
        for name, picture in report.pictures.items():
            write_bytes_atomic(directory / f"{name}.png", _png(picture))
        md = [f"# {report.attack} on {run_dir}", "", f"Threat model: {report.threat_model}. Protocol: {protocol}.", ""]
        md += [*lines, "", *(f"- assumes: {a}" for a in report.assumptions)]
        write_text_atomic(directory / "audit.md", "\n".join(md) + "\n")
        write_text_atomic(directory / "audit.json", json.dumps(report_json(report, target), indent=2) + "\n")
        _console.print(f"audit written to {directory}", highlight=False)
