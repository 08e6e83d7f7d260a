"""SuperNode authentication on the Deployment Engine: each client partition bound to one node's key.

A SuperNode says which partition it holds (``--node-config partition-id=…``); nothing in that
claim proves it. With SuperNode authentication on (``flower-superlink --enable-supernode-auth``,
which needs TLS), the SuperLink accepts a node only if it signs with a private key whose public
key was registered (``flwr supernode register KEY.pub``), and the node id it gets is tied to that
key for good. pchmr then binds each partition to one of those keys:

* the run's binding is ``node-keys.json`` in the run directory (partition id → the SHA-256
  fingerprint of the key), written when the run is prepared, from ``--node-keys FILE`` (a TOML
  table ``0 = "node0.pub"``, paths relative to the file) or, for a SuperLink pchmr starts on
  loopback with ``--node-auth``, from the keys it generates there (:class:`LocalPKI`);
* when the server asks every node for its partition, it reads each node's registered key from
  the SuperLink (``grid.get_nodes()``) and accepts a claim only when that key is the one bound to
  the claimed partition (:func:`bind_claims`). Any other claim is refused and named in the log; a
  node is never sampled for a partition whose key it does not hold, so two nodes can no longer
  take one partition.

Keys are Flower's: NIST elliptic-curve keys, public halves in OpenSSH or PEM form, private halves
in OpenSSH form (``ssh-keygen -t ecdsa -b 384 -N ''``).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import logging
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NODE_KEYS_FILE",
    "LocalPKI",
    "NodeKeyError",
    "bind_claims",
    "fingerprint",
    "read_binding",
    "read_node_keys",
    "read_public_key",
    "write_binding",
]

log = logging.getLogger("pchmr.deployment")

#: The run directory's binding of partition ids to key fingerprints.
NODE_KEYS_FILE = "node-keys.json"


class NodeKeyError(ValueError):
    """A node key file or a ``--node-keys`` binding that cannot be used, with what was expected."""


def read_public_key(path: str | os.PathLike[str]) -> bytes:
    """The EC public key in ``path`` (OpenSSH ``ecdsa-sha2-nistp…`` or PEM) as Flower stores it:
    PEM SubjectPublicKeyInfo bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NodeKeyError(f"cannot read the node key {path}: {exc.strerror or exc}") from None
    key = None
    for loader in (serialization.load_ssh_public_key, serialization.load_pem_public_key):
        try:
            key = loader(data)
            break
        except (ValueError, TypeError):
            continue
        except Exception:  # cryptography's UnsupportedAlgorithm and friends
            continue
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NodeKeyError(
            f"{path} is not an elliptic-curve public key in OpenSSH or PEM form (what `flwr supernode register` "
            "takes, e.g. made by `ssh-keygen -t ecdsa -b 384`)"
        )
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(public_key: bytes) -> str:
    """``SHA256:<hex>`` of a PEM SubjectPublicKeyInfo key's DER bytes (independent of PEM line
    breaks); an empty key (a node registered without authentication) gives ``""``."""
    if not public_key:
        return ""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(bytes(public_key))
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def read_node_keys(path: str | os.PathLike[str], clients: int) -> dict[int, str]:
    """partition id → key fingerprint from a ``--node-keys`` TOML file.

    The file is one table: each key a partition id ``0 … clients-1``, each value the path of that
    partition's SuperNode public key (relative to the file). Every partition must be bound, and no
    key may be bound twice.
    """
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except OSError as exc:
        raise NodeKeyError(f"cannot read --node-keys {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NodeKeyError(
            f'--node-keys {path} is not TOML ({exc}); expected lines like 0 = "node0.pub", one per partition'
        ) from None
    binding: dict[int, str] = {}
    for key, value in table.items():
        if not key.isdigit() or not 0 <= int(key) < clients:
            raise NodeKeyError(
                f"--node-keys {path}: {key!r} is not a partition id; expected the ids 0 … {clients - 1} as keys"
            )
        if not isinstance(value, str):
            raise NodeKeyError(f"--node-keys {path}: partition {key} = {value!r}; expected the path of a public key")
        key_path = Path(value) if Path(value).is_absolute() else path.parent / value
        binding[int(key)] = fingerprint(read_public_key(key_path))
    missing = sorted(set(range(clients)) - set(binding))
    if missing:
        raise NodeKeyError(
            f"--node-keys {path} binds no key to partition(s) {_ids(missing)}: every one of the {clients} partitions "
            "needs its SuperNode's key"
        )
    _check_distinct(binding, f"--node-keys {path}")
    return dict(sorted(binding.items()))


