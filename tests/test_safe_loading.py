"""Files users receive run no code when loaded (issue 20, item 1).

Every reader of a file that may come from someone else — a run directory's checkpoints, a 3DPW
sequence, a SMPL model, SMPLify's pose prior, GraphCMR's mesh_downsampling.npz — is given a
crafted file whose loading would create a marker file: it is refused with a message naming the
file and the refused global, and the marker does not exist. The genuine formats (pchmr's own
writers in ``pchmr.testing``, and checkpoints from the code that writes them) still load. The
first test shows the crafted payloads do create the marker under a plain ``pickle.load`` and
``torch.load(weights_only=False)``, so the refusals below are not vacuous.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pchmr.core.contracts.dataset import DatasetSpec
from pchmr.core.kit.pyramid import load_graphcmr_downsampling
from pchmr.core.kit.safe_pickle import SPARSE, UnsafeFileError, safe_load, safe_load_npz
from pchmr.plugins.annotators.priors import load_smplify_gmm
from pchmr.plugins.bodymodels.smpl import load_smpl_pickle
from pchmr.plugins.datasets.pw3d import make_3dpw
from pchmr.testing.fake_datasets import write_3dpw_sequence
from pchmr.testing.fake_smpl import fake_smpl_data, write_fake_graphcmr_downsampling, write_fake_smpl
from tests.test_datasets_spin import StubBody

#: how each payload's refused global is spelled (pickle records the function's own module)
REFUSED = {"system": r"(posix|nt|os)\.system", "open": r"(_?io|builtins)\.open"}


class RunsCode:
    """Unpickles as a call that creates ``path``: ``os.system("touch path")`` or ``open(path, "w")``."""

    def __init__(self, how: str, path: Path) -> None:
        self.how, self.path = how, path

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "system":
            return os.system, (f"touch {shlex.quote(str(self.path))}",)
        return builtins.open, (str(self.path), "w")


@pytest.fixture(params=sorted(REFUSED))
def payload(request, tmp_path) -> tuple[RunsCode, Path, str]:
    marker = tmp_path / f"ran-{request.param}"
    return RunsCode(request.param, marker), marker, REFUSED[request.param]


def _refused(path: Path, what: str, refused: str) -> str:
    """The pattern of the refusal message: the file, what it is, and the refused global."""
    return rf"refusing to load {re.escape(str(path))}.*\({re.escape(what)}\): it asks to import {refused}\b"


def test_the_crafted_payloads_run_code_under_plain_pickle_and_torch_load(payload, tmp_path):
    evil, marker, _ = payload
    pickle.loads(pickle.dumps({"x": evil}, protocol=2))
    assert marker.exists()
    marker.unlink()
    torch.save({"round": 1, "x": evil}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# -- 3DPW sequence files ------------------------------------------------------------------------
def _spec(root: Path) -> DatasetSpec:
    return DatasetSpec(image_size=32, seed=0, cache_dir=root / "cache", path=str(root))


def test_a_3dpw_sequence_that_runs_code_is_refused_and_the_genuine_one_loads(payload, tmp_path):
    evil, marker, refused = payload
    root = tmp_path / "3DPW"
    write_3dpw_sequence(root, "downtown_walking_00", "train", num_frames=3, seed=1)
    test = write_3dpw_sequence(root, "courtyard_basketball_00", "test", num_frames=3, seed=2)
    assert len(make_3dpw(_spec(root), StubBody()).test) > 0  # the genuine files load (the prepare path)
    path = test.files["pkl"]
    with path.open("rb") as stream:
        data = pickle.load(stream, encoding="latin1")  # our own writer's file
    data["genders"] = [evil, "m"]
    path.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(UnsafeFileError, match=_refused(path, "3DPW sequence file", refused)):
        make_3dpw(_spec(root), StubBody())
    assert not marker.exists()


# -- SMPL model files -----------------------------------------------------------------------------
@pytest.mark.parametrize("chumpy", [False, True], ids=["plain", "chumpy"])
def test_genuine_smpl_files_load_with_sparse_regressors_and_chumpy_arrays(tmp_path, chumpy):
    data = load_smpl_pickle(write_fake_smpl(tmp_path, chumpy=chumpy))
    expected = fake_smpl_data()
    for key in ("v_template", "shapedirs", "posedirs", "weights", "f", "kintree_table"):
        np.testing.assert_array_equal(np.asarray(data[key]), np.asarray(expected[key]), err_msg=key)
    assert data["J_regressor"].format == "csc"


def test_a_smpl_file_that_runs_code_is_refused(payload, tmp_path):
    evil, marker, refused = payload
    data = fake_smpl_data()
    data["bs_style"] = evil
    path = tmp_path / "SMPL_NEUTRAL.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(UnsafeFileError, match=_refused(path, "SMPL model file", refused)) as caught:
        load_smpl_pickle(path)
    assert "numpy arrays, SciPy sparse matrices, chumpy arrays and plain Python containers" in str(caught.value)
    assert not marker.exists()


def test_a_smpl_file_naming_another_class_is_refused_by_its_name(tmp_path):
    data = fake_smpl_data()
    data["f"] = np.ma.masked_array([1, 2])  # numpy, but not an ndarray: nothing SMPL holds
    path = tmp_path / "SMPL_NEUTRAL.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(UnsafeFileError, match=r"it asks to import numpy\.ma\.core\._mareconstruct"):
        load_smpl_pickle(path)


# -- SMPLify's pose prior ---------------------------------------------------------------------
def _gmm() -> dict[str, np.ndarray]:
    return {"means": np.zeros((2, 69)), "covars": np.stack([np.eye(69)] * 2), "weights": np.array([0.5, 0.5])}


def test_a_pose_prior_that_runs_code_is_refused_and_the_genuine_one_loads(payload, tmp_path):
    evil, marker, refused = payload
    good = tmp_path / "gmm_08.pkl"
    good.write_bytes(pickle.dumps(_gmm(), protocol=2))
    assert load_smplify_gmm(good).dim == 69
    bad = tmp_path / "evil_gmm.pkl"
    bad.write_bytes(pickle.dumps({**_gmm(), "weights": evil}, protocol=2))
    with pytest.raises(UnsafeFileError, match=_refused(bad, "SMPLify pose prior", refused)):
        load_smplify_gmm(bad)
    assert not marker.exists()


# -- GraphCMR's mesh_downsampling.npz -----------------------------------------------------------
def _objects(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def test_a_mesh_downsampling_file_that_runs_code_is_refused_and_the_genuine_one_loads(payload, tmp_path):
    evil, marker, refused = payload
    genuine = write_fake_graphcmr_downsampling(tmp_path / "mesh_downsampling.npz", sizes=(40, 20, 10))
    assert load_graphcmr_downsampling(genuine).num_vertices == (10, 20, 40)  # its M (pickled meshes) is never read
    with np.load(genuine, allow_pickle=True) as data:  # our own writer's file
        arrays = {name: data[name] for name in ("A", "U", "D", "F")}
    arrays["U"] = _objects([*arrays["U"][:1], evil])
    bad = tmp_path / "evil" / "mesh_downsampling.npz"
    bad.parent.mkdir()
    np.savez(bad, **arrays)
    with pytest.raises(UnsafeFileError, match=_refused(bad, "GraphCMR mesh_downsampling.npz", refused)) as caught:
        load_graphcmr_downsampling(bad)
    assert "array 'U'" in str(caught.value)
    assert not marker.exists()


def test_a_plain_pickle_named_like_an_npz_is_not_unpickled(payload, tmp_path):
    # np.load(allow_pickle=True) unpickles a file that is no zip archive
    evil, marker, _ = payload
    path = tmp_path / "mesh_downsampling.npz"
    path.write_bytes(pickle.dumps({"A": evil}, protocol=2))
    with pytest.raises(ValueError, match="is not an .npz archive"):
        load_graphcmr_downsampling(path)
    assert not marker.exists()


def test_npz_members_are_read_plain_or_through_the_allowlist(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, plain=np.arange(3), objects=_objects([np.zeros(2), {"k": (1, 2.5)}]))
    read = safe_load_npz(path, ["plain", "objects", "absent"], what="test file", allowed=SPARSE)
    assert sorted(read) == ["objects", "plain"]
    np.testing.assert_array_equal(read["plain"], np.arange(3))
    assert read["objects"][1] == {"k": (1, 2.5)}


# -- the unpickler itself -------------------------------------------------------------------------
def test_python2_names_and_numpy_scalars_resolve(tmp_path):
    # protocol 0 spells a set as __builtin__.set under Python 2: what 3DPW's and SMPL's files were written by
    py2 = b"c__builtin__\nset\n((lp0\nI1\naI2\natp1\nRp2\n."
    assert safe_load(_write(tmp_path / "py2.pkl", py2), what="test file") == {1, 2}
    scalars = {"f": np.float64(1.5), "i": np.int64(3), "u": np.array(["m", "f"]), "b": b"bytes"}
    for protocol in (2, 4, 5):
        read = safe_load(_write(tmp_path / f"p{protocol}.pkl", pickle.dumps(scalars, protocol=protocol)), what="t")
        assert read["f"] == 1.5 and read["i"] == 3 and list(read["u"]) == ["m", "f"] and read["b"] == b"bytes"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
