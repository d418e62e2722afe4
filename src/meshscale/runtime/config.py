"""The node agent's own configuration and counters (``AgentConfig``, ``AgentStats``):
read by ``runtime/node.py`` and, through ``runtime/services.py``, by the planes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from meshscale.core.capacity import CapacityConfig, PowerModel
from meshscale.transport.peers import PeerConfig

__all__ = ["AgentConfig", "AgentStats", "AuditConfig", "CapacitySettings", "PowerConfig"]


@dataclass(frozen=True)
class PowerConfig:
    """A node's power source and declared model (``power_source``, ``idle_watts``, ...)."""

    model: PowerModel = field(default_factory=lambda: PowerModel(
        idle_watts=10.0, peak_watts=65.0, standby_watts=2.0))
    source: str = "auto"
    """``auto``, ``rapl`` or ``model`` (``runtime/power.py``)."""
    rapl_dir: Path = Path("/sys/class/powercap")


@dataclass(frozen=True)
class CapacitySettings:
    """A node's consolidation (``runtime/capacity.py``; the ``energy_*`` start options).
    Off unless asked: see the README's "Capacity on demand"."""

    config: CapacityConfig = field(default_factory=lambda: CapacityConfig(mode="off"))
    pinned: bool = False
    """``--no-standby``: this node never drains or sleeps."""
    interval_s: float = 1.0
    """How often the driver builds the view and asks the controller."""
    gossip_interval_s: float = 2.0
    """Least time between two load-only updates of the node's tag."""
    sole_copies_interval_s: float = 10.0
    """How often the sole-copy count is recomputed."""


@dataclass(frozen=True)
class AuditConfig:
    """The node's audit trail (``runtime/audit.py``): bounds of its files and queue."""

    enabled: bool = True
    """Keep the trail (off: nothing is recorded, for a benchmark's baseline)."""
    segment_bytes: int = 4 * 1024 * 1024
    """A segment file grows to about this size before the next one starts."""
    max_segments: int = 16
    """Segments kept; the oldest is deleted beyond it (the trail's disk bound is about
    ``segment_bytes * max_segments``)."""
    max_pending_entries: int = 65_536
    """Entries waiting for the writer thread; beyond it new ones are dropped and counted
    (``audit_dropped``) rather than growing memory."""
    flush_interval_s: float = 0.05
    """An entry is written at most this long after it was appended (the writer gathers
    a batch that long after the first entry, and writes at once when ``flush_entries``
    are waiting); with nothing pending the writer thread sleeps until an entry comes."""
    flush_entries: int = 512
    fsync: bool = True
    """fsync each batch written."""
    head_interval_s: float = 10.0
    """Sign the chain head and gossip it this often (when it moved)."""
    max_heads_seen: int = 4096
    """Other nodes' heads remembered."""


