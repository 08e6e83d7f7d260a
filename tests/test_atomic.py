"""Atomic writes (pchmr.core.kit.atomic) and the run directory's writers built on them: a failed
write leaves the old file byte-identical and no temporary file, and says why in words."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pchmr.core.engine.rundir import RunDir
from pchmr.core.kit import atomic
from pchmr.core.kit.atomic import (
    WriteError,
    append_line_atomic,
    savez_atomic,
    torch_save_atomic,
    write_bytes_atomic,
    write_text_atomic,
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fail_writes(monkeypatch, code: int, after: int = 0) -> None:
    """Every ``os.write`` of the helper raises ``OSError(code)`` once ``after`` bytes went through
    (a disk that fills up in the middle of a file)."""
    budget = {"left": after}

    def write(fd, data):
        if budget["left"] <= 0:
            raise OSError(code, os.strerror(code))
        n = min(len(data), budget["left"])
        budget["left"] -= n
        return os.write(fd, data[:n])

    monkeypatch.setattr(atomic, "_write", write)


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_text_atomic(target, "old\n")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    torch_save_atomic({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    savez_atomic(tmp_path / "l.npz", x=np.arange(4))
    assert np.load(tmp_path / "l.npz")["x"].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "l.npz", "m.pt"]


def test_append_adds_whole_lines_and_refuses_a_newline_inside(tmp_path):
    path = tmp_path / "r.jsonl"
    append_line_atomic(path, '{"round": 0}')
    append_line_atomic(path, '{"round": 1}')
    assert path.read_text() == '{"round": 0}\n{"round": 1}\n'
    path.write_text('{"round": 0}')  # a whole record without its newline (not written by pchmr)
    append_line_atomic(path, '{"round": 1}')
    assert path.read_text() == '{"round": 0}\n{"round": 1}\n'
    with pytest.raises(ValueError, match="one line"):
        append_line_atomic(path, "a\nb")


@pytest.mark.parametrize("after", [0, 5])  # the disk is full at once, or fills up in the middle
def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, monkeypatch, after):
    target = tmp_path / "final.json"
    target.write_text('{"round": 3}\n')
    before = _digest(target)
    _fail_writes(monkeypatch, errno.ENOSPC, after)
    with pytest.raises(WriteError) as caught:
        write_text_atomic(target, '{"round": 0, "padding": "' + "x" * 100 + '"}\n', hint="free space and retry")
    message = str(caught.value)
    assert re.fullmatch(
        rf"disk full while writing {re.escape(str(target))} \(needed 128 bytes, \d+ free on /\S*\): nothing was "
        r"replaced; free space and retry",
        message,
    ), message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert _digest(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]


def test_a_quota_a_read_only_file_system_and_no_permission_are_named(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    _fail_writes(monkeypatch, errno.EDQUOT)
    with pytest.raises(WriteError, match=r"^disk quota exceeded while writing .*x\.json \(needed 2 bytes"):
        write_text_atomic(target, "{}")
    monkeypatch.undo()

    def refuse(code):
        def open_(path, flags, mode=0o777):
            raise OSError(code, os.strerror(code), str(path))

        return open_

    for code, words in ((errno.EROFS, "is on a read-only file system"), (errno.EACCES, "permission denied in")):
        monkeypatch.setattr(atomic.os, "open", refuse(code))
        with pytest.raises(WriteError) as caught:
            write_text_atomic(target, "{}")
        monkeypatch.undo()
        assert str(caught.value).startswith(f"cannot write {target}: ")
        assert words in str(caught.value) and str(tmp_path) in str(caught.value)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_an_interrupted_write_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def interrupted(fd, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(target, b"new bytes")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# -- the run directory's files -----------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    rd = RunDir(tmp_path / "run").create()
    rd.save_model({"w": torch.ones(4)})
    rd.write_json(rd.final, {"round": 3, "mpjpe_mm": 10.0})
    rd.save_checkpoint({"round": 3, "state": {"w": torch.ones(4)}})
    rd.append_round({"round": 0, "mpjpe_mm": 20.0})
    return rd


def _files(rd: RunDir) -> dict[str, str]:
    return {str(p.relative_to(rd.path)): _digest(p) for p in sorted(rd.path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "write, name",
    [
        (lambda rd: rd.save_model({"w": torch.zeros(4)}), "model.pt"),
        (lambda rd: rd.write_json(rd.final, {"round": 4}), "final.json"),
        (lambda rd: rd.save_checkpoint({"round": 4, "state": {"w": torch.zeros(4)}}), "checkpoints/last.pt"),
        (lambda rd: rd.append_round({"round": 1, "mpjpe_mm": 19.0}), "rounds.jsonl"),
        (lambda rd: rd.truncate_rounds(0), "rounds.jsonl"),
    ],
)
def test_run_directory_writes_on_a_full_disk_change_nothing_and_say_how_to_resume(run_dir, monkeypatch, write, name):
    before = _files(run_dir)
    _fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(WriteError) as caught:
        write(run_dir)
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {run_dir.path / name} (needed ")
    assert message.endswith(f"): nothing was replaced; free space and resume with pchmr run --resume {run_dir.path}")
    assert _files(run_dir) == before  # the old file byte-identical, no temporary file left


def test_run_directory_files_are_whole_after_writes(run_dir):
    run_dir.append_round({"round": 1, "mpjpe_mm": 19.0})
    assert [r["round"] for r in run_dir.read_rounds()] == [0, 1]
    assert torch.equal(torch.load(run_dir.model, weights_only=True)["w"], torch.ones(4))
    assert sorted(_files(run_dir)) == ["checkpoints/last.pt", "final.json", "model.pt", "rounds.jsonl"]
