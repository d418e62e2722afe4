"""Capacity on demand: which nodes drain and sleep, which wake, decided by each node alone.

After Barroso and Hölzle, "The Case for Energy-Proportional Computing" (IEEE Computer,
2007): an idle server still draws about half its peak, so a mesh whose load is spread over
every node pays that half everywhere, all day. Packing the load onto fewer nodes and
putting the rest on standby recovers most of it. Kubernetes' cluster autoscaler, Nomad's
bin-packing and Ray's idle-node timeout do this from one place; here there is no such
place. Every node runs the same pure function, ``plan``, over its gossiped view of the
mesh (each node's state, slots, load, pin and sole-copy count) and acts only on its own
verdict; given the same view every node computes the same plan, so exactly the nodes the
plan names drain, and no two nodes need to agree on anything else.

The rule, per region (``plan``):

- *Demand* is the busy plus queued slots of the region's awake nodes. The region keeps
  ``headroom_fraction`` of its serving slots free: below that, draining nodes return to
  service and then standby nodes wake (the highest-ranked first, the zone short of its
  minimum first) until the free fraction is back at the middle of the hysteresis band.
  A standby node that must keep a copy (``sole_copies`` > 0) also wakes.
- Only when nothing is short: walk the draining nodes (a drain under way is kept while
  it can be), then the active ones, least power-efficient at idle first, then the
  emptiest (fewest busy and queued slots: its drain ends soonest, so the region pays
  less idle draw for nodes on their way to sleep), then a BLAKE3 hash of the name (the
  order is a function of the view alone, the same on every node holding it), and mark a
  node to drain when, without it and those marked before it, the region still keeps
  ``headroom_fraction +
  hysteresis_fraction`` free and at least ``min_active_per_region`` / ``_per_zone``
  active nodes. Never a pinned node, one that must keep a copy, or one that has been
  active for less than ``min_dwell_s``; at most ``drain_step_fraction`` of the region
  starts draining per decision.

A node's own state machine (``CapacityController``; reasons ride on every
``CapacityTransition`` event):

    active   -> draining   the plan names it (takes no new work, finishes what runs)
    draining -> active     the plan no longer names it, or the drain took too long
    draining -> standby    nothing runs, it drained for ``drain_confirm_s`` and, in its
                           latest view, the *other* active nodes alone keep the minimums
                           and the headroom (see below)
    standby  -> waking     the plan wakes it, a task was placed on it, or it must keep a
                           copy / is pinned / consolidation is off
    waking   -> active     the driver reports its workers up (``ready``)

Departures and why:

- Stale views. Views differ by gossip delay, so two nodes could each drain believing the
  other stays. Going to standby is therefore checked again, conservatively: only the
  nodes that are ``active`` in the node's view count (every draining one counts as gone),
  and the view must be newer than the drain (``drain_confirm_s`` longer than the view's
  age). Of two nodes draining at once, the later one's view sees the earlier one
  draining, so they cannot both count on each other.
- Hysteresis in load (a wake threshold below the drain threshold) and in time
  (``min_dwell_s`` in ``active`` before a drain) bound flapping: a node makes at most
  four transitions per ``min_dwell_s`` plus its drain and wake times. Waking is never
  delayed by the dwell: latency is worth more than a joule.
- Only copies: the caller (the data plane) says how many objects this node must keep a
  live copy of (``sole_copies``); the rule is the caller's (the simulator designates the
  highest-ranked awake holder of each object). A node with any never drains, and a
  standby node with any wakes.

The power model (``PowerModel``: idle, peak and standby watts; draw = idle + (peak -
idle) x utilisation while awake, standby watts asleep) and energy accounting
(``EnergyMeter`` per node, ``task_share_joules`` per task) are plain functions of their
inputs. Sans-I/O: every input carries ``now``; nothing here reads a clock or draws a
random number.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from blake3 import blake3

from meshscale.core.outputs import Event

__all__ = [
    "CapacityConfig",
    "CapacityConfigError",
    "CapacityController",
    "CapacityPlan",
    "CapacityTransition",
    "EnergyMeter",
    "PeerCapacity",
    "PowerModel",
    "PowerState",
    "TaskEnergy",
    "Verdict",
    "check_minimums",
    "plan",
    "rank_key",
    "task_share_joules",
]


class PowerState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    STANDBY = "standby"
    WAKING = "waking"


AWAKE = frozenset({PowerState.ACTIVE, PowerState.DRAINING, PowerState.WAKING})

# Which transitions exist (h11-style table); the controller asserts every move is here.
TRANSITIONS: frozenset[tuple[PowerState, PowerState]] = frozenset({
    (PowerState.ACTIVE, PowerState.DRAINING),
    (PowerState.DRAINING, PowerState.ACTIVE),
    (PowerState.DRAINING, PowerState.STANDBY),
    (PowerState.STANDBY, PowerState.WAKING),
    (PowerState.WAKING, PowerState.ACTIVE),
})


# --------------------------------------------------------------------------- config


class CapacityConfigError(ValueError):
    """A capacity or power setting is wrong; ``key`` names it as the config spells it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _finite(key: str, value: float, *, low: float = 0.0, strict: bool = False) -> None:
    if not math.isfinite(value) or value < low or (strict and value <= low):
        op = ">" if strict else ">="
        raise CapacityConfigError(key, f"must be finite and {op} {low:g}, got {value!r}")


