"""Classed stream shards follow their class's policy on real node processes (3 nodes, one
per region): a topic of a class stays publishable after the class narrows (its rule is the
class's current one, not the one of its first publish), and a narrowing that excludes a
shard's backup drops that copy (audited) while its source places a new backup inside the
rule that holds every record, readable by a subscriber once the source is gone; an operator of a class whose rule narrows
after it was registered moves its runners inside the new rule; an operator registered
without a class on a classed topic (or before its topic had one) runs only inside the
topic's class, and leaves a region the class drops; a subscriber's node that the class
stops letting read drops its mirror at once; a publish naming no class takes its topic's
class (read from the topic's record by a node that never saw the topic); a classed
operator's output topic takes the operator's class."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from runtime_mesh import wait_for

from meshscale.client import connect
from meshscale.client.mesh import MeshError
from meshscale.client.rpc import RemoteError, call, request
from meshscale.client.streams import Record
from meshscale.core.api import Empty
from meshscale.core.api import streams as sapi
from meshscale.core.api.streams import ShardInfo
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(300)

REGIONS = ["r1", "r2", "r3"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("strpol"), 3, regions=REGIONS) as m:
        yield m


def set_policy(mesh: LocalMesh, name: str, regions: list[str]) -> None:
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        m.policies.set(name, regions)


def publish(mesh: LocalMesh, i: int, topic: str, cls: str, ids: list[str]) -> dict[str, Any]:
    got: dict[str, Any] = call(mesh.nodes[i].address, mesh.credentials(), "stream.publish", {
        "topic": topic, "records": [["k", f"v-{rid}".encode(), rid, 1.0] for rid in ids],
        "residency": {"data_class": cls}}, timeout=30)
    return got


def shard(mesh: LocalMesh, i: int, topic: str) -> ShardInfo | None:
    st = request(mesh.nodes[i].address, mesh.credentials(), sapi.STATS, Empty(), timeout=10)
    return next((s for s in st.shards if s.topic == topic), None)


def test_classed_topic_stays_publishable_after_its_class_narrows(mesh: LocalMesh) -> None:
    set_policy(mesh, "ca", REGIONS)
    first = publish(mesh, 0, "ta", "ca", ["a-1"])
    assert first["node"] == mesh.nodes[0].name
    # Narrowed, keeping the source's region: the topic follows the class's new rule and
    # its source goes on taking records (the old code fixed the rule at the first publish
    # and refused this one: "published with another residency rule").
    set_policy(mesh, "ca", ["r1", "r2"])
    again = publish(mesh, 0, "ta", "ca", ["a-2"])
    assert again["node"] == mesh.nodes[0].name and again["first"] == first["last"] + 1
    # A node of the region the class no longer allows refuses the topic's records,
    # naming the rule and its region.
    r3 = REGIONS.index("r3")

    def refused() -> str | None:
        try:
            publish(mesh, r3, "ta", "ca", ["a-3"])
        except RemoteError as e:
            return str(e)
        return None

    why = wait_for(refused, 30, "the publish at r3 refused")
    assert "residency" in why and "r3" in why


def keep(rec: Record) -> Any:
    return rec.value


def runner_nodes(mesh: LocalMesh, op: str) -> set[int]:
    out = set()
    for i, n in enumerate(mesh.nodes):
        st = request(n.address, mesh.credentials(), sapi.STATS, Empty(), timeout=10)
        if any(r.startswith(f"{op}@") for r in st.runners):
            out.add(i)
    return out


def test_narrowing_moves_a_classed_operator_inside_the_new_rule(mesh: LocalMesh) -> None:
    # An operator registered with a class whose rule was then narrowed went on running
    # where it was (its rule was resolved once, at registration). Each placement now
    # narrows it by the class's current policy (core.streams.operator_now), as the policy
    # swarm checks (sim/policy_chaos.py).
    from meshscale.client.streams import Regions
    from meshscale.client.tasks import connect as connect_tasks

    set_policy(mesh, "cd", REGIONS)
    publish(mesh, 0, "td", "cd", ["d-1"])
    with connect_tasks(mesh.nodes[0].address, bundle=mesh.bundle_path) as client:
        client.operator("td", keep, name="keep-td", data_class="cd", output="td-out",
                        placement=Regions(REGIONS))
    # One runner per shard source, each on the node HRW picks among the allowed ones.
    where = wait_for(lambda: runner_nodes(mesh, "keep-td"), 30, "a runner of keep-td")
    old = min(where)
    gone = mesh.nodes[old].region
    # The class narrows to leave out a runner's region: its runners move inside.
    set_policy(mesh, "cd", [r for r in REGIONS if r != gone])

    def moved() -> set[int]:
        now = runner_nodes(mesh, "keep-td")
        return now if now and all(mesh.nodes[i].region != gone for i in now) else set()

    now = wait_for(moved, 60, f"no runner of keep-td left in {gone}")
    assert old not in now, now


def set_policy_with(mesh: LocalMesh, name: str, regions: list[str], **kw: Any) -> None:
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        m.policies.set(name, regions, **kw)


def node_in(mesh: LocalMesh, region: str) -> int:
    return next(i for i, n in enumerate(mesh.nodes) if n.region == region)


def topic_run_in(mesh: LocalMesh, prefix: str, source: str, region: str) -> str:
    """A topic whose shard from ``source`` an operator placed anywhere (``Regions`` of
    every region, no class) would run in ``region`` (``core.streams.place_operator``,
    the HRW every node computes): without its topic's class binding it, it runs there."""
    from meshscale.core.placement import Candidate
    from meshscale.core.scheduling import InRegions
    from meshscale.core.streams import OperatorPlacement, candidates_to_states, place_operator

    cands = [Candidate(n.name, n.region, n.region) for n in mesh.nodes]
    src = next(c for c in cands if source.startswith(c.name + "~"))
    want = mesh.nodes[node_in(mesh, region)].name
    op = OperatorPlacement(f"keep-{prefix}", InRegions(frozenset(REGIONS)))
    for k in range(500):
        topic = f"{prefix}-{k}"
        if place_operator(op, topic, src, candidates_to_states(cands)) == want:
            return topic
    raise AssertionError(f"no topic of {prefix} runs in {region}")


