"""Helpers for tests that run real node processes on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from meshscale.client.rpc import ClientCredentials, call
from meshscale.core.membership import MembershipConfig, suspicion_min_timeout
from meshscale.runtime.launcher import temporary_mesh_dir
from meshscale.trust.bundle import load_bundle
from waiting import wait_for, wait_for_async

__all__ = ["wait_for", "wait_for_async"]

T = TypeVar("T")
CONFIG = MembershipConfig()


async def call_node(address: str, creds: Any, method: str, args: dict[str, Any]) -> Any:
    """One RPC to the node at ``address`` on a connection of its own (closed after)."""
    from meshscale.transport.rpc import RpcConnection

    c = RpcConnection(address, creds, 10)
    try:
        return await c.call(method, args)
    finally:
        await c.close()


host_like_dir = temporary_mesh_dir
"""A directory for a mesh that the worker user can traverse, as /var/lib is on a host
(pytest's temp dirs sit below a 0700 one), removed afterwards."""


def detection_bound(n: int, config: MembershipConfig = CONFIG) -> float:
    """Worst case from a crash to every live member marking it dead, from the config:
    someone probes it within two rounds of the random-order round robin, the probe
    period ends, the suspicion runs its longest (no confirmations), then the Dead message
    spreads (a few gossip rounds, bounded here by two probe periods) plus 1 s of slack
    for a loaded test machine."""
    first_probe = 2 * (n - 1) * config.probe_interval_s + config.probe_interval_s
    suspicion = config.suspicion_max_mult * suspicion_min_timeout(config, n)
    spread = 2 * config.probe_interval_s + math.ceil(math.log10(n + 1)) * config.gossip_interval_s
    return first_probe + suspicion + spread + 1.0


class Mesh:
    """A running mesh described by ``mesh.json``."""

    def __init__(self, mesh_json: Path) -> None:
        data = json.loads(Path(mesh_json).read_text())
        self.bundle = Path(data["bundle"])
        """The client bundle users of the mesh connect with."""
        self.admin = Path(data["admin_bundle"])
        self.nodes: list[dict[str, Any]] = data["nodes"]
        self.creds = ClientCredentials.from_bundle(load_bundle(self.bundle))
        self.extra: list[subprocess.Popen[bytes]] = []

    @property
    def n(self) -> int:
        return len(self.nodes)

    def node_bundle(self, i: int) -> Path:
        return Path(self.nodes[i]["bundle"])

    def addr(self, i: int) -> str:
        return str(self.nodes[i]["address"])

    def call(self, i: int, method: str, args: dict[str, Any] | None = None) -> Any:
        return call(self.addr(i), self.creds, method, args, timeout=3.0)

    def view(self, i: int) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.call(i, "members")}

    def stats(self, i: int) -> dict[str, Any]:
        result: dict[str, Any] = self.call(i, "stats")
        return result

    def live(self, skip: set[int] | None = None) -> list[int]:
        return [i for i in range(self.n) if i not in (skip or set())]

    def all_see(self, name: str, state: str, among: list[int], min_inc: int = -1) -> bool:
        for i in among:
            m = self.view(i).get(name)
            if m is None or m["state"] != state or m["incarnation"] < min_inc:
                return False
        return True

    def converged(self) -> bool:
        for i in range(self.n):
            v = self.view(i)
            if len(v) < self.n or sum(1 for m in v.values() if m["state"] == "alive") != self.n:
                return False
        return True

    def wait_converged(self, timeout: float = 30.0) -> None:
        wait_for(self.converged, timeout, f"{self.n} alive in every view")

    def deaths(self, among: list[int] | None = None) -> dict[int, int]:
        return {
            i: int(self.stats(i)["membership"].get("deaths", 0))
            for i in (among if among is not None else range(self.n))
        }

    def last_event_seq(self, i: int) -> int:
        events = self.call(i, "events")
        return max((e["seq"] for e in events), default=0)

    def events_since(self, i: int, seq: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(i, "events", {"since": seq})
        return result

    def probes(self, i: int) -> int:
        return int(self.stats(i)["membership"].get("probes", 0))

    def wait_protocol_time(self, among: list[int], periods: int, timeout: float) -> None:
        """Wait until every node in ``among`` has run ``periods`` more probe periods: a
        condition on the protocol's own clock rather than a sleep."""
        start = {i: self.probes(i) for i in among}
        wait_for(
            lambda: all(self.probes(i) >= start[i] + periods for i in among),
            timeout,
            f"{periods} probe periods on nodes {among}",
            poll=0.25,
        )

    def pid(self, i: int) -> int:
        return int(self.nodes[i]["pid"])

    def signal(self, i: int, sig: signal.Signals) -> None:
        os.kill(self.pid(i), sig)

    def start_node(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start an extra node process (stopped at teardown)."""
        with open(log, "ab") as f:
            p = subprocess.Popen(
                [sys.executable, "-m", "meshscale", "node", "start", *args],
                stdout=f,
                stderr=f,
                start_new_session=True,
            )
        self.extra.append(p)
        return p


ROOT = Path(__file__).resolve().parents[2]


def run_bench_quick(script: str, out: Path, timeout: float = 280,
                    args: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``bench/<script> --quick --json out [args]`` to completion; its JSON, with the
    printed table under ``"_stdout"``. Fails the test with the tail of stderr if it exits
    non-zero."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data: dict[str, Any] = json.loads(out.read_text())
    return {**data, "_stdout": proc.stdout}
