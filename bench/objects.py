"""Object store benchmark on a local mesh of real node processes.

    python bench/objects.py [--quick] --json out.json

- put_mb_s / get_mb_s: 64 MB objects (RF 3, W 2: acknowledged at two durable copies, the
  third following) put through one node, and read by asking
  a node that holds no copy: it redirects the reader to a holder, which the reader then
  reads from directly (one TLS hop); the same reads relayed by that node (two hops, the
  fallback) are printed as get_proxied_mb_s;
- tls_copy_mb_s: in the same run, a plain TLS 1.3 copy of the same bytes over 127.0.0.1
  to a sink in another process, as client and node are (the ceiling of a one-hop get;
  until Dec 2026 the sink shared this process's event loop, and the get could beat it);
- tls_fanout_mb_s (extra): the same bytes over plain TLS the way an RF 3 put moves them
  (this process -> a relay process -> two sink processes; no hash, no disk, no RPC),
  timed until both sinks have everything: the ceiling of any put through one node on this
  machine. It is set beside put_w3_mb_s (extra): the same put as put_mb_s, of fresh bytes,
  with W 3, so acknowledged only once all three copies are durable (like for like; W 2
  returns before the third copy is written). One untimed put goes first, and the W 3
  batch starts once the W 2 objects have all their copies;
- every get is checked to return the whole object (a short read is an error, not speed);
- small_put_p50_ms / small_put_p99_ms: sequential 1 KB puts, W = 2, on a second mesh of
  4 nodes started with ``--no-audit`` (no audit trail: the figure as it was before the
  trail, docs/audit.md); small_put_audited_p99_ms (and ..._p50_ms, extra): the same puts
  on the main mesh, whose trail is on (the default). The two meshes run at once and the
  puts alternate between them (in a random order per pair), so both see the same load on
  a shared machine;
- rereplicate_s: a fourth node is added, objects are written until one node holds
  1 GB (100 MB with --quick); that node is SIGKILLed, and the clock runs until every
  object in the mesh is back to 3 copies on the survivors' disks, read from their data
  dirs by this process (index row + file of the right size), not asked of the mesh. The
  same loop times rereplicate_health_s (extra): until the mesh's own listing calls every
  object healthy (what rereplicate_s measured until Dec 2026). Extras also give the
  objects checked, the copies found on disk when the clock stopped, the copies the
  survivors lacked at the kill and the MB on the killed node's disk.

``--scale N`` (issue #24) runs instead a data-scale measurement: N small objects (512 B,
RF 3) on a 3-node mesh, put through the mesh with ``put_small`` from 8 concurrent loops
per node, each on its own connection (``--preload``: written into every node's store
through its own API before the nodes start; ``--tmpfs``: data dirs on /dev/shm, or on
``--tmpfs-dir``: a run that cannot fit there, inodes or bytes, is refused at once; the
objects are kept inline in each node's index database (``inline_max_bytes``), so they need
bytes, not files; a store that keeps them as files needs an inode each, and at 1,000,000 a
default /dev/shm lacks them: mount one, e.g.
``mount -t tmpfs -o size=20g,nr_inodes=0 tmpfs DIR``), then
``objects_held_per_node``, ``rss_mb_per_node`` (node process, workers not counted),
``rss_bytes_per_object`` (over the same nodes empty, or an empty mesh of its own with
``--preload``), ``idle_cpu_pct_per_node`` (a 30 s window from 60 s after every node holds
every object; --quick: 10 s from 5 s), ``list_page_ms`` (median ``obj.list`` page of
1,000), ``restart_to_serving_s`` (SIGKILL one node, restart it on its data dir, until it
answers an ``obj.read`` with the bytes) and ``anti_entropy_bytes_per_min`` (replication
message bytes the node counts as sent, ``dp.stats`` ``repl_bytes_sent``, same window).
``peer_connections_idle_per_node`` (extra): the nodes' pooled connections to members idle
when the RSS was read (~160 KB of RSS each, on both ends; a node closes them once idle for
``PeerConfig.idle_close_s``, so a --quick reading, 5 s after the last copy, may still
count them, and the full one, 60 s after, should not).

The same put, get and small puts are then run on a second mesh whose data dirs sit on
tmpfs (/dev/shm): every fsync is then free, so those rows (``*_tmpfs``) are the software
ceiling, apart from the disk (all replicas of this local mesh share one disk).

Prints a table and writes JSON with those keys first, in that order, then the extra
figures (``put_w3_mb_s`` and ``tls_fanout_mb_s`` first, then the client and relayed gets,
the rereplicate rows and the tmpfs rows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meshscale.client.mesh import READ_AHEAD, AsyncMesh
from meshscale.client.rpc import ClientCredentials, RemoteError, RpcConnection, RpcError
from meshscale.core.api import Empty, ErrorCode
from meshscale.core.api import node as node_api
from meshscale.core.api import objects as api
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh, NodeProcess, node_command, spawn_node
from meshscale.runtime.storage import StorageConfig
from meshscale.transport.tls import client_context, server_context
from meshscale.trust.bundle import issue_node_cert, load_bundle

KEYS = ("put_mb_s", "get_mb_s", "tls_copy_mb_s", "small_put_p50_ms", "small_put_p99_ms",
        "small_put_audited_p99_ms", "rereplicate_s")
MB = 1_000_000


async def put_small(c: RpcConnection, data: bytes, replicas: int = 3, w: int = 2) -> str:
    """A small object in one call, as the client's ``put`` sends it."""
    small = await c.request(api.PUT_SMALL, api.PutSmallRequest(data=data, replicas=replicas,
                                                               w=w))
    return small.id


