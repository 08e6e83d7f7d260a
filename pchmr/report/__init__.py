"""Figures and summary numbers of pchmr runs.

:mod:`pchmr.report.partition_plots`: what a client partition looks like (per-client label
histograms, the client-size long tail, a feature embedding for ``cnn-cluster``) and two numbers
that summarise it (:func:`label_entropy`, :func:`gini`). Plots use matplotlib's Agg canvas
directly (no pyplot, no global backend switch) and are imported lazily.
"""

from pchmr.report.partition_plots import gini, label_entropy, plot_embedding, plot_partition

__all__ = ["gini", "label_entropy", "plot_embedding", "plot_partition"]
