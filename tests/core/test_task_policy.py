"""A classed task's rule at each placement (``core.policy.placement_residency``): its
submitted rule narrowed by its classes' current policies, never widened; no region left
is a refusal naming the rule. And the scheduler applying it when a runner is lost after
the class was narrowed (issue #15)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.placement import Candidate, Residency
from meshscale.core.policy import (
    ClassPolicy,
    PolicyError,
    make_policy,
    placement_residency,
    result_within,
)
from meshscale.core.scheduling import (
    InputRef,
    Load,
    NodeState,
    Resources,
    RunTask,
    Scheduler,
    SendMessage,
    TaskFailed,
    TaskSpec,
    TaskStopped,
)

R = frozenset


def pol(name: str, *regions: str) -> ClassPolicy:
    return make_policy(name, regions, replicas=1)


@pytest.mark.parametrize(("submitted", "classes", "policies", "want"), [
    # no class: as submitted
    (None, [], {}, None),
    (Residency(R({"a"})), [], {"pii": pol("pii", "b")}, Residency(R({"a"}))),
    # a class without a known policy narrows nothing
    (Residency(R({"a", "b"}), "pii"), ["pii"], {}, Residency(R({"a", "b"}), "pii")),
    # narrowed to the intersection, class kept
    (Residency(R({"a", "b"}), "pii"), ["pii"], {"pii": pol("pii", "b", "c")},
     Residency(R({"b"}), "pii")),
    # a wider class never widens the submitted rule
    (Residency(R({"a"}), "pii"), ["pii"], {"pii": pol("pii", "a", "b", "c")},
     Residency(R({"a"}), "pii")),
    # unbounded submitted rule: the class's regions
    (Residency(None, "pii"), ["pii"], {"pii": pol("pii", "c")}, Residency(R({"c"}), "pii")),
    # classes from the inputs only: the first class named
    (None, ["pii", "eu"], {"pii": pol("pii", "a", "b"), "eu": pol("eu", "b", "c")},
     Residency(R({"b"}), "eu")),
    (Residency(R({"a", "b", "c"}), "pii"), ["pii", "eu"],
     {"pii": pol("pii", "a", "b"), "eu": pol("eu", "b", "c")}, Residency(R({"b"}), "pii")),
])
def test_placement_residency_table(submitted: Residency | None, classes: list[str],
                                   policies: dict[str, ClassPolicy],
                                   want: Residency | None) -> None:
    assert placement_residency(submitted, classes, policies) == want


def test_no_region_left_is_refused_naming_both_rules() -> None:
    with pytest.raises(PolicyError) as e:
        placement_residency(Residency(R({"b"}), "pii"), ["pii"], {"pii": pol("pii", "a")})
    assert e.value.rule == "residency"
    msg = str(e.value)
    assert "regions {b}" in msg and "class pii" in msg and "regions={a}" in msg


@pytest.mark.parametrize(("out", "placed", "want"), [
    (None, Residency(R({"a"}), "pii"), None),
    (Residency(R({"a", "b"}), "pii"), None, Residency(R({"a", "b"}), "pii")),
    (Residency(None, "pii"), Residency(R({"a"}), "pii"), Residency(None, "pii")),
    (Residency(R({"a", "b"}), "pii"), Residency(R({"b", "c"}), "eu"), Residency(R({"b"}), "pii")),
    (Residency(R({"a"}), "pii"), Residency(R({"a", "b"}), "pii"), Residency(R({"a"}), "pii")),
    # nothing shared: as the owner chose it (the data plane refuses a copy outside)
    (Residency(R({"a"}), "pii"), Residency(R({"b"}), "pii"), Residency(R({"a"}), "pii")),
])
def test_result_within_the_placed_rule(out: Residency | None, placed: Residency | None,
                                       want: Residency | None) -> None:
    assert result_within(out, placed) == want


REGIONS = ["a", "b", "c", "d"]
regions_st = st.frozensets(st.sampled_from(REGIONS), min_size=1)


@settings(max_examples=300, deadline=None)
@given(submitted=st.none() | regions_st,
       current=st.dictionaries(st.sampled_from(["pii", "eu", "hr"]), regions_st, max_size=3),
       carried=st.lists(st.sampled_from(["pii", "eu", "hr"]), max_size=3))
def test_never_wider_than_either_rule(submitted: frozenset[str] | None,
                                      current: dict[str, frozenset[str]],
                                      carried: list[str]) -> None:
    policies = {c: pol(c, *sorted(r)) for c, r in current.items()}
    sub = None if submitted is None else Residency(submitted, carried[0] if carried else None)
    want: frozenset[str] | None = submitted
    for c in set(carried):
        if c in current:
            want = current[c] if want is None else want & current[c]
    if want is not None and not want:
        with pytest.raises(PolicyError):
            placement_residency(sub, carried, policies)
        return
    got = placement_residency(sub, carried, policies)
    if want is None:
        assert got is None or got.regions is None
        return
    assert got is not None and got.regions == want
    if submitted is not None:
        assert got.regions <= submitted
    for c in set(carried):
        if c in current:
            assert got.regions <= current[c]


# --------------------------------------------------------------------------- scheduler

CAP = Resources(4.0, 8000, 0)


def node(name: str, region: str) -> NodeState:
    return NodeState(Candidate(name, region, f"{region}-1", {}), CAP, Load(0, 0, CAP.cpus))


class Mesh:
    def __init__(self, view: list[NodeState]) -> None:
        self.s = {n.name: Scheduler(n.name, CAP, rng=random.Random(n.name), now=0.0)
                  for n in view}
        for s in self.s.values():
            s.set_view(view, 0.0)
        self.down: set[str] = set()
        self.runs: list[tuple[str, str]] = []
        self.failed: list[TaskFailed] = []
        self.stopped: list[tuple[str, str]] = []

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, s in self.s.items():
                for o in s.drain():
                    moved = True
                    if name in self.down:
                        continue
                    if isinstance(o, SendMessage) and o.dst not in self.down:
                        self.s[o.dst].handle_message(name, o.payload, 0.0)
                    elif isinstance(o, RunTask):
                        self.runs.append((o.task.task_id, name))
                    elif isinstance(o, TaskFailed):
                        self.failed.append(o)
                    elif isinstance(o, TaskStopped):
                        self.stopped.append((o.task_id, o.node))

    def kill(self, name: str, view: list[NodeState]) -> None:
        self.down.add(name)
        for n, s in self.s.items():
            if n not in self.down:
                s.set_view([v for v in view if v.name not in self.down], 1.0)
        self.pump()


def test_a_lost_runner_is_replaced_only_inside_the_narrowed_class() -> None:
    early = [node("o", "a"), node("b1", "b"), node("b2", "b")]
    full = [*early, node("c1", "c")]
    m = Mesh(full)
    for s in m.s.values():
        s.set_view(early, 0.0)  # c1 not seen yet: the task first runs in region b
    owner = m.s["o"]
    owner.submit([TaskSpec("t", residency=Residency(R({"b", "c"}), "pii"))], 0.0)
    m.pump()
    (_, runner), = m.runs
    assert runner in {"b1", "b2"}
    for s in m.s.values():
        s.set_view(full, 0.5)
    owner.set_policies({"pii": pol("pii", "a", "c")}, 0.5)
    assert owner.stats["policy_narrowed"] == 1
    m.kill(runner, full)
    assert m.runs[1:] == [("t", "c1")], m.runs  # not the other node of region b


def test_a_running_task_left_no_region_is_stopped_and_fails_naming_the_rule() -> None:
    view = [node("o", "a"), node("b1", "b"), node("b2", "b")]
    m = Mesh(view)
    owner = m.s["o"]
    inp = InputRef("obj", 10, ("b1",), Residency(R({"a", "b"}), "pii"))
    owner.submit([TaskSpec("t", residency=Residency(R({"b"}), "pii"), inputs=(inp,))], 0.0)
    m.pump()
    (_, runner), = m.runs
    owner.set_policies({"pii": pol("pii", "a")}, 0.5)
    m.pump()
    assert m.stopped == [("t", runner)], m.stopped
    (f,) = m.failed
    assert f.reason.startswith("residency:") and "class pii" in f.reason, f.reason
    assert owner.pending() == []
    owner.set_policies({"pii": pol("pii", "a")}, 0.6)
    m.pump()
    assert len(m.stopped) == 1 and len(m.failed) == 1  # once
    # The stopped runner's late result is not taken as the task's.
    m.s[runner].task_finished("o", "t", 1, True, "", 0.7)
    m.pump()
    assert owner.stats.get("results", 0) == 0


def test_a_running_task_outside_its_narrowed_class_is_stopped_and_runs_inside() -> None:
    view = [node("o", "a"), node("b1", "b"), node("c1", "c")]
    m = Mesh(view)
    owner = m.s["o"]
    for s in m.s.values():
        s.set_view(view[:2], 0.0)  # c1 not seen yet: the task first runs in region b
    owner.submit([TaskSpec("t", residency=Residency(R({"b", "c"}), "pii"))], 0.0)
    m.pump()
    assert m.runs == [("t", "b1")]
    for s in m.s.values():
        s.set_view(view, 0.4)
    owner.set_policies({"pii": pol("pii", "a", "b", "c")}, 0.45)  # still allowed: runs on
    m.pump()
    assert m.stopped == [] and len(m.runs) == 1
    owner.set_policies({"pii": pol("pii", "a", "c")}, 0.5)
    m.pump()
    assert m.stopped == [("t", "b1")]
    assert m.runs[1:] == [("t", "c1")], m.runs
    assert not m.failed
    # b1 was not killed in time and reports: dropped; c1's result is the task's.
    m.s["b1"].task_finished("o", "t", 1, True, "", 0.6)
    m.pump()
    assert owner.stats["results_dropped.stopped"] == 1
    assert owner.owner_state("t") == ("c1", 2)
    m.s["c1"].task_finished("o", "t", 2, True, "", 0.7)
    m.pump()
    assert owner.stats["results"] == 1 and owner.pending() == []


def test_a_run_given_up_on_then_left_out_by_its_class_is_never_the_answer() -> None:
    # The owner re-places a task off b1 (unreachable: only cut off), onto c1; then the
    # class leaves b out. Only the current binding (c1, allowed) is checked by the
    # narrowing; b1's run comes back later and must not become the task's answer: it is
    # dropped and stopped (the driver kills and audits it), and c1's is taken.
    view = [node("o", "a"), node("b1", "b"), node("c1", "c")]
    m = Mesh(view)
    owner = m.s["o"]
    for s in m.s.values():
        s.set_view(view[:2], 0.0)  # c1 not seen yet: the task first runs in region b
    owner.submit([TaskSpec("t", residency=Residency(R({"b", "c"}), "pii"))], 0.0)
    m.pump()
    assert m.runs == [("t", "b1")]
    for s in m.s.values():
        s.set_view(view, 0.2)
    assert owner.runner_unreachable("b1", 0.3) == 1
    m.pump()
    assert m.runs[1:] == [("t", "c1")], m.runs
    owner.set_policies({"pii": pol("pii", "a", "c")}, 0.5)
    m.pump()
    assert m.stopped == []  # c1 is allowed; b1 is no longer the binding
    assert owner.outcome_refusal("t", "c1", 0.55) is None
    # b1 was alive after all: its result (a Result message) comes first.
    m.s["b1"].task_finished("o", "t", 1, True, "", 0.6)
    m.pump()
    assert owner.stats["results_dropped.stopped"] == 1 and owner.stats.get("results", 0) == 0
    assert m.stopped == [("t", "b1")]
    assert owner.owner_state("t") == ("c1", 2)
    # The driver's check of a worker's outcome (task.done) refuses it the same way.
    assert owner.outcome_refusal("t", "b1", 0.65) == "task 't' was stopped on b1"
    m.s["c1"].task_finished("o", "t", 2, True, "", 0.7)
    m.pump()
    assert owner.stats["results"] == 1 and owner.pending() == []
    assert owner.outcome_refusal("t", "b1", 0.8) is None  # ended: nothing pending


def test_a_stale_policy_narrows_a_new_task_until_the_fresh_one_is_given() -> None:
    # The driver gives the scheduler the policies it resolved a submit under first: a
    # staler map (here pii={a}, since moved to {b}) would leave the new task no region.
    view = [node("o", "c"), node("a1", "a"), node("b1", "b")]
    for fresh in (False, True):
        m = Mesh(view)
        owner = m.s["o"]
        owner.submit([TaskSpec("t1", residency=Residency(R({"a"}), "pii"))], 0.0)
        owner.set_policies({"pii": pol("pii", "a")}, 0.0)
        m.pump()
        if fresh:
            owner.set_policies({"pii": pol("pii", "b")}, 0.1)
        owner.submit([TaskSpec("t2", residency=Residency(R({"b"}), "pii"))], 0.2)
        m.pump()
        ran = [t for t, _ in m.runs]
        if fresh:
            # t2 runs; t1, running in a when pii moved to {b}, is stopped there and fails.
            assert ran == ["t1", "t2"], m.runs
            assert m.stopped == [("t1", "a1")] and [f.task_id for f in m.failed] == ["t1"]
        else:
            assert ran == ["t1"] and [f.task_id for f in m.failed] == ["t2"]


def test_a_queued_task_is_narrowed_at_once_and_fails_when_nothing_is_left() -> None:
    view = [node("o", "a"), node("b1", "b")]
    m = Mesh(view)
    owner = m.s["o"]
    owner.submit([TaskSpec("t", residency=Residency(R({"b"}), "pii"))], 0.0)
    # not pumped: the reservation is not answered yet, the task is unbound
    owner.set_policies({"pii": pol("pii", "a")}, 0.1)
    m.pump()
    assert m.runs == [] and [f.task_id for f in m.failed] == ["t"]