async def put_client(client: AsyncMesh, data: bytes, w: int = 2) -> str:
    """The client's own put (``AsyncMesh.put``, RF 3, W ``w``): the id is hashed first and
    sent ahead, so the node streams chunks on to the replica set as they arrive, and chunks
    go ahead of their replies (hashing here is part of the timed put)."""
    return (await client.put(data, replicas=3, w=w)).id


async def get(c: RpcConnection, oid: str, creds: ClientCredentials, one_hop: bool = True,
              read_ahead: int = READ_AHEAD) -> int:
    """Read as the client does: a node without a copy redirects us to a holder (one hop),
    which we then read from over a connection of our own (its TLS handshake is counted),
    with ``read_ahead`` chunk reads sent ahead on it; without ``one_hop``, the node relays
    them. Unlike ``get_client`` below, the bytes are not hashed here."""
    chunk = 4 << 20
    holder: RpcConnection | None = None
    try:
        r = await c.request(api.READ, api.ReadRequest(id=oid, offset=0, length=chunk,
                                                      redirect=one_hop))
        src = c
        if r.redirect is not None:
            src = holder = RpcConnection(r.redirect[0].addr, creds, 120)
            r = await src.request(api.READ, api.ReadRequest(id=oid, offset=0, length=chunk))
        size, got = r.size, len(r.data)
        pipe = await src.pipeline()
        try:
            nxt = got
            while got < size:
                while nxt < size and pipe.outstanding < read_ahead:
                    await pipe.send_request(api.READ, api.ReadRequest(id=oid, offset=nxt,
                                                                      length=chunk))
                    nxt += chunk
                got += len((await pipe.receive_reply(api.READ)).data)
        finally:
            await pipe.close()
    finally:
        if holder is not None:
            await holder.close()
    return got


async def get_client(address: str, creds: ClientCredentials, oid: str) -> int:
    """The client's own get (``AsyncMesh``: read-ahead, hash check of the whole object)."""
    mesh = AsyncMesh(address, creds, 120)
    got = 0

    async def sink(data: bytes) -> None:
        nonlocal got
        got += len(data)

    try:
        await mesh._read_object(oid, sink, None)
    finally:
        await mesh.close()
    return got


async def tls_copy(bundle_dir: Path, payload: bytes, rounds: int) -> float:
    """MB/s of the bytes over one plain TLS 1.3 connection to a sink in another process
    (as a client and a node are): the ceiling a one-hop get is held against. The sink
    used to run in this process's own event loop, where the client library's get could
    beat it."""
    return await _tls_chain(bundle_dir, payload, rounds, relay=False)


async def _send_timed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      payload: bytes, rounds: int) -> float:
    """Seconds to send ``payload`` ``rounds`` times in 1 MB writes until the far end
    acknowledges all of it (one byte); the connection is closed after."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        for i in range(0, len(payload), 1 << 20):
            writer.write(payload[i : i + (1 << 20)])
            await writer.drain()
    await reader.readexactly(1)
    dt = time.perf_counter() - t0
    writer.close()
    return dt


async def _tls_server(handle: Any, ctx: ssl.SSLContext) -> asyncio.Server:
    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _receiver(total: int, outs: list[Streams], done: asyncio.Event) -> Any:
    """A connection handler that takes ``total`` bytes, sending every piece on to each of
    ``outs`` as it arrives (none: a plain sink), then acknowledges with one byte once the
    ``outs`` have acknowledged theirs, and sets ``done``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while got < total:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
            for _, w in outs:
                w.write(chunk)
            for _, w in outs:
                await w.drain()
        for r, _ in outs:
            await r.readexactly(1)
        writer.write(b"k")
        await writer.drain()
        writer.close()
        done.set()

    return handle


async def _fanout_role(role: str, bundle_dir: Path, total: int, to: list[str]) -> None:
    """One process of ``tls_fanout``: a ``sink`` takes ``total`` bytes and acknowledges;
    the ``relay`` sends every piece it receives on to each sink in ``to`` as it arrives
    (what a put's coordinator does with its members), then acknowledges once they have."""
    bundle = load_bundle(bundle_dir)
    cert, key = issue_node_cert(bundle, f"bench-{role}")
    sctx = server_context(bundle, cert, key)
    cctx = client_context(bundle, cert, key)
    done = asyncio.Event()
    outs: list[Streams] = []  # connected (TLS handshakes done) before the clock starts
    for addr in to:
        host, port = addr.rsplit(":", 1)
        outs.append(await asyncio.open_connection(host, int(port), ssl=cctx,
                                                  server_hostname=None))
    server = await _tls_server(_receiver(total, outs, done), sctx)
    print(server.sockets[0].getsockname()[1], flush=True)
    await done.wait()
    server.close()


async def tls_fanout(bundle_dir: Path, payload: bytes, rounds: int) -> float:
    """MB/s of the same bytes sent over TLS the way an RF 3 put moves them, with nothing
    else: this process -> a relay process -> two sink processes (three TLS hops, four
    processes on the same cores; no hashing, no disk, no RPC). No put through one node
    over TLS can beat it on this machine; ``put_mb_s`` is set beside it."""
    return await _tls_chain(bundle_dir, payload, rounds, relay=True)


async def _tls_chain(bundle_dir: Path, payload: bytes, rounds: int, *, relay: bool) -> float:
    """Send ``payload`` ``rounds`` times to a sink process (``relay``: to a relay process
    that forwards to two sinks) and time it until the far end acknowledges."""
    total = len(payload) * rounds
    me = [sys.executable, str(Path(__file__).resolve()), "--bundle", str(bundle_dir),
          "--total", str(total)]
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(role: str, to: list[str]) -> str:
        args = [*me, "--role", role] + [a for t in to for a in ("--to", t)]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        return f"127.0.0.1:{int(line)}"

    try:
        sinks = [await spawn("sink", []) for _ in range(2 if relay else 1)]
        first = await spawn("relay", sinks) if relay else sinks[0]
        bundle = load_bundle(bundle_dir)
        ccert, ckey = issue_node_cert(bundle, "bench-client")
        cctx = client_context(bundle, ccert, ckey)
        host, port = first.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), ssl=cctx,
                                                       server_hostname=None)
        dt = await _send_timed(reader, writer, payload, rounds)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 60)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return total / MB / dt


