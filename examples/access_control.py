"""Badge checks at the door: a classifier served near the doors, and centrally, side by side.

    .venv/bin/python examples/access_control.py [--quick]

Starts its own mesh of 4 node processes at two sites (``site-a``, ``site-b``, 40 ms round
trip between them, emulated), then:

1. deploys one image classifier twice: ``badge-near`` near-caller with 2 replicas, and
   ``badge-central`` with 1 replica at ``site-a``. The classifier is scikit-learn's
   logistic regression trained in ``__init__`` on its bundled digits set (8x8 images
   standing in for badge photos; no download), so each replica trains once;
2. runs a door at each site: it reads a badge (one image), asks both services, and checks
   the answer against the label;
3. midway, SIGKILLs the node of ``site-b``'s near replica; ``predict`` is declared
   idempotent, so the door's calls fail over to the other replica and a new one starts;
4. prints, per site, the median and p99 latency of each service, the failover gap (from
   the kill to the door's next answered call) and how many answers were right.

Exits 0 when every call was answered and the answers are mostly right (> 80 %).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import meshscale
from meshscale.client.shipping import Region
from meshscale.runtime.latency import parse_latency
from meshscale.runtime.launcher import LocalMesh

SITES = ("site-a", "site-b")


class BadgeClassifier:
    """Trained once per replica, in ``__init__``; ``predict`` is a pure function of its
    input, so it is safe to run twice (declared idempotent)."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        d = load_digits()
        self.model = LogisticRegression(max_iter=2000).fit(d.data[::2], d.target[::2])

    def predict(self, pixels: list[float]) -> int:
        return int(self.model.predict([pixels])[0])


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="badge checks near the doors vs centrally")
    ap.add_argument("--quick", action="store_true", help="fewer badges (for tests)")
    args = ap.parse_args(argv)
    badges = 60 if args.quick else 300
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = d.data[1::2].tolist(), d.target[1::2].tolist()
    with tempfile.TemporaryDirectory(prefix="access-control-") as tmp, \
            LocalMesh(Path(tmp), 4, regions=list(SITES),
                      latency=parse_latency("site-a:site-b=40ms")) as m:
        entry = {site: next(n for n in m.nodes if n.region == site) for site in SITES}
        admin = meshscale.connect(entry["site-a"].address, bundle=m.bundle_path)
        near = admin.deploy(BadgeClassifier, "badge-near", replicas=2,
                            idempotent=["predict"])
        central = admin.deploy(BadgeClassifier, "badge-central", replicas=1,
                               placement=Region("site-a"), idempotent=["predict"])
        print(f"badge-near placed on {', '.join(near)}; badge-central on "
              f"{', '.join(central)}")
        doors = {site: meshscale.connect(entry[site].address, bundle=m.bundle_path)
                 for site in SITES}
        # Both sites call before the run, so each site holds a near replica; the doors
        # start once every door's node sees them ready (each node learns the others'
        # replicas by polling them, twice a second).
        end = time.monotonic() + 180
        while True:
            views = [{s.spec.name: s for s in doors[site].services()} for site in SITES]
            svc = views[0]
            reps = [r for r in svc["badge-near"].replicas if r.ready]
            ok_c = all(any(r.ready for r in v["badge-central"].replicas) for v in views)
            ok_n = all(sum(r.ready for r in v["badge-near"].replicas) == 2 for v in views)
            if ok_c and ok_n and {r.region for r in reps} == set(SITES) and len(reps) == 2:
                break
            if time.monotonic() > end:
                print("the replicas did not become ready in 180 s", file=sys.stderr)
                return 1
            for site in SITES:
                with contextlib.suppress(meshscale.MeshError):
                    doors[site].service("badge-near", timeout=30).predict(images[0])
            time.sleep(0.2)
        victim_name = next(r.node for r in reps if r.region == "site-b")
        victim = next(n for n in m.nodes if n.name == victim_name)
        if victim is entry["site-b"]:
            # The door must not be on the node we kill: move it to the other site-b node.
            other = next(n for n in m.nodes if n.region == "site-b" and n is not victim)
            doors["site-b"].close()
            doors["site-b"] = meshscale.connect(other.address, bundle=m.bundle_path)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                v = {s.spec.name: s for s in doors["site-b"].services()}
                if any(r.ready for r in v["badge-central"].replicas) and \
                        sum(r.ready for r in v["badge-near"].replicas) == 2:
                    break
                time.sleep(0.2)
        lat: dict[tuple[str, str], list[float]] = {}
        right: dict[str, int] = dict.fromkeys(SITES, 0)
        failures: list[str] = []
        kill_at: list[float] = []
        back_at: list[float] = []

        def door(site: str) -> None:
            mesh = doors[site]
            for i in range(badges):
                img, label = images[i % len(images)], labels[i % len(labels)]
                for svc_name in ("badge-near", "badge-central"):
                    t0 = time.perf_counter()
                    try:
                        got = mesh.service(svc_name, timeout=30).predict(img)
                    except meshscale.MeshError as e:
                        failures.append(f"{site} {svc_name}: {e}")
                        continue
                    now = time.monotonic()
                    lat.setdefault((site, svc_name), []).append(
                        (time.perf_counter() - t0) * 1000)
                    if svc_name == "badge-near":
                        right[site] += got == label
                        if site == "site-b" and kill_at and not back_at and now > kill_at[0]:
                            back_at.append(now)

        threads = [threading.Thread(target=door, args=(s,)) for s in SITES]
        for t in threads:
            t.start()
        while len(lat.get(("site-b", "badge-near"), [])) < badges // 2:
            time.sleep(0.05)
        assert victim.proc is not None
        victim.proc.kill()
        kill_at.append(time.monotonic())
        print(f"killed {victim.name} (site-b's near replica) after {badges // 2} badges")
        for t in threads:
            t.join()
        gap = back_at[0] - kill_at[0] if back_at else None
        print()
        print(f"{'site':8} {'service':14} {'calls':>5} {'p50_ms':>8} {'p99_ms':>8}")
        for site in SITES:
            for svc_name in ("badge-near", "badge-central"):
                xs = lat.get((site, svc_name), [])
                print(f"{site:8} {svc_name:14} {len(xs):5d} {statistics.median(xs):8.2f} "
                      f"{pct(xs, 0.99):8.2f}")
        print()
        print("failover gap at site-b: " + ("none measured" if gap is None
                                            else f"{gap:.3f} s"))
        for site in SITES:
            print(f"{site}: {right[site]} of {badges} badges read right by badge-near")
        print(f"calls failed: {len(failures)}")
        for f in failures[:5]:
            print("  " + f.splitlines()[0])
        for c in doors.values():
            c.close()
        admin.close()
        ok = not failures and all(right[s] > 0.8 * badges for s in SITES)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
