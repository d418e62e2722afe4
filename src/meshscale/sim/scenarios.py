"""Membership scenarios in the simulator, shared by tests, the benchmark and the demo.

``SwimMesh`` builds a mesh of ``core.membership.Membership`` nodes in a ``Simulator``
and watches what they say (joins, suspicions, deaths) so that a scenario can ask the
questions the issue asks: when did every live node mark X dead, did anyone ever mark a
live node dead, does every node hold the same view.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meshscale.core.membership import (
    Member,
    MemberAlive,
    MemberDown,
    MemberJoined,
    MemberLeft,
    Membership,
    MembershipConfig,
    MemberSuspect,
    MemberUpdated,
    NodeMeta,
    State,
)
from meshscale.core.outputs import DrivenProtocol, Event
from meshscale.core.vivaldi import estimate_rtt
from meshscale.sim.engine import NodeContext, Simulator
from meshscale.sim.topology import Placement, Topology


@dataclass
class Observed:
    """What the nodes of a mesh said, as (time, observer, subject) records."""

    downs: list[tuple[float, str, str]] = field(default_factory=list)
    suspects: list[tuple[float, str, str]] = field(default_factory=list)
    alives: list[tuple[float, str, str]] = field(default_factory=list)
    joins: list[tuple[float, str, str]] = field(default_factory=list)
    lefts: list[tuple[float, str, str]] = field(default_factory=list)
    updates: list[tuple[float, str, str, NodeMeta]] = field(default_factory=list)


class SwimMesh:
    """A simulated mesh of SWIM nodes named ``n0 .. n{N-1}``."""

    def __init__(
        self,
        nodes: int,
        *,
        seed: int,
        topology: Topology | None = None,
        config: MembershipConfig | None = None,
        converged: bool = True,
        loss: float = 0.0,
        record_trace: bool = False,
        on_event: list[tuple[float, str, Event]] | None = None,
        placements: Sequence[Placement] | None = None,
    ) -> None:
        """``placements``, one per node, lays the nodes out (``nodes`` is then ignored);
        by default they are spread round robin over the topology."""
        if gc.get_freeze_count():
            # An earlier large mesh froze its objects (below), and frozen objects are
            # never collected: a mesh's nodes hold cycles (bound methods in their
            # handler tables), so every mesh a process built stayed in memory (a
            # 10,000-node benchmark held both of its meshes, over 6 GB). Let go of
            # those nobody refers to before building this one.
            gc.unfreeze()
            gc.collect()
        self.topology = topology or Topology.three_regions()
        self.config = config or MembershipConfig()
        self.sim = Simulator(self.topology, seed, loss=loss, record_trace=record_trace)
        if placements is not None:
            nodes = len(placements)
        self.names = [f"n{i}" for i in range(nodes)]
        laid_out = list(placements) if placements is not None else self.topology.place(nodes)
        self.placements = dict(zip(self.names, laid_out, strict=True))
        self.seen = Observed()
        self._event_log = on_event
        self.sim.observers.append(self._observe)
        metas = {
            n: NodeMeta(region=p.region, zone=p.zone) for n, p in self.placements.items()
        }
        self._metas = metas
        for name in self.names:
            self.sim.add_node(name, self.placements[name], self._factory)
        if converged:
            records = {
                n: Member(n, n, 0, State.ALIVE, metas[n], 0.0, shared=True) for n in self.names
            }
            live = len(records)  # all alive
            # Installing N views of N members makes N^2 pointers and no garbage: the
            # cyclic GC would walk them again and again (a third of a 10,000-node start).
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                for name in self.names:
                    self.sim.call(
                        name, lambda p, now: _install(p, records, self.names, now, live))
            finally:
                if was_enabled:
                    gc.enable()
            if nodes >= 500:
                # A thousand views of a thousand members are long-lived containers:
                # keep the cyclic GC from walking them over and over (at 1,000 nodes
                # its older generations took a seventh of a run's CPU time).
                gc.collect()
                gc.freeze()
        else:
            seed_node = self.names[0]
            for name in self.names[1:]:
                self.sim.call(name, lambda p, now: _join(p, [seed_node], now))

    # ------------------------------------------------------------------ plumbing

    def _factory(self, ctx: NodeContext) -> DrivenProtocol:
        # The data dir keeps the incarnation; a restart comes back one higher.
        inc = ctx.disk.get("incarnation", -1) + 1
        ctx.disk["incarnation"] = inc
        m = Membership(
            ctx.name,
            ctx.name,
            self._metas[ctx.name],
            config=self.config,
            rng=ctx.rng,
            now=ctx.now,
            incarnation=inc,
            verify_revocation=sim_revocation_name,
        )
        if ctx.restarts:
            m.join([n for n in self.names if n != ctx.name][:3], ctx.now)
        return m

    def _observe(self, t: float, node: str, ev: Event) -> None:
        s = self.seen
        if isinstance(ev, MemberDown):
            s.downs.append((t, node, ev.name))
        elif isinstance(ev, MemberSuspect):
            s.suspects.append((t, node, ev.name))
        elif isinstance(ev, MemberAlive):
            s.alives.append((t, node, ev.name))
        elif isinstance(ev, MemberJoined):
            s.joins.append((t, node, ev.name))
        elif isinstance(ev, MemberLeft):
            s.lefts.append((t, node, ev.name))
        elif isinstance(ev, MemberUpdated):
            s.updates.append((t, node, ev.name, ev.meta))
        if self._event_log is not None:
            self._event_log.append((t, node, ev))

    def remove(self, name: str, via: str) -> None:
        """The operator removes ``name`` for good, through node ``via`` (a revocation
        entry; see ``sim_revocation_entry``)."""
        self.sim.call(via, lambda p, now: _revoke(p, sim_revocation_entry(name), now))

    def all_see_removed(self, subject: str) -> bool:
        return all(self.node(n).state_of(subject) == State.REMOVED
                   for n in self.live() if n != subject)

    # ------------------------------------------------------------------ queries

    def node(self, name: str) -> Membership:
        proto = self.sim.protocol(name)
        assert isinstance(proto, Membership)
        return proto

    def live(self) -> list[str]:
        return [n for n in self.names if self.sim.is_up(n)]

    def sees_dead(self, observer: str, subject: str) -> bool:
        return self.node(observer).state_of(subject) in (State.DEAD, State.LEFT)

    def all_see_dead(self, subject: str) -> bool:
        return all(self.sees_dead(n, subject) for n in self.live() if n != subject)

    def view(self, observer: str) -> dict[str, State]:
        return {m.name: m.state for m in self.node(observer).members.values()}

    def converged_alive(self, expected: Iterable[str] | None = None) -> bool:
        """Every live node sees exactly ``expected`` (default: the live nodes) alive,
        and nothing else alive or suspect."""
        want = set(expected) if expected is not None else set(self.live())
        for n in self.live():
            if {m.name for m in self.node(n).live_members()} != want:
                return False
            if any(self.node(n).state_of(x) != State.ALIVE for x in want):
                return False
        return True

    def false_downs(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str, str]]:
        """Declarations of death about a node that was up at that moment."""
        crashed = self._crash_windows
        out = []
        for t, obs, subj in self.seen.downs:
            if t < since or t > until:
                continue
            if any(a <= t <= b for a, b in crashed.get(subj, [])):
                continue
            out.append((t, obs, subj))
        return out

    # ------------------------------------------------------------------ faults

    _crash_windows: dict[str, list[tuple[float, float]]]

    def crash(self, name: str) -> None:
        self.sim.crash(name)
        self.__dict__.setdefault("_crash_windows", {}).setdefault(name, []).append(
            (self.sim.now, float("inf"))
        )

    def restart(self, name: str) -> None:
        windows = self.__dict__.setdefault("_crash_windows", {}).get(name, [])
        if windows and windows[-1][1] == float("inf"):
            windows[-1] = (windows[-1][0], self.sim.now)
        self.sim.restart(name)

    def __getattr__(self, item: str) -> object:
        if item == "_crash_windows":
            self.__dict__["_crash_windows"] = {}
            return self.__dict__["_crash_windows"]
        raise AttributeError(item)

    # ------------------------------------------------------------------ measures

    def detect(self, victim: str, *, timeout: float = 60.0) -> tuple[float, float]:
        """Crash ``victim`` now; return (first node marks it dead, every live node
        does), in seconds after the crash (``inf`` if not within ``timeout``)."""
        t0 = self.sim.now
        self.crash(victim)
        ok = self.sim.run_until_true(lambda: self.all_see_dead(victim), t0 + timeout, 0.05)
        firsts = [t for t, _, subj in self.seen.downs if subj == victim and t >= t0]
        first = min(firsts) - t0 if firsts else float("inf")
        if not ok:
            return first, float("inf")
        last = max(
            (t for t, obs, subj in self.seen.downs if subj == victim and t >= t0),
            default=self.sim.now,
        )
        return first, last - t0

    def disseminate(self, origin: str, *, timeout: float = 30.0) -> float:
        """Change ``origin``'s metadata now; seconds until every live node has it."""
        t0 = self.sim.now
        old = self.node(origin).meta
        new = NodeMeta(old.region, old.zone, {**old.labels, "version": f"{t0:.3f}"},
                       old.capacity, old.tags)
        self.sim.call(origin, lambda p, now: _update(p, new, now))

        def everyone() -> bool:
            return all(
                self.node(n).members[origin].meta == new
                for n in self.live()
                if origin in self.node(n).members
            )

        if not self.sim.run_until_true(everyone, t0 + timeout, 0.02):
            return float("inf")
        last = max(
            (t for t, _, subj, meta in self.seen.updates if subj == origin and meta == new),
            default=self.sim.now,
        )
        return last - t0

    def vivaldi_errors(self, max_pairs: int = 20_000) -> list[float]:
        """|estimated - true| / true RTT over node pairs, from each node's own
        coordinate (a sample of pairs when there are many)."""
        names = self.live()
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        if len(pairs) > max_pairs:
            pairs = self.sim.rng.sample(pairs, max_pairs)
        errs = []
        for a, b in pairs:
            true = self.sim.true_rtt(a, b)
            est = estimate_rtt(self.node(a).coordinate(), self.node(b).coordinate())
            errs.append(abs(est - true) / true)
        return errs


