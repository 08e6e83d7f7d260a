"""The iid partitioner and the partition file."""

import numpy as np
import pytest

from pchmr.core.contracts.partition import (
    PartitionError,
    load_partition,
    save_partition,
)
from pchmr.plugins.partitioners.iid import iid


class FakeData:
    """The part of HMRData a label partitioner reads."""

    def __init__(self, labels):
        self.labels = labels
        self.train = range(len(next(iter(labels.values()))))


def labels(n):
    return FakeData(
        {"source": np.array([("a", "b")[i % 2] for i in range(n)]), "subject": np.array([str(i % 7) for i in range(n)])}
    )


def test_iid_covers_every_sample_once_in_near_equal_clients():
    part = iid(labels(103), 10, seed=3, options={})
    sizes = part.sizes()
    assert sizes.sum() == 103 and sizes.max() - sizes.min() <= 1
    assert sorted(np.concatenate(part.clients).tolist()) == list(range(103))


def test_same_seed_same_file_bytes_other_seed_differs(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_partition(iid(labels(50), 5, seed=1, options={}), a)
    save_partition(iid(labels(50), 5, seed=1, options={}), b)
    assert a.read_bytes() == b.read_bytes()
    save_partition(iid(labels(50), 5, seed=2, options={}), b)
    assert a.read_bytes() != b.read_bytes()
    assert load_partition(a).sizes().tolist() == [10] * 5


def test_tampered_partition_file_is_refused(tmp_path):
    path = tmp_path / "p.json"
    save_partition(iid(labels(20), 2, seed=0, options={}), path)
    path.write_text(path.read_text().replace('"num_clients": 2', '"num_clients": 1', 1))
    with pytest.raises(PartitionError, match="content hash mismatch"):
        load_partition(path)


def test_more_clients_than_samples_is_refused():
    with pytest.raises(PartitionError, match="cannot split 4 training samples into 5"):
        iid(labels(4), 5, seed=0, options={})
