"""The brokers a stream user would otherwise reach for, measured on the same terms as
meshscale's row in ``bench/streams.py`` (imported from there; runnable alone too):

    python bench/stream_peers.py [--quick] [--json out.json]

Rows:

- ``mosquitto QoS 1`` (Debian's mosquitto, paho-mqtt clients): Nagle off
  (``set_tcp_nodelay``), no limit on queued or in-flight messages on the broker or the
  clients, so it loses nothing, as its users would configure it for this;
- ``NATS core`` (Debian's nats-server, nats-py): at-most-once, no acks;
- ``NATS JetStream`` (memory storage, 1 replica): every publish acknowledged by the
  server, consumers acknowledge what they process.

Each pipeline is producer -> operator -> subscriber, three clients on 127.0.0.1: the
operator subscribes to the input subject, applies the same ``passthrough`` as meshscale's
bench (decode the msgpack value, keep its number) and publishes the result. Records carry
the same fields as meshscale's (``n`` and 80 bytes of padding) plus the producer's
timestamp ``ts``, which meshscale carries beside the value. Keys are as
``bench/streams.py``'s: ``throughput_records_s`` (as fast as one producer can, until the
last output reaches the subscriber), ``latency_p50_ms`` / ``latency_p99_ms`` (200
records/s, every record produced counted, a lost one as infinitely late),
``publish_only_records_s`` (acknowledged by the broker where the protocol acknowledges:
QoS 1 PUBACK, JetStream ack; NATS core has no ack, so its figure is after a flush),
``records_missing``.

The brokers are installed with apt-get when missing and the user is root, started on free
ports of 127.0.0.1 by this script and stopped by it. A row that cannot run (no broker, no
client library: ``pip install paho-mqtt nats-py``, the ``bench`` extra) is reported with
the reason, never silently left out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

KEYS = ("throughput_records_s", "latency_p50_ms", "latency_p99_ms", "publish_only_records_s",
        "records_missing")
PAD = "x" * 80
STEADY_RATE = 200
BROKERS = {"mosquitto": "mosquitto", "nats-server": "nats-server"}
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class Unavailable(Exception):
    """A row that cannot run here; the message says why."""


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def ms(x: float) -> float | None:
    return round(x * 1000, 2) if math.isfinite(x) else None


def record(n: int) -> bytes:
    return _enc.encode({"n": n, "pad": PAD, "ts": time.time()})


def passthrough(raw: bytes) -> bytes:
    v = _dec.decode(raw)
    return _enc.encode({"n": v["n"], "ts": v["ts"]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ensure_broker(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if path:
        return path
    if os.geteuid() != 0:
        raise Unavailable(f"{binary} is not installed (apt-get install {BROKERS[binary]})")
    r = subprocess.run(["apt-get", "install", "-y", "-q", BROKERS[binary]],
                       capture_output=True, text=True, timeout=600)
    path = shutil.which(binary, path="/usr/sbin:/usr/bin")
    if r.returncode != 0 or not path:
        raise Unavailable(f"apt-get install {BROKERS[binary]} failed: {r.stderr[-300:]}")
    return path


@contextlib.contextmanager
def broker(cmd: list[str], port: int) -> Iterator[None]:
    """Run a broker until the block ends; waits for its port to accept."""
    with tempfile.TemporaryFile() as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=1):
                    break
                if p.poll() is not None or time.monotonic() > end:
                    log.seek(0)
                    raise Unavailable(f"{cmd[0]} did not start: {log.read()[-300:]!r}")
                time.sleep(0.05)
            yield
        finally:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Tally:
    """First arrival time of each record number, and repeats."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: dict[int, float] = {}
        self.duplicate = 0
        self.done = threading.Event()
        self.expect = -1

    def add(self, raw: bytes) -> None:
        v = _dec.decode(raw)
        now = time.time()
        with self.lock:
            n = int(v["n"])
            if n in self.first:
                self.duplicate += 1
            else:
                self.first[n] = now - float(v["ts"])
            if self.expect >= 0 and len(self.first) >= self.expect:
                self.done.set()

    def expecting(self, produced: int) -> None:
        with self.lock:
            self.expect = produced
            if len(self.first) >= produced:
                self.done.set()

    def missing(self, produced: int) -> int:
        with self.lock:
            return sum(1 for n in range(produced) if n not in self.first)


