"""Data-class policies on real node processes (5 nodes, 3 regions): set through the CLI and
the client, read back from every node; bad input (unknown class, a widening rule,
malformed regions, a read-only client, ``kv.put`` on the reserved prefix) gets a clear
error and changes nothing; classed puts land only in the class's regions; a hand-made
replica write of a classed object to a node of a forbidden region is refused by that node
and counted."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from runtime_mesh import host_like_dir, wait_for

from meshscale.cli import main as cli_main
from meshscale.client import connect
from meshscale.client.mesh import MeshError
from meshscale.client.rpc import RemoteError, RpcConnection, call
from meshscale.runtime.launcher import LocalMesh
from meshscale.trust.bundle import load_bundle, write_client_bundle
from stored import copy_ids, holds_copy

pytestmark = pytest.mark.timeout(300)

REGIONS = ["eu-west", "eu-central", "us-east"]


def oid_of(data: bytes) -> str:
    return "b3-" + blake3.blake3(data).hexdigest()  # independent of the code under test


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    # Traversable by the worker user (tasks run here too; see runtime_mesh.host_like_dir).
    with host_like_dir("meshscale-policy-") as directory, \
            LocalMesh(directory, 5, regions=REGIONS) as m:
        yield m


def cli(mesh: LocalMesh, *args: str, node: int = 0,
        bundle: Path | None = None) -> int:
    return cli_main([*args, "--node", mesh.nodes[node].address,
                     "--bundle", str(bundle or mesh.bundle_path)])


def policy_on(mesh: LocalMesh, i: int, name: str) -> dict[str, Any] | None:
    try:
        got: dict[str, Any] = call(mesh.nodes[i].address, mesh.credentials(), "policy.get",
                                   {"name": name}, timeout=10)
    except RemoteError as e:
        if e.code == "not_found":
            return None
        raise
    return got


def on_disk(mesh: LocalMesh, oid: str) -> set[str]:
    """Regions whose nodes hold a file of ``oid`` (the disks, not the mesh's report)."""
    return {n.region for n in mesh.nodes
            if holds_copy(n.data_dir / "store", oid)}


def test_policy_set_get_list_delete_through_the_cli(
        mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(mesh, "policy", "set", "pii", "--regions", "eu-west,eu-central",
               "--replicas", "2", "--ttl", "30d", "--no-cross-region-reads") == 0
    out = capsys.readouterr().out
    assert "regions=eu-central,eu-west" in out and "replicas=2" in out
    # Every node reads the same policy (through the replicated KV).
    for i in range(5):
        got = policy_on(mesh, i, "pii")
        assert got is not None
        assert got["regions"] == ["eu-central", "eu-west"]
        assert got["replicas"] == 2 and got["ttl_s"] == 30 * 86400.0
        assert got["cross_region_reads"] is False
    assert cli(mesh, "policy", "get", "pii", "--json", node=3) == 0
    assert json.loads(capsys.readouterr().out)["regions"] == ["eu-central", "eu-west"]
    assert cli(mesh, "policy", "set", "telemetry", "--regions", "us-east,eu-west") == 0
    capsys.readouterr()
    assert cli(mesh, "policy", "list", "--json", node=2) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert {"pii", "telemetry"} <= set(names) and names == sorted(names)
    assert cli(mesh, "policy", "delete", "telemetry") == 0
    capsys.readouterr()
    assert policy_on(mesh, 4, "telemetry") is None
    assert cli(mesh, "policy", "get", "telemetry") == 1  # not found
    assert "no policy for data class 'telemetry'" in capsys.readouterr().err


def test_bad_policy_input_is_refused_and_changes_nothing(
        mesh: LocalMesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(mesh, "policy", "set", "pii", "--regions", "eu-west,eu-central",
               "--replicas", "2") == 0
    capsys.readouterr()
    before = policy_on(mesh, 0, "pii")
    # Malformed region names: one line, exit 2, nothing sent.
    for bad in ("eu west", "eu-west,,eu-central", "eu/west", ""):
        assert cli(mesh, "policy", "set", "pii", "--regions", bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("meshscale: error: ") and err.count("\n") == 1
        assert "region" in err
    assert cli(mesh, "policy", "set", "pii", "--regions", "eu-west", "--ttl", "soon") == 2
    assert "--ttl" in capsys.readouterr().err
    assert cli(mesh, "policy", "set", "pii", "--regions", "eu-west",
               "--stream-regions", "us-east") == 2
    assert "stream regions" in capsys.readouterr().err
    # A read-only client may read but not change a policy.
    admin = load_bundle(mesh.admin_path)
    viewer = write_client_bundle(admin, "viewer", tmp_path / "viewer", read_only=True).path
    assert cli(mesh, "policy", "get", "pii", bundle=viewer) == 0
    capsys.readouterr()
    assert cli(mesh, "policy", "set", "pii", "--regions", "us-east", bundle=viewer) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "policy.set" in err
    assert cli(mesh, "policy", "delete", "pii", bundle=viewer) == 2
    capsys.readouterr()
    # The KV's own methods cannot write the reserved prefix, even with the admin role.
    creds = mesh.credentials()
    with pytest.raises(RemoteError, match="reserved for data-class policies") as e:
        call(mesh.nodes[1].address, creds, "kv.put",
             {"key": "__policy/pii", "value": b"\x80"}, timeout=10)
    assert e.value.code == "unauthorized"
    with pytest.raises(RemoteError, match="reserved"):
        call(mesh.nodes[1].address, creds, "kv.delete", {"key": "__policy/pii"}, timeout=10)
    # A malformed name sent by hand (bypassing the CLI's checks) is refused by the node.
    with pytest.raises(RemoteError, match="malformed region") as e:
        call(mesh.nodes[2].address, creds, "policy.set",
             {"name": "pii", "regions": ["eu west"]}, timeout=10)
    assert e.value.code == "invalid"
    # Unknown class: not found, exit 1.
    assert cli(mesh, "policy", "get", "nosuch") == 1
    capsys.readouterr()
    assert cli(mesh, "policy", "delete", "nosuch") == 1
    capsys.readouterr()
    for i in range(5):
        assert policy_on(mesh, i, "pii") == before


def test_policies_from_the_python_client(mesh: LocalMesh) -> None:
    with connect(mesh.nodes[2].address, bundle=mesh.bundle_path) as m:
        reply = m.policies.set("finance", ["us-east"], replicas=1, ttl_s=3600.0)
        assert reply.policy.regions == ["us-east"] and reply.previous is None
        assert m.policies.get("finance").ttl_s == 3600.0
        assert "finance" in [p.name for p in m.policies.list()]
        with pytest.raises(ValueError, match="malformed region"):
            m.policies.set("finance", ["us east"])
        with pytest.raises(MeshError) as e:
            m.policies.get("nosuch")
        assert e.value.code == "not_found"
        m.policies.delete("finance")
        with pytest.raises(MeshError):
            m.policies.get("finance")


def _ensure_pii(mesh: LocalMesh) -> None:
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        m.policies.set("pii", ["eu-west", "eu-central"], replicas=2)


def test_classed_puts_live_only_in_the_class_regions(mesh: LocalMesh) -> None:
    _ensure_pii(mesh)
    us = [i for i, n in enumerate(mesh.nodes) if n.region == "us-east"]
    oids = []
    # Through every node, a node of the forbidden region included: the coordinator
    # resolves the class's rule (the put names the class only).
    with connect(mesh.nodes[us[0]].address, bundle=mesh.bundle_path) as m:
        for k in range(6):
            data = f"patient {k} ".encode() * (50 + k)
            ref = m.put(data, data_class="pii")
            assert ref.id == oid_of(data)
            oids.append(ref.id)
            info = m.stat(ref)
            assert info.data_class == "pii"
            assert set(info.residency or ()) == {"eu-west", "eu-central"}
            assert info.replicas == 2  # the class's count
        # A big one (chunked upload, cut-through copies).
        big = bytes(range(256)) * 4096 * 2
        oids.append(m.put(big, data_class="pii").id)
        # An explicit rule may narrow the class's ...
        narrow = m.put(b"eu-west only " * 10, data_class="pii", residency=["eu-west"])
        assert set(m.stat(narrow).residency or ()) == {"eu-west"}
        oids.append(narrow.id)
        # ... never widen it: refused naming both rules, nothing stored.
        wide = b"would leave the EU " * 10
        with pytest.raises(MeshError) as e:
            m.put(wide, data_class="pii", residency=["eu-west", "us-east"])
        msg = str(e.value)
        assert e.value.code == "refused" and "widens" in msg and "class pii" in msg
        assert "us-east" in msg and "regions={eu-central,eu-west}" in msg
        # Unknown class without regions: refused.
        with pytest.raises(MeshError) as e:
            m.put(b"unclassified " * 10, data_class="nosuch")
        assert e.value.code == "refused" and "unknown data class 'nosuch'" in str(e.value)
    for oid in oids:
        wait_for(lambda o=oid: on_disk(mesh, o) and on_disk(mesh, o) <= {"eu-west", "eu-central"}
                 and len(on_disk(mesh, o)) >= 1, 30, f"{oid} stored")
    # Once the spare copies settled, no copy anywhere outside the class's regions.
    for oid in oids:
        assert on_disk(mesh, oid) <= {"eu-west", "eu-central"}, oid
    assert not on_disk(mesh, oid_of(b"would leave the EU " * 10))


def _stats(mesh: LocalMesh, i: int) -> dict[str, int]:
    got: dict[str, int] = call(mesh.nodes[i].address, mesh.credentials(), "dp.stats",
                               timeout=10)["dataplane"]
    return got


def test_a_replica_write_to_a_forbidden_region_is_refused_by_the_receiver(
        mesh: LocalMesh) -> None:
    _ensure_pii(mesh)
    us = next(i for i, n in enumerate(mesh.nodes) if n.region == "us-east")
    eu = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    # The receiver must know the class: wait until its cache has it (a read on a miss).
    wait_for(lambda: policy_on(mesh, us, "pii"), 20, "the policy readable at the receiver")
    data = b"a classed copy sent by hand " * 20
    oid = oid_of(data)
    sender = mesh.node_credentials(eu)  # node-to-node: a node's own certificate

    before = _stats(mesh, us).get("refused_residency", 0)

    async def go() -> None:
        c = RpcConnection(mesh.nodes[us].address, sender, 30)
        try:
            # 1. The header states the class only (no regions): the receiver's own
            #    knowledge of the class refuses it.
            for header in ({"data_class": "pii"},
                           # 2. A header that lies about the regions.
                           {"regions": ["us-east", "eu-west"], "data_class": "pii"},
                           # 3. A header whose own rule excludes the receiver.
                           {"regions": ["eu-west"], "data_class": "pii"}):
                for method, extra in (("obj.rw_small", {"data": data}), ("obj.rw_begin", {})):
                    with pytest.raises(RemoteError) as e:
                        await c.call(method, {"id": oid, "size": len(data), "replicas": 2,
                                              "residency": header, **extra})
                    assert e.value.code == "refused", (method, header, e.value)
                    msg = str(e.value)
                    assert "us-east" in msg and "pii" in msg and "residency rule" in msg
        finally:
            await c.close()

    asyncio.run(go())
    assert _stats(mesh, us).get("refused_residency", 0) - before == 6
    # ... and audited there: a refusal entry per attempt, naming the object, the class,
    # the sender's region and the rule.
    rows = call(mesh.nodes[us].address, mesh.credentials(), "audit.query",
                {"subject": oid, "kind": "refusal"}, timeout=10)["rows"]
    assert len(rows) == 6, rows
    for row in rows:
        assert row["data_class"] == "pii" and row["from_region"] == "eu-west"
        assert row["to_region"] == "us-east" and "residency rule" in row["detail"]
    assert oid_of(data) not in copy_ids(mesh.nodes[us].data_dir / "store")
    # The same hand-made write to a node of an allowed region is taken (the check is not
    # a blanket refusal).

    async def allowed() -> None:
        c = RpcConnection(mesh.nodes[eu].address, mesh.node_credentials(us), 30)
        try:
            got = await c.call("obj.rw_small", {"id": oid, "size": len(data), "replicas": 2,
                                                "residency": {"data_class": "pii"},
                                                "data": data})
            assert got["id"] == oid
        finally:
            await c.close()

    asyncio.run(allowed())
    assert "eu-west" in on_disk(mesh, oid)

    # A sender that has not heard of a narrowing states the old, wider rule: a receiver
    # the class allows takes the copy, but keeps it under the rule narrowed to the class's
    # regions (core.policy.stored_rule), so the copy never claims a region the class
    # forbids.
    wide = b"a classed copy with a stale, wider rule " * 20
    wide_oid = oid_of(wide)

    async def stale() -> dict[str, Any]:
        c = RpcConnection(mesh.nodes[eu].address, mesh.node_credentials(us), 30)
        try:
            await c.call("obj.rw_small", {"id": wide_oid, "size": len(wide), "replicas": 2,
                                          "residency": {"regions": ["eu-west", "us-east"],
                                                        "data_class": "pii"},
                                          "data": wide})
            got: dict[str, Any] = await c.call("obj.local_stat", {"id": wide_oid})
            return got
        finally:
            await c.close()

    local = asyncio.run(stale())
    assert local["residency"] == {"regions": ["eu-west"], "data_class": "pii"}, local


def test_a_policy_change_that_breaks_copies_is_refused(
        mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    _ensure_pii(mesh)
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        ref = m.put(b"kept in eu-central too " * 30, data_class="pii")
    wait_for(lambda: on_disk(mesh, ref.id), 20, "the object stored")
    regions = on_disk(mesh, ref.id)
    assert regions <= {"eu-west", "eu-central"}
    # Narrow to a region that leaves some copy outside: refused, with or without --migrate.
    outside = "eu-west" if "eu-central" in regions else "eu-central"
    assert cli(mesh, "policy", "set", "pii", "--regions", outside) == 2  # refused as given
    err = capsys.readouterr().err
    assert "would be outside regions" in err and "not changed" in err
    # (--migrate moves them: tests/runtime/test_erase_mesh.py.)
    got = policy_on(mesh, 1, "pii")
    assert got is not None and got["regions"] == ["eu-central", "eu-west"]


def parent_pid() -> int:
    """Run as a task: the pid of the process that spawned this worker (its node)."""
    return os.getppid()


def big_result(n: int) -> bytes:
    return bytes([n % 256]) * 400_000  # over inline_result_bytes: stored as an object


def length_and_pid(data: bytes) -> tuple[int, int]:
    return len(data), os.getppid()


def plus_one(got: tuple[int, int]) -> int:
    return got[0] + 1


def both_lengths(a: bytes, b: bytes) -> int:
    return len(a) + len(b)


def sleep_then_length(data: bytes) -> int:
    import time

    time.sleep(60)
    return len(data)


def test_a_classed_task_runs_only_in_the_class_regions(mesh: LocalMesh) -> None:
    from meshscale.client.tasks import TaskError, TaskSubmitError, task
    from meshscale.client.tasks import connect as connect_tasks

    _ensure_pii(mesh)
    us = next(i for i, n in enumerate(mesh.nodes) if n.region == "us-east")
    by_pid = {n.proc.pid: n for n in mesh.nodes if n.proc is not None}
    with connect_tasks(mesh.nodes[us].address, bundle=mesh.bundle_path) as client:
        # Submitted through a node of a forbidden region, naming the class only.
        tf = task(data_class="pii")(parent_pid)
        futs = [client.submit(tf) for _ in range(6)]
        client.wait(futs, timeout=120)
        ran_in = {by_pid[f.result()].region for f in futs}
        assert ran_in and ran_in <= {"eu-west", "eu-central"}, ran_in
        # Narrowing is kept; widening and an unknown class are refused at submit.
        narrow = [client.submit(task(data_class="pii", residency=["eu-central"])(parent_pid))
                  for _ in range(3)]
        client.wait(narrow, timeout=120)
        assert {by_pid[f.result()].region for f in narrow} == {"eu-central"}
        with pytest.raises(TaskSubmitError, match="widens") as e:
            client.submit(task(data_class="pii", residency=["us-east"])(parent_pid))
        assert "class pii" in str(e.value)
        with pytest.raises(TaskSubmitError, match="unknown data class 'nosuch'"):
            client.submit(task(data_class="nosuch")(parent_pid))
        # A large result of a classed task is an object of the class: its copies stay in
        # the class's regions.
        fut = client.submit(task(data_class="pii")(big_result), 7)
        assert fut.result(timeout=120) == bytes([7]) * 400_000
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        results = [o for o in m.objects() if o.size > 400_000 and o.data_class == "pii"]
    assert results, "the result was not stored as an object of the class"
    for o in results:
        assert set(o.residency or ()) <= {"eu-west", "eu-central"}
        assert on_disk(mesh, o.id) and on_disk(mesh, o.id) <= {"eu-west", "eu-central"}
    # A task that names no class but reads a pii object takes the class: it runs in the
    # class's regions, and its result, however small, is an object of the class (only
    # the reference reaches its owner, here a node of a forbidden region); so does the
    # result of a task that takes that result.
    eu = {"eu-west", "eu-central"}
    region_of = {n.name: n.region for n in mesh.nodes}
    creds = mesh.credentials()
    with connect_tasks(mesh.nodes[us].address, bundle=mesh.bundle_path) as client:
        ref = client.put(b"customer 42", data_class="pii")
        first = client.submit(task(length_and_pid), ref)
        second = client.submit(task(plus_one), first)
        assert second.result(timeout=120) == 12
        n, pid = first.result(timeout=120)
        assert n == 11 and by_pid[pid].region in eu
        for fut in (first, second):
            view = call(mesh.nodes[us].address, creds, "task.result",
                        {"task_id": fut.task_id}, timeout=30)
            assert view.get("value") is None and view.get("ref"), view
            st = client.stat(view["ref"]["id"])
            assert st.data_class == "pii" and set(st.residency or ()) <= eu
            assert on_disk(mesh, st.id) and on_disk(mesh, st.id) <= eu
            assert region_of[view["node"]] in eu
            # Audited where it ran: a task run on classed data, naming the result's class.
            rows = call(mesh.nodes[[n.name for n in mesh.nodes].index(view["node"])].address,
                        creds, "audit.query", {"subject": fut.task_id, "kind": "task_run"},
                        timeout=10)["rows"]
            assert rows and all(r["data_class"] == "pii" for r in rows), rows
            assert "result class pii" in rows[-1]["detail"], rows
        # Inputs of classes neither of which is the stricter: refused at submit, naming
        # the rule, until the task declares its result's class.
        client.policies.set("usonly", ["us-east"], replicas=1)
        usref = client.put(b"us data", data_class="usonly")
        with pytest.raises(TaskSubmitError, match="ambiguous") as e2:
            client.submit(task(both_lengths), ref, usref)
        assert "usonly" in str(e2.value) and "pii" in str(e2.value)
        # An owner sent a classed result inline (by a worker not keeping the rule)
        # refuses it: the task fails naming the rule, and the owner audits the refusal.
        slow = client.submit(task(sleep_then_length), ref)
        wait_for(lambda: call(mesh.nodes[us].address, creds, "task.result",
                              {"task_id": slow.task_id}, timeout=30)["state"] == "running",
                 60, "the slow task running")
        euw = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
        got = call(mesh.nodes[us].address, mesh.node_credentials(euw), "task.done",
                   {"task_id": slow.task_id, "node": mesh.nodes[euw].name, "ok": True,
                    "value": b"inline bytes"}, timeout=30)
        assert got["accepted"]
        with pytest.raises(TaskError, match="its result is of class pii") as e3:
            slow.result(timeout=60)
        assert e3.value.kind == "refused"
        rows = call(mesh.nodes[us].address, creds, "audit.query",
                    {"subject": slow.task_id, "kind": "refusal"}, timeout=10)["rows"]
        assert rows and rows[0]["data_class"] == "pii", rows


def tag(rec: Any) -> dict[str, Any]:
    return {"v": rec.value}


def test_classed_streams_and_operators_stay_in_the_class_regions(mesh: LocalMesh) -> None:
    from meshscale.client.rpc import request
    from meshscale.client.tasks import connect as connect_tasks
    from meshscale.core.api import Empty
    from meshscale.core.api import streams as sapi

    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        m.policies.set("events", ["eu-west", "eu-central"], stream_regions=["eu-west"],
                       cross_region_reads=False)
    us = next(i for i, n in enumerate(mesh.nodes) if n.region == "us-east")
    euw = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    ec = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-central")
    rec = {"topic": "ev", "records": [["k", b"v1", "id-1", 1.0]],
           "residency": {"data_class": "events"}}
    creds = mesh.credentials()
    # Records of the class may not enter at a node outside its stream regions.
    for i in (us, ec):
        with pytest.raises(RemoteError) as e:
            call(mesh.nodes[i].address, creds, "stream.publish", rec, timeout=10)
        assert "residency" in str(e.value) and mesh.nodes[i].region in str(e.value)
    got = call(mesh.nodes[euw].address, creds, "stream.publish", rec, timeout=10)
    assert got["node"] == mesh.nodes[euw].name

    def shard_regions() -> set[str]:
        out = set()
        for i, n in enumerate(mesh.nodes):
            st = request(n.address, creds, sapi.STATS, Empty(), timeout=10)
            if any(s.topic == "ev" for s in st.shards):
                out.add(mesh.nodes[i].region)
        return out

    wait_for(shard_regions, 20, "the shard held")
    assert shard_regions() <= {"eu-west"}
    # A hand-made backup copy of the shard to a node outside the stream regions: refused
    # by that node (it knows the class), counted.
    before = request(mesh.nodes[ec].address, creds, sapi.STATS, Empty(),
                     timeout=10).counters.get("refused_residency", 0)
    with pytest.raises(RemoteError) as e:
        call(mesh.nodes[ec].address, mesh.node_credentials(euw), "stream.replicate",
             {"topic": "ev", "source": "x~1", "entries": [],
              "residency": {"data_class": "events"}}, timeout=10)
    assert e.value.code == "refused" and "events" in str(e.value)
    after = request(mesh.nodes[ec].address, creds, sapi.STATS, Empty(),
                    timeout=10).counters.get("refused_residency", 0)
    assert after == before + 1
    # An operator of the class runs only in the class's regions, wherever it is registered.
    with connect_tasks(mesh.nodes[us].address, bundle=mesh.bundle_path) as client:
        with pytest.raises(MeshError, match="widens"):
            client.operator("ev", tag, name="tag-wide", data_class="events",
                            residency=["us-east"])
        client.operator("ev", tag, name="tag-ev", data_class="events", output="ev-out")

    def runner_regions() -> set[str]:
        out = set()
        for n in mesh.nodes:
            st = request(n.address, creds, sapi.STATS, Empty(), timeout=10)
            if any(r.startswith("tag-ev@") for r in st.runners):
                out.add(n.region)
        return out

    wait_for(runner_regions, 30, "a runner of tag-ev")
    assert runner_regions() <= {"eu-west", "eu-central"}
    # The class forbids cross-region reads: a subscription through a node outside its
    # regions is refused, naming the rule, by that node before it follows the topic (it
    # reads the topic's class from the topic's replicated record: no mirror is made
    # there); the shard holder refuses that node's fetches itself; through a node of the
    # class's regions it reads.
    held_before = request(mesh.nodes[euw].address, creds, sapi.STATS, Empty(),
                          timeout=10).counters.get("refused_cross_region_read", 0)
    refused: list[str] = []

    def subscribe_refused() -> bool:
        try:
            call(mesh.nodes[us].address, creds, "stream.read",
                 {"topic": "ev", "wait_s": 5.0}, timeout=30)
        except RemoteError as e:
            refused.append(f"{e.code}: {e}")
            return True
        return False

    wait_for(subscribe_refused, 60, "the subscription through us-east refused")
    assert refused[-1].startswith("refused: ") and "cross-region read rule" in refused[-1]
    assert "events" in refused[-1] and "us-east" in refused[-1]
    st_us = request(mesh.nodes[us].address, creds, sapi.STATS, Empty(), timeout=10)
    assert not [m for m in st_us.mirrors if m.topic == "ev"], st_us.mirrors
    # The holder's own check: a fetch sent with the us-east node's certificate.
    with pytest.raises(RemoteError) as e3:
        call(mesh.nodes[euw].address, mesh.node_credentials(us), "stream.fetch",
             {"topic": "ev", "source": got["source"], "limit": 10}, timeout=10)
    assert e3.value.code == "refused" and "cross-region read rule" in str(e3.value)
    assert request(mesh.nodes[euw].address, creds, sapi.STATS, Empty(), timeout=10
                   ).counters.get("refused_cross_region_read", 0) > held_before
    rows = call(mesh.nodes[euw].address, creds, "audit.query",
                {"subject": "ev", "kind": "refusal"}, timeout=10)["rows"]
    assert any(r["data_class"] == "events" and r["from_region"] == "us-east"
               and "cross-region read rule" in r["detail"] for r in rows), rows
    rows = call(mesh.nodes[us].address, creds, "audit.query",
                {"subject": "ev", "kind": "refusal"}, timeout=10)["rows"]
    assert any(r["data_class"] == "events" and "cross-region read rule" in r["detail"]
               for r in rows), rows

    def read_in_eu() -> list[Any]:
        got: list[Any] = call(mesh.nodes[ec].address, creds, "stream.read",
                              {"topic": "ev", "wait_s": 5.0}, timeout=30)["records"]
        return got

    got = wait_for(read_in_eu, 60, "a subscription through eu-central")
    assert any(r[3] == b"v1" for r in got), got


def test_no_cross_region_reads(mesh: LocalMesh) -> None:
    us = next(i for i, n in enumerate(mesh.nodes) if n.region == "us-east")
    euw = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    data = b"read me only in the EU " * 40
    with connect(mesh.nodes[euw].address, bundle=mesh.bundle_path) as m:
        m.policies.set("health", ["eu-west", "eu-central"], cross_region_reads=False)
        ref = m.put(data, data_class="health")
        assert m.get(ref) == data  # a node in the class's regions reads it
    before = _stats(mesh, us).get("refused_cross_region_read", 0)
    with connect(mesh.nodes[us].address, bundle=mesh.bundle_path) as m, \
            pytest.raises(MeshError) as e:
        m.get(ref)
    assert e.value.code == "refused"
    assert "cross-region read rule" in str(e.value) and "us-east" in str(e.value)
    assert _stats(mesh, us).get("refused_cross_region_read", 0) > before
    # A node of another region relaying by hand (node to node) is refused by the holder.
    holder = next(i for i, n in enumerate(mesh.nodes)
                  if holds_copy(n.data_dir / "store", ref.id))
    with pytest.raises(RemoteError) as e2:
        call(mesh.nodes[holder].address, mesh.node_credentials(us), "obj.read_local",
             {"id": ref.id, "offset": 0, "length": 100}, timeout=10)
    assert e2.value.code == "refused" and "cross-region read rule" in str(e2.value)
    # A class that allows cross-region reads is read from anywhere.
    with connect(mesh.nodes[euw].address, bundle=mesh.bundle_path) as m:
        m.policies.set("public", ["eu-west"], replicas=2)  # eu-west has 2 nodes
        ref2 = m.put(b"open " * 40, data_class="public")
    with connect(mesh.nodes[us].address, bundle=mesh.bundle_path) as m:
        assert m.get(ref2) == b"open " * 40


def test_kv_keys_under_a_class_prefix(mesh: LocalMesh) -> None:
    us = next(i for i, n in enumerate(mesh.nodes) if n.region == "us-east")
    euw = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    creds = mesh.credentials()
    with connect(mesh.nodes[euw].address, bundle=mesh.bundle_path) as m:
        m.policies.set("vault", ["eu-west", "eu-central"], cross_region_reads=False)
    apply = {"key": "vault/probe", "value": b"x", "ts": "0000000000000001-00000000-t"}

    def refused_at_us() -> bool:
        try:
            call(mesh.nodes[us].address, mesh.node_credentials(euw), "kv.apply", apply,
                 timeout=10)
        except RemoteError as e:
            return e.code == "refused" and "vault" in str(e)
        return False

    # A replica outside the class refuses a key under its prefix once its cache has the
    # class (the periodic refresh: policy_refresh_s).
    wait_for(refused_at_us, 20, "the us-east node refusing a vault/ key")
    # Written through a node of a forbidden region, the key's replicas are in the class's
    # regions only (asked node to node: which replicas hold a record of it).
    with connect(mesh.nodes[us].address, bundle=mesh.bundle_path) as m:
        m.kv.put("vault/secret", b"s3cr3t")

    def holders() -> set[str]:
        out = set()
        for i, n in enumerate(mesh.nodes):
            got = call(n.address, mesh.node_credentials(euw), "kv.read",
                       {"key": "vault/secret"}, timeout=10)
            if got is not None and got["value"] == b"s3cr3t":
                out.add(mesh.nodes[i].region)
        return out

    wait_for(holders, 10, "the key stored")
    assert holders() <= {"eu-west", "eu-central"}
    # Read back inside the class's regions; refused through a node outside (the class
    # forbids cross-region reads).
    with connect(mesh.nodes[euw].address, bundle=mesh.bundle_path) as m:
        assert m.kv.get("vault/secret") == "s3cr3t"
    with connect(mesh.nodes[us].address, bundle=mesh.bundle_path) as m, \
            pytest.raises(MeshError) as e:
        m.kv.get("vault/secret")
    assert e.value.code == "refused" and "cross-region read rule" in str(e.value)
    # Nor are its keys listed there (they are, inside the class's regions).
    with connect(mesh.nodes[euw].address, bundle=mesh.bundle_path) as m:
        assert "vault/secret" in [k for k, _ in m.kv.items("vault/")]
    with connect(mesh.nodes[us].address, bundle=mesh.bundle_path) as m:
        assert "vault/secret" not in [k for k, _ in m.kv.items("vault/")]
    # Keys outside any class's prefix are untouched.
    with connect(mesh.nodes[us].address, bundle=mesh.bundle_path) as m:
        m.kv.put("plain/key", b"v")
        assert m.kv.get("plain/key") == "v"
    assert call(mesh.nodes[us].address, creds, "dp.stats",
                timeout=10)["dataplane"].get("refused_residency", 0) >= 1


def test_the_coordinators_own_copy_takes_a_narrowing_made_during_its_upload(
        mesh: LocalMesh) -> None:
    # The put's rule is resolved when its upload begins; the class is narrowed (through
    # the same node, whose cache has it at once) before the bytes are all there. The
    # coordinator keeps its own copy under the narrowed rule (core.policy.stored_rule),
    # as a receiver keeps a replica, not under the rule resolved before the change.
    eu = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    with connect(mesh.nodes[eu].address, bundle=mesh.bundle_path) as m:
        m.policies.set("narrowing", ["eu-west", "eu-central"], replicas=2)
    data = b"uploaded while its class narrowed " * 40
    oid = oid_of(data)

    async def go() -> dict[str, Any]:
        c = RpcConnection(mesh.nodes[eu].address, mesh.credentials(), 30)
        try:
            began = await c.call("obj.put_begin", {"size": len(data),
                                                   "residency": {"data_class": "narrowing"}})
            await c.call("obj.put_chunk", {"upload": began["upload"], "data": data[:100]})
            await c.call("policy.set", {"name": "narrowing", "regions": ["eu-west"],
                                        "replicas": 2, "migrate": True})
            await c.call("obj.put_chunk", {"upload": began["upload"], "data": data[100:]})
            put = await c.call("obj.put_end", {"upload": began["upload"]})
            assert put["id"] == oid
        finally:
            await c.close()
        # Another node's certificate: obj.local_stat is node-to-node.
        peer = RpcConnection(mesh.nodes[eu].address, mesh.node_credentials((eu + 1) % 5), 30)
        try:
            got: dict[str, Any] = await peer.call("obj.local_stat", {"id": oid})
            return got
        finally:
            await peer.close()

    local = asyncio.run(go())
    assert local["residency"] == {"regions": ["eu-west"], "data_class": "narrowing"}, local
