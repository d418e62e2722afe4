"""The node agent: an asyncio driver of ``core.membership.Membership`` over real sockets.

The agent decides nothing. It moves bytes, keeps one timer and calls ``core/`` (see
``core/outputs.py``): after every call into the protocol it drains the outputs
(datagrams to send, streams to open, events to log) and re-arms a single
``loop.call_later`` at ``next_deadline()``. ``now`` is ``time.monotonic()``.

Transports, on one host:port number (TCP and UDP ports are separate namespaces):

- UDP: probes and gossip. Every datagram is sealed with the keyring's primary
  (AES-256-GCM) and opened with any installed key, and carries a freshness header inside
  the seal (``trust/replay.py``: a replayed or stale datagram is refused); one that does
  not open or is not fresh is dropped and counted in ``rejected_messages{reason}``.
- TCP: TLS 1.3, both sides presenting a certificate from the cluster CA; the name and
  role the CA signed into the peer's certificate say who it is (``trust/certs.py``). A
  connection carries length-prefixed frames (``framing.py``) of ``core.rpc`` messages:
  push/pull (node certificates only, the message's sender must be the certificate's
  name, and sealed with the keyring too, so the gossip key is needed to join) and RPCs,
  each allowed by ``core/access.py`` for the caller's role (a token, if sent, can only
  narrow it). A malformed, oversized, unknown or unauthorised frame is counted; the
  connection is closed after an unauthorised one.

Removed nodes (``meshscale node remove``): their signed revocations are kept in the data
dir and spread by the membership; a removed node's TLS connections are closed as soon as
its certificate is seen, and a node that learns it was removed itself stops, and refuses
to start again.

Bounds (``AgentConfig``): connections overall and per peer IP, frame size, handshake,
read and stream timeouts, outgoing streams in flight (excess streams are shed: counted
and reported to the protocol as failed), recent-events buffer.

Key rotation: the agent re-reads the bundle's ``keyring.json`` when it changes (checked
every second). New keys open messages at once, but a new primary is only used to seal
``key_switch_delay_s`` after it was first seen, so every node has it before anyone uses
it and the mesh switches keys without a dead member.

Latency emulation (for ``meshscale up`` on one machine only; off unless configured):
given ``emulated_latency`` = {(region_a, region_b): rtt_s}, a datagram to a member of
another region is held for rtt/2 before it is sent, and a stream to one is opened after
rtt (the request and reply legs together).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import os
import random
import signal
import socket
import ssl
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec

from meshscale.core.access import METHOD_ACCESS, allowed, claimed_sender, narrowest
from meshscale.core.api import METHODS, ApiError, Empty, ErrorCode, code_of
from meshscale.core.api import node as node_api
from meshscale.core.api.contract import Method, parse_request
from meshscale.core.api.node import (
    EventInfo,
    EventsRequest,
    MemberInfo,
    NodeStats,
    RevokeReply,
    RevokeRequest,
)
from meshscale.core.audit import Kind
from meshscale.core.capacity import PowerState
from meshscale.core.membership import (
    Member,
    MemberAlive,
    MemberDown,
    MemberJoined,
    MemberLeft,
    MemberRemoved,
    Membership,
    MembershipConfig,
    MemberSuspect,
    MemberUpdated,
    NodeMeta,
    State,
)
from meshscale.core.outputs import Event, SendDatagram, StreamRequest
from meshscale.core.placement import is_full
from meshscale.core.replication import ReplicationConfig
from meshscale.core.rpc import (
    PushPullFrame,
    RpcRequest,
    RpcResponse,
    StreamMessage,
    decode_stream_message,
    encode_stream_message,
)
from meshscale.core.scheduling import SchedulingConfig
from meshscale.core.wire import WireError
from meshscale.runtime import caller
from meshscale.runtime.audit import AuditService
from meshscale.runtime.capacity import CapacityDriver, placement_standby, power_state
from meshscale.runtime.compute import ComputeConfig, ComputePlane
from meshscale.runtime.config import AgentConfig as AgentConfig
from meshscale.runtime.config import AgentStats
from meshscale.runtime.data import DataPlane, DataPlaneConfig
from meshscale.runtime.deadline import DeadlineTimer
from meshscale.runtime.identity import Identity, write_identity
from meshscale.runtime.isolation import Isolation
from meshscale.runtime.latency import RegionPair
from meshscale.runtime.power import ENERGY_WINDOW_S, PowerMeter
from meshscale.runtime.services import Handler, LocalCopies, Rep, Req
from meshscale.runtime.services_plane import ServicePlane
from meshscale.runtime.storage import StorageConfig
from meshscale.runtime.streams import StreamPlane
from meshscale.runtime.workers import WorkerPool
from meshscale.transport.credentials import Credentials
from meshscale.transport.framing import (
    FrameConnection,
    FrameTooLarge,
    read_frame,
    split_addr,
    write_frame,
)
from meshscale.transport.peers import PeerPool
from meshscale.transport.tls import BUSY, GREETING, connect_tls, server_context
from meshscale.trust.bundle import Bundle, BundleError, BundleKind, load_keyring
from meshscale.trust.certs import Peer, Role, peer_of
from meshscale.trust.keyring import SEAL_OVERHEAD, Keyring, SealError
from meshscale.trust.replay import FRESHNESS_BYTES, ReplayGuard
from meshscale.trust.revocation import RevocationError, RevocationStore

if TYPE_CHECKING:
    from meshscale.runtime.http import HttpServer


UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
POWER_TICK_S = 1.0
"""How often the node's power meter samples (``runtime/power.py``)."""
SETTLE_MEMORY_S = 5.0
"""After start-up, when ``NodeAgent._settle_memory`` runs once."""
TRIM_AFTER_CLOSE_S = 2.0
"""How long after idle connections to members were closed the heap is trimmed (the
members close theirs, to us, within about a housekeeping tick of ours)."""

STATE_NAMES = {
    State.ALIVE: "alive",
    State.SUSPECT: "suspect",
    State.DEAD: "dead",
    State.LEFT: "left",
    State.REMOVED: "removed",
}


STARTING = "node is starting"
"""Error prefix for a method asked before the planes that serve it have started."""


class PeerRefused(ConnectionError):
    """A peer answered a push/pull with a refusal that says why."""


class NodeRemovedError(Exception):
    """This node was removed from the mesh by the operator; the message is one line."""


@dataclass
class _Keys:
    """Keys in use: ``open_ring`` opens (every key seen), ``seal_ring`` seals."""

    open_ring: Keyring
    seal_ring: Keyring
    pending_primary: bytes | None = None
    switch_at: float = 0.0
    mtime_ns: int = 0


