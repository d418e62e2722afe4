"""Calling a node's RPCs over mutual TLS: the one RPC connection, used by clients and by
nodes calling each other (a client imports it through ``meshscale.client.rpc``).

A client presents the certificate of its client bundle (``--bundle`` or
``MESHSCALE_BUNDLE``; the admin bundle carries one too) and sends its token with every
request; a node presents its node certificate and no token. The certificate's role says
what the caller may do (``core/access.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

import msgspec

from meshscale.core.api.contract import Method, Request, decode_reply, request_args
from meshscale.core.rpc import (
    RpcReply,
    RpcRequest,
    decode_reply_message,
    encode_stream_message,
)
from meshscale.core.wire import WireError
from meshscale.transport.credentials import Credentials
from meshscale.transport.framing import FrameConnection, FrameTooLarge, open_frames, split_addr
from meshscale.transport.tls import GREETING, NodeBusy, VersionMismatch

MAX_REPLY_BYTES = 64 * 1024 * 1024
T = TypeVar("T")
Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")


def _builtins(raw: msgspec.Raw) -> Any:
    """An encoded result as msgpack builtins (the untyped calls' result)."""
    try:
        return msgspec.msgpack.decode(raw)
    except msgspec.DecodeError as e:  # not seen: the frame's decoder checked its shape
        raise RpcError(f"malformed reply: {e}") from None


class WireCounter(Protocol):
    """Where a node counts its traffic (``runtime.node.AgentStats``): the calls a node
    makes are counted by method, requests as sent and replies as received."""

    def count_in(self, kind: str, nbytes: int) -> None: ...

    def count_out(self, kind: str, nbytes: int) -> None: ...


class RpcError(Exception):
    """An RPC failed: unreachable node, refused credentials, or an error reply.
    ``unreachable``: nothing answered at the address (refused, timed out, no route), as
    opposed to a node that answered and refused (TLS, token, an error reply).
    ``refused``: the address itself said no one is there: the connection was refused or
    reset (a crashed process's port), as opposed to a silence that may be a slow node."""

    def __init__(self, message: str, *, unreachable: bool = False,
                 refused: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable or refused
        self.refused = refused


class RemoteError(RpcError):
    """The node answered, with an error (the connection is fine). ``code`` is its
    ``core.api.ErrorCode`` value ("" from a node that sent none)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


ClientCredentials = Credentials
"""What a caller presents (``transport/credentials.py``)."""


_ids = itertools.count(1)


class RpcConnection:
    """One TLS connection to a node, reused for sequential calls."""

    def __init__(self, addr: str, creds: ClientCredentials, timeout: float = 5.0,
                 counter: WireCounter | None = None,
                 connect_timeout: float | None = None) -> None:
        self.addr = addr
        self.creds = creds
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else min(connect_timeout,
                                                                           timeout)
        """TCP + greeting + TLS set-up of a new connection (within ``timeout``)."""
        self.counter = counter
        """Counts each request's and reply's bytes under the call's method, if set."""
        self._writer: FrameConnection | None = None
        """The open connection (replies are received straight into their own buffers:
        see ``trust.framing.FrameConnection``), or None."""
        self._lock = asyncio.Lock()

    async def _connect(self) -> FrameConnection:
        if self._writer is None or self._writer.is_closing():
            host, port = split_addr(self.addr)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    self._writer = await open_frames(
                        host, port, self.creds.ssl_context, MAX_REPLY_BYTES,
                        greeting=GREETING, handshake_timeout=self.connect_timeout,
                    )
            except TimeoutError:
                raise RpcError(f"{self.addr}: no connection within "
                               f"{self.connect_timeout:g}s (unreachable?)",
                               unreachable=True) from None
        return self._writer

    @property
    def is_open(self) -> bool:
        """An open connection is held (a call would not need a new handshake)."""
        return self._writer is not None and not self._writer.is_closing()

    async def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        """Call ``method`` by name; its result as msgpack builtins."""
        return _builtins(await self.call_raw(method, args))

    async def call_raw(self, method: str, args: dict[str, Any] | None = None) -> msgspec.Raw:
        """Call ``method`` by name; its result still encoded."""
        async with self._lock:
            return await self._guarded(self._call(method, args or {}))

    async def request(self, method: Method[Req, Rep], req: Req) -> Rep:
        """Call typed ``method`` (``core/api``) with ``req``; its reply, checked against
        the method's reply type (a reply out of contract raises ``RpcError``)."""
        raw = await self.call_raw(method.name, request_args(req))
        try:
            return decode_reply(method, raw)
        except ValueError as e:
            raise RpcError(f"{self.addr}: {e}") from None

    async def _guarded(self, work: Coroutine[Any, Any, T]) -> T:
        """``work`` within the timeout, its failures as ``RpcError`` (the connection is
        closed unless the node answered with an error)."""
        try:
            async with asyncio.timeout(self.timeout):
                return await work
        except RpcError:
            raise
        except TimeoutError:
            await self.close()
            raise RpcError(f"{self.addr}: timed out after {self.timeout:g}s",
                           unreachable=True) from None
        except (NodeBusy, VersionMismatch) as e:
            await self.close()
            raise RpcError(str(e)) from None
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
            # TLS refusals are OSErrors too, but something answered.
            unreachable = isinstance(e, OSError) and not isinstance(e, ssl.SSLError)
            refused = isinstance(e, ConnectionRefusedError | ConnectionResetError)
            raise RpcError(f"{self.addr}: {detail}", unreachable=unreachable,
                           refused=refused) from None

    async def pipeline(self) -> RpcPipeline:
        """Hold this connection for a series of calls sent ahead of their replies (a
        node answers the calls of one connection in order, one at a time, so the next
        one is read and started as soon as the previous reply is written). Release it
        with ``RpcPipeline.close``."""
        await self._lock.acquire()
        return RpcPipeline(self)

    async def _call(self, method: str, args: dict[str, Any]) -> msgspec.Raw:
        conn = await self._connect()
        req = RpcRequest(next(_ids), method, self.creds.token, args)
        frame = encode_stream_message(req)
        await conn.write_frame(frame, max_size=MAX_REPLY_BYTES)
        if self.counter is not None:
            self.counter.count_out(method, len(frame))
        data = await conn.read_frame()
        if self.counter is not None:
            self.counter.count_in(method, len(data))
        msg = decode_reply_message(data, MAX_REPLY_BYTES)
        if not isinstance(msg, RpcReply) or msg.id != req.id:
            await self.close()
            raise RpcError(f"{self.addr}: unexpected reply")
        if not msg.ok:
            raise RemoteError(f"{self.addr}: {msg.error}", msg.code)
        return msg.result

    async def close(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()


class RpcPipeline:
    """Calls sent on one held connection before their replies come (see
    ``RpcConnection.pipeline``); ``receive`` returns the replies in the order sent."""

    def __init__(self, conn: RpcConnection) -> None:
        self.conn = conn
        self._sent: deque[tuple[int, str]] = deque()
        self._open = True

    @property
    def outstanding(self) -> int:
        return len(self._sent)

    async def send(self, method: str, args: dict[str, Any]) -> None:
        assert self._open
        conn = self.conn

        async def send() -> None:
            frames = await conn._connect()
            req = RpcRequest(next(_ids), method, conn.creds.token, args)
            # Counted before it is written: a send cut short (cancelled while the frame
            # drains) leaves a reply due, so ``close`` closes the connection.
            self._sent.append((req.id, method))
            frame = encode_stream_message(req)
            await frames.write_frame(frame, max_size=MAX_REPLY_BYTES)
            if conn.counter is not None:
                conn.counter.count_out(method, len(frame))

        await conn._guarded(send())

    async def send_request(self, method: Method[Req, Any], req: Req) -> None:
        """Send typed ``method`` (``core/api``) with ``req``; its reply comes from
        ``receive_reply``."""
        await self.send(method.name, request_args(req))

    async def receive_reply(self, method: Method[Any, Rep]) -> Rep:
        """The reply to the oldest call sent, as ``method``'s reply type (``RpcError``
        when it is out of contract)."""
        raw = await self.receive_raw()
        try:
            return decode_reply(method, raw)
        except ValueError as e:
            raise RpcError(f"{self.conn.addr}: {e}") from None

    async def receive(self) -> Any:
        """The result of the oldest call sent, as msgpack builtins; ``RemoteError`` if the
        node refused it."""
        return _builtins(await self.receive_raw())

    async def receive_raw(self) -> msgspec.Raw:
        """The result of the oldest call sent, still encoded."""
        assert self._open and self._sent
        conn = self.conn

        async def receive() -> msgspec.Raw:
            frames = conn._writer
            if frames is None:
                raise RpcError(f"{conn.addr}: connection lost with calls outstanding")
            data = await frames.read_frame()
            want, method = self._sent.popleft()
            if conn.counter is not None:
                conn.counter.count_in(method, len(data))
            msg = decode_reply_message(data, MAX_REPLY_BYTES)
            if not isinstance(msg, RpcReply) or msg.id != want:
                await conn.close()
                raise RpcError(f"{conn.addr}: unexpected reply")
            if not msg.ok:
                raise RemoteError(f"{conn.addr}: {msg.error}", msg.code)
            return msg.result

        return await conn._guarded(receive())

    async def close(self) -> None:
        """Release the connection; closed first if replies are still due on it."""
        if not self._open:
            return
        self._open = False
        try:
            if self._sent:
                self._sent.clear()
                await self.conn.close()
        finally:
            self.conn._lock.release()


async def request_async(addr: str, creds: ClientCredentials, method: Method[Req, Rep],
                        req: Req, timeout: float = 5.0) -> Rep:
    """One typed call on a connection of its own."""
    conn = RpcConnection(addr, creds, timeout)
    try:
        return await conn.request(method, req)
    finally:
        await conn.close()


def request(addr: str, creds: ClientCredentials, method: Method[Req, Rep], req: Req,
            timeout: float = 5.0) -> Rep:
    """Blocking one-shot typed call (opens and closes a connection)."""
    return asyncio.run(request_async(addr, creds, method, req, timeout))


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
