"""A node's connections to the other nodes, one pool for every plane.

Calls on one ``RpcConnection`` go one at a time (a node answers a connection's calls in
order), so a plane keeps its traffic on its own *lanes*: ``shared(name, addr, lane)`` is
the one long-lived connection of that lane to that node (scheduling messages do not wait
behind a bulk transfer on another lane). A transfer that holds a connection for a while
takes one of its own with ``checkout`` and gives it back with ``checkin``; up to
``max_idle_per_peer`` of those are kept open for the next one (a TLS handshake costs more
than a small object's whole transfer).

Bounds: one shared connection per (member, lane) — lanes are a small fixed set named by
the planes, plus one per long-lived reader (a stream runner's long-polls), which
``release`` closes when the reader stops — plus ``max_idle_per_peer`` idle ones per
member, closed by ``sweep`` once none was used for ``idle_close_s``; ``forget`` closes a
gone member's, and a member that comes back at a new address gets new connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from meshscale.transport.credentials import Credentials
from meshscale.transport.rpc import RpcConnection, WireCounter

__all__ = ["PeerConfig", "PeerPool"]


@dataclass(frozen=True, slots=True)
class PeerConfig:
    call_timeout_s: float = 30.0
    """A call's bound, from sending to its reply (a lane may set its own)."""
    connect_timeout_s: float = 3.0
    """TCP + greeting + TLS set-up of a new connection (a peer behind a partition drops
    the SYN: without this bound a call would wait its whole ``call_timeout_s``)."""
    max_idle_per_peer: int = 16
    """Idle checked-in connections kept per member. It should cover the transfers a node
    runs to one member at once under load (a small put's copy takes a connection of its
    own; 8 client connections per node keep ~8-16 copies per member in flight): each
    connection given back beyond it is closed and the next transfer pays a new mutual TLS
    handshake. At 4 (until Dec 2026) 10,000 small puts cost each node ~4,200 handshakes,
    and the allocations of those set-ups and tear-downs left the node's heap ~13 KB per
    object held larger (issue #24). An idle one costs ~160 KB of RSS on each end (see
    ``idle_close_s``, which retires them), the member closes it after its
    ``idle_timeout_s``, and it counts toward the member's ``max_connections_per_ip``
    (64): members that share one address (a local mesh on 127.0.0.1) share that too, so
    keep (members on an address - 1) x this plus the lanes and clients under it."""
    idle_close_s: float = 5.0
    """A member's idle connections are closed by ``sweep`` (the node sweeps every
    second) once none was checked out or in for this long: a pool in use keeps its
    connections (no handshakes while puts come and go), a pool that fell quiet lets them
    go. Each costs both ends ~330 KB allocated (tracemalloc: uvloop's 256 KB TLS read
    buffer, the 64 KB frame buffer, TLS state), ~160 KB of it resident: a burst of small
    puts left the 16 per member of ``max_idle_per_peer`` open on each side (64 per node
    of a 3-node mesh; closing them and trimming the heap gave back ~10 MB of a node's RSS
    after 4,000 puts) until the member's ``idle_timeout_s`` (30 s) closed its end, and
    the pool went on holding the closed ones (their frame buffers) until its next
    checkout (issue #24). Shorter than the member's ``idle_timeout_s``, so they are
    retired here before the member cuts them."""


class PeerPool:
    """Connections from this node to the others (see the module's docstring)."""

    def __init__(self, creds: Credentials, config: PeerConfig | None = None,
                 counter: WireCounter | None = None) -> None:
        self.creds = creds
        self.cfg = config or PeerConfig()
        self.counter = counter
        self._shared: dict[tuple[str, str], RpcConnection] = {}
        self._idle: dict[str, list[RpcConnection]] = {}
        self._used: dict[str, float] = {}
        """Member -> when a connection to it was last checked out or in (monotonic)."""
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0
        """Connections this pool has made (each one a TLS handshake when first used)."""

    def _new(self, addr: str, timeout_s: float | None) -> RpcConnection:
        self.opened += 1
        return RpcConnection(addr, self.creds,
                             self.cfg.call_timeout_s if timeout_s is None else timeout_s,
                             counter=self.counter, connect_timeout=self.cfg.connect_timeout_s)

    def shared(self, name: str, addr: str, lane: str,
               timeout_s: float | None = None) -> RpcConnection:
        """The long-lived connection of ``lane`` to member ``name`` at ``addr``."""
        key = (name, lane)
        conn = self._shared.get(key)
        if conn is None or conn.addr != addr:
            if conn is not None:
                self._close_later(conn)
            conn = self._new(addr, timeout_s)
            self._shared[key] = conn
        return conn

    def checkout(self, name: str, addr: str, now: float | None = None) -> RpcConnection:
        """A connection to ``name`` for one caller alone: an idle one if there is one.
        ``now``: monotonic seconds (default: the clock's), as for ``checkin``."""
        self._used[name] = time.monotonic() if now is None else now
        idle = self._idle.get(name)
        while idle:
            conn = idle.pop()
            if conn.addr == addr and conn.is_open:
                return conn
            self._close_later(conn)
        return self._new(addr, None)

    def checkin(self, name: str, conn: RpcConnection, now: float | None = None) -> None:
        """Give back a checked-out connection (kept idle, or closed beyond the bound)."""
        self._used[name] = time.monotonic() if now is None else now
        idle = self._idle.setdefault(name, [])
        if len(idle) < self.cfg.max_idle_per_peer and conn.is_open:
            idle.append(conn)
        else:
            self._close_later(conn)

    def sweep(self, now: float | None = None) -> int:
        """Let go of the idle connections the members closed, and of every idle one to a
        member none was checked out or in for ``idle_close_s`` before ``now`` (monotonic
        seconds, default: the clock's); how many were let go."""
        now = time.monotonic() if now is None else now
        let_go = 0
        for name in list(self._idle):
            idle = self._idle[name]
            quiet = now - self._used.get(name, now) >= self.cfg.idle_close_s
            keep = [] if quiet else [c for c in idle if c.is_open]
            if len(keep) != len(idle):
                for c in idle:
                    if c not in keep:
                        self._close_later(c)
                let_go += len(idle) - len(keep)
            if keep:
                self._idle[name] = keep
            else:
                del self._idle[name]
                self._used.pop(name, None)
        return let_go

    def release(self, name: str, lane: str) -> None:
        """Close the shared connection of ``lane`` to ``name``, if open: a lane that served
        one long-lived reader (a stream runner's long-polls) that has stopped."""
        conn = self._shared.pop((name, lane), None)
        if conn is not None:
            self._close_later(conn)

    def forget(self, name: str) -> None:
        """Member ``name`` is gone: close its connections."""
        for key in [k for k in self._shared if k[0] == name]:
            self._close_later(self._shared.pop(key))
        self._used.pop(name, None)
        for conn in self._idle.pop(name, []):
            self._close_later(conn)

    def _close_later(self, conn: RpcConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def open_count(self) -> int:
        """Connections the pool holds (shared and idle)."""
        return len(self._shared) + self.idle_count

    @property
    def idle_count(self) -> int:
        """Checked-in connections kept for the next checkout."""
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        conns = [*self._shared.values(), *(c for v in self._idle.values() for c in v)]
        self._shared.clear()
        self._idle.clear()
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
