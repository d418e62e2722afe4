"""The data plane on real node processes: replicated puts, a SIGKILL, re-replication,
restart, corruption detected and repaired on read, refusals and bad input."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from runtime_mesh import wait_for_async

from meshscale.client.rpc import RemoteError, RpcConnection, RpcError
from meshscale.runtime.launcher import LocalMesh
from stored import copy_ids, holds_copy

pytestmark = pytest.mark.timeout(300)


def oid_of(data: bytes) -> str:
    return "b3-" + blake3.blake3(data).hexdigest()  # independent of the code under test


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("dp"), 5, regions=["eu-west", "us-east", "ap-south"]) as m:
        yield m


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def put(c: RpcConnection, data: bytes, **policy: Any) -> dict[str, Any]:
    up = await c.call("obj.put_begin", {"size": len(data), "replicas": 3, "w": 2, **policy})
    cb = up["chunk_bytes"]
    for i in range(0, len(data), cb):
        await c.call("obj.put_chunk", {"upload": up["upload"], "data": data[i : i + cb]})
    result: dict[str, Any] = await c.call("obj.put_end", {"upload": up["upload"]})
    return result


async def read_all(c: RpcConnection, oid: str) -> bytes:
    out = bytearray()
    size = None
    while size is None or len(out) < size:
        r = await c.call("obj.read", {"id": oid, "offset": len(out), "length": 1 << 20})
        size = r["size"]
        out += r["data"]
        if not r["data"] and len(out) < size:
            raise AssertionError("short read")
    return bytes(out)


async def wait_all_healthy(c: RpcConnection, oids: set[str], deadline_s: float) -> list[dict[str, Any]]:
    async def healthy() -> list[dict[str, Any]] | None:
        listing: list[dict[str, Any]] = (
            await c.call("obj.list", {"after": "", "limit": 10_000}))["objects"]
        by_id = {o["id"]: o for o in listing}
        return listing if all(o in by_id and by_id[o]["health"] == "ok" for o in oids) else None

    return await wait_for_async(healthy, deadline_s, "every object back to full replication",
                                poll=0.5)


def test_put_200_objects_kill_one_node_read_back_restore_rf_restart(mesh: LocalMesh) -> None:
    creds = mesh.credentials()
    rng = random.Random(7)
    sizes = [rng.randint(1_000, 64_000) for _ in range(190)]
    sizes += [rng.randint(1_000_000, 5_000_000) for _ in range(8)] + [50_000_000, 20_000_000]
    blobs = {}

    async def phase1() -> None:
        conns = [RpcConnection(n.address, creds, 60) for n in mesh.nodes]
        for i, size in enumerate(sizes):
            data = rng.randbytes(size)
            res = await put(conns[i % 5], data)
            assert res["id"] == oid_of(data)
            assert len(res["nodes"]) >= 2
            blobs[res["id"]] = data
        await wait_all_healthy(conns[0], set(blobs), 60)
        for c in conns:
            await c.close()

    run(phase1())
    victim = mesh.nodes[3]
    assert victim.proc is not None
    victim_objects = copy_ids(victim.data_dir / "store")
    assert victim_objects, "the victim held no objects: nothing is tested"
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()

    async def phase2() -> None:
        c = RpcConnection(mesh.nodes[0].address, creds, 60)
        # Every object still reads back, right away, with the right hash.
        for oid, data in blobs.items():
            got = await read_all(c, oid)
            assert oid_of(got) == oid
            assert got == data
        # The replication factor comes back on the four survivors.
        listing = await wait_all_healthy(c, set(blobs), 120)
        for o in listing:
            assert victim.name not in o["holders"]
            assert len(o["holders"]) >= 3
        await c.close()

    run(phase2())

    # Restart the victim from the same data dir: it serves what it had.
    from meshscale.runtime.launcher import node_command, spawn_node

    cmd = node_command(victim, [mesh.nodes[0].address], "")
    victim.proc = spawn_node(cmd, victim.data_dir.parent / "node-3-restart.log")

    async def phase3() -> None:
        # obj.read_local is node-to-node: ask as node 0 does.
        c = RpcConnection(victim.address, mesh.node_credentials(0), 60)
        async def serves_old_objects() -> int:
            served = 0
            try:
                for name in sorted(victim_objects)[:20]:
                    r = await c.call("obj.read_local",
                                     {"id": name, "offset": 0, "length": 1 << 20})
                    assert r["size"] == len(blobs[name])
                    assert r["data"] == blobs[name][: 1 << 20]
                    served += 1
            except RpcError:
                await c.close()  # not up yet: a fresh connection next time
                raise
            return served

        served = await wait_for_async(serves_old_objects, 60, "the restarted node serving",
                                      poll=0.5)
        assert served >= min(20, len(victim_objects))
        await c.close()

    run(phase3())


def test_flipped_byte_is_detected_and_repaired_on_read(mesh: LocalMesh) -> None:
    creds = mesh.credentials()
    data = os.urandom(300_000)

    async def go() -> None:
        c0 = RpcConnection(mesh.nodes[0].address, creds, 60)
        res = await put(c0, data)
        oid = res["id"]
        await wait_all_healthy(c0, {oid}, 60)

        async def settled() -> dict[str, Any] | None:
            # Exactly the replica set holds it: no stand-in or cut-through copy that
            # anti-entropy may still hand off and drop (a dropped copy is never read, so
            # its corruption could not be seen).
            st: dict[str, Any] = await c0.call("obj.stat", {"id": oid})
            return st if st["holders"] and set(st["holders"]) == set(st["replica_set"]) \
                else None

        st = await wait_for_async(settled, 60, "only the replica set holding the object",
                                  poll=0.5)
        holder = next(n for n in mesh.nodes if n.name in st["holders"] and n.proc
                      and n.proc.poll() is None)
        blob = next((holder.data_dir / "store" / "objects").rglob(oid))
        os.chmod(blob, 0o600)
        raw = bytearray(blob.read_bytes())
        raw[1234] ^= 0xFF
        blob.write_bytes(bytes(raw))
        ch = RpcConnection(holder.address, creds, 60)
        # The holder's own read notices, quarantines its copy and serves a good one.
        got = await read_all(ch, oid)
        assert got == data
        stats = await ch.call("dp.stats", {})
        assert stats["dataplane"].get("quarantined", 0) >= 1, (
            f"{holder.name} served the right bytes without quarantining its copy; its view "
            f"now: {await ch.call('obj.local_stat', {'id': oid})}, stats {stats['dataplane']}")
        # Anti-entropy refills the quarantined copy: healthy again, file re-created good.
        await wait_all_healthy(c0, {oid}, 60)
        await c0.close()
        await ch.close()

    run(go())


def test_residency_refusal_and_bad_input(mesh: LocalMesh) -> None:
    creds = mesh.credentials()

    async def go() -> None:
        c = RpcConnection(mesh.nodes[0].address, creds, 30)
        with pytest.raises(RpcError, match="residency") as e:
            await c.call("obj.put_begin", {"size": 10, "replicas": 3, "w": 2,
                                           "residency": {"regions": ["mars"], "data_class": "pii"}})
        assert "mars" in str(e.value)
        # Residency honoured: every copy of an eu-west-only object sits in eu-west.
        res = await put(c, b"patient-records" * 100, replicas=1, w=1, residency={"regions": ["eu-west"], "data_class": "pii"})
        st = await c.call("obj.stat", {"id": res["id"]})
        eu = {n.name for n in mesh.nodes if n.region == "eu-west"}
        assert set(st["holders"]) <= eu
        # ... and on the disks themselves (the outside truth, not the mesh's report).
        on_disk = {n.name for n in mesh.nodes
                   if holds_copy(n.data_dir / "store", res["id"])}
        assert on_disk and on_disk <= eu
        # Truncated upload: nothing becomes visible.
        data = b"x" * 5000
        up = await c.call("obj.put_begin", {"size": len(data), "replicas": 3, "w": 2})
        await c.call("obj.put_chunk", {"upload": up["upload"], "data": data[:100]})
        with pytest.raises(RpcError, match="truncated"):
            await c.call("obj.put_end", {"upload": up["upload"]})
        with pytest.raises(RpcError, match="unknown object id"):
            await c.call("obj.stat", {"id": oid_of(data)})
        # More bytes than declared: refused, aborted.
        up = await c.call("obj.put_begin", {"size": 10, "replicas": 3, "w": 2})
        with pytest.raises(RpcError, match="declared size"):
            await c.call("obj.put_chunk", {"upload": up["upload"], "data": b"y" * 11})
        # Oversized chunk.
        up = await c.call("obj.put_begin", {"size": 7 << 20, "replicas": 3, "w": 2})
        over = up["chunk_bytes"] + 1
        with pytest.raises(RpcError, match="chunk"):
            await c.call("obj.put_chunk", {"upload": up["upload"], "data": b"z" * over})
        # Replica transfers are node-to-node: a client certificate may not start one.
        with pytest.raises(RpcError, match=r"forbidden: .obj\.rw_begin. needs node access"):
            await c.call("obj.rw_begin", {"id": oid_of(b"good"), "size": 4, "replicas": 3})
        c = RpcConnection(mesh.nodes[0].address, creds, 30)  # that refusal closed it
        # Wrong hash on a replica transfer (from another node): refused, nothing visible.
        peer = RpcConnection(mesh.nodes[0].address, mesh.node_credentials(1), 30)
        up = await peer.call("obj.rw_begin", {"id": oid_of(b"good"), "size": 4, "replicas": 3})
        await peer.call("obj.rw_chunk", {"upload": up["upload"], "data": b"evil"})
        with pytest.raises(RpcError, match="hash"):
            await peer.call("obj.rw_end", {"upload": up["upload"]})
        await peer.close()
        with pytest.raises(RpcError, match="unknown object id"):
            await c.call("obj.read", {"id": oid_of(b"good"), "offset": 0, "length": 10})
        with pytest.raises(RpcError, match="unknown object id"):
            await c.call("obj.read", {"id": "b3-" + "0" * 64, "offset": 0, "length": 10})
        await c.close()

    run(go())


def test_kv_quorum_put_get_delete(mesh: LocalMesh) -> None:
    creds = mesh.credentials()

    async def go() -> None:
        a = RpcConnection(mesh.nodes[0].address, creds, 30)
        b = RpcConnection(mesh.nodes[2].address, creds, 30)
        await a.call("kv.put", {"key": "dataset/latest", "value": b"v1", "consistency": "quorum"})
        await b.call("kv.put", {"key": "dataset/latest", "value": b"v2", "consistency": "quorum"})
        got = await a.call("kv.get", {"key": "dataset/latest", "consistency": "quorum"})
        assert got["value"] == b"v2"
        await a.call("kv.delete", {"key": "dataset/latest", "consistency": "all"})
        got = await b.call("kv.get", {"key": "dataset/latest", "consistency": "one"})
        assert got["value"] is None
        with pytest.raises(RpcError, match="consistency"):
            await a.call("kv.get", {"key": "k", "consistency": "most"})
        await a.close()
        await b.close()

    run(go())




def test_ttl_objects_are_collected_everywhere_pinned_ones_stay(mesh: LocalMesh) -> None:
    creds = mesh.credentials()

    async def go() -> None:
        c = RpcConnection(mesh.nodes[1].address, creds, 30)
        short = await c.call("obj.put_small", {"data": os.urandom(5000), "replicas": 3, "w": 3,
                                               "ttl_s": 2.0})
        kept = await c.call("obj.put_small", {"data": os.urandom(5000), "replicas": 3, "w": 3})
        st = await c.call("obj.stat", {"id": short["id"]})
        assert len(st["holders"]) >= 3  # replicated, with the same expiry on every copy
        async def collected() -> bool:
            try:
                await c.call("obj.stat", {"id": short["id"]})
            except RpcError as e:
                assert "unknown object id" in str(e)
                return True
            return False

        # a TTL'd object must be collected from every holder
        await wait_for_async(collected, 30, "the TTL'd object collected", poll=0.5, retry=())
        st = await c.call("obj.stat", {"id": kept["id"]})
        assert len(st["holders"]) >= 3
        with pytest.raises(RpcError, match="ttl_s"):
            await c.call("obj.put_small", {"data": b"x", "ttl_s": -1})
        await c.close()

    run(go())


def test_cut_through_put_checks_the_declared_id(mesh: LocalMesh) -> None:
    """A put that names its id up front is streamed on to the replica set as it arrives;
    every copy is still checked against the id, so a wrong one leaves nothing anywhere."""
    creds = mesh.credentials()
    data = os.urandom(9 << 20)
    wrong = oid_of(b"not these bytes")

    async def stats(node: int) -> dict[str, Any]:
        c = RpcConnection(mesh.nodes[node].address, creds, 30)
        try:
            result: dict[str, Any] = await c.call("dp.stats", {})
            return result
        finally:
            await c.close()

    async def go() -> None:
        c = RpcConnection(mesh.nodes[1].address, creds, 30)
        with pytest.raises(RpcError, match="hash"):
            await put(c, data, id=wrong)
        async def no_uploads() -> bool:  # members' half-streamed copies are dropped too
            return not any([(await stats(i))["uploads"] for i in range(len(mesh.nodes))])

        await wait_for_async(no_uploads, 30, "no open upload on any node", poll=0.2)
        for node in mesh.nodes:
            cn = RpcConnection(node.address, mesh.node_credentials(0), 30)
            for oid in (wrong, oid_of(data)):
                assert await cn.call("obj.local_stat", {"id": oid}) is None, (node.name, oid)
            await cn.close()
        before = (await stats(1))["dataplane"].get("transfers_early", 0)
        res = await put(c, data, id=oid_of(data))
        assert res["id"] == oid_of(data) and len(res["nodes"]) >= 2
        assert (await stats(1))["dataplane"].get("transfers_early", 0) > before
        assert await read_all(c, oid_of(data)) == data
        await c.close()

    run(go())


def test_put_coordinated_outside_the_replica_set_keeps_no_copy(tmp_path: Any) -> None:
    """A node outside the object's replica set streams a put on to the members and keeps
    only an uncommitted spare: dropped once the members' copies are in, committed (hash
    checked) and pushed from when a member's copy fails; a wrong id still fails the put
    and leaves nothing."""
    from meshscale.core.placement import Candidate, replica_set

    with LocalMesh(tmp_path / "m", 4, regions=["eu-west", "us-east", "ap-south"]) as m:
        m.wait_converged(60)
        creds = m.credentials()

        async def stats(node: int) -> dict[str, Any]:
            c = RpcConnection(m.nodes[node].address, creds, 30)
            try:
                result: dict[str, Any] = await c.call("dp.stats", {})
                return result
            finally:
                await c.close()

        async def counter(node: int, key: str) -> int:
            return int((await stats(node))["dataplane"].get(key, 0))

        async def outside(data_id: str) -> tuple[int, list[str]]:
            c = RpcConnection(m.nodes[0].address, creds, 30)
            rows = await c.call("members", {})
            await c.close()
            view = [Candidate(r["name"], r["region"], r["zone"]) for r in rows]
            members = [x.name for x in replica_set(data_id, view, 3)]
            coord = next(i for i, n in enumerate(m.nodes) if n.name not in members)
            return coord, members

        def blob_outside(of: int) -> bytes:
            """Bytes whose replica set leaves out node ``of``."""
            while True:
                data = os.urandom(6 << 20)
                if asyncio.run(outside(oid_of(data)))[0] == of:
                    return data

        async def held(oid: str) -> list[str]:
            names = []
            for node in m.nodes:
                c = RpcConnection(node.address, m.node_credentials(0), 30)
                if await c.call("obj.local_stat", {"id": oid}) is not None:
                    names.append(node.name)
                await c.close()
            return sorted(names)

        async def until(cond: Any, what: str, deadline_s: float = 30) -> None:
            await wait_for_async(cond, deadline_s, what, retry=())

        async def go() -> None:
            data = os.urandom(6 << 20)
            oid = oid_of(data)
            coord, members = await outside(oid)
            c = RpcConnection(m.nodes[coord].address, creds, 60)
            dropped = await counter(coord, "spare_copies_dropped")
            res = await put(c, data, id=oid)
            assert res["id"] == oid and len(res["nodes"]) >= 2
            assert m.nodes[coord].name not in res["nodes"]

            async def spare_dropped() -> bool:
                return await counter(coord, "spare_copies_dropped") > dropped

            await until(spare_dropped, "the spare copy was not dropped")
            assert await counter(coord, "spare_copies_committed") == 0

            async def all_members() -> bool:
                return await held(oid) == sorted(members)

            await until(all_members, "the replica set does not hold the object")
            assert await read_all(c, oid) == data

            # A small put (one call) through a node outside its set: a spare too, never a
            # committed stray copy that would have to be dropped again.
            while True:
                small = os.urandom(1000)
                scoord, smembers = await outside(oid_of(small))
                if scoord == coord:
                    break
            sdropped = await counter(coord, "spare_copies_dropped")
            committed = await counter(coord, "spare_copies_committed")
            strays = await counter(coord, "dropped")
            res = await c.call("obj.put_small", {"data": small, "replicas": 3, "w": 2})
            assert res["id"] == oid_of(small) and m.nodes[coord].name not in res["nodes"]

            async def small_spare_dropped() -> bool:
                return await counter(coord, "spare_copies_dropped") > sdropped

            await until(small_spare_dropped, "the small put's spare was not dropped")
            assert await counter(coord, "spare_copies_committed") == committed
            assert await counter(coord, "dropped") == strays
            assert m.nodes[coord].name not in await held(res["id"])

            async def small_members() -> bool:
                return await held(res["id"]) == sorted(smembers)

            await until(small_members, "the small object's replica set does not hold it")

            # A wrong id: the members refuse their copies, the spare's own check fails.
            wrong = oid_of(b"not these bytes " + os.urandom(8))
            wcoord, _ = await outside(wrong)
            cw = RpcConnection(m.nodes[wcoord].address, creds, 60)
            with pytest.raises(RpcError, match="hash"):
                await put(cw, data[: 5 << 20], id=wrong)

            async def nothing_open() -> bool:
                return not any([(await stats(i))["uploads"] for i in range(len(m.nodes))])

            await until(nothing_open, "uploads left open")
            assert await held(wrong) == []
            await c.close()
            await cw.close()

        run(go())

        # A member dies just before a put: its copy fails at once, the spare is committed
        # and pushed to a stand-in, and the put is still acknowledged.
        data = blob_outside(0)
        _, members = asyncio.run(outside(oid_of(data)))
        victim = next(n for n in m.nodes if n.name == members[0])
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()

        async def fallback() -> None:
            oid = oid_of(data)
            c = RpcConnection(m.nodes[0].address, creds, 60)
            committed = await counter(0, "spare_copies_committed")
            res = await put(c, data, id=oid)
            assert res["id"] == oid and len(res["nodes"]) >= 2
            assert victim.name not in res["nodes"]
            assert await counter(0, "spare_copies_committed") == committed + 1
            assert await read_all(c, oid) == data
            await c.close()

        run(fallback())


@pytest.mark.timeout(120)
def test_types_and_limits_are_checked_before_anything_is_allocated(mesh: LocalMesh) -> None:
    """An integer where bytes belong used to be turned into that many zero bytes (a 40-byte
    kv.put took a node from 344 to 930 MB); limits were found only on the replicas."""

    creds = mesh.credentials()

    async def go() -> None:
        c = RpcConnection(mesh.nodes[0].address, creds, 30)
        try:
            # Each is out of contract: ``invalid``, naming the field (core/api/objects.py).
            for method, args, field in (
                    ("kv.put", {"key": "k", "value": 300_000_000}, r"`bytes`, got `int` - at `\$\.value`"),
                    ("obj.put_small", {"data": 10**12}, r"`bytes`, got `int` - at `\$\.data`"),
                    ("obj.put_small", {"data": b"x", "size": 1}, "unknown field `size`"),
                    ("kv.put", {"key": "k", "value": b"x" * (7 << 20)},
                     r"length <= 1048576 - at `\$\.value`"),
                    ("kv.put", {"key": 5, "value": b"x"}, r"`str`, got `int` - at `\$\.key`"),
                    ("obj.put_begin", {"size": 10, "replicas": 2, "w": 3}, "w must be from 1 to replicas"),
                    ("obj.stat", {"id": "../x"}, r"at `\$\.id`"),  # used to be "internal error"
                    ("obj.read", {"id": "../x", "offset": 0, "length": 1}, r"at `\$\.id`"),
                    *(("obj.put_begin", {"size": 10, "replicas": bad}, r"at `\$\.replicas`")
                      for bad in (0, -1, True, "3", 10_000))):
                with pytest.raises(RemoteError, match=field) as e:
                    await c.call(method, args)
                assert e.value.code == "invalid", (method, args)
            # The node is fine and still serves.
            assert len(await c.call("members")) == len(mesh.nodes)
        finally:
            await c.close()

    asyncio.run(go())
    node = mesh.nodes[0]
    assert node.proc is not None
    status = Path(f"/proc/{node.proc.pid}/status").read_text()
    rss_mb = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1]) >> 10
    assert rss_mb < 300, rss_mb  # no 300 MB of zeros was made


def test_small_object_is_kept_inline_and_a_restarted_holder_serves_it_whole(
        mesh: LocalMesh) -> None:
    """Issue #19: a small put's copies are kept in each holder's index (no file, one fsync
    each); a holder SIGKILLed and restarted on its data dir serves the bytes whole."""
    from meshscale.runtime.launcher import node_command, spawn_node

    data = os.urandom(1000)
    oid = oid_of(data)

    async def stored() -> list[str]:
        c = RpcConnection(mesh.nodes[0].address, mesh.credentials(), 60)
        res = await c.call("obj.put_small", {"data": data, "replicas": 3, "w": 2})
        assert res["id"] == oid and len(res["nodes"]) >= 2
        await wait_all_healthy(c, {oid}, 60)
        st = await c.call("obj.stat", {"id": oid})
        await c.close()
        return list(st["holders"])

    holders = run(stored())
    by_name = {n.name: n for n in mesh.nodes}
    for name in holders:
        store = by_name[name].data_dir / "store"
        assert holds_copy(store, oid), name
        assert list((store / "objects").rglob(oid)) == [], f"{name} kept a file of it"
    victim = next(by_name[n] for n in holders if n != mesh.nodes[0].name)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    cmd = node_command(victim, [mesh.nodes[0].address], "")
    victim.proc = spawn_node(cmd, victim.data_dir.parent / f"{victim.name}-inline.log")

    async def served() -> None:
        c = RpcConnection(victim.address, mesh.node_credentials(0), 60)

        async def whole() -> bytes:
            try:
                r = await c.call("obj.read_local", {"id": oid, "offset": 0, "length": 4096})
            except RpcError:
                await c.close()  # not up yet: a fresh connection next time
                raise
            return bytes(r["data"]) if r["size"] == len(data) else b""

        assert await wait_for_async(whole, 60, "the restarted holder serving it",
                                    poll=0.5) == data
        await c.close()

    run(served())
