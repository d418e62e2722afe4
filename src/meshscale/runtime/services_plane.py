"""The node's services plane (issue #22): replica processes, and the calls routed to them.

Every decision is ``core.services``'s; this module only gathers their inputs and carries
out their answers:

- ``svc.deploy`` (a client, through any node): the spec is checked by building a
  ``core.services.ServiceSpec`` (``ServiceSpecError`` names the field), then placed once
  on the node's view (``place_service``): an ``Unplaceable`` is refused with ``refused``
  naming the rule. Otherwise the pickled ``(class, args, kwargs)`` is stored as a
  replicated object, the spec (``ServiceWire``) in the replicated KV under
  ``service/<name>`` (an index under ``services``), and every live node is told
  (``svc.notify``); a node that missed it reads the KV within ``kv_reload_s``. The same
  way stream operators are registered (``runtime/streams.py``).
- Every ``status_interval_s`` each node polls every other live node's ``svc.status``:
  the replicas it runs (starting or ready, in-flight calls, latencies), the calls routed
  from it per service over ``call_window_s``, and its autoscaler state. The membership
  tags are too small for this (``max_meta_bytes`` = 512), so it is a poll, bounded by
  ``MAX_SERVICES`` services and the members of the view.
- Every ``reconcile_interval_s`` each node computes, from those tables, the calls per
  region (its own node's region counts its calls), the nodes that hold a replica
  (``current``) or a ready one, and the replica count (fixed, or ``agreed_count`` of the
  gossiped autoscaler states after stepping its own with ``autoscale_step``; a node with
  no state yet takes its peers' with ``adopt_desired``). ``replicas_wanted`` says which
  replicas it starts; ``keep_replica`` which of those it runs but is no longer named for
  it stops (make before break).
- A call (``svc.call``) goes to any node: it refuses an unknown service or method, then
  routes with ``route_call`` over the replicas it knows (healthy: the node alive or
  suspect in the view, its replica ready, and no transport failure to it in the last
  ``failed_node_quarantine_s``) and forwards the call (``svc.invoke``). A node with no
  replica answers ``not-here`` (``redirect``); a node that cannot be reached, or a
  replica that died or timed out, is a lost replica (``failover``: an idempotent method
  is retried once elsewhere, another fails with ``replica-lost``).

A replica is a long-lived process (``runtime/replica_main.py``) with the task workers'
isolation: the worker user when the agent is root, a cgroup of its own when the node
has them, death with the node. Calls reach it one at a time over a socketpair; a call
that times out kills it (it may be stuck in C code), and the reconcile loop starts a new
one. Nothing here unpickles user data: the node moves bytes, the replica decodes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from meshscale.core.actors import (
    ActorCheckpoint,
    ActorConfig,
    actor_kv_key,
    actor_lost,
    actor_owner,
    after_call,
    claim,
    encode_checkpoint,
    pick_checkpoint,
)
from meshscale.core.api import ApiError, Empty, ErrorCode
from meshscale.core.api import objects as obj_api
from meshscale.core.api import services as api
from meshscale.core.api.contract import residency_of
from meshscale.core.api.services import (
    CallReply,
    CallRequest,
    DeployReply,
    DeployRequest,
    InvokeReply,
    InvokeRequest,
    ListReply,
    NotifyRequest,
    RemoveReply,
    RemoveRequest,
    ReplicaInfo,
    ReplicaStatus,
    ScaleWire,
    ServiceInfo,
    ServiceWire,
    StatusReply,
)
from meshscale.core.membership import State
from meshscale.core.objects import object_id
from meshscale.core.pacing import loop_wait_s
from meshscale.core.placement import Candidate
from meshscale.core.scheduling import NodeState, Resources
from meshscale.core.services import (
    Autoscale,
    CallFailed,
    HealthState,
    ReplicaView,
    Retry,
    ScaleState,
    ServiceConfig,
    ServicePlacement,
    ServiceSpec,
    ServiceSpecError,
    Unplaceable,
    adopt_desired,
    agreed_count,
    autoscale_step,
    failover,
    health_step,
    keep_replica,
    place_service,
    redirect,
    replicas_wanted,
    route_call,
)
from meshscale.runtime.local import LocalCalls, call_node
from meshscale.runtime.observe import ServiceCallMetrics
from meshscale.runtime.pacing import Wakeup
from meshscale.runtime.replica_main import (
    ActorCall,
    Call,
    Done,
    Drop,
    Failed,
    Init,
    Load,
    Ready,
    decode_from_replica,
)
from meshscale.runtime.replica_main import encoder as replica_encoder
from meshscale.runtime.services import NodeServices
from meshscale.runtime.worker_main import FRAME_HEADER, MAX_ENVELOPE, REPLY_SLACK, frame_header
from meshscale.transport.rpc import RemoteError, RpcError

__all__ = ["INDEX_KEY", "SPEC_PREFIX", "ServicePlane", "ServicePlaneConfig", "spec_of"]

SPEC_PREFIX = "service/"
INDEX_KEY = "services"
LANE_STATUS = "svc.status"
LANE_NOTIFY = "svc.notify"

_BOOT = ("import sys; sys.path.append(sys.argv[1]); "
         "from meshscale.runtime.replica_main import main; main(sys.argv[2:])")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

_BUSY = "no connection slot free"
"""How ``transport.rpc`` words a ``NodeBusy`` refusal (it re-raises it as ``RpcError``)."""

_spec_encoder = msgspec.msgpack.Encoder()
_spec_decoder = msgspec.msgpack.Decoder(ServiceWire)
_names_decoder = msgspec.msgpack.Decoder(list[str])


@dataclass(frozen=True)
class ServicePlaneConfig:
    status_interval_s: float = 0.5
    """How often each node polls every other live node's ``svc.status``."""
    status_timeout_s: float = 2.0
    status_stale_s: float = 5.0
    """A status older than this is not used (its node is slow or gone)."""
    reconcile_interval_s: float = 0.5
    kv_reload_s: float = 5.0
    idle_max_s: float = 5.0
    """The longest the status, reconcile and health loops sleep while this node knows no
    service and runs no replica (``ServicePlane._idle``), when their rounds do nothing
    but the reconcile loop's read of the KV every ``kv_reload_s``; a service installed
    here wakes them at once (``core.pacing``)."""
    call_window_s: float = 10.0
    """Calls per source region are counted over this window (as the simulator does)."""
    replica_start_timeout_s: float = 120.0
    """A replica's ``__init__`` (the model load) must finish within this."""
    replica_queue: int = 1_024
    """Calls waiting for one replica; beyond: ``busy``."""
    latency_samples: int = 1_024
    """Latencies kept per replica for p50/p99."""
    failed_node_quarantine_s: float = 3.0
    """A node a forwarded call could not reach is not routed to for this long (or until
    the view says it is back with a new status)."""
    forward_slack_s: float = 2.0
    """Added to a call's timeout for the hop to the replica's node."""
    code_replicas: int = 3
    restart_backoff_s: float = 1.0
    """Wait before a replica that died is started again; doubled after each start that
    failed in a row (its ``__init__`` raised), up to ``restart_backoff_max_s``."""
    restart_backoff_max_s: float = 30.0
    busy_retries: int = 4
    """A replica's node that answers "no connection slot free" is asked again this many
    times (50 ms, doubling) before the call counts it as lost."""
    service_health_interval_s: float = 2.0
    """How often a node calls the health method of each of its replicas whose service
    names one (``deploy(..., health="method")``)."""
    service_health_timeout_s: float = 2.0
    """A health check not answered within this is a failed one (``decisions.
    health_failures`` in a row make the replica unhealthy)."""
    service_health_drain_s: float = 1.0
    """An unhealthy replica is listed as such (routed around, its calls in flight left
    to finish) at most this long before it is killed and started again, so that the
    other nodes' next status poll sees it."""
    decisions: ServiceConfig = field(default_factory=ServiceConfig)
    actors: ActorConfig = field(default_factory=ActorConfig)
    actor_max_redirects: int = 8
    """An actor call answered "not here" (the asked node's view names another owner, or
    it was fenced) is routed again this many times, backing off, before it fails."""

    def __post_init__(self) -> None:
        for name in ("status_interval_s", "status_timeout_s", "reconcile_interval_s",
                     "call_window_s", "replica_start_timeout_s",
                     "service_health_interval_s", "service_health_timeout_s",
                     "kv_reload_s", "idle_max_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")
        if not (math.isfinite(self.service_health_drain_s) and
                self.service_health_drain_s >= 0):
            raise ValueError(f"service_health_drain_s must be finite and >= 0, got "
                             f"{self.service_health_drain_s!r}")
        if self.replica_queue < 1 or self.latency_samples < 1:
            raise ValueError("replica_queue and latency_samples must be >= 1")


