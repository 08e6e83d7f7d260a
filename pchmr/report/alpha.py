"""A metric against the LDA α of the client partition: the PCHMR paper's Fig. 3.

:func:`alpha_data` reads, from run summaries, one :class:`AlphaSeries` per setting and model
whose runs differ only in the ``lda`` partitioner's ``alpha`` and in what repetitions differ in
(:data:`~pchmr.report.tables.REPEAT_FIELDS`: the seed): per α value the mean of the runs' final
metric and its 95 % confidence interval by Student's t over the seeds
(:func:`pchmr.report.stats.interval`; one seed: the value alone, no interval). Centralized runs of
the same protocol and model are kept as :class:`Reference` lines (the paper's Fig. 3 compares
with the centralized baseline). Every other run (IID, another partitioner, a naive baseline, a
run without the metric) is **not** on the plot and :attr:`AlphaData.left_out` says so, run by
run.

:func:`plot_alpha` draws MPJPE and PA-MPJPE (:data:`ALPHA_METRICS`) against α on a log axis, one
row of panels per evaluation protocol (each panel names its protocol), error bars for the
intervals; it refuses (:class:`~pchmr.report.tables.ReportError`) when fewer than two α values
exist, naming why (:meth:`AlphaData.skip_reason`). Drawn on matplotlib's Agg canvas without pyplot.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pchmr.report.stats import CONFIDENCE, Interval, interval
from pchmr.report.tables import (
    PARTITION_SYMBOLS,
    REPEAT_FIELDS,
    ReportError,
    RunSummary,
    config_differences,
    model_label,
    protocol_label,
    run_names,
    setting_label,
    strategy_label,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ALPHA_METRICS",
    "AlphaData",
    "AlphaPoint",
    "AlphaSeries",
    "Reference",
    "alpha_data",
    "alpha_figure",
    "alpha_of",
    "plot_alpha",
]

#: The metrics of the figure (its panels, left to right) → axis label.
ALPHA_METRICS = {"mpjpe_mm": "MPJPE (mm)", "pa_mpjpe_mm": "PA-MPJPE (mm)"}
LDA = "lda"
_ALPHA_KEY, _, DEFAULT_ALPHA = PARTITION_SYMBOLS[LDA]
DPI = 120
PANEL_WIDTH, PANEL_HEIGHT = 6.0, 4.4
TITLE_WIDTH = 72
LEGEND_FONTSIZE = 7


@dataclass(frozen=True)
class AlphaPoint:
    """One α of a series: the runs there (seeds) and the interval of their metric."""

    alpha: float
    interval: Interval
    runs: tuple[RunSummary, ...]


@dataclass(frozen=True)
class AlphaSeries:
    """The runs of one setting and model over α, in one protocol; ``points`` by increasing α."""

    protocol: Mapping[str, Any]
    setting: str  # the setting without α: "FedAvg 100/10 LDA"
    model: str
    points: tuple[AlphaPoint, ...]
    detail: str = ""  # what tells this series from another of the same setting and model ("lr=0.002")

    @property
    def label(self) -> str:
        counts = sorted({p.interval.n for p in self.points})
        n = f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}–{counts[-1]}"
        detail = f" {self.detail}" if self.detail else ""
        return f"{self.setting}{detail} · {self.model} ({n} per α)"

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(p.alpha for p in self.points)


@dataclass(frozen=True)
class Reference:
    """Centralized runs of one protocol and model (repetitions of one config): a horizontal line."""

    protocol: Mapping[str, Any]
    setting: str
    model: str
    interval: Interval
    runs: tuple[RunSummary, ...]

    @property
    def label(self) -> str:
        return f"{self.setting} · {self.model} (n={self.interval.n}), reference"


@dataclass(frozen=True)
class AlphaData:
    """What the α figure of one metric shows, and which runs it leaves out and why."""

    metric: str
    view: str
    series: tuple[AlphaSeries, ...]
    references: tuple[Reference, ...] = ()
    left_out: tuple[str, ...] = field(default_factory=tuple)

    @property
    def alphas(self) -> tuple[float, ...]:
        """Every α value of every series, sorted, once."""
        return tuple(sorted({a for s in self.series for a in s.alphas}))

    def skip_reason(self) -> str | None:
        """None when the figure can be drawn (two α values or more), else why not."""
        if len(self.alphas) >= 2:
            return None
        have = "no LDA-partitioned run" if not self.alphas else f"runs at one LDA α only (α={_num(self.alphas[0])})"
        reason = f"the metric-vs-α plot needs runs at 2 or more LDA α values; the runs give {have}"
        if self.left_out:
            reason += f"; {len(self.left_out)} run(s) are not on it: " + "; ".join(self.left_out)
        return reason


def _num(value: float) -> str:
    return f"{value:g}"


def alpha_of(run: RunSummary) -> float | None:
    """The LDA α of a federated ``lda`` run (its plugin's default when the config names none), None
    for any other run; :class:`ReportError` when the recorded α is not a positive number."""
    cfg = run.config
    if cfg.mode != "federated" or cfg.partitioner != LDA:
        return None
    options = dict(cfg.partition_options)
    raw = options.get(_ALPHA_KEY, DEFAULT_ALPHA)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(raw, bool) or not math.isfinite(value) or value <= 0:
        raise ReportError(f"{run.path}: config.json's lda partition option '{_ALPHA_KEY}' is {raw!r}, not a number > 0")
    return value


def _without_alpha(run: RunSummary) -> dict[str, Any]:
    """The run's config without the repetition fields and without α: equal within a series."""
    d = {k: v for k, v in run.config.to_dict().items() if k not in REPEAT_FIELDS}
    d["partition_options"] = {k: v for k, v in dict(d["partition_options"]).items() if k != _ALPHA_KEY}
    return d


def _setting_without_alpha(run: RunSummary) -> str:
    """``"FedAvg 100/10 LDA"`` (other partition options kept, e.g. ``min-size=5``; ``E=2`` as in
    :func:`~pchmr.report.tables.setting_label`)."""
    cfg = run.config
    rest = {k: v for k, v in dict(cfg.partition_options).items() if k not in (_ALPHA_KEY, "label")}
    parts = ["LDA", *(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in sorted(rest.items()))]
    label = f"{strategy_label(cfg)} {cfg.clients}/{cfg.per_round} {' '.join(parts)}"
    return label + (f" E={cfg.local_epochs}" if cfg.local_epochs != 1 else "")


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def alpha_data(runs: Sequence[RunSummary], metric: str = "mpjpe_mm", view: str = "final") -> AlphaData:
    """The α figure's data of ``metric`` (mm) over ``runs``: series, references, and the runs left
    out with the reason (module docstring). ``view`` is ``"final"`` (the last evaluated round, the
    default) or ``"best"`` (each run's best round, :attr:`~pchmr.report.tables.RunSummary.best`)."""
    if view not in ("final", "best"):
        raise ReportError(f"unknown view '{view}'; choose final or best")
    left_out: list[str] = []
    names = run_names(runs)
    groups: dict[tuple[str, str], list[tuple[float, RunSummary]]] = {}
    central: dict[tuple[str, str], list[RunSummary]] = {}
    for run in runs:
        alpha = alpha_of(run)
        what = f"{names[run.path]} ({setting_label(run.config)} · {model_label(run.config)})"
        if run.metric(metric, view) is None:
            left_out.append(f"{what} has no {view} {metric}")
        elif alpha is not None:
            groups.setdefault((_key(dict(run.protocol)), _key(_without_alpha(run))), []).append((alpha, run))
        elif run.config.mode == "centralized":
            central.setdefault((_key(dict(run.protocol)), _key(_without_alpha(run))), []).append(run)
        else:
            left_out.append(f"{what} is not LDA-partitioned")
    series: list[AlphaSeries] = []
    for members in groups.values():
        first = members[0][1]
        by_alpha: dict[float, list[RunSummary]] = {}
        for alpha, run in sorted(members, key=lambda m: m[0]):
            by_alpha.setdefault(alpha, []).append(run)
        points = tuple(
            AlphaPoint(a, interval([r.metric(metric, view) for r in rs], CONFIDENCE), tuple(rs))  # type: ignore[misc]
            for a, rs in by_alpha.items()
        )
        series.append(
            AlphaSeries(dict(first.protocol), _setting_without_alpha(first), model_label(first.config), points)
        )
    series = _disambiguate(series)
    references = []
    shown = {(_key(dict(s.protocol)), s.model) for s in series}
    for members in central.values():
        first = members[0]
        if (_key(dict(first.protocol)), model_label(first.config)) not in shown:
            left_out += [f"{names[r.path]} (Centralized · {model_label(r.config)}) has no LDA series of its protocol and model"
                         for r in members]  # fmt: skip
            continue
        values = [r.metric(metric, view) for r in members]
        references.append(Reference(dict(first.protocol), setting_label(first.config), model_label(first.config),
                                    interval(values, CONFIDENCE), tuple(members)))  # type: ignore[arg-type]  # fmt: skip
    series.sort(key=lambda s: (protocol_label(s.protocol), s.model, s.setting, s.detail))
    return AlphaData(metric, view, tuple(series), tuple(references), tuple(left_out))


def _disambiguate(series: list[AlphaSeries]) -> list[AlphaSeries]:
    """Series of one protocol sharing setting and model get the config fields that tell them apart."""
    by_label: dict[tuple[str, str, str], list[int]] = {}
    for i, s in enumerate(series):
        by_label.setdefault((_key(dict(s.protocol)), s.setting, s.model), []).append(i)
    out = list(series)
    for indices in by_label.values():
        if len(indices) < 2:
            continue
        configs = [_without_alpha(series[i].points[0].runs[0]) for i in indices]
        for i, detail in zip(indices, config_differences(configs)):
            s = series[i]
            out[i] = AlphaSeries(s.protocol, s.setting, s.model, s.points, detail)
    return out


# --------------------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------------------
VIEW_TEXT = {"final": "final evaluated round", "best": "best round"}


def _draw(ax: Axes, data: AlphaData, protocol: str) -> None:
    label = ALPHA_METRICS.get(data.metric, data.metric)
    members = [s for s in data.series if protocol_label(s.protocol) == protocol]
    for s in members:
        xs = [p.alpha for p in s.points]
        means = [p.interval.mean for p in s.points]
        (line,) = ax.plot(xs, means, marker="o", markersize=4, linewidth=1.4, label=s.label)
        bars = [(p.alpha, p.interval.mean, p.interval.half_width) for p in s.points if p.interval.half_width]
        if bars:
            ax.errorbar([b[0] for b in bars], [b[1] for b in bars], yerr=[b[2] for b in bars], fmt="none",
                        ecolor=line.get_color(), elinewidth=1.2, capsize=4)  # fmt: skip
    for ref in (r for r in data.references if protocol_label(r.protocol) == protocol):
        line = ax.axhline(ref.interval.mean, linestyle="--", linewidth=1.2, color="0.35", label=ref.label)
        if ref.interval.half_width:
            ax.axhspan(ref.interval.low, ref.interval.high, color=line.get_color(), alpha=0.12, linewidth=0)
    low, high = ax.get_ylim()
    if low < 0 < high:  # errors are >= 0: an interval reaching below 0 is cut at the axis
        ax.set_ylim(0, high)
    alphas = sorted({p.alpha for s in members for p in s.points})
    ax.set_xscale("log")
    ax.set_xticks(alphas, [_num(a) for a in alphas])
    ax.minorticks_off()
    if len(alphas) == 1:
        ax.set_xlim(alphas[0] / 3, alphas[0] * 3)
    ax.set_xlabel("LDA α (log scale; smaller α: more skewed clients)")
    ax.set_ylabel(f"{label}, {VIEW_TEXT[data.view]}")
    ax.set_title(textwrap.fill(f"{label} vs LDA α — protocol: {protocol}", TITLE_WIDTH), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="best")


def plot_alpha(
    runs: Sequence[RunSummary], path: str | Path, metrics: Sequence[str] = tuple(ALPHA_METRICS), view: str = "final"
) -> Path:
    """Write the metric-vs-α PNG of ``runs`` to ``path`` (:func:`alpha_figure`)."""
    fig = alpha_figure(runs, metrics, view)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def alpha_figure(
    runs: Sequence[RunSummary], metrics: Sequence[str] = tuple(ALPHA_METRICS), view: str = "final"
) -> Figure:
    """The metric-vs-α figure of ``runs``: one column per metric, one row per protocol that has
    an LDA series. :class:`ReportError` with :meth:`AlphaData.skip_reason` when there are fewer
    than two α values."""
    unknown = [m for m in metrics if m not in ALPHA_METRICS]
    if unknown or not metrics:
        raise ReportError(f"the α plot draws {', '.join(ALPHA_METRICS)}; got {list(metrics)}")
    data = [alpha_data(runs, m, view) for m in metrics]
    reason = data[0].skip_reason()
    if reason is not None:
        raise ReportError(reason)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    protocols = list(dict.fromkeys(protocol_label(s.protocol) for s in data[0].series))
    fig = Figure(figsize=(PANEL_WIDTH * len(metrics), PANEL_HEIGHT * len(protocols)), layout="constrained")
    FigureCanvasAgg(fig)
    axes: Any = fig.subplots(len(protocols), len(metrics), squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, d in enumerate(data):
            _draw(axes[i][j], d, protocol)
    fig.suptitle(
        f"Performance vs non-IID degree (LDA α): mean over seeds of the {VIEW_TEXT[view]}, bars: "
        f"{CONFIDENCE * 100:g} % CI (Student's t; one seed: no bar)",
        fontsize=10,
    )
    return fig