@dataclass(frozen=True)
class PowerModel:
    """A node's declared draw in watts (used where no meter such as RAPL is readable)."""

    idle_watts: float = 100.0
    peak_watts: float = 200.0
    standby_watts: float = 10.0

    def __post_init__(self) -> None:
        for key in ("idle_watts", "peak_watts", "standby_watts"):
            _finite(f"energy.{key}", getattr(self, key))
        if self.idle_watts > self.peak_watts:
            raise CapacityConfigError(
                "energy.idle_watts", f"{self.idle_watts:g} W is above energy.peak_watts "
                                     f"({self.peak_watts:g} W)")
        if self.standby_watts > self.idle_watts:
            raise CapacityConfigError(
                "energy.standby_watts", f"{self.standby_watts:g} W is above "
                                        f"energy.idle_watts ({self.idle_watts:g} W)")

    def draw_watts(self, state: PowerState, utilisation: float) -> float:
        """Draw in ``state`` at ``utilisation`` (busy share of the node's slots, 0..1)."""
        if state is PowerState.STANDBY:
            return self.standby_watts
        u = min(1.0, max(0.0, utilisation))
        return self.idle_watts + (self.peak_watts - self.idle_watts) * u


def task_share_joules(model: PowerModel, utilisation: float, task_slots: float,
                      busy_slots: float, seconds: float) -> float:
    """A task's share of its node's energy over ``seconds``: the node's draw split over
    the busy slots in proportion to the slots the task holds (idle draw included: a task
    on an otherwise idle node pays for keeping it up)."""
    if busy_slots <= 0 or task_slots <= 0 or seconds <= 0:
        return 0.0
    share = min(1.0, task_slots / busy_slots)
    return model.draw_watts(PowerState.ACTIVE, utilisation) * seconds * share


class TaskEnergy:
    """Joules per running task on one node: the node's draw, as its meter last gave it,
    divided over the tasks running there in proportion to the slots (cpus) each holds,
    integrated over each task's run time. Between two changes (a task starts or ends,
    the draw is updated) the draw and the split are constant. A task alone on a node
    pays all of the node's draw, idle part included (it is what keeps the node up);
    with ``n`` equal tasks each pays ``1/n``. Sans-I/O: every call carries ``now``."""

    def __init__(self, watts: float = 0.0, now: float = 0.0) -> None:
        self._watts = max(0.0, watts)
        self._last = now
        self._tasks: dict[str, list[float]] = {}  # key -> [slots, joules]

    def _advance(self, now: float) -> None:
        dt = now - self._last
        if dt > 0 and self._tasks:
            total = sum(t[0] for t in self._tasks.values())
            if total > 0:
                for t in self._tasks.values():
                    t[1] += self._watts * dt * t[0] / total
        self._last = max(self._last, now)

    def set_watts(self, watts: float, now: float) -> None:
        """The node's draw from ``now`` on."""
        self._advance(now)
        self._watts = max(0.0, watts) if math.isfinite(watts) else 0.0

    def start(self, key: str, slots: float, now: float) -> None:
        self._advance(now)
        self._tasks[key] = [max(slots, 1e-3), 0.0]

    def end(self, key: str, now: float) -> float:
        """The task's joules from its ``start`` to ``now`` (0 for an unknown key)."""
        self._advance(now)
        t = self._tasks.pop(key, None)
        return 0.0 if t is None else t[1]

    def __len__(self) -> int:
        return len(self._tasks)


