"""``--out`` of the commands that write results: no silent overwrite (``--overwrite``), no
half-made directory after a refusal, a file or unwritable ``--out`` named without a traceback;
numeric options and ``key=value`` options refused naming the option, the value and the rule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app

SMALL = ["--num-train", "48", "--num-test", "16"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line(text: str) -> str:
    return " ".join(text.split())


def files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}  # fmt: skip


def _read_only_dir() -> Path | None:
    """A directory nothing may be created in, even by root (/sys in a container), else None."""
    probe = Path("/sys/pchmr-test-out")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    return None


# -- no silent overwrite -------------------------------------------------------------------------
def test_partition_refuses_a_non_empty_out_unless_overwrite(tmp_path, pchmr_cache):
    out = tmp_path / "part"
    args = ["partition", *SMALL, "--clients", "4", "--seed", "3", "--no-plots", "--out", str(out)]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    before = files(out)
    assert sorted(before) == ["partition.json", "summary.json"]

    again = invoke(*[a if a != "3" else "4" for a in args])  # another seed: would give another partition
    assert again.exit_code == 2, again.output
    assert (
        f"error: --out {out} is not empty (it holds partition.json, summary.json); pass --overwrite to replace "
        "its files, or choose another --out"
    ) in one_line(again.output)
    assert files(out) == before

    replaced = invoke(*[a if a != "3" else "4" for a in args], "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert files(out)["partition.json"] != before["partition.json"]


def test_a_late_partition_refusal_leaves_no_directory(tmp_path, pchmr_cache):
    out = tmp_path / "new" / "part"
    result = invoke("partition", *SMALL, "--partitioner", "natural", "--clients", "20", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "--clients must be" in one_line(result.output)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("partition", *SMALL, "--partitioner", "natural", "--clients", "20", "--out", str(empty))
    assert result.exit_code == 2 and empty.is_dir() and list(empty.iterdir()) == []


def test_annotate_and_personalize_refuse_a_non_empty_out_before_any_work(tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "labels.npz").write_bytes(b"earlier results")
    result = invoke("annotate", "synthetic", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"error: --out {out} is not empty (it holds labels.npz); pass --overwrite" in one_line(result.output)
    assert (out / "labels.npz").read_bytes() == b"earlier results"
    result = invoke("personalize", "--checkpoint", str(tmp_path / "nothing"), "--data", str(out), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"--out {out} is not empty (it holds labels.npz); pass --overwrite" in one_line(result.output)


def test_a_late_annotate_refusal_leaves_no_directory(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "new" / "labels"
    result = invoke("annotate", str(images), "--out", str(out))  # an image folder needs --keypoints
    assert result.exit_code == 2, result.output
    assert f"annotating the image folder {images} needs --keypoints DIR" in one_line(result.output)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", [["annotate", "synthetic"], ["partition", *SMALL], ["report", "."]])
def test_an_out_that_is_a_file_is_refused_without_a_traceback(tmp_path, command):
    target = tmp_path / "taken"
    target.write_text("mine")
    result = invoke(*command, "--out", str(target))
    assert result.exit_code == 2, result.output
    assert f"error: --out {target} is a file, not a directory; choose another --out" in one_line(result.output)
    assert target.read_text() == "mine" and "Traceback" not in result.output


def test_run_out_that_is_a_file_is_refused_without_a_traceback(tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    result = invoke("run", "--out", str(target))
    assert result.exit_code == 2, result.output
    assert f"error: run directory {target} is a file, not a directory; choose another --out" in one_line(result.output)


def test_an_out_nothing_can_be_written_to_is_refused(tmp_path):
    read_only = _read_only_dir()
    if read_only is None:
        pytest.skip("no directory here refuses writes to this user")
    out = read_only / "pchmr-out"
    result = invoke("partition", *SMALL, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"error: cannot write to --out {out}: " in one_line(result.output)
    result = invoke("run", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"error: cannot create the run directory {out}: " in one_line(result.output)
    assert "choose another --out" in one_line(result.output) and "Traceback" not in result.output


# -- numbers and key=value -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["personalize", "--checkpoint", "x", "--data", "y", "--epochs", "0"],
            "--epochs must be a whole number >= 1, got 0",
        ),
        (["personalize", "--checkpoint", "x", "--data", "y", "--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (
            ["personalize", "--checkpoint", "x", "--data", "y", "--batch-size", "0"],
            "--batch-size must be a whole number >= 1, got 0",
        ),
        (
            ["annotate", "synthetic", "--out", "o", "--batch-size", "0"],
            "--batch-size must be a whole number >= 1, got 0",
        ),
        (
            ["annotate", "synthetic", "--out", "o", "--crop-size", "-4"],
            "--crop-size must be a whole number >= 1, got -4",
        ),
        (
            ["privacy", "budget", "--sample-rate", "0", "--rounds", "3", "--noise-multiplier", "1"],
            "--sample-rate must lie in (0, 1], got 0.0",
        ),
        (
            ["privacy", "budget", "--sample-rate", "0.1", "--rounds", "3", "--noise-multiplier", "0"],
            "--noise-multiplier must be a finite number > 0, got 0.0",
        ),
        (
            ["privacy", "budget", "--sample-rate", "0.1", "--rounds", "3", "--delta", "1", "--noise-multiplier", "1"],
            "--delta must lie in (0, 1), got 1.0",
        ),
        (
            ["run", "--strategy-option", "foo", "--out", "o"],
            "--strategy-option expects key=value (e.g. --strategy-option name=3), got 'foo' (no '=')",
        ),
        (
            ["run", "--dataset-option", "=3", "--out", "o"],
            "--dataset-option expects key=value (e.g. --dataset-option name=3), got '=3' (no key before '=')",
        ),
        (
            ["partition", "--partition-option", "alpha", "--out", "o"],
            "--partition-option expects key=value (e.g. --partition-option name=3), got 'alpha' (no '=')",
        ),
        (
            ["annotate", "synthetic", "--out", "o", "--option", "=1"],
            "--option expects key=value (e.g. --option name=3), got '=1' (no key before '=')",
        ),
    ],
)
def test_bad_numbers_and_malformed_options_are_named(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in one_line(result.output)
    assert list(tmp_path.iterdir()) == [], "a refused command writes nothing"
