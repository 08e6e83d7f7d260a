"""pchmr as a distribution others install beside their own packages: every third-party module pchmr
and its tests import is declared in ``pyproject.toml`` (a core dependency, or the extra of the
optional feature that imports it), the ranges there hold the exact pins of ``constraints.txt``,
the extras the error messages name exist, and the licence file is the declared Apache-2.0.

The imports are read from the source (``ast``: imports inside functions included, those under
``if TYPE_CHECKING:`` left out, since they never run) and mapped to distributions through the
installed packages' records (``importlib.metadata.packages_distributions``), so a new undeclared
import fails here rather than on a user's machine."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
LOCAL = {"pchmr", "tests", "pchmr_example_plugins", "__future__"}

#: modules pchmr imports that pyproject.toml does not declare, and why; each only inside functions
NOT_DECLARED = {
    "crypten": "installed with pip install --no-deps crypten==0.4.1 (scripts/install.sh): its declared "
    "requirements include torchvision and the withdrawn 'sklearn' package; the crypten extra holds what it imports",
    "warp": "anny's own dependency (warp-lang): the anny plugin quiets its log when it is there (try/except ImportError)",
}


@dataclass(frozen=True)
class Import:
    module: str  # the top-level name: 'PIL' for `from PIL import Image`
    path: Path
    line: int
    lazy: bool  # inside a function: runs when it is called, not when the module is imported

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk(node: ast.AST, path: Path, lazy: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            for other in child.orelse:  # type: ignore[attr-defined]
                yield from _walk_one(other, path, lazy)
            continue
        yield from _walk_one(child, path, lazy)


def _walk_one(node: ast.AST, path: Path, lazy: bool) -> Iterator[Import]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module or ""]
    else:
        names = []
    for name in names:
        top = name.split(".")[0]
        if top and top not in sys.stdlib_module_names and top not in LOCAL:
            yield Import(top, path, node.lineno, lazy)  # type: ignore[attr-defined]
    inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    yield from _walk(node, path, inner)


def third_party_imports(*folders: Path) -> list[Import]:
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            found += _walk(ast.parse(path.read_text()), path, False)
    return found


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _distributions_of(module: str) -> frozenset[str]:
    return frozenset(_normalize(d) for d in md.packages_distributions().get(module, ()))


def declared(*extras: str) -> set[str]:
    """The distributions pyproject.toml declares: the core dependencies, plus the given extras
    (an extra naming ``pchmr[a,b]`` brings those extras too)."""
    names: set[str] = set()
    todo, seen = [None, *extras], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if _normalize(requirement.name) == "pchmr":
                todo.extend(requirement.extras)
            else:
                names.add(_normalize(requirement.name))
    return names


def _undeclared(imports: list[Import], allowed: set[str]) -> list[str]:
    problems = []
    for imp in imports:
        if imp.module in NOT_DECLARED:
            continue
        dists = _distributions_of(imp.module)
        if not dists:
            problems.append(f"{imp}: no installed distribution provides '{imp.module}'")
        elif not dists & allowed:
            problems.append(f"{imp}: '{imp.module}' (distribution {', '.join(sorted(dists))}) is not declared")
    return problems


# ----------------------------------------------------------------------------- every import declared
PACKAGE_IMPORTS = third_party_imports(ROOT / "pchmr")
SUITES = ROOT / "pchmr" / "testing"


def test_the_scan_sees_top_level_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nimport numpy as np\nif TYPE_CHECKING:\n    import flwr\n"
        "def f():\n    from PIL import Image\n    import os.path\n"
    )
    found = {(i.module, i.lazy) for i in third_party_imports(tmp_path)}
    assert found == {("numpy", False), ("PIL", True)}
    assert {i.module for i in PACKAGE_IMPORTS} >= {"torch", "flwr", "PIL", "cryptography", "crypten", "tensorboard"}


def test_every_module_pchmr_imports_is_a_declared_distribution() -> None:
    """Core dependencies or an extra; what is imported when pchmr's modules are imported (outside the
    contract suites) must be a core dependency, so an extra is only needed by the feature using it."""
    assert _undeclared(PACKAGE_IMPORTS, declared(*PROJECT["optional-dependencies"])) == []
    eager = [i for i in PACKAGE_IMPORTS if not i.lazy and SUITES not in i.path.parents]
    assert _undeclared(eager, declared()) == []


def test_the_contract_suites_need_only_the_testing_extra() -> None:
    assert _undeclared([i for i in PACKAGE_IMPORTS if SUITES in i.path.parents], declared("testing")) == []


def test_every_module_the_tests_import_is_in_the_test_extra() -> None:
    imports = third_party_imports(ROOT / "tests")
    assert _undeclared(imports, declared("test")) == []


def test_modules_left_undeclared_are_imported_only_inside_functions() -> None:
    eager = [str(i) for i in PACKAGE_IMPORTS if i.module in NOT_DECLARED and not i.lazy]
    assert eager == []
    assert {i.module for i in PACKAGE_IMPORTS} >= set(NOT_DECLARED), "a NOT_DECLARED entry pchmr no longer imports"


# ----------------------------------------------------------------------------- ranges and pins
def _requirements(extra: str | None = None) -> list[Requirement]:
    texts = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


def test_dependencies_are_ranges_and_the_exact_pins_live_in_constraints() -> None:
    pinned = [
        str(r) for extra in (None, *PROJECT["optional-dependencies"]) for r in _requirements(extra) if "==" in str(r)
    ]
    assert pinned == [], "an exact pin belongs in constraints.txt"
    ranges = {_normalize(r.name): r.specifier for r in _requirements()}
    pins = [
        Requirement(line.split("#")[0].strip())
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert {_normalize(p.name) for p in pins} >= {"torch", "flwr"}
    for pin in pins:
        (version,) = [Version(s.version) for s in pin.specifier]
        assert ranges[_normalize(pin.name)].contains(version), f"constraints.txt {pin} is outside pyproject's range"


def test_the_installed_versions_are_inside_the_declared_ranges() -> None:
    for extra in (None, *PROJECT["optional-dependencies"]):
        for requirement in _requirements(extra):
            if _normalize(requirement.name) == "pchmr":
                continue
            try:
                installed = Version(md.version(requirement.name))
            except md.PackageNotFoundError:
                continue  # an extra this environment left out
            assert requirement.specifier.contains(installed, prereleases=True), f"{requirement}: {installed} installed"


@pytest.mark.parametrize(
    "source, extra",
    [
        ("pchmr/core/engine/tracking.py", "tensorboard"),
        ("pchmr/core/engine/tracking.py", "mlflow"),
        ("pchmr/plugins/privacy/secagg/crypten_compat.py", "crypten"),
    ],
)
def test_the_extras_error_messages_name_exist(source: str, extra: str) -> None:
    assert extra in PROJECT["optional-dependencies"]
    text = (ROOT / source).read_text()
    assert f"pip install 'pchmr[{extra}]'" in text or f'"{extra}": ("' in text


def test_the_crypten_extra_holds_what_crypten_imports() -> None:
    names = {_normalize(r.name) for r in _requirements("crypten")}
    assert names == {"omegaconf", "onnx"}
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "--no-deps crypten==0.4.1" in install
    assert "crypten" in {e for r in _requirements("test") for e in r.extras}


# ----------------------------------------------------------------------------- licence
def test_the_licence_file_is_apache_2_0_and_declared() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
