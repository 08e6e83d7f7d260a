"""A run's history is never silently destroyed: ``pchmr run --resume`` refuses a run directory it
cannot read or whose files do not belong together, exit 2, naming the file and line, and changes
nothing; a full disk while resuming leaves every file whole.

One finished naive baseline (no Ray: the cheapest run that writes every file of a run directory)
is made per module; each test works on a copy of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.contracts.partition import Partition
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.resume import check_checkpoint_state, check_resumable
from pchmr.core.engine.rundir import HistoryError, RunDir, parse_rounds
from pchmr.core.kit import atomic

SMALL_RUN = dict(mode="naive", fraction=0.5, epochs=2, num_train=16, num_test=8, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, pchmr_cache) -> Path:
    from pchmr.core.engine.run import execute

    out = tmp_path_factory.mktemp("history") / "run"
    result = execute(RunConfig(**SMALL_RUN, out=str(out)))
    assert result.final["round"] == 2
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def files(path: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def resume(path: Path):
    return CliRunner().invoke(app, ["run", "--resume", str(path)])


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- rounds.jsonl, line by line ------------------------------------------------------------------
GOOD = '{"round": 0, "mpjpe_mm": 1.0}\n{"round": 1, "mpjpe_mm": 0.5}\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (
            GOOD.replace('{"round": 1', '{"round": 1,,'),
            r"line 2 is not JSON \(Expecting property name .*\), expected one JSON object per line with an integer 'round'; nothing was changed",
        ),
        (
            '{"round": 0}\n[1, 2]\n',
            r"line 2 is a JSON array, expected a JSON object with an integer 'round'; nothing was changed",
        ),
        (
            '{"round": 0}\n{"epoch": 1}\n',
            r"line 2 has no 'round', expected an integer 'round' >= 0; nothing was changed",
        ),
        ('{"round": "1"}\n', r"line 1 has 'round': \"1\", expected an integer 'round' >= 0"),
        (
            '{"round": 0}\n{"round": 2}\n{"round": 1}\n',
            r"line 3 goes back to round 1 after round 2 on line 2, expected rounds in increasing order",
        ),
        ('{"round": 0}\n\n{"round": 0}\n', r"line 3 repeats round 0 after round 0 on line 1"),
        (
            GOOD + '{"round": 2, "mpj',
            r"line 3 is cut off \(the file ends in the middle of a record, as after a crash while it was written\): expected one whole JSON object per line; delete that line \(the records before it are kept\) and resume again",
        ),
    ],
)
def test_every_malformed_line_is_named_with_what_was_expected(tmp_path, text, message):
    path = tmp_path / "rounds.jsonl"
    with pytest.raises(HistoryError, match="^" + re.escape(str(path)) + " " + message):
        parse_rounds(text.encode(), path)


def test_well_formed_history_reads_whole():
    assert [r["round"] for r in parse_rounds(GOOD.encode(), Path("r"))] == [0, 1]
    assert parse_rounds(b"", Path("r")) == []


# -- pchmr run --resume of a finished run directory ----------------------------------------------
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda lines: [lines[0], lines[1][:25], *lines[2:]], "rounds.jsonl line 2 is not JSON"),
        (lambda lines: [lines[0], "[]", *lines[1:]], "rounds.jsonl line 2 is a JSON array"),
        (lambda lines: [lines[0], lines[2], lines[1]], "rounds.jsonl line 3 goes back to round 1 after round 2"),
        (lambda lines: [*lines[:2], lines[2][:-9]], "rounds.jsonl line 3 is cut off"),
    ],
)
def test_resume_refuses_a_malformed_history_and_changes_nothing(run, corrupt, message):
    text = (run / "rounds.jsonl").read_text()
    lines = corrupt(text.splitlines())
    cut = message.endswith("cut off")
    (run / "rounds.jsonl").write_text("\n".join(lines) + ("" if cut else "\n"))
    before = files(run)
    result = resume(run)
    assert result.exit_code == 2, result.output
    assert f"error: {run / 'rounds.jsonl'}{message[len('rounds.jsonl') :]}" in one_line(result.output)
    assert files(run) == before  # every file byte-identical, run.log included


def test_resume_refuses_a_partition_the_config_did_not_make(run):
    data = json.loads((run / "partition.json").read_text())
    data["params"]["fraction"] = 0.25  # another naive share, with a valid hash
    body = {k: v for k, v in data.items() if k != "sha256"}
    data["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (run / "partition.json").write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")
    before = files(run)
    result = resume(run)
    assert result.exit_code == 2, result.output
    assert (
        f"error: {run / 'partition.json'} was not made by {run / 'config.json'} (--fraction 0.5 in config.json but "
        "0.25 in partition.json)"
    ) in one_line(result.output)
    assert files(run) == before

    data["params"]["fraction"] = 0.5  # back, but the hash no longer matches
    (run / "partition.json").write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")
    result = resume(run)
    assert result.exit_code == 2
    assert "content hash mismatch; the partition file was modified or truncated" in one_line(result.output)


def test_resume_refuses_a_history_the_checkpoint_cannot_continue(run):
    shutil.rmtree(run / "checkpoints")  # a resume would start over and drop epochs 1 and 2
    before = files(run)
    result = resume(run)
    assert result.exit_code == 2, result.output
    assert (
        f"{run / 'rounds.jsonl'} has records up to epoch 2, but the run directory holds no checkpoint "
        f"({run / 'checkpoints' / 'last.ckpt'} is missing): resuming would drop 2 record(s)"
    ) in one_line(result.output)
    assert files(run) == before


def _fail_writes_of(monkeypatch, name: str) -> None:
    """A full disk for the temporary file of ``name`` only (found through /proc/self/fd)."""
    real = atomic._write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(atomic, "_write", write)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file by /proc/self/fd")
@pytest.mark.parametrize("name", ["model.pt", "final.json"])
def test_a_full_disk_while_resuming_keeps_every_file_whole(run, monkeypatch, name):
    before = files(run, skip=("run.log",))
    _fail_writes_of(monkeypatch, name)
    result = resume(run)
    assert result.exit_code == 1, result.output
    message = one_line(result.output)
    assert f"error: disk full while writing {run / name} (needed " in message
    assert f": nothing was replaced; free space and resume with pchmr run --resume {run}" in message
    assert files(run, skip=("run.log",)) == before  # model.pt and final.json as they were, no temporary file


# -- federated run directories: the checkpoint against the config and the model -------------------
def _federated(tmp_path: Path, rounds: list[int], checkpoint_round: int | None, **config) -> tuple[RunDir, RunConfig]:
    cfg = RunConfig(clients=4, per_round=2, rounds=3, seed=2, **config)
    rd = RunDir(tmp_path / "fed").create()
    rd.write_json(rd.config, {"run": cfg.to_dict()})
    clients = tuple(torch.arange(i * 4, i * 4 + 4).numpy() for i in range(4))
    rd.write_text(rd.partition, Partition(clients, "iid", {"seed": 2, "num_clients": 4}).to_json())
    for r in rounds:
        rd.append_round({"round": r, "mpjpe_mm": 1.0})
    if checkpoint_round is not None:
        rd.save_checkpoint({"round": checkpoint_round, "state": {"w": torch.zeros(2, 3)}})
    return rd, cfg


def test_a_consistent_federated_directory_may_resume(tmp_path):
    rd, cfg = _federated(tmp_path, [0, 1, 2], checkpoint_round=1)  # killed after round 2's record
    check_resumable(rd, cfg)
    check_checkpoint_state(rd, {"w": torch.ones(2, 3)})


@pytest.mark.parametrize(
    "rounds, checkpoint_round, config, message",
    [
        ([0, 1], 7, {}, r"checkpoints/last.pt holds round 7, but the config runs 3 rounds \(--rounds 3\)"),
        (
            [0, 1, 2, 3],
            1,
            {},
            r"rounds.jsonl has records up to round 3, but the run directory holds round 1 in .*last.pt: resuming would drop 1 record\(s\)",
        ),
        (
            [0, 1, 2],
            None,
            {},
            r"records up to round 2, but the run directory holds no checkpoint \(.*last.pt is missing\)",
        ),
        ([0, 2], 2, {}, r"rounds.jsonl lacks the record of round 1, evaluated before the checkpoint of round 2"),
        (
            [0, 1],
            1,
            {"clients": 5, "per_round": 2},
            r"partition.json was not made by .*config.json \(--clients 5 in config.json but 4 in partition.json\)",
        ),
        ([0, 1], 1, {"partitioner": "lda"}, r"\(--partitioner 'lda' in config.json but 'iid' in partition.json\)"),
    ],
)
def test_a_federated_history_that_does_not_fit_is_refused(tmp_path, rounds, checkpoint_round, config, message):
    rd, cfg = _federated(tmp_path, rounds, checkpoint_round)
    cfg = cfg.replace(**config) if config else cfg
    before = files(rd.path)
    with pytest.raises(HistoryError, match=message):
        check_resumable(rd, cfg)
    assert files(rd.path) == before


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    rd, _ = _federated(tmp_path, [0, 1], 1)
    with pytest.raises(
        HistoryError,
        match=r"last.pt does not fit the model .*config.json builds: 1 of the model's entries missing \(first: b\); "
        r"1 of other shapes \(first: w \(2, 3\) instead of \(3, 3\)\); the checkpoint is not this run's",
    ):
        check_checkpoint_state(rd, {"w": torch.ones(3, 3), "b": torch.ones(1)})


# -- pchmr report --out: no silent overwrite --------------------------------------------------------
def test_report_refuses_a_non_empty_out_unless_overwrite(finished, tmp_path):
    out = tmp_path / "report"
    first = CliRunner().invoke(app, ["report", str(finished), "--out", str(out), "--formats", "md,csv"])
    assert first.exit_code == 0, first.output
    before = files(out)
    assert sorted(before) == ["report.csv", "report.md"]
    again = CliRunner().invoke(app, ["report", str(finished), "--out", str(out), "--formats", "md,json"])
    assert again.exit_code == 2, again.output
    assert (
        f"error: --out {out} is not empty (it holds report.csv, report.md); pass --overwrite to replace its files, "
        "or choose another --out"
    ) in one_line(again.output)
    assert files(out) == before
    replaced = CliRunner().invoke(app, ["report", str(finished), "--out", str(out), "--formats", "json", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(files(out)) == ["report.csv", "report.json", "report.md"]
