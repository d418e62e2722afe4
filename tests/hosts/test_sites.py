"""Six nodes in three sites, each in its own network namespace, from node bundles only.

In order (the module shares one mesh; each test leaves it whole for the next, except the
last, which removes a node for good):

1. the mesh forms from seed addresses; a client in one site stores and reads objects and
   runs tasks in the others;
2. one site is cut off for 30 s by packet drops: each side serves what its replicas
   allow, a put whose W cannot be met is refused saying so, and after the heal the mesh
   is one view within 10 s, no acknowledged object is lost and every object is back at its
   replication factor (checked on the nodes' disks, not only in their reports);
3. bad credentials over the network: a client certificate calling a node-to-node method,
   a read-only client writing;
4. ``meshscale node remove``: within 10 s every live node refuses the removed node and
   lists it as removed, its objects are re-replicated, and its restart is refused.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
from hostbed import MESHSCALE, PORT, Sites, cli, wait_until

from stored import holds_copy

pytestmark = pytest.mark.timeout(420)

HEAL_VIEW_S = 10.0
REMOVE_SPREAD_S = 10.0


def converged(s: Sites, among: list[str] | None = None, via: str = "factory") -> bool:
    nodes = [s.nodes[n] for n in (among or list(s.nodes))]
    names = {n.name for n in nodes}
    for node in nodes:
        view = s.view(via, node)
        if {m for m, r in view.items() if r["state"] == "alive"} != names:
            return False
    return True


def files_of(s: Sites, oid: str) -> set[str]:
    """Which nodes hold a committed copy of ``oid``: read from their data dirs, the
    outside truth."""
    out = set()
    for node in s.nodes.values():
        if holds_copy(node.data_dir / "store", oid):
            out.add(node.name)
    return out


STORED: dict[str, bytes] = {}
"""Objects acknowledged so far in this module: id -> bytes."""


def put(s: Sites, site: str, node: str, data: bytes, replicas: int = 3, w: int = 2
        ) -> dict[str, object]:
    return s.clients[site]("put", addr=s.nodes[node].addr, data=base64.b64encode(data).decode(),
                           replicas=replicas, w=w)


def get(s: Sites, site: str, node: str, oid: str) -> bytes | str:
    """The object's bytes, or the error the client got."""
    answer = s.clients[site]("get", addr=s.nodes[node].addr, id=oid)
    return base64.b64decode(answer["data"]) if answer["ok"] else str(answer["error"])


def test_mesh_forms_and_serves_across_sites(sites: Sites) -> None:
    s = sites
    wait_until(lambda: converged(s), 60, "6 nodes alive in every view")
    view = s.view("shop", s.nodes["shop-1"])
    assert {r["region"] for r in view.values()} == {"eu-west", "eu-central", "us-east"}
    assert all(r["address"] == s.nodes[n].addr for n, r in view.items())
    # A client in the factory stores through a factory node...
    for i in range(6):
        data = os.urandom(64 * 1024 + i)
        answer = put(s, "factory", "factory-1", data)
        assert answer["ok"], answer
        STORED[str(answer["id"])] = data
    # ... and a client in the cloud reads every object back through a cloud node.
    for oid, data in STORED.items():
        assert get(s, "cloud", "cloud-2", oid) == data
        wait_until(lambda oid=oid: len(files_of(s, oid)) >= 3, 30, f"3 copies of {oid}")
    # Tasks submitted in the shop run in the other sites, as the workers themselves see.
    ips = {n.host.ip: n for n in s.nodes.values()}
    for region, site in (("us-east", "cloud"), ("eu-west", "factory")):
        answer = s.clients["shop"]("map", addr=s.nodes["shop-1"].addr, n=6, region=region)
        assert answer["ok"], answer
        results = answer["results"]
        assert [r[0] for r in results] == [i * i for i in range(6)]
        assert {ips[r[1]].host.site for r in results} == {site}, results


