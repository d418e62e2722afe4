"""Signed revocation entries: made with the CA key, checked with the CA certificate."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgspec
import pytest

from meshscale.trust.bundle import Bundle, init_bundle
from meshscale.trust.revocation import (
    MAX_ENTRY_BYTES,
    RevocationError,
    RevocationStore,
    sign_revocation,
    verify_revocation,
)


@pytest.fixture(scope="module")
def admins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Bundle]:
    root = tmp_path_factory.mktemp("rev")
    return init_bundle(root / "a"), init_bundle(root / "b")


def _sign(b: Bundle, name: str = "edge-3", reason: str = "decommissioned") -> bytes:
    assert b.ca_key_pem is not None
    return sign_revocation(b.ca_key_pem, b.cluster_id, name, reason)


def test_an_entry_fits_a_datagram_and_verifies(admins: tuple[Bundle, Bundle]) -> None:
    a, _ = admins
    blob = _sign(a, reason="x" * 500)
    assert len(blob) <= MAX_ENTRY_BYTES < 1300
    entry = verify_revocation(blob, a.ca_cert_pem, a.cluster_id)
    assert entry.name == "edge-3" and entry.role == "node" and len(entry.reason) == 120


def test_another_cluster_or_ca_is_refused(admins: tuple[Bundle, Bundle]) -> None:
    a, b = admins
    with pytest.raises(RevocationError, match="not signed by this cluster's CA"):
        verify_revocation(_sign(b), a.ca_cert_pem, a.cluster_id)
    assert b.ca_key_pem is not None
    # Signed by a's CA key would need a's key; b's key with a's cluster id is still b's CA.
    forged = sign_revocation(b.ca_key_pem, a.cluster_id, "edge-3")
    with pytest.raises(RevocationError, match="not signed"):
        verify_revocation(forged, a.ca_cert_pem, a.cluster_id)
    with pytest.raises(RevocationError, match="another cluster"):
        verify_revocation(_sign(a), a.ca_cert_pem, b.cluster_id)


def test_a_tampered_entry_is_refused(admins: tuple[Bundle, Bundle]) -> None:
    a, _ = admins
    payload, sig = msgspec.msgpack.decode(_sign(a, "edge-3"))
    tampered = payload.replace(b"edge-3", b"edge-4")
    with pytest.raises(RevocationError, match="not signed"):
        verify_revocation(msgspec.msgpack.encode([tampered, sig]), a.ca_cert_pem, a.cluster_id)
    for junk in (b"", b"\x91\x91\x91", b"\x00" * 10, b"x" * (MAX_ENTRY_BYTES + 1)):
        with pytest.raises(RevocationError):
            verify_revocation(junk, a.ca_cert_pem, a.cluster_id)


def test_the_store_keeps_entries_across_restarts(admins: tuple[Bundle, Bundle],
                                                 tmp_path: Path) -> None:
    a, b = admins
    store = RevocationStore(tmp_path, a.ca_cert_pem, a.cluster_id)
    store.load()
    assert store.add(_sign(a, "n1")) is not None
    assert store.add(_sign(a, "n1")) is None  # already kept
    with pytest.raises(RevocationError):
        store.add(_sign(b, "n2"))
    again = RevocationStore(tmp_path, a.ca_cert_pem, a.cluster_id)
    again.load()
    assert set(again.entries) == {"n1"}
    # An entry planted in the file that does not verify is dropped on load.
    data = json.loads((tmp_path / "revoked.json").read_text())
    data.append(base64.b64encode(_sign(b, "n3")).decode())
    (tmp_path / "revoked.json").write_text(json.dumps(data))
    third = RevocationStore(tmp_path, a.ca_cert_pem, a.cluster_id)
    third.load()
    assert set(third.entries) == {"n1"}
