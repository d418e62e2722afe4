"""Capacity on demand on a real node: the driver of ``core.capacity.CapacityController``.

Every decision (who drains, when a drained node may sleep, who wakes and why) is the
controller's; this module feeds it and carries out what it says:

- *Its view.* Each node gossips its own ``PeerCapacity`` in one membership tag
  (``POWER_TAG``, a few dozen bytes: state, since when, slots, busy slots, queued
  tasks, sole-copy count, idle watts, pinned; see ``encode_tag``). Every
  ``interval_s`` the driver reads the alive and suspect members' tags into the view,
  gives the controller its own load, and calls ``update``. A member without the tag
  (a node with no compute plane, or one whose energy mode is off and that never left
  ``active``) is not in the view: the plan does not count its slots.
- *Gossip is bounded.* A state change is published at once; a load change at most
  every ``gossip_interval_s``, with load rounded to whole slots. Each publish is one
  metadata update (a higher incarnation, piggybacked on the failure detector's
  messages), so a node costs the mesh at most one update per ``gossip_interval_s``.
- *Acting on transitions* (each one an event, ``capacity``, and a log line, with its
  reason): ``draining`` is published, and placement (``compute._view`` with
  ``placement_standby``) then counts the node's wake cost, so it takes new work only
  when the active nodes look busier than that, and it steals no queued work
  (``core/scheduling.py``); its running tasks finish. ``standby``
  stops the node's worker processes (``ComputePlane.stop_workers``): the node still
  gossips, serves reads of its data, its KV and scheduling. ``waking`` starts them
  again and reports ``ready`` to the controller; the time from the wake to the workers
  being up is logged (``wake_s``) and, when a task's arrival woke the node, that is
  the task's wait before it starts (``wake_to_task_ms``).
- *Demand.* A task granted to a node whose workers are stopped calls
  ``demand`` (``ComputePlane.on_demand``): the controller wakes it.
- *Operators.* ``node.standby`` / ``node.wake`` call ``hold`` / ``release``.

Load: ``busy`` is the slots its running tasks hold (capacity minus free CPUs in the
scheduler) plus one per stream operator runner on the node (so a node running an
operator never sleeps under it: stream placement does not yet avoid sleeping nodes);
``queued`` is the reservations waiting at it.

Sole copies (the data plane's count, the rule the simulator uses): an object held here
counts when no other live member is a *confirmed* holder of it in this node's
replication state (``ReplicaManager.confirmed_holders``, filled by anti-entropy and
cleared of members that leave the view). Conservative: a copy not yet confirmed
elsewhere counts as the only one, so a node that may hold the only copy never drains.
It is recounted every ``sole_copies_interval_s`` (it walks the local inventory), only
while consolidating (mode ``off`` never counts: nothing uses it there).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meshscale.core.capacity import (
    CapacityController,
    CapacityTransition,
    PeerCapacity,
    PowerState,
)
from meshscale.core.membership import State
from meshscale.runtime.config import CapacitySettings
from meshscale.runtime.pacing import Wakeup
from meshscale.runtime.services import NodeServices

__all__ = ["POWER_TAG", "CapacityDriver", "CapacitySettings", "decode_tag", "encode_tag",
           "placement_standby", "power_state"]

POWER_TAG = "pw"
"""The membership tag carrying a node's ``PeerCapacity`` (``encode_tag``)."""
MAX_COUNT = 99_999
"""Queued tasks and sole copies are gossiped up to this (more reads as this)."""
REGION_CHECK_AFTER_S = 30.0
"""How long after its start a node first compares its region's size with the minimum."""
_LETTER = {PowerState.ACTIVE: "a", PowerState.DRAINING: "d", PowerState.STANDBY: "s",
           PowerState.WAKING: "w"}
_STATE = {v: k for k, v in _LETTER.items()}


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def encode_tag(p: PeerCapacity) -> str:
    """``<state letter><since>:<slots>:<busy>:<queued>:<sole>:<idle W>[:p]``, e.g.
    ``a1765000000:4:1:0:0:10`` (since: whole wall-clock seconds)."""
    out = (f"{_LETTER[p.state]}{int(p.since_s)}:{_num(p.slots)}:{_num(round(p.busy))}:"
           f"{min(MAX_COUNT, p.queued)}:{min(MAX_COUNT, p.sole_copies)}:"
           f"{_num(p.idle_watts)}")
    return out + (":p" if p.pinned else "")


