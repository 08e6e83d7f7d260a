"""The lda, natural, by-source and cnn-cluster partitioners and the partition plots."""

import hashlib

import numpy as np
import pytest
import torch

from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.partition import Partition, PartitionError, save_partition
from pchmr.plugins.partitioners.by_source import allocate_clients, by_source
from pchmr.plugins.partitioners.cnn_cluster import assign_clusters, cnn_cluster
from pchmr.plugins.partitioners.lda import lda
from pchmr.plugins.partitioners.natural import natural
from pchmr.report import gini, label_entropy, plot_embedding, plot_partition

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCE_SHARES = {"studio": 0.35, "outdoor": 0.30, "indoor": 0.20, "sports": 0.15}


class FakeData:
    """The part of HMRData a partitioner reads: ``labels`` and ``train`` (items with an ``image``)."""

    def __init__(self, labels, images=None):
        self.labels = labels
        n = len(next(iter(labels.values())))
        self.train = [{"image": image} for image in images] if images is not None else range(n)


def mixed_labels(n=2000, seed=0):
    """``n`` samples: sources in SOURCE_SHARES proportions, 8 scenes, 6 actions (shuffled)."""
    rng = np.random.default_rng(seed)
    counts = np.round(np.array(list(SOURCE_SHARES.values())) * n).astype(int)
    source = rng.permutation(np.repeat(list(SOURCE_SHARES), counts))
    scene = np.array([f"scene-{i % 8}" for i in rng.permutation(n)])
    action = np.array([f"action-{i % 6}" for i in rng.permutation(n)])
    return FakeData({"source": source, "scene": scene, "action": action})


def colour_groups(per_group=16, size=32, seed=0):
    """Images of two colour groups: reddish (first half) and bluish (second half), noisy."""
    gen = torch.Generator().manual_seed(seed)
    red, blue = torch.tensor([1.5, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.5])
    colours = [red] * per_group + [blue] * per_group
    images = [c.view(3, 1, 1) + 0.3 * torch.randn(3, size, size, generator=gen) for c in colours]
    labels = {"source": np.array(["red"] * per_group + ["blue"] * per_group)}
    return FakeData(labels, images)


def file_bytes(partition, path):
    save_partition(partition, path)
    return path.read_bytes()


# ------------------------------------------------------------------------ determinism
@pytest.mark.parametrize(
    "partitioner, clients, options",
    [(lda, 10, {"alpha": 0.5}), (by_source, 7, {}), (natural, 8, {"label": "scene"})],
    ids=["lda", "by-source", "natural"],
)
def test_same_seed_gives_identical_file_and_covers_every_sample_once(tmp_path, partitioner, clients, options):
    data = mixed_labels(400)
    first = file_bytes(partitioner(data, clients, 3, options), tmp_path / "a.json")
    again = partitioner(data, clients, 3, options)
    assert file_bytes(again, tmp_path / "b.json") == first
    every = np.concatenate(again.clients)
    assert len(every) == len(np.unique(every)) == 400


@pytest.mark.parametrize("partitioner, clients", [(lda, 10), (by_source, 7)], ids=["lda", "by-source"])
def test_other_seed_gives_other_clients_and_another_file(tmp_path, partitioner, clients):
    data = mixed_labels(400)
    a, b = partitioner(data, clients, 1, {}), partitioner(data, clients, 2, {})
    assert any(not np.array_equal(x, y) for x, y in zip(a.clients, b.clients))
    assert file_bytes(a, tmp_path / "a.json") != file_bytes(b, tmp_path / "b.json")


def test_natural_ignores_the_seed_except_in_params():
    data = mixed_labels(400)
    a, b = natural(data, 8, 1, {}), natural(data, 8, 2, {})
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))


# -------------------------------------------------------------------------------- lda
def mean_over_seeds(alpha, seeds=range(3), clients=15):
    data = mixed_labels(2000)
    parts = [lda(data, clients, s, {"alpha": alpha}) for s in seeds]
    return (np.mean([label_entropy(p, data.labels, "source") for p in parts]),
            np.mean([gini(p.sizes()) for p in parts]))  # fmt: skip


def test_lda_entropy_falls_and_size_skew_rises_as_alpha_shrinks():
    entropy, size_gini = zip(*(mean_over_seeds(a) for a in (1000, 10, 1, 0.1)))
    assert all(hi > lo for hi, lo in zip(entropy, entropy[1:])), entropy
    assert entropy[0] > 1.85  # near the global entropy of the shares, 1.93 bits
    assert entropy[-1] < 1.0
    assert size_gini[-1] > 0.4 > 0.05 > size_gini[0], size_gini


