"""Services benchmark (issue #22) on a local mesh of 4 real node processes in 2 regions.

    python bench/services.py [--quick] --json out.json

- noop_calls_per_s: calls of a method that returns its argument, from several concurrent
  callers (one client each, through node-0), over a fixed time; 2 replicas near-caller;
- noop_call_p50_ms / noop_call_p99_ms: one caller, sequential calls, the whole round
  trip (client -> node -> replica's node -> replica process and back);
- model_call_p50_ms: a scikit-learn logistic regression trained on the bundled digits
  set in ``__init__`` (once per replica), one 64-pixel image per call;
- failover_gap_s: a caller in region a calls an idempotent method of a service whose two
  replicas run in region b; the node that answered its last call is SIGKILLed; the gap
  is from the kill until the caller's next answered call;
- idle_rss_mb: resident memory of an idle no-op replica process (mean over replicas).

With ``--peers`` (run it in the peers' environment: ``make bench-peers``, then
``.venv-bench/bin/python bench/services.py --peers``), Ray Serve is measured in the same run
on the same figures (bench/serve_peer.py says how) and printed in a second column; the
JSON gains ``"ray_serve": {...}`` (or ``null`` and ``"ray_serve_unavailable"`` with the
reason when Ray is not installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from meshscale.client.rpc import request
from meshscale.client.shipping import Region
from meshscale.client.tasks import connect
from meshscale.core.api.services import CALL, CallRequest
from meshscale.runtime.launcher import LocalMesh, children_of

KEYS = ("noop_calls_per_s", "noop_call_p50_ms", "noop_call_p99_ms", "model_call_p50_ms",
        "failover_gap_s", "idle_rss_mb")


class Noop:
    def ping(self, x: Any = None) -> Any:
        return x


class Digits:
    def __init__(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        d = load_digits()
        self.model = LogisticRegression(max_iter=2000).fit(d.data, d.target)

    def predict(self, pixels: list[float]) -> int:
        return int(self.model.predict([pixels])[0])


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def wait(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = cond()
        except Exception:
            v = None
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--peers", action="store_true",
                    help="also run Ray Serve on the same figures (needs make bench-peers)")
    args = ap.parse_args(argv)
    seq_n = 300 if args.quick else 3_000
    conc_s = 3.0 if args.quick else 10.0
    callers = 4
    model_n = 100 if args.quick else 500
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp, \
            LocalMesh(Path(tmp), 4, regions=["a", "b"]) as m:
        c = connect(m.nodes[0].address, bundle=m.bundle_path)
        c.deploy(Noop, "noop", replicas=2, idempotent=["ping"])
        h = c.service("noop")
        wait(lambda: h.ping(1) == 1, 120, "the no-op service")
        for _ in range(50):
            h.ping(0)
        lat = []
        for i in range(seq_n):
            t0 = time.perf_counter()
            h.ping(i)
            lat.append((time.perf_counter() - t0) * 1000)
        out["noop_call_p50_ms"] = round(pct(lat, 0.5), 3)
        out["noop_call_p99_ms"] = round(pct(lat, 0.99), 3)

        counts = [0] * callers
        stop = [0.0]

        def caller(k: int) -> None:
            cc = connect(m.nodes[0].address, bundle=m.bundle_path)
            hh = cc.service("noop")
            try:
                while time.monotonic() < stop[0]:
                    hh.ping(k)
                    counts[k] += 1
            finally:
                cc.close()

        stop[0] = time.monotonic() + conc_s
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["noop_calls_per_s"] = round(sum(counts) / (time.monotonic() - t0), 1)

        from sklearn.datasets import load_digits

        images = load_digits().data[:model_n].tolist()
        c.deploy(Digits, "digits", replicas=1, idempotent=["predict"])
        d = c.service("digits", timeout=60)
        wait(lambda: d.predict(images[0]) is not None, 180, "the digits service")
        mlat = []
        for img in images:
            t1 = time.perf_counter()
            d.predict(img)
            mlat.append((time.perf_counter() - t1) * 1000)
        out["model_call_p50_ms"] = round(statistics.median(mlat), 3)

        pids = []
        for n in m.nodes:
            if n.proc is None:
                continue
            for pid in children_of({n.proc.pid}):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"replica_main" in cmd:
                    pids.append(pid)
        svc = {s.spec.name: s for s in c.services()}
        rss = [rss_mb(p) for p in pids]
        # The smallest replica processes are the no-op's (the digits one holds sklearn).
        noop_n = sum(1 for r in svc["noop"].replicas if r.ready)
        out["idle_rss_mb"] = round(statistics.mean(sorted(rss)[:noop_n]), 1) if rss else None

        c.deploy(Noop, "fo", replicas=2, placement=Region("b"), idempotent=["ping"])
        creds = m.credentials()

        def one() -> Any:
            return request(m.nodes[0].address, creds, CALL,
                           CallRequest(service="fo", method="ping", args=_args()),
                           timeout=30)

        def two_ready() -> bool:
            s = {x.spec.name: x for x in c.services()}.get("fo")
            return s is not None and sum(1 for r in s.replicas if r.ready) == 2

        wait(two_ready, 120, "two replicas of fo")
        last = wait(lambda: (r := one()).outcome == "done" and r, 60, "fo answers")
        victim = next(n for n in m.nodes if n.name == last.node)
        assert victim.proc is not None
        victim.proc.kill()
        t_kill = time.monotonic()
        while True:
            r = one()
            if r.outcome == "done":
                out["failover_gap_s"] = round(time.monotonic() - t_kill, 3)
                break
            if time.monotonic() - t_kill > 60:
                out["failover_gap_s"] = None
                break
        c.close()
    peer: dict[str, Any] | None = None
    unavailable: str | None = "not asked for (--peers)"
    if args.peers:
        import serve_peer

        try:
            peer = serve_peer.run(seq_n, conc_s, callers, images, Digits)
            unavailable = None
        except serve_peer.Unavailable as e:
            unavailable = str(e)
    width = max(len(k) for k in KEYS)
    print(f"{'key'.ljust(width)}  {'meshscale':>12}  {'ray_serve':>12}")
    for k in KEYS:
        theirs = "-" if peer is None else peer.get(k)
        print(f"{k.ljust(width)}  {out[k]!s:>12}  {theirs!s:>12}")
    if peer is None:
        print(f"(Ray Serve not run: {unavailable})")
    elif peer.get("note"):
        print(f"(Ray Serve: {peer['note']})")
    if args.json:
        doc: dict[str, Any] = {k: out[k] for k in KEYS}
        doc["ray_serve"] = peer
        doc["ray_serve_unavailable"] = unavailable
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


def _args() -> bytes:
    import cloudpickle

    data: bytes = cloudpickle.dumps(((None,), {}))
    return data


if __name__ == "__main__":
    sys.exit(main())
