"""A node's data directory: who it is and the certificate it presents.

    identity.json   {"name", "incarnation", "created"}             0600
    node.pem        node certificate issued by the cluster CA     0644
    node.key        its private key                               0600

A restarted node keeps its name and starts at the stored incarnation + 1, written
durably (fsync, atomic rename) before it joins, so it always outbids its former life.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshscale.trust.bundle import (
    NODE_NAME_RE,
    Bundle,
    BundleError,
    issue_node_cert,
    write_private,
    write_public,
)

IDENTITY_JSON = "identity.json"
NODE_CERT = "node.pem"
NODE_KEY = "node.key"
MAX_IDENTITY_BYTES = 64 * 1024


class IdentityError(Exception):
    """The data directory cannot be used; the message is one line."""


@dataclass(frozen=True)
class Identity:
    name: str
    incarnation: int
    created: str


def read_identity(data_dir: Path) -> Identity | None:
    path = Path(data_dir) / IDENTITY_JSON
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_IDENTITY_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IdentityError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
        name, inc, created = data["name"], data["incarnation"], data.get("created", "")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IdentityError(f"{path}: not a valid identity file") from None
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise IdentityError(f"{path}: invalid node name")
    if not isinstance(inc, int) or isinstance(inc, bool) or not 0 <= inc < 2**62:
        raise IdentityError(f"{path}: invalid incarnation")
    return Identity(name, inc, str(created))


def write_identity(data_dir: Path, identity: Identity) -> None:
    data = {"name": identity.name, "incarnation": identity.incarnation, "created": identity.created}
    try:
        write_private(Path(data_dir) / IDENTITY_JSON, (json.dumps(data) + "\n").encode())
    except OSError as e:
        raise IdentityError(f"{data_dir}: cannot write identity: {e.strerror or e}") from None


def start_identity(data_dir: Path, name: str | None) -> Identity:
    """Load (or create) the identity for a starting node and persist the bumped
    incarnation before it is used."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise IdentityError(f"{data_dir}: cannot create data dir: {e.strerror or e}") from None
    stored = read_identity(data_dir)
    if stored is None:
        if name is None:
            raise IdentityError(f"{data_dir}: no stored identity; give the node a --name")
        if not NODE_NAME_RE.match(name):
            raise IdentityError(
                f"invalid node name {name!r}: use 1-63 letters, digits, '.', '_' or '-'"
            )
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        identity = Identity(name, 1, created)
    else:
        if name is not None and name != stored.name:
            raise IdentityError(
                f"{data_dir} belongs to node {stored.name!r}, not {name!r}; "
                "use another --data-dir or drop --name"
            )
        identity = Identity(stored.name, stored.incarnation + 1, stored.created)
    write_identity(data_dir, identity)
    return identity


def _cert_ok(bundle: Bundle, cert_pem: bytes, name: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cn or cn[0].value != name:
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)


def node_certificate(
    bundle: Bundle, data_dir: Path, name: str, hosts: list[str]
) -> tuple[bytes, bytes]:
    """The node's (cert_pem, key_pem): the stored pair if the bundle's CA issued it for
    this name, else a new one issued from the bundle's CA key and stored."""
    data_dir = Path(data_dir)
    cert_path, key_path = data_dir / NODE_CERT, data_dir / NODE_KEY
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except FileNotFoundError:
        cert_pem = key_pem = b""
    except OSError as e:
        raise IdentityError(
            f"{data_dir}: cannot read node certificate: {e.strerror or e}"
        ) from None
    if cert_pem and key_pem and _cert_ok(bundle, cert_pem, name):
        if os.name == "posix" and key_path.stat().st_mode & 0o077:
            raise IdentityError(f"{key_path}: permissions too open (chmod 600 {key_path})")
        return cert_pem, key_pem
    if bundle.ca_key_pem is None:
        raise BundleError(
            f"{bundle.path}: no ca.key to issue a certificate for node {name!r}; issue one "
            f"with `meshscale cert issue` and store it as {cert_path} and {key_path}"
        )
    cert_pem, key_pem = issue_node_cert(bundle, name, hosts)
    try:
        write_private(key_path, key_pem)
        write_public(cert_path, cert_pem)
    except OSError as e:
        raise IdentityError(
            f"{data_dir}: cannot write node certificate: {e.strerror or e}"
        ) from None
    return cert_pem, key_pem
