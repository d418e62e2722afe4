"""TLS 1.3 contexts for node-to-node streams, mutually authenticated against the bundle CA.

Nodes are addressed by IP:port and found by gossip, so a client cannot check the server's
certificate against a host name; both sides instead require a certificate chaining to
the cluster CA. Knowing *who* is on the other end is the caller's job: ``certs.peer_of``
reads the name and role the CA signed into the peer's certificate.

Python's ssl module can only load a certificate chain from a file. The node's key is
therefore handed to OpenSSL through an anonymous in-memory file (``memfd_create``) where
the platform has one, else through a 0600 file in a private 0700 temp directory that is
removed as soon as it is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshscale.core.wire import PROTOCOL_VERSION
from meshscale.trust.bundle import Bundle
from meshscale.trust.certs import peer_subject


class TLSConfigError(ValueError):
    """The node certificate or key cannot be used with this bundle."""


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``, gone when the block exits."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("meshscale-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="meshscale-tls-")  # mode 0700
    try:
        path = os.path.join(directory, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check_cert(bundle: Bundle, cert_pem: bytes) -> None:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TLSConfigError("certificate is not a PEM certificate") from None
    ca = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TLSConfigError(
            f"certificate was not issued by this bundle's CA ({bundle.path})"
        ) from None


def _base_context(protocol: int, bundle: Bundle, cert_pem: bytes | None,
                  key_pem: bytes | None) -> ssl.SSLContext:
    if cert_pem is None or key_pem is None:
        cert_pem, key_pem = bundle.cert_pem, bundle.key_pem
    _check_cert(bundle, cert_pem)
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=bundle.ca_cert_pem.decode("ascii"))
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    chain = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    try:
        with _pem_file(chain) as path:
            ctx.load_cert_chain(path)
    except ssl.SSLError as e:
        raise TLSConfigError(f"certificate and key cannot be loaded: {e}") from None


def server_context(bundle: Bundle, cert_pem: bytes | None = None,
                   key_pem: bytes | None = None) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate from the bundle's CA;
    it presents ``cert_pem`` (default: the bundle's own certificate)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, bundle, cert_pem, key_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No session resumption: every connection presents and verifies certificates.
    ctx.num_tickets = 0
    return ctx


def client_context(bundle: Bundle, cert_pem: bytes | None = None,
                   key_pem: bytes | None = None) -> ssl.SSLContext:
    """A TLS 1.3 client context: presents ``cert_pem`` (default: the bundle's own),
    requires a node certificate (serverAuth) from the bundle's CA.

    Host names are not checked (peers are dialled by IP:port); use ``peer_of``.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, bundle, cert_pem, key_pem)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def https_context(bundle: Bundle) -> ssl.SSLContext:
    """A server context for the node's HTTP API: its node certificate, TLS 1.2 or 1.3
    (what browsers speak), no client certificate (HTTP callers present a token). A
    browser or ``curl --cacert ca.pem`` trusts it through the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, bundle.cert_pem, bundle.key_pem)
    return ctx


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The CN of the verified peer certificate, or None if there is none (``peer_of``
    gives its role too).

    With asyncio: ``peer_name(writer.get_extra_info("ssl_object"))``.
    """
    subject = peer_subject(ssl_object)
    return None if subject is None else subject[0]


# -- connection set-up ------------------------------------------------------------------

BUSY = b"MSB1"
"""Sent by a node in place of the greeting when it has no connection slot for the caller
(too many connections, or too many not yet authenticated from that address); it then
closes. The caller raises ``NodeBusy``."""


class NodeBusy(ConnectionError):
    """The node had no connection slot free: try again shortly (not a credentials error)."""


class VersionMismatch(ConnectionError):
    """The node speaks another version of the wire contract: old and new are not mixed."""


GREETING_PREFIX = b"MSH"
assert 0 < PROTOCOL_VERSION < 10
GREETING = GREETING_PREFIX + str(PROTOCOL_VERSION).encode()
"""Sent by the server in clear as soon as it is ready for the TLS handshake: ``MSH`` and
the wire version (``core.wire.PROTOCOL_VERSION``); the client starts TLS only after
reading it, and refuses a node of another version (``VersionMismatch``). The server stops reading before it sends the greeting,
so no byte of the handshake can be consumed by the plain-TCP layer (a race some event
loops, uvloop among them, otherwise have when upgrading an accepted connection)."""


def check_greeting(got: bytes, host: str, port: int, expected: bytes = GREETING) -> None:
    """Raise unless ``got`` is the greeting of a node ready for TLS: ``NodeBusy``,
    ``VersionMismatch`` (a node of another wire version) or ``ConnectionError``."""
    if got == BUSY:
        raise NodeBusy(f"{host}:{port}: node busy (no connection slot free); try again")
    if got != expected and got.startswith(GREETING_PREFIX) and len(got) == len(expected):
        theirs = got[len(GREETING_PREFIX):].decode("ascii", "replace")
        raise VersionMismatch(
            f"{host}:{port} speaks meshscale wire version {theirs}, this side "
            f"{PROTOCOL_VERSION}: every node and client of a mesh must run the same "
            "version (a mesh upgrades all at once)")
    if got != expected:
        raise ConnectionError(f"{host}:{port} is not a meshscale node")


async def connect_tls(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    handshake_timeout: float = 5.0,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP connection to a node, wait for its greeting, then start TLS."""
    reader, writer = await asyncio.open_connection(host, port, limit=limit)
    try:
        check_greeting(await reader.readexactly(len(GREETING)), host, port)
        await writer.start_tls(ctx, ssl_handshake_timeout=handshake_timeout)
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer
