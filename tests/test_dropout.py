"""Dropout tolerance (``--min-fit-fraction``) and simulated device churn (``--client-dropout``).

The unit tests check the rule, the draws, the options and the round view's failure record; the
slow ones run real federations on Flower's Simulation Engine (20 synthetic clients, 8 per round,
2 rounds of one local epoch at 64 px): failures recorded by partition id, secure aggregation
recovering them, a round below the fraction stopping with the partitions named and the last
checkpoint intact, and two runs of one seed losing the same clients with the same metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.federation.common import drops_out, required_replies, sample_clients
from pchmr.core.engine.federation.server import _SubsetGrid
from pchmr.core.kit.federation import failure_message, ordered_replies

# --------------------------------------------------------------------------------------
# the rule, the draws, the options
# --------------------------------------------------------------------------------------


def test_required_replies_is_the_ceiling_of_the_fraction_and_at_least_one():
    assert required_replies(10, None) == 1  # unset: Flower's accept_failures, one reply is enough
    assert required_replies(10, 0.3) == 3  # 0.3 × 10 is 3.0000000000000004 in floating point
    assert required_replies(10, 0.31) == 4
    assert required_replies(8, 0.75) == 6
    assert required_replies(8, 1.0) == 8
    assert required_replies(3, 0.01) == 1


def test_dropout_draws_depend_on_seed_round_and_partition_only():
    draws = [[drops_out(7, r, p, 0.2) for p in range(200)] for r in (1, 2)]
    assert draws[0] == [drops_out(7, 1, p, 0.2) for p in range(200)]  # reproducible (a resumed run)
    assert draws[0] != draws[1]  # another round, other failures
    assert 20 <= sum(draws[0]) <= 60  # about 0.2 of 200
    assert not any(drops_out(7, 1, p, 0.0) for p in range(200))
    assert [drops_out(8, 1, p, 0.2) for p in range(200)] != draws[0]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("min_fit_fraction", 0.0, r"--min-fit-fraction must lie in \(0, 1\]"),
        ("min_fit_fraction", 1.5, r"--min-fit-fraction must lie in \(0, 1\]"),
        ("client_dropout", 1.0, r"--client-dropout must lie in \[0, 1\)"),
        ("client_dropout", -0.1, r"--client-dropout must lie in \[0, 1\)"),
    ],
)
def test_options_out_of_range_are_refused_naming_the_flag(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{key: value})
    assert RunConfig(min_fit_fraction=1, client_dropout=0.5).min_fit_fraction == 1
    assert RunConfig.from_dict({"min-fit-fraction": 0.5}).min_fit_fraction == 0.5  # a config file's spelling


def test_the_options_are_flags_of_pchmr_run():
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    result = CliRunner().invoke(app, ["run", "--min-fit-fraction", "0", "--out", "unused"])
    assert result.exit_code == 2 and "--min-fit-fraction must lie in (0, 1]" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["run", "--client-dropout", "1", "--out", "unused"])
    assert result.exit_code == 2 and "--client-dropout must lie in [0, 1)" in " ".join(result.output.split())


# --------------------------------------------------------------------------------------
# the round view's record of failures
# --------------------------------------------------------------------------------------
class _Reply:
    def __init__(self, node: int, error: str | None = None) -> None:
        self.metadata = SimpleNamespace(src_node_id=node)
        self.error = SimpleNamespace(reason=error) if error else None

    def has_error(self) -> bool:
        return self.error is not None


class _Grid:
    def __init__(self, replies):
        self.replies = replies

    def send_and_receive(self, messages, timeout=None):
        return list(self.replies)


def test_the_round_view_names_failed_and_silent_clients_by_partition():
    reason = "<class 'flwr.clientapp.ClientAppException'>:<'... Message: simulated device failure'>"
    grid = _Grid([_Reply(101), _Reply(107, reason)])  # node 103 never answers
    view = _SubsetGrid(grid, [101, 103, 107], {101: 1, 103: 3, 107: 7})
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (101, 103, 107)]
    replies = view.send_and_receive(messages, timeout=5)
    assert view.failures == [
        {"partition": 3, "error": "no reply within 5 s"},
        {"partition": 7, "error": "simulated device failure"},
    ]
    assert [r.metadata.src_node_id for r in ordered_replies(replies, view, 1, allow_failures=True)] == [101]
    with pytest.raises(RuntimeError, match=r"round 1: 1 of 2 clients failed \(train\): partition 7: simulated"):
        ordered_replies(replies, view, 1)
    assert "node 107" in failure_message(1, [replies[1]], 2)  # without a map: Flower's node id


# --------------------------------------------------------------------------------------
# real federations
# --------------------------------------------------------------------------------------
CHURN = dict(
    num_train=40,
    num_test=8,
    clients=20,
    per_round=8,
    rounds=2,
    batch_size=4,
    local_epochs=1,
    client_dropout=0.2,
)
METRICS = ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm", "pck")


def _rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines() if line.strip()]


def _expected_failures(cfg: RunConfig, server_round: int) -> list[int]:
    sampled = sample_clients(cfg.seed, server_round, cfg.clients, cfg.per_round)
    return [p for p in sampled if drops_out(cfg.seed, server_round, p, cfg.client_dropout)]


def _check_failure_records(run: Path, cfg: RunConfig) -> list[list[int]]:
    """Every trained round lists its failures by partition id, each a sampled client with the
    simulated failure's reason, and aggregates exactly the others; returns the failed ids per round."""
    failed = []
    for record in _rounds(run)[1:]:
        partitions = [f["partition"] for f in record["failures"]]
        assert partitions == _expected_failures(cfg, record["round"]), record
        assert set(partitions) <= set(record["clients"])
        assert all("simulated device failure" in f["error"] for f in record["failures"])
        assert record["aggregated"] == len(record["clients"]) - len(partitions)
        failed.append(partitions)
    return failed


