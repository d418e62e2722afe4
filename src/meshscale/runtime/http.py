"""The node's HTTP server: JSON API, Prometheus metrics and the dashboard (aiohttp).

Every node serves the same thing on ``AgentConfig.http`` and advertises the address in
its membership meta (tag ``http``), so any node can point at the others:

- ``/`` and ``/static/{name}``: the dashboard's files from ``runtime/dashboard/``, with no
  auth (the page asks for the token and sends it on every API call);
- ``/api/v1/*``: JSON, ``Authorization: Bearer <admin token>``, else 401; shapes and schemas
  in ``openapi.py`` (served at ``/api/v1/openapi.json`` without auth);
- ``/api/v1/stream``: server-sent events, one ``snapshot`` a second; at most
  ``AgentConfig.max_http_streams`` at once, 503 beyond;
- ``POST /api/v1/services/{name}/{method}``: call a service (issue #22) with JSON
  arguments, the admin token (a call is a write; the read-only token gets 403); the node
  routes it as ``svc.call`` does for the Python client;
- ``/metrics``: Prometheus text from a per-node registry (``metrics.MeshCollector``);
  token required unless ``AgentConfig.metrics_public``.

Snapshots are built at most once a second and shared by every stream; the mesh-wide object
listing they carry (a fan-out to every node) is reused for ``OBJECTS_TTL_S``.

The address is bound, advertised and its observer started when the agent starts, but the
application itself (aiohttp, prometheus_client, the handlers: ``runtime/http_app.py``,
about 15 MB of RSS) is imported and built only when the first connection arrives: until
then the listening sockets are watched for readability, and the connection that woke
them waits in the backlog and is accepted by aiohttp once it serves. A node nobody
browses or scrapes never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
import ssl
from typing import TYPE_CHECKING

import msgspec

from meshscale.core.api.node import POINTS
from meshscale.runtime.observe import NodeObserver, ObservedNode
from meshscale.transport.framing import split_addr

if TYPE_CHECKING:
    from meshscale.runtime.http_app import HttpApp

BACKLOG = 128
APP_MODULE = "meshscale.runtime.http_app"


def listen(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening TCP sockets on every address ``host`` resolves to (all, if empty), as
    asyncio's ``create_server`` binds them: SO_REUSEADDR, IPv6 sockets IPv6-only.
    Raises OSError (the port is taken, the address is not this host's)."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
    out: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


class HttpServer:
    """The node's HTTP port: bound at start, served by ``http_app.HttpApp`` from the first
    connection on."""

    def __init__(self, agent: ObservedNode) -> None:
        self.agent = agent
        assert agent.cfg.http is not None
        self.bind_host, self.port = split_addr(agent.cfg.http)
        self.observer = NodeObserver(agent)
        self.address = ""
        self.app: HttpApp | None = None
        """The application, once a connection has arrived (None until then)."""
        self._sockets: list[socket.socket] = []
        self._watched: list[int] = []
        self._tls: ssl.SSLContext | None = None
        self._activating: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Bind, then advertise ``http`` in the agent's meta (before it joins)."""
        if self.agent.cfg.http_tls:
            from meshscale.transport.tls import https_context

            self._tls = https_context(self.agent.bundle)
        self._sockets = listen(self.bind_host, self.port)
        if self._sockets:
            self.port = int(self._sockets[0].getsockname()[1])
        host = self.bind_host
        if host in ("0.0.0.0", "::", ""):
            host = split_addr(self.agent.addr)[0]
        self.address = f"{host}:{self.port}"
        meta = self.agent.meta
        tags = {**meta.tags, "http": self.address}
        if self._tls is not None:
            tags["https"] = "1"
        self.agent.meta = msgspec.structs.replace(meta, tags=tags)
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._wake)
            self._watched.append(sock.fileno())
        self.observer.start()
        # The points live in this server's observer: a node without HTTP keeps none (a
        # fan-out gets UNKNOWN_METHOD from it and leaves it out).
        self.agent.serve(POINTS, self.observer.node_points)
        self.agent.log("info", "http_started", http=self.address, https=self._tls is not None,
                       metrics_public=self.agent.cfg.metrics_public)

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._watched:
            loop.remove_reader(fd)
        self._watched.clear()

    def _wake(self) -> None:
        """A connection waits on a listening socket: build the application (once)."""
        self._unwatch()
        if self._activating is None and not self._closing:
            self._activating = asyncio.ensure_future(self._activate())

    async def _activate(self) -> None:
        try:
            # In a thread, so probes and RPCs keep being answered while it loads.
            module = await asyncio.to_thread(importlib.import_module, APP_MODULE)
            if self._closing:
                return
            app: HttpApp = module.HttpApp(self.agent, self.observer)
            await app.start(self._sockets, self._tls, BACKLOG)
            self.app = app
        except Exception as e:  # not served: refuse connections rather than hold them
            self.agent.log("error", "http_failed", error=type(e).__name__)
            self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets = []

    async def stop(self) -> None:
        self._closing = True
        self._unwatch()
        if self._activating is not None:
            with contextlib.suppress(Exception):
                await self._activating
        await self.observer.stop()
        if self.app is not None:
            await self.app.stop()
            self.app = None
        self._close_sockets()