def write_binding(run_dir: str | os.PathLike[str], binding: Mapping[int, str]) -> Path:
    """Save the binding as the run directory's ``node-keys.json`` (atomically)."""
    from pchmr.core.kit.atomic import write_text_atomic

    path = Path(run_dir) / NODE_KEYS_FILE
    write_text_atomic(path, json.dumps({"partitions": {str(p): f for p, f in sorted(binding.items())}}, indent=1))
    return path


def read_binding(run_dir: str | os.PathLike[str]) -> dict[int, str] | None:
    """The run directory's binding, or None when the run binds no keys."""
    path = Path(run_dir) / NODE_KEYS_FILE
    if not path.exists():
        return None
    try:
        partitions = json.loads(path.read_text())["partitions"]
        binding = {int(p): str(f) for p, f in partitions.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NodeKeyError(
            f'{path} is not a node-key binding ({exc}); expected {{"partitions": {{"0": "SHA256:…", …}}}}'
        ) from None
    if not all(f.startswith("SHA256:") for f in binding.values()):
        raise NodeKeyError(f"{path}: every partition's value must be a SHA256: fingerprint")
    _check_distinct(binding, str(path))
    return binding


def bind_claims(
    claims: Iterable[tuple[int, int]], node_keys: Mapping[int, bytes], binding: Mapping[int, str]
) -> list[tuple[int, int]]:
    """The ``(node id, partition id)`` claims whose node's registered key is the one bound to the
    partition; every other claim is refused with an error in the log naming the node, the
    partition and both fingerprints."""
    accepted = []
    for node, partition in claims:
        bound = binding.get(partition)
        held = fingerprint(node_keys.get(node, b""))
        if bound is not None and held == bound:
            accepted.append((node, partition))
            continue
        if bound is None:
            why = "no key is bound to that partition"
        elif not held:
            why = (
                "the node has no registered key: the SuperLink does not authenticate SuperNodes (start it with "
                "--enable-supernode-auth and register each node's key with `flwr supernode register`)"
            )
        else:
            why = f"its key {held} is not the partition's key {bound}"
        log.error("node %d claims partition %d and is refused (never sampled): %s", node, partition, why)
    return accepted


def _check_distinct(binding: Mapping[int, str], where: str) -> None:
    seen: dict[str, int] = {}
    for partition, fp in sorted(binding.items()):
        if fp in seen:
            raise NodeKeyError(
                f"{where}: partitions {seen[fp]} and {partition} are bound to the same key {fp}; each SuperNode needs "
                "its own key"
            )
        seen[fp] = partition


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids[:10]) + (f" … ({len(ids)} in all)" if len(ids) > 10 else "")


# --------------------------------------------------------------------------------------
# a private PKI for a SuperLink on loopback
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalPKI:
    """A certificate authority, a TLS certificate for the loopback SuperLink, and one EC key pair
    per SuperNode, in ``directory``: what ``pchmr run --engine deployment --node-auth`` uses.

    Made once (:meth:`ensure`) and reused, so a resumed run finds the keys its binding names.
    Private keys are written readable by their owner only.
    """

    directory: Path

    @property
    def ca_certificate(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_certificate(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def node_private_key(self, index: int) -> Path:
        return self.directory / f"node-{index}.key"

    def node_public_key(self, index: int) -> Path:
        return self.directory / f"node-{index}.pub"

    def ensure(self, num_nodes: int) -> LocalPKI:
        """Create what is missing: the CA and server certificate, and keys for nodes ``0 … num_nodes-1``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        if not (self.ca_certificate.exists() and self.server_certificate.exists() and self.server_key.exists()):
            self._make_tls()
        for index in range(num_nodes):
            if not (self.node_private_key(index).exists() and self.node_public_key(index).exists()):
                self._make_node_key(index)
        return self

    def binding(self, num_nodes: int) -> dict[int, str]:
        """Partition ``i`` → node ``i``'s key."""
        return {i: fingerprint(read_public_key(self.node_public_key(i))) for i in range(num_nodes)}

    def _make_tls(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pchmr local deployment CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP384R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        _write_private(
            self.server_key,
            server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
        self.server_certificate.write_bytes(server_cert.public_bytes(pem))
        self.ca_certificate.write_bytes(ca_cert.public_bytes(pem))

    def _make_node_key(self, index: int) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            self.node_private_key(index),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        self.node_public_key(index).write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
        )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
