"""``pchmr partition``: make, save and plot a client partition without training.

Registered on the app in :mod:`pchmr.cli.app` with ``app.command(name="partition")(partition)``.
The data are prepared exactly as ``pchmr run`` prepares them (same options, same config files
and ``--scale``), the partitioner runs with the run's seed, and the command writes into ``--out``:

* ``partition.json`` — the very file ``pchmr run`` would write (same seed → same bytes);
* ``partition-<label>-histogram.png`` — per-client stacked label counts;
* ``partition-sizes.png`` — the sorted client sizes (long tail) with their Gini coefficient;
* ``partition-embedding.png`` — ``cnn-cluster`` only: a 2-D PCA of the pooled CNN features the
  partition clustered, coloured by cluster;
* ``summary.json`` — sizes, Gini and the mean per-client label entropy of every label.

Baseline configs (``mode = "centralized"`` / ``"naive"``) give their single 'client'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.table import Table

from pchmr.cli._outdir import OVERWRITE_HELP, output_dir
from pchmr.cli._output import RUN_FAILED
from pchmr.cli._output import console as _console
from pchmr.cli._output import fail as _fail
from pchmr.cli.config_flags import GivenFlags, with_config_flags
from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.partition import Partition, PartitionError
from pchmr.core.engine.config import RunConfig
from pchmr.core.kit.atomic import WriteError, write_text_atomic

__all__ = ["partition", "partition_summary", "plot_label_key"]

SUMMARY_FILE = "summary.json"
PARTITION_FILE = "partition.json"
EMBEDDING_FILE = "partition-embedding.png"
#: Histogram label when the partition names none: the paper's pseudo-label, else the first one.
PREFERRED_LABEL = "source"
#: The RunConfig fields a partition depends on: each is a flag of ``pchmr partition``, as of ``pchmr run``.
PARTITION_FIELDS = (
    "dataset",
    "dataset_options",
    "partitioner",
    "partition_options",
    "clients",
    "seed",
    "num_train",
    "num_test",
    "input_size",
    "body_model",
)


def plot_label_key(partition: Partition, labels: Mapping[str, np.ndarray], requested: str | None) -> str:
    """The label the histogram shows: ``requested``, else the partition's own ``label`` parameter,
    else ``source``, else the first label; :class:`PartitionError` for an unknown ``requested``."""
    if not labels:
        raise PartitionError("the dataset has no meta labels to plot")
    if requested is not None:
        if requested not in labels:
            raise PartitionError(f"--label {requested!r} is not a label of this dataset; "
                                 f"choose one of: {', '.join(sorted(labels))}")  # fmt: skip
        return requested
    own = partition.params.get("label")
    if isinstance(own, str) and own in labels:
        return own
    return PREFERRED_LABEL if PREFERRED_LABEL in labels else sorted(labels)[0]


def partition_summary(partition: Partition, labels: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Sizes, their Gini coefficient and the mean per-client label entropy (bits) of every label."""
    from pchmr.report.partition_plots import gini, label_entropy

    sizes = partition.sizes()
    return {
        "method": partition.method,
        "params": dict(partition.params),
        "num_clients": partition.num_clients,
        "num_samples": int(sizes.sum()),
        "sizes": sizes.tolist(),
        "gini": round(gini(sizes), 6),
        "entropy_bits": {key: round(label_entropy(partition, labels, key), 6) for key in sorted(labels)},
        "max_entropy_bits": {
            key: round(float(np.log2(len(set(np.asarray(labels[key]).tolist())))), 6) for key in sorted(labels)
        },
    }


def _fit_per_round(values: dict[str, Any]) -> dict[str, Any]:
    """Clients per round do not matter to a partition: lower the default to ``clients`` rather
    than refuse ``--clients 1`` for exceeding it."""
    defaults = RunConfig()
    n, k = values.get("clients", defaults.clients), values.get("per_round", defaults.per_round)
    if isinstance(n, int) and isinstance(k, int) and k > n >= 1:
        return {**values, "per_round": n}
    return values


def _load_values(config: Optional[Path], scale: Optional[str], flags: GivenFlags) -> dict[str, Any]:
    """The config file's values (with its ``--scale``), the given flags written over them."""
    from pchmr.core.engine.config import ConfigError, load_config_file

    if scale is not None and config is None:
        raise ConfigError("--scale needs --config: a scale is a table of overrides inside a config file")
    return flags.over(load_config_file(config, scale=scale) if config else {})


