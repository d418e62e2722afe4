"""The node's own methods: its membership view, counters, recent events, and removing a
node for good (``admin.revoke``)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from meshscale.core.api.contract import Empty, Method, Request

__all__ = ["ADMIN_REVOKE", "EVENTS", "MEMBERS", "METHODS", "NODE_STANDBY", "NODE_WAKE",
           "POINTS", "STATS", "EventInfo", "EventsRequest", "MemberInfo", "NodePoint",
           "NodePoints", "NodeStats", "PointsRequest", "PowerReply", "RevokeReply",
           "RevokeRequest"]

MAX_REVOCATION_BYTES = 4096
"""A signed revocation entry is a few hundred bytes."""


class MemberInfo(msgspec.Struct, omit_defaults=True):
    """One row of ``members``: a member as the asked node sees it."""

    name: str
    address: str
    region: str
    zone: str
    state: str
    """``alive``, ``suspect``, ``dead``, ``left`` or ``removed``."""
    incarnation: int
    rtt_ms: float | None = None
    labels: dict[str, str] = {}
    cert_expires: int | None = None
    """When the member's node certificate ends (Unix seconds), as it says itself."""
    disk_full: bool = False
    """It says its disk is full: it is left out of new replica sets (``core/placement.py``)."""
    power: str = ""
    """Its power state as it gossips it (``core/capacity.py``): ``active``, ``draining``,
    ``standby`` or ``waking``; ``""`` for a node that says none (no compute plane)."""


class EventInfo(msgspec.Struct, omit_defaults=True):
    """A recent membership event on the asked node (wall-clock ``ts``)."""

    seq: int
    ts: float
    event: str
    name: str
    incarnation: int = 0
    source: str = ""
    detail: str = ""


class EventsRequest(Request):
    since: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Only events after this sequence number."""


class NodeStats(msgspec.Struct):
    """A node's own counters (``stats``)."""

    name: str
    address: str
    pid: int
    incarnation: int
    alive: int
    health: int
    membership: dict[str, int]
    rejected_messages: dict[str, int]
    runtime: dict[str, int]
    connections: int
    streams_in_flight: int
    seal_key: str
    keys: list[str]
    uptime_s: float


class RevokeRequest(Request):
    entry: Annotated[bytes, msgspec.Meta(max_length=MAX_REVOCATION_BYTES)]
    """A revocation signed by the cluster CA (``meshscale node remove``)."""


class RevokeReply(msgspec.Struct):
    name: str
    """The node removed."""
    new: bool
    """False when this node already knew of the removal."""


class EnergyInfo(msgspec.Struct):
    """A node's power and energy (``node.energy``; ``meshscale energy``)."""

    name: str
    region: str
    zone: str
    source: str
    """``rapl``: measured by the machine's RAPL counters; ``model``: the declared
    idle/peak watts at the node's CPU utilisation (an estimate, not a meter)."""
    watts: float
    """Draw over the last second."""
    joules_total: float
    """Since the node started."""
    joules_last_hour: float
    window_s: int
    """Seconds ``joules_last_hour`` covers (less than an hour for a young node)."""
    cpu_utilization: float
    """CPU of the agent and its workers over the last second / the machine's CPUs."""


class PowerReply(msgspec.Struct):
    """What ``node.standby`` / ``node.wake`` did on the node asked."""

    name: str
    state: str
    """Its power state after the request (``standby`` comes once it has drained)."""
    detail: str = ""


MAX_POINTS_REPLY = 3600
"""Most one-second points one ``node.points`` reply carries (the node keeps an hour)."""


class PointsRequest(Request):
    last: Annotated[int, msgspec.Meta(ge=0, le=MAX_POINTS_REPLY)] = 60
    """The newest this many seconds."""


class NodePoint(msgspec.Struct, omit_defaults=True):
    """One second of a node, as its dashboard keeps it (``runtime/observe.py``): tasks it
    owns that ended, and what the node (agent and workers) used in that second."""

    t: float
    """Wall clock at the end of the second (Unix seconds)."""
    tasks_done_per_s: float = 0.0
    tasks_failed_per_s: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    cpu_ratio: float | None = None
    """CPU of the agent and its workers / the machine's CPUs."""
    memory_rss_bytes: int | None = None
    """Resident memory of the agent and its workers."""
    disk_free_bytes: int | None = None
    disk_used_bytes: int | None = None
    """Of the data dir's file system."""
    net_in_bytes_per_s: float | None = None
    net_out_bytes_per_s: float | None = None
    """Mesh transport bytes received and sent (all message types)."""


class NodePoints(msgspec.Struct):
    name: str
    points: list[NodePoint]
    """Oldest first."""


MEMBERS: Method[Empty, list[MemberInfo]] = Method("members", Empty, list[MemberInfo])
STATS: Method[Empty, NodeStats] = Method("stats", Empty, NodeStats)
EVENTS: Method[EventsRequest, list[EventInfo]] = Method("events", EventsRequest,
                                                        list[EventInfo])
ADMIN_REVOKE: Method[RevokeRequest, RevokeReply] = Method("admin.revoke", RevokeRequest,
                                                         RevokeReply)

ENERGY: Method[Empty, EnergyInfo] = Method("node.energy", Empty, EnergyInfo)

NODE_STANDBY: Method[Empty, PowerReply] = Method("node.standby", Empty, PowerReply)
"""Put the node asked on standby (an operator's hold; refused, naming the rule, for a
pinned node or one that keeps the only live copy of an object)."""
NODE_WAKE: Method[Empty, PowerReply] = Method("node.wake", Empty, PowerReply)
"""Wake the node asked (and end an operator's hold)."""

POINTS: Method[PointsRequest, NodePoints] = Method("node.points", PointsRequest, NodePoints)

METHODS: tuple[Method[Any, Any], ...] = (MEMBERS, STATS, EVENTS, ADMIN_REVOKE, ENERGY,
                                         NODE_STANDBY, NODE_WAKE, POINTS)
