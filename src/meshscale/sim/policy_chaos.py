"""Data-class policies under chaos: puts of classed objects, deletes, crashes, restarts,
pauses, partitions and policy changes (narrowing and widening a class's regions) over the
simulated data plane (``sim.dataplane.DataMesh``), checked by oracles at every step.

Policies and what a node knows of them. The truth is the latest version of each class's
policy the admin set. Each node has its own view (``DataNode.policies``, on its disk): a
change reaches a node ``uniform(0, refresh_s)`` after it was set, as the runtime's cache
refresh does (``policy_refresh_s``), if the node is up and can reach some node that
already knows it; else it is tried again every ``refresh_s`` (a crashed or cut-off node
hears when it is back). On hearing a change a node does what the runtime's
``policy.migrate_local`` does: each of its copies of the class whose rule the new regions
break gets the rule ``core.policy.migrated_regions`` decides, and is handed to its replica
manager again under it, so that the ordinary re-replication moves it.

The oracles. A node's *current* rule for a class is the policy version in its view. The
state the oracles look at changes only when a copy is committed, when a node hears a
change, or as time passes; they are checked at each of these steps: on every
``ObjectCommitted`` (the copy made), right after a node applies a change, and on a scan of
every node's disk every ``scan_s`` of virtual time:

- ``commit``: a copy of a class is made only where the committing node's current rule and
  the copy's own rule allow its region (``copy_refusal`` finds nothing).
- ``stale rule``: every copy of a class a node holds (its disk, up or down) carries a rule
  no wider than the node's current rule for the class: a node that heard of a narrowing
  rewrote every copy the narrowing broke. A copy outside the region of the node's current
  rule is allowed only with a rule that excludes that region (marked to move: the replica
  manager hands it off and drops it once the new set holds it). A copy whose header named
  the class only (no regions of its own) is under the class's rule.
- ``end``: once faults stop, partitions heal, every node has heard every change and the
  repair bound has passed: every node's view is the truth, no up node holds a copy of a
  class outside the class's current regions, and no up node holds a deleted object.
- ``audit``: each node records what it did (copy made, copy dropped, refusal, policy
  change) in a hash-chained log (``core.audit``) kept on its disk; every chain verifies at
  the end.

``break_`` breaks one decision, to show that the oracles can fail: ``receiver`` (receivers
skip ``copy_refusal``), ``stale_rule`` (receivers keep a copy under the rule its sender
stated, which is wider than the class's when the sender has not heard of a narrowing) or
``migration`` (one node updates its view but leaves its copies' rules as they were), or
``fanout`` (what the runtime's ``policy set --migrate`` did before its members migrated
their own copies on a cache refresh: only the members the setting node reaches at that
moment rewrite their copies; a member down or cut off then hears of the policy later
through its cache refresh but never rewrites its copies).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

from meshscale.core.audit import (
    ZERO_HASH,
    AuditEntry,
    Kind,
    encode_entry,
    entry_hash,
    record_of,
    verify_records,
)
from meshscale.core.outputs import DrivenProtocol, Event
from meshscale.core.placement import Residency
from meshscale.core.policy import ClassPolicy, copy_refusal, make_policy, migrated_regions
from meshscale.core.replication import DropLocal, ObjectPolicy
from meshscale.sim.dataplane import CopyRefused, DataMesh, DataNode, ObjectCommitted

__all__ = ["PolicyChaosReport", "policy_chaos_run", "verify_audit"]


def _delete(p: DrivenProtocol, oid: str, policy: ObjectPolicy, now: float,
            holders: tuple[str, ...]) -> None:
    assert isinstance(p, DataNode)
    p.delete(oid, policy, now, holders)

CLASSES = ("pii", "fin", "ops")


@dataclass
class PolicyChaosReport:
    seed: int
    acked: int
    failed: int
    deleted: int
    changes: list[str]
    """The policy changes set: ``time class old -> new``."""
    faults: list[str]
    violations: list[str] = field(default_factory=list)
    """Every oracle breach (must be empty)."""
    audit_breaks: list[str] = field(default_factory=list)
    """Chains that did not verify (must be empty)."""
    refused: int = 0
    migrated: int = 0
    """Copies whose rule a node rewrote on hearing a change."""
    scans: int = 0
    commits_checked: int = 0
    audit_entries: int = 0
    trace_hash: str = ""

    def problems(self) -> list[str]:
        return self.violations + [f"audit: {b}" for b in self.audit_breaks]


def _regions_of(res: Residency | None) -> frozenset[str] | None:
    return None if res is None else res.regions


def _audit(node: DataNode, kind: Kind, subject: str, data_class: str | None,
           from_region: str, detail: str, now: float) -> None:
    """Append an entry to ``node``'s chain (kept on its disk: it outlives a crash)."""
    chain: list[bytes] = node.disk.setdefault("audit", [])
    prev = node.disk.get("audit_head", ZERO_HASH)
    entry = AuditEntry(len(chain) + 1, prev, kind, "", "node", subject[:256],
                       data_class or "", from_region, node.region,
                       node.hlc.now(now).encode(), now, detail[:256])
    enc = encode_entry(entry)
    chain.append(record_of(enc)[4:])
    node.disk["audit_head"] = entry_hash(enc)