def operator_anywhere(mesh: LocalMesh, topic: str, name: str) -> None:
    """``keep`` on ``topic`` registered WITHOUT a class, placed anywhere (all regions)."""
    from meshscale.client.streams import Regions
    from meshscale.client.tasks import connect as connect_tasks

    with connect_tasks(mesh.nodes[0].address, bundle=mesh.bundle_path) as client:
        client.operator(topic, keep, name=name, output=f"{topic}-out",
                        placement=Regions(REGIONS))


def regions_of(mesh: LocalMesh, nodes: set[int]) -> set[str]:
    return {mesh.nodes[i].region for i in nodes}


def test_an_operator_without_a_class_runs_only_in_its_topics_class(mesh: LocalMesh) -> None:
    # An operator registered without data_class= on a classed topic was bound by nothing
    # but the holders' cross-region read rule: it ran wherever HRW put it. The node that
    # registers it now reads the topic's replicated record and writes the operator's
    # spec with the topic's class (core.streams.operator_rule), so every node places it
    # inside the class. The topic is chosen so that, unbound, its runner would be in r1.
    set_policy(mesh, "ce", ["r2", "r3"])
    r2 = node_in(mesh, "r2")
    sid = publish(mesh, r2, "te-probe", "ce", ["p-1"])["source"]
    topic = topic_run_in(mesh, "te", sid, "r1")
    publish(mesh, r2, topic, "ce", ["e-1"])
    operator_anywhere(mesh, topic, "keep-te")
    ops = call(mesh.nodes[node_in(mesh, "r1")].address, mesh.credentials(),
               "stream.op_list", {}, timeout=10)["operators"]
    spec = next(o for o in ops if o["name"] == "keep-te")
    assert spec["residency"]["data_class"] == "ce", spec
    assert set(spec["residency"]["regions"]) == {"r2", "r3"}, spec

    def inside() -> set[int]:
        now = runner_nodes(mesh, "keep-te")
        return now if now and regions_of(mesh, now) <= {"r2", "r3"} else set()

    wait_for(inside, 30, "keep-te running, and only in r2/r3")
    # Naming another class than the topic's is refused, naming both.
    from meshscale.client.tasks import connect as connect_tasks

    set_policy(mesh, "cx", REGIONS)
    with connect_tasks(mesh.nodes[0].address, bundle=mesh.bundle_path) as client, \
            pytest.raises(MeshError) as e:
        client.operator(topic, keep, name="keep-te-cx", data_class="cx")
    assert e.value.code == "refused" and "cx" in str(e.value) and "ce" in str(e.value)


