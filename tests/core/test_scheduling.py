"""Scheduling decisions without I/O: feasibility and refusal reasons, scoring, sampling,
late binding, locality, stealing, re-placement, idempotent results, the wire."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from meshscale.core.placement import Candidate, PlacementError, Residency
from meshscale.core.scheduling import (
    Central,
    Declined,
    GetTask,
    Grant,
    InputRef,
    InRegions,
    Load,
    Moved,
    NearSource,
    NodeState,
    Reserve,
    Resources,
    Result,
    Running,
    RunTask,
    Scheduler,
    SchedulingConfig,
    SchedulingError,
    SendMessage,
    TaskBound,
    TaskFailed,
    TaskFinished,
    TaskSpec,
    decode_message,
    encode_message,
    feasible,
    score,
)
from meshscale.core.vivaldi import Coordinate
from meshscale.core.wire import WireError

CAP = Resources(4.0, 8000, 0)
CFG = SchedulingConfig()


def node(name: str, region: str = "eu", *, load: Load | None = None, cap: Resources = CAP,
         labels: dict[str, str] | None = None, standby: bool = False,
         x: float = 0.0) -> NodeState:
    return NodeState(Candidate(name, region, f"{region}-a", labels or {}), cap,
                     load if load is not None else Load(0, 0, cap.cpus), standby,
                     Coordinate((x, 0.0), 0.0001, 0.1))


def names(nodes: Sequence[NodeState]) -> list[str]:
    return [n.name for n in nodes]


# --------------------------------------------------------------------------- feasibility

MESH = [node("a", "eu"), node("b", "eu", labels={"gpu": "a100"}, cap=Resources(8, 64000, 1)),
        node("c", "us"), node("d", "ap")]


def test_feasible_filters_by_every_rule() -> None:
    assert names(feasible(TaskSpec("t"), MESH)) == ["a", "b", "c", "d"]
    eu = Residency(frozenset({"eu"}), "pii")
    assert names(feasible(TaskSpec("t", residency=eu), MESH)) == ["a", "b"]
    inp = InputRef("o1", 10, ("c",), Residency(frozenset({"us", "eu"})))
    assert names(feasible(TaskSpec("t", inputs=(inp,)), MESH)) == ["a", "b", "c"]
    assert names(feasible(TaskSpec("t", placement=Central("us")), MESH)) == ["c"]
    assert names(feasible(TaskSpec("t", placement=InRegions(frozenset({"us", "ap"}))),
                          MESH)) == ["c", "d"]
    assert names(feasible(TaskSpec("t", labels={"gpu": "a100"}), MESH)) == ["b"]
    assert names(feasible(TaskSpec("t", cpus=6), MESH)) == ["b"]
    # Busy nodes are feasible: capacity is total, the task queues.
    busy = [node("a", load=Load(4, 9, 0.0))]
    assert names(feasible(TaskSpec("t"), busy)) == ["a"]


@pytest.mark.parametrize(
    ("task", "rule", "words"),
    [
        (TaskSpec("t", residency=Residency(frozenset({"mars"}), "pii")), "residency",
         ["residency regions={mars}", "pii", "{ap, eu, us}"]),
        (TaskSpec("t", inputs=(InputRef("o9", 1, (), Residency(frozenset({"mars"}))),)),
         "input-residency", ["input 'o9': residency regions={mars}"]),
        (TaskSpec("t", residency=Residency(frozenset({"eu"})),
                  inputs=(InputRef("o9", 1, (), Residency(frozenset({"us"}))),)),
         "input-residency", ["input 'o9'", "{eu}"]),
        (TaskSpec("t", residency=Residency(frozenset({"eu"})), placement=Central("us")),
         "mode", ["central placement in region 'us'"]),
        (TaskSpec("t", labels={"gpu": "h100"}), "labels", ["gpu=h100"]),
        (TaskSpec("t", cpus=64), "resources", ["64 cpu", "largest", "8 cpu"]),
        (TaskSpec("t", gpus=1, placement=Central("us")), "resources", ["1 gpu"]),
    ],
)
def test_refusal_names_the_rule(task: TaskSpec, rule: str, words: list[str]) -> None:
    with pytest.raises(SchedulingError) as info:
        feasible(task, MESH)
    assert info.value.rule == rule
    assert isinstance(info.value, PlacementError)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_empty_view_is_refused() -> None:
    with pytest.raises(SchedulingError) as info:
        feasible(TaskSpec("t"), [])
    assert info.value.rule == "nodes"


# --------------------------------------------------------------------------- scoring


def test_score_terms() -> None:
    inp = InputRef("o", 125_000_000, ("a",))  # 1 Gbit
    t = TaskSpec("t", inputs=(inp,))
    here = Coordinate((0.0, 0.0), 0.0001, 0.1)
    a = score(t, node("a", x=0.0), here, CFG)
    b = score(t, node("b", x=0.1), here, CFG)
    assert a.transfer_s == 0.0 and b.transfer_s == pytest.approx(1.0)
    assert b.latency_s == pytest.approx(0.1002)
    assert a.total < b.total
    # Queue wait: queued * mean / cpus, plus one for us when no slot is free.
    q = score(TaskSpec("t"), node("q", load=Load(4, 8, 0.0)), None, CFG)
    assert q.queue_s == pytest.approx((8 + 1) * CFG.mean_task_s / 4)
    free = score(TaskSpec("t"), node("f", load=Load(2, 0, 2.0)), None, CFG)
    assert free.queue_s == 0.0 and free.energy_s == 0.0
    # Energy: idle costs a little, standby a lot; busy-with-a-free-slot wins a tie.
    idle = score(TaskSpec("t"), node("i"), None, CFG)
    assert idle.energy_s == CFG.idle_penalty_s and idle.total > free.total
    sb = score(TaskSpec("t"), node("s", standby=True), None, CFG)
    assert sb.energy_s == CFG.wake_penalty_s
    assert "total=" in sb.describe()


def test_near_source_scores_latency_from_the_source() -> None:
    view = [node("me", x=0.0), node("src", x=0.5), node("near", x=0.49), node("far", x=0.0)]
    s = Scheduler("me", CAP, config=SchedulingConfig(pool_size=2, probes_per_task=1,
                                                      sample_temperature_s=0.001),
                  rng=random.Random(1), now=0.0)
    s.set_view(view, 0.0)
    s.submit([TaskSpec("t", placement=NearSource("src"))], 0.0)
    probes = [o.dst for o in s.drain() if isinstance(o, SendMessage)]
    assert probes and set(probes) <= {"src", "near"}


# --------------------------------------------------------------------------- a tiny driver


class Net:
    """Delivers messages between schedulers in FIFO order; runs tasks on request."""

    def __init__(self, view: list[NodeState], cfg: SchedulingConfig = CFG, seed: int = 0,
                 caps: dict[str, Resources] | None = None) -> None:
        caps = caps or {}
        self.s = {n.name: Scheduler(n.name, caps.get(n.name, n.capacity), config=cfg,
                                    rng=random.Random(f"{seed}/{n.name}"), now=0.0)
                  for n in view}
        for s in self.s.values():
            s.set_view(view, 0.0)
        self.events: list[tuple[str, object]] = []
        self.running: list[tuple[str, RunTask]] = []
        self.down: set[str] = set()

    def pump(self, now: float = 0.0) -> None:
        moved = True
        while moved:
            moved = False
            for name, s in self.s.items():
                if name in self.down:
                    s.drain()
                    continue
                for o in s.drain():
                    moved = True
                    if isinstance(o, SendMessage):
                        if o.dst not in self.down:
                            self.s[o.dst].handle_message(name, o.payload, now)
                    elif isinstance(o, RunTask):
                        self.running.append((name, o))
                        self.events.append((name, o))
                    else:
                        self.events.append((name, o))

    def finish_all(self, now: float = 0.0) -> None:
        while self.running:
            runs, self.running = self.running, []
            for name, r in runs:
                if name not in self.down:
                    self.s[name].task_finished(r.owner, r.task.task_id, r.attempt, True, "",
                                               now)
            self.pump(now)

    def of(self, kind: type) -> list[object]:
        return [e for _, e in self.events if isinstance(e, kind)]


def test_late_binding_gives_each_task_to_one_node_and_one_result() -> None:
    view = [node(f"n{i}") for i in range(6)]
    net = Net(view)
    tasks = [TaskSpec(f"t{i}") for i in range(20)]
    net.s["n0"].submit(tasks, 0.0)
    net.pump()
    net.finish_all()
    bound = net.of(TaskBound)
    done = net.of(TaskFinished)
    assert sorted(b.task_id for b in bound) == sorted(t.task_id for t in tasks)  # type: ignore[attr-defined]
    assert sorted(d.task_id for d in done) == sorted(t.task_id for t in tasks)  # type: ignore[attr-defined]
    assert not net.s["n0"].pending()
    st = net.s["n0"].stats
    # The owner's free slots take the first tasks without probes; the rest are probed.
    assert st["bound_here"] == 4 and st["probes_sent"] == 2 * (len(tasks) - 4)


def test_submit_refuses_the_whole_batch_with_the_rule() -> None:
    net = Net([node("a", "eu"), node("b", "us")])
    bad = TaskSpec("t2", residency=Residency(frozenset({"ap"})))
    with pytest.raises(SchedulingError) as info:
        net.s["a"].submit([TaskSpec("t1"), bad], 0.0)
    assert info.value.rule == "residency" and "'t2'" in str(info.value)
    assert net.s["a"].pending() == [] and net.s["a"].drain() == []
    with pytest.raises(ValueError):
        net.s["a"].submit([TaskSpec("x"), TaskSpec("x")], 0.0)


def test_binding_never_breaks_residency_even_for_a_thief() -> None:
    # b (us) holds a reservation it steals; the owner must not give it an eu-only task.
    view = [node("a", "eu"), node("b", "us")]
    net = Net(view)
    eu = Residency(frozenset({"eu"}))
    net.s["a"].submit([TaskSpec(f"t{i}", residency=eu) for i in range(12)], 0.0)
    net.pump()
    net.s["b"].idle(0.0)
    net.pump()
    net.finish_all()
    for b in net.of(TaskBound):
        assert b.region == "eu"  # type: ignore[attr-defined]
    assert len(net.of(TaskFinished)) == 12


def test_locality_only_holders_bind_while_waiting() -> None:
    view = [node(f"n{i}") for i in range(8)]
    net = Net(view)
    inp = InputRef("big", 10_000_000, ("n3", "n5"))
    net.s["n0"].submit([TaskSpec(f"t{i}", inputs=(inp,)) for i in range(6)], 0.0)
    probes = {o.dst for o in net.s["n0"].drain() if isinstance(o, SendMessage)}
    assert probes <= {"n3", "n5"}
    net = Net(view)
    net.s["n0"].submit([TaskSpec(f"t{i}", inputs=(inp,)) for i in range(6)], 0.0)
    net.pump()
    net.finish_all()
    for b in net.of(TaskBound):
        assert b.node in ("n3", "n5") and b.local and b.restricted  # type: ignore[attr-defined]


def test_locality_goes_wide_after_the_wait() -> None:
    cfg = SchedulingConfig(locality_wait_s=1.0, probe_timeout_s=0.5)
    view = [node("a"), node("h"), node("c")]
    net = Net(view, cfg)
    inp = InputRef("o", 1000, ("h",))
    net.down.add("h")  # the holder never answers (not yet detected)
    net.s["a"].submit([TaskSpec("t", inputs=(inp,))], 0.0)
    net.pump(0.0)
    for t in (0.5, 1.0, 1.5, 2.0):
        net.s["a"].on_timer(t)
        net.pump(t)
    bound = net.of(TaskBound)
    assert bound and bound[0].node in ("a", "c") and not bound[0].restricted  # type: ignore[attr-defined]


def test_a_long_burst_is_not_reprobed_while_its_workers_ask_for_it() -> None:
    # 200 one-cpu tasks on two one-slot nodes, one task per node per 0.1 s: the tail waits
    # ~10 s, five probe timeouts, in the workers' queues. Those reservations are not lost,
    # so nothing is re-probed (a re-probe per sweep per task flooded the queues).
    one = Resources(1.0, 8000, 0)
    net = Net([node("a", cap=one), node("b", cap=one)])
    net.s["a"].submit([TaskSpec(f"t{i}") for i in range(200)], 0.0)
    net.pump(0.0)
    now = 0.0
    while net.running:
        now += 0.1
        runs, net.running = net.running, []
        for name, r in runs:
            net.s[name].task_finished(r.owner, r.task.task_id, r.attempt, True, "", now)
        for s in net.s.values():
            s.on_timer(now)
        net.pump(now)
    assert len(net.of(TaskFinished)) == 200 and now > 4 * CFG.probe_timeout_s
    st = net.s["a"].stats
    assert "reprobed" not in st and st["probes_sent"] == 2 * (200 - st["bound_here"])
    assert "reservations_dropped" not in net.s["b"].stats


def test_owner_with_a_free_slot_binds_here_without_probes() -> None:
    one = Resources(1.0, 8000, 0)
    net = Net([node("a", cap=one), node("b", cap=one)])
    net.s["a"].submit([TaskSpec("t0")], 0.0)
    out = net.s["a"].drain()
    assert not [o for o in out if isinstance(o, SendMessage)]  # no Reserve, no round trip
    assert [(o.node, o.attempt) for o in out if isinstance(o, TaskBound)] == [("a", 1)]
    assert [o.task.task_id for o in out if isinstance(o, RunTask)] == ["t0"]
    net.s["a"].task_finished("a", "t0", 1, True, "", 0.1)
    assert [o.task_id for o in net.s["a"].drain() if isinstance(o, TaskFinished)] == ["t0"]
    # Slot taken: the next task is probed as usual.
    net.s["a"].submit([TaskSpec("t1"), TaskSpec("t2")], 0.2)
    net.pump(0.2)
    assert net.s["a"].stats["bound_here"] == 2 and net.s["a"].stats["probes_sent"] == 2
    # Data elsewhere (delay scheduling restricts to holders): never bound here.
    net2 = Net([node("a"), node("h")])
    net2.s["a"].submit([TaskSpec("d", inputs=(InputRef("o", 10**8, ("h",)),))], 0.0)
    net2.pump()
    assert [b.node for b in net2.of(TaskBound)] == ["h"]  # type: ignore[attr-defined]
    assert "bound_here" not in net2.s["a"].stats


def test_a_lone_task_bound_here_scores_this_node_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cost is >= 0, so when this node's is within ``sample_temperature_s`` of
    zero it is within it of the cheapest: the owner binds here without scoring the rest
    of the mesh (issue #19: a lone no-op's placement scored every node, and computed
    its feasible set twice). The decision is the same as with every node scored."""
    import meshscale.core.scheduling as sched

    calls: list[str] = []
    real_terms, real_feasible = sched._load_terms, sched.feasible

    def counting_terms(task: TaskSpec, n: NodeState, *a: object) -> tuple[float, float]:
        # Every score of a node (``score`` and the owner's ``_cost``) goes through here.
        calls.append(n.name)
        return real_terms(task, n, *a)  # type: ignore[arg-type]

    feasible_calls: list[str] = []

    def counting_feasible(task: TaskSpec, nodes: object) -> list[NodeState]:
        feasible_calls.append(task.task_id)
        return real_feasible(task, nodes)  # type: ignore[arg-type]

    monkeypatch.setattr(sched, "_load_terms", counting_terms)
    monkeypatch.setattr(sched, "feasible", counting_feasible)
    one = Resources(1.0, 8000, 0)
    net = Net([node(n, cap=one) for n in ("a", "b", "c", "d")])
    net.s["a"].submit([TaskSpec("t0")], 0.0)
    out = net.s["a"].drain()
    assert [o.task.task_id for o in out if isinstance(o, RunTask)] == ["t0"]
    assert not [o for o in out if isinstance(o, SendMessage)]
    # One score for the decision, one for the binding's reported cost; one feasible set.
    assert calls == ["a", "a"] and feasible_calls == ["t0"]
    # Not bindable here (the slot is taken): every node is scored, and probed as before.
    calls.clear()
    net.s["a"].submit([TaskSpec("t1")], 0.1)
    assert sorted(calls) == ["a", "b", "c", "d"]
    assert net.s["a"].stats["probes_sent"] == 2


