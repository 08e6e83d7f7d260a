"""``pchmr report``'s figures: metric vs LDA α (the paper's Fig. 3) from run directories, the
convergence plot's confidence band over seeds, and the prediction grid (Figs. 4, 5, 12)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from pchmr.report.alpha import alpha_data, alpha_figure, alpha_of, plot_alpha
from pchmr.report.convergence import band, convergence_figure
from pchmr.report.predictions import (
    fit_weak_perspective,
    grid_figure,
    grid_runs,
    prediction_grid,
    sample_positions,
)
from pchmr.report.stats import interval
from pchmr.report.tables import ReportError, load_run
from tests.test_report import OTHER_PROTOCOL, make_run

LDA = dict(partitioner="lda", clients=20, per_round=5)


def lda_run(root, name, alpha, seed, mpjpe, pa, **config):
    options = {} if alpha is None else {"alpha": alpha}
    return load_run(make_run(root, name, (mpjpe, pa, 300.0), seed=seed, partition_options=options,
                             **{**LDA, **config}))  # fmt: skip


# -- metric vs α ----------------------------------------------------------------------------
@pytest.fixture
def alpha_runs(tmp_path):
    """α 0.1 × 3 seeds, α 1 × 2 seeds, α 10 × 1 seed (FastMETRO-S), an IID run, a naive baseline
    and a centralized one."""
    values = {0.1: [(60.0, 40.0), (62.0, 41.0), (64.0, 45.0)], 1: [(70.0, 44.0), (74.0, 48.0)], 10: [(80.0, 50.0)]}
    runs = [lda_run(tmp_path, f"lda-{a}-s{seed}", a, seed, m, p) for a, vals in values.items()
            for seed, (m, p) in enumerate(vals)]  # fmt: skip
    runs.append(load_run(make_run(tmp_path, "iid", (90.0, 60.0, 300.0), clients=20, per_round=5)))
    runs.append(load_run(make_run(tmp_path, "naive", (99.0, 70.0, 300.0), mode="naive", fraction=0.1)))
    runs.append(load_run(make_run(tmp_path, "central-s0", (50.0, 35.0, 300.0), mode="centralized", seed=0)))
    runs.append(load_run(make_run(tmp_path, "central-s1", (54.0, 37.0, 300.0), mode="centralized", seed=1)))
    return runs


def test_alpha_data_means_and_intervals_by_alpha(alpha_runs):
    data = alpha_data(alpha_runs, "mpjpe_mm")
    (series,) = data.series
    assert series.alphas == (0.1, 1.0, 10.0)
    assert series.setting == "FedAvg 20/5 LDA" and series.model == "FastMETRO-S"
    assert [p.interval.n for p in series.points] == [3, 2, 1]
    assert [p.interval.mean for p in series.points] == pytest.approx([62.0, 72.0, 80.0])
    # 95 % Student-t half widths: t(0.975, 2) · s / √3 with s = 2; t(0.975, 1) · s / √2 with s = 2√2
    assert series.points[0].interval.half_width == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
    assert series.points[1].interval.half_width == pytest.approx(12.706205 * 2 * math.sqrt(2) / math.sqrt(2), rel=1e-6)
    assert series.points[2].interval.half_width is None  # one seed: no interval
    for point in series.points:
        assert point.interval == interval([r.metric("mpjpe_mm") for r in point.runs])
        assert {alpha_of(r) for r in point.runs} == {point.alpha}
    assert series.label == "FedAvg 20/5 LDA · FastMETRO-S (n=1–3 per α)"
    pa = alpha_data(alpha_runs, "pa_mpjpe_mm").series[0]
    assert [p.interval.mean for p in pa.points] == pytest.approx([42.0, 46.0, 50.0])


def test_runs_off_the_alpha_plot_are_named_and_centralized_ones_are_its_reference(alpha_runs):
    data = alpha_data(alpha_runs, "mpjpe_mm")
    assert data.left_out == ("iid (FedAvg 20/5 IID · FastMETRO-S) is not LDA-partitioned",
                             "naive (Naive 10 % · FastMETRO-S) is not LDA-partitioned")  # fmt: skip
    (reference,) = data.references
    assert reference.interval == interval([50.0, 54.0]) and reference.setting == "Centralized"
    assert data.skip_reason() is None


def test_alpha_series_split_by_model_protocol_and_any_other_option(tmp_path):
    runs = [lda_run(tmp_path, f"fm-{a}", a, 0, 60.0 + a, 40.0) for a in (0.5, 5)]
    runs += [lda_run(tmp_path, f"tore-{a}", a, 0, 70.0 + a, 40.0, backbone="tore") for a in (0.5, 5)]
    runs += [lda_run(tmp_path, f"lr-{a}", a, 0, 50.0 + a, 40.0, lr=0.002) for a in (0.5, 5)]
    other = make_run(tmp_path, "h36m", (55.0, 40.0, 300.0), protocol=OTHER_PROTOCOL, partition_options={"alpha": 0.5},
                     **LDA)  # fmt: skip
    runs.append(load_run(other))
    data = alpha_data(runs, "mpjpe_mm")
    labels = sorted(s.label for s in data.series)
    assert labels == ["FedAvg 20/5 LDA lr=0.001 · FastMETRO-S (n=1 per α)",
                      "FedAvg 20/5 LDA lr=0.002 · FastMETRO-S (n=1 per α)",
                      "FedAvg 20/5 LDA · FastMETRO-S (n=1 per α)",  # the h36m protocol's own series
                      "FedAvg 20/5 LDA · TORE-S (n=1 per α)"]  # fmt: skip
    fig = alpha_figure(runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 4  # two protocols × (MPJPE, PA-MPJPE)
    assert all("protocol: " in t for t in titles)
    assert any("h36m" in t for t in titles) and any("synthetic" in t for t in titles)
    h36m, synthetic = fig.axes[0], fig.axes[2]  # rows by protocol label
    assert "h36m" in h36m.get_title() and "synthetic" in synthetic.get_title()
    assert synthetic.get_xscale() == "log"
    assert [t.get_text() for t in synthetic.get_xticklabels()] == ["0.5", "5"]
    assert [t.get_text() for t in h36m.get_xticklabels()] == ["0.5"]  # that protocol has one α


def test_the_plot_is_drawn_with_error_bars_at_the_intervals(alpha_runs, tmp_path):
    fig = alpha_figure(alpha_runs, ["mpjpe_mm"])
    (ax,) = fig.axes
    (mean_line,) = [line for line in ax.get_lines() if line.get_label().startswith("FedAvg")]
    assert list(mean_line.get_xdata()) == [0.1, 1.0, 10.0]
    assert list(mean_line.get_ydata()) == pytest.approx([62.0, 72.0, 80.0])
    bars = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    segments = [s for c in bars for s in c.get_segments()]
    data = alpha_data(alpha_runs, "mpjpe_mm").series[0]
    expected = [(p.alpha, p.interval.low, p.interval.high) for p in data.points if p.interval.half_width]
    drawn = sorted((s[0][0], s[0][1], s[1][1]) for s in segments)
    np.testing.assert_allclose(np.array(drawn), np.array(sorted(expected)), rtol=1e-12)
    assert "Centralized · FastMETRO-S (n=2), reference" in [line.get_label() for line in ax.get_lines()]
    png = plot_alpha(alpha_runs, tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fewer_than_two_alphas_skip_the_plot_saying_why(tmp_path):
    iid = [load_run(make_run(tmp_path, "iid", (90.0, 60.0, 300.0)))]
    reason = alpha_data(iid).skip_reason()
    assert reason is not None and "needs runs at 2 or more LDA α values; the runs give no LDA-partitioned run" in reason
    assert "iid (FedAvg 10/2 IID · FastMETRO-S) is not LDA-partitioned" in reason
    one = [lda_run(tmp_path, "default-alpha", None, 0, 60.0, 40.0)]  # no alpha in the config: the plugin's 0.5
    assert alpha_of(one[0]) == 0.5
    assert "runs at one LDA α only (α=0.5)" in alpha_data(one).skip_reason()
    with pytest.raises(ReportError, match="needs runs at 2 or more LDA α values"):
        plot_alpha(one + iid, tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()


def test_a_non_numeric_alpha_is_named(tmp_path):
    path = make_run(tmp_path, "bad", (60.0, 40.0, 300.0), partition_options={"alpha": 1}, **LDA)
    data = json.loads((path / "config.json").read_text())
    data["run"]["partition_options"]["alpha"] = "lots"
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(
        ReportError, match="bad: config.json's lda partition option 'alpha' is 'lots', not a number > 0"
    ):
        alpha_data([load_run(path)])


# -- convergence band ------------------------------------------------------------------------
def test_runs_differing_only_in_seed_are_one_mean_line_in_their_confidence_band(tmp_path):
    seeds = [load_run(make_run(tmp_path, f"s{s}", (60.0 + 4 * s, 40.0 + s, 300.0), seed=s,
                               start=(500.0 + s, 300.0 + 10 * s, 600.0))) for s in range(3)]  # fmt: skip
    single = load_run(make_run(tmp_path, "fedprox", (70.0, 45.0, 300.0), strategy="fedprox"))
    xs, stats = band(seeds, "pa_mpjpe_mm")
    assert xs == [0, 1, 2]
    for x, stat in zip(xs, stats):
        values = [r.rounds[x]["pa_mpjpe_mm"] for r in seeds]
        assert stat == interval(values)  # exactly pchmr.report.stats' Student-t interval
    fig = convergence_figure([*seeds, single], "pa_mpjpe_mm")
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["FedAvg 10/2 IID · mean of 3 seeds ± 95 % CI", "FedProx μ=0.01 10/2 IID"]
    mean = ax.get_lines()[0]
    assert list(mean.get_ydata()) == pytest.approx([s.mean for s in stats])
    (shade,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    outline = shade.get_paths()[0].vertices
    for x, stat in zip(xs, stats):
        at_x = outline[np.isclose(outline[:, 0], x), 1]
        assert at_x.min() == pytest.approx(stat.low) and at_x.max() == pytest.approx(stat.high)
    assert "mean, shaded 95 % CI (Student's t)" in fig.get_suptitle()


def test_a_single_run_has_no_band(tmp_path):
    run = load_run(make_run(tmp_path, "one", (60.0, 40.0, 300.0)))
    (ax,) = convergence_figure([run]).axes
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert ax.get_lines()[0].get_label() == "FedAvg 10/2 IID"


# -- prediction grid -------------------------------------------------------------------------
def test_sample_positions_are_evenly_spaced_and_deterministic():
    assert sample_positions(32, 4) == [0, 10, 21, 31]
    assert sample_positions(3, 5) == [0, 1, 2]
    assert sample_positions(10, 1) == [0]
    with pytest.raises(ReportError, match="k >= 1"):
        sample_positions(10, 0)


def test_the_ground_truth_camera_is_fitted_to_the_keypoints():
    rng = np.random.default_rng(0)
    joints = rng.normal(scale=0.4, size=(14, 3))
    camera = np.array([0.9, 0.1, -0.05])
    keypoints = camera[0] * joints[:, :2] + camera[1:]
    weights = np.ones(14)
    weights[3] = 0  # an invisible joint: anywhere
    keypoints[3] = (5.0, 5.0)
    assert fit_weak_perspective(joints, keypoints, weights) == pytest.approx(camera)
    assert fit_weak_perspective(joints, keypoints, np.r_[np.ones(2), np.zeros(12)]) is None  # too few


def copy_run(source, target, **changes):
    """A copy of a run directory with ``changes`` to its config (its model.pt unchanged)."""
    import shutil

    shutil.copytree(source, target)
    data = json.loads((target / "config.json").read_text())
    data["run"].update(changes)
    (target / "config.json").write_text(json.dumps(data))
    return target


@pytest.fixture(scope="module")
def finished_runs(tiny_finished_run, tmp_path_factory):
    """The tiny finished run ``a``, a repetition of it (seed 1) and another setting (lr 3e-3), as copies."""
    root = tmp_path_factory.mktemp("grid")
    paths = [copy_run(tiny_finished_run, root / "a"), copy_run(tiny_finished_run, root / "a-seed1", seed=1),
             copy_run(tiny_finished_run, root / "b", lr=3e-3)]  # fmt: skip
    return [load_run(p) for p in paths]


def test_the_grid_shows_k_images_of_one_split_for_each_setting(finished_runs, tmp_path):
    chosen, left_out = grid_runs(finished_runs)
    assert [r.path.name for r in chosen] == ["a", "b"]
    assert left_out == ["a-seed1 (seed 1): repetitions of a, which stands for them"]
    grid = prediction_grid(finished_runs, samples=3)
    assert grid.reference.name == "a" and grid.sample_ids == (0, 4, 7)  # evenly spaced over 8
    assert len(grid.images) == 3 and all(i.shape == (64, 64, 3) for i in grid.images)
    assert [row.label for row in grid.rows] == [
        "Centralized · FastMETRO-S · seed 0 · lr=0.001",
        "Centralized · FastMETRO-S · seed 0 · lr=0.003",
    ]
    assert [e["mpjpe_mm"] for e in grid.rows[0].errors] == [e["mpjpe_mm"] for e in grid.rows[1].errors]  # one model.pt
    for row in grid.rows:
        assert len(row.front) == len(row.side) == len(row.errors) == 3
        assert all(p.shape == (64, 64, 3) and p.dtype == np.uint8 for p in (*row.front, *row.side))
    assert all(t is not None for t in grid.truth_front)  # synthetic samples have a ground-truth mesh
    # the per-image errors are the run's own evaluation's: they average to final.json over the whole split
    final = json.loads((finished_runs[0].path / "final.json").read_text())
    everything = prediction_grid(finished_runs[:1], samples=8)
    mean = np.mean([e["mpjpe_mm"] for e in everything.rows[0].errors])
    assert mean == pytest.approx(final["mpjpe_mm"], rel=1e-5)
    fig = grid_figure(grid)
    assert len(fig.axes) == (2 + 2) * 3  # input, ground truth, two runs × three images
    assert fig.axes[0].get_title() == "test sample 0"


def test_a_run_without_model_is_named_not_drawn(finished_runs, tmp_path):
    copy = copy_run(finished_runs[0].path, tmp_path / "copied")
    (copy / "model.pt").unlink()
    with pytest.raises(ReportError, match="no run to draw a prediction grid of: copied has no model.pt"):
        prediction_grid([load_run(copy)])