def test_a_topic_given_a_class_after_its_operator_binds_it(mesh: LocalMesh) -> None:
    # The operator exists before its topic has a class: its spec carries none. The
    # topic's first classed publish writes the topic's replicated record; every node
    # reads it and places the operator under the class (core.streams.operator_classes),
    # so the runner HRW had put in r1 moves inside the class.
    set_policy(mesh, "cf", ["r2", "r3"])
    r2 = node_in(mesh, "r2")
    sid = publish(mesh, r2, "tf-probe", "cf", ["p-1"])["source"]
    topic = topic_run_in(mesh, "tf", sid, "r1")
    operator_anywhere(mesh, topic, "keep-tf")
    before = wait_for(lambda: runner_nodes(mesh, "keep-tf"), 30, "a runner of keep-tf")
    assert "r1" in regions_of(mesh, before), before  # unbound: HRW's pick, in r1
    publish(mesh, r2, topic, "cf", ["f-1"])

    def inside() -> set[int]:
        now = runner_nodes(mesh, "keep-tf")
        return now if now and regions_of(mesh, now) <= {"r2", "r3"} else set()

    wait_for(inside, 40, "no runner of keep-tf left in r1")


def test_runners_of_an_unclassed_operator_leave_a_region_its_topics_class_drops(
        mesh: LocalMesh) -> None:
    set_policy(mesh, "cg", REGIONS)
    r2 = node_in(mesh, "r2")
    sid = publish(mesh, r2, "tg-probe", "cg", ["p-1"])["source"]
    topic = topic_run_in(mesh, "tg", sid, "r1")
    publish(mesh, r2, topic, "cg", ["g-1"])
    operator_anywhere(mesh, topic, "keep-tg")

    def in_r1() -> set[int]:
        now = runner_nodes(mesh, "keep-tg")
        return now if "r1" in regions_of(mesh, now) else set()

    wait_for(in_r1, 30, "keep-tg running in r1 (the class allows it)")
    set_policy(mesh, "cg", ["r2", "r3"])

    def moved() -> set[int]:
        now = runner_nodes(mesh, "keep-tg")
        return now if now and regions_of(mesh, now) <= {"r2", "r3"} else set()

    wait_for(moved, 60, "no runner of keep-tg left in r1")


def mirrors(mesh: LocalMesh, i: int, topic: str) -> list[ShardInfo]:
    st = request(mesh.nodes[i].address, mesh.credentials(), sapi.STATS, Empty(), timeout=10)
    return [m for m in st.mirrors if m.topic == topic]


def stream_counter(mesh: LocalMesh, i: int, name: str) -> int:
    st = request(mesh.nodes[i].address, mesh.credentials(), sapi.STATS, Empty(), timeout=10)
    return st.counters.get(name, 0)


def test_a_subscriber_the_class_stops_allowing_loses_its_mirror(mesh: LocalMesh) -> None:
    # A node following a classed topic for its subscribers kept its mirror (a bounded
    # copy of the shard's records) after the class stopped letting its region read,
    # until it idled out (follower_idle_s, 30 s). It now drops it when it hears the
    # change (or at its next reconcile), stops following, counts and audits it.
    set_policy(mesh, "ch", REGIONS)
    r1, r3 = node_in(mesh, "r1"), node_in(mesh, "r3")
    ids = [f"h-{k}" for k in range(5)]
    sid = publish(mesh, r1, "th", "ch", ids)["source"]
    creds = mesh.credentials()
    seen: set[str] = set()

    def read_all() -> bool:
        r = call(mesh.nodes[r3].address, creds, "stream.read",
                 {"topic": "th", "wait_s": 2.0}, timeout=30)
        seen.update(rec[4] for rec in r["records"])
        return seen >= set(ids)

    wait_for(read_all, 30, "the subscriber at r3 reading every record")
    assert [m.head for m in mirrors(mesh, r3, "th") if m.source == sid] == [len(ids)]
    dropped = stream_counter(mesh, r3, "mirrors_dropped_policy")
    set_policy_with(mesh, "ch", ["r1", "r2"], cross_region_reads=False)

    def gone() -> bool:
        return not mirrors(mesh, r3, "th") and \
            stream_counter(mesh, r3, "mirrors_dropped_policy") > dropped

    # Well within follower_idle_s (30 s): the drop is the policy's, not idleness.
    wait_for(gone, 20, "the mirror of th at r3 dropped")
    rows = call(mesh.nodes[r3].address, creds, "audit.query",
                {"subject": f"th/{sid}", "kind": "copy_dropped"}, timeout=10)["rows"]
    assert any(r["data_class"] == "ch" and "subscriber mirror of 5 records" in r["detail"]
               and "cross-region read rule" in r["detail"] for r in rows), rows
    # A read through r3 now is refused before any mirror is made again.
    with pytest.raises(RemoteError) as e:
        call(mesh.nodes[r3].address, creds, "stream.read", {"topic": "th", "wait_s": 1.0},
             timeout=30)
    assert e.value.code == "refused" and "cross-region read rule" in str(e.value)
    assert not mirrors(mesh, r3, "th")


