"""Classed stream shards follow their class's policy on real node processes (3 nodes, one
per region): a topic of a class stays publishable after the class narrows (its rule is the
class's current one, not the one of its first publish), and a narrowing that excludes a
shard's backup drops that copy (audited) while its source places a new backup inside the
rule that holds every record, readable by a subscriber once the source is gone; an operator of a class whose rule narrows
after it was registered moves its runners inside the new rule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from runtime_mesh import wait_for

from meshscale.client import connect
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