@pytest.fixture(scope="module")
def churn_runs(tmp_path_factory, pchmr_cache):
    """Two runs of one seed with --client-dropout 0.2 (for determinism), timed."""
    import time

    from pchmr.core.engine.run import execute

    out = tmp_path_factory.mktemp("churn")
    runs = []
    for name in ("a", "b"):
        cfg = RunConfig(**CHURN, seed=3, out=str(out / name))
        start = time.perf_counter()
        execute(cfg)
        runs.append((out / name, cfg, time.perf_counter() - start))
    return runs


@pytest.mark.slow
def test_a_20_client_run_with_churn_completes_recording_failures_by_partition(churn_runs):
    run, cfg, seconds = churn_runs[0]
    failed = _check_failure_records(run, cfg)
    assert sum(map(len, failed)) > 0, "seed 3 loses clients in round 1: the path under test ran"
    assert (run / "final.json").exists()
    log = (run / "run.log").read_text()
    assert f"round 1: {len(failed[0])} of 8 sampled clients failed" in log
    print(f"failures per round {failed}, {seconds:.0f} s")


@pytest.mark.slow
def test_the_same_seed_and_dropout_lose_the_same_clients_with_the_same_metrics(churn_runs):
    (a, cfg, _), (b, _, _) = churn_runs
    assert _check_failure_records(a, cfg) == _check_failure_records(b, cfg)
    strip = [{k: r[k] for k in ("round", "clients", "failures", "aggregated", *METRICS)} for r in _rounds(a)[1:]]
    assert strip == [
        {k: r[k] for k in ("round", "clients", "failures", "aggregated", *METRICS)} for r in _rounds(b)[1:]
    ]
    got, want = (torch.load(d / "model.pt", map_location="cpu") for d in (a, b))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_secure_aggregation_recovers_the_dropped_clients_within_its_threshold(tmp_path, pchmr_cache):
    from pchmr.core.engine.run import execute

    cfg = RunConfig(**CHURN, seed=3, strategy="secagg", out=str(tmp_path / "run"))
    execute(cfg)
    failed = _check_failure_records(tmp_path / "run", cfg)
    assert failed[0], "seed 3 loses clients in round 1"
    for record in _rounds(tmp_path / "run")[1:]:
        assert record["secagg_clients"] == record["aggregated"]
        assert record["secagg_dropped"] == len(record["failures"])


@pytest.mark.slow
def test_too_many_failures_stop_the_run_naming_partitions_with_the_last_checkpoint_intact(tmp_path, pchmr_cache):
    """Seed 17 loses 1 of 8 clients in round 1 and 5 of 8 in round 2; --min-fit-fraction 0.75
    needs 6: round 1 is aggregated and checkpointed, round 2 stops the run (exit 1, one message)."""
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    out = tmp_path / "run"
    cfg = RunConfig(**CHURN, seed=17, min_fit_fraction=0.75)
    lost = [_expected_failures(cfg, r) for r in (1, 2)]
    assert [len(f) for f in lost] == [1, 5]
    args = ["run", "--seed", "17", "--min-fit-fraction", "0.75", "--out", str(out)]
    for key, value in CHURN.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, args)
    message = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "round 2: 5 of 8 sampled clients failed (train), 3 replied and --min-fit-fraction 0.75 needs 6" in message
    assert all(f"partition {p}: simulated device failure in round 2" in message for p in lost[1])
    assert "--resume" in message and "Traceback" not in result.output
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["round"] == 1
    assert [r["round"] for r in _rounds(out)] == [0, 1]
    assert [f["partition"] for f in _rounds(out)[1]["failures"]] == lost[0]
    assert not (out / "final.json").exists()