def publish_bare(mesh: LocalMesh, i: int, topic: str, ids: list[str]) -> dict[str, Any]:
    """A publish naming no class (no residency at all)."""
    got: dict[str, Any] = call(mesh.nodes[i].address, mesh.credentials(), "stream.publish", {
        "topic": topic, "records": [["k", f"v-{rid}".encode(), rid, 1.0] for rid in ids]},
        timeout=30)
    return got


def shards_of(mesh: LocalMesh, topic: str) -> dict[int, ShardInfo]:
    """Each node's shard copy of ``topic`` (primary or backup; not mirrors)."""
    return {i: s for i in range(len(mesh.nodes)) if (s := shard(mesh, i, topic)) is not None}


def test_a_publish_naming_no_class_takes_its_topics_class(mesh: LocalMesh) -> None:
    # A publish naming no class was checked only against the rule its node had for the
    # topic: a node that never saw the topic's classed publish opened an unbound shard
    # (and placed its backup anywhere). It now reads the topic's replicated record before
    # its first shard of the topic (core.streams.publish_rule) and takes its class.
    set_policy(mesh, "ci", ["r1", "r2"])
    r1, r2, r3 = node_in(mesh, "r1"), node_in(mesh, "r2"), node_in(mesh, "r3")
    publish(mesh, r1, "ti", "ci", ["i-1"])  # writes the record; its backup is at r2
    # At r3 (outside the class, never saw the topic): refused, naming the rule and region.
    with pytest.raises(RemoteError) as e:
        publish_bare(mesh, r3, "ti", ["i-x"])
    why = str(e.value)
    assert "residency" in why and "r3" in why and "class ci" in why and "'ti'" in why, why
    assert shard(mesh, r3, "ti") is None
    # At r2 (inside): taken under the class; its shard's backup is at r1, never at r3.
    n = 5
    got = publish_bare(mesh, r2, "ti", [f"i-{k}" for k in range(2, 2 + n)])
    assert got["node"] == mesh.nodes[r2].name

    def backed_up() -> bool:
        st = request(mesh.nodes[r1].address, mesh.credentials(), sapi.STATS, Empty(),
                     timeout=10)
        return any(x.topic == "ti" and x.source == got["source"] and x.role == "backup"
                   and x.head == got["last"] + 1 for x in st.shards)

    wait_for(backed_up, 30, "r2's shard of ti backed up at r1")
    assert r3 not in shards_of(mesh, "ti")
    # Naming another class than the topic's is refused, naming both (rule topic_class).
    set_policy(mesh, "cy", REGIONS)
    with pytest.raises(RemoteError) as e:
        publish(mesh, r2, "ti", "cy", ["i-y"])
    assert e.value.code == "refused" and "cy" in str(e.value) and "ci" in str(e.value)


def topic_backup_in(mesh: LocalMesh, prefix: str, source: str, region: str) -> str:
    """A topic whose shard from ``source`` an unbound rule would back up in ``region``
    (``core.streams.backup_for`` with no residency, as every node computes it)."""
    from meshscale.core.placement import Candidate
    from meshscale.core.streams import backup_for

    cands = [Candidate(n.name, n.region, n.region) for n in mesh.nodes]
    src = next(c for c in cands if source.startswith(c.name + "~"))
    want = mesh.nodes[node_in(mesh, region)].name
    for k in range(500):
        topic = f"{prefix}-{k}"
        if backup_for(f"{topic}-out", src, cands, None) == want:
            return topic
    raise AssertionError(f"no topic of {prefix} backs its output up in {region}")


