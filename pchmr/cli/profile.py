"""``pchmr profile``: the PCHMR paper's Table 13 on whatever device is here.

Registered on the app in :mod:`pchmr.cli.app` with ``app.command(name="profile")(profile)``. Per
backbone (``--backbone``, repeatable; FastMETRO-S and TORE-S by default) it runs
:func:`pchmr.core.engine.profile.profile_module` on the device ``--accelerator`` and ``--precision``
resolve to (:func:`pchmr.core.engine.devices.resolve_placement`), prints the table in Table 13's
layout (:mod:`pchmr.report.profile_table`) and writes into ``--out``:

* ``profile.json`` — every measurement, the settings, the device (name, threads, torch) and the
  paper's Table 13 rows;
* ``profile.md`` — the same table in Markdown, how it was measured, and the paper's rows.

Every value is checked before the body model loads (exit 2, naming the option); a backbone that
refuses ``--variant``/``--encoder``/``--input-size`` is found by building it before any timing.
A failure while measuring writes the rows measured so far, then exits 1 naming the backbone.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pchmr.cli._output import RUN_FAILED, console
from pchmr.cli._output import fail as _fail

__all__ = ["DEFAULT_BACKBONES", "profile"]

#: The backbones of the paper's Table 13.
DEFAULT_BACKBONES = ("fastmetro", "tore")
JSON_FILE, MARKDOWN_FILE = "profile.json", "profile.md"


def profile(
    backbone: Optional[list[str]] = typer.Option(
        None, "--backbone", help="Registered backbone to profile (repeatable; default: fastmetro and tore)."
    ),
    variant: str = typer.Option("S", "--variant", help="Backbone size: S, M or L."),
    encoder: str = typer.Option("small", "--encoder", help="CNN feature encoder: small or resnet50 (the papers')."),
    input_size: int = typer.Option(64, "--input-size", help="Square crop side in pixels (224 in the papers)."),
    channels_last: Optional[bool] = typer.Option(
        None,
        "--channels-last/--no-channels-last",
        help="Channels-last (NHWC) CNN, as pchmr run's option (default: on for resnet50, off for small).",
        show_default=False,
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Local batch size (FastMETRO's 16 per GPU)."),
    precision: str = typer.Option("32-true", "--precision", help="32-true, 16-mixed or bf16-mixed."),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto (a GPU when present), cpu, gpu or mps."),
    images: int = typer.Option(
        4000,
        "--images",
        help="Images of the 100-client partition's client over 5 rounds (the 1000-client one: a tenth).",
    ),
    uplink_mbps: float = typer.Option(37.4, "--uplink-mbps", help="Uplink for the upload seconds, Mb/s (the paper's)."),
    body_model: str = typer.Option("anny", "--body-model", help="Body model plugin whose mesh the heads predict."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default)."),
    out: Path = typer.Option(Path("profile"), "--out", help="Directory for profile.json and profile.md."),
) -> None:
    """Measure training, inference, communication and memory per backbone on this device (the paper's Table 13)."""
    from pchmr.core.contracts.bodymodel import BodyModelSpec
    from pchmr.core.engine.devices import DeviceError, resolve_placement
    from pchmr.core.engine.profile import ProfileSettings, build_profiled_module
    from pchmr.core.engine.registry import PluginError, get_registry
    from pchmr.core.kit.cache import default_cache_dir

    names = list(backbone or DEFAULT_BACKBONES)
    try:
        settings = ProfileSettings(
            variant=variant,
            encoder=encoder,
            input_size=input_size,
            batch_size=batch_size,
            images=images,
            uplink_mbps=uplink_mbps,
            channels_last=channels_last,
        )
        placement = resolve_placement(accelerator, 1, precision)
        if threads < 0:
            raise ValueError(f"--threads must be a whole number >= 0 (0: torch's default), got {threads}")
        if len(set(names)) != len(names):
            raise ValueError(f"--backbone names a backbone twice: {', '.join(names)}")
        registry = get_registry()
        for name in names:
            registry.get("backbone", name)
        body_factory = registry.get("body_model", body_model)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
    except (ValueError, DeviceError, PluginError) as exc:
        raise _fail(str(exc)) from None
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        with console.status(f"loading the {body_model} body model"):
            body = body_factory(BodyModelSpec(cache_dir=str(default_cache_dir())))
    except (ValueError, FileNotFoundError, PluginError) as exc:
        raise _fail(f"--body-model {body_model} could not be loaded: {exc}") from None
    try:
        for name in names:  # a factory's refusal ends the command before any timing
            build_profiled_module(name, body, settings)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    _measure(names, body, placement, settings, out)


def _measure(names: list[str], body: Any, placement: Any, settings: Any, out: Path) -> None:
    """Profile every backbone under a progress bar, then print and write the table."""
    from pchmr.core.engine.profile import PROFILE_STEPS, build_profiled_module, device_name, profile_module

    meta = _meta(placement)
    console.print(
        f"device: [bold]{meta['device']}[/]" + (f", {meta['threads']} torch threads" if meta.get("threads") else "")
        + f", {placement.precision}; {settings.encoder} encoder at {settings.input_size} px, batch {settings.batch_size}",
        highlight=False,
    )  # fmt: skip
    progress = Progress(
        TextColumn("[bold]profile"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    task = progress.add_task("profile", total=len(names) * PROFILE_STEPS, status="starting")
    rows: list[Any] = []
    started = time.perf_counter()
    with progress:
        for index, name in enumerate(names):

            def heard(done: int, total: int, message: str, base: int = index * PROFILE_STEPS) -> None:
                progress.update(task, completed=base + done, status=message)

            try:
                module = build_profiled_module(name, body, settings)
                rows.append(profile_module(name, module, body, placement=placement, settings=settings, progress=heard))
                del module
            except (RuntimeError, ValueError, MemoryError) as exc:
                meta["seconds"] = round(time.perf_counter() - started, 1)
                written = _write(rows, meta, settings, placement, out) if rows else []
                kept = f"; the rows measured so far are in {written[0]}" if written else ""
                raise _fail(f"profiling {name} on {device_name(placement)} failed: {exc}{kept}", RUN_FAILED) from None
    meta["seconds"] = round(time.perf_counter() - started, 1)
    _print_table(rows)
    for path in _write(rows, meta, settings, placement, out):
        console.print(f"wrote {path}", highlight=False)


def _meta(placement: Any) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    from pchmr.core.engine.profile import device_name

    return {
        "command": "pchmr " + shlex.join(sys.argv[1:]),
        "device": device_name(placement),
        "threads": None if placement.on_gpu else torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "placement": placement.describe(),
        "torch": torch.__version__,
        "pchmr": md.version("pchmr"),
        "load_before": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def _print_table(rows: list[Any]) -> None:
    from pchmr.report.profile_table import table13

    header, cells = table13(rows)
    table = Table(title="On-device profile (the PCHMR paper's Table 13 layout)", title_justify="left")
    for index, (group, name) in enumerate(header):
        table.add_column(f"{group}\n{name}", justify="left" if index < 2 else "right", overflow="fold")
    for line in cells:
        table.add_row(*line)
    console.print(table)


def _write(rows: list[Any], meta: dict[str, Any], settings: Any, placement: Any, out: Path) -> list[Path]:
    from dataclasses import asdict

    from pchmr.core.engine.profile import PAPER_TABLE13
    from pchmr.core.kit.atomic import write_text_atomic
    from pchmr.report.profile_table import to_markdown

    meta = {**meta, "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    out.mkdir(parents=True, exist_ok=True)
    paper = [dict(zip(("model", "device", "img_s_100", "seconds_100", "img_s_1000", "seconds_1000"), r)) for r in PAPER_TABLE13]  # fmt: skip
    payload = {"meta": meta, "settings": asdict(settings), "rows": [r.as_dict() for r in rows], "paper_table13": paper}
    write_text_atomic(out / JSON_FILE, json.dumps(payload, indent=1) + "\n")
    write_text_atomic(out / MARKDOWN_FILE, to_markdown(rows, meta))
    return [out / JSON_FILE, out / MARKDOWN_FILE]