class JsonLog:
    """Structured log lines: one JSON object per line on a text stream."""

    def __init__(self, node: str, stream: Any = None) -> None:
        self.node = node
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, level: str, event: str, /, **fields: Any) -> None:
        rec = {"ts": round(time.time(), 6), "level": level, "node": self.node, "event": event}
        rec.update(fields)
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(json.dumps(rec, default=str) + "\n")
            self.stream.flush()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: tuple[str, int] | Any) -> None:
        self.agent._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the protocol's timeouts deal with it.
        self.agent.stats.runtime["udp_errors"] += 1


class _AcceptProtocol(asyncio.Protocol):
    """A fresh TCP connection before TLS: the agent pauses it, sends the greeting
    (``tls.GREETING``) and upgrades it; a client that speaks first is refused."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.early_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        tcp.pause_reading()
        self.agent._on_accept(tcp, self)

    def data_received(self, data: bytes) -> None:
        # A client must wait for our greeting before it speaks.
        self.early_data = True


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``;
    elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)


def membership_config(suspicion_mult: float = MembershipConfig.suspicion_mult
                      ) -> MembershipConfig:
    """A node's membership settings: the payload budget leaves room for the seal and the
    freshness header; ``suspicion_mult`` is the node's setting of that name."""
    return MembershipConfig(max_payload_bytes=1400 - SEAL_OVERHEAD - FRESHNESS_BYTES,
                            suspicion_mult=suspicion_mult)


