"""Services: where a service's replicas run, which replica a call goes to, how many replicas
there should be, and what happens to a call whose replica died. Decisions only.

A service is a class deployed as replicas (issue #22): each replica loads its model once
and answers calls. Nothing here runs a replica or sends a call; the simulator
(``sim/services.py``) drives these functions today, and the runtime will drive the same
ones. Everything is a pure function of its inputs (the membership view, gossiped call
counts and in-flight counts, ``now``, a ``random.Random`` handed in), so every node
computes the same placement from the same view, with no controller and no leader.
The anchors and where we depart from them:

- Placement by call sources (no anchor places replicas by where callers are, across
  sites, without a controller; Ray Serve's controller and Nomad's scheduler are central).
  ``place_service`` first applies the hard rules with ``core.scheduling.feasible`` (the
  residency rule, the placement mode, labels, resources), so a refusal names the same
  rules a task's does and is returned as an ``Unplaceable`` value. Then it splits the
  replica count between regions: ``central`` puts them all in one region (the named
  one, else the region with the most feasible nodes); ``near-caller`` and a region list
  split them by the calls each region made (gossiped counts), at least one per calling
  region while the count lasts, the rest by highest averages (D'Hondt), at most one
  replica per node. Calls from a region with no feasible node count for the feasible
  region nearest to it by Vivaldi distance (the smallest estimated RTT between any two
  of their nodes). With no calls at all the replicas stay in the regions that hold
  them, and with none held they spread over the allowed regions.
  Placement is sticky: a region keeps a replica it holds unless another region's calls
  beat its own by more than ``stickiness``, and a central service keeps its region while
  that region still has room; so two regions with nearly equal calls do not trade a
  replica on every gossip round. Within a region the nodes are picked by
  ``core.placement.replica_set`` (rendezvous hashing spread over zones), so a node
  joining or leaving moves at most one replica of a region and placement shares the
  data plane's zone spreading.
- Free slots are not an input to placement. A replica occupies its node's slots, so a
  rule that preferred free nodes would move a replica off the node it just filled;
  resources are checked against each node's total capacity, as for tasks.
- Routing after the Mitzenmacher power of two choices ("The Power of Two Choices in
  Randomized Load Balancing", 2001), as Finagle and Envoy apply it to replicas:
  ``route_call`` keeps the healthy replicas of the caller's region (any other region
  only when none is healthy there, then the nearest such region by Vivaldi distance),
  draws two of them and sends the call to the one with fewer calls in flight.
- Autoscaling with hysteresis and dwell, like the Kubernetes horizontal autoscaler's
  tolerance and stabilisation window: ``autoscale_step`` raises the desired count once
  the mean in-flight calls per replica has stayed above ``target_inflight`` for
  ``scale_up_dwell_s``, and lowers it by one once it has stayed below
  ``target_inflight * low_water_fraction`` for the longer ``scale_down_dwell_s``; always
  within ``[min_replicas, max_replicas]``. Every node steps its own on the gossiped
  counts and gossips the result; placement uses the count most nodes gossip
  (``agreed_count``), so a node whose autoscaler is a step apart does not place with its
  own; a node that starts takes its peers' state (``adopt_desired``).
- Failover (``failover``): a call whose replica died (its node left the view) or did not
  answer in time is retried once on another replica when its method is declared
  idempotent, else it fails with ``replica-lost`` saying it may have run. A replica that
  answers "not here" (the caller's view was stale) did not run the call, so that call is
  re-routed whatever its method, at most ``max_redirects`` times.

- Health (``health_step``): the membership says whether a replica's node is alive; a
  service's own health method, when its class names one, says whether the replica is.
  A replica whose health method fails or does not answer ``health_failures`` times in a
  row is unhealthy: ``route_call`` skips it (``ReplicaView.healthy``) and its node
  restarts it; one success resets the count, as Consul's and Kubernetes' checks count
  consecutive failures before they act.

Actors (one instance per key, state checkpointed in the KV) are ``core/actors.py``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from meshscale.core.placement import Residency, replica_set
from meshscale.core.scheduling import (
    Central,
    DataLocal,
    InRegions,
    NodeState,
    PlacementMode,
    Resources,
    SchedulingError,
    TaskSpec,
    feasible,
)
from meshscale.core.vivaldi import Coordinate, estimate_rtt

__all__ = [
    "CENTRAL",
    "ERR_NO_REPLICA",
    "ERR_REPLICA_LOST",
    "ERR_RETRIES_EXHAUSTED",
    "MAX_SERVICE_REPLICAS",
    "NEAR_CALLER",
    "Autoscale",
    "CallFailed",
    "HealthState",
    "ReplicaView",
    "Retry",
    "ScaleState",
    "ServiceConfig",
    "ServicePlacement",
    "ServiceSpec",
    "ServiceSpecError",
    "Unplaceable",
    "adopt_desired",
    "agreed_count",
    "autoscale_step",
    "failover",
    "health_step",
    "keep_replica",
    "place_service",
    "redirect",
    "replicas_wanted",
    "route_call",
    "service_key",
]

NEAR_CALLER = "near-caller"
CENTRAL = "central"
MAX_SERVICE_REPLICAS = 64
"""Largest replica count a service may ask for (placement is O(R * N))."""

ERR_NO_REPLICA = "no-replica"
"""No healthy replica the call could be sent to (none placed, all dead or tried)."""
ERR_REPLICA_LOST = "replica-lost"
"""The call's replica died or stopped answering and its method is not declared
idempotent: not retried, and it may or may not have run."""
ERR_RETRIES_EXHAUSTED = "retries-exhausted"
"""An idempotent call lost its replica again after its one retry."""


class ServiceSpecError(ValueError):
    """A service spec that cannot be deployed; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Autoscale:
    """Replica count follows demand between ``min_replicas`` and ``max_replicas``,
    aiming at ``target_inflight`` calls in flight per replica."""

    min_replicas: int
    max_replicas: int
    target_inflight: float

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= MAX_SERVICE_REPLICAS:
            raise ServiceSpecError(
                "autoscale.min_replicas",
                f"must be between 1 and {MAX_SERVICE_REPLICAS}, got {self.min_replicas}")
        if not 1 <= self.max_replicas <= MAX_SERVICE_REPLICAS:
            raise ServiceSpecError(
                "autoscale.max_replicas",
                f"must be between 1 and {MAX_SERVICE_REPLICAS}, got {self.max_replicas}")
        if self.min_replicas > self.max_replicas:
            raise ServiceSpecError(
                "autoscale", f"min_replicas {self.min_replicas} is greater than "
                             f"max_replicas {self.max_replicas}")
        if not (math.isfinite(self.target_inflight) and self.target_inflight > 0):
            raise ServiceSpecError(
                "autoscale.target_inflight",
                f"must be a finite number > 0, got {self.target_inflight!r}")