def test_lda_records_every_parameter_including_defaults():
    part = lda(mixed_labels(400), 5, 7, {})
    assert {k: part.params[k] for k in ("alpha", "min_size", "label", "seed", "num_clients")} == {
        "alpha": 0.5, "min_size": 2, "label": "source", "seed": 7, "num_clients": 5}  # fmt: skip
    assert part.params["classes"] == ["indoor", "outdoor", "sports", "studio"]
    assert min(part.sizes()) >= 2


def test_lda_splits_any_label():
    part = lda(mixed_labels(400), 4, 0, {"label": "action", "alpha": 0.05, "min-size": 1})
    assert part.params["label"] == "action"
    assert label_entropy(part, mixed_labels(400).labels, "action") < 1.5


@pytest.mark.parametrize("alpha", [0, -1.0, 0.0])
def test_lda_refuses_non_positive_alpha(alpha):
    with pytest.raises(OptionError, match=rf"lda partitioner option 'alpha' must be a number > 0, got {alpha!r}"):
        lda(mixed_labels(100), 4, 0, {"alpha": alpha})


def test_lda_refuses_non_numeric_alpha_and_unknown_option():
    with pytest.raises(OptionError, match="option 'alpha' must be a number > 0, got 'lots'"):
        lda(mixed_labels(100), 4, 0, {"alpha": "lots"})
    with pytest.raises(OptionError, match=r"has no option 'beta'; its options are: alpha, label, min-size"):
        lda(mixed_labels(100), 4, 0, {"beta": 1})


def test_lda_unknown_label_lists_the_available_ones():
    with pytest.raises(
        OptionError, match=r"option 'label' must be a label of this dataset \(action, scene, source\), got 'colour'"
    ):
        lda(mixed_labels(100), 4, 0, {"label": "colour"})


def test_lda_gives_up_with_a_clear_error_when_min_size_cannot_be_met():
    data = FakeData({"source": np.array(["a", "b"] * 20)})
    with pytest.raises(PartitionError, match=r"alpha=0.01 gave all 10 clients at least min-size=2 .* in 1000 draws"):
        lda(data, 10, 0, {"alpha": 0.01})


# ---------------------------------------------------------------------------- natural
def test_natural_gives_one_client_per_value_in_sorted_order():
    data = FakeData({"scene": np.array(["b", "a", "c", "a", "b", "a"])})
    part = natural(data, 3, 0, {})
    assert [c.tolist() for c in part.clients] == [[1, 3, 5], [0, 4], [2]]
    assert part.params["values"] == ["a", "b", "c"] and part.params["label"] == "scene"


def test_natural_refuses_a_client_count_other_than_the_number_of_values():
    with pytest.raises(PartitionError, match=r"natural partition by 'scene' has 8 values; --clients must be 8, got 10"):
        natural(mixed_labels(100), 10, 0, {})


# -------------------------------------------------------------------------- by-source
def test_client_allocation_is_proportional_with_largest_remainders():
    # quotas (4.5, 2.7, 1.35, 0.45) -> floors, at least one (4, 2, 1, 1) -> +1 to remainder 0.7
    assert allocate_clients([50, 30, 15, 5], 9) == [4, 3, 1, 1]
    # quotas (5, 3, 1.5, 0.5) -> (5, 3, 1, 1) already 10
    assert allocate_clients([50, 30, 15, 5], 10) == [5, 3, 1, 1]
    # one per source forces (3, 1, 1, 1) = 6 > 4: the over-quota source gives two back
    assert allocate_clients([97, 1, 1, 1], 4) == [1, 1, 1, 1]


def test_by_source_clients_hold_one_source_split_evenly():
    labels = np.repeat(["a", "b", "c", "d"], [50, 30, 15, 5])
    part = by_source(FakeData({"source": labels}), 9, 0, {})
    assert part.params["allocation"] == {"a": 4, "b": 3, "c": 1, "d": 1}
    assert part.params["client_values"] == ["a"] * 4 + ["b"] * 3 + ["c", "d"]
    for client, value in zip(part.clients, part.params["client_values"]):
        assert set(labels[client]) == {value}
    assert part.sizes().tolist() == [13, 13, 12, 12, 10, 10, 10, 15, 5]


