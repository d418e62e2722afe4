"""A 5-node mesh started with `meshscale up`: real processes on 127.0.0.1.

The mesh is shared by the module (starting one costs seconds); every test first waits
for it to be whole again, so each can run alone as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from runtime_mesh import CONFIG, Mesh, detection_bound, wait_for

from meshscale.client.rpc import ClientCredentials, RpcError, call
from meshscale.core.membership import suspicion_min_timeout
from meshscale.core.rpc import (
    STREAM_PROTOCOL_VERSION,
    PushPullFrame,
    RpcRequest,
    encode_stream_message,
)
from meshscale.runtime.launcher import pid_alive
from meshscale.transport.framing import HEADER
from meshscale.transport.tls import GREETING, NodeBusy, connect_tls
from meshscale.trust.bundle import init_bundle, load_bundle, write_node_bundle, write_private
from meshscale.trust.keyring import Keyring

N = 5
MESHSCALE = Path(sys.executable).parent / "meshscale"


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
    return subprocess.run(
        [str(MESHSCALE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshscale: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("mesh")
    out = directory / "up.out"
    with open(out, "wb") as f:
        up = subprocess.Popen(
            [str(MESHSCALE), "up", "--nodes", str(N), "--base-port", "0", "--dir", str(directory)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    m: Mesh | None = None
    try:
        wait_for(
            lambda: up.poll() is not None or "Ctrl-C to stop" in out.read_text(),
            60,
            "meshscale up to report a converged mesh",
        )
        assert up.poll() is None, out.read_text()
        m = Mesh(directory / "mesh.json")
        yield m
    finally:
        pids = [n["pid"] for n in m.nodes] if m is not None else []
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        finally:
            if up.poll() is None:
                up.kill()
            for p in m.extra if m is not None else []:
                if p.poll() is None:
                    p.kill()
                p.wait()
            leftovers = [pid for pid in pids if pid_alive(pid)]
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"`meshscale up` left node processes behind: {leftovers}"


@pytest.mark.timeout(60)
def test_up_converges_and_writes_mesh_json(mesh: Mesh) -> None:
    mesh.wait_converged()
    assert [n["name"] for n in mesh.nodes] == [f"node-{i}" for i in range(N)]
    ports = [int(n["address"].rsplit(":", 1)[1]) for n in mesh.nodes]
    assert ports == list(range(ports[0], ports[0] + N))
    assert {n["region"] for n in mesh.nodes} == {"eu-west", "us-east"}
    http_ports = [int(n["http"].rsplit(":", 1)[1]) for n in mesh.nodes]
    assert http_ports == list(range(http_ports[0], http_ports[0] + N))
    assert not set(http_ports) & set(ports)
    for n in mesh.nodes:
        assert n["http"].startswith("127.0.0.1:")
        assert Path(n["data_dir"]).is_dir() and pid_alive(n["pid"])
    view = mesh.view(2)
    assert {name: m["region"] for name, m in view.items()} == {
        n["name"]: n["region"] for n in mesh.nodes
    }


@pytest.mark.timeout(60)
def test_members_command(mesh: Mesh) -> None:
    mesh.wait_converged()
    env = {"MESHSCALE_BUNDLE": str(mesh.bundle)}
    result = cli("members", "--node", mesh.addr(1), "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert sorted(r["name"] for r in rows) == [f"node-{i}" for i in range(N)]
    for r in rows:
        assert {"name", "address", "region", "zone", "state", "incarnation"} <= r.keys()
        assert r["state"] == "alive"
    table = cli("members", "--node", mesh.addr(1), "--bundle", mesh.bundle)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "NAME", "ADDRESS", "REGION", "ZONE", "STATE", "POWER", "INC", "RTT"
    ]
    assert len(table.stdout.splitlines()) == N + 1
    # No credential, a missing one, and another cluster's: one line, exit code 2.
    assert "--bundle" in assert_one_line_error(cli("members", "--node", mesh.addr(1)))
    assert_one_line_error(cli("members", "--node", mesh.addr(1), "--bundle", "/nonexistent"))


@pytest.mark.timeout(60)
def test_wrong_bundle_and_foreign_tls_client_are_refused(mesh: Mesh, tmp_path: Path) -> None:
    mesh.wait_converged()
    other = init_bundle(tmp_path / "other")
    before = mesh.stats(0)["rejected_messages"].get("tls", 0)
    result = cli("members", "--node", mesh.addr(0), "--bundle", other.path)
    assert_one_line_error(result)
    # A certificate from another CA, and no certificate at all.
    with pytest.raises(RpcError):
        call(mesh.addr(0), ClientCredentials.from_bundle(other), "members", timeout=3)
    import ssl

    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    with pytest.raises(RpcError):
        call(mesh.addr(0), ClientCredentials(bare, load_bundle(mesh.bundle).token), "members")
    wait_for(
        lambda: mesh.stats(0)["rejected_messages"].get("tls", 0) >= before + 3,
        10,
        "three refused TLS handshakes counted",
    )
    # The right certificate with a wrong token is refused at the RPC layer.
    good = mesh.creds
    with pytest.raises(RpcError, match="unauthorized"):
        call(mesh.addr(0), ClientCredentials(good.ssl_context, "not-the-token"), "members")
    assert mesh.stats(0)["rejected_messages"].get("unauthorized", 0) >= 1


@pytest.mark.timeout(90)
def test_key_rotation_without_downtime(mesh: Mesh) -> None:
    mesh.wait_converged()
    everyone = mesh.live()
    deaths = mesh.deaths()
    marks = {i: mesh.last_event_seq(i) for i in everyone}
    unknown = {i: mesh.stats(i)["rejected_messages"].get("unknown_key", 0) for i in everyone}
    old = load_bundle(mesh.admin).keyring.primary_id
    result = cli("keys", "rotate", "--bundle", mesh.admin)
    assert result.returncode == 0, result.stderr
    new = load_bundle(mesh.admin).keyring.primary_id
    assert new != old
    # As the deploy guide says: copy the admin bundle's keyring.json to every node bundle.
    for i in range(mesh.n):
        write_private(mesh.node_bundle(i) / "keyring.json",
                      (mesh.admin / "keyring.json").read_bytes())
    wait_for(
        lambda: all(mesh.stats(i)["seal_key"] == new for i in everyone),
        30,
        "every node sealing with the new key",
    )
    mesh.wait_protocol_time(everyone, periods=12, timeout=30)
    assert mesh.deaths() == deaths
    for i in everyone:
        kinds = [e["event"] for e in mesh.events_since(i, marks[i])]
        assert "member_down" not in kinds, (i, kinds)
        # Nothing sealed with either key was refused during the switch.
        assert mesh.stats(i)["rejected_messages"].get("unknown_key", 0) == unknown[i]
    mesh.wait_converged(5)


async def _garbage_frames(addr: str, creds: ClientCredentials, count: int) -> None:
    host, port = addr.rsplit(":", 1)
    rng = random.Random(7)
    sem = asyncio.Semaphore(8)

    def frame(i: int) -> bytes:
        kind = i % 7
        if kind == 0:  # announces more than the node accepts
            return HEADER.pack(2**31)
        if kind == 1:  # random bytes
            body = rng.randbytes(rng.randrange(1, 300))
        elif kind == 2:  # valid MessagePack, wrong protocol version
            body = msgspec.msgpack.encode((99, ["req", 1, "members", "t", {}]))
        elif kind == 3:  # unknown message tag
            body = msgspec.msgpack.encode((STREAM_PROTOCOL_VERSION, ["bogus", 1, 2]))
        elif kind == 4:  # push/pull whose payload is not sealed with the keyring
            body = encode_stream_message(PushPullFrame(rng.randbytes(64)))
        elif kind == 5:  # a request with a wrong token
            body = encode_stream_message(RpcRequest(1, "members", "wrong"))
        else:  # truncated: announces 100 bytes, sends 10
            return HEADER.pack(100) + rng.randbytes(10)
        return HEADER.pack(len(body)) + body

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # The whole local mesh dials from 127.0.0.1: a node whose per-address connection
        # slots are all taken (its closes of our last garbage not yet done, on a loaded
        # machine) says busy, try again; so do, as a client would.
        for attempt in range(50):
            try:
                return await connect_tls(host, int(port), creds.ssl_context)
            except NodeBusy:
                await asyncio.sleep(0.02 * (attempt + 1))
        raise AssertionError(f"{addr} stayed busy")

    async def one(i: int) -> None:
        async with sem:
            reader, writer = await connect()
            try:
                writer.write(frame(i))
                await writer.drain()
                if i % 7 != 6:  # a truncated frame: hang up mid-frame
                    await asyncio.wait_for(reader.read(), 5)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.timeout(180)
def test_survives_garbage(mesh: Mesh) -> None:
    mesh.wait_converged()
    target = 1
    host, port_s = mesh.addr(target).rsplit(":", 1)
    port = int(port_s)
    deaths = mesh.deaths()
    before = mesh.stats(target)
    rejected0 = sum(before["rejected_messages"].values())
    rng = random.Random(1)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # Paced in batches the socket buffer holds, so every datagram reaches the node.
        for _ in range(200):
            for _ in range(50):
                s.sendto(rng.randbytes(rng.randrange(0, 1401)), (host, port))
                sent += 1
            wait_for(
                lambda sent=sent: sum(mesh.stats(target)["rejected_messages"].values())
                >= rejected0 + sent,
                10,
                f"{sent} datagrams counted as rejected",
                poll=0.02,
            )
    assert sent == 10_000
    mid = mesh.stats(target)
    udp_rejected = sum(mid["rejected_messages"].values()) - rejected0
    assert udp_rejected == 10_000
    # 1,000 bad frames over TLS with a valid certificate, plus raw non-TLS garbage.
    asyncio.run(_garbage_frames(mesh.addr(target), mesh.creds, 900))

    async def raw(count: int) -> None:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(rng.randbytes(200))
            data = b""
            with contextlib.suppress(ConnectionError):
                data = await asyncio.wait_for(reader.read(), 5)
            # The node closes the connection having said no more than its greeting.
            assert len(data) <= len(GREETING)
            writer.close()

    asyncio.run(raw(100))
    after = mesh.stats(target)
    frame_rejected = sum(after["rejected_messages"].values()) - sum(
        mid["rejected_messages"].values()
    )
    assert frame_rejected >= 1000, after["rejected_messages"]
    for reason in ("oversized", "malformed", "version", "unknown", "unauthorized", "truncated"):
        assert after["rejected_messages"].get(reason, 0) > 0, (reason, after["rejected_messages"])
    # It kept answering probes all along, and nobody was declared dead.
    assert after["membership"]["pings_in"] > before["membership"].get("pings_in", 0)
    assert mesh.deaths() == deaths
    mesh.wait_converged(10)
    # Every garbage connection is closed: what stays open is what was open before (the
    # test's own, and links other nodes keep for their background calls, e.g. policy
    # refreshes), give or take one such link made meanwhile.
    wait_for(lambda: mesh.stats(target)["connections"] <= before["connections"] + 1, 10,
             "the garbage connections closed")


@pytest.mark.timeout(90)
def test_short_pause_is_not_death(mesh: Mesh) -> None:
    mesh.wait_converged()
    victim = 4
    others = mesh.live({victim})
    name = mesh.nodes[victim]["name"]
    deaths = mesh.deaths(others)
    marks = {i: mesh.last_event_seq(i) for i in others}
    pause = 0.5 * suspicion_min_timeout(CONFIG, N)
    mesh.signal(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        # A busy-wait on the clock (not a condition): the pause length is the experiment.
        while time.monotonic() - t0 < pause:
            time.sleep(0.01)
    finally:
        mesh.signal(victim, signal.SIGCONT)
    # Run well past the longest suspicion timeout; nobody may declare it dead.
    mesh.wait_protocol_time(others, periods=12, timeout=30)
    assert mesh.deaths(others) == deaths
    for i in others:
        downs = [e for e in mesh.events_since(i, marks[i]) if e["event"] == "member_down"]
        assert not [e for e in downs if e["name"] == name], (i, downs)
    mesh.wait_converged(10)


@pytest.mark.timeout(120)
def test_long_pause_is_death_then_refuted(mesh: Mesh) -> None:
    mesh.wait_converged()
    victim = 3
    others = mesh.live({victim})
    name = mesh.nodes[victim]["name"]
    inc = mesh.view(0)[name]["incarnation"]
    mesh.signal(victim, signal.SIGSTOP)
    try:
        wait_for(
            lambda: mesh.all_see(name, "dead", others),
            detection_bound(N) + 5,
            f"{name} marked dead while stopped",
            poll=0.2,
        )
    finally:
        mesh.signal(victim, signal.SIGCONT)
    wait_for(
        lambda: mesh.all_see(name, "alive", mesh.live(), min_inc=inc + 1),
        30,
        f"{name} alive again with a higher incarnation",
    )
    mesh.wait_converged(10)


@pytest.mark.timeout(150)
def test_sigkill_detected_then_restart_with_same_data_dir(mesh: Mesh, tmp_path: Path) -> None:
    mesh.wait_converged()
    victim = 2
    node = mesh.nodes[victim]
    name = node["name"]
    others = mesh.live({victim})
    inc = mesh.view(0)[name]["incarnation"]
    bound = detection_bound(N)
    mesh.signal(victim, signal.SIGKILL)
    wait_for(lambda: mesh.all_see(name, "dead", others), bound, f"{name} dead everywhere")
    # Restart from the same data dir, without --name: the identity supplies it.
    proc = mesh.start_node(
        [
            "--region", node["region"], "--zone", node["zone"],
            "--bind", node["address"], "--join", mesh.addr(0),
            "--data-dir", node["data_dir"], "--bundle", str(mesh.node_bundle(victim)),
        ],
        tmp_path / "restart.log",
    )
    mesh.nodes[victim] = {**node, "pid": proc.pid}
    wait_for(
        lambda: mesh.all_see(name, "alive", mesh.live(), min_inc=inc + 1),
        30,
        f"restarted {name} alive everywhere with a higher incarnation",
    )
    identity = json.loads((Path(node["data_dir"]) / "identity.json").read_text())
    assert identity["name"] == name and identity["incarnation"] > inc
    assert mesh.stats(victim)["name"] == name
    mesh.wait_converged(10)


@pytest.mark.timeout(90)
def test_node_with_another_keyring_cannot_join(mesh: Mesh, tmp_path: Path) -> None:
    mesh.wait_converged()
    # A node bundle of the same CA (so TLS succeeds), with a different gossip key.
    intruder_bundle = tmp_path / "bundle"
    write_node_bundle(load_bundle(mesh.admin), "intruder", intruder_bundle)
    write_private(intruder_bundle / "keyring.json", Keyring.generate().to_json().encode())
    before = mesh.stats(0)["rejected_messages"].get("unknown_key", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mesh.start_node(
        [
            "--name", "intruder", "--bind", f"127.0.0.1:{port}", "--join", mesh.addr(0),
            "--data-dir", str(tmp_path / "data"), "--bundle", str(intruder_bundle),
        ],
        tmp_path / "intruder.log",
    )
    wait_for(
        lambda: mesh.stats(0)["rejected_messages"].get("unknown_key", 0) >= before + 2,
        30,
        "the intruder's join attempts rejected as unknown_key",
    )
    # A datagram sealed with a foreign key is counted too.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        host, p = mesh.addr(0).rsplit(":", 1)
        s.sendto(Keyring.generate().seal(b"hello"), (host, int(p)))
    wait_for(
        lambda: mesh.stats(0)["rejected_messages"].get("unknown_key", 0) >= before + 3,
        10,
        "a foreign-key datagram rejected",
    )
    intruder_view = call(f"127.0.0.1:{port}", mesh.creds, "members")
    # The intruder says why it cannot join, instead of waiting in silence.
    wait_for(lambda: "different keyring.json" in (tmp_path / "intruder.log").read_text(), 20,
             "the intruder's log to say its keyring is the problem")
    assert [m["name"] for m in intruder_view] == ["intruder"]
    for i in mesh.live():
        assert "intruder" not in mesh.view(i)
