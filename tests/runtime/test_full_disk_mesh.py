"""A full node on real processes (issue #13: "a full node stays in every replica set",
5,632 transfer_failed in 81 s). Node-3 of 4 is restarted with a reserve larger than its
free space (every write refused, as on a full disk); it says so by gossip, and then:

- a put with replicas=3, w=3 succeeds, its three copies on the three other nodes (read
  from the data dirs, not from the mesh's reports);
- the copies node-3 held stay there, and read back through node-3 itself;
- a KV write at ALL succeeds for a key node-3 belongs to;
- transfers that node-3 refuses stop: the ``transfer_failed`` lines naming it in the
  other nodes' logs do not grow over two more anti-entropy rounds;
- restarted with room, node-3 gets the copies it lacks and the stand-ins drop theirs.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_mesh import wait_for

import meshscale
from meshscale.client.rpc import RpcConnection
from meshscale.core.kv import kv_replicas
from meshscale.core.objects import object_id
from meshscale.core.placement import Candidate, replica_set
from meshscale.runtime.launcher import LocalMesh, NodeProcess, node_command, spawn_node
from stored import holds_copy

pytestmark = pytest.mark.timeout(240)

REFUSED = ("transfer_failed", "early_copy_failed", "forward_failed")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    # node-0 and node-2 in eu-west, node-1 and node-3 in us-east.
    with LocalMesh(tmp_path_factory.mktemp("full"), 4, http=False) as m:
        yield m


def on_disk(mesh: LocalMesh, oid: str) -> set[str]:
    return {n.name for n in mesh.nodes
            if holds_copy(Path(n.data_dir, "store"), oid)}


def restart(mesh: LocalMesh, node: NodeProcess, extra: dict[str, Any], log: Path) -> None:
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait()
    node.proc = spawn_node(node_command(node, [mesh.nodes[0].address], "", extra), log)


def refused_towards(mesh: LocalMesh, name: str) -> int:
    """Lines in the other nodes' logs saying a copy sent to ``name`` failed."""
    n = 0
    for node in mesh.nodes:
        if node.name == name or node.log_path is None:
            continue
        for line in node.log_path.read_text(errors="replace").splitlines():
            if name in line and any(f'"{e}"' in line for e in REFUSED):
                with_peer = json.loads(line)
                n += with_peer.get("peer") == name
    return n


async def _members_full(mesh: LocalMesh, name: str) -> bool:
    creds = mesh.credentials()
    for node in mesh.nodes:
        c = RpcConnection(node.address, creds, 5)
        try:
            rows: list[dict[str, Any]] = await c.call("members")
        finally:
            await c.close()
        row = next(r for r in rows if r["name"] == name)
        if row["state"] != "alive" or not row.get("disk_full"):
            return False
    return True


async def _sync_rounds(mesh: LocalMesh) -> list[int]:
    creds = mesh.credentials()
    out = []
    for node in mesh.nodes[:3]:
        c = RpcConnection(node.address, creds, 5)
        try:
            st = await c.call("dp.stats")
        finally:
            await c.close()
        out.append(int(st["replication"].get("sync_rounds", 0)))
    return out


def test_a_full_node_leaves_new_replica_sets_and_its_copies_stay(mesh: LocalMesh) -> None:
    full = mesh.nodes[3]
    others = {n.name for n in mesh.nodes[:3]}
    view = [Candidate(n.name, n.region, n.zone) for n in mesh.nodes]
    client = meshscale.connect(mesh.nodes[0].address, bundle=mesh.bundle_path, timeout=40)
    try:
        before = {}
        for i in range(8):
            data = os.urandom(2000 + i)
            before[client.put(data, replicas=3, w=3).id] = data
        held = wait_for(lambda: {o for o in before if full.name in on_disk(mesh, o)}, 30,
                        "node-3 to hold some copies")

        restart(mesh, full, {"disk_reserve_mb": 1 << 40},
                full.data_dir.parent / f"{full.name}-full.log")
        wait_for(lambda: asyncio.run(_members_full(mesh, full.name)), 60,
                 "every node to see node-3 alive and full", poll=0.5)

        after = {}
        for i in range(12):
            data = os.urandom(300_000 if i % 3 == 0 else 3000 + i)  # cut-through and small
            ref = client.put(data, replicas=3, w=3)
            after[ref.id] = data
        wanted = [o for o in after
                  if full.name in {c.name for c in replica_set(o, view, 3)}]
        assert wanted, "node-3 is in the rule set of some of the new objects"
        for oid in after:
            assert on_disk(mesh, oid) == others, (oid, on_disk(mesh, oid))
        # Its own copies stay, and it serves them itself.
        assert all(full.name in on_disk(mesh, o) for o in held)
        with meshscale.connect(full.address, bundle=mesh.bundle_path, timeout=40) as there:
            for oid in held:
                assert there.get(oid) == before[oid]
        # A key whose replica set holds node-3 takes writes at ALL.
        key = next(f"k{i}" for i in range(100) if full.name in kv_replicas(f"k{i}", view))
        client.kv.put(key, b"v1", consistency="all")
        assert client.kv.get(key, consistency="all") == "v1"

        # Nothing more is sent to it: two full anti-entropy rounds on every other node.
        refused = refused_towards(mesh, full.name)
        start = asyncio.run(_sync_rounds(mesh))
        # Each periodic round syncs with each of the 3 peers (every pair shares objects).
        wait_for(lambda: all(a >= b + 6 for a, b in
                             zip(asyncio.run(_sync_rounds(mesh)), start, strict=True)),
                 90, "two more sync rounds on every node", poll=1.0)
        assert refused_towards(mesh, full.name) == refused

        # Room again: it takes the copies it lacks; the stand-ins drop theirs.
        restart(mesh, full, {}, full.data_dir.parent / f"{full.name}-room.log")
        for oid in after:
            rule = {c.name for c in replica_set(oid, view, 3)}
            wait_for(lambda oid=oid, rule=rule: on_disk(mesh, oid) == rule, 120,
                     f"{oid} on exactly its rule set {sorted(rule)}", poll=0.5)
        for oid, data in after.items():
            assert client.get(oid) == data and object_id(data) == oid
    finally:
        client.close()
