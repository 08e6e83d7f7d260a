"""``pchmr eval`` and ``pchmr predict``: a run's model scored without training reproduces the run's
final metrics exactly, per-sample errors average to them; predict's meshes, joints (the ones eval
scores) and overlays; bad input named."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
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
        (["--protocol", "h36m-p3"], "unknown --protocol 'h36m-p3'; choose one of: spin, metro, mid-hip"),
        (
            ["--protocol", "spin", "--dataset-option", "protocol=metro"],
            "--protocol spin and --dataset-option protocol=metro disagree",
        ),
        # --protocol is the dataset's protocol option: the synthetic dataset has one protocol only
        (["--protocol", "spin"], "synthetic dataset has no option 'protocol'"),
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


# -- predict -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_images(finished_run, tmp_path_factory):
    """The run's first 6 test images as PNG files (exactly the pixels the dataset holds), and a broken one."""
    from pchmr.core.contracts.sample import denormalize_image
    from pchmr.core.engine.inference import load_trained

    folder = tmp_path_factory.mktemp("images")
    trained = load_trained(finished_run, with_data=True)
    test = trained.components.data.test
    for i in range(6):
        Image.fromarray(denormalize_image(test[i]["image"]).numpy()).save(folder / f"img{i}.png")
    (folder / "zz-broken.png").write_bytes(b"\x89PNG but not really")
    return folder, trained


def test_predict_writes_meshes_joints_and_overlays_and_skips_a_bad_image(finished_run, test_images, tmp_path):
    from pchmr.core.engine.inference import score_samples

    folder, trained = test_images
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        app, ["predict", str(folder), "--checkpoint", str(finished_run), "--out", str(out), "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "predicted 6 of 7 images" in one_line(result.output)
    summary = json.loads((out / "predictions.json").read_text())
    broken = [r for r in summary["records"] if r["status"] != "ok"]
    assert [r["image"] for r in broken] == ["zz-broken.png"] and "not a readable image" in broken[0]["reason"]
    num_vertices, num_faces = trained.body_model.num_vertices, len(trained.faces)
    scores = score_samples(trained, torch.utils.data.Subset(trained.components.data.test, range(6)), batch_size=6)
    size = trained.config.input_size
    for i in range(6):
        vertices, faces = read_obj(out / f"img{i}.obj")
        assert vertices.shape == (num_vertices, 3) and faces.shape == (num_faces, 3)
        joints = json.loads((out / f"img{i}.json").read_text())
        assert list(joints["joints_m"]) == list(trained.joint_names)
        predicted = np.array(list(joints["joints_m"].values()))
        assert np.allclose(predicted, scores.joints[i], atol=1e-4)  # what pchmr eval scored for this image
        assert Image.open(out / f"img{i}_overlay.png").size == (2 * size, size)
        assert joints["camera"]["crop_box_px"] == [0.0, 0.0, float(size)]


def test_predict_crops_the_largest_person_box(finished_run, test_images, tmp_path):
    folder, _ = test_images
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "img0.png"}, {"id": 2, "file_name": "img1.png"}],
        "annotations": [
            {"image_id": 1, "bbox": [10, 4, 20, 50]}, {"image_id": 1, "bbox": [0, 0, 5, 5]},
            {"image_id": 2, "keypoints": [20, 10, 2, 40, 50, 2, 0, 0, 0]},
        ],
    }))  # fmt: skip
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        app, ["predict", str(folder / "img0.png"), "--checkpoint", str(finished_run), "--out", str(out),
              "--boxes", str(boxes), "--mesh-format", "ply"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "predictions.json").read_text())["records"][0]
    assert record["box_source"] == "box" and record["box"] == [-10.0, -1.0, 60.0]  # 1.2 × 50 around (20, 29)
    assert (out / "img0.ply").read_text().startswith("ply\n")

    from pchmr.core.engine.inference import read_person_boxes

    by_name = read_person_boxes(boxes)
    assert by_name["img1.png"].source == "keypoints" and by_name["img1.png"].side == pytest.approx(48.0)


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("empty-folder", "holds no images"),
        ("bad-boxes", "is not in COCO layout"),
        ("bad-bbox", "bbox must be [x, y, w, h] with w, h > 0"),
        ("bad-format", "--mesh-format must be obj or ply, got 'stl'"),
    ],
)
def test_predict_refuses_bad_input_naming_it(finished_run, test_images, tmp_path, setup, words):
    folder, _ = test_images
    args = [str(folder), "--checkpoint", str(finished_run), "--out", str(tmp_path / "out")]
    if setup == "empty-folder":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif setup in ("bad-boxes", "bad-bbox"):
        content = {"annotations": []} if setup == "bad-boxes" else {
            "images": [{"id": 1, "file_name": "img0.png"}], "annotations": [{"image_id": 1, "bbox": [0, 0, 0, 5]}]}  # fmt: skip
        (tmp_path / "b.json").write_text(json.dumps(content))
        args += ["--boxes", str(tmp_path / "b.json")]
    else:
        args += ["--mesh-format", "stl"]
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 2, result.output
    assert words in one_line(result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists()
