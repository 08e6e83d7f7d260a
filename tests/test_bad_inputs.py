"""The bad-input catalogue (``tests/bad_input_catalogue.py``), one test per case: every ``pchmr``
command refuses each bad input with the expected exit code and a message naming what was wrong
and what was expected, prints no traceback, and leaves the disk as it was.

Cases run in-process (typer's ``CliRunner``) in their own empty working directory. A case that
reached training would not be a bad input: the engine's training entry points are replaced by a
failure for the whole module, so such a case fails fast instead of training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app
from tests.bad_input_catalogue import BASE_RUN_ARGS, CASES, READ_ONLY, Case, normalise, read_only_is_writable

_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def _digest(path: Path) -> str:
    """SHA-256 of a file, remembered by (device, inode, size, mtime): the base run's checkpoints,
    hard-linked into many cases, are hashed once; a file written since has a new key."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[key]


def snapshot(root: Path) -> dict[str, str]:
    """Every file (its SHA-256) and directory under ``root``, by relative path."""
    return {
        str(path.relative_to(root)): "<dir>" if path.is_dir() and not path.is_symlink() else _digest(path)
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory, pchmr_cache) -> Path:
    """The finished run directory the run-directory cases copy: the catalogue's smallest run."""
    out = tmp_path_factory.mktemp("catalogue") / "base"
    result = CliRunner().invoke(app, [*BASE_RUN_ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module", autouse=True)
def no_training(base):
    """Any case that gets as far as training fails at once (it would not be a bad input); the base
    run is made first."""
    import pchmr.core.engine.run as engine_run

    def reached(*args, **kwargs):
        raise AssertionError("the case reached training: the input was accepted")

    patch = pytest.MonkeyPatch()
    for name in ("run_simulation", "run_baseline", "federate_on_deployment"):
        patch.setattr(engine_run, name, reached)
    yield
    patch.undo()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_cleanly(case: Case, base: Path, tmp_path: Path, monkeypatch) -> None:
    if case.needs_read_only and read_only_is_writable():
        pytest.skip(f"{READ_ONLY} is writable here")
    ws = tmp_path / "ws"
    ws.mkdir()
    for make in case.setup:
        make(ws, base)
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    for kept in case.keep:
        assert kept in before, f"keep names {kept}, which the setup did not make"

    result = CliRunner().invoke(app, list(case.argv))

    shown = normalise(result.output)
    traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not traceback and "Traceback" not in result.output, f"traceback: {result.exception!r}\n{result.output}"
    assert result.exit_code == case.code, f"exit {result.exit_code}, expected {case.code}:\n{result.output}"
    missing = [words for words in case.words if normalise(words) not in shown]
    assert not missing, f"the message lacks {missing}:\n{shown}"
    after = snapshot(ws)
    changed = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))
    assert not changed, f"a refused command changed the disk: {changed}"
    for path in case.absent:
        assert not (ws / path).exists(), f"{path} exists after the refusal"


def test_the_catalogue_covers_every_command() -> None:
    commands = {case.command for case in CASES}
    expected = {"run", "report", "sweep", "plugins", "partition", "annotate", "annotate-compare", "personalize", "profile",
                "data prepare", "data check", "privacy budget"}  # fmt: skip
    assert expected <= commands, sorted(expected - commands)
    assert len(CASES) >= 60
    assert all(case.words for case in CASES), "every case names the words its message must hold"