@dataclass(frozen=True)
class ServiceSpec:
    """What a service asks of the mesh. ``placement`` is ``"near-caller"``,
    ``"central"`` (in ``central_region``, else the region with the most feasible nodes)
    or a set of region names; exactly one of ``replicas`` and ``autoscale`` (neither:
    one replica)."""

    name: str
    placement: str | frozenset[str] = NEAR_CALLER
    replicas: int | None = None
    autoscale: Autoscale | None = None
    resources: Resources = field(default_factory=Resources)
    residency: Residency | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    idempotent: frozenset[str] = frozenset()
    """Methods that may run twice: retried once on another replica when theirs dies."""
    central_region: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 256:
            raise ServiceSpecError("name", f"must be 1..256 characters, got {self.name!r}")
        if "\0" in self.name:
            raise ServiceSpecError("name", f"{self.name!r} contains a NUL character")
        p = self.placement
        if isinstance(p, str):
            if p not in (NEAR_CALLER, CENTRAL):
                raise ServiceSpecError(
                    "placement", f"unknown placement {p!r}: use {NEAR_CALLER!r}, "
                                 f"{CENTRAL!r} or a set of region names")
        else:
            try:
                regions = frozenset(p)
            except TypeError:
                raise ServiceSpecError(
                    "placement", f"unknown placement {p!r}: use {NEAR_CALLER!r}, "
                                 f"{CENTRAL!r} or a set of region names") from None
            if not regions or not all(isinstance(r, str) and r for r in regions):
                raise ServiceSpecError(
                    "placement", "a region list needs at least one non-empty region name")
            object.__setattr__(self, "placement", regions)
        if self.central_region is not None and p != CENTRAL:
            raise ServiceSpecError("central_region", "only a central service names one")
        if self.replicas is not None and self.autoscale is not None:
            raise ServiceSpecError("replicas", "give either replicas or autoscale, not both")
        if self.replicas is not None and not 1 <= self.replicas <= MAX_SERVICE_REPLICAS:
            raise ServiceSpecError(
                "replicas", f"must be between 1 and {MAX_SERVICE_REPLICAS}, "
                            f"got {self.replicas}")
        if self.resources.cpus <= 0:
            raise ServiceSpecError("resources.cpus", "a replica needs more than 0 cpus")
        if isinstance(self.idempotent, str):
            raise ServiceSpecError(
                "idempotent", f"takes a set of method names, not one string "
                              f"({self.idempotent!r})")
        object.__setattr__(self, "idempotent", frozenset(self.idempotent))
        if self.central_region == "":
            raise ServiceSpecError("central_region", "must be a non-empty region name")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def bounds(self) -> tuple[int, int]:
        """The replica counts allowed: ``(n, n)`` for a fixed count."""
        if self.autoscale is not None:
            return self.autoscale.min_replicas, self.autoscale.max_replicas
        n = self.replicas if self.replicas is not None else 1
        return n, n

    def is_idempotent(self, method: str) -> bool:
        return method in self.idempotent

    def mode(self) -> PlacementMode:
        if self.placement == NEAR_CALLER:
            return DataLocal()
        if self.placement == CENTRAL:
            return DataLocal() if self.central_region is None else Central(self.central_region)
        assert isinstance(self.placement, frozenset)
        return InRegions(self.placement)


