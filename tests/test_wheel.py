"""The wheel stands alone: built with ``python -m build``, installed into a new venv outside the
checkout, it lists its plugins, runs a packaged paper config at smoke scale and passes the example
plugin package's own contract tests.

The venv gets torch first, as scripts/install.sh does (the build the tests run with, so pip never
picks one), then ``pchmr-*.whl[testing]`` under constraints.txt, then a copy of
examples/plugin-package. Every command runs from a directory outside the checkout, so nothing can
be imported from the sources.

Two variables run the same checks elsewhere:
* ``PCHMR_WHEEL_PYTHON``: the interpreter of the new venv (e.g. a Python 3.12; default: the one
  running the tests);
* ``PCHMR_WHEEL_TORCH``: the torch requirement installed first (default ``torch==<this torch>``,
  e.g. ``torch==2.13.0+cpu``);
* ``PCHMR_WHEEL_CONFIG``: the packaged paper config run at smoke scale (:data:`PAPER_CONFIG`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest
import torch

from pchmr.core.engine.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-package"
#: The packaged paper config run at smoke scale: by default the quickest (a naive single-device baseline,
#: ~15 s; Flower and Ray run in the example package's PrivacyContract simulation);
#: PCHMR_WHEEL_CONFIG=paper:table01-fastmetro-s-fedavg-10-10-iid runs a federated one (~80 s).
PAPER_CONFIG = os.environ.get("PCHMR_WHEEL_CONFIG", "paper:table09-fastmetro-s-naive-5pct")
#: Generous bounds for a busy machine: building ~30 s, installing ~90 s, the smoke run ~1-2 min.
BUILD_TIMEOUT_S = 600
INSTALL_TIMEOUT_S = 1200
RUN_TIMEOUT_S = 1200

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    work: Path  # the working directory of every command: outside the checkout
    example_tests: Path
    log: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def run(self, *args: str, timeout: float = RUN_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
        env = clean_env(COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        done = subprocess.run(args, cwd=self.work, env=env, capture_output=True, text=True, timeout=timeout)
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(args)}\n{done.stdout}\n{done.stderr}\nexit {done.returncode}\n")
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would let a process import from elsewhere than its own venv
    (PYTHONPATH: a simulation earlier in the session may have set it; a user may have), nor pchmr's
    test switches (the cache directory aside)."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONUSERBASE", "PIP_TARGET", "PIP_PREFIX", "PIP_USER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env = {k: v for k, v in env.items() if not k.startswith("PCHMR_") or k == "PCHMR_CACHE_DIR"}
    return {**env, **extra}


def _pip(python: Path, *args: str, log: Path) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=clean_env())
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}\n")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    log = root / "log.txt"
    dist = root / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=clean_env(),
    )  # fmt: skip
    log.write_text(f"$ python -m build\n{build.stdout}\n{build.stderr}\n")
    if build.returncode != 0:
        pytest.fail(f"python -m build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    (wheel,) = dist.glob("pchmr-*.whl")
    assert len(list(dist.glob("pchmr-*.tar.gz"))) == 1, "the sdist the wheel was built from"

    venv = root / "venv"
    interpreter = os.environ.get("PCHMR_WHEEL_PYTHON") or getattr(sys, "_base_executable", sys.executable)
    made = subprocess.run(
        [interpreter, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300, env=clean_env()
    )
    if made.returncode != 0:
        pytest.fail(f"{interpreter} -m venv failed (PCHMR_WHEEL_PYTHON names the interpreter):\n{made.stderr[-2000:]}")
    python = venv / "bin" / "python"
    _pip(python, os.environ.get("PCHMR_WHEEL_TORCH") or f"torch=={torch.__version__}", log=log)
    _pip(python, "-c", str(ROOT / "constraints.txt"), f"{wheel}[testing]", log=log)
    example = root / "example-plugin-package"
    shutil.copytree(
        EXAMPLE, example, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    )
    _pip(python, "-c", str(ROOT / "constraints.txt"), str(example), log=log)
    work = root / "work"
    work.mkdir()
    return Installed(wheel, venv, work, example / "tests", log)


def test_the_wheel_holds_the_package_its_configs_and_licence_and_no_exact_pin(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    paper = [n for n in names if n.startswith("pchmr/configs/paper/") and n.endswith(".toml")]
    assert len(paper) == len(list((ROOT / "pchmr" / "configs" / "paper").glob("*.toml"))) == 83
    assert {"pchmr/configs/sweeps/strategies.toml", "pchmr/configs/settings/noniid-conflict.toml"} <= set(names)
    assert "pchmr/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "docs/", "benchmarks/", "scripts/"))]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(zipfile.ZipFile(installed.wheel).read(metadata).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch") for r in requires) and not [r for r in requires if "==" in r.split(";")[0]]


def test_pchmr_comes_from_the_venv_not_the_checkout(installed: Installed) -> None:
    where = installed.run(
        str(installed.bin / "python"), "-c", "import pchmr, sys; print(pchmr.__file__); print(sys.prefix)"
    )
    module, prefix = where.stdout.split()
    assert Path(module).is_relative_to(installed.venv) and Path(prefix) == installed.venv
    assert not Path(module).is_relative_to(ROOT)


def test_pchmr_plugins_lists_the_built_in_and_the_example_plugins(installed: Installed) -> None:
    listed = installed.run(str(installed.bin / "pchmr"), "plugins").stdout
    for name in ("fastmetro", "tore", "fedavg", "fedgh", "lda", "deposer", "secagg", "dp", "anny", "synthetic"):
        assert name in listed
    for name in (
        "example-cnn",
        "round-robin",
        "example-ellipsoid",
        "example-turntable",
        "example-rest-fit",
        "example-clip",
    ):
        assert name in listed, f"the example package's {name}"


def test_a_packaged_paper_config_runs_at_smoke_scale(installed: Installed) -> None:
    out = installed.work / "runs" / "smoke"
    installed.run(str(installed.bin / "pchmr"), "run", "--config", PAPER_CONFIG, "--scale", "smoke", "--out", str(out))
    config = json.loads((out / "config.json").read_text())["run"]
    expected = load_config_file(PAPER_CONFIG, scale="smoke")  # the checkout's copy of the same file
    assert {key: config[key] for key in expected if key in config} == expected
    length = config["rounds"] if config["mode"] == "federated" else config["epochs"]
    final = json.loads((out / "final.json").read_text())
    assert final["round"] == length and all(math.isfinite(final[k]) for k in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm"))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(length + 1))
    assert (out / "model.pt").is_file()


def test_without_crypten_its_backend_is_refused_naming_the_install(installed: Installed) -> None:
    refused = installed.run(
        str(installed.bin / "pchmr"), "run", "--config", "paper:table08-tore-s-secagg-10-10-iid", "--scale", "smoke",
        "--out", str(installed.work / "runs" / "secagg"), check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "pip install 'pchmr[crypten]'" in message and "--no-deps crypten==0.4.1" in message
    assert not (installed.work / "runs" / "secagg" / "rounds.jsonl").exists()


def test_the_example_plugin_packages_contract_tests_pass(installed: Installed) -> None:
    """Its tests run pchmr's BackboneContract (toy body, Anny), PartitionerContract,
    BodyModelContract, DatasetContract, PrivacyContract (with a real Flower simulation) and
    AnnotatorContract on its plugins."""
    done = installed.run(
        str(installed.bin / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(installed.example_tests),
        check=False,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"the example package's tests failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in summary, summary
    for outcome in ("failed", "error", "skipped", "xfail", "xpass"):
        assert outcome not in summary, f"no check may be {outcome}: {summary}"
