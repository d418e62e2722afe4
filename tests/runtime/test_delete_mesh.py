"""Explicit deletes on real node processes: a holder that is killed or stopped during the
delete comes back with its copy and drops it; nothing brings the object back."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from runtime_mesh import call_node, wait_for_async

from meshscale.client.mesh import ObjectNotFoundError, connect
from meshscale.client.rpc import RpcError
from meshscale.runtime.launcher import LocalMesh, NodeProcess, node_command, spawn_node
from stored import holds_copy

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("del"), 4, regions=["eu-west", "us-east", "ap-south"]) as m:
        yield m


def files_of(node: NodeProcess, oid: str) -> list[str]:
    return [oid] if holds_copy(node.data_dir / "store", oid) else []


async def call(node: NodeProcess, creds: Any, method: str, args: dict[str, Any]) -> Any:
    return await call_node(node.address, creds, method, args)


async def holders_now(mesh: LocalMesh, oid: str) -> set[str]:
    """Nodes (live ones asked, every one's disk looked at) holding a copy of ``oid``."""
    creds = mesh.node_credentials(0)  # obj.local_stat is node-to-node
    out = {n.name for n in mesh.nodes if files_of(n, oid)}
    for n in mesh.nodes:
        try:
            if await call(n, creds, "obj.local_stat", {"id": oid}):
                out.add(n.name)
        except (RpcError, OSError):
            pass  # stopped or restarting: its disk was looked at above
    return out


async def wait_until(cond: Any, deadline_s: float, what: str) -> None:
    await wait_for_async(cond, deadline_s, what, poll=0.3)


async def sync_rounds(node: NodeProcess, creds: Any) -> int:
    stats = await call(node, creds, "dp.stats", {})
    return int(stats["replication"].get("sync_rounds", 0))


def restart(mesh: LocalMesh, node: NodeProcess, tag: str) -> None:
    cmd = node_command(node, [mesh.nodes[0].address], "")
    node.proc = spawn_node(cmd, node.data_dir.parent / f"{node.name}-{tag}.log")


async def wait_serving(node: NodeProcess, creds: Any) -> None:
    async def up() -> bool:
        try:
            await call(node, creds, "dp.stats", {})
            return True
        except (RpcError, OSError):
            return False

    await wait_until(up, 60, f"{node.name} serves RPCs again")


async def stays_gone(mesh: LocalMesh, oid: str, returning: NodeProcess) -> None:
    """Gone everywhere, and still gone after the returning node ran two more sync rounds
    with its peers (anti-entropy had its chance to bring the copy back)."""
    creds = mesh.credentials()

    async def gone() -> bool:
        return not await holders_now(mesh, oid)

    await wait_until(gone, 60, f"{oid} gone from every node")
    start = await sync_rounds(returning, creds)

    async def two_rounds() -> bool:
        return await sync_rounds(returning, creds) >= start + 2

    await wait_until(two_rounds, 60, "two more sync rounds")
    assert await holders_now(mesh, oid) == set()
    for n in mesh.nodes:
        with pytest.raises(RpcError, match="unknown object id"):
            await call(n, creds, "obj.read", {"id": oid, "offset": 0, "length": 100})


def test_delete_while_a_holder_is_killed_then_restarted(mesh: LocalMesh) -> None:
    creds = mesh.credentials()
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        ref = m.put(os.urandom(600_000), replicas=3, w=3)  # chunked transfers
        holders = set(m.stat(ref).holders)
    victim = next(n for n in mesh.nodes[1:] if n.name in holders)
    assert victim.proc is not None and files_of(victim, ref.id)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        told = m.delete(ref)
        assert victim.name not in told and set(told) == holders - {victim.name}
    # The victim's disk still has the copy; it comes back with it and must drop it.
    assert files_of(victim, ref.id)
    restart(mesh, victim, "restart-delete")

    async def go() -> None:
        await wait_serving(victim, creds)
        await stays_gone(mesh, ref.id, victim)
        stats = await call(victim, creds, "dp.stats", {})
        assert stats["replication"].get("copies_deleted", 0) >= 1

    asyncio.run(go())


def test_delete_while_a_holder_is_stopped(mesh: LocalMesh) -> None:
    with connect(mesh.nodes[1].address, bundle=mesh.bundle_path) as m:
        ref = m.put(os.urandom(20_000), replicas=3, w=3)  # one-RPC small transfers
        holders = set(m.stat(ref).holders)
    paused = next(n for n in mesh.nodes if n.name in holders and n is not mesh.nodes[1])
    assert paused.proc is not None
    paused.proc.send_signal(signal.SIGSTOP)
    try:
        with connect(mesh.nodes[1].address, bundle=mesh.bundle_path, timeout=60) as m:
            m.delete(ref)

        async def others_dropped() -> bool:
            return await holders_now(mesh, ref.id) <= {paused.name}

        asyncio.run(wait_until(others_dropped, 30, "copies dropped on the running nodes"))
        assert files_of(paused, ref.id), "the stopped node still has its copy"
    finally:
        paused.proc.send_signal(signal.SIGCONT)
    asyncio.run(stays_gone(mesh, ref.id, paused))


def test_delete_errors_and_a_put_after_a_delete(mesh: LocalMesh) -> None:
    creds = mesh.credentials()
    data = os.urandom(3000)
    with connect(mesh.nodes[2].address, bundle=mesh.bundle_path) as m:
        with pytest.raises(ObjectNotFoundError, match="unknown object id") as err:
            m.delete("b3-" + "1" * 64)
        assert err.value.code == "not_found"  # decided on the code, not the message
        with pytest.raises(ValueError, match="not an object id"):
            m.delete("b3-nope")
        ref = m.put(data, replicas=3, w=3)
        m.delete(ref)

        async def gone() -> bool:
            return not await holders_now(mesh, ref.id)

        asyncio.run(wait_until(gone, 30, "deleted everywhere"))
        with pytest.raises(ObjectNotFoundError):
            m.get(ref)
        # The same bytes put again after the delete are a new write: they live.
        again = m.put(data, replicas=3, w=3)
        assert again.id == ref.id and m.get(again) == data

        async def full() -> bool:
            return len(await holders_now(mesh, ref.id)) >= 3

        asyncio.run(wait_until(full, 30, "the new write is fully replicated"))
    stats = asyncio.run(call(mesh.nodes[2], creds, "dp.stats", {}))
    assert stats["dataplane"].get("deletes", 0) >= 1
