"""Network exposure (issue 20, item 6): a private Ray listens on loopback only, a remote SuperLink
without TLS needs --insecure, duplicate partition claims are refused, and under secure
aggregation a failing client's error text stays on the device."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path

import pytest

from pchmr.core.engine.config import ConfigError, RunConfig, is_loopback
from pchmr.core.engine.federation.client import ClientFailed, withheld_errors
from pchmr.core.engine.federation.common import ClientDropout
from pchmr.core.engine.federation.server import partition_claims

# --------------------------------------------------------------------------------------
# a remote SuperLink without TLS
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:8000", True),
        ("127.3.2.1:8000", True),
        ("localhost:9092", True),
        ("[::1]:8000", True),
        ("10.0.0.5:8000", False),
        ("link.example.org:8000", False),
        ("[2001:db8::1]:8000", False),
        ("0.0.0.0:8000", False),
    ],
)
def test_loopback_addresses_are_told_from_remote_ones(address, loopback):
    assert is_loopback(address) is loopback


def test_a_remote_superlink_without_root_certificates_needs_insecure(tmp_path):
    remote = dict(engine="deployment", superlink="link.example.org:8000")
    ca = tmp_path / "ca.pem"  # --root-certificates must name an existing file
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"plaintext.*--root-certificates CA\.pem.*--insecure"):
        RunConfig(**remote)
    assert RunConfig(**remote, insecure=True).insecure
    assert RunConfig(**remote, root_certificates=str(ca)).root_certificates == str(ca)
    assert RunConfig(engine="deployment", superlink="127.0.0.1:8000").superlink  # loopback: no TLS needed
    with pytest.raises(ConfigError, match="contradict"):
        RunConfig(**remote, insecure=True, root_certificates=str(ca))


def test_the_refusal_is_exit_2_on_the_command_line():
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    args = ["run", "--engine", "deployment", "--superlink", "10.1.2.3:8000", "--out", "unused"]
    result = CliRunner().invoke(app, args)
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "would travel in plaintext" in message and "--insecure" in message


def test_insecure_to_a_remote_superlink_logs_a_warning(tmp_path, monkeypatch, caplog):
    from pchmr.core.engine.federation import deployment

    monkeypatch.setattr(deployment, "run_deployment", lambda *args, **kwargs: {"submitted": kwargs["insecure"]})
    with pytest.raises(ValueError, match="plaintext"):
        deployment.federate_on_deployment(tmp_path, 2, superlink="10.1.2.3:8000")
    with caplog.at_level(logging.WARNING, logger="pchmr.deployment"):
        assert deployment.federate_on_deployment(tmp_path, 2, superlink="10.1.2.3:8000", insecure=True) == {
            "submitted": True
        }
    assert "WITHOUT TLS" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pchmr.deployment"):
        deployment.federate_on_deployment(tmp_path, 2, superlink="127.0.0.1:8000")
    assert "WITHOUT TLS" not in caplog.text


# --------------------------------------------------------------------------------------
# partition claims
# --------------------------------------------------------------------------------------


def test_a_second_node_claiming_a_partition_is_refused_and_named(caplog):
    with caplog.at_level(logging.ERROR, logger="pchmr.federation"):
        mapping = partition_claims([(907, 0), (311, 1), (502, 1), (120, 2), (880, 1)])
    assert mapping == {0: 907, 1: 311, 2: 120}  # the refused nodes 502 and 880 are never sampled
    assert "partition 1 is claimed by 3 nodes: node 311 keeps it, node(s) 502, 880 are refused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pchmr.federation"):
        assert partition_claims([(5, 0), (6, 1)]) == {0: 5, 1: 6}
    assert caplog.text == ""


# --------------------------------------------------------------------------------------
# secure aggregation: a failing client's error stays on the device
# --------------------------------------------------------------------------------------


def test_a_client_error_under_a_round_protocol_leaves_only_its_stage(caplog):
    text = "training loss became nan at batch 0: loss=nan, joints_3d=0.1234, vertices=5.678"
    with caplog.at_level(logging.ERROR, logger="pchmr.federation.client"):
        with pytest.raises(ClientFailed) as raised:
            with withheld_errors("secagg-collect"):
                raise FloatingPointError(text)
    assert "secagg-collect" in str(raised.value) and "0.1234" not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "0.1234" in caplog.text, "the details are logged on the device"
    with pytest.raises(ClientDropout, match="simulated device failure"):  # its text is the run config's
        with withheld_errors("secagg-collect"):
            raise ClientDropout("simulated device failure in round 1 (--client-dropout 0.2)")


@pytest.mark.slow
def test_a_diverged_client_under_secure_aggregation_reports_no_loss_values(tmp_path, pchmr_cache):
    """lr 1e30 makes every client's loss NaN in round 1: without secure aggregation the run's error
    names each loss term's value (tests/test_federation.py); with it the server learns only which
    partitions failed in which stage, in the CLI's message, run.log and rounds.jsonl."""
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    out = tmp_path / "run"
    args = ["run", "--strategy", "secagg", "--num-train", "16", "--num-test", "8", "--clients", "2"]
    args += ["--per-round", "2", "--rounds", "1", "--batch-size", "8", "--lr", "1e30", "--seed", "5"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    message = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "partition 0:" in message and "partition 1:" in message, message
    assert "its error stays on the device" in message
    for where in (message, (out / "run.log").read_text(), (out / "rounds.jsonl").read_text()):
        assert "training loss became" not in where and "joints_3d=" not in where


# --------------------------------------------------------------------------------------
# Ray on loopback
# --------------------------------------------------------------------------------------


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _decode(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of ``pids``, from Linux's /proc."""
    listening = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                listening[fields[9]] = (_decode(address), int(port, 16))
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in listening:
                address, port = listening[link[8:-1]]
                found.append((pid, str(address), port))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_a_simulations_private_ray_listens_on_loopback_only(tmp_path, pchmr_cache):
    from pchmr.core.engine.run import execute

    seen: list[tuple[int, str, int]] = []

    def look(report) -> None:  # the ServerApp thread, while Ray and (from round 1) its clients run
        seen.extend(listening_sockets(_descendants(os.getpid())))

    cfg = RunConfig(num_train=16, num_test=8, clients=2, per_round=2, rounds=1, batch_size=8, seed=3)
    execute(cfg.replace(out=str(tmp_path / "run")), on_round=look)
    assert len({port for _, _, port in seen}) >= 3, f"Ray's servers were seen: {seen}"
    exposed = sorted({(address, port) for _, address, port in seen if not _is_loopback(address)})
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert json.loads((tmp_path / "run" / "final.json").read_text())["round"] == 1
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ, "the switch is restored after the run"
