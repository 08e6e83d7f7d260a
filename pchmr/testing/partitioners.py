"""Contract suite for partitioner plugins (:class:`~pchmr.core.contracts.partition.Partitioner`).

Subclass :class:`PartitionerContract` in a test module and override the ``partitioner`` fixture
(the callable ``(data, num_clients, seed, options) -> Partition`` a plugin registers)::

    import pytest
    from pchmr.testing.partitioners import PartitionerContract

    class TestRoundRobin(PartitionerContract):
        @pytest.fixture(scope="class")
        @classmethod
        def partitioner(cls):
            return round_robin

        @pytest.fixture(scope="class")
        @classmethod
        def bad_options(cls):
            return {"stratify by a missing label": ({"stratify": "colour"}, "no label 'colour'")}

Other fixtures to override (class-scoped, written as classmethods like the above):

* ``data`` — the :class:`~pchmr.core.contracts.dataset.HMRData` to split (default :func:`contract_data`:
  :data:`CONTRACT_SAMPLES` samples of (3, 32, 32) images, every ``meta`` label of
  :data:`~pchmr.core.contracts.sample.META_KEYS` with 3 sources, 4 scenes, 6 actions and 8 subjects);
* ``num_clients`` (default :data:`CONTRACT_CLIENTS` = 4, the number of scenes) and ``options``
  (default ``{}``): a valid request;
* ``bad_options`` — ``{description: (options, regex)}``: each must raise ``ValueError`` (pchmr's
  :class:`~pchmr.core.contracts.partition.PartitionError` is one) whose message matches ``regex``;
* capability flags: ``covers_all`` (True: every sample goes to some client), ``uses_seed``
  (True: another seed gives other client sets; False for label-determined splits such as
  ``natural``);
* ``known_gaps`` — ``{check name: reason}``: those checks run as ``xfail`` with the reason.

Checks (test methods): the result is a :class:`~pchmr.core.contracts.partition.Partition` of
``num_clients`` clients, each a sorted 1-D int64 array of distinct indices in [0, N); clients are
non-empty and disjoint and (``covers_all``) cover every sample; the same seed gives the same
``partition.json`` bytes even when the global random generators (``random``, numpy, torch) were
reseeded in between, and the file loads back to the same clients; another seed gives another
file (the seed must at least be recorded in ``params``) and (``uses_seed``) other clients; the
data's labels are left untouched; an unknown option key, every ``bad_options`` entry, zero
clients and more clients than samples raise ``ValueError`` with a message naming the problem.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from pchmr.core.contracts.dataset import HMRData
from pchmr.core.contracts.partition import Partition, load_partition, save_partition
from pchmr.core.contracts.sample import META_KEYS

__all__ = [
    "CONTRACT_CLIENTS",
    "CONTRACT_SAMPLES",
    "CONTRACT_SEED",
    "PartitionerContract",
    "PartitionerFn",
    "contract_data",
    "partition_bytes",
    "reseed_global_generators",
]

PartitionerFn = Callable[[HMRData, int, int, Mapping[str, object]], Partition]

CONTRACT_SEED = 0
#: The seed of the "another seed" checks.
OTHER_SEED = CONTRACT_SEED + 1
#: Seed the global generators get between two same-seed calls (a partitioner must not use them).
GLOBAL_RESEED = 12345
CONTRACT_SAMPLES = 48
CONTRACT_CLIENTS = 4
CONTRACT_IMAGE_SIZE = 32
#: Samples of each source in :func:`contract_data` (unequal on purpose: 24 / 16 / 8).
SOURCE_COUNTS = {"studio": 24, "outdoor": 16, "indoor": 8}
#: Distinct values of the other labels (scene count = CONTRACT_CLIENTS, so ``natural`` fits).
LABEL_VALUES = {"scene": 4, "action": 6, "subject": 8}
#: Mean colour (normalised units) of each source's images and the per-pixel noise around it.
SOURCE_COLOURS = {"studio": (1.0, -0.5, -0.5), "outdoor": (-0.5, 1.0, -0.5), "indoor": (-0.5, -0.5, 1.0)}
IMAGE_NOISE = 0.5
#: An option key no partitioner knows.
UNKNOWN_OPTION = "contract-unknown-option"


def contract_data(
    num_samples: int = CONTRACT_SAMPLES, image_size: int = CONTRACT_IMAGE_SIZE, seed: int = CONTRACT_SEED
) -> HMRData:
    """A small :class:`HMRData` whose train items hold an ``image`` (3, S, S) float32 and ``meta``.

    Sources follow :data:`SOURCE_COUNTS` scaled to ``num_samples`` (in blocks: samples 0-23 are
    ``studio`` at the default size), images are the source's colour plus Gaussian noise (so
    feature-based partitioners see some structure); scene, action and subject cycle through
    their values over a seeded permutation. The test split is empty.
    """
    import torch

    if num_samples < sum(LABEL_VALUES.values()):
        raise ValueError(f"contract_data needs at least {sum(LABEL_VALUES.values())} samples, got {num_samples}")
    total = sum(SOURCE_COUNTS.values())
    counts = [count * num_samples // total for count in SOURCE_COUNTS.values()]
    counts[0] += num_samples - sum(counts)
    labels: dict[str, np.ndarray] = {"source": np.repeat(list(SOURCE_COUNTS), counts)}
    rng = np.random.default_rng(seed)
    for key, count in LABEL_VALUES.items():
        labels[key] = np.array([f"{key}-{i % count}" for i in rng.permutation(num_samples)])
    generator = torch.Generator().manual_seed(seed)
    train = []
    for i in range(num_samples):
        colour = torch.tensor(SOURCE_COLOURS[str(labels["source"][i])]).view(3, 1, 1)
        image = colour + IMAGE_NOISE * torch.randn(3, image_size, image_size, generator=generator)
        train.append({"image": image, "meta": {key: str(labels[key][i]) for key in META_KEYS}})
    return HMRData(train=train, test=[], labels=labels, protocol={"dataset": "contract", "ground_truth": "none"})


def partition_bytes(partition: Partition, path: Path) -> bytes:
    """The bytes :func:`~pchmr.core.contracts.partition.save_partition` writes for ``partition`` at ``path``."""
    save_partition(partition, path)
    return path.read_bytes()


def reseed_global_generators(seed: int = GLOBAL_RESEED) -> None:
    """Reseed Python's ``random``, numpy's legacy global generator and torch's default one."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _raises_value_error(call: Callable[[], object], pattern: str, what: str) -> None:
    """``call()`` must raise ValueError whose message matches ``pattern`` (re.search)."""
    try:
        call()
    except ValueError as exc:
        assert str(exc).strip(), f"{what}: the ValueError has an empty message"
        assert re.search(pattern, str(exc)), f"{what}: the message {str(exc)!r} does not match {pattern!r}"
        return
    pytest.fail(f"{what}: no ValueError was raised")