@dataclass
class EnergyMeter:
    """Joules of one node: piecewise-constant power between calls to ``advance``."""

    model: PowerModel
    started_s: float
    joules: float = 0.0
    by_state: dict[str, float] = field(default_factory=dict)
    """Joules per state (``off`` while the node was down)."""
    _last_s: float = field(init=False)
    _state: PowerState | None = field(init=False, default=PowerState.ACTIVE)
    _utilisation: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._last_s = self.started_s

    def advance(self, now: float, state: PowerState | None, utilisation: float) -> None:
        """Account the time since the last call at the previous draw, then switch to
        ``state`` (``None``: powered off, 0 W) at ``utilisation`` from ``now`` on."""
        assert now >= self._last_s, "time went backwards"
        j = self.watts() * (now - self._last_s)
        self.joules += j
        key = "off" if self._state is None else str(self._state)
        self.by_state[key] = self.by_state.get(key, 0.0) + j
        self._last_s = now
        self._state = state
        self._utilisation = utilisation

    def watts(self) -> float:
        if self._state is None:
            return 0.0
        return self.model.draw_watts(self._state, self._utilisation)


@dataclass(frozen=True)
class CapacityConfig:
    """Consolidation settings (``energy.*`` in a node's config file)."""

    mode: str = "consolidate"
    """``off``: every node stays active; ``consolidate``: idle nodes drain and sleep."""
    headroom_fraction: float = 0.3
    """Free share of the region's serving slots kept at all times (wake below it)."""
    hysteresis_fraction: float = 0.1
    """A drain must leave ``headroom_fraction`` + this much free."""
    min_active_per_region: int = 2
    min_active_per_zone: int = 1
    min_active_by_region: Mapping[str, int] = field(default_factory=dict)
    """Per-region minimums that override ``min_active_per_region``."""
    min_dwell_s: float = 300.0
    """Time active before a node may drain again."""
    drain_confirm_s: float = 10.0
    """Least time draining before standby; must exceed the age of a gossiped view."""
    max_drain_s: float = 600.0
    """A drain whose tasks have not ended by then is given up (back to active)."""
    drain_step_fraction: float = 0.1
    """At most this share of a region's nodes starts draining per decision (at least 1)."""

    def __post_init__(self) -> None:
        if self.mode not in ("off", "consolidate"):
            raise CapacityConfigError("energy.mode", f"must be 'off' or 'consolidate', "
                                                     f"got {self.mode!r}")
        for key in ("headroom_fraction", "hysteresis_fraction"):
            v = getattr(self, key)
            if not (math.isfinite(v) and 0.0 <= v < 1.0):
                raise CapacityConfigError(f"energy.{key}", f"must be in [0, 1), got {v!r}")
        if self.headroom_fraction + self.hysteresis_fraction >= 1.0:
            raise CapacityConfigError("energy.hysteresis_fraction",
                                      "headroom_fraction + hysteresis_fraction must be < 1")
        if not (math.isfinite(self.drain_step_fraction) and 0 < self.drain_step_fraction <= 1):
            raise CapacityConfigError("energy.drain_step_fraction",
                                      f"must be in (0, 1], got {self.drain_step_fraction!r}")
        for key in ("min_active_per_region", "min_active_per_zone"):
            if getattr(self, key) < 1:
                raise CapacityConfigError(f"energy.{key}",
                                          f"must be >= 1, got {getattr(self, key)!r}")
        for region, n in self.min_active_by_region.items():
            if n < 1:
                raise CapacityConfigError(f"energy.min_active_by_region.{region}",
                                          f"must be >= 1, got {n!r}")
        for key in ("min_dwell_s", "drain_confirm_s", "max_drain_s"):
            _finite(f"energy.{key}", getattr(self, key))
        if self.max_drain_s < self.drain_confirm_s:
            raise CapacityConfigError("energy.max_drain_s", "must be >= drain_confirm_s")

    def min_region(self, region: str) -> int:
        return self.min_active_by_region.get(region, self.min_active_per_region)


