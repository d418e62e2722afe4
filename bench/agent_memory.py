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
not define (36.2 MB here, Python 3.11; meshscale's own modules then add ~13 when they
are compiled from source, ~7 from bytecode, and a running node ~4-8 more, mostly library
pages its TLS, SQLite and event loop touch; start-up's garbage is trimmed 5 s after).

``--mesh N``: starts N nodes as ``meshscale up`` does (``LocalMesh``), waits for them to
converge, lets them idle ``--idle`` seconds, then prints each agent's VmRSS, RssAnon,
RssFile and threads (workers not counted), its Pss and the part of its RSS that is clean
pages it shares (``/proc/PID/smaps_rollup``: mostly shared libraries' code, counted once
in the machine's memory however many nodes map it) and node-0's mappings by resident
size (``/proc/PID/smaps``: the shared libraries' pages, the heap, anonymous maps).

Why cryptography stays in every agent (issue #19, measured here): a node seals and opens
every gossip datagram and push/pull payload with AES-256-GCM (``trust/keyring.py``,
``runtime/node.py``), signs its audit chain head every ``head_interval_s`` (ECDSA P-256,
``runtime/audit.py``), checks revocation entries against the CA's key when they arrive,
and checks its bundle (certificate issued by the CA, key matching it, the CA's basic
constraints) with ``cryptography.x509`` at start. The standard library has no AES-GCM
nor ECDSA, so importing it lazily saves nothing for a node: every step above is taken
before the node is ready or on its idle path. What each connection needs is not among
them: the peer's name and role come from ``ssl`` (``getpeercert()``, ``trust/certs.py``).
Measured on live 3-node meshes with stand-ins (never committed): a node without the
cryptography package at all would be ~11.7 MB smaller (41.1 MB instead of 52.8 here),
without only its X.509 Python layer ~1.8 MB smaller.

Bytecode: where ``PYTHONDONTWRITEBYTECODE`` is set and the source tree has no
``__pycache__``, every agent compiles meshscale's modules at start, and ~1.5 MB of what
that allocates stays (51.3 MB instead of 52.8 here); an installed package has its
bytecode. The imports step says so when it sees it.
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
    "asyncio", "ssl", "uvloop", "msgspec",
    # cryptography in the layers an agent uses: its Rust extension (a 14.8 MB .so that
    # links its own copy of OpenSSL; loaded by any cryptography import), AES-GCM (every
    # gossip datagram is sealed and opened with it: trust/keyring.py), ECDSA (signed
    # audit heads, revocation entries) and the X.509 layer (the bundle's checks at
    # start-up, the CA's key for revocation entries).
    "cryptography.exceptions", "cryptography.hazmat.primitives.ciphers.aead",
    "cryptography.hazmat.primitives.asymmetric.ec",
    "cryptography.hazmat.primitives.serialization", "cryptography.x509",
    "json", "tomllib",
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
W = max(36, *(len(n) for n in sys.argv[1:]))
print(f"{'step':<{W}} {'VmRSS':>8} {'anon':>8} {'file':>8} {'+MB':>6}")
last = status()[0]
print(f"{'(interpreter)':<{W}} {last / 1024:8.1f} {status()[1] / 1024:8.1f} "
      f"{status()[2] / 1024:8.1f}")
for name in sys.argv[1:]:
    __import__(name)
    gc.collect()
    rss, anon, file = status()
    print(f"{name:<{W}} {rss / 1024:8.1f} {anon / 1024:8.1f} {file / 1024:8.1f} "
          f"{(rss - last) / 1024:6.1f}")
    last = rss
import importlib.util, os
api = sys.modules.get("meshscale.core.api")
if api is not None and not os.path.exists(importlib.util.cache_from_source(api.__file__)):
    print("note: meshscale's modules were compiled from source (no __pycache__: "
          "PYTHONDONTWRITEBYTECODE?), which leaves ~1.5 MB more in an agent than an "
          "installed package's bytecode does")
"""


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in kB (empty where the kernel has none)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
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
        print(f"\n{'node':<10} {'VmRSS':>10} {'RssAnon':>10} {'RssFile':>10} {'threads':>8}"
              f" {'Pss':>10} {'SharedClean':>12}")
        pids = [x.proc.pid for x in local.nodes if x.proc is not None]
        for x, pid in zip(local.nodes, pids, strict=True):
            s = status(pid)
            r = rollup(pid)
            print(f"{x.name:<10} {s['VmRSS']:>10} {s['RssAnon']:>10} {s['RssFile']:>10} "
                  f"{s['Threads']:>8} {r.get('Pss', 0):>7} kB {r.get('Shared_Clean', 0):>9} kB")
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