@dataclass(frozen=True)
class AgentConfig:
    """Runtime bounds and timeouts of the agent (the protocol's are in MembershipConfig)."""

    peers: PeerConfig = field(default_factory=PeerConfig)
    """The node's connections to other nodes, shared by its planes (``transport/peers.py``)."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """The node's audit trail (``runtime/audit.py``)."""
    bind_attempts: int = 20
    """With port 0, UDP ports the OS offers before one whose TCP twin is free too."""
    max_connections: int = 256
    """Concurrent TCP connections accepted, overall."""
    max_connections_per_ip: int = 64
    """Concurrent TCP connections accepted from one IP address."""
    max_unauthenticated: int = 64
    """Connections between accept and a verified certificate, overall; beyond it, new
    ones are told "busy" and closed."""
    max_unauthenticated_per_ip: int = 8
    """The same, per source address: one address that opens sockets and never speaks
    cannot lock out the others."""
    max_frame_bytes: int = 8 * 1024 * 1024 + 1024
    """Largest frame accepted (a full push/pull of a large mesh, plus framing)."""
    max_datagram_bytes: int = 65_507
    udp_buffer_bytes: int = 2 * 1024 * 1024
    """Requested UDP receive buffer (SO_RCVBUF)."""
    handshake_timeout_s: float = 3.0
    idle_timeout_s: float = 30.0
    """Close an inbound connection that sends no frame for this long."""
    heap_trim_interval_s: float = 30.0
    """Once the node's idle connections to members are closed (``PeerConfig.idle_close_s``),
    the C heap's free pages are given back to the system (``malloc_trim``), at most this
    often (it walks the heap: a few ms per 100 MB); 0: never."""
    stream_timeout_s: float = 10.0
    """A whole outgoing push/pull exchange (connect, TLS, request, reply)."""
    max_streams_in_flight: int = 32
    """Outgoing push/pulls at once; more are shed and reported as failed."""
    max_rpc_in_flight: int = 64
    """Inbound RPCs executing at once; more are refused with an error."""
    recent_events: int = 1024
    key_check_interval_s: float = 1.0
    key_switch_delay_s: float = 5.0
    leave_timeout_s: float = 2.0
    """Longest wait for a graceful leave to spread before shutdown."""
    http: str | None = None
    """HOST:PORT of the HTTP API, metrics and dashboard (``runtime/http.py``); None: off."""
    task_timeout_s: float = 3600.0
    """Default timeout of a task that sets none."""
    task_memory_mb: int | None = None
    """Default memory growth of a task that sets none; None: memory / worker slots."""
    task_log_bytes: int = 64 * 1024
    """What one task prints to stdout, and to stderr, kept with its record (each stream;
    beyond it the output is cut and the cut is said)."""
    worker_user: str | None = "nobody"
    """Workers run as this user when the agent is root (``runtime/isolation.py``); ""
    or None: as the agent."""
    create_worker_user: bool = False
    """Create ``worker_user`` (``useradd --system``) if it does not exist."""
    disk_reserve_mb: int | None = None
    """Free space (MB) the data dir keeps: writes that would eat into it are refused
    (``disk_full``); None: the data plane's default (64 MB)."""
    http_tls: bool = False
    """Serve it over HTTPS with the node's certificate (the default beyond loopback)."""
    metrics_public: bool = False
    """Serve ``/metrics`` without the admin token (for a scraper)."""
    stream_max_backlog: int = 2_000
    """Records a stream shard holds for its slowest operator before producers wait."""
    max_pending_tasks: int = 10_000
    """Tasks this node owns with no result yet; a submit beyond it is refused ``busy``."""
    max_task_records: int = 10_000
    """Ended task records kept in memory (``core.tasks.TaskBook``); older ones are read
    from the KV when asked for."""
    task_record_window_s: float = 0.05
    """The longest a task's final record waits to be written with others
    (``ComputeConfig.record_window_s``)."""
    task_submit_grace_s: float = 0.005
    """How long a small submit of short tasks waits for them to end before its answer
    (``ComputeConfig.submit_grace_s``)."""
    repair_busy_mb_per_s: float = 16.0
    """Repair copies' pace while tasks run here, MiB/s; 0 unpaced
    (``ReplicationConfig.repair_busy_bytes_per_s``)."""
    repair_busy_max_transfers: int = 1
    """Repair copies at once while tasks run here
    (``ReplicationConfig.max_concurrent_transfers_busy``)."""
    task_run_timeout_s: float = 60.0
    """A task bound to a worker that neither reports its result nor beats (``Running``)
    for this long is run again elsewhere (``core.scheduling.SchedulingConfig``)."""
    max_http_connections: int = 256
    """Open HTTP connections; more are closed on arrival (counted ``http_busy``)."""
    http_idle_timeout_s: float = 15.0
    """An HTTP connection idle this long, including one that never finishes a request's
    headers, is closed."""
    max_http_streams: int = 16
    """Concurrent ``/api/v1/stream`` clients; more get 503."""
    power: PowerConfig = field(default_factory=lambda: PowerConfig())
    """Where power figures come from and the declared model (``runtime/power.py``)."""
    energy: CapacitySettings = field(default_factory=lambda: CapacitySettings())
    """Consolidation: drain and sleep when idle, wake on demand (``runtime/capacity.py``)."""
    max_refusals_tracked: int = 256
    """Distinct (method, role) pairs counted in ``rpc_refused``; more share one row."""
    max_log_events_tracked: int = 256
    """Distinct rate-limited log events remembered; beyond it they start afresh."""
    log_limit_s: float = 10.0
    """Error lines a peer can cause (a failed output, a failed HTTP handler) are logged at
    most once per this many seconds per kind; the rest are counted."""



@dataclass
class AgentStats:
    rejected: Counter[str] = field(default_factory=Counter)
    runtime: Counter[str] = field(default_factory=Counter)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    """RPCs refused for the caller's role, by (method, role)."""
    messages_in: Counter[str] = field(default_factory=Counter)
    """Messages received, by type (``gossip``, ``push_pull``, or the RPC method)."""
    messages_out: Counter[str] = field(default_factory=Counter)
    bytes_in: Counter[str] = field(default_factory=Counter)
    bytes_out: Counter[str] = field(default_factory=Counter)

    def count_in(self, kind: str, nbytes: int) -> None:
        self.messages_in[kind] += 1
        self.bytes_in[kind] += nbytes

    def count_out(self, kind: str, nbytes: int) -> None:
        self.messages_out[kind] += 1
        self.bytes_out[kind] += nbytes