def test_a_batch_of_like_tasks_checks_the_rules_and_node_distances_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A map's tasks have no inputs and the same rules: on one view they have the same
    feasible set, and each node the same transfer and latency terms. A submit computes
    those once per kind of task, not once per task (issue #19: placement was the owner's
    largest cost in a no-op map, a feasible set and a Vivaldi distance to every node per
    task); the load terms, which every placement changes, are still per task."""
    import meshscale.core.scheduling as sched

    feasible_calls: list[str] = []
    rtt_calls: list[int] = []
    real_feasible, real_rtt = sched.feasible, sched.estimate_rtt

    def counting_feasible(task: TaskSpec, nodes: object) -> list[NodeState]:
        feasible_calls.append(task.task_id)
        return real_feasible(task, nodes)  # type: ignore[arg-type]

    def counting_rtt(a: Coordinate, b: Coordinate) -> float:
        rtt_calls.append(1)
        return real_rtt(a, b)

    monkeypatch.setattr(sched, "feasible", counting_feasible)
    monkeypatch.setattr(sched, "estimate_rtt", counting_rtt)
    one = Resources(1.0, 8000, 0)
    net = Net([node(n, cap=one, x=x) for n, x in (("a", 0.0), ("b", 0.01), ("c", 0.02),
                                                    ("d", 0.03))])
    tasks = [TaskSpec(f"t{i}") for i in range(40)] + \
        [TaskSpec(f"u{i}", labels={"zone": "x"}) for i in range(3)]
    with pytest.raises(SchedulingError):
        net.s["a"].submit(tasks, 0.0)  # no node has the label: the whole batch refused
    assert feasible_calls == ["t0", "u0"]
    feasible_calls.clear()
    net.s["a"].submit(tasks[:40], 0.0)
    assert feasible_calls == ["t0"]
    bound_here = net.s["a"].stats["bound_here"]
    # One distance per node, for the placements and the bindings' reported costs alike
    # (issue #19: each binding computed its node's again).
    assert len(rtt_calls) == 4
    assert net.s["a"].stats["probes_sent"] == 2 * (40 - bound_here)
    net.pump()
    assert net.s["a"].stats["bound"] > bound_here and len(rtt_calls) == 4
    net.finish_all()
    assert sorted(e.task_id for e in net.of(TaskFinished)) == sorted(f"t{i}" for i in range(40))


def test_an_owner_scores_itself_by_its_own_load_not_its_view_entry() -> None:
    """The owner's entry in its view is a snapshot from the last view update, and the
    tasks it bound here count as extra work until their ``Result``. A caller's loop of
    lone tasks submits the next one as soon as the last one's answer comes (its run
    ended, its slot free): scored by that snapshot (running 1, no free slot) or by that
    count, this node cost a whole ``mean_task_s`` more than an idle peer, and the task
    went to a remote node by way of reservations (issue #19: most lone no-ops of the
    benchmark ran remotely, a round trip of reservations more each). This node's own
    load is known exactly (``load()``): it is scored by that."""
    one = Resources(1.0, 8000, 0)
    view = [node(n, cap=one) for n in ("a", "b", "c", "d")]
    net = Net(view)
    a = net.s["a"]
    # The view's snapshot of "a" shows a run, as one taken while the last task ran did.
    a.set_view([node("a", cap=one, load=Load(1, 0, 0.0)), *view[1:]], 0.0)
    a.submit([TaskSpec("t0")], 0.0)
    out = a.drain()
    assert [o.task.task_id for o in out if isinstance(o, RunTask)] == ["t0"]
    assert not [o for o in out if isinstance(o, SendMessage)]
    # t0's run ended (its slot is free, ``run_ended``) and its outcome travels; its
    # Result is not in yet, so t0 still counts as bound here when t1 comes.
    a.run_ended("a", "t0", 1, 0.01)
    a.drain()
    a.submit([TaskSpec("t1")], 0.02)
    out = a.drain()
    assert [o.task.task_id for o in out if isinstance(o, RunTask)] == ["t1"]
    assert not [o for o in out if isinstance(o, SendMessage)]
    assert a.stats["bound_here"] == 2 and a.stats.get("probes_sent", 0) == 0
    # Busy (t1 runs): the next task is probed out as before.
    a.submit([TaskSpec("t2")], 0.03)
    assert a.stats["probes_sent"] == 2


def test_an_exhausted_batch_cancels_its_other_reservations() -> None:
    # 100 tasks, two reservations each, on three one-slot nodes: once every task of the
    # batch is bound, the first NoTask tells a worker so and it drops the rest of its
    # reservations of that batch instead of asking for each (one wasted round trip per
    # task before).
    one = Resources(1.0, 8000, 0)
    net = Net([node("a", cap=one), node("b", cap=one), node("c", cap=one)])
    net.s["a"].submit([TaskSpec(f"t{i}") for i in range(100)], 0.0)
    net.pump(0.0)
    net.finish_all(0.1)
    assert len(net.of(TaskFinished)) == 100
    owner = net.s["a"].stats
    cancelled = sum(s.stats.get("reservations_cancelled", 0) for s in net.s.values())
    assert cancelled > 0 and owner.get("no_task", 0) + cancelled >= 90
    assert owner.get("no_task", 0) <= 6
    assert all(s.load().queued == 0 for s in net.s.values())


def test_worker_scan_stops_when_nothing_fits() -> None:
    # A long queue and no free slot: an incoming reservation does not walk the queue.
    one = Resources(1.0, 8000, 0)
    w = Scheduler("w", one, config=CFG, rng=random.Random(0), now=0.0)
    w.set_view([node("w", cap=one), node("o")], 0.0)
    for i in range(1000):
        w.handle_message("o", encode_message(Reserve(1, f"t{i}", Resources(1.0))), 0.0)
    gets = [o for o in w.drain() if isinstance(o, SendMessage)]
    assert len(gets) == 1 and w.load().queued == 999
    calls = 0
    real = Resources.fits_in

    def counting(self: Resources, other: Resources) -> bool:
        nonlocal calls
        calls += 1
        return real(self, other)

    Resources.fits_in = counting  # type: ignore[method-assign]
    try:
        w.handle_message("o", encode_message(Reserve(1, "late", Resources(1.0))), 0.0)
    finally:
        Resources.fits_in = real  # type: ignore[method-assign]
    assert calls <= 2 and w.load().queued == 1000


def _sent(s: Scheduler) -> list[tuple[str, object]]:
    """What ``s`` sends, decoded, in order (other outputs dropped)."""
    return [(o.dst, decode_message(o.payload, CFG.max_message_bytes)) for o in s.drain()
            if isinstance(o, SendMessage)]


def _owner_without_slots() -> Scheduler:
    # No cpus of its own: every task goes to "w" (its asks are what the test sends).
    none = Resources(0.0, 8000, 0)
    o = Scheduler("o", none, config=CFG, rng=random.Random(0), now=0.0)
    o.set_view([node("o", cap=none), node("w")], 0.0)
    return o


def test_an_ask_whose_hint_is_taken_gets_the_first_unbound_task_without_a_scan() -> None:
    # A 500-task batch without inputs: every ask after the hinted task's is bound takes
    # the earliest unbound one. That is the best by (local bytes, order), so the owner
    # stops at it; checking every task of the batch per ask made a long map cost
    # O(batch) per task at its owner.
    o = _owner_without_slots()
    batch = o.submit([TaskSpec(f"t{i}") for i in range(500)], 0.0)
    o.drain()
    free = Resources(1.0, 8000, 0)
    o.handle_message("w", encode_message(GetTask(1, batch, "t0", free)), 0.1)
    assert [m.task.task_id for _, m in _sent(o) if isinstance(m, Grant)] == ["t0"]
    calls = 0
    real = Scheduler._eligible

    def counting(self: Scheduler, *args: object) -> bool:
        nonlocal calls
        calls += 1
        return real(self, *args)  # type: ignore[arg-type]

    Scheduler._eligible = counting  # type: ignore[assignment,method-assign]
    try:
        o.handle_message("w", encode_message(GetTask(2, batch, "t0", free)), 0.2)
    finally:
        Scheduler._eligible = real  # type: ignore[method-assign]
    assert [m.task.task_id for _, m in _sent(o) if isinstance(m, Grant)] == ["t1"]
    assert calls <= 3


def test_an_ask_in_a_batch_with_inputs_still_takes_the_most_local_task() -> None:
    # With inputs the first unbound task is not always the best: a later one whose
    # input the asker holds wins (the scan must not stop early there).
    o = _owner_without_slots()
    far = InputRef("x", 10, ("o",))
    near = InputRef("y", 10, ("w",))
    tasks = [TaskSpec("t0"), TaskSpec("t1", inputs=(far,)), TaskSpec("t2"),
             TaskSpec("t3", inputs=(near,))]
    batch = o.submit(tasks, 0.0)
    o.drain()
    free = Resources(1.0, 8000, 0)
    o.handle_message("w", encode_message(GetTask(1, batch, "t0", free)), 0.1)
    o.handle_message("w", encode_message(GetTask(2, batch, "t0", free)), 0.1)
    assert [m.task.task_id for _, m in _sent(o) if isinstance(m, Grant)] == ["t0", "t3"]


def test_run_ended_frees_the_slot_before_the_result_goes() -> None:
    # A one-slot worker whose run is over asks for its next task at once, while the
    # outcome travels to the owner; the Result (which the owner takes as the end of the
    # task, and re-runs it if the outcome has not arrived) goes only at task_finished.
    one = Resources(1.0, 8000, 0)
    o = _owner_without_slots()
    w = Scheduler("w", one, config=CFG, rng=random.Random(1), now=0.0)
    w.set_view([node("o", cap=Resources(0.0, 8000, 0)), node("w", cap=one)], 0.0)
    net = Net([])
    net.s = {"o": o, "w": w}
    o.submit([TaskSpec("t0"), TaskSpec("t1")], 0.0)
    net.pump(0.0)
    assert [r.task.task_id for _, r in net.running] == ["t0"]
    assert w.load().running == 1 and w.has_work()
    w.run_ended("o", "t0", 1, 0.1)
    sent = _sent(w)
    assert [type(m) for _, m in sent] == [GetTask] and w.load().running == 0
    assert w.has_work()  # still reporting t0
    o.handle_message("w", encode_message(sent[0][1]), 0.1)  # type: ignore[arg-type]
    grants = [m for _, m in _sent(o) if isinstance(m, Grant)]
    assert [g.task.task_id for g in grants] == ["t1"]
    assert "results" not in o.stats  # t0 is still the owner's: no Result yet
    # A second grant of the attempt that is reporting is not run again.
    w.handle_message("o", encode_message(Grant(99, TaskSpec("t0"), 1)), 0.1)
    w.handle_message("o", encode_message(grants[0]), 0.1)
    assert [(r.task.task_id, r.attempt) for r in _runs(w)] == [("t1", 1)]
    assert w.stats["grants_refused"] == 1
    w.task_finished("o", "t0", 1, True, "", 0.2)
    assert [(d, type(m)) for d, m in _sent(w)] == [("o", Result)]
    w.task_finished("o", "t0", 1, True, "", 0.2)  # twice: nothing more
    assert _sent(w) == [] and w.stats["tasks_run"] == 1


def _runs(s: Scheduler) -> list[RunTask]:
    return [o for o in s.drain() if isinstance(o, RunTask)]


def test_a_second_submitter_runs_before_the_first_ones_queue_drains() -> None:
    # #13: 12 long tasks of A filled every slot of a 4-slot node and B's no-op waited for
    # all of them. Now B's task takes the first slot that frees, and A, over its share
    # (4 slots / 2 waiting submitters), waits while B does.
    s = Scheduler("n", CAP, rng=random.Random(0), now=0.0)
    s.set_view([node("n")], 0.0)
    s.submit([TaskSpec(f"a{i}", submitter="A") for i in range(12)], 0.0)
    running = _runs(s)
    assert [r.task.task_id for r in running] == ["a0", "a1", "a2", "a3"]
    s.submit([TaskSpec("b0", submitter="B")], 0.1)
    assert _runs(s) == [] and s.load().queued == 9
    s.task_finished("n", "a0", 1, True, "", 1.0)
    assert [r.task.task_id for r in _runs(s)] == ["b0"]  # before a4..a11
    assert s.stats["held_for_share"] >= 1
    # B is done waiting: A takes the slots again, B's task still runs.
    s.task_finished("n", "a1", 1, True, "", 2.0)
    assert [r.task.submitter for r in _runs(s)] == ["A"]
    assert sorted(t for _, t, _ in s.running()) == ["a2", "a3", "a4", "b0"]


def test_two_busy_submitters_converge_to_equal_shares() -> None:
    s = Scheduler("n", CAP, rng=random.Random(0), now=0.0)
    s.set_view([node("n")], 0.0)
    s.submit([TaskSpec(f"a{i}", submitter="A") for i in range(20)], 0.0)
    s.submit([TaskSpec(f"b{i}", submitter="B") for i in range(20)], 0.0)
    running = {r.task.task_id: r for r in _runs(s)}
    now = 0.0
    for _ in range(12):  # finish the oldest running task, one at a time
        now += 1.0
        tid = min(running, key=lambda t: (t[0] != "a", int(t[1:])))
        r = running.pop(tid)
        s.task_finished(r.owner, tid, r.attempt, True, "", now)
        running.update((x.task.task_id, x) for x in _runs(s))
    held = {"A": 0, "B": 0}
    for r in running.values():
        held[r.task.submitter] += 1
    assert held == {"A": 2, "B": 2}, sorted(running)


def test_one_submitter_alone_may_use_every_slot() -> None:
    s = Scheduler("n", CAP, rng=random.Random(0), now=0.0)
    s.set_view([node("n")], 0.0)
    s.submit([TaskSpec(f"a{i}", submitter="A") for i in range(6)], 0.0)
    assert len(_runs(s)) == 4
    s.task_finished("n", "a0", 1, True, "", 1.0)
    assert [r.task.task_id for r in _runs(s)] == ["a4"]
    assert "held_for_share" not in s.stats


def test_the_submitter_rides_on_reservations_and_steals() -> None:
    from meshscale.core.scheduling import ResRef, StealReply
    r = Reserve(1, "t", Resources(1.0), ["o"], "alice")
    assert decode_message(encode_message(r), 1 << 20) == r
    # An older peer's reservation (no submitter) still decodes.
    old = encode_message(Reserve(1, "t", Resources(1.0)))
    assert decode_message(old, 1 << 20).submitter == ""  # type: ignore[union-attr]
    rep = StealReply([ResRef("o", 1, "t", Resources(1.0), [], "bob")])
    assert decode_message(encode_message(rep), 1 << 20) == rep


def test_herd_one_owner_spreads_its_batch() -> None:
    # One submitter, all nodes look idle: its own reservations spread the batch.
    view = [node(f"n{i}") for i in range(8)]
    s = Scheduler("n0", CAP, rng=random.Random(3), now=0.0)
    s.set_view(view, 0.0)
    s.submit([TaskSpec(f"t{i}") for i in range(32)], 0.0)
    per: dict[str, int] = {}
    for o in s.drain():
        if isinstance(o, SendMessage):
            per[o.dst] = per.get(o.dst, 0) + 1
    assert len(per) >= 6 and max(per.values()) <= 2 * 64 / 8


def test_steal_prefers_reservations_whose_inputs_the_thief_holds() -> None:
    cfg = SchedulingConfig(max_steal=1)
    view = [node("o"), node("v", cap=Resources(1, 1000, 0)), node("t")]
    net = Net(view, cfg)
    v = net.s["v"]
    # v gets three reservations directly (bypassing sampling); it is busy with the first.
    for i, oid in enumerate(("x", "z", "y", "w")):
        v.handle_message("o", encode_message(Reserve(1, f"t{i}", Resources(1, 0, 0), [oid])), 0.0)
    assert len(v._queue) == 3  # the first became a GetTask
    net.s["t"].objects_held(["y"])
    net.s["t"]._maybe_steal(0.0)  # no gossip of v's queue yet: nothing to steal
    assert net.s["t"].stats.get("steal_requests", 0) == 0
    net.s["t"].set_view([node("o"), node("v", load=Load(1, 3, 0.0)), node("t")], 0.0)
    net.s["t"].idle(0.0)
    v.drain()  # drop the pending GetTask to o: only the steal matters here
    outs = net.s["t"].drain()
    steal = [o for o in outs if isinstance(o, SendMessage) and o.dst == "v"]
    assert steal
    v.handle_message("t", steal[0].payload, 0.0)
    reply = [o for o in v.drain() if isinstance(o, SendMessage) and o.dst == "t"]
    msg = decode_message(reply[0].payload, 1 << 20)
    # The head (t1, next to run at v) stays; of the rest, the one with y goes.
    assert [r.hint for r in msg.reservations] == ["t2"]  # type: ignore[union-attr]


def test_a_draining_or_sleeping_node_does_not_steal() -> None:
    busy = node("v", load=Load(1, 3, 0.0))
    for standby, want in ((False, 1), (True, 0)):
        t = Scheduler("t", CAP, rng=random.Random(0), now=0.0)
        t.set_view([busy, node("t", standby=standby)], 0.0)
        t.idle(0.0)
        steals = [o for o in t.drain() if isinstance(o, SendMessage) and o.dst == "v"]
        assert len(steals) == want and t.stats.get("steal_requests", 0) == want


def test_node_down_replaces_bound_tasks_and_results_are_idempotent() -> None:
    # The owner is outside the task's regions, so the binding is remote (a binding on
    # the owner itself has no node to lose).
    view = [node("a", "us"), node("b"), node("c")]
    net = Net(view, SchedulingConfig(probes_per_task=1, pool_size=2, max_retries=2))
    net.s["a"].submit([TaskSpec("t0", placement=InRegions(frozenset({"eu"})))], 0.0)
    net.pump()
    (first,) = net.of(TaskBound)
    victim = first.node  # type: ignore[attr-defined]
    assert victim != "a"
    runs = list(net.running)
    net.running.clear()
    net.s["a"].node_down(victim, 1.0)
    net.pump(1.0)
    bound = net.of(TaskBound)
    assert len(bound) == 2 and bound[1].node != victim and bound[1].attempt == 2  # type: ignore[attr-defined]
    # The "dead" node finishes after all (it was only slow): its result wins, the
    # re-run's result is dropped.
    name, r = runs[0]
    net.s[name].task_finished(r.owner, r.task.task_id, r.attempt, True, "", 2.0)
    net.pump(2.0)
    net.finish_all(3.0)
    done = net.of(TaskFinished)
    assert len(done) == 1 and done[0].attempt == 1  # type: ignore[attr-defined]
    assert net.s["a"].stats.get("results_duplicate") == 1


def test_an_unreachable_runner_loses_its_tasks_before_the_membership_verdict() -> None:
    # Issue #19: the driver's evidence that a runner is gone (its connection closed, a
    # fresh one refused) re-places its tasks at once, while the node is still in the view
    # (membership has not decided); no new reservation goes to it.
    view = [node("a", "us"), node("b"), node("c"), node("d")]
    net = Net(view, SchedulingConfig(probes_per_task=2, pool_size=3, max_retries=2,
                                     lost_runner_hold_s=10.0))
    owner = net.s["a"]
    owner.submit([TaskSpec(f"t{i}", placement=InRegions(frozenset({"eu"})))
                  for i in range(3)], 0.0)
    net.pump()
    bound = {b.task_id: b.node for b in net.of(TaskBound)}  # type: ignore[attr-defined]
    victim = bound["t0"]
    on_victim = sorted(t for t, n in bound.items() if n == victim)
    assert owner.runs_on(victim) == len(on_victim)
    old_runs = [(n, r) for n, r in net.running if n == victim]
    net.running = [(n, r) for n, r in net.running if n != victim]
    net.down.add(victim)
    sent_before = len(net.events)
    assert owner.runner_unreachable(victim, 1.0) == len(on_victim)
    net.pump(1.0)
    assert victim in names(owner.view())  # not a membership verdict
    assert owner.unreachable(1.0) == [victim]
    rebound = [b for b in net.of(TaskBound)[len(bound):]]
    assert sorted(b.task_id for b in rebound) == on_victim  # type: ignore[attr-defined]
    assert all(b.node != victim and b.attempt == 2 for b in rebound)  # type: ignore[attr-defined]
    assert owner.runs_on(victim) == 0 and owner.stats["replaced_unreachable"] == len(on_victim)
    assert len(net.events) > sent_before
    # A new task gets no reservation on the unreachable node while the hold lasts.
    reserved: list[str] = []
    owner.submit([TaskSpec(f"n{i}", placement=InRegions(frozenset({"eu"})))
                  for i in range(6)], 2.0)
    for o in owner.drain():
        if isinstance(o, SendMessage) and isinstance(decode_message(o.payload, 1 << 20),
                                                      Reserve):
            reserved.append(o.dst)
    assert reserved and victim not in reserved
    # The node was alive after all (only slow): its late result is the first, so it is
    # the one accepted; the re-run's result is dropped as a duplicate.
    net.down.discard(victim)
    name, r = old_runs[0]
    net.s[name].task_finished(r.owner, r.task.task_id, r.attempt, True, "", 3.0)
    net.pump(3.0)
    assert owner.unreachable(3.0) == []  # it spoke: it is reachable again
    net.finish_all(4.0)
    done = [d for d in net.of(TaskFinished) if d.task_id in bound]  # type: ignore[attr-defined]
    assert sorted(d.task_id for d in done) == sorted(bound)  # type: ignore[attr-defined]
    first = next(d for d in done if d.task_id == r.task.task_id)  # type: ignore[attr-defined]
    assert first.node == victim and first.attempt == 1  # type: ignore[attr-defined]
    assert owner.stats.get("results_duplicate", 0) >= 1


def test_unreachable_hold_ends_and_is_ignored_for_unknown_nodes() -> None:
    net = Net([node("a", "us"), node("b"), node("c")],
              SchedulingConfig(lost_runner_hold_s=2.0))
    owner = net.s["a"]
    assert owner.runner_unreachable("zz", 0.0) == 0  # not in the view
    assert owner.runner_unreachable("a", 0.0) == 0  # itself
    assert owner.runner_unreachable("b", 0.0) == 0  # nothing bound there
    assert owner.unreachable(1.0) == ["b"]
    owner.on_timer(2.5)
    assert owner.unreachable(2.5) == []
    # Only unreachable nodes may run it: they are probed all the same (not failed).
    owner.runner_unreachable("b", 3.0)
    owner.runner_unreachable("c", 3.0)
    owner.submit([TaskSpec("t", placement=InRegions(frozenset({"eu"})))], 3.0)
    dsts = {o.dst for o in owner.drain() if isinstance(o, SendMessage)}
    assert dsts and dsts <= {"b", "c"}
    assert not any(isinstance(e, TaskFailed) for _, e in net.events)
    with pytest.raises(ValueError, match="lost_runner_hold_s"):
        SchedulingConfig(lost_runner_hold_s=0.0)


def _stolen_by_a_thief(cfg: SchedulingConfig) -> tuple[Scheduler, list[tuple[str, object]]]:
    """Owner "o" (no cpus of its own) submits three tasks, one per batch (as a client's
    single submits are), all probed on "v" (one cpu): v runs t0 and queues t1, t2. Then
    "t" steals from v, which gives t2 (the head, t1, stays) and tells o so. Returns
    (o, what v sent for the steal), none of it delivered yet."""
    none, one = Resources(0.0, 8000, 0), Resources(1.0, 8000, 0)
    s = {n: Scheduler(n, c, config=cfg, rng=random.Random(0), now=0.0)
         for n, c in (("o", none), ("v", one), ("t", one))}
    o, v, t = s["o"], s["v"], s["t"]
    o.set_view([node("o", cap=none), node("v", cap=one)], 0.0)  # t not seen yet
    for i in range(3):
        o.submit([TaskSpec(f"t{i}")], 0.0)
        for dst, msg in _sent(o):
            assert dst == "v" and isinstance(msg, Reserve)
            v.handle_message("o", encode_message(msg), 0.0)
        for _, msg in _sent(v):  # v's GetTask for the first: granted
            o.handle_message("v", encode_message(msg), 0.0)  # type: ignore[arg-type]
            for _, m2 in _sent(o):
                v.handle_message("o", encode_message(m2), 0.0)  # type: ignore[arg-type]
    assert o.owner_state("t0") == ("v", 1) and len(v._queue) == 2
    view = [node("o", cap=none), node("v", cap=one, load=Load(1, 2, 0.0)),
            node("t", cap=one)]
    for x in s.values():
        x.set_view(view, 0.0)
    v.drain()
    t.idle(0.0)
    ((dst, steal),) = _sent(t)
    assert dst == "v"
    v.handle_message("t", encode_message(steal), 0.0)  # type: ignore[arg-type]
    return o, _sent(v)


def test_reservations_a_crashed_thief_took_are_written_off_with_it() -> None:
    # Issue #19's kill run: an idle node stole queued reservations, then was killed
    # before asking for their tasks. The owner counted them at the node they were
    # stolen from, which went on asking for its other tasks: the task waited for
    # probe_timeout_s after the last of them (seconds at the end of the run). The victim
    # of the steal now tells the owner (Moved), and losing the thief re-places them.
    cfg = SchedulingConfig(probes_per_task=1, pool_size=1)
    o, sent = _stolen_by_a_thief(cfg)
    assert [type(m).__name__ for _, m in sent] == ["StealReply", "Moved"]
    (moved,) = [m for dst, m in sent if dst == "o"]
    assert moved.thief == "t" and moved.reservations == [(3, "t2")]  # type: ignore[attr-defined]
    o.handle_message("v", encode_message(moved), 0.1)  # type: ignore[arg-type]
    assert o.waits_on("t") == 1 and o.waits_on("v") == 2  # t0 bound, t1 queued there
    # The thief dies holding it (its StealReply is never acted on): the owner's check
    # of the broken connection finds it gone.
    assert o.runner_unreachable("t", 0.5) == 0  # nothing was bound there
    again = [(dst, m) for dst, m in _sent(o) if isinstance(m, Reserve)]
    assert again == [("v", Reserve(3, "t2", Resources(1.0, 0, 0), []))]
    assert o.waits_on("t") == 0 and o.stats["reservations_moved"] == 1
    # The same when membership's verdict comes first: the thief leaves the view.
    o2, sent2 = _stolen_by_a_thief(cfg)
    o2.handle_message("v", encode_message(sent2[1][1]), 0.1)  # type: ignore[arg-type]
    o2.node_down("t", 0.5)
    assert [(d, m.hint) for d, m in _sent(o2) if isinstance(m, Reserve)] == [("v", "t2")]  # type: ignore[attr-defined]


def test_a_move_to_a_thief_already_lost_re_places_at_once() -> None:
    o, sent = _stolen_by_a_thief(SchedulingConfig(probes_per_task=1, pool_size=1))
    assert o.runner_unreachable("t", 0.05) == 0
    _sent(o)
    o.handle_message("v", encode_message(sent[1][1]), 0.1)  # type: ignore[arg-type]
    assert [(d, m.hint) for d, m in _sent(o) if isinstance(m, Reserve)] == [("v", "t2")]  # type: ignore[attr-defined]
    assert o.stats["reservations_moved_lost"] == 1 and o.waits_on("t") == 0
    # A move of a task already bound, or not from where it was probed, changes nothing.
    o.handle_message("x", encode_message(Moved("t", [(3, "t2"), (1, "t0")])), 0.2)
    assert o.stats["reservations_moved"] == 1 and o.owner_state("t0") == ("v", 1)


def test_a_late_grant_with_no_room_is_declined_and_placed_again_at_once() -> None:
    # Issue #19's full kill run: the owner's node stalled past ask_timeout_s, so a
    # worker's ask timed out and its slot went to another task; the grant that came
    # after was refused without a word, and the owner waited run_timeout_s (60 s) for
    # a run that never started. Now the worker declines it and the owner re-places it.
    none, one = Resources(0.0, 8000, 0), Resources(1.0, 8000, 0)
    view = [node("o", cap=none), node("w", cap=one)]
    o = Scheduler("o", none, config=CFG, rng=random.Random(0), now=0.0)
    w = Scheduler("w", one, config=CFG, rng=random.Random(0), now=0.0)
    for x in (o, w):
        x.set_view(view, 0.0)

    def deliver(src: Scheduler, dst: Scheduler, now: float) -> list[object]:
        msgs = [m for d, m in _sent(src) if d == dst.name]
        for m in msgs:
            dst.handle_message(src.name, encode_message(m), now)  # type: ignore[arg-type]
        return msgs

    o.submit([TaskSpec("t0")], 0.0)
    deliver(o, w, 0.0)  # its reservation: w asks (GetTask), which o is slow to answer
    (slow_ask,) = [m for _, m in _sent(w)]
    w.on_timer(CFG.ask_timeout_s + 1.0)  # the ask times out: the slot is free again
    o.submit([TaskSpec("t1")], 3.0)
    deliver(o, w, 3.0)
    deliver(w, o, 3.0)  # w's ask for t1, granted
    deliver(o, w, 3.0)  # w runs t1: its one slot is taken
    assert [tid for _, tid, _ in w.running()] == ["t1"]
    assert o.owner_state("t1") == ("w", 1) and w.stats.get("grants_refused", 0) == 0
    o.handle_message("w", encode_message(slow_ask), 3.5)  # type: ignore[arg-type]
    assert o.owner_state("t0") == ("w", 1)  # bound to w, its grant on the way
    deliver(o, w, 3.5)  # the late grant: no room
    assert w.stats["grants_refused"] == 1 and w.stats["grants_declined"] == 1
    deliver(w, o, 3.5)
    assert o.stats["replaced_declined"] == 1
    assert o.owner_state("t0") == (None, 1)  # placed again now, not at run_timeout_s
    assert [(d, m.hint) for d, m in _sent(o) if isinstance(m, Reserve)] == [("w", "t0")]  # type: ignore[attr-defined]
    # A decline of an attempt no longer bound there changes nothing.
    o.handle_message("w", encode_message(Declined("t0", 1)), 3.6)
    o.handle_message("w", encode_message(Declined("t1", 2)), 3.6)
    assert o.stats["declines_stale"] == 2 and o.owner_state("t1") == ("w", 1)


def test_a_restarted_runner_loses_its_tasks_when_its_new_boot_speaks() -> None:
    # A node restarted on the same address answers every check and membership may never
    # see it gone; the first message from its new process (another boot) re-places what
    # this owner bound to the old one. It keeps getting reservations: it is alive.
    view = [node("a", "us"), node("b"), node("c"), node("d")]
    net = Net(view, SchedulingConfig(probes_per_task=2, pool_size=3, max_retries=2))
    owner = net.s["a"]
    for n in ("b", "c", "d"):
        assert owner.peer_boot(n, f"{n}-1", 0.0) == 0  # first boot seen: nothing to do
    owner.submit([TaskSpec(f"t{i}", placement=InRegions(frozenset({"eu"})))
                  for i in range(3)], 0.0)
    net.pump()
    bound = {b.task_id: b.node for b in net.of(TaskBound)}  # type: ignore[attr-defined]
    victim = bound["t0"]
    on_victim = sorted(t for t, n in bound.items() if n == victim)
    assert owner.peer_boot(victim, f"{victim}-1", 1.0) == 0  # the same process
    assert owner.peer_boot(victim, "", 1.0) == 0  # a peer that sends none
    assert owner.runs_on(victim) == len(on_victim)
    net.running = [(n, r) for n, r in net.running if n != victim]  # died with it
    assert owner.peer_boot(victim, f"{victim}-2", 2.0) == len(on_victim)
    net.pump(2.0)
    rebound = net.of(TaskBound)[len(bound):]
    assert sorted(b.task_id for b in rebound) == on_victim  # type: ignore[attr-defined]
    assert all(b.attempt == 2 for b in rebound)  # type: ignore[attr-defined]
    assert owner.stats["runners_restarted"] == 1
    assert owner.stats["replaced_restarted"] == len(on_victim)
    assert owner.unreachable(2.0) == []  # alive: not held out of placement
    assert owner.peer_boot(victim, f"{victim}-2", 3.0) == 0  # told once
    # Everything still finishes, each task once.
    net.finish_all(3.0)
    done = sorted(f.task_id for f in net.of(TaskFinished))  # type: ignore[attr-defined]
    assert done == ["t0", "t1", "t2"]
    # A node that left the view and came back with a new boot was handled by the view.
    owner.set_view([n for n in view if n.name != "b"], 4.0)
    owner.set_view(view, 5.0)
    assert owner.peer_boot("b", "b-9", 5.0) == 0
    assert owner.peer_boot("zz", "x", 5.0) == 0 and owner.peer_boot("a", "y", 5.0) == 0


def test_retries_are_bounded() -> None:
    cfg = SchedulingConfig(probes_per_task=1, pool_size=1, max_retries=1)
    small = Resources(0.5, 0, 0)  # the owner cannot run the task itself
    net = Net([node("a", cap=small), node("b"), node("c")], cfg)
    s = net.s["a"]
    s.submit([TaskSpec("t")], 0.0)
    net.pump()
    (b1,) = net.of(TaskBound)
    s.node_down(b1.node, 1.0)  # type: ignore[attr-defined]
    net.pump(1.0)
    b2 = net.of(TaskBound)[-1]
    assert b2.node != b1.node  # type: ignore[attr-defined]
    s.node_down(b2.node, 2.0)  # type: ignore[attr-defined]
    net.pump(2.0)
    failed = net.of(TaskFailed)
    assert len(failed) == 1 and "gave up after 2 attempts" in failed[0].reason  # type: ignore[attr-defined]


def test_run_timeout_replaces_a_silent_binding() -> None:
    cfg = SchedulingConfig(run_timeout_s=5.0)
    net = Net([node("a"), node("b")], cfg)
    net.s["a"].submit([TaskSpec("t")], 0.0)
    net.pump()
    net.running.clear()  # the run's result is lost
    net.s["a"].on_timer(5.0)
    net.pump(5.0)
    assert [b.attempt for b in net.of(TaskBound)] == [1, 2]  # type: ignore[attr-defined]
    net.finish_all(6.0)
    assert len(net.of(TaskFinished)) == 1


def tick(net: Net, until: float, step: float = 0.5, start: float = 0.0) -> None:
    """Every scheduler's timer every ``step`` seconds from ``start`` to ``until``, the
    messages delivered after each."""
    now = start
    while now <= until:
        for name, s in net.s.items():
            if name not in net.down:
                s.on_timer(now)
        net.pump(now)
        now += step


def test_a_long_task_keeps_its_binding_while_its_worker_says_it_runs() -> None:
    # Issue 20: a task running past run_timeout_s (a Dask worker: hours) was run a
    # second time elsewhere while the first run went on. The worker's Running beats
    # restart the binding's timeout; the task runs once, for 10x run_timeout_s.
    cfg = SchedulingConfig(run_timeout_s=6.0, running_beat_s=2.0)
    assert cfg.beat_s == 2.0
    net = Net([node("a", cap=Resources(0.0, 0, 0)), node("b")], cfg,
              caps={"a": Resources(0.0, 0, 0)})
    net.s["a"].submit([TaskSpec("t")], 0.0)
    net.pump()
    assert [(b.node, b.attempt) for b in net.of(TaskBound)] == [("b", 1)]  # type: ignore[attr-defined]
    tick(net, 60.0)
    assert [(b.node, b.attempt) for b in net.of(TaskBound)] == [("b", 1)]  # type: ignore[attr-defined]
    assert net.s["b"].stats["running_beats_sent"] >= 60.0 / 2.0 - 2
    assert net.s["a"].stats["running_beats"] == net.s["b"].stats["running_beats_sent"]
    assert net.s["a"].pending()
    net.finish_all(61.0)
    assert [(f.node, f.attempt) for f in net.of(TaskFinished)] == [("b", 1)]  # type: ignore[attr-defined]
    # Finished: no more beats for it.
    sent = net.s["b"].stats["running_beats_sent"]
    tick(net, 80.0, start=61.5)
    assert net.s["b"].stats["running_beats_sent"] == sent


def test_beats_stop_with_the_run_and_a_stale_beat_keeps_nothing() -> None:
    cfg = SchedulingConfig(run_timeout_s=6.0, running_beat_s=2.0)
    net = Net([node("a", cap=Resources(0.0, 0, 0)), node("b"), node("c")], cfg,
              caps={"a": Resources(0.0, 0, 0)})
    net.s["a"].submit([TaskSpec("t")], 0.0)
    net.pump()
    first = net.of(TaskBound)[0].node  # type: ignore[attr-defined]
    # The worker's node goes silent (its run and its beats lost, not out of the view):
    # the owner re-places after run_timeout_s, as before.
    net.down.add(first)
    tick(net, 7.0)
    net.down.discard(first)
    bound = [(b.node, b.attempt) for b in net.of(TaskBound)]  # type: ignore[attr-defined]
    assert len(bound) == 2 and bound[1][1] == 2, bound
    # The first run's node still beats for attempt 1 (it never stopped it): ignored, the
    # binding of attempt 2 is kept only by its own node's beats.
    net.s["a"].handle_message(first, encode_message(Running([("t", 1)])), 7.0)
    assert net.s["a"].stats["running_beats_stale"] >= 1
    assert net.s["a"].pending()


def test_no_beats_to_an_owner_out_of_the_view() -> None:
    cfg = SchedulingConfig(run_timeout_s=6.0, running_beat_s=2.0)
    net = Net([node("a", cap=Resources(0.0, 0, 0)), node("b")], cfg,
              caps={"a": Resources(0.0, 0, 0)})
    net.s["a"].submit([TaskSpec("t")], 0.0)
    net.pump()
    tick(net, 5.0)
    sent = net.s["b"].stats["running_beats_sent"]
    assert sent >= 1
    net.s["b"].node_down("a", 5.5)  # the owner died: its tasks are someone else's now
    net.down.add("a")
    tick(net, 20.0, start=6.0)
    assert net.s["b"].stats["running_beats_sent"] == sent


def test_bounds_are_enforced() -> None:
    from meshscale.core.scheduling import SchedulingOverloaded
    s = Scheduler("a", CAP, config=SchedulingConfig(max_pending_tasks=2, max_batch=2),
                  rng=random.Random(0), now=0.0)
    s.set_view([node("a")], 0.0)
    with pytest.raises(ValueError):
        s.submit([TaskSpec(f"t{i}") for i in range(3)], 0.0)
    s.submit([TaskSpec("t0"), TaskSpec("t1")], 0.0)
    with pytest.raises(SchedulingOverloaded):
        s.submit([TaskSpec("t2")], 0.0)
    with pytest.raises(ValueError):
        SchedulingConfig(probes_per_task=0)
    with pytest.raises(ValueError):
        SchedulingConfig(pool_size=1, probes_per_task=2)


def test_wire_roundtrip_and_garbage() -> None:
    from meshscale.core.scheduling import Grant
    spec = TaskSpec("t", 2.0, 100, 0, {"k": "v"}, Residency(frozenset({"eu"}), "pii"),
                    (InputRef("o", 5, ("a",), Residency(frozenset({"eu"}))),),
                    InRegions(frozenset({"eu"})), b"\x00fn")
    msg = Grant(7, spec, 2)
    assert decode_message(encode_message(msg), 1 << 20) == msg
    beat = Running([("t", 2), ("u", 1)])
    assert decode_message(encode_message(beat), 1 << 20) == beat
    for bad in (b"", b"\xc1", encode_message(msg)[:-3]):
        with pytest.raises(WireError):
            decode_message(bad, 1 << 20)
    with pytest.raises(WireError):
        decode_message(encode_message(msg), 4)
    s = Scheduler("a", CAP, rng=random.Random(0), now=0.0)
    s.handle_message("x", b"garbage", 0.0)
    assert s.stats == {"rejected.malformed": 1}


def test_same_seed_same_decisions() -> None:
    def run(seed: int) -> list[str]:
        view = [node(f"n{i}", load=Load(i % 3, i % 2, 4.0 - i % 3)) for i in range(10)]
        s = Scheduler("n0", CAP, rng=random.Random(seed), now=0.0)
        s.set_view(view, 0.0)
        s.submit([TaskSpec(f"t{i}") for i in range(16)], 0.0)
        return [o.dst for o in s.drain() if isinstance(o, SendMessage)]

    assert run(5) == run(5)
    assert run(5) != run(6)


# --------------------------------------------------------------------------- quiet sweeps

def sweeps_in(s: Scheduler, start: float, span_s: float) -> list[float]:
    """Drive ``s`` as a driver does (one timer at ``next_deadline``) over ``span_s`` of a
    fake clock; the times its timer fired."""
    fired, now = [], start
    while True:
        now = max(now, s.next_deadline())
        if now > start + span_s:
            return fired
        s.on_timer(now)
        fired.append(now)


def test_a_quiet_scheduler_sweeps_rarely_and_a_busy_one_at_its_interval() -> None:
    """Issue #19: an idle node's scheduler woke its driver every ``sweep_interval_s``
    (240 times a minute) to sweep nothing."""
    s = Scheduler("me", CAP, config=CFG, rng=random.Random(0), now=0.0)
    s.set_view([node("me"), node("a"), node("b")], 0.0)
    assert s.quiet()
    fired = sweeps_in(s, 0.0, 60.0)
    assert len(fired) <= 60.0 / CFG.quiet_sweep_max_s + 1, len(fired)
    # A peer with queued work (something to steal): the sweep keeps its interval.
    s.set_view([node("me"), node("a", load=Load(4, 3, 0.0)), node("b")], 60.0)
    assert not s.quiet()
    fired = sweeps_in(s, 60.0, 10.0)
    assert len(fired) >= 10.0 / CFG.sweep_interval_s - 1
    assert all(b - a == pytest.approx(CFG.sweep_interval_s)
               for a, b in itertools.pairwise(fired[1:]))


def test_work_brings_the_next_sweep_back_at_once() -> None:
    """A task submitted to a quiet scheduler is swept (its probes' timeout checked) within
    ``sweep_interval_s`` of the last sweep, as before, not ``quiet_sweep_max_s``."""
    s = Scheduler("me", CAP, config=CFG, rng=random.Random(0), now=0.0)
    s.set_view([node("me"), node("a")], 0.0)
    last = CFG.quiet_sweep_max_s
    assert s.next_deadline() == pytest.approx(last)
    s.on_timer(last)  # the last sweep
    assert s.next_deadline() == pytest.approx(last + CFG.quiet_sweep_max_s)
    s.submit([TaskSpec("t1")], last + 2.0)
    assert not s.quiet()
    assert s.next_deadline() == pytest.approx(last + CFG.sweep_interval_s)  # due: at once
    s.on_timer(last + 2.0)
    assert s.next_deadline() == pytest.approx(last + 2.0 + CFG.sweep_interval_s)


# ------------------------------------------------------------------ a submit's task shapes

# Every field of ``TaskSpec`` is a rule ``feasible`` reads (then ``_shape`` keys on it, or
# a map's tasks that differ in it would share one feasible set), or it is not.
SHAPE_FIELDS = {"cpus", "memory_mb", "gpus", "labels", "residency", "placement"}
NOT_RULES = {"task_id", "payload", "submitter"}
NO_SHAPE = {"inputs"}  # a task with inputs is placed on its own (``_shape`` is None)


def test_every_task_field_is_a_shaped_rule_or_not_a_rule() -> None:
    """A field added to ``TaskSpec`` fails this until it is placed in one of the sets
    above (and, if ``feasible`` reads it, in ``core.scheduling._shape``)."""
    fields = set(TaskSpec.__struct_fields__)
    assert fields == SHAPE_FIELDS | NOT_RULES | NO_SHAPE, (
        f"unclassified TaskSpec fields: {sorted(fields - SHAPE_FIELDS - NOT_RULES - NO_SHAPE)}")


_GPU = Resources(8.0, 64000, 1)
_ONE_RULE_PAIRS = [
    ("residency", Residency(frozenset({"eu"})), Residency(frozenset({"us"}))),
    ("placement", InRegions(frozenset({"eu"})), Central("us")),
    ("labels", {"zone": "x"}, {"zone": "y"}),
    ("gpus", 0, 1),
    ("cpus", 1.0, 8.0),
    ("memory_mb", 100, 50_000),
]


@pytest.mark.parametrize(("field", "first", "second"), _ONE_RULE_PAIRS,
                         ids=[p[0] for p in _ONE_RULE_PAIRS])
@pytest.mark.parametrize("order", ["first-then-second", "second-then-first"])
def test_tasks_of_one_submit_differing_in_one_rule_each_keep_their_own(
        field: str, first: object, second: object, order: str) -> None:
    """Tasks of one submit that differ in a single rule are each placed by their own
    rule: the feasible set computed once per shape (issue #19) is never lent to a task
    whose rule differs. Each kind's nodes are a strict part of the view, so a set lent
    across kinds would put some task on a node its rule forbids (or leave it unbound)."""
    from meshscale.core.scheduling import exclusion

    view = [node(f"eu{i}", "eu", labels={"zone": "x"}) for i in range(3)] + \
        [node(f"us{i}", "us", labels={"zone": "y"}) for i in range(3)] + \
        [node("big", "ap", cap=_GPU, labels={"zone": "z"})]
    net = Net(view)
    a = [TaskSpec(f"a{i}", **{field: first}) for i in range(6)]  # type: ignore[arg-type]
    b = [TaskSpec(f"b{i}", **{field: second}) for i in range(6)]  # type: ignore[arg-type]
    tasks = a + b if order == "first-then-second" else b + a
    net.s["eu0"].submit(tasks, 0.0)
    net.pump()
    net.finish_all()
    by_id = {t.task_id: t for t in tasks}
    bound = {e.task_id: e.node for e in net.of(TaskBound)}  # type: ignore[attr-defined]
    assert sorted(bound) == sorted(by_id)
    places = {n.name: n for n in view}
    wrong = {tid: (n, exclusion(by_id[tid], places[n])) for tid, n in bound.items()
             if exclusion(by_id[tid], places[n]) is not None}
    assert wrong == {}
    assert sorted(e.task_id for e in net.of(TaskFinished)) == sorted(by_id)  # type: ignore[attr-defined]
