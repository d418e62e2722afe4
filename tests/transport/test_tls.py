from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshscale.transport.framing import read_frame, write_frame
from meshscale.transport.tls import TLSConfigError, client_context, peer_name, server_context
from meshscale.trust.bundle import Bundle, init_bundle, issue_node_cert

T = TypeVar("T")
REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=20)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Bundle]:
    root = tmp_path_factory.mktemp("tls")
    return init_bundle(root / "cluster"), init_bundle(root / "other")


@dataclass
class EchoServer:
    port: int
    peers: list[str | None] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)


@asynccontextmanager
async def echo_server(ctx: ssl.SSLContext) -> AsyncIterator[EchoServer]:
    state = EchoServer(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Only reached once the TLS handshake, client certificate included, succeeded.
        ssl_object = writer.get_extra_info("ssl_object")
        state.peers.append(peer_name(ssl_object))
        state.versions.append(ssl_object.version())
        try:
            payload = await read_frame(reader, 1024)
            await write_frame(writer, b"echo:" + payload)
        except REFUSED:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


async def exchange(port: int, ctx: ssl.SSLContext, payload: bytes) -> tuple[bytes, str | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        server_name = peer_name(writer.get_extra_info("ssl_object"))
        await write_frame(writer, payload)
        return await read_frame(reader, 1024), server_name
    finally:
        writer.close()


def _node(bundle: Bundle, name: str) -> tuple[bytes, bytes]:
    return issue_node_cert(bundle, name)


def test_mutual_tls13_exchange(bundles: tuple[Bundle, Bundle]) -> None:
    cluster, _ = bundles
    server_ctx = server_context(cluster, *_node(cluster, "server-node"))
    client_ctx = client_context(cluster, *_node(cluster, "client-node"))
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert client_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_ctx.verify_mode == client_ctx.verify_mode == ssl.CERT_REQUIRED
    assert not client_ctx.check_hostname

    async def go() -> None:
        async with echo_server(server_ctx) as server:
            reply, server_name = await exchange(server.port, client_ctx, b"hello")
            assert reply == b"echo:hello"
            assert server_name == "server-node"
            assert server.peers == ["client-node"]
            assert server.versions == ["TLSv1.3"]

    run(go())


def _refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> EchoServer:
    async def go() -> EchoServer:
        async with echo_server(server_ctx) as server:
            with pytest.raises(REFUSED):
                await exchange(server.port, client_ctx, b"let me in")
            return server

    return run(go())


def test_client_without_cert_is_refused(bundles: tuple[Bundle, Bundle]) -> None:
    cluster, _ = bundles
    server_ctx = server_context(cluster, *_node(cluster, "server-node"))
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=cluster.ca_cert_pem.decode())
    server = _refused(server_ctx, anonymous)
    assert server.peers == []


def test_client_from_another_ca_is_refused(bundles: tuple[Bundle, Bundle]) -> None:
    cluster, other = bundles
    server_ctx = server_context(cluster, *_node(cluster, "server-node"))
    # The intruder trusts our CA but holds a certificate from its own.
    intruder = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    intruder.check_hostname = False
    intruder.load_verify_locations(cadata=cluster.ca_cert_pem.decode())
    cert_pem, key_pem = _node(other, "intruder")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chain.pem"
        path.write_bytes(cert_pem + key_pem)
        intruder.load_cert_chain(path)
    server = _refused(server_ctx, intruder)
    assert server.peers == []


def test_client_refuses_server_from_another_ca(bundles: tuple[Bundle, Bundle]) -> None:
    cluster, other = bundles
    impostor_ctx = server_context(other, *_node(other, "impostor"))
    client_ctx = client_context(cluster, *_node(cluster, "client-node"))

    async def go() -> None:
        async with echo_server(impostor_ctx) as server:
            with pytest.raises(ssl.SSLCertVerificationError):
                await exchange(server.port, client_ctx, b"secret")
            assert server.peers == []

    run(go())


def test_tls12_client_is_refused(bundles: tuple[Bundle, Bundle]) -> None:
    cluster, _ = bundles
    server_ctx = server_context(cluster, *_node(cluster, "server-node"))
    old = client_context(cluster, *_node(cluster, "old-client"))
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server = _refused(server_ctx, old)
    assert server.peers == []


def test_cert_from_another_ca_cannot_build_a_context(bundles: tuple[Bundle, Bundle]) -> None:
    cluster, other = bundles
    with pytest.raises(TLSConfigError, match="not issued by this bundle's CA"):
        server_context(cluster, *_node(other, "n1"))


def test_mismatched_key_is_refused(bundles: tuple[Bundle, Bundle]) -> None:
    cluster, _ = bundles
    cert_pem, _ = _node(cluster, "n1")
    _, other_key = _node(cluster, "n2")
    with pytest.raises(TLSConfigError, match="cannot be loaded"):
        client_context(cluster, cert_pem, other_key)


def test_temp_file_fallback_leaves_nothing_behind(
    bundles: tuple[Bundle, Bundle], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cluster, _ = bundles
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server_context(cluster, *_node(cluster, "n1"))
    assert list(tmp_path.iterdir()) == []


def test_a_client_certificate_cannot_serve(bundles: tuple[Bundle, Bundle],
                                           tmp_path: Path) -> None:
    """Client certificates carry clientAuth only: a node (as TLS client) refuses a peer
    that presents one as a server, so a user cannot stand in for a node."""
    from meshscale.trust.bundle import write_client_bundle

    cluster, _ = bundles
    client = write_client_bundle(cluster, "mallory", tmp_path / "c")
    impostor = server_context(client)
    node_side = client_context(cluster, *_node(cluster, "node-1"))

    async def go() -> None:
        async with echo_server(impostor) as srv:
            with pytest.raises(REFUSED):
                await exchange(srv.port, node_side, b"hello")

    run(go())


def test_peer_name_without_peer() -> None:
    assert peer_name(None) is None