def test_a_classed_operators_output_topic_takes_its_class(mesh: LocalMesh) -> None:
    # What an operator wrote to its output topic carried no class: the output's shard
    # (at the runner, inside the class) was backed up anywhere and any node could
    # subscribe to it. The output topic now takes the operator's class
    # (core.streams.output_rule), written to its record at registration. The topic is
    # chosen so that, unbound, the output's backup would be in r1, outside the class.
    from meshscale.client.tasks import connect as connect_tasks

    set_policy_with(mesh, "cj", ["r2", "r3"], cross_region_reads=False)
    r1, r2 = node_in(mesh, "r1"), node_in(mesh, "r2")
    sid = publish(mesh, r2, "tj-probe", "cj", ["p-1"])["source"]
    topic = topic_backup_in(mesh, "tj", sid, "r1")
    out = f"{topic}-out"
    n = 6
    ids = [f"j-{k}" for k in range(n)]
    from meshscale.client.streams import encode_value

    call(mesh.nodes[r2].address, mesh.credentials(), "stream.publish", {
        "topic": topic, "records": [["k", encode_value(rid), rid, 1.0] for rid in ids],
        "residency": {"data_class": "cj"}}, timeout=30)  # values the operator decodes
    set_policy(mesh, "cw", REGIONS)
    with connect_tasks(mesh.nodes[0].address, bundle=mesh.bundle_path) as client:
        # A declared output class wider than the operator's is refused, naming both.
        with pytest.raises(MeshError) as e:
            client.operator(topic, keep, name="keep-tj-wide", output=out,
                            data_class="cj", output_class="cw")
        assert e.value.code == "refused" and "cj" in str(e.value) and "cw" in str(e.value)
        # Near-source: the runner is the source, at r2.
        client.operator(topic, keep, name="keep-tj", output=out, data_class="cj")
    ops = call(mesh.nodes[r1].address, mesh.credentials(), "stream.op_list", {},
               timeout=10)["operators"]
    spec = next(o for o in ops if o["name"] == "keep-tj")
    assert spec["output_residency"]["data_class"] == "cj", spec

    def output_backed_up() -> dict[int, ShardInfo]:
        s = shards_of(mesh, out)
        done = [i for i, x in s.items() if x.role == "backup" and x.head == n]
        return s if done else {}

    held = wait_for(output_backed_up, 60, f"the output {out} written and backed up")
    assert regions_of(mesh, set(held)) <= {"r2", "r3"}, held
    assert r1 not in held
    # A subscriber through r1 (outside the class, no cross-region reads) is refused
    # before any mirror is made.
    with pytest.raises(RemoteError) as e:
        call(mesh.nodes[r1].address, mesh.credentials(), "stream.read",
             {"topic": out, "wait_s": 1.0}, timeout=30)
    assert e.value.code == "refused" and "cross-region read rule" in str(e.value)
    assert not mirrors(mesh, r1, out)
    assert shard(mesh, r1, out) is None


def test_narrowing_drops_a_backup_outside_and_replaces_it_inside(mesh: LocalMesh) -> None:
    set_policy(mesh, "cb", REGIONS)
    n = 20
    ids = [f"b-{k}" for k in range(n)]
    got = publish(mesh, 0, "tb", "cb", ids)
    sid = got["source"]

    def backup() -> int | None:
        for i in (1, 2):
            s = shard(mesh, i, "tb")
            if s is not None and s.role == "backup" and s.head == n:
                return i
        return None

    old = wait_for(backup, 30, "the shard's backup")
    new = 3 - old
    keep = ["r1", mesh.nodes[new].region]
    # The class narrows to exclude the backup's region (not the source's).
    set_policy(mesh, "cb", keep)

    def moved() -> bool:
        s = shard(mesh, new, "tb")
        return shard(mesh, old, "tb") is None and s is not None and s.role == "backup" \
            and s.head == n
    wait_for(moved, 60, "the backup dropped outside the rule and placed inside it")
    creds = mesh.credentials()
    rows = call(mesh.nodes[old].address, creds, "audit.query",
                {"subject": f"tb/{sid}", "kind": "copy_dropped"}, timeout=10)["rows"]
    assert rows and rows[0]["data_class"] == "cb", rows
    assert mesh.nodes[old].region in rows[0]["detail"], rows
    made = call(mesh.nodes[new].address, creds, "audit.query",
                {"subject": f"tb/{sid}", "kind": "copy_made"}, timeout=10)["rows"]
    assert made and made[0]["data_class"] == "cb", made
    # The source dies: the shard's records are served from the new backup. A subscriber
    # through the old backup's node (which never followed the topic) reads every one.
    proc = mesh.nodes[0].proc
    assert proc is not None
    proc.kill()
    seen: set[str] = set()

    def read_all() -> bool:
        r = call(mesh.nodes[old].address, creds, "stream.read",
                 {"topic": "tb", "wait_s": 2.0}, timeout=30)
        seen.update(rec[4] for rec in r["records"])
        return seen >= set(ids)
    wait_for(read_all, 90, "every record read after the source died")
    assert seen == set(ids)
    assert shard(mesh, old, "tb") is None
    # (Last in the file: it kills node 0, which the module's mesh does not restart.)
