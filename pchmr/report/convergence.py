"""Convergence plots: one metric against training progress for several runs.

:func:`plot_convergence` writes one PNG. Federated runs advance in rounds and the baselines
(centralized, naive) in epochs, so they never share an x-axis: the figure has one panel per unit
present (left "federated round", right "baseline epoch"), and one row of panels per evaluation
protocol (a row's title names its protocol, so numbers of different protocols never share a panel).
Every run is a line labelled with its setting (plus the model when several models are plotted and
the seed when several runs share a label); round/epoch 0 is the untrained model. Unfinished runs
are dashed and labelled so. When all runs of a panel share the same mean-pose baseline
(``final.json``'s ``mean_pose_<metric>``), it is drawn as a grey dotted line.

Drawn on matplotlib's Agg canvas without pyplot, so nothing global changes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pchmr.report.tables import (
    ReportError,
    RunSummary,
    model_label,
    protocol_label,
    setting_label,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["CONVERGENCE_METRICS", "curve", "curve_label", "plot_convergence"]

#: Plottable metrics → axis label.
CONVERGENCE_METRICS = {
    "pa_mpjpe_mm": "PA-MPJPE (mm)",
    "mpjpe_mm": "MPJPE (mm)",
    "mpvpe_mm": "MPVPE (mm)",
    "pck": "PCK@150mm",
}
#: unit → (panel title, x-axis label); the order is the panels' order.
UNITS = {"round": ("Federated runs", "federated round"), "epoch": ("Baselines", "baseline epoch")}
DPI = 120
PANEL_WIDTH, PANEL_HEIGHT = 6.0, 4.2
TITLE_WIDTH = 70
LEGEND_FONTSIZE = 7
#: Two mean-pose values closer than this (mm) count as the same baseline.
BASELINE_TOLERANCE = 1e-6


def curve(run: RunSummary, metric: str) -> tuple[list[int], list[float]]:
    """(x, y) of ``metric`` over the evaluated rounds/epochs of ``run`` (records without a finite
    value skipped)."""
    xs, ys = [], []
    for record in run.rounds:
        value = record.get(metric)
        if value is None or not math.isfinite(float(value)):
            continue
        xs.append(int(record["round"]))
        ys.append(float(value))
    return xs, ys


def curve_label(run: RunSummary, with_model: bool, with_seed: bool) -> str:
    """``"FedAvg 10/10 IID"`` (+ ``" · FastMETRO-S"``, ``" · seed 1"``, ``" (unfinished)"``)."""
    label = setting_label(run.config)
    if with_model:
        label += f" · {model_label(run.config)}"
    if with_seed:
        label += f" · seed {run.config.seed}"
    return label + ("" if run.finished else " (unfinished)")


def _mean_pose(runs: Sequence[RunSummary], metric: str) -> float | None:
    values = [v for v in (r.final.get(f"mean_pose_{metric}") for r in runs) if v is not None]  # unfinished: none
    if not values:
        return None
    first = float(values[0])
    return first if all(abs(float(v) - first) <= BASELINE_TOLERANCE for v in values) else None


def _draw_panel(ax: Axes, runs: Sequence[RunSummary], metric: str, unit: str, with_model: bool, protocol: str) -> None:
    title, xlabel = UNITS.get(unit, (f"Runs in {unit}s", unit))
    bases = [setting_label(r.config) + (model_label(r.config) if with_model else "") for r in runs]
    for run, base in zip(runs, bases):
        xs, ys = curve(run, metric)
        if not xs:
            continue
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, linestyle="-" if run.finished else "--",
                label=curve_label(run, with_model, bases.count(base) > 1))  # fmt: skip
    baseline = _mean_pose(runs, metric)
    if baseline is not None:
        ax.axhline(baseline, color="0.5", linestyle=":", linewidth=1.2, label="mean-pose baseline")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(CONVERGENCE_METRICS[metric])
    ax.set_title(textwrap.fill(f"{title} (x: {unit}) — protocol: {protocol}", TITLE_WIDTH), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="best")


def plot_convergence(runs: Sequence[RunSummary], path: str | Path, metric: str = "pa_mpjpe_mm") -> Path:
    """Write a PNG of ``metric`` vs round (federated) / epoch (baselines) for ``runs`` to ``path``.

    One row of panels per protocol, one panel per unit present; :class:`ReportError` for an
    unknown metric or when no run has a single value of it."""
    if metric not in CONVERGENCE_METRICS:
        raise ReportError(f"unknown metric '{metric}'; choose one of: {', '.join(CONVERGENCE_METRICS)}")
    if not any(curve(r, metric)[0] for r in runs):
        raise ReportError(f"no run has any evaluated '{metric}' in rounds.jsonl: nothing to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_protocol: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_protocol.setdefault(protocol_label(run.protocol), []).append(run)
    units = [u for u in UNITS if any(r.unit == u for r in runs)]
    units += sorted({r.unit for r in runs} - set(units))
    with_model = len({model_label(r.config) for r in runs}) > 1
    fig = Figure(figsize=(PANEL_WIDTH * len(units), PANEL_HEIGHT * len(by_protocol)), layout="constrained")
    FigureCanvasAgg(fig)
    axes: Any = fig.subplots(len(by_protocol), len(units), squeeze=False)
    for i, (protocol, group) in enumerate(by_protocol.items()):
        for j, unit in enumerate(units):
            members = [r for r in group if r.unit == unit]
            if not members:
                axes[i][j].set_axis_off()
                continue
            _draw_panel(axes[i][j], members, metric, unit, with_model, protocol)
    fig.suptitle(f"{CONVERGENCE_METRICS[metric]} during training (round/epoch 0 = untrained model)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