def steady(publish: Callable[[int], None], seconds: float) -> int:
    """Publish at STEADY_RATE for ``seconds``; returns how many were produced."""
    t_end = time.monotonic() + seconds
    nxt = time.monotonic()
    i = 0
    while time.monotonic() < t_end:
        if time.monotonic() >= nxt:
            publish(i)
            i += 1
            nxt += 1 / STEADY_RATE
        time.sleep(0.0005)
    return i


def latencies(t: Tally, produced: int) -> tuple[float | None, float | None]:
    with t.lock:
        every = [t.first.get(n, math.inf) for n in range(produced)]
    return ms(pct(every, 50)), ms(pct(every, 99))


# -- MQTT ------------------------------------------------------------------------------


def mqtt_row(quick: bool) -> dict[str, Any]:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise Unavailable("paho-mqtt is not installed (pip install paho-mqtt)") from None
    exe = ensure_broker("mosquitto")
    port = free_port()
    n_fast = 5_000 if quick else 30_000
    steady_s = 5.0 if quick else 15.0
    with tempfile.TemporaryDirectory(prefix="bench-mosquitto-") as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        "max_queued_messages 0\nmax_inflight_messages 0\n"
                        "set_tcp_nodelay true\npersistence false\n")
        with broker([exe, "-c", str(conf)], port):
            clients: list[Any] = []

            def client(name: str) -> Any:
                c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                                clean_session=True)
                c.max_inflight_messages_set(65535)
                # paho leaves Nagle on; its users turn it off for latency, as we do.
                c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.max_queued_messages_set(0)
                c.connect("127.0.0.1", port)
                c.loop_start()
                clients.append(c)
                return c

            try:
                out: dict[str, Any] = {}
                prod = client("prod")
                # publish only
                t0 = time.perf_counter()
                infos = [prod.publish("raw", record(i), qos=1) for i in range(n_fast)]
                for info in infos:
                    info.wait_for_publish(60)
                out["publish_only_records_s"] = round(n_fast / (time.perf_counter() - t0), 1)

                op = client("op")

                op.on_message = lambda _c, _u, msg: op.publish(
                    msg.topic + "-out", passthrough(msg.payload), qos=1)
                for topic in ("fast", "steady"):
                    ready = threading.Event()
                    op.on_subscribe = lambda *_a, ev=ready: ev.set()
                    op.subscribe(topic, qos=1)
                    if not ready.wait(10):
                        raise RuntimeError("mosquitto: no SUBACK")
                sub = client("sub")
                fast, slow_tally = Tally(), Tally()
                sub.on_message = lambda _c, _u, msg: (
                    fast if msg.topic == "fast-out" else slow_tally).add(msg.payload)
                for topic in ("fast-out", "steady-out"):
                    ready = threading.Event()
                    sub.on_subscribe = lambda *_a, ev=ready: ev.set()
                    sub.subscribe(topic, qos=1)
                    if not ready.wait(10):
                        raise RuntimeError("mosquitto: no SUBACK")
                # throughput
                fast.expecting(n_fast)
                t0 = time.perf_counter()
                for i in range(n_fast):
                    prod.publish("fast", record(i), qos=1)
                fast.done.wait(300)
                with fast.lock:
                    got = len(fast.first)
                out["throughput_records_s"] = round(got / (time.perf_counter() - t0), 1)
                # latency at a steady rate
                produced = steady(lambda i: prod.publish("steady", record(i), qos=1), steady_s)
                slow_tally.expecting(produced)
                slow_tally.done.wait(30)
                out["latency_p50_ms"], out["latency_p99_ms"] = latencies(slow_tally, produced)
                out["records_missing"] = fast.missing(n_fast) + slow_tally.missing(produced)
                return out
            finally:
                for c in clients:
                    with contextlib.suppress(Exception):
                        c.disconnect()
                        c.loop_stop()


# -- NATS ------------------------------------------------------------------------------


