"""Membership over real sockets: N node processes on 127.0.0.1.

    python bench/runtime_membership.py --nodes 20 --json bench/results/runtime-membership-20.json

Measures, with the default MembershipConfig:

- converge_s: from spawning the processes to every node seeing N alive;
- cpu_pct_per_node: idle CPU (user + system) per node over a window (30 s; --quick: 10 s),
  percent of one core, read from /proc with no RPC traffic during the window;
- rss_mb_per_node: resident memory per node after the window;
- detect_all_s: from SIGKILL of one node to the last live node marking it dead, taken
  from the nodes' own event timestamps (wall clock, same machine); the median of
  --trials crashes made one after another;
- sim_detect_all_s: the simulator's figure for the same config and size
  (``meshscale.sim.scenarios.detect_all_s``), median over --sim-seeds seeds from --seed;
  null if that module is missing. One seed alone varies from ~2.7 s to ~4.4 s at N=20.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meshscale.client.rpc import ClientCredentials, RpcConnection, RpcError
from meshscale.runtime.launcher import LocalMesh

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def detect_all(
    mesh: LocalMesh, creds: ClientCredentials, victim: int, timeout: float
) -> float:
    node = mesh.nodes[victim]
    others = [n for n in mesh.nodes if n is not node and n.proc and n.proc.poll() is None]
    conns = [RpcConnection(n.address, creds, timeout=2.0) for n in others]
    try:
        marks = []
        for c in conns:
            events = await c.call("events")
            marks.append(max((e["seq"] for e in events), default=0))
        assert node.proc is not None
        killed_at = time.time()
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        down_at: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while len(down_at) < len(conns):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} not marked dead everywhere in {timeout:g}s")
            await asyncio.sleep(0.25)
            for i, c in enumerate(conns):
                if i in down_at:
                    continue
                try:
                    events = await c.call("events", {"since": marks[i]})
                except RpcError:
                    continue
                for e in events:
                    if e["event"] == "member_down" and e["name"] == node.name:
                        down_at[i] = e["ts"]
                        break
        return max(down_at.values()) - killed_at
    finally:
        for c in conns:
            await c.close()


def sim_figures(n: int, seeds: list[int]) -> list[float] | None:
    try:
        from meshscale.sim.scenarios import (  # type: ignore[import-not-found,unused-ignore]
            detect_all_s,
        )
    except ImportError:
        return None
    try:
        return [round(float(detect_all_s(nodes=n, seed=s)), 3) for s in seeds]
    except Exception as e:  # the simulator is another team's moving target
        print(f"sim detect_all_s failed: {e}", file=sys.stderr)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="10 s idle window instead of 30 s")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--trials", type=int, default=3, help="crashes measured (median)")
    ap.add_argument(
        "--sim-seeds", type=int, default=5, help="simulator seeds (median of their figures)"
    )
    args = ap.parse_args()
    idle_window = 10.0 if args.quick else 30.0
    directory = args.dir or Path(tempfile.mkdtemp(prefix="meshscale-bench-"))
    mesh = LocalMesh(directory, args.nodes, base_port=0)
    result: dict[str, Any] = {"nodes": args.nodes}
    try:
        t0 = time.monotonic()
        mesh.start()
        mesh.wait_converged(timeout=60 + 2 * args.nodes)
        result["converge_s"] = round(time.monotonic() - t0, 3)
        creds = mesh.credentials()
        # Let start-up gossip settle, then measure a quiet mesh.
        time.sleep(3)
        pids = [n.proc.pid for n in mesh.nodes if n.proc is not None]
        cpu0 = {p: cpu_seconds(p) for p in pids}
        w0 = time.monotonic()
        time.sleep(idle_window)
        elapsed = time.monotonic() - w0
        cpu = [100 * (cpu_seconds(p) - cpu0[p]) / elapsed for p in pids]
        result["cpu_pct_per_node"] = round(statistics.mean(cpu), 3)
        result["cpu_pct_max_node"] = round(max(cpu), 3)
        result["rss_mb_per_node"] = round(statistics.mean(rss_mb(p) for p in pids), 1)
        result["idle_window_s"] = idle_window
        # Several crashes, one after another (the mesh shrinks by one each time), as the
        # simulator's figure is a median of several crashes too.
        trials = []
        for k in range(min(args.trials, args.nodes - 2)):
            victim = args.nodes - 1 - k
            trials.append(round(asyncio.run(detect_all(mesh, creds, victim, 60)), 3))
            time.sleep(2)
        result["detect_all_trials_s"] = trials
        result["detect_all_s"] = statistics.median(trials)
        seeds = list(range(args.seed, args.seed + args.sim_seeds))
        sims = sim_figures(args.nodes, seeds)
        result["sim_detect_all_seeds_s"] = sims
        result["sim_detect_all_s"] = None if sims is None else statistics.median(sims)
    finally:
        mesh.stop()
    rows = [
        ("nodes", result["nodes"], ""),
        ("converge_s", result.get("converge_s"), ""),
        ("detect_all_s", result.get("detect_all_s"), "target <= 3.5"),
        ("sim_detect_all_s", result.get("sim_detect_all_s"), "runtime within 1 s"),
        ("cpu_pct_per_node", result.get("cpu_pct_per_node"), "target <= 1.0 (idle)"),
        ("cpu_pct_max_node", result.get("cpu_pct_max_node"), ""),
        ("rss_mb_per_node", result.get("rss_mb_per_node"), "target <= 60"),
    ]
    print(f"{'metric':<18} {'value':>10}  note")
    for name, value, note in rows:
        shown = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else value)
        print(f"{name:<18} {shown:>10}  {note}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
