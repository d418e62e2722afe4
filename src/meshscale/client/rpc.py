"""Calling a node's RPCs: mutual TLS with an ephemeral certificate plus the admin token.

A client command holds the cluster bundle (``--bundle`` or ``MESHSCALE_BUNDLE``). It issues
itself a short-lived certificate from the bundle's CA, in memory, and sends the admin token
with every request. A bundle without ``ca.key`` cannot be used by clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from dataclasses import dataclass
from typing import Any

from meshscale.core.rpc import (
    RpcRequest,
    RpcResponse,
    decode_stream_message,
    encode_stream_message,
)
from meshscale.core.wire import WireError
from meshscale.trust.bundle import Bundle, BundleError, issue_node_cert
from meshscale.trust.framing import FrameConnection, FrameTooLarge, open_frames, split_addr
from meshscale.trust.tls import GREETING, client_context

MAX_REPLY_BYTES = 64 * 1024 * 1024


class RpcError(Exception):
    """An RPC failed: unreachable node, refused credentials, or an error reply."""


class RemoteError(RpcError):
    """The node answered, with an error (the connection is fine)."""


@dataclass
class ClientCredentials:
    ssl_context: ssl.SSLContext
    token: str

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ClientCredentials:
        if bundle.ca_key_pem is None:
            raise BundleError(
                f"{bundle.path}: no ca.key; client commands need a bundle that can issue "
                "their certificate"
            )
        cert_pem, key_pem = issue_node_cert(bundle, "meshscale-client", ["127.0.0.1"], days=1)
        return cls(client_context(bundle, cert_pem, key_pem), bundle.token)


_ids = itertools.count(1)


class RpcConnection:
    """One TLS connection to a node, reused for sequential calls."""

    def __init__(self, addr: str, creds: ClientCredentials, timeout: float = 5.0) -> None:
        self.addr = addr
        self.creds = creds
        self.timeout = timeout
        self._writer: FrameConnection | None = None
        """The open connection (replies are received straight into their own buffers:
        see ``trust.framing.FrameConnection``), or None."""
        self._lock = asyncio.Lock()

    async def _connect(self) -> FrameConnection:
        if self._writer is None or self._writer.is_closing():
            host, port = split_addr(self.addr)
            self._writer = await open_frames(
                host, port, self.creds.ssl_context, MAX_REPLY_BYTES,
                greeting=GREETING, handshake_timeout=self.timeout,
            )
        return self._writer

    async def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._call(method, args or {})
            except RpcError:
                raise
            except TimeoutError:
                await self.close()
                raise RpcError(f"{self.addr}: timed out after {self.timeout:g}s") from None
            except (
                OSError,
                ssl.SSLError,
                asyncio.IncompleteReadError,
                FrameTooLarge,
                WireError,
            ) as e:
                await self.close()
                detail = str(e) or type(e).__name__
                if isinstance(e, asyncio.IncompleteReadError):
                    detail = "connection closed by the node (wrong bundle or token?)"
                raise RpcError(f"{self.addr}: {detail}") from None

    async def _call(self, method: str, args: dict[str, Any]) -> Any:
        conn = await self._connect()
        req = RpcRequest(next(_ids), method, self.creds.token, args)
        await conn.write_frame(encode_stream_message(req), max_size=MAX_REPLY_BYTES)
        data = await conn.read_frame()
        msg = decode_stream_message(data, MAX_REPLY_BYTES)
        if not isinstance(msg, RpcResponse) or msg.id != req.id:
            await self.close()
            raise RpcError(f"{self.addr}: unexpected reply")
        if not msg.ok:
            raise RemoteError(f"{self.addr}: {msg.error}")
        return msg.result

    async def close(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()


async def call_async(
    addr: str,
    creds: ClientCredentials,
    method: str,
    args: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> Any:
    conn = RpcConnection(addr, creds, timeout)
    try:
        return await conn.call(method, args)
    finally:
        await conn.close()


def call(
    addr: str,
    creds: ClientCredentials,
    method: str,
    args: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> Any:
    """Blocking one-shot RPC (opens and closes a connection)."""
    return asyncio.run(call_async(addr, creds, method, args, timeout))