EXTRA: dict[str, float] = {}
"""Printed and written to the JSON after the required keys."""


async def measure_bulk(mesh: LocalMesh, quick: bool, suffix: str = "",
                       ) -> tuple[float, float, float, bytes]:
    """(put MB/s, get MB/s one hop, get MB/s relayed, one of the blobs)."""
    creds = mesh.credentials()
    c0 = RpcConnection(mesh.nodes[0].address, creds, 120)
    client = AsyncMesh(mesh.nodes[0].address, creds, 120)
    n_big = 2 if quick else 4
    size = 16 * MB if quick else 64 * MB
    blobs = [os.urandom(size) for _ in range(n_big)]
    # One untimed put first, so neither timed batch pays for the first one's connections.
    await put_client(client, os.urandom(size), w=3)
    t0 = time.perf_counter()
    oids = [await put_client(client, b) for b in blobs]
    put_mb_s = n_big * size / MB / (time.perf_counter() - t0)
    # The same put acknowledged once every replica has its copy (W 3): what the TLS
    # fan-out waits for (both sinks), so the two compare like with like. Fresh bytes:
    # objects are content-addressed, a second put of the same bytes would move nothing.
    # It starts once the W 2 puts' third copies are written, not on top of them.
    for oid in oids:
        deadline = time.perf_counter() + 60
        while True:
            st = await c0.request(api.STAT, api.ObjectIdRequest(id=oid))
            if set(st.replica_set) <= set(st.holders):
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{oid}: its replica set lacks a copy 60 s after its put")
            await asyncio.sleep(0.1)
    blobs_w3 = [os.urandom(size) for _ in range(n_big)]
    t0 = time.perf_counter()
    for b in blobs_w3:
        await put_client(client, b, w=3)
    EXTRA[f"put_w3{suffix}_mb_s"] = n_big * size / MB / (time.perf_counter() - t0)
    del blobs_w3
    await client.close()
    # Read through a node that holds no copy of the object (RF 3 of 4 nodes).
    reader_for: dict[str, RpcConnection] = {}
    for oid in oids:
        # The coordinator's own copy is dropped once the replica set confirms it.
        deadline = time.perf_counter() + 60
        while True:
            st = await c0.request(api.STAT, api.ObjectIdRequest(id=oid))
            outsiders = [n for n in mesh.nodes if n.name not in st.holders]
            if outsiders or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.5)
        if not outsiders:
            raise RuntimeError(f"every node still holds {oid}: cannot measure a remote read")
        reader_for[oid] = RpcConnection(outsiders[0].address, creds, 120)

    def whole(oid: str, got: int) -> None:
        if got != size:  # a short read would pass for a fast one
            raise RuntimeError(f"read {got} of {size} bytes of {oid}")

    t0 = time.perf_counter()
    for oid in oids:
        whole(oid, await get(reader_for[oid], oid, creds))
    get_mb_s = n_big * size / MB / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for oid in oids:
        whole(oid, await get(reader_for[oid], oid, creds, one_hop=False))  # relayed (two hops)
    proxied = n_big * size / MB / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for oid in oids:
        whole(oid, await get_client(reader_for[oid].addr, creds, oid))
    EXTRA[f"get_client{suffix}_mb_s"] = n_big * size / MB / (time.perf_counter() - t0)
    for c in [c0, *reader_for.values()]:
        await c.close()
    return put_mb_s, get_mb_s, proxied, blobs[0]


async def measure_small(mesh: LocalMesh, quick: bool) -> tuple[float, float]:
    """(p50, p99) in ms of sequential 1 KB puts, W = 2."""
    c0 = RpcConnection(mesh.nodes[0].address, mesh.credentials(), 120)
    lat = []
    for _ in range(100 if quick else 500):
        data = os.urandom(1000)
        t = time.perf_counter()
        await put_small(c0, data, replicas=3, w=2)
        lat.append((time.perf_counter() - t) * 1000)
    await c0.close()
    lat.sort()
    return statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def _p50_p99(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]


async def measure_small_pair(audited: LocalMesh, plain: LocalMesh, quick: bool
                             ) -> dict[str, float]:
    """Sequential 1 KB puts (W = 2) alternating between a mesh with the audit trail and
    one without, in a random order per pair."""
    import random

    rng = random.Random()
    conns = {name: RpcConnection(m.nodes[0].address, m.credentials(), 120)
             for name, m in (("audited", audited), ("plain", plain))}
    lat: dict[str, list[float]] = {"audited": [], "plain": []}
    for _ in range(100 if quick else 500):
        order = ["audited", "plain"]
        rng.shuffle(order)
        for name in order:
            data = os.urandom(1000)
            t = time.perf_counter()
            await put_small(conns[name], data, replicas=3, w=2)
            lat[name].append((time.perf_counter() - t) * 1000)
    for c in conns.values():
        await c.close()
    out: dict[str, float] = {}
    out["small_put_p50_ms"], out["small_put_p99_ms"] = _p50_p99(lat["plain"])
    out["small_put_audited_p50_ms"], out["small_put_audited_p99_ms"] = _p50_p99(
        lat["audited"])
    return out