class NodeAgent:
    """One node: a ``Membership`` driven over UDP and mutually-authenticated TLS."""

    def __init__(
        self,
        *,
        identity: Identity,
        data_dir: Path,
        bundle: Bundle,
        bind: str,
        advertise: str | None = None,
        meta: NodeMeta | None = None,
        seeds: list[str] | None = None,
        config: MembershipConfig | None = None,
        agent_config: AgentConfig | None = None,
        emulated_latency: dict[RegionPair, float] | None = None,
        log: Callable[..., None] | None = None,
        rng: random.Random | None = None,
        dataplane: bool = True,
    ) -> None:
        bundle.require(BundleKind.NODE, use="a node")
        if bundle.name != identity.name:
            raise ValueError(f"the bundle is node {bundle.name!r}'s, not {identity.name!r}'s")
        self.identity = identity
        self.name = identity.name
        self.data_dir = Path(data_dir)
        self.bundle = bundle
        self.bind_host, self.port = split_addr(bind)
        self.addr = advertise or bind
        self.meta = meta or NodeMeta()
        self.seeds = list(seeds or [])
        self.config = config or membership_config()
        self.cfg = agent_config or AgentConfig()
        self.latency = dict(emulated_latency or {})
        self.log = log or JsonLog(self.name)
        self.rng = rng or random.Random()
        self.stats = AgentStats()
        self.event_listeners: list[Callable[[Event], None]] = []
        """Called with every membership event (the data plane follows the view)."""
        self.peer_closed_listeners: list[Callable[[str], None]] = []
        """Called with a node's name when a connection it made to this one ends from its
        side (closed, reset or cut short): a crashed node's sockets all close at once,
        long before membership's verdict (the compute plane checks its runners then)."""
        self.dataplane: DataPlane | None = None
        self.with_dataplane = dataplane
        self.audit: AuditService | None = None
        """The audit trail (``runtime/audit.py``), from start unless ``cfg.audit`` is off."""
        self.isolation: Isolation | None = None
        """Worker user, work dir, cgroups (``runtime/isolation.py``), set up at start."""
        self.events: deque[EventInfo] = deque(maxlen=self.cfg.recent_events)
        self._event_seq = 0
        power = self.cfg.power
        self.power = PowerMeter(power.model, power.source, rapl_dir=power.rapl_dir,
                                now=time.monotonic())
        """The node's draw and energy (``runtime/power.py``), ticked once a second."""
        self._server_ctx = server_context(bundle)
        self.creds = Credentials.for_node(bundle)
        self.peers = PeerPool(self.creds, self.cfg.peers, self.stats)
        """What this node presents when it calls other nodes: its own certificate."""
        self._client_ctx = self.creds.ssl_context
        self.replay = ReplayGuard(os.urandom(8))
        """Stamps our datagrams and refuses replayed ones (``trust/replay.py``)."""
        self.revocations = RevocationStore(self.data_dir, bundle.ca_cert_pem, bundle.cluster_id)
        self.revocations.load()
        if self.name in self.revocations.entries:
            raise NodeRemovedError(
                f"node {self.name!r} was removed from the mesh (a signed revocation is in "
                f"{self.revocations.path}); it cannot rejoin: give the machine a new node "
                "bundle with another name")
        self.removed = False
        """This node was removed from the mesh (it stops; see ``agent_main.EXIT_REMOVED``)."""
        self.stop_requested = asyncio.Event()
        self._keys = _Keys(open_ring=bundle.keyring, seal_ring=bundle.keyring)
        with contextlib.suppress(OSError):
            self._keys.mtime_ns = (bundle.path / "keyring.json").stat().st_mtime_ns
        self._rpc: dict[str, Callable[[dict[str, Any]], Any]] = {}
        """Wire name -> the handler of its requests as decoded (``serve`` builds it)."""
        self._typed: dict[str, Handler[Any, Any]] = {}
        self._rpc_in_flight = 0
        self._conns = 0
        self._conns_by_ip: Counter[str] = Counter()
        self._unauth = 0
        self._unauth_by_ip: Counter[str] = Counter()
        self._streams_in_flight = 0
        self._log_last: dict[str, float] = {}
        self._stream_peers: dict[str, str] = {}
        """Address -> the name its certificate carried, for push/pulls in flight."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer = DeadlineTimer(self._on_timer)
        self._region_by_addr: dict[str, str] = {}
        self._saved_inc = identity.incarnation
        self._heap_trimmed_at = float("-inf")
        """When ``_retire_idle_connections`` last trimmed the heap (monotonic)."""
        self._trim_at: float | None = None
        """When it is to trim the heap next (connections were closed), if it is."""
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.membership: Membership | None = None
        self.compute: ComputePlane | None = None
        self.streams: StreamPlane | None = None
        self.capacity: CapacityDriver | None = None
        """Consolidation (``runtime/capacity.py``): with the compute plane."""
        self.services: ServicePlane | None = None
        self.http: HttpServer | None = None
        self.started_at = time.time()
        self.ready = False
        """Every plane serves its RPCs (until then unknown methods answer STARTING)."""
        self._register_builtin_rpcs()

    # ------------------------------------------------------------------ public API

    def serve(self, method: Method[Req, Rep], handler: Handler[Req, Rep]) -> None:
        """Serve typed ``method`` (``core/api``): the request is checked against its
        struct (``core.api.contract.parse_request``) before ``handler`` sees it, and its
        reply encoded as it is (a Struct as its builtins; ``_encode_reply``). Raising ``ValueError`` (``ApiError`` for a code) answers
        with an error. The method must be one of ``core.api.METHODS`` and be in
        ``core.access.METHOD_ACCESS`` (who may call it)."""
        name = method.name
        if name in self._rpc:
            raise ValueError(f"RPC method {name!r} is already registered")
        if METHODS.get(name) is not method:
            raise ValueError(f"RPC method {name!r} is not core.api.METHODS[{name!r}]")
        if name not in METHOD_ACCESS:
            raise ValueError(f"RPC method {name!r} has no entry in core.access.METHOD_ACCESS")

        def on_wire(args: dict[str, Any]) -> Any:
            return handler(parse_request(method, args))

        self._rpc[name] = on_wire
        self._typed[name] = handler

    async def call_local(self, method: Method[Req, Rep], req: Req) -> Rep:
        """Call this node's own handler of typed ``method`` in-process (no socket, no
        wire form); ``ValueError`` if the node does not serve it."""
        handler = self._typed.get(method.name)
        if handler is None:
            raise ApiError(ErrorCode.UNKNOWN_METHOD, f"{method.name} is not served here")
        result = handler(req)
        if inspect.isawaitable(result):
            result = await result
        return cast(Rep, result)

    def http_address(self) -> str | None:
        """HOST:PORT of this node's HTTP API, or None when it serves none."""
        return self.http.address if self.http is not None else None

    def local_copies(self) -> LocalCopies | None:
        return self.dataplane

    def set_foreground_busy(self, busy: bool) -> None:
        """Tasks run on this node's workers (``busy``) or no longer do: its repair copies
        are limited meanwhile (``ReplicationConfig.max_concurrent_transfers_busy``)."""
        if self.dataplane is not None:
            self.dataplane.set_foreground_busy(busy)

    def worker_pool(self) -> WorkerPool | None:
        compute = self.compute
        return None if compute is None else compute.pool

    @property
    def m(self) -> Membership:
        assert self.membership is not None, "agent not started"
        return self.membership

    def set_tag(self, key: str, value: str | None) -> None:
        """Set (``None``: remove) one of this node's gossiped tags; the change spreads
        with a higher incarnation (``Membership.update_meta``)."""
        tags = {k: v for k, v in self.meta.tags.items() if k != key}
        if value is not None:
            tags[key] = value
        if tags == self.meta.tags:
            return
        meta = msgspec.structs.replace(self.meta, tags=tags)
        self.m.update_meta(meta, time.monotonic())  # ValueError (too large): nothing changed
        self.meta = meta
        self._pump()

    def record(self, kind: Kind, subject: str, *, data_class: str | None = "",
               from_region: str | None = None, to_region: str | None = None,
               detail: str = "", who: Peer | str | None = None) -> None:
        """Add an entry to this node's audit trail (``runtime/audit.py``): ``who`` is
        the caller of the RPC being served unless given (a name alone: role unknown);
        regions default to this node's.
        Cheap (the entry is written by a thread); nothing when the trail is off."""
        audit = self.audit
        if audit is None:
            return
        peer = who if who is not None else caller.current.get()
        name = peer if isinstance(peer, str) else "" if peer is None else peer.name
        role = "" if peer is None or isinstance(peer, str) else peer.role.value
        audit.record(kind, subject, who=name, role=role, data_class=data_class,
                     from_region=from_region, to_region=to_region, detail=detail)

    async def start(self) -> None:
        """Bind the sockets, then join. Raises OSError if the address is taken."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        # Port 0: the UDP port comes from the OS and TCP must take the same number, which
        # another process may hold; try a few numbers before giving up.
        pick = self.port == 0
        for attempt in range(self.cfg.bind_attempts if pick else 1):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.bind_host, 0 if pick else self.port)
            )
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._server = await loop.create_server(
                    lambda: _AcceptProtocol(self), self.bind_host, port, backlog=256
                )
            except OSError:
                transport.close()
                if not pick or attempt == self.cfg.bind_attempts - 1:
                    raise
                continue
            break
        self._udp = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A burst (a push/pull's worth of gossip, or a flood) should queue, not drop;
            # memberlist asks for 2 MB too. The kernel caps it at net.core.rmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.cfg.udp_buffer_bytes)
        if pick:
            self.port = port
            host = split_addr(self.addr)[0]
            self.addr = f"{host}:{self.port}"
        if self.cfg.http:
            from meshscale.runtime.http import HttpServer

            self.http = HttpServer(self)
            await self.http.start()  # before the membership: its address rides in our meta
        # The epoch names this run's in-memory stream shards (runtime/streams.py): a new
        # incarnation at every start, so a restarted node never reuses an old shard's name.
        expires = int(self.bundle.cert.not_after.timestamp())
        self.meta = msgspec.structs.replace(
            self.meta, tags={**self.meta.tags, "epoch": str(self.identity.incarnation),
                             "cert_expires": str(expires)})
        now = time.monotonic()
        self.membership = Membership(
            self.name,
            self.addr,
            self.meta,
            config=self.config,
            rng=self.rng,
            now=now,
            incarnation=self.identity.incarnation,
            verify_revocation=self._verify_revocation,
        )
        for entry in list(self.revocations.entries.values()):
            self.membership.revoke(entry, now)
        self.log(
            "info",
            "started",
            address=self.addr,
            incarnation=self.identity.incarnation,
            region=self.meta.region,
            zone=self.meta.zone,
            seeds=self.seeds,
            key=self._keys.seal_ring.primary_id,
            emulated_latency=bool(self.latency),
        )
        self._pump()
        self.spawn(self._housekeeping())
        self.spawn(self._power_loop())
        if self.cfg.audit.enabled:
            self.audit = AuditService(self)
            await self.audit.start()
        if self.with_dataplane:
            from meshscale.runtime import isolation

            # Before the planes: the store's layout and the workers depend on it.
            self.isolation = isolation.prepare(
                worker_user=self.cfg.worker_user,
                create_worker_user=self.cfg.create_worker_user,
                bundle_dir=self.bundle.path, data_dir=self.data_dir,
                cgroup_name=isolation.node_cgroup_name(self.name, self.data_dir),
                log=self.log)
            link_group = None if self.isolation.user is None else self.isolation.user.gid
            reserve = self.cfg.disk_reserve_mb
            dp_cfg = DataPlaneConfig(
                storage=StorageConfig(
                    min_free_bytes=DataPlaneConfig().storage.min_free_bytes
                    if reserve is None else reserve << 20,
                    link_group=link_group),
                replication=ReplicationConfig(
                    repair_busy_bytes_per_s=round(self.cfg.repair_busy_mb_per_s * (1 << 20)),
                    max_concurrent_transfers_busy=self.cfg.repair_busy_max_transfers))
            self.dataplane = DataPlane(self, dp_cfg)
            await self.dataplane.start()
            self.compute = ComputePlane(self, ComputeConfig(
                max_records=self.cfg.max_task_records,
                record_window_s=self.cfg.task_record_window_s,
                submit_grace_s=self.cfg.task_submit_grace_s,
                scheduling=SchedulingConfig(max_pending_tasks=self.cfg.max_pending_tasks,
                                            run_timeout_s=self.cfg.task_run_timeout_s)))
            await self.compute.start()
            self.streams = StreamPlane(self)
            await self.streams.start()
            # A class's policy change reaches this node's shards of its topics.
            self.dataplane.policy_listeners.append(self.streams.class_changed)
            self.compute.standby_of = placement_standby
            self.capacity = CapacityDriver(
                self, self.cfg.energy, self.compute, slots=self.compute.capacity.cpus,
                idle_watts=self.cfg.power.model.idle_watts, load=self._capacity_load,
                sole_copies=self._sole_copies, on_state=self._power_state)
            await self.capacity.start()
            self.services = ServicePlane(self)
            await self.services.start()
        # Join only once every plane serves its RPCs: a member others can see must be
        # able to answer them (a client that waits for convergence may call at once).
        if self.seeds:
            self.m.join(self.seeds, time.monotonic())
            self._pump()
        self.ready = True
        # The end of start-up, in the recent events: how long the mesh then takes to see
        # this node is bench/runtime_membership.py's converge_after_start_s.
        self.record_event("ready", self.name, detail=f"every plane serves; joining "
                          f"{len(self.seeds)} seed(s)")
        self.spawn(self._settle_memory())

    async def _settle_memory(self) -> None:
        """Some seconds after start-up (the workers are up, the join is done): collect
        what start-up left behind and give the C heap's free pages back to the system
        (glibc's ``malloc_trim``; elsewhere nothing), about 2 MB of an idle node's RSS.
        What is left is long-lived (modules, classes, the planes): it is frozen out of
        the cyclic collector's sight (``gc.freeze``), so a full collection under load
        walks only what came since (issue #19: a node's ~42,000 start-up objects made
        each full collection 25-27 ms of CPU, two or three of them in a 2,000-task map,
        about 6% of the mesh's CPU per no-op task)."""
        await asyncio.sleep(SETTLE_MEMORY_S)
        gc.collect()
        gc.freeze()
        trim_heap()

    async def leave_and_stop(self) -> None:
        """Graceful leave: tell the mesh, give it time to spread, then close."""
        if self.membership is None:
            return
        now = time.monotonic()
        self.m.leave(now)
        self._pump()
        self.log("info", "leaving", incarnation=self.m.incarnation)
        wait = min(self.config.leave_propagate_s, self.cfg.leave_timeout_s)
        await asyncio.sleep(wait)
        await self.stop()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        services = self.services
        if services is not None:
            await services.stop()
            self.services = None
        streams = self.streams
        if streams is not None:
            await streams.stop()
            self.streams = None
        compute = self.compute
        if compute is not None:
            await compute.stop()
            self.compute = None
        if self.dataplane is not None:
            await self.dataplane.stop()
            self.dataplane = None
        if self.audit is not None:
            await self.audit.stop()
            self.audit = None
        if self.isolation is not None:
            self.isolation.close()  # the node's parent cgroups
        if self.membership is not None:
            self.m.stop()
            self._save_incarnation()
        self._timer.cancel()
        await self.peers.close()
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            self._udp.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.log("info", "stopped")

    # ------------------------------------------------------------------ driving core

    def _pump(self) -> None:
        """Drain the protocol's outputs and re-arm the single timer. One output that fails
        (a send to a bad address, a listener's bug) is counted and logged; it never costs
        the rest of the batch or the timer."""
        m = self.membership
        if m is None:
            return
        try:
            for out in m.drain():
                try:
                    if isinstance(out, SendDatagram):
                        self._send_datagram(out.addr, out.payload)
                    elif isinstance(out, StreamRequest):
                        self._start_stream(out.addr, out.payload)
                    else:
                        self._on_event(out)
                except Exception as e:
                    self.stats.runtime["output_errors"] += 1
                    self.log_limited("output_failed", output=type(out).__name__,
                                     error=type(e).__name__)
        finally:
            self._timer.arm(m.next_deadline())

    def log_limited(self, event: str, /, **fields: Any) -> None:
        """An error log line, at most one per ``log_limit_s`` per event (the rest are
        counted in ``log_suppressed``): a peer must not be able to fill the log."""
        now = time.monotonic()
        last = self._log_last.get(event)
        if last is not None and now - last < self.cfg.log_limit_s:
            self.stats.runtime["log_suppressed"] += 1
            return
        if len(self._log_last) >= self.cfg.max_log_events_tracked:
            self._log_last.clear()
        self._log_last[event] = now
        self.log("error", event, **fields)

    def _on_timer(self) -> None:
        if self.membership is None:
            return
        self.membership.on_timer(time.monotonic())
        self._pump()

    def _reject(self, reason: str, peer: str = "", detail: str = "") -> None:
        self.stats.rejected[reason] += 1
        if reason == "version":
            # Old and new nodes are not mixed: say so (at most once per log_limit_s).
            self.log_limited("version_mismatch", peer=peer, detail=detail[:200],
                             hint="every node of a mesh must run the same meshscale "
                                  "version (a mesh upgrades all at once)")

    # ------------------------------------------------------------------ UDP

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        if self.membership is None:
            return
        self.stats.count_in("gossip", len(data))
        if len(data) > self.cfg.max_datagram_bytes:
            self._reject("oversized")
            return
        try:
            plain = self._keys.open_ring.open(data)
        except SealError as e:
            self._reject(e.reason)
            return
        payload, why = self.replay.check(plain, time.time())
        if payload is None:
            self._reject(why)
            return
        src = f"{addr[0]}:{addr[1]}"
        self.membership.handle_datagram(src, payload, time.monotonic())
        self._pump()

    def _send_datagram(self, addr: str, payload: bytes) -> None:
        if self._udp is None or self._udp.is_closing():
            return
        try:
            sealed = self._keys.seal_ring.seal(self.replay.stamp(payload, time.time()))
            target = split_addr(addr)
        except (SealError, ValueError):
            self.stats.runtime["send_errors"] += 1
            return
        delay = self.delay_to(addr)
        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, self._sendto, sealed, target)
        else:
            self._sendto(sealed, target)

    def _sendto(self, data: bytes, target: tuple[str, int]) -> None:
        if self._udp is not None and not self._udp.is_closing():
            try:
                self._udp.sendto(data, target)
                self.stats.count_out("gossip", len(data))
            except (OSError, ValueError, TypeError):
                # uvloop raises ValueError for a host that is not an IP address.
                self.stats.runtime["send_errors"] += 1

    def delay_to(self, addr: str) -> float:
        """Emulated one-way delay to ``addr`` (half the configured RTT)."""
        if not self.latency:
            return 0.0
        region = self._region_by_addr.get(addr)
        if region is None or region == self.meta.region:
            return 0.0
        return self.latency.get((self.meta.region, region), 0.0) / 2

    # ------------------------------------------------------------------ outgoing streams

    def _start_stream(self, addr: str, payload: bytes) -> None:
        if self._streams_in_flight >= self.cfg.max_streams_in_flight:
            self.stats.runtime["streams_shed"] += 1
            assert self._loop is not None
            self._loop.call_soon(self._stream_done, addr, None)
            return
        self._streams_in_flight += 1
        self.spawn(self._stream(addr, payload))

    async def _stream(self, addr: str, payload: bytes) -> None:
        reply: bytes | None = None
        why = ""
        try:
            async with asyncio.timeout(self.cfg.stream_timeout_s):
                reply = await self._push_pull(addr, payload)
        except ssl.SSLError as e:
            self.stats.runtime["stream_errors"] += 1
            why = (f"TLS refused ({e.reason or e}): is this node's bundle from the same "
                   "admin bundle as the seed's?")
        except PeerRefused as e:
            self.stats.runtime["stream_errors"] += 1
            why = f"refused: {e}"
        except asyncio.IncompleteReadError:
            self.stats.runtime["stream_errors"] += 1
            why = "the peer closed the connection without answering"
        except (OSError, TimeoutError, FrameTooLarge) as e:
            self.stats.runtime["stream_errors"] += 1
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except WireError as e:
            self._reject(e.reason, addr, e.detail)
            why = f"unexpected answer ({e.reason}: {e.detail})"
        except SealError as e:
            self._reject(e.reason)
            why = (f"its answer does not open with our gossip keyring ({e.reason}): "
                   "a different keyring.json?")
        finally:
            self._streams_in_flight -= 1
        if why and self.membership is not None and self.membership.alive_count() <= 1:
            # Still alone: a join that keeps failing must say why, not wait in silence.
            self.log_limited("join_failed", seed=addr, reason=why[:300])
        self._stream_done(addr, reply)

    async def _push_pull(self, addr: str, payload: bytes) -> bytes:
        delay = 2 * self.delay_to(addr)
        if delay > 0:
            await asyncio.sleep(delay)
        host, port = split_addr(addr)
        reader, writer = await connect_tls(
            host, port, self._client_ctx, handshake_timeout=self.cfg.handshake_timeout_s
        )
        try:
            who = peer_of(writer.get_extra_info("ssl_object"))
            if who is None or who.role is not Role.NODE or who.name in self.revocations.entries:
                self._reject("revoked" if who is not None and who.role is Role.NODE
                             else "no_role")
                raise ConnectionError(f"{addr} is not a node of this mesh")
            self._stream_peers[addr] = who.name
            frame = encode_stream_message(PushPullFrame(self._keys.seal_ring.seal(payload)))
            await write_frame(writer, frame, max_size=self.cfg.max_frame_bytes)
            self.stats.count_out("push_pull", len(frame))
            data = await read_frame(reader, self.cfg.max_frame_bytes)
            self.stats.count_in("push_pull", len(data))
            msg = decode_stream_message(data, self.cfg.max_frame_bytes)
            if isinstance(msg, RpcResponse) and not msg.ok:
                raise PeerRefused(msg.error[:300])  # it said why (a removed node, a key)
            if not isinstance(msg, PushPullFrame):
                raise WireError("unexpected", type(msg).__name__)
            return self._keys.open_ring.open(msg.payload)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _stream_done(self, addr: str, reply: bytes | None) -> None:
        if self.membership is None:
            return
        now = time.monotonic()
        peer = self._stream_peers.pop(addr, None)
        if reply is None:
            self.membership.stream_failed(addr, now)
        else:
            self.membership.handle_stream_reply(addr, reply, now, peer=peer)
        self._pump()

    # ------------------------------------------------------------------ inbound TCP

    def _on_accept(self, raw: asyncio.Transport, accept: _AcceptProtocol) -> None:
        peer = raw.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        # Connections that have not yet shown a certificate are bounded on their own, and
        # per source address: sockets that never speak cannot take every slot.
        if (
            self._conns >= self.cfg.max_connections
            or self._conns_by_ip[ip] >= self.cfg.max_connections_per_ip
            or self._unauth >= self.cfg.max_unauthenticated
            or self._unauth_by_ip[ip] >= self.cfg.max_unauthenticated_per_ip
        ):
            self._reject("busy")
            with contextlib.suppress(Exception):
                raw.write(BUSY)  # instead of the greeting: the caller can say "node busy"
            raw.close()
            return
        self._conns += 1
        self._conns_by_ip[ip] += 1
        self._unauth += 1
        self._unauth_by_ip[ip] += 1
        self.spawn(self._serve(raw, accept, ip, peer))

    def _authenticated(self, ip: str) -> None:
        self._unauth -= 1
        self._unauth_by_ip[ip] -= 1
        if self._unauth_by_ip[ip] <= 0:
            del self._unauth_by_ip[ip]

    async def _serve(
        self, raw: asyncio.Transport, accept: _AcceptProtocol, ip: str, peer: Any
    ) -> None:
        conn: FrameConnection | None = None
        pending = True  # counted among the unauthenticated until its certificate is read
        node: str | None = None
        """The node at the other end, once it has shown its certificate."""
        ended_by_peer = False
        try:
            assert self._loop is not None
            # Frames are received straight into buffers of their own (a large body is
            # decrypted directly into it), as on the client side of RPC connections.
            conn = FrameConnection(self.cfg.max_frame_bytes, server=True)
            raw.pause_reading()
            if accept.early_data or raw.is_closing():
                self._reject("protocol")
                return
            raw.write(GREETING)
            try:
                tls = await self._loop.start_tls(
                    raw,
                    conn,
                    self._server_ctx,
                    server_side=True,
                    ssl_handshake_timeout=self.cfg.handshake_timeout_s,
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError):
                self._reject("tls")
                return
            if tls is None:
                self._reject("tls")
                return
            conn.connection_made(tls)
            pending = False
            self._authenticated(ip)
            self.stats.runtime["tls_accepted"] += 1
            who = peer_of(tls.get_extra_info("ssl_object"))
            if who is None:
                self._reject("no_role")  # a CA-signed certificate without a meshscale role
                return
            # The kept entries (loaded before the membership exists, added to as removals
            # arrive): a connection accepted during start-up is checked too.
            if who.role is Role.NODE and who.name in self.revocations.entries:
                self._reject("revoked")
                # One frame saying why (its log shows it), then the door.
                refusal = RpcResponse(0, False, code=ErrorCode.REMOVED,
                                      error=f"removed: node {who.name!r} was "
                                      "removed from this mesh by its operator")
                await conn.write_frame(encode_stream_message(refusal),
                                       max_size=self.cfg.max_frame_bytes)
                return
            if who.role is Role.NODE:
                node = who.name
            ended_by_peer = await self._serve_connection(conn, peer, who)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            self.stats.runtime["connection_errors"] += 1
            ended_by_peer = True
        finally:
            if node is not None and ended_by_peer:
                for listener in self.peer_closed_listeners:
                    listener(node)
            if pending:
                self._authenticated(ip)
            self._conns -= 1
            self._conns_by_ip[ip] -= 1
            if self._conns_by_ip[ip] <= 0:
                del self._conns_by_ip[ip]
            if conn is not None and conn.transport is not None:
                conn.close()
            else:
                raw.abort()

    async def _serve_connection(self, conn: FrameConnection, peer: Any, who: Peer) -> bool:
        """Serve ``conn``'s requests until it ends; True: its other end ended it."""
        src = f"{peer[0]}:{peer[1]}" if peer else "?"
        while True:
            try:
                async with asyncio.timeout(self.cfg.idle_timeout_s):
                    data = await conn.read_frame()
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    self._reject("truncated")
                return True
            except FrameTooLarge:
                self._reject("oversized")
                return False
            except TimeoutError:
                return False
            try:
                msg = decode_stream_message(data, self.cfg.max_frame_bytes)
            except WireError as e:
                self._reject(e.reason, src, e.detail)
                return False
            kind = self._message_kind(msg)
            self.stats.count_in(kind, len(data))
            del data  # the request holds what it needs; the frame's buffer can go
            reply = await self._handle_message(msg, src, who)
            if reply is None:
                return False
            out = self._encode_reply(reply)
            await conn.write_frame(out, max_size=self.cfg.max_frame_bytes)
            self.stats.count_out(kind, len(out))
            if isinstance(reply, RpcResponse) and reply.error.startswith(
                    (UNAUTHORIZED, FORBIDDEN)):
                return False  # an unauthorised caller gets one answer, then the door

    def _encode_reply(self, reply: StreamMessage) -> bytes:
        """``reply``'s frame body; a handler's result that cannot be encoded (a handler
        bug) is answered as an internal error instead."""
        try:
            return encode_stream_message(reply)
        except (TypeError, ValueError, msgspec.EncodeError) as e:
            if not isinstance(reply, RpcResponse):
                raise
            self.stats.runtime["rpc_errors"] += 1
            self.log_limited("rpc_failed", error=type(e).__name__)
            return encode_stream_message(RpcResponse(
                reply.id, False, error=f"internal error: reply not encodable: {e}",
                code=ErrorCode.INTERNAL))

    def _message_kind(self, msg: StreamMessage) -> str:
        if isinstance(msg, RpcRequest):
            # The method names a registered handler, so the label set stays bounded.
            return msg.method if msg.method in self._rpc else "rpc_unknown"
        return "push_pull" if isinstance(msg, PushPullFrame) else "other"

    async def _handle_message(self, msg: StreamMessage, src: str, who: Peer
                              ) -> StreamMessage | None:
        if isinstance(msg, PushPullFrame):
            if self.membership is None:
                return None
            if who.role is not Role.NODE:
                self._reject("forbidden")
                return None
            try:
                plain = self._keys.open_ring.open(msg.payload)
            except SealError as e:
                self._reject(e.reason)
                # Tell the joiner why (it holds a CA certificate; the key stays ours).
                return RpcResponse(0, False, code=ErrorCode.UNAUTHORIZED,
                                   error=f"{UNAUTHORIZED}: a push/pull sealed with a "
                                   f"gossip key this node does not hold ({e.reason}): a "
                                   "different keyring.json?")
            out = self.membership.handle_stream(src, plain, time.monotonic(), peer=who.name)
            self._pump()
            if out is None:
                self._reject("malformed")
                return None
            return PushPullFrame(self._keys.seal_ring.seal(out))
        if isinstance(msg, RpcRequest):
            role = who.role.value
            if msg.token:
                granted = self.bundle.token_role(msg.token)
                if granted is None:
                    self._reject("unauthorized")
                    return RpcResponse(msg.id, False, error=f"{UNAUTHORIZED}: wrong token",
                                       code=ErrorCode.UNAUTHORIZED)
                role = narrowest(role, granted.value)
            if msg.method in METHOD_ACCESS and not allowed(role, msg.method):
                self._reject("forbidden")
                self._count_refusal(msg.method, role)
                return RpcResponse(msg.id, False, code=ErrorCode.UNAUTHORIZED, error=(
                    f"{FORBIDDEN}: {msg.method!r} needs {METHOD_ACCESS[msg.method]} access; "
                    f"the caller {who.name!r} has role {role}"))
            claimed = claimed_sender(msg.method, msg.args)
            if claimed is not None and claimed != who.name:
                self._reject("impersonation")
                self._count_refusal(msg.method, role)
                return RpcResponse(msg.id, False, code=ErrorCode.UNAUTHORIZED, error=(
                    f"{FORBIDDEN}: {msg.method!r} from node {who.name!r} claims to come from "
                    f"{claimed[:64]!r}"))
            token = caller.current.set(who)
            try:
                return await self._call_rpc(msg)
            finally:
                caller.current.reset(token)
        self._reject("unexpected")
        return None

    def _count_refusal(self, method: str, role: str) -> None:
        refused = self.stats.refused
        key = (method, role)
        if key not in refused and len(refused) >= self.cfg.max_refusals_tracked:
            key = ("other", role)
        refused[key] += 1

    async def _call_rpc(self, req: RpcRequest) -> RpcResponse:
        handler = self._rpc.get(req.method)
        if handler is None and not self.ready:
            return RpcResponse(req.id, False, error=f"{STARTING}: {req.method!r} is not served "
                                                    "yet; try again shortly",
                               code=ErrorCode.STARTING)
        if handler is None:
            self._reject("unknown_method")
            return RpcResponse(req.id, False, error=f"unknown method {req.method!r}",
                               code=ErrorCode.UNKNOWN_METHOD)
        if self._rpc_in_flight >= self.cfg.max_rpc_in_flight:
            self.stats.runtime["rpc_shed"] += 1
            return RpcResponse(req.id, False, error="busy: too many requests in flight",
                               code=ErrorCode.BUSY)
        self._rpc_in_flight += 1
        try:
            result = handler(req.args)
            if inspect.isawaitable(result):
                result = await result
            # Encoded as it is (a Struct encodes as its builtins would): see _encode_reply.
            return RpcResponse(req.id, True, result=result)
        except (ValueError, TypeError, KeyError) as e:
            return RpcResponse(req.id, False, error=str(e) or type(e).__name__,
                               code=code_of(e))
        except Exception as e:  # a handler bug must not take the connection down
            self.stats.runtime["rpc_errors"] += 1
            self.log_limited("rpc_failed", method=req.method, error=type(e).__name__)
            return RpcResponse(req.id, False, error=f"internal error: {type(e).__name__}: {e}",
                               code=ErrorCode.INTERNAL)
        finally:
            self._rpc_in_flight -= 1

    # ------------------------------------------------------------------ events, keys, disk

    def _on_event(self, ev: Event) -> None:
        kind = {
            MemberJoined: "member_joined",
            MemberAlive: "member_alive",
            MemberSuspect: "member_suspect",
            MemberDown: "member_down",
            MemberLeft: "member_left",
            MemberUpdated: "member_updated",
            MemberRemoved: "member_removed",
        }.get(type(ev), type(ev).__name__)
        name = str(getattr(ev, "name", ""))
        inc = int(getattr(ev, "incarnation", 0))
        source = str(getattr(ev, "source", ""))
        self._event_seq += 1
        self.events.append(EventInfo(self._event_seq, time.time(), kind, name, inc, source))
        level = "warning" if isinstance(ev, MemberDown | MemberSuspect | MemberRemoved) else "info"
        if isinstance(ev, MemberRemoved):
            self._on_removed(ev)
        if isinstance(ev, MemberRemoved | MemberLeft):
            self.peers.forget(name)
        fields: dict[str, Any] = {"member": name, "incarnation": inc}
        if source:
            fields["source"] = source
        if isinstance(ev, MemberJoined):
            fields["address"] = ev.addr
        self.log(level, kind, **fields)
        for listener in self.event_listeners:
            listener(ev)
        if isinstance(ev, MemberJoined | MemberUpdated | MemberAlive):
            self._region_by_addr = {
                mm.addr: mm.meta.region for mm in self.m.members.values() if mm.name != self.name
            }

    def _verify_revocation(self, entry: bytes) -> str | None:
        try:
            return self.revocations.verify(entry).name
        except RevocationError:
            return None

    def _on_removed(self, ev: MemberRemoved) -> None:
        try:
            self.revocations.add(ev.entry)
        except (RevocationError, OSError) as e:
            self.log("error", "revocation_not_saved", member=ev.name, error=str(e))
        if ev.name == self.name and not self.removed:
            self.removed = True
            self.log("error", "removed", detail="this node was removed from the mesh by the "
                     "operator; stopping (it cannot rejoin)")
            self.stop_requested.set()

    def record_event(self, kind: str, name: str = "", detail: str = "") -> None:
        """Add a non-membership event (a re-replication, a task retry) to the recent ones."""
        self._event_seq += 1
        self.events.append(EventInfo(self._event_seq, time.time(), kind, name, detail=detail))

    def _capacity_load(self) -> tuple[float, int]:
        """Busy slots (running tasks' CPUs, plus one per stream operator runner here) and
        queued reservations, for consolidation."""
        compute = self.compute
        sched = None if compute is None else compute.sched
        if compute is None or sched is None:
            return 0.0, 0
        ld = sched.load()
        runners = 0 if self.streams is None else len(self.streams.runners)
        return max(0.0, compute.capacity.cpus - ld.free_cpus) + runners, ld.queued

    def _sole_copies(self) -> int:
        """Objects held here that no other live member is confirmed to hold."""
        rm = None if self.dataplane is None else self.dataplane.rm
        if rm is None:
            return 0
        return rm.unconfirmed_count()

    def _power_state(self, state: PowerState) -> None:
        self.power.state = state

    def _power_reply(self, detail: str = "") -> node_api.PowerReply:
        st = "active" if self.capacity is None else str(self.capacity.state)
        return node_api.PowerReply(name=self.name, state=st, detail=detail)

    def _rpc_standby(self, req: Empty) -> node_api.PowerReply:
        if self.capacity is None:
            raise ApiError(ErrorCode.REFUSED, f"node {self.name} runs no workers: it has "
                                              "nothing to put on standby")
        why = self.capacity.hold()
        if why is not None:
            raise ApiError(ErrorCode.REFUSED, f"node {self.name} cannot go on standby: "
                                              f"{why}")
        return self._power_reply("drains, then sleeps once nothing runs if the rest of "
                                 "its region keeps its minimum of active nodes (else it "
                                 "gives up: see its events)")

    def _rpc_wake(self, req: Empty) -> node_api.PowerReply:
        if self.capacity is None:
            return self._power_reply("runs no workers")
        self.capacity.release()
        return self._power_reply()

    async def _power_loop(self) -> None:
        while True:
            await asyncio.sleep(POWER_TICK_S)
            try:
                await asyncio.to_thread(self.power.tick, time.monotonic())
                if self.compute is not None:
                    # Tasks share the draw of the interval just measured from now on.
                    self.compute.energy.set_watts(self.power.watts, time.monotonic())
            except Exception as e:  # a meter that breaks must not stop the node
                self.log_limited("power_tick_failed", error=repr(e)[:200])

    def _rpc_energy(self, req: Empty) -> node_api.EnergyInfo:
        p = self.power
        return node_api.EnergyInfo(
            name=self.name, region=self.meta.region, zone=self.meta.zone, source=p.source,
            watts=round(p.watts, 3), joules_total=round(p.joules, 3),
            joules_last_hour=round(p.joules_last_hour(), 3),
            window_s=min(ENERGY_WINDOW_S, round(time.time() - self.started_at)),
            cpu_utilization=round(p.utilisation, 4))

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.key_check_interval_s)
            self._check_keyring()
            self._save_incarnation()
            self._retire_idle_connections()

    def _retire_idle_connections(self) -> None:
        """Close the pool's connections idle for ``PeerConfig.idle_close_s``; once some
        were, give the C heap's free pages back (``TRIM_AFTER_CLOSE_S`` later, when the
        members closed their ends too; at most every ``heap_trim_interval_s``): their
        TLS state and buffers are freed into the allocator's heap, which keeps them
        otherwise (after a burst of small puts, ~10 MB of a node's RSS; issue #24)."""
        now = time.monotonic()
        if self.peers.sweep(now) and self.cfg.heap_trim_interval_s > 0:
            self._trim_at = now + TRIM_AFTER_CLOSE_S
        if (self._trim_at is not None and now >= self._trim_at
                and now - self._heap_trimmed_at >= self.cfg.heap_trim_interval_s):
            self._trim_at = None
            self._heap_trimmed_at = now
            trim_heap()

    def _check_keyring(self) -> None:
        keys = self._keys
        now = time.monotonic()
        path = self.bundle.path / "keyring.json"
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = keys.mtime_ns
        if mtime != keys.mtime_ns:
            keys.mtime_ns = mtime
            try:
                new = load_keyring(self.bundle.path)
            except (BundleError, OSError) as e:
                self.log("error", "keyring_unreadable", error=str(e))
                new = None
            if new is not None:
                seal_key = keys.seal_ring.primary
                # Keep opening with the key we seal with until we switch away from it.
                keys.open_ring = Keyring(new.primary, [*new.accepted, seal_key])
                if new.primary != seal_key:
                    keys.pending_primary = new.primary
                    keys.switch_at = now + self.cfg.key_switch_delay_s
                self.log(
                    "info",
                    "keyring_reloaded",
                    keys=new.key_ids(),
                    switch_in_s=self.cfg.key_switch_delay_s if keys.pending_primary else 0,
                )
        if keys.pending_primary is not None and now >= keys.switch_at:
            keys.seal_ring = Keyring(keys.pending_primary)
            keys.pending_primary = None
            self.log("info", "key_switched", key=keys.seal_ring.primary_id)

    def _save_incarnation(self) -> None:
        if self.membership is None:
            return
        inc = self.membership.incarnation
        if inc != self._saved_inc:
            try:
                write_identity(self.data_dir, Identity(self.name, inc, self.identity.created))
                self._saved_inc = inc
            except Exception as e:
                self.log("error", "identity_write_failed", error=str(e))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ built-in RPCs

    def _register_builtin_rpcs(self) -> None:
        self.serve(node_api.MEMBERS, self._rpc_members)
        self.serve(node_api.STATS, self._rpc_stats)
        self.serve(node_api.EVENTS, self._rpc_events)
        self.serve(node_api.ADMIN_REVOKE, self._rpc_revoke)
        self.serve(node_api.ENERGY, self._rpc_energy)
        self.serve(node_api.NODE_STANDBY, self._rpc_standby)
        self.serve(node_api.NODE_WAKE, self._rpc_wake)

    def member_infos(self) -> list[MemberInfo]:
        out = []
        for mm in sorted(self.m.members.values(), key=lambda x: x.name):
            out.append(self._member_info(mm))
        return out

    def _member_info(self, mm: Member) -> MemberInfo:
        rtt = self.m.estimate_rtt_to(mm.name)
        return MemberInfo(
            name=mm.name,
            address=mm.addr,
            region=mm.meta.region,
            zone=mm.meta.zone,
            state=STATE_NAMES.get(mm.state, str(mm.state)),
            incarnation=mm.inc,
            rtt_ms=None if rtt is None else round(rtt * 1000, 3),
            labels=dict(mm.meta.labels),
            cert_expires=_int_or_none(mm.meta.tags.get("cert_expires")),
            disk_full=is_full(mm.meta.tags),
            power=str(power_state(mm.meta.tags) or ""),
        )

    def _rpc_members(self, req: Empty) -> list[MemberInfo]:
        return self.member_infos()

    def rejected_messages(self) -> dict[str, int]:
        out: Counter[str] = Counter(self.stats.rejected)
        if self.membership is not None:
            for key, n in self.membership.stats.items():
                if key.startswith("rejected."):
                    out[key.removeprefix("rejected.")] += n
        return dict(out)

    def _rpc_stats(self, req: Empty) -> NodeStats:
        return NodeStats(
            name=self.name,
            address=self.addr,
            pid=os.getpid(),
            incarnation=self.m.incarnation,
            alive=self.m.alive_count(),
            health=self.m.health_score(),
            membership=dict(self.m.stats),
            rejected_messages=self.rejected_messages(),
            runtime=dict(self.stats.runtime) | {"peer_connections_opened": self.peers.opened,
                                                "peer_connections_idle": self.peers.idle_count},
            connections=self._conns,
            streams_in_flight=self._streams_in_flight,
            seal_key=self._keys.seal_ring.primary_id,
            keys=self._keys.open_ring.key_ids(),
            uptime_s=round(time.time() - self.started_at, 3),
        )

    def _rpc_revoke(self, req: RevokeRequest) -> RevokeReply:
        """Remove a node for good: ``entry`` is a revocation signed by the cluster CA
        (``meshscale node remove``); it spreads from here by gossip."""
        try:
            name = self.revocations.verify(req.entry).name
        except RevocationError as e:
            raise ValueError(str(e)) from None
        known = name in self.m.revoked
        self.m.revoke(req.entry, time.monotonic())
        self._pump()
        return RevokeReply(name=name, new=not known)

    def _rpc_events(self, req: EventsRequest) -> list[EventInfo]:
        return [e for e in self.events if e.seq > req.since]


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


async def run_agent(agent: NodeAgent) -> None:
    """Start ``agent`` and run until SIGTERM or SIGINT, then leave gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    stopping = asyncio.ensure_future(agent.stop_requested.wait())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stopping, signalled}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    signalled.cancel()
    if agent.removed:
        await agent.stop()
        return
    agent.log("info", "signal", action="leave")
    await agent.leave_and_stop()


def run_forever(agent: NodeAgent) -> None:
    """Run ``agent`` on uvloop when it is installed, else on asyncio's default loop.
    ``NodeRemovedError`` if the node stopped because it was removed from the mesh."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(run_agent(agent))
    else:
        uvloop.run(run_agent(agent))
    if agent.removed:
        raise NodeRemovedError(f"node {agent.name!r} was removed from the mesh by the "
                               "operator; it cannot rejoin")