def check_minimums(config: CapacityConfig, zones: Mapping[str, Mapping[str, int]]) -> None:
    """Refuse minimums that the topology cannot meet: ``zones`` is region -> zone -> number
    of nodes declared. Raises ``CapacityConfigError`` naming the key."""
    for region in config.min_active_by_region:
        if region not in zones:
            raise CapacityConfigError(f"energy.min_active_by_region.{region}",
                                      "no such region in the mesh")
    for region, per_zone in sorted(zones.items()):
        size = sum(per_zone.values())
        want = config.min_region(region)
        if want > size:
            key = ("energy.min_active_by_region." + region
                   if region in config.min_active_by_region else "energy.min_active_per_region")
            raise CapacityConfigError(key, f"{want} is more than the {size} node(s) of "
                                           f"region {region!r}")
        for zone, n in sorted(per_zone.items()):
            if config.min_active_per_zone > n:
                raise CapacityConfigError(
                    "energy.min_active_per_zone",
                    f"{config.min_active_per_zone} is more than the {n} node(s) of zone "
                    f"{zone!r} in region {region!r}")


# --------------------------------------------------------------------------- the view


@dataclass(frozen=True, slots=True)
class PeerCapacity:
    """What gossip says about one node's capacity (its own entry is the freshest)."""

    name: str
    region: str
    zone: str
    state: PowerState
    since_s: float
    """When it entered ``state`` (the mesh's hybrid clock)."""
    slots: float
    busy: float = 0.0
    """Slots its running tasks hold."""
    queued: int = 0
    """Tasks waiting at it."""
    pinned: bool = False
    """The operator said ``--no-standby``."""
    sole_copies: int = 0
    """Objects it must keep a live copy of (the data plane's count)."""
    idle_watts: float = 0.0
    """Its idle draw: the least efficient nodes sleep first."""


@functools.lru_cache(maxsize=65536)
def _name_hash(name: str) -> bytes:
    return blake3(b"meshscale-capacity\0" + name.encode()).digest(length=8)


def rank_key(p: PeerCapacity) -> tuple[float, bytes]:
    """Drain order (first drains first): most idle watts per slot, then a fixed hash."""
    return (-(p.idle_watts / p.slots if p.slots > 0 else math.inf), _name_hash(p.name))


class Verdict(StrEnum):
    SERVE = "serve"
    """Stay (or go back) in service."""
    DRAIN = "drain"
    """Drain (or keep draining) towards standby."""
    SLEEP = "sleep"
    """Stay in standby."""
    WAKE = "wake"


@dataclass(frozen=True)
class CapacityPlan:
    """The verdict for every node in the view, with its reason."""

    verdicts: Mapping[str, tuple[Verdict, str]]
    regions: Mapping[str, str]
    """A one-line summary of each region's numbers (for events and logs)."""

    def of(self, name: str) -> tuple[Verdict, str]:
        return self.verdicts.get(name, (Verdict.SERVE, "not in the view"))


def _load(nodes: Iterable[PeerCapacity]) -> float:
    return sum(p.busy + p.queued for p in nodes)


def plan(view: Iterable[PeerCapacity], now: float, config: CapacityConfig) -> CapacityPlan:
    """The verdict for every node of ``view`` (see the module docstring). Pure: the same
    view, time and config give the same plan on every node."""
    by_region: dict[str, list[PeerCapacity]] = {}
    for p in view:
        by_region.setdefault(p.region, []).append(p)
    verdicts: dict[str, tuple[Verdict, str]] = {}
    summaries: dict[str, str] = {}
    for region in sorted(by_region):
        nodes = sorted(by_region[region], key=rank_key)
        summaries[region] = _plan_region(region, nodes, now, config, verdicts)
    return CapacityPlan(verdicts, summaries)