def verify_audit(mesh: DataMesh) -> list[str]:
    """Every node's chain checked (``core.audit.verify_records``); the breaks found."""
    out = []
    for n in mesh.names:
        chain: list[bytes] = mesh.node(n).disk.get("audit", [])
        brk = verify_records(chain)
        if brk is not None:
            out.append(f"{n}: {brk.describe()}")
    return out


def policy_chaos_run(
    seed: int,
    *,
    nodes: int = 12,
    objects: int = 36,
    changes: int = 4,
    deletes: int = 4,
    fault_until: float = 60.0,
    repair_bound_s: float = 40.0,
    refresh_s: float = 3.0,
    scan_s: float = 0.25,
    break_: str | None = None,
) -> PolicyChaosReport:
    """One randomized run (see the module docstring); the report lists every breach."""
    mesh = DataMesh(nodes, seed=seed)
    sim = mesh.sim
    rng = random.Random(f"policy-chaos/{seed}")
    regions = sorted(mesh.topology.regions)
    region_of = {n: mesh.metas[n].region for n in mesh.names}
    truth: dict[str, ClassPolicy] = {}
    version: dict[str, int] = {}
    report = PolicyChaosReport(seed, 0, 0, 0, [], [])
    violations = report.violations
    migration_skipper = mesh.names[rng.randrange(nodes)] if break_ == "migration" else None
    reached: dict[tuple[str, int], set[str]] = {}
    """``fanout``: the nodes the admin's ``policy.migrate_local`` fan-out reached."""

    # Initial policies, known everywhere at the start.
    start_regions = [regions[:1], regions[:2], regions]
    for cls, regs in zip(CLASSES, start_regions, strict=True):
        truth[cls] = make_policy(cls, regs, replicas=3)
        version[cls] = 0
    for n in mesh.names:
        node = mesh.node(n)
        node.policies.update(truth)
        node.disk["policy_version"] = dict(version)
        if break_ == "receiver":
            node.check_residency = False
        elif break_ == "stale_rule":
            node.narrow_rules = False

    def view_version(n: str, cls: str) -> int:
        got: dict[str, int] = mesh.node(n).disk.get("policy_version", {})
        return got.get(cls, -1)

    # ------------------------------------------------------------ the oracles

    def check_copy(n: str, oid: str, when: str) -> None:
        node = mesh.node(n)
        stored = node.objects.get(oid)
        if stored is None or stored.policy.residency is None:
            return
        cls = stored.policy.residency.data_class
        known = node.policies.get(cls) if cls is not None else None
        if cls is None or known is None:
            return
        own = _regions_of(stored.policy.residency)
        if own is not None and not own <= frozenset(known.regions):
            violations.append(
                f"{sim.now:.3f} {when}: {n} holds {oid[:12]} of class {cls} under rule "
                f"{sorted(own)}, wider than its current rule "
                f"{list(known.regions)} (version {view_version(n, cls)})")
        elif region_of[n] not in known.regions and (own is None or region_of[n] in own):
            violations.append(
                f"{sim.now:.3f} {when}: {n} in {region_of[n]} keeps {oid[:12]} of class {cls} "
                f"as a replica, outside its current rule {list(known.regions)}")

    def scan() -> None:
        report.scans += 1
        for n in mesh.names:
            for oid in sorted(mesh.node(n).objects):
                check_copy(n, oid, "scan")

    def observe(t: float, n: str, ev: Event) -> None:
        node = mesh.node(n)
        if isinstance(ev, ObjectCommitted):
            report.commits_checked += 1
            stored = node.objects.get(ev.oid)
            if stored is not None:
                why = copy_refusal(node.region, stored.policy.residency, node.policies)
                if why is not None:
                    violations.append(f"{t:.3f} commit: {n} made a copy of {ev.oid[:12]} "
                                      f"outside its rule: {why}")
                check_copy(n, ev.oid, "commit")
                res = stored.policy.residency
                _audit(node, Kind.COPY_MADE, ev.oid, None if res is None else res.data_class,
                       "", "hinted" if ev.hint_for else "", t)
        elif isinstance(ev, DropLocal):
            _audit(node, Kind.COPY_DROPPED, ev.oid, None, "", "", t)
        elif isinstance(ev, CopyRefused):
            report.refused += 1
            _audit(node, Kind.REFUSAL, ev.oid, ev.data_class, region_of.get(ev.src, ""),
                   ev.reason, t)

    sim.observers.append(observe)

    # ------------------------------------------------------------ policy changes

    def apply(cls: str, ver: int, policy: ClassPolicy, p: DrivenProtocol, now: float) -> None:
        """What a node does on hearing a change: the runtime's ``policy.migrate_local``."""
        assert isinstance(p, DataNode)
        versions: dict[str, int] = p.disk.setdefault("policy_version", {})
        if versions.get(cls, -1) >= ver:
            return
        versions[cls] = ver
        p.policies[cls] = policy
        _audit(p, Kind.POLICY_CHANGE, cls, cls, "", f"heard {policy.describe()}", now)
        if p.name != migration_skipper and (break_ != "fanout"
                                            or p.name in reached.get((cls, ver), ())):
            for oid in sorted(p.objects):
                s = p.objects[oid]
                res = s.policy.residency
                if res is None or res.data_class != cls:
                    continue
                target = migrated_regions(res.regions, policy)
                if target is None:
                    continue
                s.policy = ObjectPolicy(s.policy.replicas, Residency(target, cls))
                report.migrated += 1
                p.replicas.object_removed(oid, now)
                p.replicas.object_added(oid, s.policy, s.hint_for, now, s.written)
            report.migrated += len(p.replicas.migrate_tombstones(policy))
        p._settle(now)
        for oid in sorted(p.objects):
            check_copy(p.name, oid, "heard")

    def deliver(n: str, cls: str, ver: int) -> None:
        if view_version(n, cls) >= ver or version[cls] != ver:
            return  # heard, or superseded (the newer version's delivery carries on)
        knowers = [m for m in mesh.up() if view_version(m, cls) >= ver]
        if sim.is_up(n) and any(sim.connected(n, m) for m in knowers):
            sim.call(n, partial(apply, cls, ver, truth[cls]))
        sim.at(sim.now + refresh_s, partial(deliver, n, cls, ver))

    def change() -> None:
        # The admin's node must run the change now: a change asked of a paused node that
        # crashed before it resumed was never set (the client had no answer), and must
        # not count as the truth (swarm seed 1018236081 of the policy plane).
        up = [n for n in mesh.up() if not sim.is_paused(n)]
        if not up:
            return
        cls = CLASSES[rng.randrange(len(CLASSES))]
        old = truth[cls]
        cur = list(old.regions)
        if len(cur) > 1 and rng.random() < 0.6:
            new_regions = rng.sample(cur, rng.randint(1, len(cur) - 1))
        else:
            outside = [r for r in regions if r not in cur]
            if not outside:
                new_regions = rng.sample(cur, len(cur) - 1)
            else:
                new_regions = [*cur, outside[rng.randrange(len(outside))]]
        new = make_policy(cls, new_regions, replicas=old.replicas)
        version[cls] += 1
        ver = version[cls]
        truth[cls] = new
        admin = up[rng.randrange(len(up))]
        report.changes.append(f"{sim.now:.1f} {cls} {list(old.regions)} -> "
                              f"{list(new.regions)} at {admin}")
        sim.call(admin, partial(apply, cls, ver, new))
        if break_ == "fanout":
            # The runtime today: the node that sets the policy asks the members it reaches
            # now to migrate; the others only ever refresh their view of the policy.
            reached[(cls, ver)] = {n for n in mesh.up() if sim.connected(admin, n)}
            for n in sorted(reached[(cls, ver)] - {admin}):
                sim.call(n, partial(apply, cls, ver, new))
        for n in mesh.names:
            if n != admin:
                sim.at(sim.now + rng.uniform(0.0, refresh_s), partial(deliver, n, cls, ver))

    # ------------------------------------------------------------ puts and deletes

    def put(i: int) -> None:
        up = mesh.up()
        if not up:
            return
        coord = up[rng.randrange(len(up))]
        cls = CLASSES[i % len(CLASSES)]
        if i % 2 == 0:
            # A header naming the class only: the receivers' own checks must hold it.
            res = Residency(None, cls)
        else:
            # A full rule, resolved from the coordinator's view of the class.
            known = mesh.node(coord).policies[cls]
            res = Residency(frozenset(known.regions), cls)
        mesh.put_async(coord, f"policy-object-{seed}-{i}".encode(), ObjectPolicy(3, res), 2)

    def delete() -> None:
        """A delete as the runtime's ``obj.delete`` runs it: the coordinator asks the
        members it reaches for their copies, takes the rule of the first holder's copy
        (its current rule, rewritten by a migration), and tells every holder at once."""
        up = mesh.up()
        live = [oid for oid in sorted(mesh.live()) if oid not in mesh.delete_requests]
        if not up or not live:
            return
        coord = up[rng.randrange(len(up))]
        oid = live[rng.randrange(len(live))]
        held = [n for n in up if sim.connected(coord, n) and oid in mesh.node(n).objects]
        if not held:
            return
        policy = mesh.node(held[0]).objects[oid].policy
        mesh.delete_requests.add(oid)
        sim.call(coord, lambda p, now: _delete(p, oid, policy, now, tuple(held)))

    sim.run_until(2.0)
    for i in range(objects):
        sim.at(2.0 + (fault_until - 4.0) * i / objects, partial(put, i))
    for k in range(changes):
        sim.at(10.0 + (fault_until - 15.0) * (k + rng.random()) / changes, change)
    for k in range(deletes):
        sim.at(15.0 + (fault_until - 20.0) * (k + rng.random()) / deletes, delete)

    # ------------------------------------------------------------ faults

    transient: dict[str, float] = {}

    def inject() -> None:
        now = sim.now
        for n, until in sorted(transient.items()):
            if until <= now:
                del transient[n]
                mesh.restart(n)
                report.faults.append(f"{now:.1f} restart {n}")
        up = [n for n in mesh.up() if n not in transient]
        if len(up) <= nodes // 2:
            return
        roll = rng.random()
        victim = up[rng.randrange(len(up))]
        if roll < 0.35 and len(transient) < 2:
            transient[victim] = now + rng.uniform(4.0, 15.0)
            mesh.crash(victim)
            report.faults.append(f"{now:.1f} crash {victim}")
        elif roll < 0.6:
            d = rng.uniform(1.0, 6.0)
            sim.pause(victim, d)
            report.faults.append(f"{now:.1f} pause {victim} {d:.1f}")
        elif roll < 0.9:
            cut = list(up)
            rng.shuffle(cut)
            side = cut[: rng.randint(1, len(cut) // 2)]
            sim.partition(side, [n for n in mesh.names if n not in side])
            sim.at(min(now + rng.uniform(3.0, 12.0), fault_until), sim.heal)
            report.faults.append(f"{now:.1f} partition {','.join(sorted(side))}")

    t = 12.0
    while t < fault_until:
        sim.at(t, inject)
        t += rng.uniform(2.0, 4.0)
    end = fault_until + refresh_s + repair_bound_s
    k = 1
    while k * scan_s <= end:
        sim.at(k * scan_s, scan)
        k += 1

    sim.run_until(fault_until)
    sim.heal()
    for n in sorted(transient):
        mesh.restart(n)
        report.faults.append(f"{sim.now:.1f} restart {n}")
    transient.clear()
    sim.run_until(end)
    scan()

    # ------------------------------------------------------------ the end state
    for n in mesh.up():
        for name in CLASSES:
            if view_version(n, name) != version[name]:
                violations.append(f"end: {n} never heard version {version[name]} of {name} "
                                  f"(has {view_version(n, name)})")
        for oid, s in sorted(mesh.node(n).objects.items()):
            res = s.policy.residency
            held = None if res is None else res.data_class
            if held is not None and region_of[n] not in truth[held].regions:
                violations.append(f"end: {n} in {region_of[n]} still holds {oid[:12]} of "
                                  f"class {held} (regions {list(truth[held].regions)})")
    for oid in mesh.resurrected():
        violations.append(f"end: deleted {oid[:12]} still held by a live node")
    for t_commit, n, oid, written in mesh.late_commits:
        if written is not None and written > mesh.delete_ts[oid]:
            violations.append(f"{t_commit:.3f} {n}: copy of deleted {oid[:12]} written "
                              "after its delete")
    report.audit_breaks = verify_audit(mesh)
    report.audit_entries = sum(len(mesh.node(n).disk.get("audit", [])) for n in mesh.names)
    report.acked = len(mesh.acked)
    report.failed = sum(1 for r in mesh.results.values() if not r.acked)
    report.deleted = len(mesh.deleted)
    report.trace_hash = sim.trace_hash()
    return report
