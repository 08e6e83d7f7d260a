"""The house rules, checked: layers (import-linter), no import cycle (lazy imports included), an
engine that names no built-in plugin, a plugin surface that stays inside the contracts and the
kit, and ruff's lint and format."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pchmr"
BIN = Path(sys.executable).parent  # the venv's tools, also when it is not activated
CONTRACTS = (
    "Layers: cli over report and testing over the engine over the kit over the contracts",
    "The core, the CLI, the reports and the contract suites never import a plugin",
    "The contracts import neither Flower nor Lightning nor Ray at run time",
    "The plugin surface (pchmr.api) and the kit never reach the engine",
    "Plugins use the contracts and the kit, never the engine, the CLI, the reports or the suites",
)


# ----------------------------------------------------------------------------- import graph
def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module under ``package_dir`` (a package's name is its
    directory's)."""
    base = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(base).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module ``tree`` imports, at any depth (imports inside functions run lazily but run),
    except under ``if TYPE_CHECKING:``, which never runs."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module → the modules of the same package it imports (a ``from pkg import name`` that names
    a submodule counts as importing it)."""
    files = module_files(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_pchmr_has_no_import_cycle_lazy_imports_included() -> None:
    cycles = import_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles (modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    """Prepare a package whose two modules import each other, one of them inside a function;
    the same check as above must report it (and ignore a TYPE_CHECKING import)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def later():\n    from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "d.py").write_text("import pkg.c\n")

    cycles = import_cycles(import_graph(pkg))

    assert cycles == [["pkg.a", "pkg.sub.b"]]


def test_the_import_graph_sees_our_real_edges() -> None:
    """The graph is not empty by accident: known edges of pchmr are in it."""
    graph = import_graph(PACKAGE)
    assert "pchmr.core.contracts.backbone" in graph["pchmr.core.engine.module"]
    assert "pchmr.core.engine.federation.client" in graph["pchmr.core.engine.federation.simulation"]
    assert "pchmr.plugins.privacy.secagg.flower" in graph["pchmr.plugins.privacy.secagg"]  # lazy, inside secagg()


# ----------------------------------------------------------------------------- layers
def test_import_linter_contracts_are_kept() -> None:
    result = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())  # import-linter wraps long contract names
    for name in CONTRACTS:
        assert f"{name} KEPT" in text, f"contract {name!r} not reported as kept:\n{result.stdout}"


def _builtin_plugin_names() -> set[str]:
    """Every name a built-in entry point registers, for every plugin kind."""
    from pchmr.core.engine.registry import get_registry

    registry = get_registry()
    return {info.name for info in registry.infos() if info.distribution == "pchmr"}


def test_the_engine_names_no_builtin_plugin_outside_the_config() -> None:
    """Defaults live in the config (RunConfig's fields and the few named constants beside it);
    anywhere else in the engine a built-in plugin's name is a hidden dependency."""
    names = _builtin_plugin_names()
    assert {"anny", "synthetic", "mixed", "fastmetro", "fedavg", "iid"} <= names
    found = []
    for path in sorted((PACKAGE / "core" / "engine").rglob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "built-in plugin names in the engine:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- the plugin surface
def test_every_api_name_resolves_to_a_contract_or_kit_module() -> None:
    import pchmr.api as api

    assert len(api.__all__) > 100
    for name in api.__all__:
        home = api._EXPORTS[name]
        assert home.split(".")[0] in ("contracts", "kit"), f"{name} lives in pchmr.core.{home}"
        assert getattr(api, name) is getattr(importlib.import_module(f"pchmr.core.{home}"), name)
    with pytest.raises(AttributeError, match=r"pchmr.api has no 'HMRModule'"):
        api.HMRModule  # noqa: B018 - the engine's training loop is not part of the plugin surface


@pytest.mark.parametrize("module", sorted(m for m in module_files(PACKAGE) if m.startswith("pchmr.core.contracts.")))
def test_the_api_offers_every_public_name_of_every_contract_module(module: str) -> None:
    import pchmr.api as api

    public = set(importlib.import_module(module).__all__) - {"hookspec"}
    assert public <= set(api.__all__), f"missing from pchmr.api: {sorted(public - set(api.__all__))}"


def test_importing_the_api_imports_nothing_heavy() -> None:
    code = "import sys, pchmr.api; print(sorted(m for m in ('torch', 'torchmetrics', 'flwr') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_example_plugin_package_imports_only_the_api_and_the_suites() -> None:
    source = ROOT / "examples" / "plugin-package"
    bad = []
    for path in sorted(source.rglob("*.py")):
        for target in _imports(ast.parse(path.read_text()), "pchmr_example_plugins.x", False):
            if target.startswith("pchmr.") and not target.startswith(("pchmr.api", "pchmr.testing")):
                bad.append(f"{path.relative_to(ROOT)}: {target}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- style
def test_ruff_lint_passes() -> None:
    result = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied() -> None:
    result = subprocess.run([str(BIN / "ruff"), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ruff_ignore_says_why() -> None:
    """Each ignored rule has a comment on its line, or continues a commented group (``"RUF001",  #
    why`` then ``"RUF002",``)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("[tool.ruff.lint]") :]
    previous_commented = False
    rules = 0
    for line in block.splitlines():
        stripped = line.strip()
        codes = [part.strip(' "[],') for part in stripped.split("#")[0].split(",")]
        if not any(code[:1].isupper() and code[-1:].isdigit() for code in codes):
            previous_commented = False
            continue
        if stripped.startswith("select"):
            continue
        rules += 1
        commented = "#" in stripped
        assert commented or previous_commented, f"a ruff ignore without its reason: {stripped}"
        previous_commented = previous_commented or commented
    assert rules >= 5


def test_the_distribution_declares_ruff_and_import_linter_for_the_tests() -> None:
    requires = md.requires("pchmr") or []
    assert any(r.startswith("ruff") and 'extra == "test"' in r for r in requires), requires
    assert any(r.startswith("import-linter") and 'extra == "test"' in r for r in requires), requires