def spec_of(w: ServiceWire) -> ServiceSpec:
    """The decisions' spec of a wire spec; ``ServiceSpecError`` names a bad field."""
    placement: str | frozenset[str] = w.placement
    if w.placement == "regions":
        placement = frozenset(w.regions or ())
    elif w.regions is not None:
        raise ServiceSpecError("regions", "only a placement of 'regions' names regions")
    auto = None
    if w.autoscale is not None:
        a = w.autoscale
        auto = Autoscale(a.min_replicas, a.max_replicas, a.target_inflight)
    unknown = sorted(set(w.idempotent) - set(w.methods))
    if unknown:
        raise ServiceSpecError("idempotent", f"names methods the class does not have: "
                                             f"{', '.join(unknown)}")
    if w.health is not None and w.health not in w.methods:
        raise ServiceSpecError("health", f"names a method the class does not have: "
                                         f"{w.health}")
    return ServiceSpec(
        name=w.name, placement=placement, replicas=w.replicas, autoscale=auto,
        resources=Resources(w.cpus, w.memory_mb, w.gpus), residency=residency_of(w.residency),
        labels=dict(w.labels), idempotent=frozenset(w.idempotent),
        central_region=w.central_region)


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class _Lease:
    """This node's hold on one actor key: the checkpoint its last successful put wrote
    (None: it holds none, the next call claims), and the process holding the instance."""

    ck: ActorCheckpoint | None = None
    version: str = ""
    loaded_in: Replica | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _ReplicaDied(Exception):
    """The replica's process died, or a call to it timed out (it was killed)."""


