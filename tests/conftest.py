"""Shared fixtures: one cache directory per test session for prepared data and mesh pyramids."""

import os

import pytest


@pytest.fixture(scope="session")
def pchmr_cache(tmp_path_factory):
    """Point PCHMR_CACHE_DIR at a session cache unless the caller set one (CI keeps ~/.cache)."""
    if "PCHMR_CACHE_DIR" in os.environ:
        yield os.environ["PCHMR_CACHE_DIR"]
        return
    path = str(tmp_path_factory.mktemp("pchmr-cache"))
    os.environ["PCHMR_CACHE_DIR"] = path
    yield path
    del os.environ["PCHMR_CACHE_DIR"]


@pytest.fixture(scope="session")
def tiny_finished_run(tmp_path_factory, pchmr_cache):
    """One finished run with its model.pt, as small as a run gets: centralized, one optimizer step
    on 8 samples, the CNN from scratch, 8 test samples. The report tests (prediction grids, the
    HTML page) read it, or copies of it."""
    from pchmr.core.engine.config import RunConfig
    from pchmr.core.engine.run import execute

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    config = RunConfig(mode="centralized", epochs=1, num_train=8, num_test=8, batch_size=8, encoder_weights="none",
                       cache_dir=str(pchmr_cache))  # fmt: skip
    return execute(config, run_dir=run_dir).run_dir.path


@pytest.fixture(scope="session")
def tiny_federated_run(tmp_path_factory, pchmr_cache):
    """The attack contract suite's finished federated run (pchmr.testing.attacks.contract_run: 2
    clients, 1 round, 24 samples, the CNN from scratch), made once: the audit tests and the attack
    suites read it."""
    from pchmr.testing.attacks import contract_run

    return contract_run(tmp_path_factory.mktemp("tiny-federated") / "run")