def _plan_region(region: str, nodes: list[PeerCapacity], now: float, cfg: CapacityConfig,
                 out: dict[str, tuple[Verdict, str]]) -> str:
    """``nodes`` sorted by ``rank_key``. Fills ``out``; returns a summary line."""
    if cfg.mode == "off":
        for p in nodes:
            out[p.name] = ((Verdict.SERVE, "consolidation off") if p.state is not
                           PowerState.STANDBY else (Verdict.WAKE, "consolidation off"))
        return f"{region}: consolidation off"
    demand = _load(p for p in nodes if p.state is not PowerState.STANDBY)
    serving = [p for p in nodes if p.state in (PowerState.ACTIVE, PowerState.WAKING)]
    draining = [p for p in nodes if p.state is PowerState.DRAINING]
    standby = [p for p in nodes if p.state is PowerState.STANDBY]
    cap = sum(p.slots for p in serving)
    free = 1.0 - demand / cap if cap > 0 else -math.inf
    min_region = cfg.min_region(region)
    zones = sorted({p.zone for p in nodes})
    zone_count = {z: sum(1 for p in serving if p.zone == z) for z in zones}
    summary = (f"{region}: demand {demand:g} of {cap:g} serving slots "
               f"({max(free, -1.0):.0%} free), {len(serving)} serving, {len(draining)} "
               f"draining, {len(standby)} standby")

    # 1. What is short: headroom, minimums, copies. Fix it with the draining nodes first
    # (no wake cost), then the standby ones, the highest-ranked (last to sleep) first.
    target = demand / (1.0 - cfg.headroom_fraction - cfg.hysteresis_fraction / 2)
    short_headroom = cap < demand / (1.0 - cfg.headroom_fraction) - 1e-9 if demand else False
    returning: set[str] = set()

    def bring_back(p: PeerCapacity, why: str) -> None:
        nonlocal cap
        returning.add(p.name)
        cap += p.slots
        zone_count[p.zone] = zone_count.get(p.zone, 0) + 1
        out[p.name] = (Verdict.SERVE if p.state is PowerState.DRAINING else Verdict.WAKE, why)

    reserve = [p for p in reversed(nodes)
               if p.state in (PowerState.DRAINING, PowerState.STANDBY)]
    reserve.sort(key=lambda p: p.state is PowerState.STANDBY)  # stable: rank kept
    for p in reserve:
        if p.state is PowerState.STANDBY and p.sole_copies > 0:
            bring_back(p, f"holds the only live copy of {p.sole_copies} object(s)")
        elif p.state is PowerState.STANDBY and p.pinned:
            bring_back(p, "pinned no-standby")
    for z in zones:
        for p in reserve:
            if zone_count[z] >= cfg.min_active_per_zone:
                break
            if p.zone == z and p.name not in returning:
                bring_back(p, f"zone {z} below its minimum of {cfg.min_active_per_zone} "
                              "active")
    for p in reserve:
        if len(serving) + len(returning) >= min_region:
            break
        if p.name not in returning:
            bring_back(p, f"region below its minimum of {min_region} active")
    if short_headroom:
        for p in reserve:
            if cap >= target - 1e-9:
                break
            if p.name not in returning:
                bring_back(p, f"headroom: {max(free, -1.0):.0%} free is below "
                              f"{cfg.headroom_fraction:.0%}")
    short = short_headroom or bool(returning)

    # 2. Nothing short: choose who drains, in rank order, keeping headroom + hysteresis
    # and the minimums counted over active nodes alone.
    drain_floor = 1.0 - cfg.headroom_fraction - cfg.hysteresis_fraction
    active = [p for p in nodes if p.state is PowerState.ACTIVE]
    keep_cap = sum(p.slots for p in active) + sum(
        p.slots for p in serving if p.state is PowerState.WAKING)
    keep_region = len(active)
    keep_zone = {z: sum(1 for p in active if p.zone == z) for z in zones}
    new_drains = 0
    step = max(1, math.floor(cfg.drain_step_fraction * len(nodes)))
    chosen: set[str] = set()
    for rank, p in enumerate(_drain_order(nodes)):
        if p.name in returning:
            continue
        why = _not_eligible(p, now, cfg)
        if why is None and short:
            why = "the region is short of capacity"
        if why is None and p.state is PowerState.ACTIVE and new_drains >= step:
            why = f"at most {step} node(s) start draining per decision"
        if why is None:
            # A draining node's slots are already out of keep_cap.
            rest_cap = keep_cap - (p.slots if p.state is PowerState.ACTIVE else 0.0)
            rest_region = keep_region - (p.state is PowerState.ACTIVE)
            rest_zone = keep_zone[p.zone] - (p.state is PowerState.ACTIVE)
            if rest_region < min_region:
                why = f"region would drop below {min_region} active"
            elif rest_zone < cfg.min_active_per_zone:
                why = f"zone {p.zone} would drop below {cfg.min_active_per_zone} active"
            elif demand > drain_floor * rest_cap + 1e-9:
                why = (f"the rest would keep less than "
                       f"{cfg.headroom_fraction + cfg.hysteresis_fraction:.0%} free")
            else:
                chosen.add(p.name)
                if p.state is PowerState.ACTIVE:
                    keep_cap, keep_region = rest_cap, rest_region
                    keep_zone[p.zone] = rest_zone
                    new_drains += 1
                free_after = 1.0 - demand / rest_cap if rest_cap > 0 else 0.0
                out[p.name] = (Verdict.DRAIN, f"drain order {rank} in {region}; the rest "
                                              f"keeps {free_after:.0%} free")
                continue
        if p.state is PowerState.DRAINING and why is not None and p.name not in chosen:
            # A drainer we could not keep draining: give its slots back to the count.
            keep_cap += p.slots
        out[p.name] = (Verdict.SERVE, why or "")
    for p in nodes:
        if p.name not in out:
            out[p.name] = ((Verdict.SLEEP, "not needed") if p.state is PowerState.STANDBY
                           else (Verdict.SERVE, "waking"))
    return summary