def test_by_source_needs_a_client_per_source():
    with pytest.raises(PartitionError, match=r"'source' has 4 values .* --clients must be at least 4, got 3"):
        by_source(mixed_labels(100), 3, 0, {})


# ------------------------------------------------------------------------ cnn-cluster
def test_cnn_cluster_separates_two_colour_groups_deterministically(tmp_path):
    data = colour_groups()
    state = torch.get_rng_state()
    part = cnn_cluster(data, 2, 5, {})
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert sorted(c.tolist() for c in part.clients) == [list(range(16)), list(range(16, 32))]
    assert file_bytes(part, tmp_path / "a.json") == file_bytes(cnn_cluster(data, 2, 5, {}), tmp_path / "b.json")
    assert part.params["clusters"] == 2 and part.params["encoder"] == "small" and part.params["weights"] is None


def test_more_clusters_than_clients_are_dealt_round_robin_by_size():
    # cluster sizes (5, 1, 3, 2): by size 0, 2, 3, 1 -> clients 0, 1, 0, 1
    ids = np.array([0] * 5 + [1] + [2] * 3 + [3] * 2)
    assert assign_clusters(ids, 4, 2) == [0, 1, 1, 0]
    assert assign_clusters(ids, 4, 4) == [0, 1, 2, 3]
    part = cnn_cluster(colour_groups(), 2, 0, {"clusters": 4})
    assert part.params["clusters"] == 4 and sorted(part.params["cluster_to_client"]) == [0, 0, 1, 1]


def test_cnn_cluster_refuses_fewer_clusters_than_clients_and_missing_weights():
    with pytest.raises(OptionError, match="option 'clusters' must be at least --clients 3 .*, got 2"):
        cnn_cluster(colour_groups(), 3, 0, {"clusters": 2})
    with pytest.raises(OptionError, match="option 'weights' must be an existing file .* or 'none', got '/nowhere.pt'"):
        cnn_cluster(colour_groups(), 2, 0, {"weights": "/nowhere.pt"})


def test_cnn_cluster_loads_encoder_weights_and_records_their_hash(tmp_path):
    from pchmr.core.kit.encoders import SmallEncoder

    path = tmp_path / "small.pt"
    torch.save(SmallEncoder(32).state_dict(), path)
    part = cnn_cluster(colour_groups(), 2, 0, {"weights": str(path), "encoder": "small"})
    assert part.params["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert part.params["init"] == "weights file"
    # with weights the encoder defaults to resnet50, which these small-encoder weights do not fit
    with pytest.raises(PartitionError, match="cannot build the resnet50 encoder: encoder weights in .* do not match"):
        cnn_cluster(colour_groups(), 2, 0, {"weights": str(path)})
    # 'none' unsets a file's weights (a config scale cannot delete the key): the seeded random encoder
    random = cnn_cluster(colour_groups(), 2, 0, {"weights": "none", "encoder": "small"})
    assert (random.params["weights"], random.params["init"]) == (None, "he-normal from seed")
    same = cnn_cluster(colour_groups(), 2, 0, {"encoder": "small"})
    assert all(np.array_equal(a, b) for a, b in zip(random.clients, same.clients, strict=True))


# ------------------------------------------------------------------------------ plots
def test_label_entropy_and_gini_match_hand_computed_values():
    part = Partition((np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])), "hand")
    labels = {"source": np.array(["a", "a", "b", "b", "a", "a", "a", "a"])}
    assert label_entropy(part, labels, "source") == pytest.approx(0.5)  # (1 bit + 0 bits) / 2
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n - 1) / n
    assert gini([1, 3]) == pytest.approx(0.25)  # sum |xi - xj| = 4 over 2 n^2 mean = 16


@pytest.mark.parametrize("clients", [6, 60])
def test_plots_write_non_empty_pngs(tmp_path, clients):
    data = mixed_labels(600)
    paths = plot_partition(lda(data, clients, 0, {"alpha": 1.0, "min-size": 1}), data.labels, "source", tmp_path)
    assert [p.name for p in paths] == ["partition-source-histogram.png", "partition-sizes.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_embedding_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (50, 8)), rng.normal(4, 1, (50, 8))])
    path = plot_embedding(features, np.repeat([0, 1], 50), tmp_path / "sub" / "embedding.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