def decode_tag(name: str, region: str, zone: str, text: str) -> PeerCapacity | None:
    """The ``PeerCapacity`` a tag says, or None when it is not one (a newer format, a
    damaged value): such a member is left out of the view."""
    parts = text.split(":")
    if len(parts) not in (6, 7) or not parts[0] or parts[0][0] not in _STATE:
        return None
    if len(parts) == 7 and parts[6] != "p":
        return None
    try:
        since = float(parts[0][1:])
        slots, busy, idle = float(parts[1]), float(parts[2]), float(parts[5])
        queued, sole = int(parts[3]), int(parts[4])
    except ValueError:
        return None
    nums = (since, slots, busy, idle)
    if not all(math.isfinite(v) and v >= 0 for v in nums) or queued < 0 or sole < 0:
        return None
    return PeerCapacity(name, region, zone, _STATE[parts[0][0]], since, slots, busy,
                        queued, len(parts) == 7, sole, idle)


def power_state(tags: Mapping[str, str]) -> PowerState | None:
    """A member's power state as its tags say (None: it gossips none)."""
    text = tags.get(POWER_TAG)
    return _STATE.get(text[0]) if text else None


def placement_standby(tags: Mapping[str, str]) -> bool:
    """Does placement count this member's wake cost? Yes while it drains or sleeps."""
    return power_state(tags) in (PowerState.DRAINING, PowerState.STANDBY)


class Workers(Protocol):
    """The compute plane as the driver uses it."""

    on_demand: Callable[[], None] | None

    def workers_running(self) -> bool: ...

    async def stop_workers(self) -> None: ...

    async def start_workers(self) -> None: ...


