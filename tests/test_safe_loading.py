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
from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.strategy import StrategyConfig, StrategyParts
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.federation.mechanisms import LEGACY_STATE_KEY, STATES_KEY, MechanismRuntime
from pchmr.core.engine.rundir import RunDir
from pchmr.core.kit.pyramid import load_graphcmr_downsampling
from pchmr.core.kit.safe_pickle import SPARSE_PICKLE, UnsafeFileError, checkpoint_values, safe_load, safe_load_npz
from pchmr.plugins.annotators.priors import load_smplify_gmm
from pchmr.plugins.bodymodels.smpl import load_smpl_pickle
from pchmr.plugins.datasets.pw3d import make_3dpw
from pchmr.plugins.privacy.dp import dp
from pchmr.plugins.strategies.fedopt import fedopt
from pchmr.testing.fake_datasets import write_3dpw_sequence
from pchmr.testing.fake_smpl import fake_smpl_data, write_fake_graphcmr_downsampling, write_fake_smpl
from pchmr.testing.strategies import contract_arrays, contract_delta, run_round
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
    with np.load(genuine, allow_pickle=True) as data:  # safe: the file this test just wrote
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
    read = safe_load_npz(path, ["plain", "objects", "absent"], what="test file", allowed=SPARSE_PICKLE)
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


# -- checkpoints: checkpoints/last.pt and the baselines' last.ckpt ------------------------------
CONFIG = StrategyConfig(num_clients=6, per_round=3, num_rounds=4, seed=0)


def _dp_fedopt() -> StrategyParts:
    return dp(fedopt(CONFIG), StrategyConfig(6, 3, 4, 0, {"placement": "client", "noise-multiplier": 1.1}))


def _one_round() -> tuple[StrategyParts, dict[str, Any]]:
    parts = _dp_fedopt()
    parts.mechanism("dp").before_round(1)
    arrays, _ = run_round(parts, 1, contract_arrays(), [(contract_delta(50 + k, aligned=False), 1.0) for k in range(3)])
    return parts, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def _checkpoint(state: dict[str, torch.Tensor], states: Any, key: str = STATES_KEY) -> dict[str, Any]:
    """The layout FederatedServer saves after a round."""
    return {"round": 1, "state": state, "elapsed": 1.25, "sent": 100, "received": 200, key: states}


def test_a_checkpoint_the_server_writes_loads_weights_only_and_resumes_every_state(tmp_path):
    running, state = _one_round()
    rd = RunDir(tmp_path / "run").create()
    rd.save_checkpoint(_checkpoint(state, MechanismRuntime(running).state_dict()))
    rd.check_resumable()
    ckpt = rd.load_checkpoint()
    assert ckpt is not None and ckpt["round"] == 1 and ckpt["elapsed"] == 1.25
    assert all(torch.equal(ckpt["state"][k], state[k]) for k in state)
    resumed = _dp_fedopt()
    MechanismRuntime(resumed).restore(ckpt)
    assert resumed.mechanism("dp").round_metrics(1) == running.mechanism("dp").round_metrics(1)
    for key in ("m_t", "v_t"):
        restored, saved = resumed.mechanism("fedopt").state_dict()[key], running.mechanism("fedopt").state_dict()[key]
        assert restored and all(torch.equal(restored[k], saved[k]) for k in saved)


def test_an_old_checkpoint_of_safe_types_still_resumes(tmp_path):
    # before this change: torch.save(dict(state)) of the layout before mechanisms
    running, state = _one_round()
    fedopt_state, dp_state = running.mechanism("fedopt").state_dict(), running.mechanism("dp").state_dict()
    rd = RunDir(tmp_path / "run").create()
    torch.save(_checkpoint(state, {"inner": fedopt_state, **dp_state}, LEGACY_STATE_KEY), rd.checkpoint)
    resumed = _dp_fedopt()
    MechanismRuntime(resumed).restore(rd.load_checkpoint())
    assert resumed.mechanism("dp").round_metrics(1) == running.mechanism("dp").round_metrics(1)


