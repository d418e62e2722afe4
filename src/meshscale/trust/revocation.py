"""Removing a node for good: revocation entries signed by the cluster CA.

``meshscale node remove NAME`` (on the machine with the admin bundle) signs an entry
"node NAME of cluster C is removed" with the CA key and hands it to one live node. From
there it spreads by gossip (``core/membership.py`` carries entries as opaque bytes and
asks the driver to verify them), and every node keeps every entry on disk. A node refuses
TLS and gossip from a removed name, and lists it as ``removed``; a removed node that
restarts is refused at its own start.

An entry names the node, not a certificate serial: a removed name stays removed, and a
machine that comes back needs a new name. This keeps the check to a set lookup and
covers every certificate ever issued to that name, renewals included.

Entries are small (about 200 bytes: a MessagePack payload and an ECDSA P-256 signature)
so one fits in a gossip datagram.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshscale.trust.certs import NODE_NAME_RE, CertError, load_ca_key

MAX_ENTRY_BYTES = 512
"""Largest signed entry accepted (a real one is about 200 bytes)."""
MAX_REASON_CHARS = 120
REVOKED_JSON = "revoked.json"
MAX_REVOKED_FILE_BYTES = 8 * 1024 * 1024


class RevocationError(ValueError):
    """An entry is malformed, for another cluster, or not signed by its CA."""


class Revocation(msgspec.Struct, frozen=True, array_like=True):
    version: int
    cluster_id: Annotated[str, msgspec.Meta(max_length=128)]
    name: Annotated[str, msgspec.Meta(max_length=63)]
    role: Annotated[str, msgspec.Meta(max_length=16)]
    revoked_at: float
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)] = ""


class _Signed(msgspec.Struct, array_like=True):
    payload: bytes
    signature: bytes


_signed_decoder = msgspec.msgpack.Decoder(_Signed)
_payload_decoder = msgspec.msgpack.Decoder(Revocation)
ENTRY_VERSION = 1


def sign_revocation(
    ca_key_pem: bytes, cluster_id: str, name: str, reason: str = "",
    revoked_at: float | None = None,
) -> bytes:
    """A signed entry removing node ``name`` from the cluster."""
    if not NODE_NAME_RE.match(name):
        raise RevocationError(f"invalid node name {name!r}")
    try:
        key = load_ca_key(ca_key_pem)
    except CertError as e:
        raise RevocationError(str(e)) from None
    entry = Revocation(ENTRY_VERSION, cluster_id, name, "node",
                       time.time() if revoked_at is None else revoked_at,
                       " ".join(reason.split())[:MAX_REASON_CHARS])
    payload = msgspec.msgpack.encode(entry)
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    blob = msgspec.msgpack.encode(_Signed(payload, signature))
    assert len(blob) <= MAX_ENTRY_BYTES, len(blob)
    return blob


def verify_revocation(blob: bytes, ca_cert_pem: bytes, cluster_id: str) -> Revocation:
    """The entry in ``blob`` if this cluster's CA signed it; ``RevocationError`` if not."""
    if not isinstance(blob, bytes | bytearray) or len(blob) > MAX_ENTRY_BYTES:
        raise RevocationError("revocation entry is not bytes or is too large")
    try:
        signed = _signed_decoder.decode(blob)
        entry = _payload_decoder.decode(signed.payload)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise RevocationError("malformed revocation entry") from None
    public = x509.load_pem_x509_certificate(ca_cert_pem).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise RevocationError("the CA key is not an EC key")
    try:
        public.verify(signed.signature, signed.payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise RevocationError("revocation entry not signed by this cluster's CA") from None
    if entry.version != ENTRY_VERSION or entry.role != "node":
        raise RevocationError("revocation entry of an unknown version or role")
    if entry.cluster_id != cluster_id:
        raise RevocationError("revocation entry for another cluster")
    if not NODE_NAME_RE.match(entry.name):
        raise RevocationError("revocation entry names an invalid node")
    return entry


class RevocationStore:
    """The entries a node keeps, in ``DATA_DIR/revoked.json`` (written atomically), each
    checked against the CA as it is loaded."""

    def __init__(self, data_dir: Path, ca_cert_pem: bytes, cluster_id: str) -> None:
        self.path = Path(data_dir) / REVOKED_JSON
        self.ca_cert_pem = ca_cert_pem
        self.cluster_id = cluster_id
        self.entries: dict[str, bytes] = {}
        """Removed node name -> its signed entry."""

    def load(self) -> None:
        """Read the file; an entry that fails its check is dropped (and so is a file
        that is not ours: it is rewritten at the next change)."""
        try:
            raw = self.path.read_bytes()[: MAX_REVOKED_FILE_BYTES + 1]
        except FileNotFoundError:
            return
        except OSError as e:
            raise RevocationError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            items = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RevocationError(f"{self.path}: not valid JSON") from None
        if not isinstance(items, list):
            raise RevocationError(f"{self.path}: expected a JSON list")
        for item in items:
            try:
                blob = base64.b64decode(str(item), validate=True)
                entry = self.verify(blob)
            except (ValueError, RevocationError):
                continue
            self.entries[entry.name] = blob

    def verify(self, blob: bytes) -> Revocation:
        return verify_revocation(blob, self.ca_cert_pem, self.cluster_id)

    def add(self, blob: bytes) -> Revocation | None:
        """Check and keep ``blob``; the entry if it is new (then the file is rewritten),
        None if it was already kept."""
        entry = self.verify(blob)
        if entry.name in self.entries:
            return None
        self.entries[entry.name] = bytes(blob)
        self.save()
        return entry

    def save(self) -> None:
        from meshscale.trust.bundle import write_public

        data = [base64.b64encode(b).decode("ascii") for b in self.entries.values()]
        write_public(self.path, (json.dumps(data, indent=1) + "\n").encode())
