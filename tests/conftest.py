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
