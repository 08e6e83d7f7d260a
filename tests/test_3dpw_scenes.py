"""3DPW's ``scene`` label: the sequence without its take index, so that the natural partition of
the real training split makes the PCHMR paper's 20 devices (Table 4, "Natural Part." 20/5)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.contracts.partition import PartitionError
from pchmr.plugins.datasets.pw3d import make_3dpw, sequence_labels
from pchmr.plugins.datasets.spin_npz import labels_from_imgnames
from pchmr.plugins.partitioners.natural import natural
from pchmr.testing.fake_datasets import write_3dpw_sequence
from tests.test_datasets_spin import StubBody

#: 3DPW's official training split (``sequenceFiles/train``, 24 sequences); docs/paper.md says
#: where the list was checked.
TRAIN_SEQUENCES = (
    "courtyard_arguing_00", "courtyard_backpack_00", "courtyard_basketball_00", "courtyard_bodyScannerMotions_00",
    "courtyard_box_00", "courtyard_capoeira_00", "courtyard_captureSelfies_00", "courtyard_dancing_01",
    "courtyard_giveDirections_00", "courtyard_golf_00", "courtyard_goodNews_00", "courtyard_jacket_00",
    "courtyard_laceShoe_00", "courtyard_rangeOfMotions_00", "courtyard_relaxOnBench_00", "courtyard_relaxOnBench_01",
    "courtyard_shakeHands_00", "courtyard_warmWelcome_00", "outdoors_climbing_00", "outdoors_climbing_01",
    "outdoors_climbing_02", "outdoors_freestyle_00", "outdoors_slalom_00", "outdoors_slalom_01",
)  # fmt: skip
#: The paper's natural partition: 20 devices, 5 per round.
PAPER_DEVICES = 20


def test_sequence_labels_drop_the_take_index():
    assert sequence_labels("courtyard_relaxOnBench_01") == ("courtyard_relaxOnBench", "relaxOnBench")
    assert sequence_labels("outdoors_climbing_02") == ("outdoors_climbing", "climbing")
    assert sequence_labels("courtyard_box") == ("courtyard_box", "box")
    assert sequence_labels("odd") == ("odd", "unknown")


def test_the_24_real_training_sequences_give_the_papers_20_devices():
    assert len(TRAIN_SEQUENCES) == len(set(TRAIN_SEQUENCES)) == 24
    scenes = np.array([sequence_labels(s)[0] for s in TRAIN_SEQUENCES])
    assert len(set(scenes)) == PAPER_DEVICES  # 17 courtyard activities + climbing, freestyle, slalom
    assert len({s.split("_")[0] for s in TRAIN_SEQUENCES}) == 2, "the location prefix alone gives 2 clients"
    part = natural(SimpleNamespace(labels={"scene": scenes}), PAPER_DEVICES, 0, {})
    assert part.num_clients == PAPER_DEVICES and all(len(c) > 0 for c in part.clients)
    assert sorted(len(c) for c in part.clients)[-3:] == [2, 2, 3]  # relaxOnBench, slalom; climbing 00-02
    with pytest.raises(PartitionError, match="has 20 values; --clients must be 20, got 2"):
        natural(SimpleNamespace(labels={"scene": scenes}), 2, 0, {})


def test_spin_and_metro_image_names_give_the_raw_loaders_scene():
    spin = [f"imageFiles/{s}/image_00000.jpg" for s in TRAIN_SEQUENCES]  # SPIN's 3dpw .npz imgname
    metro = [f"{s}/image_00000.jpg" for s in TRAIN_SEQUENCES]  # METRO's 3DPW TSV key (sequence/file_name)
    expected = [sequence_labels(s) for s in TRAIN_SEQUENCES]
    for names in (spin, metro):
        labels = labels_from_imgnames(np.array(names), "3dpw")
        assert list(zip(labels["scene"], labels["action"])) == expected
        assert list(labels["subject"]) == list(TRAIN_SEQUENCES)
    others = labels_from_imgnames(np.array(["images/S1_Directions_1.54138969_000001.jpg", "S1/Seq1/x.jpg",
                                            "train2014/COCO_train2014_000000000009.jpg"]), "x")  # fmt: skip
    assert list(others["scene"]) == ["unknown", "Seq1", "unknown"]


def test_raw_3dpw_takes_of_one_activity_are_one_scene(tmp_path):
    root = tmp_path / "3DPW"
    for seed, sequence in enumerate(("courtyard_relaxOnBench_00", "courtyard_relaxOnBench_01", "outdoors_climbing_02")):
        write_3dpw_sequence(root, sequence, "train", num_frames=2, num_people=1, seed=seed)
    write_3dpw_sequence(root, "downtown_walking_00", "test", num_frames=2, num_people=1, seed=9)
    data = make_3dpw(DatasetSpec(image_size=32, seed=0, cache_dir=tmp_path / "cache", path=str(root)), StubBody())
    assert sorted(set(data.labels["scene"])) == ["courtyard_relaxOnBench", "outdoors_climbing"]
    part = natural(data, 2, 0, {})
    assert [len(c) for c in part.clients] == [4, 2]