class CapacityDriver:
    """One node's consolidation: feeds its ``CapacityController`` and acts on it."""

    def __init__(self, agent: NodeServices, settings: CapacitySettings, workers: Workers, *,
                 slots: float, idle_watts: float,
                 load: Callable[[], tuple[float, int]],
                 sole_copies: Callable[[], int] | None = None,
                 on_state: Callable[[PowerState], None] | None = None) -> None:
        self.agent = agent
        self.settings = settings
        self.workers = workers
        self._load = load
        self._sole_copies = sole_copies
        self._on_state = on_state
        """Told every new state (the power meter's model draws standby watts asleep)."""
        self.ctl = CapacityController(agent.name, agent.meta.region, agent.meta.zone,
                                      slots=slots, config=settings.config, now=time.time(),
                                      pinned=settings.pinned, idle_watts=idle_watts)
        self.sole = 0
        self._sole_at = float("-inf")
        self._published: str | None = None
        self._published_at = float("-inf")
        self._publish_state: PowerState | None = None
        self._acting = asyncio.Lock()
        self._wake_started: float | None = None
        self._woken_by_task = False
        self.wake_s: list[float] = []
        """Seconds from each wake to the workers being up (the most recent last, 32 kept)."""
        self._kick = Wakeup()
        self._started = time.monotonic()
        self._region_warned = False
        workers.on_demand = self.demand

    @property
    def state(self) -> PowerState:
        return self.ctl.state

    async def start(self) -> None:
        """Publish the node's entry (when consolidating) and start the loop."""
        self._publish(force=True)
        self.agent.spawn(self._loop())

    # ------------------------------------------------------------------ inputs

    def view(self) -> list[PeerCapacity]:
        out = []
        for m in self.agent.m.members.values():
            if m.state > State.SUSPECT or m.name == self.agent.name:
                continue
            text = m.meta.tags.get(POWER_TAG)
            p = None if text is None else decode_tag(m.name, m.meta.region, m.meta.zone,
                                                     text)
            if p is not None:
                out.append(p)
        return out

    def step(self, now: float | None = None) -> None:
        """One decision: local load, view, controller, then act on what it says."""
        now = time.time() if now is None else now
        busy, queued = self._load()
        mono = time.monotonic()
        # The count walks the inventory: only a consolidating node, whose controller and
        # peers use it, pays for it (an idle node's cost must not grow with its data).
        if self._sole_copies is not None and self.settings.config.mode != "off" and \
                mono - self._sole_at >= self.settings.sole_copies_interval_s:
            self._sole_at = mono
            try:
                self.sole = self._sole_copies()
            except Exception as e:  # the count must not stop consolidation: keep the last
                self.agent.log_limited("capacity_sole_copies_failed", error=repr(e)[:200])
        self.ctl.local(busy, queued, self.sole, now)
        if busy > 0 and self.ctl.state is PowerState.STANDBY:
            # Work that needs the workers runs here (a stream operator placed on this
            # node, whose placement does not yet count sleeping nodes): wake for it.
            self.ctl.demand(now, "work runs here while asleep (a stream operator)")
        view = self.view()
        self.ctl.update(view, now)
        self._act()
        self._check_region(view, mono)

    def _check_region(self, view: list[PeerCapacity], mono: float) -> None:
        """Say once (log and event) when the node's region, as it sees it after
        ``REGION_CHECK_AFTER_S``, is smaller than the minimum asked for: a node's start
        cannot know the region's size, so this is where such a setting shows."""
        cfg = self.settings.config
        if self._region_warned or cfg.mode == "off" \
                or mono - self._started < REGION_CHECK_AFTER_S:
            return
        region = self.agent.meta.region
        size = 1 + sum(1 for p in view if p.region == region)
        want = cfg.min_region(region)
        if size < want:
            self._region_warned = True
            key = ("energy_min_active." + region if region in cfg.min_active_by_region
                   else "energy_min_active_per_region")
            detail = (f"{key} {want} is more than the {size} consolidating node(s) of "
                      f"region {region!r}: none of them will sleep")
            self.agent.record_event("capacity", self.agent.name, detail=detail)
            self.agent.log("warning", "capacity_minimum_above_region", detail=detail)

    def demand(self) -> None:
        """A task granted here found the workers stopped."""
        if self.ctl.state is PowerState.STANDBY:
            self._woken_by_task = True
        self.ctl.demand(time.time())
        self._act()

    def hold(self) -> str | None:
        why = self.ctl.hold(time.time())
        self._act()
        return why

    def release(self) -> None:
        self.ctl.release(time.time())
        self._act()

    # ------------------------------------------------------------------ acting

    def _act(self) -> None:
        events = self.ctl.drain()
        for ev in events:
            self._note(ev)
        if events:
            self._publish(force=True)
            self._kick.set()

    def _note(self, ev: CapacityTransition) -> None:
        detail = f"{ev.old} -> {ev.new}: {ev.reason}"
        self.agent.record_event("capacity", self.agent.name, detail=detail)
        self.agent.log("info", "capacity", old=str(ev.old), new=str(ev.new),
                       reason=ev.reason)
        self.agent.stats.runtime[f"capacity_to_{ev.new}"] += 1
        if self._on_state is not None:
            self._on_state(ev.new)
        if ev.new is PowerState.WAKING:
            self._wake_started = time.monotonic()

    async def _loop(self) -> None:
        while True:
            # (A Wakeup, not wait_for on an Event: no task made per wait, every second.)
            await self._kick.wait(self.settings.interval_s)
            try:
                self.step()
                await self._converge()
                self._publish()
            except Exception as e:  # consolidation must not take the node down
                self.agent.log_limited("capacity_step_failed", error=repr(e)[:300])

    async def _converge(self) -> None:
        """Bring the worker processes in line with the state: none on standby, a pool
        while awake (started on waking, then ``ready``)."""
        async with self._acting:
            st = self.ctl.state
            w = self.workers
            if st is PowerState.STANDBY and w.workers_running():
                await w.stop_workers()
                self.agent.log("info", "capacity_workers_stopped")
            elif st is not PowerState.STANDBY and not w.workers_running():
                if st is not PowerState.WAKING:
                    return  # the plane is still starting its first pool
                await w.start_workers()
            if self.ctl.state is PowerState.WAKING and w.workers_running():
                started = self._wake_started
                wake_s = 0.0 if started is None else time.monotonic() - started
                self.wake_s = [*self.wake_s[-31:], wake_s]
                by_task = self._woken_by_task
                self._woken_by_task = False
                self.ctl.ready(time.time())
                self._act()
                runtime = self.agent.stats.runtime
                runtime["capacity_wake_ms_last"] = round(wake_s * 1000)
                if by_task:
                    runtime["capacity_wake_to_task_ms_last"] = round(wake_s * 1000)
                self.agent.log("info", "capacity_awake", wake_s=round(wake_s, 3),
                               woken_by_task=by_task)

    def _publish(self, *, force: bool = False) -> None:
        """Put the node's entry in its tag: at once when its state changed, else when it
        changed and ``gossip_interval_s`` has passed. With consolidation off, only once
        the node has left ``active`` (an operator's hold)."""
        entry = self.ctl.entry()
        if self.settings.config.mode == "off" and self._published is None \
                and entry.state is PowerState.ACTIVE:
            return
        text = encode_tag(entry)
        if text == self._published:
            return
        now = time.monotonic()
        if not force and entry.state is self._publish_state \
                and now - self._published_at < self.settings.gossip_interval_s:
            return
        try:
            self.agent.set_tag(POWER_TAG, text)
        except ValueError as e:  # the node's metadata would be over its bound
            self.agent.log_limited("capacity_tag_not_gossiped", error=str(e))
            return
        self._published = text
        self._published_at = now
        self._publish_state = entry.state

    def describe(self) -> dict[str, Any]:
        return {"state": str(self.ctl.state), "held": self.ctl.held,
                "sole_copies": self.sole, "wake_s": list(self.wake_s)}
