"""Where an idle agent's resident memory goes (issue #19).

    python bench/agent_memory.py               # imports, step by step, in a fresh interpreter
    python bench/agent_memory.py --mesh 3      # and an idle N-node LocalMesh's agents

``imports``: a fresh interpreter imports the agent's dependencies and then its own
modules, one step at a time (each step also loads what it imports and was not loaded
yet), and prints VmRSS, RssAnon and RssFile after each (``/proc/self/status``, after a
``gc.collect()``). The differences are what each step costs; a later step is cheaper
for what an earlier one loaded already. Python's small-object arenas come in 1 MiB
pieces, so one step's figure is good to about that. The line before the first
``meshscale`` step is the floor: every module an idle agent loads that meshscale does
not define (35.9 MB here, Python 3.11; meshscale's own modules then add ~12.5 and a
running node ~4 more, mostly library pages its TLS, SQLite and event loop touch).

``--mesh N``: starts N nodes as ``meshscale up`` does (``LocalMesh``), waits for them to
converge, lets them idle ``--idle`` seconds, then prints each agent's VmRSS, RssAnon,
RssFile and threads (workers not counted) and node-0's mappings by resident size
(``/proc/PID/smaps``: the shared libraries' pages, the heap, anonymous maps).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = (
    "asyncio", "ssl", "uvloop", "msgspec", "cryptography.x509", "json", "tomllib",
    # The rest of what an idle agent loads and meshscale does not define (each one's
    # first importer is a meshscale module): the line after it is the floor that no
    # change to meshscale's own modules can go below.
    "sqlite3", "ctypes", "blake3", "shutil", "tempfile", "hashlib", "random", "secrets",
    "pwd", "threading", "traceback", "socket", "signal", "struct", "dataclasses",
    "pathlib", "concurrent.futures.thread", "encodings.idna",
    "meshscale.core.api", "meshscale.runtime.config", "meshscale.core.membership",
    "meshscale.trust.revocation", "meshscale.runtime.audit", "meshscale.runtime.data",
    "meshscale.runtime.compute", "meshscale.runtime.streams", "meshscale.runtime.capacity",
    "meshscale.runtime.services_plane", "meshscale.runtime.node", "meshscale.runtime.http",
    "meshscale.runtime.agent_main", "meshscale.runtime.isolation", "meshscale.runtime.storage",
)

_STEPPER = """
import gc, sys
def status():
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            d[k] = int(v.split()[0]) if v.strip().endswith("kB") else 0
    return d["VmRSS"], d["RssAnon"], d["RssFile"]
print(f"{'step':<36} {'VmRSS':>8} {'anon':>8} {'file':>8} {'+MB':>6}")
last = status()[0]
print(f"{'(interpreter)':<36} {last / 1024:8.1f} {status()[1] / 1024:8.1f} "
      f"{status()[2] / 1024:8.1f}")
for name in sys.argv[1:]:
    __import__(name)
    gc.collect()
    rss, anon, file = status()
    print(f"{name:<36} {rss / 1024:8.1f} {anon / 1024:8.1f} {file / 1024:8.1f} "
          f"{(rss - last) / 1024:6.1f}")
    last = rss
"""


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def mappings(pid: int) -> list[tuple[int, int, str]]:
    """(resident kB, anonymous kB, name) per mapped file (or [heap], [anon]...)."""
    rss: collections.Counter[str] = collections.Counter()
    anon: collections.Counter[str] = collections.Counter()
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header line
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Rss:":
                rss[name] += int(parts[1])
            elif parts[0] == "Anonymous:":
                anon[name] += int(parts[1])
    return sorted(((rss[n], anon[n], n) for n in rss), reverse=True)


def mesh(n: int, idle_s: float, top: int) -> None:
    from meshscale.runtime.launcher import LocalMesh, wait_converged

    local = LocalMesh(Path(tempfile.mkdtemp(prefix="meshscale-memory-")), n, base_port=0)
    try:
        local.start()
        asyncio.run(wait_converged([x.address for x in local.nodes], local.credentials(),
                                   60 + 2 * n))
        time.sleep(idle_s)
        print(f"\n{'node':<10} {'VmRSS':>10} {'RssAnon':>10} {'RssFile':>10} {'threads':>8}")
        pids = [x.proc.pid for x in local.nodes if x.proc is not None]
        for x, pid in zip(local.nodes, pids, strict=True):
            s = status(pid)
            print(f"{x.name:<10} {s['VmRSS']:>10} {s['RssAnon']:>10} {s['RssFile']:>10} "
                  f"{s['Threads']:>8}")
        print(f"\n{local.nodes[0].name}'s mappings by resident size (kB):")
        for rss, anon, name in mappings(pids[0])[:top]:
            print(f"{rss:8d} rss {anon:8d} anon  {name}")
    finally:
        local.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", type=int, default=0, help="also start an N-node mesh")
    ap.add_argument("--idle", type=float, default=15.0, help="idle seconds before reading")
    ap.add_argument("--top", type=int, default=20, help="mappings shown")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-c", _STEPPER, *STEPS], check=True)
    if args.mesh:
        mesh(args.mesh, args.idle, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