async def measure(mesh: LocalMesh, quick: bool) -> dict[str, float]:
    res: dict[str, float] = {}
    res["put_mb_s"], res["get_mb_s"], EXTRA["get_proxied_mb_s"], blob = await measure_bulk(
        mesh, quick)
    res["tls_copy_mb_s"] = await tls_copy(mesh.admin_path, blob, 2 if quick else 4)
    EXTRA["tls_fanout_mb_s"] = await tls_fanout(mesh.admin_path, blob, 2 if quick else 4)
    return res


async def measure_tmpfs(mesh: LocalMesh, quick: bool) -> None:
    EXTRA["put_tmpfs_mb_s"], EXTRA["get_tmpfs_mb_s"], _, _ = await measure_bulk(
        mesh, quick, "_tmpfs")
    EXTRA["small_put_tmpfs_p50_ms"], EXTRA["small_put_tmpfs_p99_ms"] = await measure_small(
        mesh, quick)


async def wait_warm(mesh: LocalMesh, timeout_s: float = 60) -> None:
    """Until every node's warm worker pool is up (starting it takes the CPU for a few
    seconds after the mesh converges; nothing should be timed before)."""
    creds = mesh.credentials()
    deadline = time.perf_counter() + timeout_s
    for node in mesh.nodes:
        c = RpcConnection(node.address, creds, 30)
        try:
            while (await c.request(TASK_STATS, Empty())).pool["idle"] < 1:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{node.name}: worker pool not up in {timeout_s:g} s")
                await asyncio.sleep(0.1)
        finally:
            await c.close()


def run_mesh(directory: Path, work: Any, node_settings: dict[str, Any] | None = None) -> Any:
    mesh = LocalMesh(directory, 4, regions=["eu-west", "us-east", "ap-south"],
                     node_settings=node_settings)
    mesh.start()
    try:
        mesh.wait_converged(60)
        asyncio.run(wait_warm(mesh))
        return work(mesh)
    finally:
        mesh.stop()


def copies_on_disk(node: NodeProcess) -> dict[str, int]:
    """Object id -> size of the copies ``node`` holds, read from its data dir, not asked of
    the node: a row in its object index (``store/meta.sqlite3``, opened read-only) whose
    file under ``store/objects/`` exists with the row's size, or whose bytes are kept in
    the index itself (a small object, ``obj_inline``) with that size. A file is renamed
    into place only once fsynced and hash-checked, and the row is written after it; an
    inline object's bytes are committed with its row (runtime/storage)."""
    store = node.data_dir / "store"
    uri = f"file:{store / 'meta.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        rows = db.execute("SELECT id, size FROM objects").fetchall()
        inline = dict(db.execute("SELECT id, length(data) FROM obj_inline").fetchall())
    files: dict[str, int] = {str(k): int(v) for k, v in inline.items()}
    for dirpath, _dirs, names in os.walk(store / "objects"):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                files[name] = os.stat(os.path.join(dirpath, name)).st_size
    return {str(oid): int(size) for oid, size in rows if files.get(str(oid)) == int(size)}


async def list_all(c: AsyncMesh) -> list[api.ListedObject]:
    out: list[api.ListedObject] = []
    after = ""
    while True:
        page = await c._request(api.LIST, api.ListRequest(after=after, limit=api.MAX_LIST_PAGE))
        out += page.objects
        if not page.next:
            return out
        after = page.next


async def rereplicate(mesh: LocalMesh, quick: bool) -> dict[str, float]:
    """Kill a node holding ``target`` bytes; seconds until every object is back to its
    copies *on the survivors' disks* (``rereplicate_s``), and, in the same loop, until the
    mesh's own listing calls every object healthy (``rereplicate_health_s``)."""
    creds = mesh.credentials()
    victim = mesh.nodes[-1]
    survivors = mesh.nodes[:-1]
    target = (100 if quick else 1000) * MB
    chunk = 32 * MB
    c0 = AsyncMesh(mesh.nodes[0].address, creds, 120)
    written = 0
    while True:
        # Counted on the victim's disk, as reported: its store's own byte count can include
        # a copy (a stand-in's, a spare) that is handed off and dropped before the kill.
        victim_bytes = sum(size for size in copies_on_disk(victim).values())
        if victim_bytes >= target or written > 3 * target:
            break
        await put_client(c0, os.urandom(chunk))
        written += chunk
    # Every object in the mesh, and the copies it must have on the survivors once repaired.
    objects = {o.id: (o.size, min(o.replicas, len(survivors))) for o in await list_all(c0)}

    def missing() -> tuple[int, int]:
        """(copies the survivors still lack, copies they hold) of the objects."""
        held = [copies_on_disk(n) for n in survivors]
        have = {oid: sum(1 for h in held if h.get(oid) == size)
                for oid, (size, _) in objects.items()}
        return (sum(max(0, want - have[oid]) for oid, (_, want) in objects.items()),
                sum(have.values()))

    to_make, _ = missing()  # the copies the survivors lack: the victim's share
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    t0 = time.perf_counter()
    t_disk: float | None = None
    t_health: float | None = None
    copies = 0
    while t_disk is None or t_health is None:
        if t_disk is None:
            lack, copies = await asyncio.to_thread(missing)
            if lack == 0:
                t_disk = time.perf_counter() - t0
        if t_health is None:
            listing = await list_all(c0)
            if listing and all(o.health == "ok" for o in listing):
                t_health = time.perf_counter() - t0
        if time.perf_counter() - t0 > 900:
            raise RuntimeError("replication not restored in 900 s")
        await asyncio.sleep(0.2)
    await c0.close()
    return {"rereplicate_s": t_disk, "rereplicate_health_s": t_health,
            "rereplicate_objects": len(objects), "rereplicate_copies_on_disk": copies,
            "rereplicate_copies_made": to_make, "rereplicate_victim_mb": victim_bytes / MB}


# ------------------------------------------------------------------ --scale N

