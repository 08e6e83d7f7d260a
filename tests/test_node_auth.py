"""SuperNode authentication binds each partition to one node's key (issue 20, item 6): key files,
the ``--node-keys`` binding, the server's check of every claim, and one real round on a TLS
SuperLink with ``--enable-supernode-auth`` where an impostor holding a registered key of its own
claims partition 0 and is refused."""

from __future__ import annotations

import logging
import re

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.engine.config import ConfigError, RunConfig
from pchmr.core.engine.federation import deployment
from pchmr.core.engine.federation.deployment import prepare_run_dir, run_deployment
from pchmr.core.engine.federation.nodeauth import (
    NODE_KEYS_FILE,
    LocalPKI,
    NodeKeyError,
    bind_claims,
    fingerprint,
    read_binding,
    read_node_keys,
    read_public_key,
    write_binding,
)
from pchmr.core.engine.federation.processes import LocalDeployment

CONFIG = dict(num_train=16, num_test=8, clients=2, per_round=2, rounds=1, batch_size=8, seed=5)
RUN_TIMEOUT_SECONDS = 300.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> LocalPKI:
    return LocalPKI(tmp_path_factory.mktemp("pki") / "pki").ensure(3)  # nodes 0, 1 and an impostor 2


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- key files -----------------------------------------------------------------------------------
def test_a_public_key_reads_the_same_in_openssh_and_pem_form(pki, tmp_path):
    pem = read_public_key(pki.node_public_key(0))
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    (tmp_path / "k.pem").write_bytes(pem)
    assert fingerprint(read_public_key(tmp_path / "k.pem")) == fingerprint(pem)
    assert fingerprint(pem) != fingerprint(read_public_key(pki.node_public_key(1)))
    assert re.fullmatch(r"SHA256:[0-9a-f]{64}", fingerprint(pem))
    assert fingerprint(b"") == ""


def test_private_keys_are_readable_by_their_owner_only(pki):
    for path in (pki.node_private_key(0), pki.server_key):
        assert path.stat().st_mode & 0o077 == 0, path
    assert pki.directory.stat().st_mode & 0o077 == 0


def test_a_key_that_is_not_an_ec_public_key_is_named(tmp_path):
    bad = tmp_path / "node.pub"
    bad.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x\n")
    with pytest.raises(NodeKeyError, match=r"node\.pub is not an elliptic-curve public key in OpenSSH or PEM form"):
        read_public_key(bad)
    with pytest.raises(NodeKeyError, match=r"cannot read the node key .*missing\.pub"):
        read_public_key(tmp_path / "missing.pub")


def test_a_node_keys_file_binds_every_partition_to_a_distinct_key(pki, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'0 = "{pki.node_public_key(0)}"\n1 = "{pki.node_public_key(1).name}"\n')
    (tmp_path / pki.node_public_key(1).name).write_bytes(pki.node_public_key(1).read_bytes())  # relative path
    assert read_node_keys(keys, 2) == pki.binding(2)

    keys.write_text(f'0 = "{pki.node_public_key(0)}"\n')
    with pytest.raises(NodeKeyError, match=r"binds no key to partition\(s\) 1: every one of the 2 partitions"):
        read_node_keys(keys, 2)
    keys.write_text(f'0 = "{pki.node_public_key(0)}"\n1 = "{pki.node_public_key(0)}"\n')
    with pytest.raises(NodeKeyError, match=r"partitions 0 and 1 are bound to the same key SHA256:"):
        read_node_keys(keys, 2)
    keys.write_text(f'0 = "{pki.node_public_key(0)}"\n2 = "{pki.node_public_key(1)}"\n')
    with pytest.raises(NodeKeyError, match=r"'2' is not a partition id; expected the ids 0 … 1 as keys"):
        read_node_keys(keys, 2)
    keys.write_text("0 = 3\n")
    with pytest.raises(NodeKeyError, match=r"partition 0 = 3; expected the path of a public key"):
        read_node_keys(keys, 2)
    keys.write_text("[[[\n")
    with pytest.raises(NodeKeyError, match=r"is not TOML .*expected lines like 0 = \"node0.pub\""):
        read_node_keys(keys, 2)


def test_the_binding_round_trips_and_a_damaged_one_is_refused(pki, tmp_path):
    write_binding(tmp_path, pki.binding(2))
    assert read_binding(tmp_path) == pki.binding(2)
    assert read_binding(tmp_path / "elsewhere") is None
    (tmp_path / NODE_KEYS_FILE).write_text('{"partitions": {"0": "md5:00"}}')
    with pytest.raises(NodeKeyError, match="must be a SHA256: fingerprint"):
        read_binding(tmp_path)
    (tmp_path / NODE_KEYS_FILE).write_text("[")
    with pytest.raises(NodeKeyError, match=r"is not a node-key binding"):
        read_binding(tmp_path)


