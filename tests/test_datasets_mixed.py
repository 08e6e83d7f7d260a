"""Named datasets under a data root, mixed training sets with a source per sample, `pchmr data`."""

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.engine.components import dataset_resolution
from pchmr.core.engine.registry import get_registry
from pchmr.plugins.datasets.mixed import check_root, find_layout
from pchmr.plugins.partitioners.by_source import by_source
from pchmr.testing.fake_datasets import write_coco_keypoints, write_spin_npz
from tests.test_datasets_spin import StubBody


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    extras = root / "dataset_extras"
    write_spin_npz(extras / "h36m_train.npz", 6, seed=1, images_dir=root / "h36m")
    write_spin_npz(extras / "h36m_valid_protocol2.npz", 3, seed=2, images_dir=root / "h36m")
    write_spin_npz(extras / "mpii_train.npz", 5, seed=3, images_dir=root / "mpii", with_3d=False)
    write_coco_keypoints(root / "coco", "train2014", num_images=2, seed=4)
    write_coco_keypoints(root / "coco", "val2014", num_images=1, seed=5)
    return root


def test_named_datasets_find_their_layout(data_root):
    assert find_layout("h36m", data_root).format == "spin-npz"
    assert find_layout("coco", data_root).format == "coco-json"
    with pytest.raises(FileNotFoundError, match="up3d: no known layout under .*up3d/trainval.yaml"):
        find_layout("up3d", data_root)
    h36m = get_registry().get("dataset", "h36m")(DatasetSpec(32, 0, data_root / "cache", str(data_root)), StubBody())
    assert len(h36m.train) == 6 and len(h36m.test) == 3 and set(h36m.labels["source"]) == {"h36m"}


def test_mixed_set_keeps_a_source_per_sample_and_partitions_by_source(data_root):
    name, options = dataset_resolution("h36m,mpii,coco")
    assert name == "mixed" and options == {"datasets": "h36m,mpii,coco"}
    spec = DatasetSpec(32, 0, data_root / "cache", str(data_root), options=options)
    data = get_registry().get("dataset", "mixed")(spec, StubBody())
    # h36m 6 train; mpii 5 → seeded 80/20 → 4 train; coco 4 people in train2014
    assert len(data.train) == 6 + 4 + 4
    sources = data.labels["source"]
    assert list(sources) == ["h36m"] * 6 + ["mpii"] * 4 + ["coco"] * 4
    for i in (0, 7, 12):
        assert data.train[i]["meta"]["source"] == sources[i]
    assert len(data.test) == 3, "only members whose test split has 3D joints are evaluated (h36m)"
    assert "mixed(h36m+mpii+coco) test h36m" in data.protocol["dataset"]
    h36m = data.protocol["members"]["h36m"]
    assert h36m["gt_mesh"] == "none" and h36m["test_with_3d"] == 3, "no SMPL annotations in these files"
    for key in ("gt_mesh", "test_with_3d", "test_without_pelvis", "test_has_3d_joints"):
        assert data.protocol[key] == h36m[key], key
    partition = by_source(data, 3, seed=0, options={})
    assert [set(sources[c]) for c in partition.clients] == [{"coco"}, {"h36m"}, {"mpii"}]


def test_mixed_refuses_a_single_member(data_root):
    from pchmr.plugins.datasets.prepared import DatasetFormatError

    spec = DatasetSpec(32, 0, data_root / "cache", str(data_root), options={"datasets": "h36m"})
    with pytest.raises(DatasetFormatError, match="two or more distinct names"):
        get_registry().get("dataset", "mixed")(spec, StubBody())


def test_check_lists_present_and_missing_files_with_their_origin(data_root):
    rows = {(r.dataset, r.format, r.role): r for r in check_root(data_root)}
    assert rows[("h36m", "spin-npz", "train")].present and rows[("h36m", "spin-npz", "test")].present
    assert not rows[("up3d", "metro-tsv", "train")].present
    assert "MeshTransformer" in rows[("up3d", "metro-tsv", "train")].obtain
    result = CliRunner().invoke(app, ["data", "check", str(data_root)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "usable now: coco (coco-json), h36m (spin-npz), mpii (spin-npz)" in out
    line = next(row for row in out.splitlines() if "up3d/trainval.yaml" in row)
    assert "missing" in line
    bad = CliRunner().invoke(app, ["data", "check", str(data_root / "nope")], env={"COLUMNS": "250"})
    assert bad.exit_code == 2 and "not a folder" in bad.output


def test_prepare_command_refuses_an_unknown_body_model(data_root, tmp_path):
    npz = data_root / "dataset_extras" / "h36m_train.npz"
    args = ["data", "prepare", "--dataset", f"spin-npz:{npz}", "--body-model", "nosuch", "--cache-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "no body model named 'nosuch'" in result.output.replace("\n", " ")


def test_mixed_protocol_combines_the_evaluated_members():
    from types import SimpleNamespace

    from pchmr.plugins.datasets.mixed import _test_summary

    def member(gt_mesh, with_3d, without_pelvis):
        return SimpleNamespace(protocol={"gt_mesh": gt_mesh, "test_with_3d": with_3d, "test_without_pelvis": without_pelvis,
                                         "test_has_3d_joints": with_3d > 0, "test_has_vertices": gt_mesh != "none"})  # fmt: skip

    same = _test_summary([("h36m", member("neutral", 5, 1)), ("pw3d", member("neutral", 4, 0))])
    assert same == {"gt_mesh": "neutral", "test_has_3d_joints": True, "test_has_vertices": True,
                    "test_with_3d": 9, "test_without_pelvis": 1}  # fmt: skip
    differ = _test_summary([("h36m", member("neutral", 5, 0)), ("pw3d", member("gendered", 4, 0))])
    assert differ["gt_mesh"] == "mixed (h36m: neutral, pw3d: gendered)"