def _drain_order(nodes: list[PeerCapacity]) -> list[PeerCapacity]:
    """Who is considered for draining, first first: the nodes already draining (in rank
    order: a drain under way is kept while the headroom allows), then the active ones by
    idle watts per slot (least efficient first), then by the work they hold (busy plus
    queued: the emptiest finishes its drain soonest and moves the least), then the fixed
    hash. A pure function of the view, so every node holding the same view orders alike."""
    draining = [p for p in nodes if p.state is PowerState.DRAINING]
    active = sorted((p for p in nodes if p.state is PowerState.ACTIVE),
                    key=lambda p: (rank_key(p)[0], p.busy + p.queued, rank_key(p)[1]))
    return draining + active


def _not_eligible(p: PeerCapacity, now: float, cfg: CapacityConfig) -> str | None:
    if p.pinned:
        return "pinned no-standby"
    if p.sole_copies > 0:
        return f"holds the only live copy of {p.sole_copies} object(s)"
    if p.state is PowerState.ACTIVE and now - p.since_s < cfg.min_dwell_s:
        return f"active for {now - p.since_s:.0f} s of min_dwell_s {cfg.min_dwell_s:g}"
    return None


# --------------------------------------------------------------------------- one node


@dataclass(frozen=True, slots=True)
class CapacityTransition(Event):
    """``node`` went from ``old`` to ``new`` at ``at_s`` because of ``reason``."""

    node: str
    old: PowerState
    new: PowerState
    reason: str
    at_s: float