# -- the server's check --------------------------------------------------------------------------
def test_a_claim_counts_only_from_the_node_registered_with_the_partitions_key(pki, caplog):
    key = {i: read_public_key(pki.node_public_key(i)) for i in range(3)}
    binding = pki.binding(2)
    nodes = {101: key[0], 102: key[1], 103: key[2], 104: b""}
    claims = [(101, 0), (102, 1), (103, 0), (104, 1), (102, 0), (101, 7)]
    with caplog.at_level(logging.ERROR, logger="pchmr.deployment"):
        assert bind_claims(claims, nodes, binding) == [(101, 0), (102, 1)]
    text = one_line(caplog.text)
    assert f"node 103 claims partition 0 and is refused (never sampled): its key {fingerprint(key[2])} is not" in text
    assert "node 104 claims partition 1 and is refused (never sampled): the node has no registered key" in text
    assert "--enable-supernode-auth" in text
    assert "node 102 claims partition 0 and is refused" in text
    assert "node 101 claims partition 7 and is refused (never sampled): no key is bound to that partition" in text


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(node_auth=True), "--node-auth authenticates the Deployment Engine's SuperNodes; --engine simulation"),
        (dict(node_keys="k.toml"), "--node-keys authenticates the Deployment Engine's SuperNodes; --engine simulation"),
        (
            dict(engine="deployment", node_auth=True, superlink="10.0.0.1:9092", root_certificates=__file__),
            "the SuperLink 10.0.0.1:9092 is configured by its operator",
        ),
        (dict(engine="deployment", node_keys="k.toml"), "--node-keys binds partitions to the keys registered at a "),
        (
            dict(engine="deployment", node_keys="k.toml", superlink="10.0.0.1:9092", insecure=True),
            "--node-keys needs TLS",
        ),
        (dict(engine="deployment", node_auth="yes"), "node_auth must be true or false, got 'yes'"),
    ],
)
def test_node_authentication_options_that_cannot_work_are_refused(options, words):
    with pytest.raises(ConfigError) as info:
        RunConfig(**options)
    assert words in one_line(str(info.value))


def test_a_node_keys_file_is_read_before_anything_runs(pki, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'0 = "{pki.node_public_key(0)}"\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["run", "--engine", "deployment", "--clients", "2", "--superlink", "10.0.0.1:9092", "--root-certificates",
         str(pki.ca_certificate), "--node-keys", str(keys), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "binds no key to partition(s) 1" in one_line(result.output)
    assert "Traceback" not in result.output and not out.exists()


def test_run_hands_the_node_options_to_the_deployment(monkeypatch, tmp_path, pchmr_cache):
    seen = {}

    def fake(run_dir, num_clients, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("pchmr.core.engine.run.federate_on_deployment", fake)
    args = ["run", "--engine", "deployment", "--num-train", "16", "--num-test", "8", "--clients", "2", "--rounds", "1"]
    CliRunner().invoke(app, [*args, "--node-auth", "--out", str(tmp_path / "run")])
    assert seen["node_auth"] is True and seen["node_keys"] is None


# -- one real round ------------------------------------------------------------------------------
def test_an_impostor_with_a_registered_key_cannot_take_a_partition(pki, tmp_path, pchmr_cache, caplog):
    run_dir = tmp_path / "run"
    rd = prepare_run_dir(RunConfig(**CONFIG, engine="deployment", node_auth=True), run_dir)
    write_binding(run_dir, pki.binding(2))
    with LocalDeployment(num_nodes=2, log_dir=run_dir / "deployment", pki=pki) as link:
        impostor_id = link.register(pki.node_public_key(2))  # a key the SuperLink knows, bound to no partition
        impostor = link.start_node(0, private_key=pki.node_private_key(2), name="impostor")
        link.wait_registered(impostor)
        assert f"SuperNode ID: {impostor_id}" in impostor.log_path.read_text()
        config = (run_dir / "deployment" / "flwr-home" / "config.toml").read_text()
        assert "insecure = false" in config and str(pki.ca_certificate) in config
        final = run_deployment(
            run_dir, link.address, timeout=RUN_TIMEOUT_SECONDS, insecure=False, root_certificates=pki.ca_certificate
        )
        superlink_log = (run_dir / "deployment" / "superlink.log").read_text()
    assert final["round"] == 1
    assert rd.read_rounds()[1]["clients"] == [0, 1]
    log_text = one_line(rd.log.read_text())
    assert f"node {impostor_id} claims partition 0 and is refused (never sampled): its key" in log_text
    assert "claims partition 1 and is refused" not in log_text
    # the impostor answered discovery and nothing else: Flower ran no train or evaluate ClientApp for it
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id=") == 3
    assert "--enable-supernode-auth" not in superlink_log  # the warning Flower prints when authentication is off
    assert "SuperNode authentication is disabled" not in superlink_log


def test_a_node_without_a_registered_key_is_turned_away_by_the_superlink(pki, tmp_path):
    stranger = LocalPKI(tmp_path / "stranger").ensure(1)
    with LocalDeployment(num_nodes=1, log_dir=tmp_path / "deployment", pki=pki) as link:
        node = link.start_node(0, private_key=stranger.node_private_key(0), name="stranger")
        code = node.popen.wait(timeout=120)  # Flower refuses to activate it and the SuperNode exits
        text = node.log_path.read_text()
    assert code != 0 and "Failed to activate SuperNode" in text, text[-2000:]
    assert "SuperNode ID:" not in text


def test_a_local_run_with_node_auth_keeps_its_keys_for_a_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(deployment, "run_deployment", lambda *a, **k: calls.append(k) or {"round": 1})

    class NoProcesses:
        def __init__(self, **kwargs):
            self.kwargs, self.address = kwargs, "127.0.0.1:1"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(deployment, "LocalDeployment", NoProcesses)
    deployment.federate_on_deployment(tmp_path, 2, node_auth=True)
    first = read_binding(tmp_path)
    pki = LocalPKI(tmp_path / "deployment" / "pki")
    assert first == pki.binding(2)
    assert calls[0]["insecure"] is False and calls[0]["root_certificates"] == pki.ca_certificate
    deployment.federate_on_deployment(tmp_path, 2, node_auth=True)
    assert read_binding(tmp_path) == first  # the same keys: a resumed run's nodes are the same nodes