def test_a_site_cut_off_for_30s(sites: Sites) -> None:
    s = sites
    wait_until(lambda: converged(s), 60, "6 nodes alive in every view")
    cloud = [h for h in s.lab.hosts.values() if h.site == "cloud"]
    majority = [n for n in s.nodes if not n.startswith("cloud")]
    minority = ["cloud-1", "cloud-2"]
    t0 = time.monotonic()
    s.lab.partition(cloud)
    try:
        # Each side notices the other is gone (real drops: probes time out).
        def sees_dead(via: str, observers: list[str], subjects: list[str]) -> bool:
            return all(s.view(via, s.nodes[o])[x]["state"] == "dead"
                       for o in observers for x in subjects)

        wait_until(lambda: sees_dead("factory", majority, minority), 25,
                   "the majority declares the cloud dead")
        wait_until(lambda: sees_dead("cloud", minority, majority), 25,
                   "the cloud declares the others dead")
        # Each side serves reads of what its replicas allow: every object has a copy on
        # the majority side (3 copies over 3 sites) ...
        for oid, data in STORED.items():
            assert get(s, "factory", "factory-2", oid) == data
        # ... and the cloud serves what it holds.
        held = [oid for oid in STORED if files_of(s, oid) & set(minority)]
        assert held
        for oid in held:
            assert get(s, "cloud", "cloud-1", oid) == STORED[oid]
        # The majority still takes writes at RF 3 ...
        data = os.urandom(32 * 1024)
        answer = put(s, "factory", "factory-1", data, replicas=3, w=3)
        assert answer["ok"], answer
        STORED[str(answer["id"])] = data
        # ... the two cloud nodes cannot make three copies: refused, saying why.
        answer = put(s, "cloud", "cloud-1", os.urandom(32 * 1024), replicas=3, w=3)
        assert not answer["ok"]
        assert "W=3" in answer["error"], answer
        left = 30 - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)  # the 30 s cut, whatever detection took
    finally:
        s.lab.heal()
    healed = time.monotonic()
    # The bound is the deadline (plus a poll through the client); the time it
    # took is printed, not asserted: speed is for bench/.
    wait_until(lambda: converged(s), HEAL_VIEW_S + 2, "one view after the heal", poll=0.25)
    print(f"one view {time.monotonic() - healed:.1f} s after the heal")
    # Nothing acknowledged was lost, and every object is back at its replication factor.
    for oid, data in STORED.items():
        assert get(s, "cloud", "cloud-2", oid) == data
        wait_until(lambda oid=oid: len(files_of(s, oid)) >= 3, 60, f"3 copies of {oid}")


def test_credentials_are_checked_across_the_network(sites: Sites, tmp_path: Path) -> None:
    s = sites
    client = s.clients["shop"]
    target = s.nodes["factory-1"].addr
    # A client certificate may not call node-to-node methods.
    answer = client("call", addr=target, method="obj.rw_small",
                    args={"id": "b3-" + "0" * 64, "data": {"b64": ""}})
    assert not answer["ok"] and "forbidden" in answer["error"], answer
    assert "'obj.rw_small' needs node access" in answer["error"]
    # A read-only client reads, and may not write.
    viewer = tmp_path / "viewer"
    assert cli("bundle", "client", "--bundle", s.admin, "--name", "viewer", "--read-only",
               "--out", viewer).returncode == 0
    host = s.lab.hosts["shop-client"]
    listed = cli("members", "--bundle", viewer, "--node", target, host=host)
    assert listed.returncode == 0 and "factory-1" in listed.stdout, listed.stderr
    src = tmp_path / "f.bin"
    src.write_bytes(b"not allowed")
    refused = cli("put", src, "--bundle", viewer, "--node", target, host=host)
    assert refused.returncode == 2
    assert "forbidden" in refused.stderr and "read-only" in refused.stderr, refused.stderr
    # A node bundle is not a client bundle.
    wrong = cli("members", "--bundle", s.nodes["shop-1"].bundle, "--node", target, host=host)
    assert wrong.returncode == 2 and "is a node bundle" in wrong.stderr, wrong.stderr


def test_node_remove(sites: Sites) -> None:
    s = sites
    wait_until(lambda: converged(s), 60, "6 nodes alive in every view")
    victim = s.nodes["shop-2"]
    before = {oid for oid in STORED if victim.name in files_of(s, oid)}
    assert before, "shop-2 should hold some of the objects"
    host = s.lab.hosts["factory-client"]
    t0 = time.monotonic()
    out = cli("node", "remove", victim.name, "--bundle", s.admin, "--node",
              s.nodes["factory-1"].addr, "--reason", "decommissioned", host=host)
    assert out.returncode == 0, out.stderr
    others = [n for n in s.nodes.values() if n is not victim]

    def everywhere_removed() -> bool:
        return all(s.view("factory", n)[victim.name]["state"] == "removed" for n in others)

    wait_until(everywhere_removed, REMOVE_SPREAD_S + 2, "shop-2 removed in every view", 0.25)
    print(f"removal in every view after {time.monotonic() - t0:.1f} s")
    # The removed node learns it and stops itself, with the removed exit status.
    assert victim.proc is not None
    assert victim.proc.wait(timeout=20) == 78
    # What it held is re-made elsewhere: 3 copies on the other nodes' disks.
    for oid in before:
        wait_until(lambda oid=oid: len(files_of(s, oid) - {victim.name}) >= 3, 60,
                   f"{oid} re-replicated without shop-2")
    # Restarted, it refuses to start: it kept the revocation.
    again = victim.host.run([MESHSCALE, "node", "start", "--config", str(victim.config)],
                            timeout=30)
    assert again.returncode == 78 and "was removed from the mesh" in again.stderr, again
    # Even with its data dir wiped, the others refuse its TLS: it never rejoins.
    (victim.data_dir / "revoked.json").unlink()
    rejected_before = sum(
        s.clients["factory"].call(n.addr, "stats")["rejected_messages"].get("revoked", 0)
        for n in others)
    victim.start()
    wait_until(lambda: sum(
        s.clients["factory"].call(n.addr, "stats")["rejected_messages"].get("revoked", 0)
        for n in others) > rejected_before, 30, "shop-2's connections refused as revoked")
    for n in others:
        assert s.view("factory", n)[victim.name]["state"] == "removed"
    assert f"{victim.host.ip}:{PORT}" == victim.addr
