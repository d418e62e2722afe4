"""CPU seconds per no-op task, summed over every process of a local mesh (issue #19).

    python bench/task_cpu.py [--n 1000] [--rounds 3] [--stats] [--latency 0]

On a small shared machine throughput follows the CPU each task costs, and that figure
varies much less with the machine's load than tasks/s. Runs on the mesh
``bench/tasks.py`` builds for meshscale (its ``_ms_cluster``: a ``LocalMesh`` of 4 nodes
in 3 regions, one task slot per node, HTTP off, a client per node), through node-0's
client: warms up with a map of 200 no-ops, then times
``--rounds`` maps of ``--n`` no-ops. For each round it prints tasks/s and the CPU
(``/proc`` utime + stime, in µs per task) of the owner (node-0), each other node, each
worker process, and this client, their total and its kernel part; ``--stats`` adds the
owner's ``task.stats`` counters per task (probes, reservations, exchanges, record
writes); ``--latency N`` then times N sequential submit -> result calls (p50, p90).
The clock tick is 10 ms: use ``--n`` of 1,000 or more.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> tuple[float, float]:
    """(user + system, system) CPU seconds of ``pid`` (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    f = stat.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TCK, int(f[12]) / TCK


def noop(i: int) -> int:
    return i


def owner_stats(mesh: Any) -> dict[str, int]:
    from meshscale.core.api import Empty
    from meshscale.core.api.tasks import TASK_STATS

    st = mesh._run(mesh._inner._trequest(TASK_STATS, Empty()))
    out = {"c." + k: v for k, v in st.compute.items()}
    out.update({"s." + k: v for k, v in st.scheduling.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="no-op tasks per map")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stats", action="store_true", help="owner counters per task")
    ap.add_argument("--latency", type=int, default=0, help="sequential calls to time")
    a = ap.parse_args(argv)

    import meshscale
    import tasks  # bench/tasks.py: its mesh, as it builds it
    from meshscale.runtime.launcher import children_of

    t_noop = meshscale.task(noop)
    with tasks._ms_cluster() as (lm, meshes):
        mesh = meshes[0]
        futs = mesh.map(t_noop, range(200))
        mesh.wait(futs, timeout=120)
        assert [f.result() for f in futs] == list(range(200))
        time.sleep(1.0)
        nodes = [p.pid for p in lm.processes()]
        for r in range(a.rounds):
            before_stats = owner_stats(mesh) if a.stats else {}
            pids = nodes + sorted(children_of(set(nodes)))
            c0 = {p: cpu_s(p) for p in pids}
            me0 = os.times()
            t = time.perf_counter()
            futs = mesh.map(t_noop, range(a.n))
            _, pending = mesh.wait(futs, timeout=300)
            assert not pending, f"{len(pending)} tasks not finished"
            assert [f.result() for f in futs] == list(range(a.n))
            dt = time.perf_counter() - t
            me1 = os.times()
            time.sleep(0.3)  # the records' last writes
            workers = sorted(children_of(set(nodes)))
            d = {p: tuple(x - y for x, y in zip(cpu_s(p), c0.get(p, (0.0, 0.0)),
                                                strict=True))
                 for p in set(pids) | set(workers)}
            me = me1.user + me1.system - me0.user - me0.system

            def per(x: float) -> int:
                return round(x / a.n * 1e6)

            total = per(sum(v[0] for v in d.values()) + me)
            kernel = per(sum(v[1] for v in d.values()) + me1.system - me0.system)
            if a.stats:
                after = owner_stats(mesh)
                print("owner counters per task",
                      {k: round((v - before_stats.get(k, 0)) / a.n, 3)
                       for k, v in sorted(after.items()) if v != before_stats.get(k, 0)})
            print(f"round {r}: tasks/s {a.n / dt:.1f} cpu_us_per_task total {total} "
                  f"(kernel {kernel}) owner {per(d[nodes[0]][0])} "
                  f"nodes {[per(d[p][0]) for p in nodes[1:]]} "
                  f"workers {[per(d[p][0]) for p in workers]} client {per(me)}",
                  flush=True)
        if a.latency:
            lat = []
            for i in range(a.latency):
                t = time.perf_counter()
                assert mesh.submit(t_noop, i).result(timeout=60) == i
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            print(f"latency p50 {lat[len(lat) // 2]:.3f} ms "
                  f"p90 {lat[int(len(lat) * 0.9)]:.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