def _make(cfg: Any) -> tuple[Partition, Any, Any]:
    """Prepare the data as ``pchmr run`` does and partition them: ``(partition, data, clusters)``,
    ``clusters`` the details of a partitioner that explains itself (``cnn-cluster``'s features and
    clusters, :class:`~pchmr.core.contracts.partition.ExplainedPartitioner`), None otherwise."""
    from pchmr.core.engine.baselines import baseline_partition
    from pchmr.core.engine.components import build_components
    from pchmr.core.engine.preparation import check_plugins
    from pchmr.core.engine.registry import get_registry

    check_plugins(cfg)
    data = build_components(cfg, with_model=False).data
    if cfg.mode != "federated":
        return baseline_partition(cfg.mode, len(data.train), cfg.fraction, cfg.seed), data, None
    options = dict(cfg.partition_options)
    partitioner = get_registry().get("partitioner", cfg.partitioner)
    with_details = getattr(partitioner, "with_details", None)
    if callable(with_details):  # the same partition, with what it computed (features, clusters)
        part, details = with_details(data, cfg.clients, cfg.seed, options)
        return part, data, details
    return partitioner(data, cfg.clients, cfg.seed, options), data, None


def _print_summary(summary: Mapping[str, Any], written: list[Path]) -> None:
    sizes = np.asarray(summary["sizes"])
    table = Table(title=f"{summary['method']} partition: {summary['num_clients']} clients, "
                        f"{summary['num_samples']} samples", title_justify="left")  # fmt: skip
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("client sizes min / median / max", f"{sizes.min()} / {np.median(sizes):g} / {sizes.max()}")
    table.add_row("Gini of client sizes", f"{summary['gini']:.3f}")
    for key, value in summary["entropy_bits"].items():
        table.add_row(f"mean entropy of '{key}' (bits)", f"{value:.3f} of {summary['max_entropy_bits'][key]:.3f}")
    _console.print(table)
    for path in written:
        _console.print(f"wrote {path}", highlight=False)


@with_config_flags(RunConfig, fields=PARTITION_FIELDS)
def partition(
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="TOML or JSON run config, or a packaged one (paper:NAME; pchmr configs list); flags override it.",
    ),
    scale: Optional[str] = typer.Option(None, "--scale", help="Apply the config file's \\[scale.NAME] overrides."),
    label: Optional[str] = typer.Option(None, "--label", help="Label of the histogram (default: the partition's own)."),
    out: Path = typer.Option(
        Path("partition"), "--out", help="Directory for partition.json, the PNGs and summary.json."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG plots."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    *,
    flags: GivenFlags,
) -> None:
    """Make a client partition exactly as `pchmr run` would, save partition.json and plot it (no training)."""
    from pchmr.core.engine.config import ConfigError
    from pchmr.core.engine.registry import PluginError
    from pchmr.report.partition_plots import plot_embedding, plot_partition

    try:
        # a partition trains nothing: the model files a config names (--init-from) need not exist yet
        cfg = RunConfig.from_dict(_fit_per_round(_load_values(config, scale, flags)), check_files=False)
    except (ConfigError, PluginError, OptionError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    try:
        with output_dir(out, overwrite):  # a refusal below leaves no directory this call made
            try:
                part, data, clusters = _make(cfg)
                key = plot_label_key(part, data.labels, label)
                summary = partition_summary(part, data.labels)
            except (ConfigError, PluginError, PartitionError, OptionError, FileNotFoundError) as exc:
                raise _fail(str(exc)) from None
            write_text_atomic(out / PARTITION_FILE, part.to_json())
            written = [out / PARTITION_FILE]
            if plots:
                written += plot_partition(part, data.labels, key, out)
                if clusters is not None:
                    written.append(plot_embedding(clusters.features, clusters.cluster_ids, out / EMBEDDING_FILE))
            write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True) + "\n")
            written.append(out / SUMMARY_FILE)
    except WriteError as exc:
        raise _fail(str(exc), code=RUN_FAILED) from None
    _print_summary(summary, written)