class Replica:
    """One replica process of a service on this node."""

    def __init__(self, plane: ServicePlane, service: str, code_id: str,
                 max_state_bytes: int = 0) -> None:
        self.plane = plane
        self.service = service
        self.code_id = code_id
        self.max_state_bytes = max_state_bytes
        """Non-zero: an actor's process (one instance per key, ``core/actors.py``)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        self.dead = False
        self.inflight = 0
        self.calls = 0
        self.failed = 0
        self.constructed = 0
        self.latencies: deque[float] = deque(maxlen=plane.cfg.latency_samples)
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        self.cg: Any = None
        self.error = ""
        self.health = HealthState()
        self._health_call: asyncio.Task[tuple[bool, str]] | None = None

    def status(self) -> ReplicaStatus:
        lat = list(self.latencies)
        p50 = _percentile(lat, 0.5)
        p99 = _percentile(lat, 0.99)
        return ReplicaStatus(ready=self.ready and not self.dead, inflight=self.inflight,
                             calls=self.calls, failed=self.failed,
                             p50_ms=None if p50 is None else round(p50 * 1000, 3),
                             p99_ms=None if p99 is None else round(p99 * 1000, 3),
                             constructed=self.constructed, healthy=self.health.healthy,
                             health_failures=self.health.failures)

    async def start(self, code: bytes) -> None:
        agent = self.plane.agent
        iso = agent.isolation
        argv = [sys.executable, "-c", _BOOT, _PACKAGE_ROOT]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv += [str(theirs.fileno()), str(os.getpid())]
        if iso is not None and iso.user is not None:
            assert iso.work_dir is not None
            argv += [f"{iso.user.uid}:{iso.user.gid}", str(iso.work_dir)]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),),
                                         stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if iso is not None and iso.cgroups is not None:
            try:
                self.cg = iso.cgroups.worker(f"svc-{self.plane.next_cg()}")
                self.cg.attach(self.proc.pid)
            except OSError:
                self.cg = None
                self.plane.stats["cgroup_errors"] += 1
        self.reader, self.writer = await asyncio.open_unix_connection(
            sock=ours, limit=api.MAX_RESULT_BYTES + REPLY_SLACK)
        init = Init(max(api.MAX_CALL_ARGS_BYTES, self.max_state_bytes), api.MAX_RESULT_BYTES,
                    [p for p in sys.path if isinstance(p, str)], self.max_state_bytes)
        env = replica_encoder.encode(init)
        self.writer.write(frame_header(env, len(code)) + code)
        await self.writer.drain()
        async with asyncio.timeout(self.plane.cfg.replica_start_timeout_s):
            msg, body = await self._read()
        if isinstance(msg, Failed):
            raise RuntimeError(f"__init__ failed: {msg.message}\n"
                               f"{body.decode('utf-8', 'replace')}")
        if not isinstance(msg, Ready):
            raise RuntimeError("the replica did not answer ready")
        self.constructed += 1
        self.ready = True

    async def _read(self) -> tuple[Ready | Done | Failed, bytes]:
        assert self.reader is not None
        try:
            head = await self.reader.readexactly(FRAME_HEADER.size)
            env_len, body_len = FRAME_HEADER.unpack(head)
            if env_len > MAX_ENVELOPE or \
                    body_len > api.MAX_RESULT_BYTES + self.max_state_bytes + REPLY_SLACK:
                raise _ReplicaDied("the replica sent a frame over its bounds")
            msg = decode_from_replica.decode(await self.reader.readexactly(env_len))
            body = await self.reader.readexactly(body_len) if body_len else b""
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as e:
            raise _ReplicaDied(f"the replica's process died ({type(e).__name__})") from None
        return msg, body

    async def load(self, key: str, state: bytes, timeout_s: float) -> InvokeReply:
        """Make actor ``key``'s instance in the process from its ``state`` (empty: run
        ``__init__``)."""
        async with self.lock:
            if self.dead or self.writer is None:
                return InvokeReply("crashed", message="the actor's process died")
            env = replica_encoder.encode(Load(key))
            try:
                self.writer.write(frame_header(env, len(state)) + state)
                async with asyncio.timeout(timeout_s):
                    await self.writer.drain()
                    msg, body = await self._read()
            except TimeoutError:
                self.kill(f"loading actor key {key!r} took more than {timeout_s}s")
                return InvokeReply("timeout", message=f"loading key {key!r} did not finish "
                                   f"within {timeout_s}s; the process was restarted")
            except (_ReplicaDied, ConnectionError) as e:
                self.kill(str(e))
                return InvokeReply("crashed", message=f"{e} while loading key {key!r}")
        if isinstance(msg, Done):
            return InvokeReply("done")
        if isinstance(msg, Failed):
            return InvokeReply("raised", message=msg.message,
                               traceback=body.decode("utf-8", "replace")[
                                   :api.MAX_TRACEBACK_CHARS])
        self.kill("unexpected message")
        return InvokeReply("crashed", message="the actor's process sent an unexpected message")

    def drop(self, key: str) -> None:
        """Forget actor ``key``'s instance (not answered)."""
        if not self.dead and self.writer is not None:
            env = replica_encoder.encode(Drop(key))
            self.writer.write(frame_header(env, 0))

    async def call(self, method: str, args: bytes, encoding: str, timeout_s: float,
                   key: str | None = None, state_out: list[bytes] | None = None
                   ) -> InvokeReply:
        if self.inflight >= self.plane.cfg.replica_queue:
            return InvokeReply("busy", message=f"the replica of {self.service!r} has "
                               f"{self.inflight} calls queued (replica_queue)")
        self.inflight += 1
        t0 = time.monotonic()
        try:
            async with self.lock:
                if self.dead or self.writer is None:
                    return InvokeReply("crashed", message="the replica's process died")
                left = timeout_s - (time.monotonic() - t0)
                if left <= 0:
                    return InvokeReply("timeout", message=f"queued longer than {timeout_s}s")
                env = replica_encoder.encode(
                    Call(method, encoding) if key is None else ActorCall(key, method, encoding))
                try:
                    self.writer.write(frame_header(env, len(args)) + args)
                    async with asyncio.timeout(left):
                        await self.writer.drain()
                        msg, body = await self._read()
                except TimeoutError:
                    self.kill(f"a call to {method!r} took more than {timeout_s}s")
                    self.failed += 1
                    return InvokeReply("timeout", message=f"{method!r} did not answer within "
                                       f"{timeout_s}s; the replica was restarted")
                except (_ReplicaDied, ConnectionError) as e:
                    self.kill(str(e))
                    self.failed += 1
                    return InvokeReply("crashed", message=f"{e} while running {method!r}")
        finally:
            self.inflight -= 1
        self.latencies.append(time.monotonic() - t0)
        if isinstance(msg, Done):
            self.calls += 1
            if msg.state_bytes:
                cut = len(body) - msg.state_bytes
                if cut < 0 or state_out is None:
                    self.kill("a state it was not asked for")
                    return InvokeReply("crashed", message="the replica sent a bad frame")
                state_out.append(body[cut:])
                body = body[:cut]
            return InvokeReply("done", value=body)
        if isinstance(msg, Failed):
            self.failed += 1
            kind = msg.kind if msg.kind in api.OUTCOMES else "raised"
            if msg.kind == "unknown-method":
                kind = "raised"
            return InvokeReply(kind, message=msg.message,  # type: ignore[arg-type]
                               traceback=body.decode("utf-8", "replace")[
                                   :api.MAX_TRACEBACK_CHARS])
        self.kill("unexpected message")
        return InvokeReply("crashed", message="the replica sent an unexpected message")

    async def check_health(self, method: str) -> None:
        """One health check (``service_health_interval_s``): call ``method`` with no
        arguments, JSON-encoded so the node decodes no user pickle; ``false``, a raise or
        no answer within ``service_health_timeout_s`` is a failure (``health_step``). A
        replica busy with calls is not checked (each call has its own timeout)."""
        if self.dead or not self.ready or not self.health.healthy:
            return
        cfg = self.plane.cfg
        pending = self._health_call
        if pending is not None and not pending.done():
            ok, why = False, f"{method!r} has not answered the previous check yet"
        elif self.lock.locked():
            return
        else:
            task = asyncio.get_running_loop().create_task(self._run_health(method))
            self._health_call = task
            try:
                async with asyncio.timeout(cfg.service_health_timeout_s):
                    ok, why = await asyncio.shield(task)
            except TimeoutError:
                ok, why = False, (f"{method!r} did not answer within "
                                  f"{cfg.service_health_timeout_s}s")
        if self.dead:
            return
        before = self.health
        self.health = health_step(self.health, ok, cfg.decisions)
        if not ok:
            self.plane.stats["health_checks_failed"] += 1
            self.plane.agent.log_limited("service_health_check_failed", service=self.service,
                                         failures=self.health.failures, error=why[:300])
        if before.healthy and not self.health.healthy:
            self.plane.stats["replica_health_restarts"] += 1
            self.plane.agent.log("warning", "service_replica_unhealthy", service=self.service,
                                 failures=self.health.failures, error=why[:300])
            self.plane.agent.spawn(self._drain_and_kill(
                f"unhealthy: {self.health.failures} health checks failed in a row "
                f"(last: {why[:200]})"))

    async def _run_health(self, method: str) -> tuple[bool, str]:
        async with self.lock:
            if self.dead or self.writer is None:
                return False, "the replica's process died"
            env = replica_encoder.encode(Call(method, "json"))
            try:
                self.writer.write(frame_header(env, 0))
                await self.writer.drain()
                msg, body = await self._read()
            except (_ReplicaDied, ConnectionError) as e:
                self.kill(str(e))
                return False, str(e)
        if isinstance(msg, Done):
            if body.strip() == b"false":
                return False, f"{method!r} returned false"
            return True, ""
        if isinstance(msg, Failed):
            return False, f"{method!r} failed ({msg.kind}): {msg.message}"
        return False, "the replica sent an unexpected message"

    async def _drain_and_kill(self, why: str) -> None:
        deadline = time.monotonic() + self.plane.cfg.service_health_drain_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = deadline - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)  # listed unhealthy until the peers' next poll
        self.kill(why)

    def kill(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.ready = False
        self.error = why
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.writer is not None:
            self.writer.close()
        self.plane.agent.log("info", "service_replica_stopped", service=self.service,
                             reason=why[:200])
        proc, cg = self.proc, self.cg

        async def reap() -> None:
            if proc is not None:
                for _ in range(50):
                    if proc.poll() is not None:
                        break
                    await asyncio.sleep(0.1)
            if cg is not None:
                with contextlib.suppress(OSError):
                    cg.remove()

        self.plane.agent.spawn(reap())


class ServicePlane:
    def __init__(self, agent: NodeServices, config: ServicePlaneConfig | None = None) -> None:
        self.agent = agent
        self.cfg = config or ServicePlaneConfig()
        self.local = LocalCalls(agent)
        self.specs: dict[str, ServiceWire] = {}
        self.core: dict[str, ServiceSpec] = {}
        self._installed_at: dict[str, float] = {}
        self.code: dict[str, bytes] = {}
        self.replicas: dict[str, Replica] = {}
        self._died_at: dict[str, float] = {}
        self._start_fails: dict[str, int] = {}
        self._start_errors: dict[str, str] = {}
        self.statuses: dict[str, tuple[StatusReply, float]] = {}
        self.scale: dict[str, ScaleState] = {}
        self._calls: dict[str, deque[tuple[float, int]]] = {}
        """Per service, (second, calls routed from here that second), the last window."""
        self._bad: dict[str, float] = {}
        self.stats: Counter[str] = Counter()
        self.call_metrics = ServiceCallMetrics()
        """Calls entered here, for the node's Prometheus metrics (``runtime/observe.py``)."""
        self.rng = random.Random(agent.rng.random())
        self._cg_seq = 0
        self._round_started_at = -math.inf
        """When the last complete round of status polls began: a service installed
        after it is not placed yet (its call counts and replicas are not all known)."""
        self._stopping = False
        self._status_wakeup, self._reconcile_wakeup, self._health_wakeup = \
            Wakeup(), Wakeup(), Wakeup()
        """Wake the status, reconcile and health loops from their idle waits: set when a
        service is installed here (``_install``)."""
        self._wakeups = (self._status_wakeup, self._reconcile_wakeup, self._health_wakeup)
        self.actor_procs: dict[str, Replica] = {}
        """Per actor service, this node's process holding the instances of the keys it
        owns (``core/actors.py``)."""
        self._actor_start: dict[str, asyncio.Lock] = {}
        self.leases: dict[tuple[str, str], _Lease] = {}
        """(service, key) -> this node's hold on the key, least recently called first."""

    def replica_states(self) -> dict[str, tuple[str, int]]:
        """Service -> (this node's replica: starting, ready or unhealthy; its calls in
        flight), for the metrics."""
        out = {}
        for name, r in self.replicas.items():
            if r.dead or name not in self.specs:
                continue
            state = "starting" if not r.ready else "ready" if r.health.healthy else "unhealthy"
            out[name] = (state, r.inflight)
        return out

    def next_cg(self) -> int:
        self._cg_seq += 1
        return self._cg_seq

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        a = self.agent
        a.serve(api.DEPLOY, self._rpc_deploy)
        a.serve(api.REMOVE, self._rpc_remove)
        a.serve(api.LIST, self._rpc_list)
        a.serve(api.CALL, self._rpc_call)
        a.serve(api.NOTIFY, self._rpc_notify)
        a.serve(api.INVOKE, self._rpc_invoke)
        a.serve(api.STATUS, self._rpc_status)
        a.spawn(self._status_loop())
        a.spawn(self._reconcile_loop())
        a.spawn(self._health_loop())

    async def stop(self) -> None:
        self._stopping = True
        self._wake_loops()
        for r in list(self.actor_procs.values()):
            if r.task is not None:
                r.task.cancel()
            r.kill("the node stops")
        self.actor_procs.clear()
        for r in list(self.replicas.values()):
            if r.task is not None:
                r.task.cancel()
            r.kill("the node stops")
        self.replicas.clear()

    # ------------------------------------------------------------------ view

    def _alive(self) -> list[Any]:
        return [m for m in self.agent.m.members.values() if m.state <= State.SUSPECT]

    def _view(self) -> list[NodeState]:
        me = self.agent.name
        out = []
        for m in self._alive():
            cap = dict(m.meta.capacity)
            coord = self.agent.m.coordinate() if m.name == me else m.coord
            out.append(NodeState(
                Candidate(m.name, m.meta.region, m.meta.zone, dict(m.meta.labels)),
                Resources(float(cap.get("cpus") or os.cpu_count() or 1),
                          int(cap.get("memory_mb") or 1 << 40), int(cap.get("gpus") or 0)),
                coord=coord))
        return out

    def _tables(self) -> dict[str, StatusReply]:
        """Every live node's latest status (this node's own, fresh)."""
        now = time.monotonic()
        alive = {m.name for m in self._alive()}
        out = {n: s for n, (s, at) in self.statuses.items()
               if n in alive and now - at <= self.cfg.status_stale_s}
        out[self.agent.name] = self._status(now)
        return out

    def _call_sources(self, tables: dict[str, StatusReply]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for st in tables.values():
            for svc, n in st.calls.items():
                if n > 0:
                    by = out.setdefault(svc, {})
                    by[st.region] = by.get(st.region, 0) + n
        return out

    def _count(self, name: str, tables: dict[str, StatusReply]) -> int:
        spec = self.core[name]
        if spec.autoscale is None:
            return spec.bounds[0]
        return agreed_count(spec.autoscale,
                            (t.scale[name].desired for t in tables.values() if name in t.scale))

    def _placement(self, name: str, tables: dict[str, StatusReply]
                   ) -> ServicePlacement | Unplaceable:
        current = [n for n, t in tables.items() if name in t.replicas]
        return place_service(self.core[name], self._view(),
                             self._call_sources(tables).get(name, {}),
                             self._count(name, tables), current=current)

    # ------------------------------------------------------------------ status

    def _window_calls(self, name: str, now: float) -> int:
        q = self._calls.get(name)
        if not q:
            return 0
        while q and q[0][0] < now - self.cfg.call_window_s:
            q.popleft()
        return sum(n for _, n in q)

    def _note_call(self, name: str) -> None:
        sec = float(int(time.monotonic()))
        q = self._calls.setdefault(name, deque())
        if q and q[-1][0] == sec:
            q[-1] = (sec, q[-1][1] + 1)
        else:
            q.append((sec, 1))
            while len(q) > self.cfg.call_window_s + 2:
                q.popleft()

    def _status(self, now: float) -> StatusReply:
        scale = {}
        for name, s in self.scale.items():
            if name in self.core:
                scale[name] = ScaleWire(
                    s.desired, None if s.above_since is None else now - s.above_since,
                    None if s.below_since is None else now - s.below_since)
        return StatusReply(
            node=self.agent.name, region=self.agent.meta.region,
            replicas={n: r.status() for n, r in self.replicas.items()
                      if n in self.specs and not r.dead},
            calls={n: c for n in self.specs if (c := self._window_calls(n, now))},
            scale=scale,
            errors={n: e for n, e in self._start_errors.items() if n in self.specs})

    def _rpc_status(self, _: Empty) -> StatusReply:
        return self._status(time.monotonic())

    def _idle(self) -> bool:
        """No service known here and no replica running: the loops' rounds do nothing
        (but the reconcile loop's read of the KV)."""
        return not (self.specs or self.core or self.replicas)

    def _wake_loops(self) -> None:
        for w in self._wakeups:
            w.set()

    def _loop_wait_s(self, interval_s: float, next_duty_at: float | None = None) -> float:
        return loop_wait_s(time.monotonic(), idle=self._idle(), interval_s=interval_s,
                           idle_max_s=self.cfg.idle_max_s, next_duty_at=next_duty_at)

    async def _status_loop(self) -> None:
        wait_s = self.cfg.status_interval_s
        while not self._stopping:
            await self._status_wakeup.wait(wait_s)
            wait_s = self._loop_wait_s(self.cfg.status_interval_s)
            if not self.specs or self.agent.membership is None:
                continue
            others = [m.name for m in self._alive() if m.name != self.agent.name]

            async def poll(n: str) -> None:
                try:
                    st = await call_node(self.agent, n, api.STATUS, Empty(), lane=LANE_STATUS,
                                         timeout_s=self.cfg.status_timeout_s)
                except (RpcError, ValueError):
                    return
                self.statuses[n] = (st, time.monotonic())

            started = time.monotonic()
            await asyncio.gather(*(poll(n) for n in others))
            self._round_started_at = started
            for n in [n for n in self.statuses if n not in others]:
                del self.statuses[n]

    # ------------------------------------------------------------------ deploy, remove

    async def _rpc_deploy(self, req: DeployRequest) -> DeployReply:
        w = req.spec
        if w.name not in self.specs and len(self.specs) >= api.MAX_SERVICES:
            raise ApiError(ErrorCode.INVALID, f"{api.MAX_SERVICES} services already run "
                                              "(MAX_SERVICES)")
        try:
            spec = spec_of(w)
        except ServiceSpecError as e:
            raise ApiError(ErrorCode.INVALID, f"service {w.name!r}: {e}") from None
        if object_id(req.code) != w.code_id:
            raise ApiError(ErrorCode.INVALID, "code does not hash to spec.code_id")
        tables = self._tables()
        count = spec.bounds[0]
        p = place_service(spec, self._view(), {}, count,
                          current=[n for n, t in tables.items() if w.name in t.replicas])
        if isinstance(p, Unplaceable):
            raise ApiError(ErrorCode.REFUSED, f"rule {p.rule}: {p.message}")
        stored = await self.local.put_object(req.code, self.cfg.code_replicas)
        if stored["id"] != w.code_id:
            raise ApiError(ErrorCode.INTERNAL, "stored code under another id")
        self.code[w.code_id] = req.code
        await self.local.kv_put(SPEC_PREFIX + w.name, _spec_encoder.encode(w))
        index = await self.local.kv_get(INDEX_KEY)
        names = set(_names_decoder.decode(index)) if index else set()
        if w.name not in names:
            names.add(w.name)
            await self.local.kv_put(INDEX_KEY, _spec_encoder.encode(sorted(names)))
        self._install(w, spec)
        await self._notify_all(NotifyRequest(spec=w))
        self.agent.log("info", "service_deployed", service=w.name, nodes=list(p.nodes))
        return DeployReply(name=w.name, nodes=list(p.nodes), wanted=p.wanted)

    def _install(self, w: ServiceWire, spec: ServiceSpec | None = None) -> None:
        try:
            spec = spec or spec_of(w)
        except ServiceSpecError as e:
            self.agent.log_limited("service_spec_unusable", service=w.name, error=str(e))
            return
        old = self.specs.get(w.name)
        changed = old is not None and (old.code_id != w.code_id or old.actor != w.actor)
        if changed and w.name in self.replicas:
            self._stop_replica(w.name, "redeployed with new code")
        proc = self.actor_procs.pop(w.name, None) if changed else None
        if proc is not None:
            # Its keys' leases stay (their checkpoints are current): the next call of
            # each loads it into a process of the new code.
            proc.kill("redeployed with new code")
        if w.name not in self.specs:
            self._installed_at[w.name] = time.monotonic()
        self.specs[w.name] = w
        self.core[w.name] = spec
        self._wake_loops()

    def _uninstall(self, name: str) -> None:
        proc = self.actor_procs.pop(name, None)
        if proc is not None:
            proc.kill("service removed")
        for k in [k for k in self.leases if k[0] == name]:
            del self.leases[k]
        self.specs.pop(name, None)
        self.core.pop(name, None)
        self.scale.pop(name, None)
        self._calls.pop(name, None)
        self._start_fails.pop(name, None)
        self._start_errors.pop(name, None)
        if name in self.replicas:
            self._stop_replica(name, "service removed")

    async def _notify_all(self, req: NotifyRequest) -> None:
        async def notify(n: str) -> None:
            with contextlib.suppress(RpcError, ValueError, TimeoutError):
                await call_node(self.agent, n, api.NOTIFY, req, lane=LANE_NOTIFY,
                                timeout_s=self.cfg.status_timeout_s * 2)

        await asyncio.gather(*(notify(m.name) for m in self._alive()
                               if m.name != self.agent.name))

    def _rpc_notify(self, req: NotifyRequest) -> None:
        if (req.spec is None) == (req.removed is None):
            raise ValueError("svc.notify carries one of spec and removed")
        if req.removed is not None:
            self._uninstall(req.removed)
        elif req.spec is not None:
            self._install(req.spec)

    async def _rpc_remove(self, req: RemoveRequest) -> RemoveReply:
        name = req.name
        index = await self.local.kv_get(INDEX_KEY)
        names = set(_names_decoder.decode(index)) if index else set()
        if name not in names and name not in self.specs:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown service {name!r}")
        names.discard(name)
        await self.local.kv_put(INDEX_KEY, _spec_encoder.encode(sorted(names)))
        with contextlib.suppress(ValueError, RpcError):
            await self.local.kv_delete(SPEC_PREFIX + name)
        self._uninstall(name)
        await self._notify_all(NotifyRequest(removed=name))
        return RemoveReply(removed=name)

    async def _load_from_kv(self) -> None:
        index = await self.local.kv_get(INDEX_KEY)
        if index is None:
            return
        listed = set(_names_decoder.decode(index))
        for name in [n for n in self.specs if n not in listed and
                     time.monotonic() - self._installed_at.get(n, 0.0) > 30.0]:
            self._uninstall(name)  # removed while this node missed the notice
        for name in sorted(listed):
            if name in self.specs:
                continue
            raw = await self.local.kv_get(SPEC_PREFIX + name)
            if not raw:
                continue
            try:
                self._install(_spec_decoder.decode(raw))
            except msgspec.DecodeError as e:
                self.agent.log_limited("service_spec_unreadable", service=name,
                                       error=str(e)[:200])

    # ------------------------------------------------------------------ replicas

    async def _reconcile_loop(self) -> None:
        loaded_at = -math.inf
        wait_s = self.cfg.reconcile_interval_s
        while not self._stopping:
            await self._reconcile_wakeup.wait(wait_s)
            wait_s = self.cfg.reconcile_interval_s
            if self.agent.membership is None:
                continue
            now = time.monotonic()
            if now - loaded_at >= self.cfg.kv_reload_s:
                loaded_at = now
                try:
                    await self._load_from_kv()
                except Exception as e:
                    self.agent.log_limited("service_kv_load_failed", error=str(e)[:200])
            try:
                self._reconcile(now)
            except Exception as e:  # never let the loop die
                self.agent.log_limited("service_reconcile_failed", error=str(e)[:300])
            wait_s = self._loop_wait_s(self.cfg.reconcile_interval_s,
                                       loaded_at + self.cfg.kv_reload_s)

    def _step_autoscalers(self, now: float, tables: dict[str, StatusReply]) -> None:
        for name, spec in self.core.items():
            auto = spec.autoscale
            if auto is None:
                continue
            state = self.scale.get(name)
            if state is None:
                peers = []
                for n, t in tables.items():
                    sw = t.scale.get(name)
                    if n != self.agent.name and sw is not None:
                        up, down = sw.above_age_s, sw.below_age_s
                        peers.append(ScaleState(sw.desired, None if up is None else now - up,
                                                None if down is None else now - down))
                state = adopt_desired(auto, peers)
            inflight = sum(t.replicas[name].inflight for t in tables.values()
                           if name in t.replicas)
            running = sum(1 for t in tables.values()
                          if name in t.replicas and t.replicas[name].ready
                          and t.replicas[name].healthy)
            self.scale[name] = autoscale_step(auto, self.cfg.decisions, state, now,
                                              float(inflight), running)

    def _reconcile(self, now: float) -> None:
        if self._stopping:
            return
        for name in [n for n in self.replicas if n not in self.specs]:
            self._stop_replica(name, "service removed")
        if not self.core:
            return
        tables = self._tables()
        self._step_autoscalers(now, tables)
        tables[self.agent.name] = self._status(now)
        view = self._view()
        sources = self._call_sources(tables)
        current = {n: [node for node, t in tables.items() if n in t.replicas]
                   for n in self.core}
        # Actors run where their keys' owners are (``_actor_invoke``), not as replicas.
        counts = [(self.core[n], self._count(n, tables)) for n in sorted(self.core)
                  if not self.specs[n].actor]
        counts_by_name = [(spec.name, c) for spec, c in counts]
        me = self.agent.name
        want = replicas_wanted(me, counts, view, sources, current)
        mine = self.agent.m.members.get(me)
        if mine is None or mine.state > State.SUSPECT:
            want = set()  # leaving: start nothing (the node stops its replicas)
        # Start nothing for a service until one whole round of status polls began after
        # it was installed here: with a partial table a node places on partial counts.
        want = {n for n in want if n in self.replicas or
                self._installed_at.get(n, math.inf) <= self._round_started_at}
        for name in want:
            r = self.replicas.get(name)
            if r is not None and r.dead:
                self.replicas.pop(name)
                self._died_at[name] = now
                r = None
            backoff = min(self.cfg.restart_backoff_max_s, self.cfg.restart_backoff_s *
                          2 ** min(self._start_fails.get(name, 0), 16))
            if r is None and now - self._died_at.get(name, -math.inf) >= backoff:
                self.agent.log("info", "service_replica_starting", service=name,
                               count=dict(counts_by_name).get(name, 0),
                               current=sorted(current.get(name, [])),
                               statuses={n: round(now - at, 2)
                                         for n, (_, at) in self.statuses.items()})
                self._start_replica(name)
        for name in [n for n in self.replicas if n not in want]:
            r = self.replicas[name]
            if r.dead:
                self.replicas.pop(name)
                continue
            ready = [node for node, t in tables.items()
                     if name in t.replicas and t.replicas[name].ready
                     and t.replicas[name].healthy]
            placement = place_service(self.core[name], view, sources.get(name, {}),
                                      self._count(name, tables), current=current[name])
            if not keep_replica(me, placement, ready):
                self._stop_replica(name, "placed elsewhere")

    async def _health_loop(self) -> None:
        wait_s = self.cfg.service_health_interval_s
        while not self._stopping:
            await self._health_wakeup.wait(wait_s)
            wait_s = self._loop_wait_s(self.cfg.service_health_interval_s)
            checks = []
            for name, r in list(self.replicas.items()):
                w = self.specs.get(name)
                if w is not None and w.health is not None:
                    checks.append(r.check_health(w.health))
            if checks:
                results = await asyncio.gather(*checks, return_exceptions=True)
                for e in results:
                    if isinstance(e, Exception):
                        self.agent.log_limited("service_health_loop_failed",
                                               error=str(e)[:300])

    def _start_replica(self, name: str) -> None:
        w = self.specs[name]
        r = Replica(self, name, w.code_id)
        self.replicas[name] = r

        async def run() -> None:
            try:
                code = self.code.get(w.code_id)
                if code is None:
                    code = await self.local.read_object(w.code_id)
                    self.code[w.code_id] = code
                await r.start(code)
                self.stats["replica_starts"] += 1
                self._start_fails.pop(name, None)
                self._start_errors.pop(name, None)
                self.agent.log("info", "service_replica_ready", service=name,
                               pid=r.proc.pid if r.proc else 0)
            except asyncio.CancelledError:
                r.kill("cancelled")
                raise
            except Exception as e:
                self.stats["replica_start_failed"] += 1
                self._start_fails[name] = self._start_fails.get(name, 0) + 1
                self._start_errors[name] = str(e)[:api.MAX_ERROR_CHARS]
                self.agent.log_limited("service_replica_start_failed", service=name,
                                       error=str(e)[:500])
                r.kill(f"start failed: {e}")

        r.task = asyncio.get_running_loop().create_task(run())

    def _stop_replica(self, name: str, why: str) -> None:
        r = self.replicas.pop(name, None)
        if r is not None:
            if r.task is not None and not r.task.done():
                r.task.cancel()
            r.kill(why)

    # ------------------------------------------------------------------ calls

    async def _rpc_invoke(self, req: InvokeRequest) -> InvokeReply:
        w = self.specs.get(req.service)
        if w is not None and w.actor:
            if req.actor_key is None:
                return InvokeReply("not-here", message=f"{req.service!r} is an actor: a "
                                   "call names a key")
            return await self._actor_invoke(req)
        r = self.replicas.get(req.service)
        if r is None or not r.ready or r.dead or not r.health.healthy:
            return InvokeReply("not-here", message=f"{self.agent.name} runs no ready "
                               f"replica of {req.service!r}")
        return await r.call(req.method, req.args, req.encoding, req.timeout_s)

    def _replica_views(self, name: str, tables: dict[str, StatusReply]) -> list[ReplicaView]:
        now = time.monotonic()
        members = self.agent.m.members
        out = []
        for node, t in tables.items():
            rs = t.replicas.get(name)
            m = members.get(node)
            if rs is None or m is None:
                continue
            # Alive or suspect, as every plane counts a member; a suspect node that is
            # really gone is quarantined by the first call that cannot reach it.
            healthy = rs.ready and rs.healthy and m.state <= State.SUSPECT and \
                now >= self._bad.get(node, -math.inf)
            coord = self.agent.m.coordinate() if node == self.agent.name else m.coord
            out.append(ReplicaView(node, m.meta.region, m.meta.zone, rs.inflight, healthy,
                                   coord))
        return out

    async def _rpc_call(self, req: CallRequest) -> CallReply:
        name = req.service
        w = self.specs.get(name)
        if w is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown service {name!r}")
        if req.method not in w.methods:
            raise ApiError(ErrorCode.NOT_FOUND,
                           f"service {name!r} has no method {req.method!r} (it has: "
                           f"{', '.join(w.methods[:20])})")
        if w.actor != (req.actor_key is not None):
            raise ApiError(ErrorCode.INVALID,
                           f"service {name!r} is an actor: a call names a key "
                           "(mesh.actor(name, key))" if w.actor else
                           f"service {name!r} is not an actor: a call names no key")
        key = self.call_metrics.key(name, req.method)
        self.call_metrics.started(key)
        t0 = time.monotonic()
        outcome = "cancelled"
        try:
            reply = await (self._route_actor_call(req) if w.actor else self._route_call(req))
            outcome = reply.outcome
            return reply
        finally:
            self.call_metrics.ended(key, outcome, time.monotonic() - t0)

    async def _route_call(self, req: CallRequest) -> CallReply:
        name = req.service
        spec = self.core[name]
        self._note_call(name)
        my_region = self.agent.meta.region
        my_coord = self.agent.m.coordinate()
        cfg = self.cfg.decisions
        tried: list[str] = []
        retries = redirects = 0
        tables = self._tables()
        node = route_call(
            my_region, self._replica_views(name, tables), self.rng, caller_coord=my_coord)
        if node is None:
            msg = f"service {name!r}: no healthy replica to send {req.method!r} to"
            p = self._placement(name, tables)
            if isinstance(p, Unplaceable):
                msg += f": it cannot be placed: rule {p.rule}: {p.message}"
            else:
                errs = [f"{n}: {t.errors[name]}" for n, t in sorted(tables.items())
                        if name in t.errors]
                if errs:
                    msg += "; its replicas fail to start: " + errs[0][:1000]
            self.stats["calls_no_replica"] += 1
            now = time.monotonic()
            self.agent.log_limited(
                "service_no_replica", service=name,
                statuses={n: round(now - at, 2) for n, (_, at) in self.statuses.items()},
                holders=sorted(n for n, t in tables.items() if name in t.replicas),
                quarantined=sorted(n for n, until in self._bad.items() if until > now))
            return CallReply("no-replica", message=msg)
        attempts = 0
        while True:
            attempts += 1
            tried.append(node)
            lost = False
            reply: InvokeReply | None = None
            try:
                reply = await self._forward(node, req)
            except RemoteError as e:
                if e.code in (ErrorCode.UNKNOWN_METHOD, ErrorCode.STARTING):
                    reply = InvokeReply("not-here", message=str(e))
                else:
                    lost = True
            except (RpcError, TimeoutError) as e:
                if not isinstance(e, RpcError) or e.unreachable:
                    self._bad[node] = time.monotonic() + self.cfg.failed_node_quarantine_s
                lost = True
            if reply is not None and reply.outcome in ("crashed", "timeout"):
                lost = True
            region = self._region_of(node)
            if not lost and reply is not None and reply.outcome != "not-here":
                return self._answered(reply, node, region, attempts)
            views = self._replica_views(name, self._tables())
            decision: Retry | CallFailed
            if lost:
                decision = failover(spec, req.method, retries, tried, my_region, views,
                                    self.rng, cfg, caller_coord=my_coord)
                retries += 1
            else:
                decision = redirect(spec, req.method, redirects, tried, my_region, views,
                                    self.rng, cfg, caller_coord=my_coord)
                redirects += 1
            if isinstance(decision, CallFailed):
                self.stats[f"calls_{decision.code}"] += 1
                why = "" if reply is None else f" ({reply.outcome}: {reply.message})"
                return CallReply(decision.code,  # type: ignore[arg-type]
                                 message=decision.message + why, node=node, region=region,
                                 attempts=attempts)
            self.stats["calls_rerouted"] += 1
            node = decision.node

    def _answered(self, reply: InvokeReply, node: str, region: str,
                  attempts: int) -> CallReply:
        """The caller's reply to a call ``node`` answered (done, raised, ...), counted."""
        self.stats[f"calls_{reply.outcome}"] += 1
        return CallReply(reply.outcome, value=reply.value, message=reply.message,
                         traceback=reply.traceback, node=node, region=region,
                         attempts=attempts)

    def _region_of(self, node: str) -> str:
        m = self.agent.m.members.get(node)
        return "" if m is None else m.meta.region

    async def _forward(self, node: str, req: CallRequest,
                       exclude: list[str] | None = None) -> InvokeReply:
        inv = InvokeRequest(service=req.service, method=req.method, args=req.args,
                            encoding=req.encoding, timeout_s=req.timeout_s,
                            caller_region=self.agent.meta.region, actor_key=req.actor_key,
                            exclude=list(exclude or ())[:64])
        if node == self.agent.name:
            return await self._rpc_invoke(inv)
        m = self.agent.m.members.get(node)
        if m is None:
            raise RpcError(f"{node}: not a member", unreachable=True)
        delay = self.agent.delay_to(m.addr)
        if delay:
            await asyncio.sleep(delay)
        for attempt in range(self.cfg.busy_retries + 1):
            conn = self.agent.peers.checkout(node, m.addr)
            conn.timeout = req.timeout_s + self.cfg.forward_slack_s
            try:
                out = await conn.request(api.INVOKE, inv)
                break
            except RpcError as e:
                # "No connection slot free" is the node's answer before any request is
                # read (transport/tls.py NodeBusy): the call did not run; ask again.
                if attempt == self.cfg.busy_retries or _BUSY not in str(e):
                    raise
                self.stats["forward_node_busy"] += 1
            finally:
                self.agent.peers.checkin(node, conn)
            await asyncio.sleep(0.05 * 2 ** attempt)
        if delay:
            await asyncio.sleep(delay)
        return out

    # ------------------------------------------------------------------ actors

    async def _route_actor_call(self, req: CallRequest) -> CallReply:
        """An actor call, at the node a client asked: to the key's owner in this view
        (``actor_owner``), leaving out the nodes it could not reach; "not here" (the
        owner's view differs, or it was fenced) is routed again, a lost owner follows
        the services' failover rule (an idempotent method is retried once)."""
        name, key = req.service, req.actor_key
        assert key is not None
        spec = self.core[name]
        self._note_call(name)
        cfg = self.cfg.decisions
        now = time.monotonic()
        exclude = sorted(n for n, until in self._bad.items() if until > now)
        attempts = retries = redirects = 0
        deadline = now + req.timeout_s
        while True:
            owner = actor_owner(spec, key, self._view(), exclude)
            if isinstance(owner, Unplaceable):
                return CallReply("no-replica", message=f"actor {name!r} key {key!r}: no "
                                 f"node may own it: rule {owner.rule}: {owner.message}",
                                 attempts=attempts)
            attempts += 1
            lost = False
            reply: InvokeReply | None = None
            try:
                reply = await self._forward(owner, req, exclude)
            except RemoteError as e:
                if e.code in (ErrorCode.UNKNOWN_METHOD, ErrorCode.STARTING):
                    reply = InvokeReply("not-here", message=str(e))
                else:
                    lost = True
            except (RpcError, TimeoutError) as e:
                if isinstance(e, RpcError) and e.unreachable:
                    # Never reached it: the call did not run there. Its next owner.
                    self._bad[owner] = time.monotonic() + self.cfg.failed_node_quarantine_s
                    exclude = sorted({*exclude, owner})
                    reply = InvokeReply("not-here", message=f"{owner} unreachable: {e}")
                else:
                    lost = True
            if reply is not None and reply.outcome in ("crashed", "timeout"):
                lost = True
            region = self._region_of(owner)
            if not lost and reply is not None and reply.outcome != "not-here":
                return self._answered(reply, owner, region, attempts)
            why = "" if reply is None else f" ({reply.outcome}: {reply.message})"
            if lost:
                failed = actor_lost(spec, key, req.method, owner, retries, cfg)
                if failed is not None:
                    self.stats[f"calls_{failed.code}"] += 1
                    return CallReply(failed.code,  # type: ignore[arg-type]
                                     message=failed.message + why, node=owner,
                                     region=region, attempts=attempts)
                retries += 1
                self._bad[owner] = time.monotonic() + self.cfg.failed_node_quarantine_s
                exclude = sorted({*exclude, owner})
                continue
            redirects += 1
            left = deadline - time.monotonic()
            if redirects > self.cfg.actor_max_redirects or left <= 0:
                self.stats["calls_no-replica"] += 1
                return CallReply("no-replica", message=f"actor {name!r} key {key!r}: no "
                                 f"owner took {req.method!r} after {attempts} tries" + why,
                                 node=owner, region=region, attempts=attempts)
            self.stats["calls_rerouted"] += 1
            await asyncio.sleep(min(left, 0.05 * 2 ** min(redirects, 5)))

    async def _actor_proc(self, name: str) -> Replica:
        """This node's process of actor service ``name``, started on first use."""
        lock = self._actor_start.setdefault(name, asyncio.Lock())
        async with lock:
            r = self.actor_procs.get(name)
            if r is not None and not r.dead and r.ready:
                return r
            w = self.specs[name]
            r = Replica(self, name, w.code_id, self.cfg.actors.max_state_bytes)
            self.actor_procs[name] = r
            code = self.code.get(w.code_id)
            if code is None:
                code = await self.local.read_object(w.code_id)
                self.code[w.code_id] = code
            try:
                await r.start(code)
            except BaseException:
                r.kill("start failed")
                raise
            self.stats["actor_process_starts"] += 1
            return r

    def _lease(self, name: str, key: str) -> _Lease:
        k = (name, key)
        lease = self.leases.pop(k, None) or _Lease()
        self.leases[k] = lease  # most recently called last
        over = len(self.leases) - self.cfg.actors.max_keys_per_node
        for old in list(self.leases)[:max(0, over)]:
            held = self.leases[old]
            if held.lock.locked():
                continue
            del self.leases[old]
            if held.loaded_in is not None:
                held.loaded_in.drop(old[1])
            self.stats["actor_keys_evicted"] += 1
        return lease

    async def _actor_invoke(self, req: InvokeRequest) -> InvokeReply:
        """Serve one call of an actor key this node owns (``core/actors.py``): claim the
        key from its checkpoint if this node holds no lease on it, load the instance into
        the process, run the call, and checkpoint the state with a conditional put naming
        this node's last version; only then is the call answered ``done``."""
        name, key = req.service, req.actor_key
        assert key is not None
        me = self.agent.name
        spec = self.core[name]
        owner = actor_owner(spec, key, self._view(), req.exclude)
        if owner != me:
            return InvokeReply("not-here", message=f"{me} does not own actor key {key!r} "
                               f"of {name!r} (its view names {owner})")
        lease = self._lease(name, key)
        kv_key = actor_kv_key(name, key)
        acfg = self.cfg.actors
        async with lease.lock:
            try:
                proc = await self._actor_proc(name)
            except Exception as e:
                return InvokeReply("crashed", message=f"the actor's process did not start: "
                                   f"{str(e)[:500]}")
            if lease.ck is None:
                for _ in range(acfg.claim_retries):
                    try:
                        got = await self.agent.call_local(
                            obj_api.KV_VERSIONS, obj_api.KvKeyRequest(key=kv_key))
                        loaded = pick_checkpoint((v.ts, v.value) for v in got.versions)
                        mine = claim(loaded.checkpoint, me)
                        put = await self.agent.call_local(obj_api.KV_PUT, obj_api.KvPutRequest(
                            key=kv_key, value=encode_checkpoint(mine),
                            expected=list(loaded.expected)))
                    except ApiError as e:
                        if e.code is ErrorCode.CONFLICT:
                            self.stats["actor_claim_conflicts"] += 1
                            continue
                        return InvokeReply("busy", message=f"cannot claim actor key {key!r}:"
                                           f" {str(e)[:500]}")
                    except (ValueError, RpcError) as e:
                        return InvokeReply("busy", message=f"cannot claim actor key {key!r}:"
                                           f" {str(e)[:500]}")
                    lease.ck, lease.version, lease.loaded_in = mine, put.ts, None
                    self.stats["actor_claims"] += 1
                    self.agent.log("info", "actor_key_claimed", service=name, key=key[:200],
                                   seq=mine.seq, epoch=mine.epoch)
                    break
                else:
                    return InvokeReply("not-here", message=f"actor key {key!r}: claims "
                                       f"conflicted {acfg.claim_retries} times in a row")
            assert lease.ck is not None
            if lease.loaded_in is not proc:
                got_load = await proc.load(key, lease.ck.state or b"", req.timeout_s)
                if got_load.outcome != "done":
                    return got_load
                lease.loaded_in = proc
            states: list[bytes] = []
            reply = await proc.call(req.method, req.args, req.encoding, req.timeout_s,
                                    key=key, state_out=states)
            if reply.outcome != "done" or not states:
                lease.loaded_in = None  # the process dropped the instance: reload it
                return reply
            try:
                nxt = after_call(lease.ck, me, states[0], acfg)
                put = await self.agent.call_local(obj_api.KV_PUT, obj_api.KvPutRequest(
                    key=kv_key, value=encode_checkpoint(nxt), expected=[lease.version]))
            except (ValueError, RpcError) as e:
                proc.drop(key)
                lease.ck, lease.version, lease.loaded_in = None, "", None
                if isinstance(e, ApiError) and e.code is ErrorCode.CONFLICT:
                    self.stats["actor_fenced"] += 1
                    self.agent.log("info", "actor_key_fenced", service=name, key=key[:200])
                    return InvokeReply("not-here", message=f"fenced: another node claimed "
                                       f"actor key {key!r}; the call did not count")
                self.stats["actor_checkpoint_failed"] += 1
                return InvokeReply("crashed", message=f"the call ran but its checkpoint "
                                   f"failed ({str(e)[:300]}): it may or may not count")
            lease.ck, lease.version = nxt, put.ts
            return reply

    # ------------------------------------------------------------------ list

    def view(self) -> dict[str, Any]:
        """What the dashboard shows of the services (``/api/v1/services``): per service its
        replicas per node (state, in flight, calls, p50/p99), the calls in flight on them
        and per source region, from this node's latest status tables."""
        out = []
        for s in self._rpc_list(Empty()).services:
            reps = []
            for r in s.replicas:
                state = "starting" if not r.ready else "ready" if r.healthy else "unhealthy"
                reps.append({"node": r.node, "region": r.region, "state": state,
                             "inflight": r.inflight, "calls": r.calls, "failed": r.failed,
                             "p50_ms": r.p50_ms, "p99_ms": r.p99_ms})
            out.append({
                "name": s.spec.name, "placement": s.spec.placement, "desired": s.desired,
                "health": s.spec.health, "replicas": reps,
                "inflight": sum(r.inflight for r in s.replicas),
                "calls_by_region": dict(s.calls_by_region), "unplaceable": s.unplaceable})
        return {"services": out}

    def _rpc_list(self, _: Empty) -> ListReply:
        tables = self._tables()
        sources = self._call_sources(tables)
        out = []
        for name in sorted(self.specs):
            reps = [ReplicaInfo(**msgspec.structs.asdict(t.replicas[name]), node=node,
                                region=t.region)
                    for node, t in sorted(tables.items()) if name in t.replicas]
            p = self._placement(name, tables)
            out.append(ServiceInfo(
                spec=self.specs[name], desired=self._count(name, tables),
                placed=list(p.nodes) if isinstance(p, ServicePlacement) else [],
                replicas=reps, calls_by_region=sources.get(name, {}),
                unplaceable="" if isinstance(p, ServicePlacement)
                else f"rule {p.rule}: {p.message}",
                errors={node: t.errors[name] for node, t in sorted(tables.items())
                        if name in t.errors}))
        return ListReply(services=out)