def _client_sets(partition: Partition) -> list[list[int]]:
    return [np.asarray(client).tolist() for client in partition.clients]


class PartitionerContract:
    """Checks every partitioner plugin must pass; see the module docstring for the fixtures."""

    # -- fixtures to override -------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def partitioner(cls) -> PartitionerFn:
        raise NotImplementedError("override the partitioner fixture: (data, num_clients, seed, options) -> Partition")

    @pytest.fixture(scope="class")
    @classmethod
    def data(cls) -> HMRData:
        return contract_data()

    @pytest.fixture(scope="class")
    @classmethod
    def num_clients(cls) -> int:
        return CONTRACT_CLIENTS

    @pytest.fixture(scope="class")
    @classmethod
    def options(cls) -> Mapping[str, object]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def covers_all(cls) -> bool:
        return True

    @pytest.fixture(scope="class")
    @classmethod
    def uses_seed(cls) -> bool:
        return True

    @pytest.fixture(scope="class")
    @classmethod
    def known_gaps(cls) -> Mapping[str, str]:
        return {}

    # -- plumbing -------------------------------------------------------------------------
    @pytest.fixture(autouse=True)
    def _mark_known_gaps(self, request: pytest.FixtureRequest, known_gaps: Mapping[str, str]) -> None:
        check = getattr(request.node, "originalname", request.node.name)
        if check in known_gaps:
            request.applymarker(pytest.mark.xfail(reason=known_gaps[check], strict=False))

    @pytest.fixture(scope="class")
    @classmethod
    def labels_before(cls, data: HMRData) -> dict[str, np.ndarray]:
        """A copy of ``data.labels`` taken before the partitioner first sees the data."""
        return {key: np.array(values, copy=True) for key, values in data.labels.items()}

    @pytest.fixture(scope="class")
    @classmethod
    def partition(
        cls, partitioner: PartitionerFn, data: HMRData, num_clients: int, options: Mapping[str, object],
        labels_before: dict[str, np.ndarray],
    ) -> Partition:  # fmt: skip
        """The partition of the valid request with :data:`CONTRACT_SEED`, computed once per class."""
        return partitioner(data, num_clients, CONTRACT_SEED, dict(options))

    @pytest.fixture(scope="class")
    @classmethod
    def other_partition(
        cls, partitioner: PartitionerFn, data: HMRData, num_clients: int, options: Mapping[str, object]
    ) -> Partition:
        """The same request with :data:`OTHER_SEED`."""
        return partitioner(data, num_clients, OTHER_SEED, dict(options))

    # -- checks: the result ---------------------------------------------------------------
    def test_returns_a_partition_of_num_clients(self, partition: Partition, num_clients: int) -> None:
        """The result is a Partition naming its method, with ``num_clients`` clients."""
        assert isinstance(partition, Partition), f"the partitioner returned {type(partition).__name__}, not a Partition"
        assert isinstance(partition.method, str) and partition.method, "Partition.method must name the partitioner"
        assert partition.num_clients == num_clients, f"{partition.num_clients} clients, {num_clients} were asked for"

    def test_clients_are_sorted_int64_indices(self, partition: Partition, data: HMRData) -> None:
        """Each client is a sorted 1-D int64 array of distinct indices in [0, N)."""
        n = len(data.train)  # type: ignore[arg-type]
        for cid, client in enumerate(partition.clients):
            assert isinstance(client, np.ndarray), f"client {cid} is a {type(client).__name__}, not a numpy array"
            assert client.ndim == 1 and client.dtype == np.int64, (
                f"client {cid} is {client.dtype} with shape {client.shape}, expected a 1-D int64 array"
            )
            assert (np.diff(client) > 0).all(), f"client {cid} is not sorted strictly increasing: {client[:10]}"
            if len(client):
                assert 0 <= client[0] and client[-1] < n, (
                    f"client {cid} holds indices {client[0]}..{client[-1]} outside [0, {n})"
                )

    def test_clients_are_non_empty_and_disjoint(self, partition: Partition) -> None:
        """No client is empty; no sample belongs to two clients."""
        sizes = [len(client) for client in partition.clients]
        assert min(sizes) > 0, f"clients {[c for c, s in enumerate(sizes) if s == 0]} hold no sample (sizes {sizes})"
        every = np.concatenate(partition.clients)
        values, counts = np.unique(every, return_counts=True)
        shared = values[counts > 1]
        assert len(shared) == 0, f"samples {shared[:10].tolist()} belong to more than one client"

    def test_clients_cover_every_sample(self, partition: Partition, data: HMRData, covers_all: bool) -> None:
        """Every sample belongs to some client (``covers_all``)."""
        if not covers_all:
            pytest.skip("covers_all is False")
        n = len(data.train)  # type: ignore[arg-type]
        missing = sorted(set(range(n)) - set(np.concatenate(partition.clients).tolist()))
        assert not missing, f"{len(missing)} of {n} samples belong to no client: {missing[:10]}"

    # -- checks: determinism --------------------------------------------------------------
    def test_same_seed_gives_the_same_file(
        self, partitioner: PartitionerFn, partition: Partition, data: HMRData, num_clients: int,
        options: Mapping[str, object], tmp_path: Path,
    ) -> None:  # fmt: skip
        """Same seed → identical partition.json bytes, whatever the global generators hold (two
        more calls, after reseeding them differently), and the file loads back to the clients."""
        first = partition_bytes(partition, tmp_path / "first.json")
        for offset in range(2):
            reseed_global_generators(GLOBAL_RESEED + offset)
            again = partitioner(data, num_clients, CONTRACT_SEED, dict(options))
            assert partition_bytes(again, tmp_path / f"again-{offset}.json") == first, (
                "the same seed gave another partition.json after the global random generators were reseeded: "
                "draw from a generator made from the seed (np.random.default_rng(seed)), never a global one"
            )
        loaded = load_partition(tmp_path / "again-0.json")
        assert _client_sets(loaded) == _client_sets(partition), "partition.json does not load back to the same clients"

    def test_other_seed_gives_another_file(
        self, partition: Partition, other_partition: Partition, tmp_path: Path
    ) -> None:
        """Another seed gives another partition.json (the seed is recorded in ``params`` at least)."""
        other = partition_bytes(other_partition, tmp_path / "other.json")
        assert other != partition_bytes(partition, tmp_path / "first.json"), (
            f"seeds {CONTRACT_SEED} and {OTHER_SEED} gave identical partition.json files; "
            "record the seed in Partition.params at least"
        )

    def test_other_seed_gives_other_clients(
        self, partition: Partition, other_partition: Partition, uses_seed: bool
    ) -> None:
        """Another seed gives other client sets (``uses_seed``)."""
        if not uses_seed:
            pytest.skip("uses_seed is False")
        assert _client_sets(other_partition) != _client_sets(partition), (
            f"seeds {CONTRACT_SEED} and {OTHER_SEED} gave the same client sets; set uses_seed=False if the split "
            "is determined by the labels alone"
        )

    def test_leaves_the_labels_untouched(
        self, partition: Partition, data: HMRData, labels_before: Mapping[str, np.ndarray]
    ) -> None:
        """``data.labels`` after the partitioner ran equal the copy taken before it first ran."""
        changed = [key for key in labels_before if not np.array_equal(labels_before[key], data.labels[key])]
        assert not changed, f"the partitioner modified data.labels {changed}"

    # -- checks: bad requests -------------------------------------------------------------
    def test_rejects_an_unknown_option(
        self, partitioner: PartitionerFn, data: HMRData, num_clients: int, options: Mapping[str, object]
    ) -> None:
        """An unknown option key raises ValueError naming it."""
        bad = {**options, UNKNOWN_OPTION: 1}
        _raises_value_error(
            lambda: partitioner(data, num_clients, CONTRACT_SEED, bad), re.escape(UNKNOWN_OPTION),
            f"option {UNKNOWN_OPTION}=1 (the message must name the unknown key)",
        )  # fmt: skip

    def test_rejects_bad_options(
        self, partitioner: PartitionerFn, data: HMRData, num_clients: int,
        bad_options: Mapping[str, tuple[Mapping[str, object], str]],
    ) -> None:  # fmt: skip
        """Every ``bad_options`` entry raises ValueError whose message matches its regex."""
        if not bad_options:
            pytest.skip("no bad_options given")
        for description, (options, pattern) in bad_options.items():
            _raises_value_error(
                lambda options=options: partitioner(data, num_clients, CONTRACT_SEED, dict(options)), pattern,
                f"{description} ({dict(options)})",
            )  # fmt: skip

    def test_rejects_zero_clients(
        self, partitioner: PartitionerFn, data: HMRData, options: Mapping[str, object]
    ) -> None:
        """Zero clients raise ValueError naming the client count."""
        _raises_value_error(
            lambda: partitioner(data, 0, CONTRACT_SEED, dict(options)),
            r"(?i)client",
            "0 clients (name the client count)",
        )

    def test_rejects_more_clients_than_samples(
        self, partitioner: PartitionerFn, data: HMRData, options: Mapping[str, object]
    ) -> None:
        """More clients than samples raise ValueError naming the requested count."""
        too_many = len(data.train) + 1  # type: ignore[arg-type]
        _raises_value_error(
            lambda: partitioner(data, too_many, CONTRACT_SEED, dict(options)), rf"\b{too_many}\b",
            f"{too_many} clients for {too_many - 1} samples (name the requested count)",
        )  # fmt: skip