def sim_revocation_entry(name: str) -> bytes:
    """A revocation entry as the simulator models it: the runtime's are CA-signed and
    checked with the CA certificate; here, knowing the format is enough."""
    return b"sim-revoke:" + name.encode()


def sim_revocation_name(entry: bytes) -> str | None:
    prefix = b"sim-revoke:"
    return entry[len(prefix):].decode() if entry.startswith(prefix) else None


def _revoke(p: DrivenProtocol, entry: bytes, now: float) -> None:
    assert isinstance(p, Membership)
    p.revoke(entry, now)


def _install(p: DrivenProtocol, records: dict[str, Member], order: list[str], now: float,
             live: int) -> None:
    assert isinstance(p, Membership)
    p.install_shared_view(records, order, now, live)


def _join(p: DrivenProtocol, seeds: list[str], now: float) -> None:
    assert isinstance(p, Membership)
    p.join(seeds, now)


def _update(p: DrivenProtocol, meta: NodeMeta, now: float) -> None:
    assert isinstance(p, Membership)
    p.update_meta(meta, now)


def detect_all_s(nodes: int, seed: int = 1, config: MembershipConfig | None = None,
                 topology: Topology | None = None, trials: int = 3) -> float:
    """Median seconds from a crash to every live node marking it dead, in a converged
    simulated mesh (the runtime benchmark compares itself with this)."""
    mesh = SwimMesh(nodes, seed=seed, config=config, topology=topology)
    mesh.sim.run_until(5.0)
    results = []
    for i in range(trials):
        victim = mesh.names[(i * 7 + 1) % nodes]
        _, all_s = mesh.detect(victim)
        results.append(all_s)
        mesh.sim.run_until(mesh.sim.now + 2.0)
    return statistics.median(results)
