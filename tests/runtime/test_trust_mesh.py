"""Certificates a live node must refuse, over real TLS: an expired one, one from another
CA, one with no meshscale role; and what each role may do on the RPC port."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from runtime_mesh import wait_for

from meshscale.client.rpc import ClientCredentials, RpcError, call
from meshscale.core.rpc import PushPullFrame, encode_stream_message
from meshscale.runtime.launcher import LocalMesh
from meshscale.transport.framing import write_frame
from meshscale.transport.tls import client_context, connect_tls
from meshscale.trust.bundle import init_bundle, load_bundle, write_client_bundle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("trust"), 2, http=False) as m:
        yield m


def _cert(ca_cert_pem: bytes, ca_key_pem: bytes, *, ou: str | None, expired: bool
          ) -> tuple[bytes, bytes]:
    """A client certificate built by hand: with ``ou`` as its role (or none), and a
    lifetime that ended yesterday if ``expired``."""
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = ((now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired
                  else (now - dt.timedelta(minutes=5), now + dt.timedelta(days=1)))
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]
    if ou is not None:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    cert = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            # Strict verification (VERIFY_X509_STRICT) wants the key identifiers.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _rejected(mesh: LocalMesh, reason: str) -> int:
    stats = call(mesh.nodes[0].address, mesh.credentials(), "stats", timeout=5)
    return int(stats["rejected_messages"].get(reason, 0))


def test_an_expired_certificate_is_refused_at_the_handshake(mesh: LocalMesh) -> None:
    admin = load_bundle(mesh.admin_path)
    assert admin.ca_key_pem is not None
    before = _rejected(mesh, "tls")
    cert, key = _cert(admin.ca_cert_pem, admin.ca_key_pem, ou="meshscale-admin", expired=True)
    creds = ClientCredentials(client_context(admin, cert, key), admin.token or "")
    with pytest.raises(RpcError):
        call(mesh.nodes[0].address, creds, "members", timeout=5)
    wait_for(lambda: _rejected(mesh, "tls") > before, 10, "the handshake refusal counted")


def test_a_certificate_from_another_ca_is_refused(mesh: LocalMesh, tmp_path: Path) -> None:
    other = init_bundle(tmp_path / "other")
    before = _rejected(mesh, "tls")
    with pytest.raises(RpcError):
        call(mesh.nodes[0].address, ClientCredentials.from_bundle(other), "members", timeout=5)
    wait_for(lambda: _rejected(mesh, "tls") > before, 10, "the handshake refusal counted")


def test_a_certificate_without_a_role_is_refused(mesh: LocalMesh) -> None:
    """Signed by the cluster's CA but carrying no meshscale role (as the certificates an
    older meshscale minted at run time): refused after the handshake, counted."""
    admin = load_bundle(mesh.admin_path)
    assert admin.ca_key_pem is not None
    before = _rejected(mesh, "no_role")
    cert, key = _cert(admin.ca_cert_pem, admin.ca_key_pem, ou=None, expired=False)
    creds = ClientCredentials(client_context(admin, cert, key), admin.token or "")
    with pytest.raises(RpcError):
        call(mesh.nodes[0].address, creds, "members", timeout=5)
    assert _rejected(mesh, "no_role") == before + 1


def test_roles_on_the_rpc_port(mesh: LocalMesh, tmp_path: Path) -> None:
    admin = load_bundle(mesh.admin_path)
    addr = mesh.nodes[0].address
    viewer = ClientCredentials.from_bundle(
        write_client_bundle(admin, "viewer", tmp_path / "v", read_only=True))
    assert len(call(addr, viewer, "members", timeout=5)) == 2
    with pytest.raises(RpcError, match=r"forbidden: 'obj\.put_small' needs write access; "
                       r"the caller 'viewer' has role read-only"):
        call(addr, viewer, "obj.put_small", {"data": b"x", "replicas": 1, "w": 1}, timeout=5)
    with pytest.raises(RpcError, match=r"forbidden: 'kv\.apply' needs node access"):
        call(addr, mesh.credentials(), "kv.apply", {}, timeout=5)
    # The node's own certificate may (its argument check answers instead of the door).
    with pytest.raises(RpcError) as e:
        call(addr, mesh.node_credentials(1), "kv.apply", {}, timeout=5)
    assert "forbidden" not in str(e.value)
    refused = call(addr, mesh.credentials(), "stats", timeout=5)["rejected_messages"]
    assert refused.get("forbidden", 0) >= 2


def test_a_client_certificate_cannot_push_pull(mesh: LocalMesh) -> None:
    """Membership anti-entropy is node-to-node: an admin client's push/pull gets no answer."""
    import asyncio

    creds = mesh.credentials()
    host, port = mesh.nodes[0].address.rsplit(":", 1)
    before = _rejected(mesh, "forbidden")

    async def go() -> bytes:
        reader, writer = await connect_tls(host, int(port), creds.ssl_context)
        try:
            await write_frame(writer, encode_stream_message(PushPullFrame(b"x" * 64)))
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    assert asyncio.run(go()) == b""  # closed without a reply
    assert _rejected(mesh, "forbidden") == before + 1


