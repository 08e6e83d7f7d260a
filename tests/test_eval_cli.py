"""``pchmr eval``: a run's model scored without training reproduces the run's final metrics
exactly; per-sample errors average to them; overlays and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.run import execute
from pchmr.core.kit.overlay import mesh_mask, read_obj, write_mesh
from pchmr.core.kit.render import PinholeCamera, rasterize_faces

CONFIG = dict(num_train=32, num_test=12, clients=2, per_round=2, rounds=1, batch_size=8, seed=11)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pchmr_cache):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    result = execute(RunConfig(**CONFIG, cache_dir=str(pchmr_cache)), run_dir=run_dir)
    return result.run_dir.path


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_eval_reproduces_the_runs_final_metrics_exactly(finished_run, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(finished_run), "--out", str(out), "--worst", "2"])
    assert result.exit_code == 0, result.output
    final = json.loads((finished_run / "final.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck"):
        assert metrics["metrics"][key] == final[key], key  # bit for bit: the same batches, the same protocol
    assert metrics["protocol"] == final["protocol"]
    assert metrics["samples"] == CONFIG["num_test"]
    with (out / "per_sample.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(r["sample"]) for r in rows) == list(range(CONFIG["num_test"]))
    # every sample has all 14 joints: the mean of the per-sample errors is the metric
    assert np.mean([float(r["mpjpe_mm"]) for r in rows]) == pytest.approx(final["mpjpe_mm"], rel=1e-5)
    assert np.mean([float(r["mpvpe_mm"]) for r in rows]) == pytest.approx(final["mpvpe_mm"], rel=1e-5)
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert [p.split("-")[0] for p in pictures] == ["best", "best", "worst", "worst"]
    worst_error = max(float(r["mpjpe_mm"]) for r in rows)
    assert any(p.startswith("worst-00") and p.endswith(f"mpjpe{worst_error:.0f}.png") for p in pictures)
    size = RunConfig(**CONFIG).input_size
    assert Image.open(out / pictures[0]).size == (2 * size, size)  # front overlay and side view
    assert "protocol: synthetic" in one_line(result.output)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--checkpoint", "/nonexistent/run"], "no such run directory or model file: /nonexistent/run"),
        (["--batch-size", "0"], "--batch-size"),
        (["--dataset", ":x"], "--dataset expects NAME[:PATH]"),
        (["--dataset", "no-such-dataset"], "no-such-dataset"),
        (["--dataset-option", "novalue"], "--dataset-option expects key=value"),
    ],
)
def test_eval_refuses_bad_input_naming_it(finished_run, tmp_path, args, words):
    argv = ["eval", *(["--checkpoint", str(finished_run)] if "--checkpoint" not in args else []), *args]
    result = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert words in one_line(result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists()


def test_an_unfinished_run_is_named_as_such(finished_run, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.json").write_text((finished_run / "config.json").read_text())
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(run)])
    assert result.exit_code == 2
    assert "has no model.pt (the run has not finished: resume it first)" in one_line(result.output)


def test_a_weak_perspective_mask_matches_the_pinhole_rasteriser_far_away():
    """The overlay's orthographic camera is the pinhole rasteriser at FAR metres: a unit square
    at scale 0.5 covers the middle half of the image."""
    vertices = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    mask = mesh_mask(vertices, faces, np.array([0.5, 0.0, 0.0]), 64, 64)
    assert mask.sum() == 32 * 32 and mask[16:48, 16:48].all()
    shifted = mesh_mask(vertices, faces, np.array([0.5, 0.5, 0.0]), 64, 64)
    assert shifted[16:48, 32:64].all() and not shifted[:, :32].any()
    near = rasterize_faces(vertices + np.array([0.0, 0.0, 2.0]), faces, PinholeCamera.square(64, 32.0)) >= 0
    assert near.sum() == mask.sum()  # the same square through a pinhole at f = s·W/2·z


def test_meshes_round_trip_through_obj(tmp_path):
    rng = np.random.default_rng(0)
    vertices, faces = rng.normal(size=(10, 3)), rng.integers(0, 10, size=(7, 3))
    path = write_mesh(tmp_path / "m.obj", vertices, faces)
    back_v, back_f = read_obj(path)
    assert np.allclose(back_v, vertices, atol=1e-6) and (back_f == faces).all()
    ply = write_mesh(tmp_path / "m.ply", vertices, faces).read_text().splitlines()
    assert ply[2] == "element vertex 10" and ply[6] == "element face 7" and ply[-1].startswith("3 ")
    with pytest.raises(ValueError, match=r"must end in \.obj or \.ply"):
        write_mesh(tmp_path / "m.stl", vertices, faces)