@dataclass(frozen=True)
class ServiceConfig:
    """Knobs of the service decisions; durations in seconds."""

    scale_up_dwell_s: float = 2.0
    """Mean in-flight per replica above target this long before the count goes up."""
    scale_down_dwell_s: float = 10.0
    """Below target * ``low_water_fraction`` this long before the count goes down by one."""
    low_water_fraction: float = 0.5
    max_retries: int = 1
    """Retries of an idempotent call whose replica was lost (the issue's rule: once)."""
    max_redirects: int = 3
    """Re-routes of a call answered "not here" (never ran) before it fails."""
    health_failures: int = 3
    """Health checks failed or unanswered in a row before a replica is unhealthy."""

    def __post_init__(self) -> None:
        for name in ("scale_up_dwell_s", "scale_down_dwell_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if not 0.0 <= self.low_water_fraction < 1.0:
            raise ValueError(f"low_water_fraction must be in [0, 1), got "
                             f"{self.low_water_fraction!r}")
        if self.max_retries < 0 or self.max_redirects < 0:
            raise ValueError("max_retries and max_redirects must be >= 0")
        if self.health_failures < 1:
            raise ValueError(f"health_failures must be >= 1, got {self.health_failures!r}")


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class ServicePlacement:
    """Where a service's replicas run: ``nodes`` (sorted), ``wanted`` of them asked for;
    fewer when fewer feasible nodes exist (``short``)."""

    service: str
    nodes: tuple[str, ...]
    wanted: int

    @property
    def short(self) -> int:
        return self.wanted - len(self.nodes)


@dataclass(frozen=True)
class Unplaceable:
    """No node may run a replica: ``rule`` is ``nodes``, ``residency``, ``mode``,
    ``labels`` or ``resources`` (as ``core.scheduling.feasible`` names them)."""

    service: str
    rule: str
    message: str


def service_key(name: str) -> str:
    """The rendezvous key of a service's replicas."""
    return f"service\0{name}"


def place_service(
    spec: ServiceSpec,
    nodes: Iterable[NodeState],
    call_sources: Mapping[str, int],
    count: int,
    *,
    current: Collection[str] = (),
    stickiness: float = 0.25,
) -> ServicePlacement | Unplaceable:
    """The nodes that run ``count`` replicas of ``spec``, from the view ``nodes`` and the
    calls per caller region ``call_sources``. The same inputs in any order give the same
    answer. See the module docstring for the rule.

    ``current`` names the nodes that run a replica now (gossiped, so every node has the
    same set): a region keeps the replicas it holds unless another region's calls beat
    its own by more than ``stickiness`` (a fraction), and a central service stays in its
    region while that region can hold as many replicas as the largest one could. Without
    it two regions with nearly equal calls would trade a replica on every fluctuation."""
    if not 1 <= count <= MAX_SERVICE_REPLICAS:
        raise ValueError(f"count must be between 1 and {MAX_SERVICE_REPLICAS}, got {count}")
    if not (math.isfinite(stickiness) and stickiness >= 0):
        raise ValueError(f"stickiness must be finite and >= 0, got {stickiness!r}")
    view = list(nodes)
    task = TaskSpec(
        task_id=spec.name, cpus=spec.resources.cpus,
        memory_mb=spec.resources.memory_mb, gpus=spec.resources.gpus,
        labels=dict(spec.labels), residency=spec.residency, placement=spec.mode())
    try:
        ok = feasible(task, view)
    except SchedulingError as e:
        why = str(e).replace(f"task {spec.name!r}", f"service {spec.name!r}", 1)
        return Unplaceable(spec.name, e.rule, why.replace("the task's", "the service's"))
    by_region: dict[str, list[NodeState]] = {}
    for n in ok:
        by_region.setdefault(n.region, []).append(n)
    cap = {r: len(ns) for r, ns in by_region.items()}
    at = {n.name: n.region for n in ok}
    held = Counter(at[n] for n in set(current) if n in at)
    if spec.placement == CENTRAL:
        region = min(cap, key=lambda r: (-cap[r], r))
        if held:
            home = min(held, key=lambda r: (-held[r], r))
            if cap[home] >= min(count, cap[region]):
                region = home
        quota = {region: min(count, cap[region])}
    else:
        weights = _weights(call_sources, sorted(cap), view)
        if not weights:
            # No calls: keep the regions held (weighted by their replicas), or with none
            # held spread over every allowed region.
            weights = dict(held) if held else dict.fromkeys(cap, 1)
        quota = _apportion(count, weights, cap, view, held, 1.0 + stickiness)
    key = service_key(spec.name)
    chosen: list[str] = []
    for region in sorted(quota):
        q = quota[region]
        if q:
            members = [n.member for n in by_region[region]]
            chosen += [c.name for c in replica_set(key, members, q)]
    return ServicePlacement(spec.name, tuple(sorted(chosen)), count)


def _region_coords(view: Sequence[NodeState]) -> dict[str, list[Coordinate]]:
    out: dict[str, list[Coordinate]] = {}
    for n in sorted(view, key=lambda n: n.name):
        if n.coord is not None:
            out.setdefault(n.region, []).append(n.coord)
    return out


def _region_rtt(a: str, b: str, coords: Mapping[str, list[Coordinate]]) -> float:
    """Smallest estimated RTT between a node of ``a`` and one of ``b`` (inf: unknown)."""
    if a == b:
        return 0.0
    best = math.inf
    for ca in coords.get(a, ()):
        for cb in coords.get(b, ()):
            best = min(best, estimate_rtt(ca, cb))
    return best


def _weights(call_sources: Mapping[str, int], allowed: Sequence[str],
             view: Sequence[NodeState]) -> dict[str, int]:
    """Calls per allowed region: a region's own calls plus those of the regions with no
    allowed node that are nearest to it. No calls at all: empty."""
    allowed_set = set(allowed)
    coords: dict[str, list[Coordinate]] | None = None
    w: dict[str, int] = {}
    for src in sorted(call_sources):
        calls = call_sources[src]
        if calls < 0:
            raise ValueError(f"call count of region {src!r} is negative: {calls}")
        if calls == 0:
            continue
        if src in allowed_set:
            target = src
        else:
            if coords is None:
                coords = _region_coords(view)
            c = coords
            target = min(allowed, key=lambda r: (_region_rtt(src, r, c), r))
        w[target] = w.get(target, 0) + calls
    return w


def _apportion(count: int, weights: Mapping[str, int], cap: Mapping[str, int],
               view: Sequence[NodeState], held: Mapping[str, int],
               bonus: float) -> dict[str, int]:
    """Split ``count`` replicas over regions: one per weighted region (heaviest first),
    the rest by highest averages, never more than ``cap`` per region; what the weighted
    regions cannot take goes to the others, the nearest to a weighted one filled first.
    A region's weight counts ``bonus`` times for each replica it already ``held``."""
    quota = dict.fromkeys(cap, 0)

    def weight(r: str) -> float:
        return weights[r] * (bonus if quota[r] < held.get(r, 0) else 1.0)

    order = sorted(weights, key=lambda r: (-weight(r), r))
    left = count
    for r in order:
        if left and quota[r] < cap[r]:
            quota[r] += 1
            left -= 1
    while left:
        open_ = [r for r in order if quota[r] < cap[r]]
        if not open_:
            break
        r = min(open_, key=lambda r: (-weight(r) / (quota[r] + 1), -weights[r], r))
        quota[r] += 1
        left -= 1
    if left:
        coords = _region_coords(view)
        rest = sorted((r for r in cap if r not in weights),
                      key=lambda r: (min(_region_rtt(r, w, coords) for w in order), r))
        for r in rest:
            take = min(left, cap[r])
            quota[r] += take
            left -= take
    return {r: q for r, q in quota.items() if q}


def replicas_wanted(
    me: str,
    services: Iterable[tuple[ServiceSpec, int]],
    nodes: Sequence[NodeState],
    call_sources: Mapping[str, Mapping[str, int]],
    current: Mapping[str, Collection[str]] | None = None,
) -> set[str]:
    """The services node ``me`` must run a replica of: for each (spec, desired count),
    the placement from this view; an unplaceable service runs nowhere (its deploy named
    the rule; the view may change)."""
    want: set[str] = set()
    for spec, count in services:
        p = place_service(spec, nodes, call_sources.get(spec.name, {}), count,
                          current=(current or {}).get(spec.name, ()))
        if isinstance(p, ServicePlacement) and me in p.nodes:
            want.add(spec.name)
    return want


def keep_replica(me: str, placement: ServicePlacement | Unplaceable,
                 ready: Collection[str]) -> bool:
    """Does node ``me``, which runs a replica, keep it? Yes while the placement names it;
    once it does not, still until every node the placement names has its replica ready
    (``ready``, from gossip): make before break, so a moving replica never leaves the
    service a replica short. An unplaceable service's replicas stop."""
    if isinstance(placement, Unplaceable):
        return False
    if me in placement.nodes:
        return True
    return not all(n in ready for n in placement.nodes)


# --------------------------------------------------------------------------- health


@dataclass(frozen=True)
class HealthState:
    """A replica's health checks: ``failures`` in a row so far, and whether it is
    ``healthy`` (routed to). Unhealthy stays unhealthy: the replica is restarted, and
    the new process starts from ``HealthState()``."""

    failures: int = 0
    healthy: bool = True


def health_step(state: HealthState, ok: bool, config: ServiceConfig) -> HealthState:
    """The state after one health check that passed (``ok``) or failed or timed out: a
    pass resets the count; ``health_failures`` failures in a row make it unhealthy."""
    if not state.healthy:
        return state
    if ok:
        return HealthState()
    failures = state.failures + 1
    return HealthState(failures, failures < config.health_failures)


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class ReplicaView:
    """A replica as a caller's node sees it: where, how busy (gossiped), and whether it is
    healthy (its node in the view, its replica ready and passing its health checks)."""

    node: str
    region: str
    zone: str = ""
    inflight: int = 0
    healthy: bool = True
    coord: Coordinate | None = None


def route_call(
    caller_region: str,
    replicas: Iterable[ReplicaView],
    rng: random.Random,
    *,
    caller_coord: Coordinate | None = None,
    exclude: Collection[str] = (),
) -> str | None:
    """The replica node a call from ``caller_region`` goes to, or ``None`` when no healthy
    replica outside ``exclude`` is left. Nearby first: the caller's region, else the
    region nearest ``caller_coord`` (by name without coordinates); among the nearby
    replicas, the less busy of two drawn with ``rng``."""
    seen: dict[str, ReplicaView] = {}
    for r in replicas:
        if r.healthy and r.node not in exclude:
            seen.setdefault(r.node, r)
    live = [seen[k] for k in sorted(seen)]
    if not live:
        return None
    pool = [r for r in live if r.region == caller_region]
    if not pool:
        def dist(region: str) -> float:
            if caller_coord is None:
                return math.inf
            return min((estimate_rtt(caller_coord, r.coord) for r in live
                        if r.region == region and r.coord is not None), default=math.inf)

        nearest = min({r.region for r in live}, key=lambda g: (dist(g), g))
        pool = [r for r in live if r.region == nearest]
    if len(pool) == 1:
        return pool[0].node
    a, b = rng.sample(pool, 2)
    return a.node if a.inflight <= b.inflight else b.node


@dataclass(frozen=True)
class Retry:
    """Send the call again, to ``node``."""

    node: str


@dataclass(frozen=True)
class CallFailed:
    """The call ends with this error; ``code`` is one of the ``ERR_*`` constants."""

    code: str
    message: str


def failover(
    spec: ServiceSpec,
    method: str,
    retries: int,
    tried: Collection[str],
    caller_region: str,
    replicas: Iterable[ReplicaView],
    rng: random.Random,
    config: ServiceConfig,
    *,
    caller_coord: Coordinate | None = None,
) -> Retry | CallFailed:
    """A call in flight lost its replica (the node left the view, or no answer came in
    time); ``retries`` is how many times it was already retried after such a loss and
    ``tried`` the replicas it went to. Retried on another replica only when ``method`` is
    declared idempotent and it has retries left; otherwise a stated error."""
    if not spec.is_idempotent(method):
        return CallFailed(
            ERR_REPLICA_LOST,
            f"service {spec.name!r}: the replica running {method!r} was lost; the method "
            "is not declared idempotent, so the call was not retried and may or may not "
            "have run")
    if retries >= config.max_retries:
        return CallFailed(
            ERR_RETRIES_EXHAUSTED,
            f"service {spec.name!r}: {method!r} lost its replica {retries + 1} times "
            f"(retried at most {config.max_retries})")
    node = route_call(caller_region, replicas, rng, caller_coord=caller_coord, exclude=tried)
    if node is None:
        return CallFailed(
            ERR_NO_REPLICA,
            f"service {spec.name!r}: {method!r} lost its replica and no other healthy "
            "replica is left to retry it on")
    return Retry(node)


def redirect(
    spec: ServiceSpec,
    method: str,
    redirects: int,
    tried: Collection[str],
    caller_region: str,
    replicas: Iterable[ReplicaView],
    rng: random.Random,
    config: ServiceConfig,
    *,
    caller_coord: Coordinate | None = None,
) -> Retry | CallFailed:
    """A replica node answered "not here" (it does not run the service: the caller's view
    was stale). The call never ran, so it is re-routed whatever the method, up to
    ``max_redirects`` times."""
    node = None
    if redirects < config.max_redirects:
        node = route_call(caller_region, replicas, rng, caller_coord=caller_coord,
                          exclude=tried)
    if node is None:
        return CallFailed(
            ERR_NO_REPLICA,
            f"service {spec.name!r}: no replica of it answered {method!r} "
            f"({len(tried)} tried, none runs it)")
    return Retry(node)


# --------------------------------------------------------------------------- autoscaling


@dataclass(frozen=True)
class ScaleState:
    """A service's desired replica count and since when load was above or below target."""

    desired: int
    above_since: float | None = None
    below_since: float | None = None


def _clamp(n: int, auto: Autoscale) -> int:
    return max(auto.min_replicas, min(auto.max_replicas, n))


def autoscale_step(
    auto: Autoscale,
    config: ServiceConfig,
    state: ScaleState,
    now: float,
    inflight_total: float,
    replicas: int,
) -> ScaleState:
    """The next state from the gossiped in-flight calls of all replicas (``inflight_total``)
    and how many replicas run. Up (to what the load needs, at least one more) after
    ``scale_up_dwell_s`` above target; down by one after ``scale_down_dwell_s`` below
    target * ``low_water_fraction``; the dwell restarts after each step. The desired
    count is always within ``[min_replicas, max_replicas]``."""
    if not math.isfinite(inflight_total) or inflight_total < 0 or replicas < 0:
        raise ValueError("in-flight calls and replicas must be finite and >= 0, got "
                         f"{inflight_total!r} and {replicas!r}")
    desired = _clamp(state.desired, auto)
    mean = inflight_total / max(replicas, 1)
    target = auto.target_inflight
    if mean > target:
        since = state.above_since if state.above_since is not None else now
        if now - since >= config.scale_up_dwell_s:
            need = math.ceil(inflight_total / target)
            return ScaleState(_clamp(max(desired + 1, need), auto), now, None)
        return ScaleState(desired, since, None)
    if mean < target * config.low_water_fraction:
        since = state.below_since if state.below_since is not None else now
        if now - since >= config.scale_down_dwell_s:
            return ScaleState(_clamp(desired - 1, auto), None, now)
        return ScaleState(desired, None, since)
    return ScaleState(desired, None, None)


def agreed_count(auto: Autoscale, gossiped: Iterable[int]) -> int:
    """The replica count every node places with: the desired count the nodes gossip most
    often (the larger on a tie), clamped; ``min_replicas`` when none is known. Each node's
    own autoscaler may be a step ahead or behind (it started later, its gossip came
    later); placing with the count most of them hold keeps one placement for all, with no
    leader to hold it."""
    counts = Counter(gossiped)
    if not counts:
        return auto.min_replicas
    return _clamp(max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0], auto)


def adopt_desired(auto: Autoscale, peers: Iterable[ScaleState]) -> ScaleState:
    """The autoscaler state a node that starts takes from its peers' gossiped states: the
    desired count most of them hold (``agreed_count``) and, among the peers holding it,
    the earliest start of each dwell, so that it steps together with them."""
    states = list(peers)
    desired = agreed_count(auto, (s.desired for s in states))
    same = [s for s in states if _clamp(s.desired, auto) == desired]
    above = [s.above_since for s in same if s.above_since is not None]
    below = [s.below_since for s in same if s.below_since is not None]
    return ScaleState(desired, min(above) if above else None, min(below) if below else None)
