"""What a plane may use of its node: the narrow interface between ``runtime/node.py`` and
the planes (``dataplane``, ``compute``, ``streams``, ``http``, ``observe``).

A plane is given a ``NodeServices`` (the ``NodeAgent`` provides it) instead of reaching
into the agent: its name and address, configuration, membership view, counters and log,
``spawn`` for background work, ``serve`` to serve a typed method (``core/api``),
``call_local`` to call the node's own methods in-process (``runtime/local.py`` builds
object and KV helpers on it), ``peers`` and ``call_node`` to call other nodes, and the
two things one plane lends another: hash-checked local copies of
objects (the data plane, for task inputs) and the warm worker pool (the compute plane, for
stream operators). So planes import this module, never ``node.py`` nor each other's
internals, and the runtime's modules form no import cycle (``tests/test_layers.py``).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from meshscale.core.api.contract import Method, Request
from meshscale.core.api.errors import ApiError, ErrorCode
from meshscale.core.audit import Kind
from meshscale.core.membership import Membership, NodeMeta
from meshscale.core.outputs import Event
from meshscale.runtime import caller
from meshscale.runtime.config import AgentConfig, AgentStats
from meshscale.runtime.isolation import Isolation
from meshscale.runtime.workers import WorkerPool
from meshscale.transport.credentials import Credentials
from meshscale.transport.peers import PeerPool
from meshscale.trust.bundle import Bundle
from meshscale.trust.certs import Peer

__all__ = ["Handler", "LocalCopies", "NodeServices", "Rep", "Req", "refusal"]

Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")

Handler = Callable[[Req], Rep | Awaitable[Rep]]
"""Serves one typed method (``core/api``): takes its request struct, returns or awaits
its reply; raising ``ValueError`` (``core.api.ApiError`` for a code) answers with an
error."""


class LocalCopies(Protocol):
    """Hash-checked local copies of objects, hard-linked for one use (the data plane)."""

    async def local_copy_path(self, oid: str) -> Path | None: ...

    async def release_copies(self, paths: list[Path]) -> None: ...


class NodeServices(Protocol):
    """The node, as its planes see it."""

    name: str
    addr: str
    data_dir: Path
    rng: random.Random
    cfg: AgentConfig
    meta: NodeMeta
    stats: AgentStats
    creds: Credentials
    peers: PeerPool
    """Connections to the other nodes, one pool for every plane (``call_node`` in
    ``runtime/local.py`` calls a typed method through it)."""
    bundle: Bundle
    membership: Membership | None
    event_listeners: list[Callable[[Event], None]]
    peer_closed_listeners: list[Callable[[str], None]]
    """Called with a node's name when a connection it made to this node ends from its
    side (``NodeAgent._serve``)."""
    isolation: Isolation | None
    """Worker user, work dir and cgroups (``runtime/isolation.py``), set up at start."""

    @property
    def m(self) -> Membership:
        """The membership protocol (the node has started)."""
        ...

    def log(self, level: str, event: str, /, **fields: Any) -> None: ...

    def log_limited(self, event: str, /, **fields: Any) -> None:
        """An error line a peer can cause: at most one per ``log_limit_s`` per event."""
        ...

    def record_event(self, kind: str, name: str = "", detail: str = "") -> None: ...

    def set_tag(self, key: str, value: str | None) -> None:
        """Set (None: remove) one of this node's gossiped tags; ``ValueError`` if the
        node's metadata would grow past its bound (nothing changed)."""
        ...

    def record(self, kind: Kind, subject: str, *, data_class: str | None = "",
               from_region: str | None = None, to_region: str | None = None,
               detail: str = "", who: Peer | str | None = None) -> None:
        """Add an entry to the node's audit trail (``runtime/audit.py``); ``who``: the
        RPC's caller unless given; regions: this node's unless given."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background; the node cancels it on stop and logs a crash."""
        ...

    def serve(self, method: Method[Req, Rep], handler: Handler[Req, Rep]) -> None:
        """Serve typed ``method`` with ``handler`` (requests checked against its struct)."""
        ...

    async def call_local(self, method: Method[Req, Rep], req: Req) -> Rep:
        """This node's own handler of ``method``, called in-process."""
        ...

    def delay_to(self, addr: str) -> float:
        """Emulated one-way delay to the node at ``addr`` (0 without emulation)."""
        ...

    def local_copies(self) -> LocalCopies | None:
        """The data plane's local copies, or None on a node without one."""
        ...

    def worker_pool(self) -> WorkerPool | None:
        """The compute plane's warm worker pool, or None before it starts."""
        ...

    def set_foreground_busy(self, busy: bool) -> None:
        """Tasks run on this node's workers now, or no longer do (the data plane limits
        its repair copies meanwhile: ``ReplicationConfig.max_concurrent_transfers_busy``)."""
        ...


def refusal(node: NodeServices, count: Callable[[str], None], rule: str, message: str, /,
            *, subject: str = "", data_class: str | None = None,
            from_region: str | None = None, **fields: Any) -> ApiError:
    """A plane refusing a request by a policy or residency rule, in one place for every
    plane: counts it (``refusals``, ``refused_<rule>``), records it in the audit trail (a
    ``refusal`` entry naming ``subject``, the class and the caller's region: the RPC's
    caller's unless given), logs it (rate-limited: a peer can cause it) and returns the
    error to raise. Its own parameters are positional-only, so any name can be a log
    field (``node=``, ``rule=``: the refusal's own fields win) and none raises a TypeError
    in the middle of a plane's pump."""
    count("refusals")
    count(f"refused_{rule}")
    why = f"refused: {message}"
    region = from_region if from_region is not None else caller.node_region(node.m.members)
    node.record(Kind.REFUSAL, subject[:1024], data_class=data_class, from_region=region,
                detail=why[:1024])
    node.log_limited("refused", **{**fields, "rule": rule, "message": message[:300],
                                   "subject": subject[:200], "data_class": data_class})
    return ApiError(ErrorCode.REFUSED, why)
