"""Convergence plots: one metric against training progress for several runs.

:func:`plot_convergence` writes one PNG. Federated runs advance in rounds and the baselines
(centralized, naive) in epochs, so they never share an x-axis: the figure has one panel per unit
present (left "federated round", right "baseline epoch"), and one row of panels per evaluation
protocol (a row's title names its protocol, so numbers of different protocols never share a panel).
Runs that are repetitions of one setting (the same protocol and a config differing only in
:data:`~pchmr.report.tables.REPEAT_FIELDS`, i.e. seeds: :func:`~pchmr.report.tables.repetition_groups`)
are drawn as one line, their mean per evaluated round/epoch, inside a shaded band: the 95 %
confidence interval of that mean by Student's t over the seeds (:func:`band`, through
:func:`pchmr.report.stats.interval`; a round fewer than two of them evaluated has no band). Every
other run is a line of its own. Lines are labelled with the setting (plus the model when several
models are plotted, and the seed, or the seeds of a band, when several lines share a label);
round/epoch 0 is the untrained model. Unfinished runs are dashed and labelled so. When all runs of a panel share the same mean-pose baseline
(``final.json``'s ``mean_pose_<metric>``), it is drawn as a grey dotted line.

Drawn on matplotlib's Agg canvas without pyplot, so nothing global changes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pchmr.report.stats import CONFIDENCE, Interval, interval
from pchmr.report.tables import (
    ReportError,
    RunSummary,
    model_label,
    protocol_label,
    repetition_groups,
    setting_label,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["CONVERGENCE_METRICS", "band", "convergence_figure", "curve", "curve_label", "plot_convergence"]

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
#: Opacity of a confidence band.
BAND_ALPHA = 0.2


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


def band(runs: Sequence[RunSummary], metric: str) -> tuple[list[int], list[Interval]]:
    """The rounds/epochs any of ``runs`` evaluated, in order, and at each the
    :func:`~pchmr.report.stats.interval` (mean, 95 % CI by Student's t) of the runs' values of
    ``metric`` there (a run without a finite value there left out, so n may be smaller)."""
    values: dict[int, list[float]] = {}
    for run in runs:
        for x, y in zip(*curve(run, metric)):
            values.setdefault(x, []).append(y)
    xs = sorted(values)
    return xs, [interval(values[x], CONFIDENCE) for x in xs]


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


def _group_label(group: Sequence[RunSummary], with_model: bool, with_seed: bool) -> str:
    """A band's label: ``"FedAvg 4/2 IID · mean of 3 seeds ± 95 % CI"`` (the seeds named when
    ``with_seed``)."""
    first = group[0]
    label = setting_label(first.config) + (f" · {model_label(first.config)}" if with_model else "")
    seeds = ", ".join(str(r.config.seed) for r in group)
    label += f" · mean of seeds {seeds}" if with_seed else f" · mean of {len(group)} seeds"
    label += f" ± {CONFIDENCE * 100:g} % CI"
    return label + ("" if all(r.finished for r in group) else " (unfinished)")


def _draw_panel(ax: Axes, runs: Sequence[RunSummary], metric: str, unit: str, with_model: bool, protocol: str) -> None:
    title, xlabel = UNITS.get(unit, (f"Runs in {unit}s", unit))
    groups = repetition_groups(runs)
    bases = [setting_label(g[0].config) + (model_label(g[0].config) if with_model else "") for g in groups]
    for group, base in zip(groups, bases):
        shared = bases.count(base) > 1
        style = "-" if all(r.finished for r in group) else "--"
        if len(group) == 1:
            xs, ys = curve(group[0], metric)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, linestyle=style,
                        label=curve_label(group[0], with_model, shared))  # fmt: skip
            continue
        xs, stats = band(group, metric)
        if not xs:
            continue
        (line,) = ax.plot(xs, [s.mean for s in stats], marker="o", markersize=3, linewidth=1.6, linestyle=style,
                          label=_group_label(group, with_model, shared))  # fmt: skip
        spread = [(x, s.low, s.high) for x, s in zip(xs, stats) if s.half_width is not None]
        if spread:
            ax.fill_between([p[0] for p in spread], [p[1] for p in spread], [p[2] for p in spread],
                            color=line.get_color(), alpha=BAND_ALPHA, linewidth=0)  # fmt: skip
    baseline = _mean_pose(runs, metric)
    if baseline is not None:
        ax.axhline(baseline, color="0.5", linestyle=":", linewidth=1.2, label="mean-pose baseline")
    _from_zero(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(CONVERGENCE_METRICS[metric])
    ax.set_title(textwrap.fill(f"{title} (x: {unit}) — protocol: {protocol}", TITLE_WIDTH), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="best")


def _from_zero(ax: Axes) -> None:
    """Every plotted metric is >= 0: a confidence band (symmetric, so wide for few seeds) reaching
    below 0 is cut at the axis instead of stretching it."""
    low, high = ax.get_ylim()
    if low < 0 < high:
        ax.set_ylim(0, high)


def plot_convergence(runs: Sequence[RunSummary], path: str | Path, metric: str = "pa_mpjpe_mm") -> Path:
    """Write a PNG of ``metric`` vs round (federated) / epoch (baselines) for ``runs`` to ``path``
    (:func:`convergence_figure`)."""
    fig = convergence_figure(runs, metric)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def convergence_figure(runs: Sequence[RunSummary], metric: str = "pa_mpjpe_mm") -> Figure:
    """The figure of ``metric`` vs round (federated) / epoch (baselines) for ``runs``: one row of
    panels per protocol, one panel per unit present; :class:`ReportError` for an unknown metric or
    when no run has a single value of it."""
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
    title = f"{CONVERGENCE_METRICS[metric]} during training (round/epoch 0 = untrained model)"
    if any(len(group) > 1 for group in repetition_groups(runs)):
        title += f"; runs repeated over seeds: their mean, shaded {CONFIDENCE * 100:g} % CI (Student's t)"
    fig.suptitle(title, fontsize=10)
    return fig
