"""One real round on Flower's Deployment Engine: a SuperLink and two SuperNodes on loopback,
the run submitted with ``flwr run``; plus the generated app/connection files checked by Flower's
own validators."""

import time

import pytest

from pchmr.core.contracts.partition import load_partition
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.federation.common import PARTITION_KEY, RUN_DIR_KEY
from pchmr.core.engine.federation.deployment import (
    CONNECTION_NAME,
    NodeLocalRunDir,
    client_app,
    prepare_run_dir,
    run_deployment,
    write_app_dir,
    write_flwr_home,
)
from pchmr.core.engine.federation.processes import DeploymentError, LocalDeployment, live_in_group

CONFIG = dict(num_train=16, num_test=8, clients=2, per_round=2, rounds=1, batch_size=8, seed=3)
RUN_TIMEOUT_SECONDS = 300.0  # a bound for a loaded machine; ~60-150 s measured


_live_in_group = live_in_group  # the /proc reader LocalDeployment's stop also waits on


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory, pchmr_cache):
    run_dir = tmp_path_factory.mktemp("deploy") / "run"
    rd = prepare_run_dir(RunConfig(**CONFIG), run_dir)
    started = time.perf_counter()
    deployment = LocalDeployment(num_nodes=CONFIG["clients"], log_dir=run_dir / "deployment")
    with deployment:
        pids = [p.popen.pid for p in deployment.processes]
        address = deployment.address
        reports = []
        final = run_deployment(run_dir, address, timeout=RUN_TIMEOUT_SECONDS, on_round=reports.append)
    return rd, final, pids, address, reports, time.perf_counter() - started


def test_one_round_on_superlink_and_two_supernodes(deployed_run):
    rd, final, _, address, reports, _ = deployed_run
    assert address.startswith("127.0.0.1:")
    rounds = rd.read_rounds()
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["clients"] == [0, 1]
    assert rounds[1]["bytes_sent"] == rounds[1]["bytes_received"] > 0
    assert rd.final.exists() and final["round"] == 1
    assert {"mean_pose_mpjpe_mm", "mean_pose_pa_mpjpe_mm"} <= set(final)
    assert load_partition(rd.partition).num_clients == 2
    assert [(r.server_round, r.num_rounds, r.sampled) for r in reports] == [(0, 1, []), (1, 1, [0, 1])]
    assert reports[1].metrics["mpjpe_mm"] == rounds[1]["mpjpe_mm"]


def test_every_started_process_is_stopped(deployed_run):
    _, _, pids, _, _, _ = deployed_run
    assert len(pids) == 3  # one SuperLink, two SuperNodes
    for pid in pids:
        # neither it nor its children (SuperExec, ServerApp, ClientApp processes) in its group
        assert _live_in_group(pid) == [], f"processes of group {pid} still run after LocalDeployment exited"


def test_generated_app_and_connection_pass_flowers_validation(tmp_path, monkeypatch):
    import tomllib

    from flwr.cli.config_utils import load_and_validate
    from flwr.cli.flower_config import read_superlink_connection

    app = write_app_dir(tmp_path / "app", tmp_path / 'run "dir"')
    config, warnings = load_and_validate(app / "pyproject.toml", check_module=True)  # raises if invalid
    assert warnings == []
    assert config["tool"]["flwr"]["app"]["config"][RUN_DIR_KEY] == str((tmp_path / 'run "dir"').resolve())
    assert tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["publisher"] == "pchmr"

    write_flwr_home(tmp_path / "home", "127.0.0.1:9999")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    connection = read_superlink_connection()
    assert connection.name == CONNECTION_NAME and connection.address == "127.0.0.1:9999"
    assert connection.insecure is True


def _context(node_config, run_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_a_supernode_local_run_dir_overrides_the_run_config():
    seen = []
    app = NodeLocalRunDir(lambda message, context: seen.append(dict(context.run_config)) or "reply")
    local = _context({PARTITION_KEY: 1, RUN_DIR_KEY: "/device/copy"}, {RUN_DIR_KEY: "/server/run"})
    assert app("msg", local) == "reply"
    plain = _context({PARTITION_KEY: 0}, {RUN_DIR_KEY: "/server/run"})
    app("msg", plain)
    assert seen == [{RUN_DIR_KEY: "/device/copy"}, {RUN_DIR_KEY: "/server/run"}]
    assert isinstance(client_app, NodeLocalRunDir)


def test_run_deployment_refuses_an_unprepared_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_deployment(tmp_path, "127.0.0.1:1", timeout=1)


def test_local_deployment_needs_a_node(tmp_path):
    with pytest.raises(ValueError, match="at least one SuperNode"):
        LocalDeployment(num_nodes=0, log_dir=tmp_path).__enter__()


def test_a_failed_submission_raises_with_the_log_tail(tmp_path, pchmr_cache):
    rd = tmp_path / "run"
    rd.mkdir()
    # a prepared run's config.json has its options under "run" (a bare {} is refused as not pchmr's)
    (rd / "config.json").write_text('{"run": {"rounds": 1}}')
    # nothing listens on this port: `flwr run` fails to connect and exits without final.json
    with pytest.raises(DeploymentError, match="without writing"):
        run_deployment(rd, "127.0.0.1:9", timeout=120)