SCALE_KEYS = ("objects_held_per_node", "rss_mb_per_node", "rss_bytes_per_object",
              "idle_cpu_pct_per_node", "list_page_ms", "restart_to_serving_s",
              "anti_entropy_bytes_per_min")
SCALE_OBJECT_BYTES = 512
SCALE_CONNS_PER_NODE = 8
"""Concurrent put loops per node: each has its own connection (a node answers the calls of
one connection one at a time)."""


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (not its worker children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _pids(mesh: LocalMesh) -> list[int]:
    pids = []
    for n in mesh.nodes:
        assert n.proc is not None and n.proc.poll() is None, f"{n.name} is not running"
        pids.append(n.proc.pid)
    return pids


async def _dp_stats(mesh: LocalMesh) -> list[api.DataPlaneStats]:
    creds = mesh.credentials()
    out = []
    for n in mesh.nodes:
        c = RpcConnection(n.address, creds, 120)
        try:
            for attempt in range(20):
                try:
                    out.append(await c.request(api.DP_STATS, Empty()))
                    break
                except RpcError as e:  # a busy node (no connection slot): again
                    if "busy" not in str(e) or attempt == 19:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await c.close()
    return out


async def _idle_peer_connections(mesh: LocalMesh) -> list[int]:
    """Each node's idle pooled connections to members (``peer_connections_idle``): ~160 KB
    of RSS each on both ends, until the pool retires them (``PeerConfig.idle_close_s``)."""
    creds = mesh.credentials()
    out = []
    for n in mesh.nodes:
        c = RpcConnection(n.address, creds, 120)
        try:
            st = await c.request(node_api.STATS, Empty())
            out.append(int(st.runtime.get("peer_connections_idle", 0)))
        finally:
            await c.close()
    return out


async def _idle_window(mesh: LocalMesh, window_s: float) -> tuple[list[float], list[float]]:
    """(CPU % of one core per node, replication message bytes sent per minute per node)
    over ``window_s`` seconds in which nothing is asked of the mesh. The stats calls that
    read the byte counters fall outside the CPU window."""
    before = [s.dataplane.get("repl_bytes_sent", 0) for s in await _dp_stats(mesh)]
    pids = _pids(mesh)
    c0 = [_proc_cpu_s(p) for p in pids]
    t0 = time.perf_counter()
    await asyncio.sleep(window_s)
    c1 = [_proc_cpu_s(p) for p in pids]
    dt = time.perf_counter() - t0
    after = [s.dataplane.get("repl_bytes_sent", 0) for s in await _dp_stats(mesh)]
    cpu = [(b - a) / dt * 100 for a, b in zip(c0, c1, strict=True)]
    ae = [(b - a) / dt * 60 for a, b in zip(before, after, strict=True)]
    return cpu, ae


LOAD_ATTEMPTS = 20
"""Tries of one put while loading a scale run, 0.5 s apart, before the run fails."""
TRANSIENT_CODES = frozenset({ErrorCode.BUSY, ErrorCode.STARTING, ErrorCode.UNAVAILABLE})
"""Answers a put may get from a healthy mesh under load: no slot free, a plane still
starting, a write quorum not met in time (the same data put again has the same id)."""


def _transient(e: RpcError) -> bool:
    """Whether a failed put is worth another try: a transient answer, or no answer."""
    if isinstance(e, RemoteError):
        return e.code in TRANSIENT_CODES
    return e.unreachable or "timed out" in str(e)


async def _load(mesh: LocalMesh, n: int) -> list[str]:
    """Put ``n`` small objects (RF 3, W 2) from ``SCALE_CONNS_PER_NODE`` concurrent loops
    per node, each on a connection of its own, spread over every node; their ids."""
    creds = mesh.credentials()
    ids: list[str] = []
    left = [n]

    async def loop(addr: str) -> None:
        c = RpcConnection(addr, creds, 120)
        try:
            while left[0] > 0:
                left[0] -= 1
                data = os.urandom(SCALE_OBJECT_BYTES)
                for attempt in range(LOAD_ATTEMPTS):
                    try:
                        ids.append(await put_small(c, data))
                        break
                    except RpcError as e:  # a transient refusal or a lost answer: again
                        if not _transient(e) or attempt == LOAD_ATTEMPTS - 1:
                            raise
                        EXTRA["load_retries"] = EXTRA.get("load_retries", 0) + 1
                        await asyncio.sleep(0.5)
        finally:
            await c.close()

    await asyncio.gather(*(loop(node.address) for node in mesh.nodes
                           for _ in range(SCALE_CONNS_PER_NODE)))
    return ids


async def _wait_held(mesh: LocalMesh, n: int, timeout_s: float) -> list[int]:
    """Until every node holds ``n`` objects (RF 3 over 3 nodes: each holds all)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        held = [s.store["objects"] for s in await _dp_stats(mesh)]
        if min(held) >= n:
            return held
        if time.perf_counter() > deadline:
            raise RuntimeError(f"nodes hold {held} objects, not {n}, {timeout_s:g} s after "
                               "the last put")
        await asyncio.sleep(1)


async def _list_page_ms(mesh: LocalMesh, ids: list[str], pages: int) -> float:
    """Median ms of one ``obj.list`` page of 1,000 asked of node 0, from the start and
    from ``pages - 1`` points spread over the ids."""
    c = RpcConnection(mesh.nodes[0].address, mesh.credentials(), 120)
    order = sorted(ids)
    starts = [""] + [order[i * len(order) // pages] for i in range(1, pages)]
    times = []
    try:
        await c.request(api.LIST, api.ListRequest(limit=1))  # connection set up untimed
        for after in starts:
            t = time.perf_counter()
            page = await c.request(api.LIST, api.ListRequest(after=after, limit=1000))
            times.append((time.perf_counter() - t) * 1000)
            if len(page.objects) != min(1000, sum(1 for i in order if i > after)):
                raise RuntimeError(f"a page after {after!r} listed {len(page.objects)} objects")
    finally:
        await c.close()
    return statistics.median(times)


async def _restart(mesh: LocalMesh, ids: list[str]) -> float:
    """SIGKILL the last node, start it again on its data dir; seconds from the start of the
    new process until it answers an ``obj.read`` (no redirect) of an object with its bytes."""
    node = mesh.nodes[-1]
    assert node.proc is not None and node.log_path is not None
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()
    creds = mesh.credentials()
    oid = ids[len(ids) // 2]
    cmd = node_command(node, [mesh.nodes[0].address], "", mesh.node_settings)
    t0 = time.perf_counter()
    node.proc = spawn_node(cmd, node.log_path)
    c = RpcConnection(node.address, creds, 5, connect_timeout=1)
    try:
        while True:
            with contextlib.suppress(RpcError):
                r = await c.request(api.READ, api.ReadRequest(id=oid, offset=0, length=4096,
                                                              redirect=False))
                if len(r.data) == SCALE_OBJECT_BYTES:
                    break
            if node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited on restart (see {node.log_path})")
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"{node.name} did not serve a read 600 s after restart")
            await asyncio.sleep(0.05)
        served = time.perf_counter() - t0
        # Then until it serves every plane (writes, replication, ...) and the others see
        # it alive again, as a mesh that converged (``LocalMesh.wait_converged``).
        await asyncio.to_thread(mesh.wait_converged, 600)
        EXTRA["restart_to_converged_s"] = time.perf_counter() - t0
        return served
    finally:
        await c.close()


def _preload(mesh: LocalMesh, n: int) -> list[str]:
    """Write the same ``n`` small objects (RF 3) into every node's store before the nodes
    start, through the store's own API (``LocalStore.put_bytes``: the file and index row a
    put leaves, with a write timestamp), one thread per node; their ids."""
    from concurrent.futures import ThreadPoolExecutor

    from meshscale.core.hlc import HybridLogicalClock
    from meshscale.runtime.storage import LocalStore, StorageConfig

    blobs = [os.urandom(SCALE_OBJECT_BYTES) for _ in range(n)]
    hlc = HybridLogicalClock("bench")
    stamps = [hlc.now(time.time()).encode() for _ in range(n)]

    def fill(node: NodeProcess) -> list[str]:
        store = LocalStore(node.data_dir / "store", StorageConfig())
        try:
            return [store.put_bytes(b, now=time.time(), replicas=3, written=w).object_id
                    for b, w in zip(blobs, stamps, strict=True)]
        finally:
            store.close()

    with ThreadPoolExecutor(len(mesh.nodes)) as pool:
        per_node = list(pool.map(fill, mesh.nodes))
    return per_node[0]


def _start(mesh: LocalMesh) -> None:
    mesh.start()
    mesh.wait_converged(300)
    asyncio.run(wait_warm(mesh, 300))


SCALE_NODES = 3
"""Nodes of the --scale mesh; each holds every object (RF 3)."""
FILE_ROOM_BYTES = 4096
"""What one small object's file takes on a filesystem at least (a page of tmpfs, a block
of ext4), besides its inode."""
INLINE_ROOM_BYTES = 2048
"""What one small object kept inline (``StorageConfig.inline_max_bytes``) takes in its
node's index database at most: its bytes, its rows in two tables and their index
entries, in pages partly filled (no file, no inode)."""


def room_problem(directory: str, n: int, inline: bool | None = None) -> str | None:
    """Why ``directory``'s filesystem cannot hold N small objects on every node of the
    --scale mesh (files and bytes), or None. Checked before a run that may take an hour,
    not found out part-way: a tmpfs of the default size has one inode per page of RAM
    halved, about 3 million on a 24 GB machine, fewer than 3 nodes x 1,000,000 files.
    ``inline`` (default: whether the objects' size is within the store's default
    ``inline_max_bytes``): the objects are kept in the index database, not as files."""
    if inline is None:
        inline = StorageConfig().inline_max_bytes >= SCALE_OBJECT_BYTES
    st = os.statvfs(directory)
    copies = SCALE_NODES * n
    files = 0 if inline else copies
    need_bytes = copies * (INLINE_ROOM_BYTES if inline else FILE_ROOM_BYTES)
    if st.f_files and st.f_favail < files:  # f_files 0: no limit (tmpfs nr_inodes=0)
        return (f"{directory} has room for {st.f_favail:,} more files, and {n:,} objects on "
                f"{SCALE_NODES} nodes need {files:,} (mount a tmpfs with more inodes, e.g. "
                "nr_inodes=0, and pass it as --tmpfs-dir)")
    if st.f_bavail * st.f_frsize < need_bytes:
        return (f"{directory} has {st.f_bavail * st.f_frsize / 2**30:.1f} GiB free, and {n:,} "
                f"objects on {SCALE_NODES} nodes need about {need_bytes / 2**30:.1f} GiB")
    return None


def run_scale(n: int, quick: bool, tmpfs_dir: str | None, preload: bool) -> dict[str, float]:
    settle_s, window_s = (5.0, 10.0) if quick else (60.0, 30.0)
    res: dict[str, float] = {}
    regions = ["eu-west", "us-east", "ap-south"]
    where = tmpfs_dir
    with tempfile.TemporaryDirectory(prefix="meshscale-bench-", dir=where) as d:
        if preload:
            # The baseline of memory and idle cost from an empty mesh of its own.
            empty = LocalMesh(Path(d) / "empty", 3, regions=regions)
            try:
                _start(empty)
                time.sleep(settle_s)
                rss0 = [_proc_rss_bytes(p) for p in _pids(empty)]
                cpu0, ae0 = asyncio.run(_idle_window(empty, window_s))
            finally:
                empty.stop()
        mesh = LocalMesh(Path(d) / "full", SCALE_NODES, regions=regions)
        if preload:
            mesh.make_bundles()
            t0 = time.perf_counter()
            ids = _preload(mesh, n)
            put_s = time.perf_counter() - t0
        try:
            _start(mesh)
            if not preload:
                # The empty mesh first: the baseline of memory and idle cost.
                time.sleep(settle_s)
                rss0 = [_proc_rss_bytes(p) for p in _pids(mesh)]
                cpu0, ae0 = asyncio.run(_idle_window(mesh, window_s))
                t0 = time.perf_counter()
                ids = asyncio.run(_load(mesh, n))
                put_s = time.perf_counter() - t0
            held = asyncio.run(_wait_held(mesh, n, 600))
            time.sleep(settle_s)
            rss = [_proc_rss_bytes(p) for p in _pids(mesh)]
            idle_conns = asyncio.run(_idle_peer_connections(mesh))
            cpu, ae = asyncio.run(_idle_window(mesh, window_s))
            res["objects_held_per_node"] = statistics.mean(held)
            res["rss_mb_per_node"] = statistics.mean(rss) / MB
            res["rss_bytes_per_object"] = statistics.mean(
                (b - a) / h for a, b, h in zip(rss0, rss, held, strict=True))
            res["idle_cpu_pct_per_node"] = statistics.mean(cpu)
            res["list_page_ms"] = asyncio.run(_list_page_ms(mesh, ids, 5))
            res["restart_to_serving_s"] = asyncio.run(_restart(mesh, ids))
            res["anti_entropy_bytes_per_min"] = statistics.mean(ae)
            EXTRA["preload_puts_per_s" if preload else "puts_per_s"] = n / put_s
            EXTRA["rss_mb_per_node_empty"] = statistics.mean(rss0) / MB
            EXTRA["idle_cpu_pct_per_node_empty"] = statistics.mean(cpu0)
            EXTRA["anti_entropy_bytes_per_min_empty"] = statistics.mean(ae0)
            EXTRA["idle_cpu_pct_per_node_max"] = max(cpu)
            EXTRA["peer_connections_idle_per_node"] = statistics.mean(idle_conns)
        finally:
            mesh.stop()
    return res


def scale_main(n: int, quick: bool, tmpfs_dir: str | None, preload: bool,
               out: Path | None) -> int:
    settle_s, window_s = (5, 10) if quick else (60, 30)
    res = run_scale(n, quick, tmpfs_dir, preload)
    notes = {
        "objects_held_per_node": f"{n:,} objects of {SCALE_OBJECT_BYTES} B, RF 3, 3 nodes"
                                 + (", data dirs on tmpfs" if tmpfs_dir else "")
                                 + (", preloaded" if preload else ""),
        "rss_mb_per_node": "node process RSS (workers not counted), after the puts",
        "rss_bytes_per_object": "RSS over the same node empty, per object held",
        "idle_cpu_pct_per_node": f"% of a core, {window_s} s window from {settle_s} s after "
                                 "the puts were all held",
        "list_page_ms": "obj.list page of 1,000 asked of one node, median of 5 points",
        "restart_to_serving_s": "SIGKILL one node, restart: until it serves an obj.read",
        "anti_entropy_bytes_per_min": "replication messages sent per node, same idle window",
    }
    extra_notes = {
        "puts_per_s": f"put_small, {SCALE_CONNS_PER_NODE} connections per node, all nodes",
        "preload_puts_per_s": "objects per s written into the 3 stores before the start",
        "rss_mb_per_node_empty": ("an empty mesh of its own" if preload else
                                  "the same nodes before the puts"),
        "idle_cpu_pct_per_node_empty": "the same nodes before the puts, same window",
        "anti_entropy_bytes_per_min_empty": "the same nodes before the puts",
        "idle_cpu_pct_per_node_max": "the busiest node in the idle window",
        "peer_connections_idle_per_node": "pooled connections to members idle when the RSS "
                                          "was read (~160 KB of RSS each, on both ends)",
        "restart_to_converged_s": "same restart: until every node serves every plane and "
                                  "sees 3 alive",
        "load_retries": "puts tried again after a transient answer (busy, starting, "
                        "unavailable) or none",
    }
    print(f"{'metric':<34}  {'value':>11}  note")
    for k in SCALE_KEYS:
        print(f"{k:<34}  {res[k]:>11.2f}  {notes[k]}")
    for k, v in EXTRA.items():
        print(f"{k:<34}  {v:>11.2f}  {extra_notes.get(k, '')}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"objects": n} | res | EXTRA, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="object store benchmark (real processes)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--scale", type=int, metavar="N",
                    help="data-scale mode: N small objects on a 3-node mesh (issue #24)")
    ap.add_argument("--tmpfs", action="store_true",
                    help="with --scale: node data dirs on /dev/shm (no fsync cost, faster "
                         "loading; memory, idle and listing costs are the same code)")
    ap.add_argument("--tmpfs-dir", default="/dev/shm", metavar="DIR",
                    help="with --tmpfs: the tmpfs to put the node data dirs under "
                         "(default /dev/shm)")
    ap.add_argument("--preload", action="store_true",
                    help="with --scale: write the objects into every node's store (its own "
                         "API) before the nodes start, instead of putting them")
    ap.add_argument("--role", choices=["sink", "relay"], help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--to", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role is not None:  # one process of tls_fanout
        asyncio.run(_fanout_role(args.role, args.bundle, args.total, args.to))
        return 0
    if args.scale is not None:
        if args.scale < 1:
            print("--scale: N must be at least 1", file=sys.stderr)
            return 2
        where = args.tmpfs_dir if args.tmpfs else tempfile.gettempdir()
        if not os.access(where, os.W_OK):
            print(f"--scale: {where} is not writable here", file=sys.stderr)
            return 2
        problem = room_problem(where, args.scale)
        if problem is not None:
            print(f"--scale: {problem}", file=sys.stderr)
            return 2
        return scale_main(args.scale, args.quick, args.tmpfs_dir if args.tmpfs else None,
                          args.preload, args.json)
    res: dict[str, float] = {}

    def disk(mesh: LocalMesh) -> None:
        res.update(asyncio.run(measure(mesh, args.quick)))
        with tempfile.TemporaryDirectory(prefix="meshscale-bench-") as d2:
            small = run_mesh(Path(d2), lambda plain: asyncio.run(
                measure_small_pair(mesh, plain, args.quick)), node_settings={"no_audit": True})
        EXTRA["small_put_audited_p50_ms"] = small.pop("small_put_audited_p50_ms")
        res.update(small)
        rr = asyncio.run(rereplicate(mesh, args.quick))
        res["rereplicate_s"] = rr.pop("rereplicate_s")
        EXTRA.update(rr)

    with tempfile.TemporaryDirectory(prefix="meshscale-bench-") as d:
        run_mesh(Path(d), disk)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(prefix="meshscale-bench-", dir=shm) as d:
            run_mesh(Path(d), lambda mesh: asyncio.run(measure_tmpfs(mesh, args.quick)))
    notes = {
        "put_mb_s": ("64 MB" if not args.quick else "16 MB") + " objects, RF 3, W 2 (acked at "
                    "2 copies), through one node",
        "get_mb_s": "asked a node without a copy: redirected to a holder (one hop)",
        "tls_copy_mb_s": "plain TLS 1.3 copy to a sink process, same bytes, same run",
        "small_put_p50_ms": "1 KB, W 2, sequential; nodes with --no-audit",
        "small_put_p99_ms": "",
        "small_put_audited_p99_ms": "same puts, same time, audit trail on (the default)",
        "rereplicate_s": ("kill a node holding 100 MB" if args.quick else
                          "kill a node holding 1 GB") + "; until every object has 3 copies "
                         "on the survivors' disks (read from their data dirs)",
    }
    print(f"{'metric':<26}  {'value':>9}  note")
    for k in KEYS:
        print(f"{k:<26}  {res[k]:>9.2f}  {notes[k]}")
    extra_notes = {
        "put_w3_mb_s": "same put, W 3: acked once all 3 copies are durable, as the fan-out "
                       "below waits for both sinks",
        "tls_fanout_mb_s": "same bytes, plain TLS as an RF 3 put moves them: client -> relay "
                           "-> 2 sinks (4 processes; no hash, no disk)",
        "rereplicate_health_s": "same kill, same loop: until the mesh's own listing says "
                                "every object is healthy",
        "rereplicate_objects": "objects in the mesh at the kill, each checked on disk",
        "rereplicate_copies_on_disk": "their copies on the 3 survivors' disks when the clock "
                                      "stopped (must be 3 per object)",
        "rereplicate_copies_made": "copies the survivors lacked at the kill",
        "rereplicate_victim_mb": "MB of copies on the killed node's disk",
        "put_w3_tmpfs_mb_s": "same W 3 put, data dirs on tmpfs",
        "get_proxied_mb_s": "same objects, same run, read through the node (two hops)",
        "get_client_mb_s": "same one-hop get by the client library (read-ahead + hash check)",
        "get_client_tmpfs_mb_s": "same client get, data dirs on tmpfs",
        "put_tmpfs_mb_s": "same put, node data dirs on tmpfs (no disk: software ceiling)",
        "get_tmpfs_mb_s": "same get (one hop), data dirs on tmpfs",
        "small_put_audited_p50_ms": "same puts, same time, audit trail on (the default)",
        "small_put_tmpfs_p50_ms": "same small puts, data dirs on tmpfs (audit on)",
        "small_put_tmpfs_p99_ms": "",
    }
    first = [k for k in ("put_w3_mb_s", "tls_fanout_mb_s") if k in EXTRA]
    extra = {k: EXTRA[k] for k in first} | {k: v for k, v in EXTRA.items() if k not in first}
    for k, v in extra.items():
        print(f"{k:<26}  {v:>9.2f}  {extra_notes.get(k, '')}")
    ratio_put = res["put_mb_s"] / res["tls_copy_mb_s"]
    ratio_get = res["get_mb_s"] / res["tls_copy_mb_s"]
    print(f"put at {ratio_put:.0%} and get at {ratio_get:.0%} of the plain TLS copy")
    if "tls_fanout_mb_s" in EXTRA:
        fan = EXTRA["tls_fanout_mb_s"]
        print(f"the RF 3 TLS fan-out alone reaches {fan / res['tls_copy_mb_s']:.0%} of the plain "
              f"TLS copy; like for like (all 3 copies), put W 3 is at "
              f"{EXTRA['put_w3_mb_s'] / fan:.0%} of that fan-out (put W 2: "
              f"{res['put_mb_s'] / fan:.0%})")
    print(f"audited small puts: p99 at {res['small_put_audited_p99_ms'] / res['small_put_p99_ms']:.0%}"
          f" and p50 at {EXTRA['small_put_audited_p50_ms'] / res['small_put_p50_ms']:.0%} of "
          "the same puts without the trail (target: p99 within 110%)")
    if "put_tmpfs_mb_s" in EXTRA:
        print(f"on tmpfs: put at {EXTRA['put_tmpfs_mb_s'] / res['tls_copy_mb_s']:.0%} and get "
              f"at {EXTRA['get_tmpfs_mb_s'] / res['tls_copy_mb_s']:.0%} of the plain TLS copy")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {k: res[k] for k in KEYS} | extra
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
