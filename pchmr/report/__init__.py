"""Figures and summary numbers of pchmr runs.

:mod:`pchmr.report.partition_plots`: what a client partition looks like (per-client label
histograms, the client-size long tail, a feature embedding for ``cnn-cluster``) and two numbers
that summarise it (:func:`label_entropy`, :func:`gini`). Plots use matplotlib's Agg canvas
directly (no pyplot, no global backend switch) and are imported lazily.

:mod:`pchmr.report.tables`: result tables of run directories (:func:`load_run`,
:func:`build_report`, Markdown/CSV/LaTeX/JSON/rich renderers; each model's final and best round); :mod:`pchmr.report.convergence`: a
metric against rounds/epochs (:func:`plot_convergence`). Both back ``pchmr report``.

:mod:`pchmr.report.annotation_figures` (imported on use): ``pchmr annotate`` fits drawn front and
side, several annotations of the same images side by side (``pchmr annotate --figures``,
``pchmr annotate-compare``).
"""

from pchmr.report.convergence import plot_convergence
from pchmr.report.partition_plots import (
    gini,
    label_entropy,
    plot_embedding,
    plot_partition,
)
from pchmr.report.tables import (
    Report,
    ReportError,
    RunSummary,
    build_report,
    load_run,
    setting_label,
    to_csv,
    to_json,
    to_latex,
    to_markdown,
    to_rich,
)

__all__ = [
    "Report",
    "ReportError",
    "RunSummary",
    "build_report",
    "gini",
    "label_entropy",
    "load_run",
    "plot_convergence",
    "plot_embedding",
    "plot_partition",
    "setting_label",
    "to_csv",
    "to_json",
    "to_latex",
    "to_markdown",
    "to_rich",
]
