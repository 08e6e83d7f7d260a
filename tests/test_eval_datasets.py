"""``--eval-datasets``: the members of a mixed ``--dataset`` whose test splits are evaluated."""

import pytest

from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.engine.components import dataset_resolution
from pchmr.core.engine.registry import get_registry
from pchmr.testing.fake_datasets import write_spin_npz
from tests.test_datasets_spin import StubBody


def test_eval_datasets_choose_the_members_evaluated_on(tmp_path):
    """The PCHMR paper's mixed-set rows train on every member and evaluate on Human3.6M alone."""
    from pchmr.plugins.datasets.prepared import DatasetFormatError

    root = tmp_path / "data"
    extras = root / "dataset_extras"
    write_spin_npz(extras / "h36m_train.npz", 4, seed=1, images_dir=root / "h36m")
    write_spin_npz(extras / "h36m_valid_protocol2.npz", 3, seed=2, images_dir=root / "h36m")
    write_spin_npz(extras / "mpi_inf_3dhp_train.npz", 4, seed=3, images_dir=root / "mpi_inf_3dhp")
    write_spin_npz(extras / "mpi_inf_3dhp_valid.npz", 2, seed=4, images_dir=root / "mpi_inf_3dhp")
    write_spin_npz(extras / "mpii_train.npz", 5, seed=5, images_dir=root / "mpii", with_3d=False)
    mixed = get_registry().get("dataset", "mixed")

    def load(eval_datasets):
        _name, options = dataset_resolution("h36m,mpi-inf-3dhp,mpii", eval_datasets=eval_datasets)
        return mixed(DatasetSpec(32, 0, tmp_path / "cache", str(root), options=options), StubBody())

    everything = load(None)
    assert len(everything.test) == 3 + 2
    assert "test h36m+mpi-inf-3dhp" in everything.protocol["dataset"]
    h36m = load("h36m")
    assert dataset_resolution("h36m,mpii", eval_datasets="h36m")[1] == {"datasets": "h36m,mpii", "test": "h36m"}
    assert len(h36m.train) == len(everything.train), "the training set is every member's"
    assert len(h36m.test) == 3 and "test h36m," in h36m.protocol["dataset"]
    with pytest.raises(DatasetFormatError, match="mpii cannot be evaluated on: its test split has no 3D joints"):
        load("h36m,mpii")
    with pytest.raises(DatasetFormatError, match=r"evaluated members \['coco'\] must be members"):
        load("coco")
