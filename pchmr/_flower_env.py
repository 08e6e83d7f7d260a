"""What Flower sends to Flower's servers, off unless the user turns it on.

Flower 1.41/1.42 sends two kinds of reports over the internet:

* usage telemetry (``flwr.supercore.telemetry``): an event, with a random id kept in
  ``$FLWR_HOME/source``, the OS, Python and Flower versions and the event's details (e.g. how many
  simulated SuperNodes), when a SuperLink, SuperNode, SuperExec, ServerApp, ClientApp or simulation
  starts and stops, and from ``flwr.simulation.run_simulation``; on unless ``FLWR_TELEMETRY_ENABLED``
  is other than ``1`` **when that module is imported** (it reads the variable once);
* an update check (``flwr.supercore.update_check``): the ``flwr`` command, SuperLinks, SuperNodes
  and SuperExecs post the Flower, Python and OS versions and the process name to Flower's API
  unless ``FLWR_DISABLE_UPDATE_CHECK=1``.

:func:`flower_reporting_off` sets ``FLWR_TELEMETRY_ENABLED=0`` and ``FLWR_DISABLE_UPDATE_CHECK=1``
in this process's environment, which every process it starts inherits, unless the user set them
(``FLWR_TELEMETRY_ENABLED=1`` turns telemetry on again). ``pchmr/__init__`` calls it, so it runs
before any pchmr module imports Flower; when Flower's telemetry module was imported before pchmr, its
copy of the setting is turned off too. Nothing here imports Flower.
"""

from __future__ import annotations

import os
import sys

__all__ = ["TELEMETRY_ENV", "UPDATE_CHECK_ENV", "flower_reporting_off"]

#: Flower's switch for its usage telemetry: "1" (Flower's default) sends, anything else does not.
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"
#: Flower's switch for its update check: "1" skips it.
UPDATE_CHECK_ENV = "FLWR_DISABLE_UPDATE_CHECK"


def flower_reporting_off() -> dict[str, str]:
    """Turn Flower's telemetry and update check off for this process and its children, each unless
    the user set its variable; returns the variables it set."""
    changed = {}
    for name, value in ((TELEMETRY_ENV, "0"), (UPDATE_CHECK_ENV, "1")):
        if name not in os.environ:
            os.environ[name] = value
            changed[name] = value
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None and TELEMETRY_ENV in changed:
        telemetry.FLWR_TELEMETRY_ENABLED = "0"  # Flower read the variable at its import, before pchmr's
    return changed
