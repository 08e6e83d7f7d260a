"""examples/plugin-package is a real third-party distribution: built with pip, found through its
entry points, listed by ``pchmr plugins``, a broken plugin reported with its distribution. Its own
tests (pchmr's contract suites) run in tests/test_wheel.py, against pchmr's wheel.

The package is installed with ``pip install --no-deps --no-build-isolation --target <tmp>`` from a
copy of its source (pip builds in the source tree), so neither the venv nor the repository
changes; subprocesses see it through ``PYTHONPATH=<tmp>``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pchmr.core.engine.registry import PluginLoadError, Registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin-package"
PYTHON = Path(sys.executable)
DISTRIBUTION = "pchmr-example-plugins"
#: Plugin kind → the example's plugin of that kind (each its own entry point, named like the plugin).
PLUGINS = {
    "backbone": "example-cnn",
    "partitioner": "round-robin",
    "body_model": "example-ellipsoid",
    "dataset": "example-turntable",
    "annotator": "example-rest-fit",
    "privacy": "example-clip",
}
#: rich wraps the plugin table to the terminal width; wide enough to keep every row on one line.
TABLE_COLUMNS = "200"
#: Generous bounds for a busy CI machine (the steps take ~2 and ~5 s of CPU).
PIP_TIMEOUT_S = 300
CLI_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None,
    reason="pip --no-build-isolation builds with the environment's setuptools, which is not installed",
)


def pip_install_target(source: Path, target: Path) -> None:
    """Build and install the project at ``source`` into ``target`` without touching the environment."""
    command = [str(PYTHON), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "--target", str(target), str(source)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"pip could not install {source}:\n{done.stdout}\n{done.stderr}")


def subprocess_env(site: Path) -> dict[str, str]:
    """The current environment with ``site`` as the only PYTHONPATH entry and no plugin switches
    (``PCHMR_ONLY_PLUGINS`` / ``PCHMR_DISABLE_PLUGINS``) that would hide the example's plugins."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PCHMR_") or key == "PCHMR_CACHE_DIR"}
    env.update(PYTHONPATH=str(site), COLUMNS=TABLE_COLUMNS, PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(copy of the package's source, directory it was installed into)."""
    root = tmp_path_factory.mktemp("example-plugin-package")
    source, site = root / "source", root / "site"
    shutil.copytree(
        PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    )
    pip_install_target(source, site)
    return source, site


def test_it_installs_as_its_own_distribution_with_one_entry_point_per_plugin(example: tuple[Path, Path]) -> None:
    _, site = example
    (info,) = site.glob("pchmr_example_plugins-*.dist-info")
    assert f"Name: {DISTRIBUTION}" in (info / "METADATA").read_text()
    lines = (info / "entry_points.txt").read_text().splitlines()
    assert lines[0] == "[pchmr]"
    entry_points = {line.split(" = ")[0] for line in lines[1:] if " = " in line}
    assert entry_points == set(PLUGINS.values())
    installed = sorted(path.name for path in site.iterdir() if not path.name.endswith(".dist-info"))
    assert installed == ["pchmr_example_plugins"], f"--no-deps installs only the package itself, got {installed}"


def test_pchmr_plugins_lists_them_with_their_distribution(example: tuple[Path, Path]) -> None:
    _, site = example
    done = subprocess.run([str(PYTHON), "-m", "pchmr.cli.app", "plugins"], capture_output=True, text=True,
                          env=subprocess_env(site), cwd=site.parent, timeout=CLI_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) == 4:
            rows[(cells[0], cells[1])] = (cells[2], cells[3])
    for kind, name in PLUGINS.items():  # the table writes kinds with spaces: "body model"
        assert rows.get((kind.replace("_", " "), name)) == (f"{DISTRIBUTION} 0.1.0", name), done.stdout
    assert rows.get(("backbone", "fastmetro")) == ("pchmr 0.1.0", "fastmetro"), "the built-ins are still there"


# Its own tests (pchmr's BackboneContract, PartitionerContract, BodyModelContract, DatasetContract,
# PrivacyContract with a real Flower simulation, AnnotatorContract) run in tests/test_wheel.py, against
# pchmr installed from its wheel in a new venv, as a third party runs them.


BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "pchmr-broken-example"
version = "0.0.1"

[project.entry-points.pchmr]
broken = "pchmr_broken_example"

[tool.setuptools]
py-modules = ["pchmr_broken_example"]
"""

BROKEN_MODULE = """\
raise RuntimeError("this plugin is broken on purpose")
"""


def test_a_plugin_failing_at_import_is_reported_with_its_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, site = tmp_path / "broken", tmp_path / "site"
    source.mkdir()
    (source / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (source / "pchmr_broken_example.py").write_text(textwrap.dedent(BROKEN_MODULE))
    pip_install_target(source, site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("PCHMR_ONLY_PLUGINS", raising=False)
    monkeypatch.delenv("PCHMR_DISABLE_PLUGINS", raising=False)
    with pytest.raises(PluginLoadError) as caught:
        Registry().load_entry_points()
    assert str(caught.value) == (
        "entry point 'broken = pchmr_broken_example' from distribution pchmr-broken-example 0.0.1 failed to import: "
        "RuntimeError: this plugin is broken on purpose"
    )
    monkeypatch.setenv("PCHMR_DISABLE_PLUGINS", "broken")
    Registry().load_entry_points()  # the documented way around it while debugging
