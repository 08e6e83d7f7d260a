"""The ``pchmr`` command line (typer + rich): this module only registers the commands, which live
beside it (``run.py``, ``plugins.py``, ``partition.py``, ``report.py``, ``data.py``,
``privacy.py``, ``configs.py``, ``annotate.py``, ``annotate_compare.py``, ``profile.py``, ``sweep.py``, ``evaluate.py``,
``predict.py``, ``audit.py``)."""

from __future__ import annotations

import os
import sys

import typer

from pchmr.cli._output import err_console
from pchmr.cli.annotate import annotate, personalize
from pchmr.cli.annotate_compare import annotate_compare
from pchmr.cli.audit import audit
from pchmr.cli.configs import configs_app
from pchmr.cli.data import data_app
from pchmr.cli.evaluate import evaluate_command
from pchmr.cli.partition import partition
from pchmr.cli.plugins import plugins
from pchmr.cli.predict import predict
from pchmr.cli.privacy import privacy_app
from pchmr.cli.profile import profile
from pchmr.cli.report import report
from pchmr.cli.run import run
from pchmr.cli.sweep import sweep

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pchmr: federated, privacy-constrained 3D human mesh recovery.",
    pretty_exceptions_enable=False,
)
app.command(name="run")(run)
app.command(name="report")(report)
app.command(name="sweep")(sweep)
app.command(name="plugins")(plugins)
app.command(name="partition")(partition)
app.add_typer(data_app, name="data")
app.add_typer(privacy_app, name="privacy")
app.add_typer(configs_app, name="configs")
app.command(name="annotate")(annotate)
app.command(name="annotate-compare")(annotate_compare)
app.command(name="personalize")(personalize)
app.command(name="profile")(profile)
app.command(name="eval")(evaluate_command)
app.command(name="predict")(predict)
app.command(name="audit")(audit)


def main() -> None:
    """The ``pchmr`` console script."""
    from pchmr.core.engine.perf import tune_allocator

    tune_allocator()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; resume with `pchmr run --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
