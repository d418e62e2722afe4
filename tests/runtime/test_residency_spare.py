"""A put that fails leaves no copy outside its residency rule (the coordinator's spare
copy used to be committed when a member's copy failed: 42 objects, 71 MB, all outside
the rule), and a node refuses a replica its own region may not hold."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshscale.client.rpc import RpcConnection, RpcError
from meshscale.core.objects import object_id
from meshscale.runtime.launcher import LocalMesh
from stored import holds_copy

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    # node-0 eu-west, node-1 us-east, node-2 eu-west
    with LocalMesh(tmp_path_factory.mktemp("spare"), 3, http=False) as m:
        yield m


def on_disk(mesh: LocalMesh, oid: str) -> list[str]:
    """Nodes whose data dir holds a committed copy: the outside truth."""
    return [n.name for n in mesh.nodes
            if holds_copy(Path(n.data_dir, "store"), oid)]


def test_a_failed_put_leaves_nothing_outside_its_rule(mesh: LocalMesh) -> None:
    us = mesh.nodes[1]
    assert us.region == "us-east" and us.proc is not None
    data = os.urandom(300 * 1024)
    oid = object_id(data)

    async def put() -> str:
        c = RpcConnection(mesh.nodes[0].address, mesh.credentials(), 60)
        try:
            up = await c.call("obj.put_begin", {"size": len(data), "replicas": 1, "w": 1,
                                                "residency": {"regions": ["us-east"]}, "id": oid})
            await c.call("obj.put_chunk", {"upload": up["upload"], "data": data})
            try:
                await c.call("obj.put_end", {"upload": up["upload"]})
            except RpcError as e:
                return str(e)
            return "stored"
        finally:
            await c.close()

    os.kill(us.proc.pid, signal.SIGSTOP)  # the only node the rule allows cannot answer
    try:
        outcome = asyncio.run(put())
    finally:
        os.kill(us.proc.pid, signal.SIGCONT)
    assert outcome != "stored", "with its only allowed node paused, the put cannot succeed"
    assert "node-0" not in on_disk(mesh, oid) and "node-2" not in on_disk(mesh, oid)


def test_a_replica_outside_the_receivers_region_is_refused(mesh: LocalMesh) -> None:
    data = b"eu only" * 100

    async def push() -> None:
        c = RpcConnection(mesh.nodes[1].address, mesh.node_credentials(0), 30)
        try:
            with pytest.raises(RpcError, match="refused: this node's region 'us-east' may not "
                               "hold a copy"):
                await c.call("obj.rw_small", {"id": object_id(data), "size": len(data),
                                              "data": data, "replicas": 1,
                                              "residency": {"regions": ["eu-west"]}})
        finally:
            await c.close()

    asyncio.run(push())
    assert on_disk(mesh, object_id(data)) == []


def test_a_put_without_its_id_through_a_node_outside_the_rule_is_refused(
        mesh: LocalMesh) -> None:
    """Without the id sent ahead, the coordinator must store the bytes itself before it
    knows where they go: outside the rule that would be a committed copy outside it, so
    the put is refused at its start, naming the rule (the client library always sends the
    id; a raw caller need not). Through a node inside the rule it is taken."""
    data = os.urandom(300 * 1024)
    oid = object_id(data)

    async def put(node: int) -> str:
        c = RpcConnection(mesh.nodes[node].address, mesh.credentials(), 60)
        try:
            try:
                up = await c.call("obj.put_begin", {"size": len(data), "replicas": 1,
                                                    "w": 1, "residency": {"regions": ["us-east"]}})
            except RpcError as e:
                return str(e)
            await c.call("obj.put_chunk", {"upload": up["upload"], "data": data})
            await c.call("obj.put_end", {"upload": up["upload"]})
            return "stored"
        finally:
            await c.close()

    outcome = asyncio.run(put(0))  # node-0 is in eu-west
    assert "residency" in outcome and "us-east" in outcome, outcome
    assert on_disk(mesh, oid) == []
    assert asyncio.run(put(1)) == "stored"  # node-1 is in us-east
    assert on_disk(mesh, oid) == ["node-1"]