def test_an_old_checkpoint_holding_numpy_is_refused_with_what_to_do(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    torch.save(_checkpoint({}, {"someone": {"m": np.zeros(3)}}), rd.checkpoint)
    with pytest.raises(UnsafeFileError, match=r"it asks to import numpy\._?core\.multiarray\._reconstruct") as caught:
        rd.load_checkpoint()
    assert "Start the run again in a new --out directory" in str(caught.value)


class _NumpyState(Mechanism):
    name = "numpy-state"

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def test_numpy_in_a_mechanism_state_is_saved_as_tensors_and_numbers(tmp_path):
    state = {"m": np.arange(3.0), "n": np.float64(0.5), "k": np.int64(4), "nested": [{"s": {1, 2}}, (np.ones(2),)]}
    rd = RunDir(tmp_path / "run").create()
    rd.save_checkpoint(_checkpoint({}, {"numpy-state": _NumpyState(state).state_dict()}))
    saved = rd.load_checkpoint()[STATES_KEY]["numpy-state"]
    assert torch.equal(saved["m"], torch.arange(3.0, dtype=torch.float64))
    assert type(saved["n"]) is float and saved["n"] == 0.5 and type(saved["k"]) is int
    assert saved["nested"][0] == {"s": {1, 2}} and torch.equal(
        saved["nested"][1][0], torch.ones(2, dtype=torch.float64)
    )


def test_an_object_a_safe_load_cannot_read_is_refused_when_the_checkpoint_is_written(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    with pytest.raises(TypeError, match=r"checkpoint\['mechanism_states'\]\['x'\]\['when'\] is a pathlib\.PosixPath"):
        rd.save_checkpoint(_checkpoint({}, {"x": {"when": Path("/tmp")}}))
    assert not rd.checkpoint.exists()
    with pytest.raises(TypeError, match="numpy object array"):
        checkpoint_values({"a": _objects([1])})


def _craft_run_dir(tmp_path: Path, evil: RunsCode, checkpoint: str) -> RunDir:
    """A run directory as someone else would send it: config.json and a crafted checkpoint."""
    rd = RunDir(tmp_path / "received").create()
    config = RunConfig(num_train=16, num_test=8, clients=2, per_round=2, rounds=2, out=str(rd.path))
    rd.write_json(rd.config, {"run": config.to_dict()})
    path = rd.path / "checkpoints" / checkpoint
    torch.save({**_checkpoint({"w": torch.zeros(2)}, {}), "x": evil}, path)
    return rd


def test_resuming_a_run_directory_whose_checkpoint_runs_code_is_refused_before_any_work(payload, tmp_path):
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    evil, marker, refused = payload
    rd = _craft_run_dir(tmp_path, evil, "last.pt")
    result = CliRunner().invoke(app, ["run", "--resume", str(rd.path)])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, output
    assert re.search(_refused(rd.checkpoint, "pchmr checkpoint", refused), " ".join(output.split())), output
    assert not marker.exists()
    assert not rd.partition.exists()  # stopped before the data and the partition


def test_a_lightning_checkpoint_that_runs_code_is_refused(payload, tmp_path):
    evil, marker, refused = payload
    rd = _craft_run_dir(tmp_path, evil, "last.ckpt")
    with pytest.raises(UnsafeFileError, match=_refused(rd.lightning_checkpoint, "Lightning checkpoint", refused)):
        rd.check_resumable()
    assert not marker.exists()


def test_a_trained_model_that_runs_code_is_refused(payload, tmp_path):
    from pchmr.core.engine.components import load_model_weights

    evil, marker, refused = payload
    run_dir = tmp_path / "pretrained"
    run_dir.mkdir()
    torch.save({"w": torch.zeros(2), "x": evil}, run_dir / "model.pt")
    with pytest.raises(UnsafeFileError, match=_refused(run_dir / "model.pt", "trained model (model.pt)", refused)):
        load_model_weights(None, run_dir)  # type: ignore[arg-type]  # refused before the module is touched
    assert not marker.exists()


def test_encoder_weights_that_run_code_are_refused(payload, tmp_path):
    from pchmr.core.kit.encoders import build_encoder, load_encoder_weights

    evil, marker, refused = payload
    path = tmp_path / "resnet50.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": evil}, path)
    with pytest.raises(UnsafeFileError, match=_refused(path, "encoder weights file", refused)):
        load_encoder_weights(build_encoder("small", 64), path)
    assert not marker.exists()