def nats_row(quick: bool, jetstream: bool) -> dict[str, Any]:
    try:
        import nats  # noqa: F401
    except ImportError:
        raise Unavailable("nats-py is not installed (pip install nats-py)") from None
    exe = ensure_broker("nats-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp:
        cmd = [exe, "-a", "127.0.0.1", "-p", str(port)]
        if jetstream:
            cmd += ["-js", "-sd", tmp]
        with broker(cmd, port):
            return asyncio.run(_nats(port, quick, jetstream))


async def _nats(port: int, quick: bool, jetstream: bool) -> dict[str, Any]:
    import nats
    from nats.js.api import StorageType, StreamConfig

    n_fast = 5_000 if quick else 30_000
    steady_s = 5.0 if quick else 15.0
    url = f"nats://127.0.0.1:{port}"
    prod, op, sub = [await nats.connect(url, pending_size=1 << 28) for _ in range(3)]
    out: dict[str, Any] = {}
    fast, slow_tally = Tally(), Tally()
    try:
        if jetstream:
            pjs, ojs, sjs = prod.jetstream(), op.jetstream(), sub.jetstream()
            await pjs.add_stream(StreamConfig(
                name="BENCH", subjects=["raw", "fast", "steady", "fast-out", "steady-out"],
                storage=StorageType.MEMORY, num_replicas=1))

            async def publish(subject: str, data: bytes) -> None:
                await pjs.publish(subject, data)

            t0 = time.perf_counter()
            for i in range(n_fast):  # acks awaited together, as a fast producer would
                await pjs.publish_async("raw", record(i))
            await pjs.publish_async_completed()
            out["publish_only_records_s"] = round(n_fast / (time.perf_counter() - t0), 1)

            async def forward(msg: Any) -> None:
                await ojs.publish(msg.subject + "-out", passthrough(msg.data))
                await msg.ack()

            for subject in ("fast", "steady"):
                await ojs.subscribe(subject, cb=forward, manual_ack=True,
                                    durable=f"op-{subject}")

            async def take(msg: Any) -> None:
                (fast if msg.subject == "fast-out" else slow_tally).add(msg.data)
                await msg.ack()

            for subject in ("fast-out", "steady-out"):
                await sjs.subscribe(subject, cb=take, manual_ack=True,
                                    durable=f"sub-{subject.replace('-', '_')}")
            send: Callable[[str, bytes], Any] = publish
        else:
            t0 = time.perf_counter()
            for i in range(n_fast):
                await prod.publish("raw", record(i))
            await prod.flush(60)
            out["publish_only_records_s"] = round(n_fast / (time.perf_counter() - t0), 1)

            async def forward_core(msg: Any) -> None:
                await op.publish(msg.subject + "-out", passthrough(msg.data))

            for subject in ("fast", "steady"):
                await op.subscribe(subject, cb=forward_core, pending_msgs_limit=1 << 20)

            async def take_core(msg: Any) -> None:
                (fast if msg.subject == "fast-out" else slow_tally).add(msg.data)

            for subject in ("fast-out", "steady-out"):
                await sub.subscribe(subject, cb=take_core, pending_msgs_limit=1 << 20)
            await op.flush()
            await sub.flush()

            async def publish_core(subject: str, data: bytes) -> None:
                await prod.publish(subject, data)

            send = publish_core
        fast.expecting(n_fast)
        t0 = time.perf_counter()
        for i in range(n_fast):
            if jetstream:
                await pjs.publish_async("fast", record(i))
            else:
                await send("fast", record(i))
        if jetstream:
            await pjs.publish_async_completed()
        await prod.flush(60)
        await asyncio.to_thread(fast.done.wait, 300)
        with fast.lock:
            got = len(fast.first)
        out["throughput_records_s"] = round(got / (time.perf_counter() - t0), 1)
        # steady rate: paced on the event loop (the clients' callbacks run on it too)
        t_end = time.monotonic() + steady_s
        nxt = time.monotonic()
        produced = 0
        while time.monotonic() < t_end:
            now = time.monotonic()
            if now >= nxt:
                await send("steady", record(produced))
                produced += 1
                nxt += 1 / STEADY_RATE
            await asyncio.sleep(max(0.0, min(0.0005, nxt - time.monotonic())))
        slow_tally.expecting(produced)
        await asyncio.to_thread(slow_tally.done.wait, 30)
        out["latency_p50_ms"], out["latency_p99_ms"] = latencies(slow_tally, produced)
        out["records_missing"] = fast.missing(n_fast) + slow_tally.missing(produced)
        return out
    finally:
        for c in (prod, op, sub):
            with contextlib.suppress(Exception):
                await c.close()


ROWS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "mosquitto QoS 1": mqtt_row,
    "NATS core": lambda quick: nats_row(quick, False),
    "NATS JetStream": lambda quick: nats_row(quick, True),
}


def run_peers(quick: bool) -> dict[str, dict[str, Any]]:
    """Every peer row: its keys, or ``{"unavailable": reason}``."""
    rows: dict[str, dict[str, Any]] = {}
    for name, fn in ROWS.items():
        try:
            rows[name] = fn(quick)
        except Unavailable as e:
            rows[name] = {"unavailable": str(e)}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    rows = run_peers(args.quick)
    for name, r in rows.items():
        print(f"{name}: {r}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