def test_a_replayed_gossip_datagram_is_refused(mesh: LocalMesh) -> None:
    """A captured sealed datagram sent again used to be accepted (12 of 12 replays)."""
    import os
    import socket
    import time

    import msgspec

    from meshscale.core.membership import Ping
    from meshscale.core.wire import encode_envelope
    from meshscale.trust.replay import ReplayGuard

    keyring = load_bundle(mesh.admin_path).keyring
    node = mesh.nodes[0]
    ping = msgspec.msgpack.encode(Ping(99, node.name, "nobody", "127.0.0.1:9"))
    sealed = keyring.seal(ReplayGuard(os.urandom(8)).stamp(encode_envelope([ping]), time.time()))
    stale = keyring.seal(ReplayGuard(os.urandom(8)).stamp(encode_envelope([ping]),
                                                          time.time() - 3600))
    before = {r: _rejected(mesh, r) for r in ("replay", "stale")}
    host, port = node.address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in (sealed, sealed, sealed, stale):
            s.sendto(d, (host, int(port)))
    wait_for(lambda: _rejected(mesh, "replay") >= before["replay"] + 2, 10, "2 replays refused")
    wait_for(lambda: _rejected(mesh, "stale") >= before["stale"] + 1, 10, "a stale one refused")
    assert _rejected(mesh, "replay") == before["replay"] + 2  # the first copy was fresh


def test_a_node_speaks_only_for_itself(mesh: LocalMesh) -> None:
    """Any holder of a node certificate used to be able to send replication and scheduling
    messages in another node's name."""
    addr = mesh.nodes[0].address
    as_node_1 = mesh.node_credentials(1)
    with pytest.raises(RpcError, match=r"'repl\.msg' from node 'node-1' claims to come from "
                       r"'node-0'"):
        call(addr, as_node_1, "repl.msg", {"src": "node-0", "payload": b""}, timeout=5)
    with pytest.raises(RpcError, match="claims to come from"):
        call(addr, as_node_1, "task.done", {"node": "node-9", "task_id": "x"}, timeout=5)
    # In its own name the request reaches the protocol (which drops the junk, counted).
    assert call(addr, as_node_1, "repl.msg", {"src": "node-1", "payload": b"junk"},
                timeout=5) == {}
    assert _rejected(mesh, "impersonation") >= 2


def test_silent_sockets_cannot_take_every_slot(mesh: LocalMesh) -> None:
    """256 plain TCP sockets from one host that never speak used to lock every client and
    peer out of a node's port until they timed out. Sockets not yet authenticated are now
    bounded per source address: the flooding address is told "busy", and a real client
    from another address keeps its slot."""
    import socket

    from meshscale.transport.tls import BUSY

    host, port = mesh.nodes[0].address.rsplit(":", 1)
    before = _rejected(mesh, "busy")
    flood = []
    try:
        for _ in range(256):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))  # another address on the loopback network
            s.connect((host, int(port)))
            flood.append(s)
        flood[-1].settimeout(5)
        assert flood[-1].recv(4) == BUSY  # no slot left for that address: told so
        # The real client (from 127.0.0.1) is served meanwhile.
        assert len(call(mesh.nodes[0].address, mesh.credentials(), "members", timeout=5)) == 2
    finally:
        for s in flood:
            s.close()
    wait_for(lambda: _rejected(mesh, "busy") >= before + 200, 10, "the flood told busy")


def test_a_request_out_of_its_methods_contract_is_answered_invalid(mesh: LocalMesh) -> None:
    """The node checks a request against its method's struct (core/api) before the
    handler sees it: a wrong type or an unknown field is ``invalid``, naming the field,
    and the connection carries on."""
    from meshscale.client.rpc import RemoteError, request
    from meshscale.core.api import Empty
    from meshscale.core.api.node import EVENTS, MEMBERS, EventsRequest

    addr, creds = mesh.nodes[0].address, mesh.credentials()
    for args, field in (({"since": "yesterday"}, "since"), ({"snice": 1}, "snice")):
        with pytest.raises(RemoteError) as e:
            call(addr, creds, "events", args, timeout=5)
        assert e.value.code == "invalid" and field in str(e.value)
    assert [m.name for m in request(addr, creds, MEMBERS, Empty(), timeout=5)] == sorted(
        n.name for n in mesh.nodes)
    assert all(ev.seq > 1 for ev in request(addr, creds, EVENTS, EventsRequest(since=1),
                                            timeout=5))
