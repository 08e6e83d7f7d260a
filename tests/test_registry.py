"""Plugin discovery through entry points: one path for built-ins and third parties."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.engine.registry import (
    DuplicatePluginError,
    PluginLoadError,
    Registry,
    UnknownPluginError,
    get_registry,
)

ROOT = Path(__file__).resolve().parents[1]


def make_distribution(tmp_path: Path, name: str, module_source: str, ep_name: str = "fake") -> None:
    """A real (minimal) installed distribution on sys.path: dist-info with an entry point."""
    module = f"{name.replace('-', '_')}_plugin"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = tmp_path / f"{name.replace('-', '_')}-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[pchmr]\n{ep_name} = {module}\n")


def test_builtins_register_through_entry_points_with_their_distribution():
    registry = get_registry()
    info = registry.info("backbone", "fastmetro")
    assert info.distribution == "pchmr"
    assert info.entry_point == "fastmetro"
    assert {"anny"} <= set(registry.names("body_model"))
    assert {"synthetic"} <= set(registry.names("dataset"))
    assert {"iid"} <= set(registry.names("partitioner"))
    assert {"fedavg"} <= set(registry.names("strategy"))


def test_unknown_name_lists_registered_names_and_suggests_the_closest():
    with pytest.raises(
        UnknownPluginError, match=r"no backbone named 'fastmetr0'(.|\n)*registered: fastmetro.*\(pchmr 0"
    ) as err:
        get_registry().get("backbone", "fastmetr0")
    assert "did you mean 'fastmetro'" in str(err.value)


def test_third_party_distribution_is_discovered(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "pchmr-acme",
        """
        from pchmr.core.contracts.hookspecs import hookimpl

        def tiny(config):
            return "tiny strategy"

        @hookimpl
        def pchmr_strategies():
            return {"acme-avg": tiny}
        """,
        ep_name="acme",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    registry.load_entry_points()
    info = registry.info("strategy", "acme-avg")
    assert info.provider == "pchmr-acme 1.2"
    assert info.factory(None) == "tiny strategy"


def test_plugin_failing_at_import_is_reported_with_its_distribution(tmp_path, monkeypatch):
    make_distribution(tmp_path, "pchmr-broken", "import module_that_does_not_exist\n", ep_name="broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginLoadError,
        match=r"'broken = pchmr_broken_plugin' from distribution pchmr-broken 1.2 failed to import: ModuleNotFoundError",
    ):
        Registry().load_entry_points()


def test_disabling_a_plugin_by_environment(tmp_path, monkeypatch):
    make_distribution(tmp_path, "pchmr-broken", "raise RuntimeError('boom')\n", ep_name="broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PCHMR_DISABLE_PLUGINS", "broken")
    registry = Registry()
    registry.load_entry_points()
    assert "fastmetro" in registry.names("backbone")


def test_two_plugins_offering_one_name_are_refused():
    class A:
        @hookimpl
        def pchmr_partitioners(self):
            return {"same": object()}

    class B:
        @hookimpl
        def pchmr_partitioners(self):
            return {"same": object()}

    registry = Registry()
    registry.register(A(), name="a", distribution="dist-a", version="1")
    with pytest.raises(DuplicatePluginError, match=r"partitioner 'same'.*'a' \(dist-a 1\) and 'b' \(dist-b 2\)"):
        registry.register(B(), name="b", distribution="dist-b", version="2")


def test_hook_returning_a_non_mapping_is_a_load_error():
    class Bad:
        @hookimpl
        def pchmr_backbones(self):
            return ["not", "a", "mapping"]

    with pytest.raises(PluginLoadError, match="must return a mapping"):
        Registry().register(Bad(), name="bad", distribution="bad-dist")


def test_core_imports_without_any_plugin():
    code = (
        "import sys, pchmr.core, pchmr.core.engine.registry, pchmr.core.engine.module, pchmr.core.engine.federation, pchmr.core.engine.run\n"
        "bad = [m for m in sys.modules if m.startswith('pchmr.plugins') or m.startswith('pchmr.cli')]\n"
        "assert not bad, bad\n"
        "from pchmr.core.engine.registry import Registry, UnknownPluginError\n"
        "r = Registry()\n"
        "try:\n"
        "    r.get('backbone', 'fastmetro')\n"
        "except UnknownPluginError as e:\n"
        "    assert 'no backbone plugin is registered' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('expected UnknownPluginError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
