"""The partitioner contract suite on every built-in partitioner, and proof that it can fail."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.partition import Partition, PartitionError
from pchmr.core.engine.registry import get_registry
from pchmr.testing.partitioners import (
    CONTRACT_CLIENTS,
    PartitionerContract,
    PartitionerFn,
    contract_data,
)

#: Built-in partitioner → (valid options, bad options {description: (options, message regex)}).
BUILTIN_CASES: dict[str, tuple[dict, dict]] = {
    "iid": ({}, {"any option": ({"alpha": 1.0}, r"iid partitioner takes no options, got 'alpha'")}),
    "lda": (
        {"alpha": 1.0},
        {
            "alpha = 0": ({"alpha": 0}, r"option 'alpha' must be a number > 0, got 0"),
            "alpha not a number": ({"alpha": "many"}, r"option 'alpha' must be a number > 0, got 'many'"),
            "missing label": (
                {"label": "colour"},
                r"option 'label' must be a label of this dataset \(.*source.*\), got 'colour'",
            ),
            "min-size too large": ({"min-size": 20}, r"min-size=20 × 4 clients needs 80 samples"),
        },
    ),
    "natural": (
        {},
        {"missing label": ({"label": "colour"}, r"option 'label' must be a label .*scene.*, got 'colour'")},
    ),
    "by-source": (
        {},
        {"missing label": ({"label": "colour"}, r"option 'label' must be a label .*source.*, got 'colour'")},
    ),
    "cnn-cluster": (
        {},
        {
            "fewer clusters than clients": (
                {"clusters": 2},
                r"option 'clusters' must be at least --clients 4 .*, got 2",
            ),
            "unknown encoder": ({"encoder": "vgg"}, r"option 'encoder' must be one of small, resnet50, got 'vgg'"),
            "batch-size 0": ({"batch-size": 0}, r"option 'batch-size' must be an integer >= 1, got 0"),
            "weights not a file": (
                {"weights": "/nonexistent/w.pt"},
                r"option 'weights' must be an existing file .*, got '/nonexistent/w.pt'",
            ),
        },
    ),
}
#: Partitioners whose client sets are fixed by the labels; the seed is only recorded.
SEED_FREE = {"natural"}
#: Checks a built-in fails today, with the reason (run as xfail until fixed).
KNOWN_GAPS: dict[str, dict[str, str]] = {}  # partitioner → {check: reason} for gaps to fix


def test_every_registered_builtin_partitioner_has_a_case() -> None:
    builtins = {info.name for info in get_registry().infos("partitioner") if info.distribution == "pchmr"}
    assert builtins == set(BUILTIN_CASES), f"add the new built-in partitioners {builtins - set(BUILTIN_CASES)} here"


@pytest.mark.parametrize("name", sorted(BUILTIN_CASES), scope="class")
class TestBuiltinPartitioners(PartitionerContract):
    @pytest.fixture(scope="class")
    @classmethod
    def partitioner(cls, name: str) -> PartitionerFn:
        return get_registry().get("partitioner", name)

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls, name: str) -> Mapping[str, object]:
        return BUILTIN_CASES[name][0]

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls, name: str) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return BUILTIN_CASES[name][1]

    @pytest.fixture(scope="class")
    @classmethod
    def uses_seed(cls, name: str) -> bool:
        return name not in SEED_FREE

    @pytest.fixture(scope="class")
    @classmethod
    def known_gaps(cls, name: str) -> Mapping[str, str]:
        return KNOWN_GAPS.get(name, {})


# --------------------------------------------------------------------------------------
# The suite must be able to fail: a partitioner breaking each clause is caught by its check.
# --------------------------------------------------------------------------------------
def _dealt(n: int, num_clients: int, order: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.sort(order[c::num_clients]).astype(np.int64) for c in range(num_clients))


def sound(data: HMRData, num_clients: int, seed: int, options: Mapping[str, object]) -> Partition:
    """Shuffle with a generator made from ``seed`` and deal in turn: passes every check."""
    if options:
        raise PartitionError(f"sound takes no options, got {sorted(options)}")
    n = len(data.train)
    if not 1 <= num_clients <= n:
        raise PartitionError(f"sound: --clients must lie in [1, {n}], got {num_clients}")
    order = np.random.default_rng(seed).permutation(n)
    return Partition(_dealt(n, num_clients, order), "sound", {"seed": seed})


def global_rng(data, num_clients, seed, options):
    order = np.random.permutation(len(data.train))  # numpy's global generator, not the seed
    return Partition(_dealt(len(data.train), num_clients, order), "global", {"seed": seed})


def drops_the_last_sample(data, num_clients, seed, options):
    order = np.random.default_rng(seed).permutation(len(data.train) - 1)
    return Partition(_dealt(len(data.train), num_clients, order), "drops", {"seed": seed})


def unsorted(data, num_clients, seed, options):
    order = np.random.default_rng(seed).permutation(len(data.train))
    return Partition(tuple(order[c::num_clients].astype(np.int64) for c in range(num_clients)), "unsorted", {})


def forgets_the_seed(data, num_clients, seed, options):
    order = np.arange(len(data.train))
    return Partition(_dealt(len(data.train), num_clients, order), "fixed", {})


def ignores_options(data, num_clients, seed, options):
    return sound(data, num_clients, seed, {})


def shuffles_labels(data, num_clients, seed, options):
    np.random.default_rng(seed).shuffle(data.labels["source"])  # in place: the caller's labels change
    return sound(data, num_clients, seed, {})


def numpy_errors(data, num_clients, seed, options):
    order = np.random.default_rng(seed).permutation(len(data.train))
    chunks = np.array_split(order, num_clients)  # 0 → "number sections must be larger than 0."
    return Partition(tuple(np.sort(c).astype(np.int64) for c in chunks), "numpy", {"seed": seed})


@pytest.fixture(scope="module")
def data() -> HMRData:
    return contract_data()


def _run(check: str, partitioner: PartitionerFn, data: HMRData, tmp_path: Path) -> None:
    """Call one check of the suite directly, with the suite's default fixtures (the labels are
    copied before the partitioner first runs, as the class-scoped fixtures do)."""
    method = getattr(PartitionerContract(), check)
    labels_before = {key: values.copy() for key, values in data.labels.items()}
    values = {
        "partitioner": lambda: partitioner, "data": lambda: data, "num_clients": lambda: CONTRACT_CLIENTS,
        "options": dict, "bad_options": dict, "covers_all": lambda: True, "uses_seed": lambda: True,
        "tmp_path": lambda: tmp_path, "partition": lambda: partitioner(data, CONTRACT_CLIENTS, 0, {}),
        "other_partition": lambda: partitioner(data, CONTRACT_CLIENTS, 1, {}), "labels_before": lambda: labels_before,
    }  # fmt: skip
    method(**{name: values[name]() for name in inspect.signature(method).parameters})


CHECKS = [name for name in dir(PartitionerContract) if name.startswith("test_") and name != "test_rejects_bad_options"]


@pytest.mark.parametrize("check", CHECKS)
def test_a_sound_partitioner_passes(check: str, data: HMRData, tmp_path: Path) -> None:
    _run(check, sound, data, tmp_path)


@pytest.mark.parametrize(
    ("flawed", "check", "message"),
    [
        (global_rng, "test_same_seed_gives_the_same_file", "global random generators were reseeded"),
        (drops_the_last_sample, "test_clients_cover_every_sample", r"1 of 48 samples belong to no client: \[47\]"),
        (unsorted, "test_clients_are_sorted_int64_indices", "is not sorted"),
        (forgets_the_seed, "test_other_seed_gives_another_file", "identical partition.json"),
        (forgets_the_seed, "test_other_seed_gives_other_clients", "same client sets"),
        (ignores_options, "test_rejects_an_unknown_option", "no ValueError"),
        (shuffles_labels, "test_leaves_the_labels_untouched", r"modified data.labels \['source'\]"),
        (numpy_errors, "test_rejects_zero_clients", r"the message .* does not match '\(\?i\)client'"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_the_suite_catches_a_broken_partitioner(flawed, check: str, message: str, tmp_path: Path) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception), match=message):
        _run(check, flawed, contract_data(), tmp_path)  # fresh data: a flaw may modify it


def test_bad_options_that_are_accepted_are_reported(data: HMRData) -> None:
    method = PartitionerContract().test_rejects_bad_options
    bad = {"negative alpha": ({"alpha": -1}, "alpha")}
    with pytest.raises(pytest.fail.Exception, match=r"negative alpha \(\{'alpha': -1\}\): no ValueError"):
        method(partitioner=ignores_options, data=data, num_clients=CONTRACT_CLIENTS, bad_options=bad)
