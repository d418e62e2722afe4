"""Records through placed operators, in virtual time: links with bandwidth, cores with queues.

Where an operator or a service replica runs is decided by ``core.scheduling`` (the
planner places them in a ``ComputeMesh``); what each record then goes through is this
model. A record is created at a source in a site, enters the mesh at a node of that site
(when the site has nodes), travels to the node its operator runs on, waits for a core,
is processed, and its result travels back to the source's site. Every node adds
``hop_overhead_s`` for each record it passes on.

- A link between two regions is a FIFO pipe: a record occupies it for
  ``bytes * 8 / bandwidth`` and then takes half the path's RTT (jittered) to arrive.
  Each direction is its own pipe. Inside a region the LAN is not a bottleneck.
- A node is ``cores`` FIFO servers shared by every operator placed on it.

Events are processed in (time, sequence) order from one heap and every random draw comes
from one ``random.Random`` seeded by the caller, so a run is a pure function of its inputs.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FlowRecord", "FlowRun", "Path"]


@dataclass(frozen=True, slots=True)
class Path:
    """One direction between two regions: RTT, narrowest bandwidth, egress price."""

    rtt_s: float
    bandwidth_bps: float
    price_per_byte: float = 0.0


@dataclass(slots=True)
class FlowRecord:
    """One record (or call) and what happened to it."""

    created_s: float
    site: str
    operator_node: str
    operator_region: str
    in_bytes: int
    out_bytes: int
    cpu_s: float
    done_s: float = float("inf")
    cross_region_bytes: int = 0


_ARRIVE_ENTRY, _ARRIVE_OP, _DONE, _ARRIVE_BACK = 0, 1, 2, 3


@dataclass
class FlowRun:
    """A set of nodes with cores and the paths between regions; ``run`` plays records."""

    seed: int
    cores: dict[str, int]
    """Node name -> cores."""
    region_of: dict[str, str]
    path: Callable[[str, str], Path]
    """(from region, to region) -> path, for two different regions."""
    lan_rtt_s: dict[str, float]
    site_has_nodes: set[str]
    hop_overhead_s: float = 0.001
    jitter: float = 0.1
    busy_s: dict[str, float] = field(default_factory=dict)
    """Core-seconds each node spent processing."""

    def _one_way(self, rtt_s: float, rng: random.Random) -> float:
        return 0.5 * rtt_s * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))

    def run(self, records: list[FlowRecord]) -> None:
        """Fill in ``done_s`` and ``cross_region_bytes`` of every record."""
        rng = random.Random(f"flows/{self.seed}")
        heap: list[tuple[float, int, int, int]] = []
        seq = 0
        link_free: dict[tuple[str, str], float] = {}
        core_free = {n: [0.0] * c for n, c in self.cores.items()}

        def push(t: float, kind: int, i: int) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(heap, (t, seq, kind, i))

        def travel(t: float, a: str, b: str, nbytes: int, rec: FlowRecord) -> float:
            if a == b:
                return t + self._one_way(self.lan_rtt_s.get(a, 0.0005), rng)
            p = self.path(a, b)
            start = max(t, link_free.get((a, b), 0.0))
            free = start + nbytes * 8.0 / p.bandwidth_bps
            link_free[(a, b)] = free
            rec.cross_region_bytes += nbytes
            return free + self._one_way(p.rtt_s, rng)

        for i, rec in enumerate(records):
            if rec.site in self.site_has_nodes:
                push(travel(rec.created_s, rec.site, rec.site, rec.in_bytes, rec)
                     + self.hop_overhead_s, _ARRIVE_ENTRY, i)
            else:
                push(rec.created_s, _ARRIVE_ENTRY, i)
        while heap:
            t, _, kind, i = heapq.heappop(heap)
            rec = records[i]
            if kind == _ARRIVE_ENTRY:
                if rec.operator_region == rec.site and rec.site in self.site_has_nodes:
                    push(t, _ARRIVE_OP, i)  # the site's entry node runs the operator
                    continue
                push(travel(t, rec.site, rec.operator_region, rec.in_bytes, rec)
                     + self.hop_overhead_s, _ARRIVE_OP, i)
            elif kind == _ARRIVE_OP:
                free = core_free[rec.operator_node]
                start = max(t, heapq.heappop(free))
                end = start + rec.cpu_s
                heapq.heappush(free, end)
                self.busy_s[rec.operator_node] = self.busy_s.get(rec.operator_node,
                                                                 0.0) + rec.cpu_s
                push(end, _DONE, i)
            elif kind == _DONE:
                push(travel(t, rec.operator_region, rec.site, rec.out_bytes, rec)
                     + self.hop_overhead_s, _ARRIVE_BACK, i)
            else:
                rec.done_s = t
