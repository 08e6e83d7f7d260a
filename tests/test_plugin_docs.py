"""Meta-tests that keep the contract suites and the hook reference (docs/plugins.md) honest: every
plugin kind has a suite in pchmr.testing and a section in the docs listing every check of its
suite, every check says what it checks, and the docs' examples import only the public surface
and pass their suites."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pchmr.testing
from pchmr.core.contracts.hookspecs import KINDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"
#: A docs example block starts with a comment naming the file it is: ``# acme_plugins/bodymodel.py``.
EXAMPLE_FILE = re.compile(r"\A# (\S+\.py)\n")
#: Generous bound for the examples' own test run (nine suites on toy inputs, ~30 s of CPU).
EXAMPLES_TIMEOUT_S = 600


def suite_name(kind: str) -> str:
    """``body_model`` → ``BodyModelContract``."""
    return "".join(part.capitalize() for part in kind.split("_")) + "Contract"


def suites() -> dict[str, type]:
    """Every ``*Contract`` pchmr.testing exports, by name."""
    return {name: getattr(pchmr.testing, name) for name in pchmr.testing.__all__ if name.endswith("Contract")}


def checks(suite: type) -> dict[str, object]:
    """The suite's check methods (``test_*``), inherited ones included."""
    return {name: member for name, member in inspect.getmembers(suite, inspect.isfunction) if name.startswith("test_")}


def sections() -> dict[str, str]:
    """kind → the text of its ``## `kind`: `hook``` section of docs/plugins.md."""
    text = DOCS.read_text()
    heads = list(re.finditer(r"^## `(\w+)`: `(\w+)`$", text, re.MULTILINE))
    out = {}
    for head, after in zip(heads, [*heads[1:], None]):
        out[head.group(1)] = text[head.start() : after.start() if after else len(text)]
    return out


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


# ----------------------------------------------------------------------------- suites
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_has_a_contract_suite_in_pchmr_testing(kind: str) -> None:
    name = suite_name(kind)
    assert name in suites(), f"pchmr.testing exports no {name} for plugin kind {kind!r}"
    assert checks(suites()[name]), f"{name} has no check (test_*) method"


def test_every_suite_is_named_after_a_plugin_kind() -> None:
    expected = {suite_name(kind) for kind in KINDS}
    assert set(suites()) <= expected, f"suites named after no kind: {sorted(set(suites()) - expected)}"


@pytest.mark.parametrize("name", sorted(suites()))
def test_every_check_of_every_suite_has_a_docstring(name: str) -> None:
    undocumented = [check for check, method in checks(suites()[name]).items() if not inspect.getdoc(method)]
    assert not undocumented, f"{name} checks without a docstring saying what they check: {undocumented}"


# ----------------------------------------------------------------------------- the docs
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_has_a_section_in_docs_plugins_md_naming_its_hook(kind: str) -> None:
    found = sections()
    assert kind in found, f"docs/plugins.md has no section '## `{kind}`: `{KINDS[kind]}`'"
    section = found[kind]
    assert section.startswith(f"## `{kind}`: `{KINDS[kind]}`"), f"the {kind} section must name the hook {KINDS[kind]}"
    assert f"def {KINDS[kind]}(" in section, f"the {kind} section must show the hook's signature"
    assert python_blocks(section), f"the {kind} section has no example"


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_docs_list_exactly_the_checks_of_the_kinds_suite(kind: str) -> None:
    section = sections()[kind]
    names = set(checks(suites()[suite_name(kind)]))
    listed = set(re.findall(r"^\| `(test_\w+)` \|", section, re.MULTILINE))
    assert names <= listed, f"docs/plugins.md ({kind}) does not list the checks {sorted(names - listed)}"
    assert listed <= names, f"docs/plugins.md ({kind}) lists checks {sorted(listed - names)} the suite lacks"
    assert f"`{suite_name(kind)}`" in section


def test_the_docs_examples_parse_and_import_only_the_public_surface() -> None:
    blocks = python_blocks(DOCS.read_text())
    assert len(blocks) >= 2 * len(KINDS)
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            bad = [m for m in modules if m.startswith("pchmr") and m.split(".")[:2] not in (["pchmr", "api"], ["pchmr", "testing"])]  # fmt: skip
            assert not bad, f"a docs example imports {bad}; plugins use pchmr.api (tests: pchmr.testing)"


def test_the_readme_links_the_hook_reference() -> None:
    assert "docs/plugins.md" in (ROOT / "README.md").read_text()


# ----------------------------------------------------------------------------- the examples run
IMPORT_TEST = """
import importlib
import pkgutil

import acme_plugins


def test_every_example_module_offers_its_plugins_through_its_hook():
    for info in pkgutil.iter_modules(acme_plugins.__path__):
        module = importlib.import_module(f"acme_plugins.{info.name}")
        hooks = [getattr(module, name) for name in dir(module) if name.startswith("pchmr_")]
        assert len(hooks) == 1, info.name
        offered = hooks[0]()
        assert offered and all(name.startswith("acme-") and callable(f) for name, f in offered.items())
"""


def test_the_docs_examples_pass_their_suites(tmp_path: Path) -> None:
    """Write every example block to the file its first line names, then run their tests in a fresh
    interpreter: each kind's minimal example passes that kind's suite, as the page promises."""
    files = {}
    for block in python_blocks(DOCS.read_text()):
        if match := EXAMPLE_FILE.match(block):
            files[match.group(1)] = block
    kinds_tested = {path for path in files if path.startswith("tests/")}
    assert len(kinds_tested) >= len(KINDS), f"docs examples with tests: {sorted(kinds_tested)}"
    for path, block in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(block)
    (tmp_path / "acme_plugins" / "__init__.py").write_text("")
    (tmp_path / "tests" / "test_imports.py").write_text(IMPORT_TEST)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=EXAMPLES_TIMEOUT_S)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"the docs examples fail their suites:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
