"""core.puts: a put planned once, and the fate of a coordinator's spare copy."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.placement import Candidate, PlacementError, Residency, write_set
from meshscale.core.puts import (
    PutPlan,
    SpareFate,
    check_feasible,
    plan_put,
    spare_fate,
    spare_may_source,
)
from meshscale.core.replication import (
    ObjectPolicy,
    PutAcked,
    ReplicaManager,
    ReplicationConfig,
    Transfer,
)

VIEW = [
    Candidate("eu1", "eu", "eu-a"),
    Candidate("eu2", "eu", "eu-b"),
    Candidate("eu3", "eu", "eu-c"),
    Candidate("us1", "us", "us-a"),
    Candidate("us2", "us", "us-b"),
    Candidate("ap1", "ap", "ap-a"),
]
REGION = {c.name: c.region for c in VIEW}
EU = ObjectPolicy(3, Residency(frozenset({"eu"}), "pii"))
ANY = ObjectPolicy(3)


def _plan(me: str, policy: ObjectPolicy = ANY, oid: str = "obj", w: int = 2,
          early: bool = True, view: list[Candidate] = VIEW) -> PutPlan:
    return plan_put(oid, me, REGION[me], view, policy, w, early_copies=early)


def test_a_member_coordinator_forwards_to_the_others_and_keeps_a_member_copy() -> None:
    targets = tuple(c.name for c in write_set("obj", VIEW, 3))
    plan = _plan(targets[0])
    assert plan.targets == targets and plan.member and not plan.spare
    assert plan.forwards == targets[1:]


def test_a_coordinator_outside_the_set_keeps_a_spare_only_where_the_rule_allows() -> None:
    outside = _plan("us1", EU)
    assert sorted(outside.targets) == ["eu1", "eu2", "eu3"] and outside.forwards == outside.targets
    assert outside.spare and not outside.member and not outside.may_keep
    assert not spare_may_source(outside)
    # Inside the rule but outside the set (a 2-replica eu object and a third eu node).
    two = ObjectPolicy(2, EU.residency)
    targets = [c.name for c in write_set("obj", VIEW, 2, EU.residency)]
    spare_holder = next(n for n in ("eu1", "eu2", "eu3") if n not in targets)
    inside = _plan(spare_holder, two)
    assert inside.spare and inside.may_keep and spare_may_source(inside)


def test_without_early_copies_there_are_no_forwards_and_no_spare() -> None:
    plan = _plan("us1", EU, early=False)
    assert plan.forwards == () and not plan.spare and not plan.member


def test_refusals_name_the_rule() -> None:
    with pytest.raises(PlacementError) as exc:
        _plan("us1", ObjectPolicy(3, Residency(frozenset({"mars"}))))
    assert exc.value.rule == "residency"
    with pytest.raises(PlacementError) as exc:
        check_feasible(VIEW, ObjectPolicy(3, Residency(frozenset({"ap"}))), 2)
    assert exc.value.rule == "replicas" and str(exc.value).startswith("replicas rule: ")
    full = [Candidate(c.name, c.region, c.zone, full=c.region == "eu") for c in VIEW]
    with pytest.raises(PlacementError) as exc:
        check_feasible(full, EU, 1)
    assert exc.value.rule == "disk_full" and "'obj'" not in str(exc.value)
    with pytest.raises(ValueError):
        _plan("us1", w=4)


def test_a_put_short_of_its_replicas_is_refused_unless_degraded_is_allowed() -> None:
    """Two us nodes and replicas=3 inside us: the write set has 2. A caller that did not
    accept fewer copies is refused (rule replicas, naming both counts); one that did gets
    a plan for the 2 there are; the quorum still decides what cannot be done at all."""
    us3 = ObjectPolicy(3, Residency(frozenset({"us"})))
    with pytest.raises(PlacementError) as exc:
        check_feasible(VIEW, us3, 2, allow_degraded=False)
    assert exc.value.rule == "replicas" and "only 2 live node(s)" in str(exc.value)
    assert "replicas=3" in str(exc.value) and str(exc.value).startswith("replicas rule: ")
    with pytest.raises(PlacementError, match="only 2 live"):
        plan_put("obj", "us1", "us", VIEW, us3, 2, early_copies=True, allow_degraded=False)
    check_feasible(VIEW, us3, 2)  # the default (the simulator, the node's own puts)
    plan = plan_put("obj", "us1", "us", VIEW, us3, 2, early_copies=True)
    assert sorted(plan.targets) == ["us1", "us2"]
    # Enough nodes: nothing to allow.
    check_feasible(VIEW, EU, 2, allow_degraded=False)
    # A quorum larger than the nodes there are is refused either way.
    with pytest.raises(PlacementError):
        check_feasible(VIEW, us3, 3, allow_degraded=True)


def test_spare_fate() -> None:
    outside = _plan("us1", EU)
    # Outside the rule: dropped whatever became of the members' copies.
    assert spare_fate(outside, [True, True, True], committed=False) is SpareFate.DROP
    assert spare_fate(outside, [True, False, False], committed=False) is SpareFate.DROP
    two = ObjectPolicy(2, EU.residency)
    targets = [c.name for c in write_set("obj", VIEW, 2, EU.residency)]
    inside = _plan(next(n for n in ("eu1", "eu2", "eu3") if n not in targets), two)
    assert spare_fate(inside, [True, True], committed=False) is SpareFate.DROP
    assert spare_fate(inside, [True, False], committed=False) is SpareFate.COMMIT
    assert spare_fate(inside, [True, True], committed=True) is SpareFate.KEEP


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 3), st.sampled_from(sorted(REGION)))
def test_a_spare_never_outlives_its_put_outside_the_rule(seed: int, replicas: int,
                                                         me: str) -> None:
    rng = random.Random(seed)
    region = rng.choice(["eu", "us", "ap"])
    policy = ObjectPolicy(replicas, Residency(frozenset({region})))
    try:
        plan = _plan(me, policy, oid=f"o{seed}", w=1)
    except PlacementError:
        return
    assert all(REGION[t] == region for t in plan.targets)
    if plan.spare:
        copies = [rng.random() < 0.5 for _ in plan.forwards]
        fate = spare_fate(plan, copies, committed=False)
        if REGION[me] != region:
            assert fate is SpareFate.DROP and not spare_may_source(plan)


def _rm(view: list[Candidate], me: str = "us1") -> ReplicaManager:
    m = ReplicaManager(me, config=ReplicationConfig(put_timeout_s=4.0), rng=random.Random(1),
                       now=0.0)
    m.set_view(view, 0.0)
    m.drain()
    return m


def test_the_managers_plan_is_the_pure_plan_over_its_own_view() -> None:
    m = _rm(VIEW)
    plan = m.plan_put("obj", EU, 2, early_copies=True)
    assert plan == dataclasses.replace(_plan("us1", EU, w=2), view=plan.view)
    with pytest.raises(PlacementError) as exc:
        m.check_put(ObjectPolicy(3, Residency(frozenset({"ap"}))), 2)
    assert exc.value.rule == "replicas"


def test_begin_put_sends_to_the_planned_targets_and_stands_in_for_a_gone_one() -> None:
    m = _rm(VIEW)
    plan = m.plan_put("obj", EU, 3, early_copies=True)
    m.begin_put(1, "obj", EU, 3, 0.0, plan=plan)
    assert [o.dst for o in m.drain() if isinstance(o, Transfer)] == list(plan.targets)
    # The view lost a planned target between the plan and begin_put (a member died while
    # the bytes arrived): a stand-in takes its copy; the others keep theirs.
    m2 = _rm(VIEW)
    plan2 = m2.plan_put("obj", EU, 3, early_copies=True)
    view = [c for c in VIEW if c.name != plan2.targets[1]] + [Candidate("eu4", "eu", "eu-d")]
    m2.set_view(view, 0.05)
    m2.drain()
    m2.begin_put(2, "obj", EU, 3, 0.1, plan=plan2)
    outs = [o for o in m2.drain() if isinstance(o, Transfer)]
    assert [o.dst for o in outs] == [plan2.targets[0], plan2.targets[2], "eu4"]
    assert outs[-1].hint_for == plan2.targets[1]
    for o in outs:
        m2.transfer_done(2, o.dst, "obj", True, 0.2)
    assert [o for o in m2.drain() if isinstance(o, PutAcked)]
    with pytest.raises(ValueError):
        m.begin_put(3, "other", EU, 3, 0.0, plan=plan)


def test_a_member_joining_between_plan_and_begin_put_changes_nothing() -> None:
    """The race the first attempt was reverted for: members join (or their tags change)
    right as a put arrives. The plan and ``begin_put`` both read the manager's view, so
    a view that grew in between only adds stand-in candidates: the planned targets get
    their copies and the put is acknowledged."""
    small = [*VIEW[:3], Candidate("us1", "us", "us-a")]
    for k in range(40):
        oid = f"o{k}"
        m = _rm(small)
        plan = m.plan_put(oid, ANY, 2, early_copies=True)
        m.set_view(VIEW, 0.01)  # the rest of the mesh joins
        m.drain()
        m.begin_put(k, oid, ANY, 2, 0.02, plan=plan)
        outs = [o for o in m.drain() if isinstance(o, Transfer)]
        assert [o.dst for o in outs] == list(plan.targets) and all(
            o.hint_for is None for o in outs)
        for o in outs:
            m.transfer_done(k, o.dst, oid, True, 0.03)
        assert [o for o in m.drain() if isinstance(o, PutAcked)], oid


def test_the_write_set_is_computed_once_per_put(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshscale.core.placement as placement
    import meshscale.core.puts as puts

    calls: list[str] = []
    real = puts.write_set
    real_placer = placement.Placer.write_set

    def counted(oid: str, *a: object, **kw: object) -> object:
        calls.append(oid)
        return real(oid, *a, **kw)  # type: ignore[arg-type]

    def placer_counted(self: placement.Placer, oid: str, *a: object, **kw: object) -> object:
        calls.append(oid)  # the replication manager places its copies with a Placer
        return real_placer(self, oid, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(puts, "write_set", counted)
    monkeypatch.setattr(placement.Placer, "write_set", placer_counted)
    m = _rm(VIEW)
    m.begin_put(1, "obj", ANY, 2, 0.0)  # planned inside begin_put
    plan = m.plan_put("obj2", ANY, 2, early_copies=True)
    m.begin_put(2, "obj2", ANY, 2, 0.0, plan=plan)  # planned earlier, not again
    assert calls == ["obj", "obj2"]