class CapacityController:
    """One node's power state, moved by the plan it computes from its own view.

    The driver feeds it: ``update(view, now)`` on every gossiped view (or ``apply(plan,
    now)`` with a plan it computed from that view, e.g. shared by simulated nodes holding
    the same view); ``local(running, sole_copies, now)`` when its own load or copies
    change; ``demand(now)`` when a task is placed on it while it sleeps; ``ready(now)``
    when its workers are up after a wake. It reads ``state`` and drains
    ``CapacityTransition`` events: a draining node takes no new work, a standby node
    stops its workers, a waking one starts them.
    """

    def __init__(self, name: str, region: str, zone: str, *, slots: float,
                 config: CapacityConfig, now: float, pinned: bool = False,
                 idle_watts: float = 0.0) -> None:
        self.name = name
        self.region = region
        self.zone = zone
        self.slots = slots
        self.config = config
        self.pinned = pinned
        self.idle_watts = idle_watts
        self.state = PowerState.ACTIVE
        self.since_s = now
        self.running = 0.0
        self.queued = 0
        self.sole_copies = 0
        self.transitions = 0
        self.held = False
        """An operator put this node on standby (``hold``): the plan does not wake it
        for headroom until ``release`` or work placed on it (``demand``)."""
        self._events: list[CapacityTransition] = []

    def entry(self) -> PeerCapacity:
        """This node's own entry, for gossip."""
        return PeerCapacity(self.name, self.region, self.zone, self.state, self.since_s,
                            self.slots, self.running, self.queued, self.pinned,
                            self.sole_copies, self.idle_watts)

    def drain(self) -> list[CapacityTransition]:
        out = self._events
        self._events = []
        return out

    # ------------------------------------------------------------------ inputs

    def local(self, running: float, queued: int, sole_copies: int, now: float) -> None:
        self.running = running
        self.queued = queued
        self.sole_copies = sole_copies
        if self.state is PowerState.DRAINING and sole_copies > 0:
            self._move(PowerState.ACTIVE, f"now holds the only live copy of {sole_copies} "
                                          "object(s)", now)

    def update(self, view: Iterable[PeerCapacity], now: float) -> None:
        """A new gossiped view (this node's entry in it is replaced by its own)."""
        mine = self.entry()
        peers = [mine if p.name == self.name else p for p in view]
        if all(p.name != self.name for p in peers):
            peers.append(mine)
        self.apply(plan(peers, now, self.config), now, peers)

    def apply(self, verdicts: CapacityPlan, now: float,
              view: Iterable[PeerCapacity]) -> None:
        """Act on this node's verdict in ``verdicts`` (computed from ``view`` at ``now``)."""
        verdict, why = verdicts.of(self.name)
        cfg = self.config
        st = self.state
        if self.held:
            self._apply_held(now, view)
            return
        if st is PowerState.ACTIVE:
            if verdict is Verdict.DRAIN and self._may_drain() is None:
                self._move(PowerState.DRAINING, why, now)
        elif st is PowerState.DRAINING:
            blocked = self._may_drain()
            if blocked is not None:
                self._move(PowerState.ACTIVE, blocked, now)
            elif verdict is not Verdict.DRAIN:
                self._move(PowerState.ACTIVE, f"no longer chosen to drain: {why}", now)
            elif now - self.since_s > cfg.max_drain_s:
                self._move(PowerState.ACTIVE, f"drain took over max_drain_s "
                                              f"{cfg.max_drain_s:g}", now)
            elif self.running <= 0 and self.queued == 0 \
                    and now - self.since_s >= cfg.drain_confirm_s:
                short = self._others_short(view)
                if short is None:
                    self._move(PowerState.STANDBY, f"drained; {why}", now)
        elif st is PowerState.STANDBY:
            if cfg.mode == "off":
                self._move(PowerState.WAKING, "consolidation off", now)
            elif self.pinned:
                self._move(PowerState.WAKING, "pinned no-standby", now)
            elif self.sole_copies > 0:
                self._move(PowerState.WAKING, f"holds the only live copy of "
                                              f"{self.sole_copies} object(s)", now)
            elif verdict is Verdict.WAKE:
                self._move(PowerState.WAKING, why, now)

    def hold(self, now: float, reason: str = "an operator asked for standby") -> str | None:
        """An operator asks this node to sleep. Returns why not (pinned, or it must keep
        a copy), else None: it drains now and goes to standby once nothing runs, it has
        drained for ``drain_confirm_s`` and the *other* active nodes keep the region's
        and zone's minimums (headroom is the operator's call). While held, the plan does
        not wake it; ``release``, a task placed on it or a copy it must keep does. A
        drained node whose region or zone would drop below its minimum gives the hold
        up (back to active, the reason says so)."""
        if self.pinned:
            return "pinned no-standby"
        if self.sole_copies > 0:
            return f"holds the only live copy of {self.sole_copies} object(s)"
        self.held = True
        if self.state is PowerState.ACTIVE:
            self._move(PowerState.DRAINING, reason, now)
        return None

    def release(self, now: float, reason: str = "an operator asked to wake") -> None:
        """Undo ``hold`` (or wake a node the plan put to sleep): draining serves again,
        standby wakes."""
        self.held = False
        if self.state is PowerState.DRAINING:
            self._move(PowerState.ACTIVE, reason, now)
        elif self.state is PowerState.STANDBY:
            self._move(PowerState.WAKING, reason, now)

    def demand(self, now: float, reason: str = "a task was placed here") -> None:
        """Work arrived for this node: a draining node serves again, a standby one wakes."""
        self.held = False
        if self.state is PowerState.DRAINING:
            self._move(PowerState.ACTIVE, reason, now)
        elif self.state is PowerState.STANDBY:
            self._move(PowerState.WAKING, reason, now)

    def ready(self, now: float) -> None:
        """The driver has the node's workers up again."""
        if self.state is PowerState.WAKING:
            self._move(PowerState.ACTIVE, "workers up", now)

    def restarted(self, now: float) -> None:
        """The node came back from a crash: it starts active (a new incarnation)."""
        self.state = PowerState.ACTIVE
        self.since_s = now

    # ------------------------------------------------------------------ internals

    def _may_drain(self) -> str | None:
        if self.config.mode == "off":
            return "consolidation off"
        if self.pinned:
            return "pinned no-standby"
        if self.sole_copies > 0:
            return f"holds the only live copy of {self.sole_copies} object(s)"
        return None

    def _apply_held(self, now: float, view: Iterable[PeerCapacity]) -> None:
        st = self.state
        if st is PowerState.ACTIVE:  # held while it was waking: drain now
            if self.pinned or self.sole_copies > 0:
                self.held = False
            else:
                self._move(PowerState.DRAINING, "an operator asked for standby", now)
        elif st is PowerState.DRAINING:
            if self.pinned or self.sole_copies > 0:
                self.held = False
                self._move(PowerState.ACTIVE, "pinned no-standby" if self.pinned else
                           f"now holds the only live copy of {self.sole_copies} object(s)",
                           now)
            elif now - self.since_s > self.config.max_drain_s:
                self.held = False
                self._move(PowerState.ACTIVE, f"drain took over max_drain_s "
                                              f"{self.config.max_drain_s:g}", now)
            elif self.running <= 0 and self.queued == 0 \
                    and now - self.since_s >= self.config.drain_confirm_s:
                short = self._others_short(view)
                if short in (None, "headroom"):
                    self._move(PowerState.STANDBY, "drained; an operator asked for standby",
                               now)
                else:
                    # Given up rather than left draining: the others' plans count a
                    # draining node as the first to return, so a held one would keep a
                    # sleeper from waking when the region is short.
                    self.held = False
                    self._move(PowerState.ACTIVE, f"an operator asked for standby, but "
                                                  f"the others would not keep the {short}",
                               now)
        elif st is PowerState.STANDBY and self.sole_copies > 0:
            self.held = False
            self._move(PowerState.WAKING, f"holds the only live copy of "
                                          f"{self.sole_copies} object(s)", now)

    def _others_short(self, view: Iterable[PeerCapacity]) -> str | None:
        """Whether, counting only the *other* nodes active in ``view``, this node's region
        or zone would lack its minimum or headroom (the conservative standby check)."""
        cfg = self.config
        mine = [p for p in view if p.region == self.region and p.name != self.name]
        active = [p for p in mine if p.state is PowerState.ACTIVE]
        if len(active) < cfg.min_region(self.region):
            return "region minimum"
        if sum(1 for p in active if p.zone == self.zone) < cfg.min_active_per_zone:
            return "zone minimum"
        demand = _load(p for p in mine if p.state is not PowerState.STANDBY)
        cap = sum(p.slots for p in active)
        if demand > (1.0 - cfg.headroom_fraction) * cap + 1e-9:
            return "headroom"
        return None

    def _move(self, new: PowerState, reason: str, now: float) -> None:
        old = self.state
        assert (old, new) in TRANSITIONS, f"no transition {old} -> {new}"
        assert now >= self.since_s, "time went backwards"
        self.state = new
        self.since_s = now
        self.transitions += 1
        self._events.append(CapacityTransition(self.name, old, new, reason, now))
