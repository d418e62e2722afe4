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

A record with a ``runner`` (a stream record) goes through the stream plane's pull
protocol instead, as ``runtime.streams`` runs it:

- it is published to a node of its site (one hop) and waits in that node's shard;
- the operator's runner long-polls the shard: a fetch travels to the shard's node
  (half the path's RTT; nothing when the runner runs on the site, as near-source), takes
  every record waiting there up to the record's ``batch_records`` at once (or waits for the next one,
  at most ``fetch_wait_s``, then comes back empty), and travels back; the runner sends
  its next fetch only once the batch is processed. So a record that lands while the
  fetch is on its way back, or while the batch is processed, waits for the next round
  trip: up to one RTT plus one batch's time more than a push would take;
- the runner runs the whole batch as one call on a core of its node, costing
  ``batch_cpu_s`` (fixed per call) plus every record's own ``cpu_s``, plus one hop for
  handing the batch to a worker process;
- the runner appends a batch's results to its node's shard of the output topic (the
  consumer's node's long-poll takes them at once) and sends its next fetch at once:
  their copy to the shard's backup (a node of its region: a hop and a LAN round trip)
  travels beside the loop and costs one hop of CPU, and holds only what the runner
  commits, not its next fetch (``runtime.streams`` ``_read_shard``, issue 23; before,
  the runner waited for the copy, 1 to 8 ms a round in issue 17's traces of the live
  demo). A runner fetching from a remote holder sends that fetch without a long-poll
  (it would carry no commit): when the shard is empty it comes back at once, and the
  runner fetches again, long-polling, once the copy is done: a record landing in
  between waits for that second fetch, up to one RTT more;
- the results go to the record's ``result_site``, where the consumer reads through a
  node (``reader_node``); how it reads each output shard is ``core.streams
  .direct_reads``'s rule, as the runtime's subscription follows it (issue 23): a shard
  held by another node of the consumer's node's region is read at its holder (the
  holder answers the subscriber's long-poll at the append: one hop, nothing between);
  one held by the consumer's node itself comes through its in-process follower (no
  message) and the node answers the read (one hop); any other (held in another region,
  or past ``MAX_DIRECT_HOLDERS``) is pulled by the consumer's node's follower
  (``follow_wait_s``, up to ``follow_records`` at once; a fetch answered node to node,
  ``fetch_hop_s``) and the node then answers the read (one hop). Runners on one node
  append to its one shard of the output topic, which one follower (or direct read)
  pulls: with one runner, the next fetch comes back in step with its batches; with two
  (shards whose runners ``core.streams.place_operator`` put on one node), the other's
  results land while the fetch travels back and wait for its next one, up to one RTT
  (issue 17's traces of the live demo: 30 ms on average across 60 ms).

``hop_overhead_s`` is the software time of one hop (an RPC between a client and a node,
a hand-off to a worker: framing, TLS, the event loop, pickling). ``fetch_hop_s`` is that
of a fetch one node answers another (a follower's, a remote runner's: ``stream.fetch``).
Their values are not guesses: ``bench/stream_hop.py`` measures both on the machine that
runs the mesh, the first on a path of three such hops (publish, hand-off, a read at the
holder), the second as what a read through a follower adds to a read at the holder of
the same records in the same run (issue 17's third calibration: 0.79 to 1.92 ms, the
median of 14 runs each, under load; a client's hop there took 1.0 to 1.9 ms).

On a loaded machine a hop's time is not one number: most hops take about the median, a
few wait for a core for tens of milliseconds (issue 17: the near-source p99 measured
35.0 ms where constant hops predicted 14.1). ``hop_quantiles_s`` (and
``fetch_hop_quantiles_s``) give a hop's time as a distribution, points (quantile level,
seconds) of its inverse CDF: each hop then draws its own time from it (``draw``), from
a random stream of its own, so the other draws (the links' jitter) are the same with or
without it. Empty (the default): every hop takes the constant.

Events are processed in (time, sequence) order from one heap and every random draw comes
from ``random.Random``s seeded by the caller's seed (one for the links, one for the hops),
so a run is a pure function of its inputs.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

from meshscale.core.streams import direct_reads

__all__ = ["FlowRecord", "FlowRun", "Path", "Quantiles", "draw"]

Quantiles = tuple[tuple[float, float], ...]
"""Points (quantile level in [0, 1], value) of an inverse CDF, levels increasing and values
not decreasing."""


def draw(points: Quantiles, u: float) -> float:
    """The value at quantile level ``u`` of the distribution ``points`` describes: linear
    between two points, the first point's value below it and the last's above it (no
    extrapolation beyond what was measured)."""
    if u <= points[0][0]:
        return points[0][1]
    for (l0, v0), (l1, v1) in pairwise(points):
        if u <= l1:
            return v0 if l1 <= l0 else v0 + (v1 - v0) * (u - l0) / (l1 - l0)
    return points[-1][1]


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
    runner: str = ""
    """The operator runner (one per operator shard) that pulls this record; empty for a
    call, which is pushed to its replica and answered."""
    batch_cpu_s: float = 0.0
    """Fixed CPU cost of one operator call on a batch (a stream record)."""
    batch_records: int = 256
    """Records its runner fetches, and runs as one call, at most (``OperatorSpec.batch``)."""
    result_site: str = ""
    """Where a stream record's result is consumed ("": its own ``site``)."""


@dataclass(slots=True)
class _Puller:
    """One long-poll loop: a runner pulling a shard, or a consumer's node pulling results."""

    holder_region: str
    puller_region: str
    local: bool
    """Puller and holder are the same node (a fetch is an in-process call)."""
    node: str
    """The runner's node (where its batches run); for a follower, the holder's."""
    limit: int
    pending: deque[int] = field(default_factory=deque)
    waiting: bool = False
    gen: int = 0
    batch: list[int] = field(default_factory=list)
    copied_s: float = -1.0
    """A remote runner's fetch sent while its last outputs' copy travels (until this
    time) does not long-poll (``runtime.streams`` ``_read_shard``); -1: no such copy."""
    direct: bool = False
    """A subscriber reading at the holder (``core.streams.direct_reads``): the answer is
    the delivery, a hop (``hop_overhead_s``); else a runner or a consumer's node's
    follower, whose fetch the holder answers node to node (``fetch_hop_s``)."""


_ARRIVE_ENTRY, _ARRIVE_OP, _DONE, _ARRIVE_BACK = 0, 1, 2, 3
_AT_SHARD, _FETCH, _FETCH_TIMEOUT, _BATCH, _APPLIED, _FOLLOW, _FOLLOW_TIMEOUT, \
    _RESULTS_BACK = 4, 5, 6, 7, 8, 9, 10, 11
_HOST_DONE = 12
_POLLS = frozenset({_FETCH, _FETCH_TIMEOUT, _FOLLOW, _FOLLOW_TIMEOUT})


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
    fetch_wait_s: float = 0.5
    """How long a runner's fetch waits at the shard for a record (``StreamConfig``)."""
    follow_records: int = 1024
    """Results a consumer's node fetches at once (``runtime.streams.FOLLOW_BATCH``)."""
    follow_wait_s: float = 0.5
    fetch_hop_s: float | None = None
    """Software time of a fetch one node answers another (a follower's, a remote
    runner's); None: ``hop_overhead_s``. ``bench/stream_hop.py`` measures it."""
    reader_node: dict[str, str] = field(default_factory=dict)
    """Result site -> the node its consumer reads through (missing: a node that holds no
    output shard, of that region)."""
    hop_cpu_s: float = 0.0
    """CPU one hop of a stream message costs the shared host (``host_cores`` above 0):
    publishing a record, a fetch's reply, handing a batch to a worker, a consumer's read.
    It slows the operators running then; ``bench/stream_hop.py`` measures it."""
    host_cores: float = 0.0
    """0: every node has its own ``cores``. Above 0: every node runs on one host with this
    many cores (several node processes on one machine, as ``meshscale up`` runs them):
    each job then starts at once and all running jobs share the host's cores equally
    (processor sharing), none faster than one core, with ``host_background_jobs``."""
    host_background_jobs: float = 0.0
    """With ``host_cores``: threads of other work runnable on the host, on average (its run
    queue less the mesh's own). The host's scheduler shares its cores among every
    runnable thread alike (CFS), so they take their share as the mesh's jobs do: with
    ``b`` of them and ``n`` jobs running, each job runs at ``host_cores / (n + b)`` of a
    core once ``n + b`` is above ``host_cores``. ``bench/plan_calibration.py`` measures
    it (``background_jobs``). 0: the host runs nothing else."""
    hop_quantiles_s: Quantiles = ()
    """A hop's software time as a distribution (``Quantiles``, seconds): each hop draws its
    own; () (the default): every hop takes ``hop_overhead_s``. ``bench/stream_hop.py``
    measures it (its ``hop_quantiles_ms``)."""
    fetch_hop_quantiles_s: Quantiles = ()
    """The same for a fetch one node answers another; (): ``fetch_hop_s`` when set, else a
    hop's (its distribution when ``hop_quantiles_s`` is set)."""
    busy_s: dict[str, float] = field(default_factory=dict)
    """Core-seconds each node spent processing."""
    hop_messages: int = 0
    """Stream messages charged ``hop_cpu_s`` in the run (a shared host only)."""

    def _one_way(self, rtt_s: float, rng: random.Random) -> float:
        return 0.5 * rtt_s * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))

    def run(self, records: list[FlowRecord]) -> None:
        """Fill in ``done_s`` and ``cross_region_bytes`` of every record."""
        rng = random.Random(f"flows/{self.seed}")
        hop_rng = random.Random(f"flows-hops/{self.seed}")
        heap: list[tuple[float, int, int, int]] = []
        seq = 0
        link_free: dict[tuple[str, str], float] = {}
        core_free = {n: [0.0] * c for n, c in self.cores.items()}
        left = 0
        hops = self.hop_quantiles_s
        const_hop = self.hop_overhead_s
        if self.fetch_hop_quantiles_s:
            fetch_hops: Quantiles = self.fetch_hop_quantiles_s
            const_fetch = 0.0
        elif self.fetch_hop_s is not None:
            fetch_hops, const_fetch = (), self.fetch_hop_s
        else:
            fetch_hops, const_fetch = hops, const_hop

        def hop() -> float:
            """One hop's software time: drawn when the plan gives its distribution."""
            return draw(hops, hop_rng.random()) if hops else const_hop

        def fetch_hop() -> float:
            """One fetch answered node to node."""
            return draw(fetch_hops, hop_rng.random()) if fetch_hops else const_fetch

        def push(t: float, kind: int, i: int) -> None:
            nonlocal seq
            if kind in _POLLS and not left:
                return  # every stream record is back: the pullers stop
            seq += 1
            heapq.heappush(heap, (t, seq, kind, i))

        def one_way(a: str, b: str) -> float:
            if a == b:
                return self._one_way(self.lan_rtt_s.get(a, 0.0005), rng)
            return self._one_way(self.path(a, b).rtt_s, rng)

        def send(t: float, a: str, b: str, nbytes: int) -> float:
            """When ``nbytes`` sent from region ``a`` at ``t`` have arrived in ``b``."""
            if a == b:
                return t + one_way(a, a)
            p = self.path(a, b)
            start = max(t, link_free.get((a, b), 0.0))
            free = start + nbytes * 8.0 / p.bandwidth_bps
            link_free[(a, b)] = free
            return free + self._one_way(p.rtt_s, rng)

        def travel(t: float, a: str, b: str, nbytes: int, rec: FlowRecord) -> float:
            if a != b:
                rec.cross_region_bytes += nbytes
            return send(t, a, b, nbytes)

        # Stream records: one puller per runner (it pulls the site's shard) and one per
        # (result site, runner node) for the results: the consumer's read at the holder,
        # or its node's follower, by ``core.streams.direct_reads``'s rule.
        held_for: dict[str, set[str]] = {}
        for rec in records:
            if rec.runner:
                held_for.setdefault(rec.result_site or rec.site, set()).add(rec.operator_node)
        direct: set[tuple[str, str]] = set()
        for dest, holders in held_for.items():
            me = self.reader_node.get(dest, "")
            shards = [(h, h, self.region_of.get(h)) for h in sorted(holders)]
            direct |= {(dest, h) for h in direct_reads(me, dest, shards)}
        pullers: list[_Puller] = []
        runner_of: dict[str, int] = {}
        follower_of: dict[tuple[str, str], int] = {}
        rec_runner: list[int] = []
        rec_follower: list[int] = []
        for rec in records:
            if not rec.runner:
                rec_runner.append(-1)
                rec_follower.append(-1)
                continue
            holder = rec.site if rec.site in self.site_has_nodes else rec.operator_region
            r = runner_of.get(rec.runner)
            if r is None:
                r = runner_of[rec.runner] = len(pullers)
                pullers.append(_Puller(holder, rec.operator_region,
                                       holder == rec.operator_region, rec.operator_node,
                                       max(1, rec.batch_records)))
            dest = rec.result_site or rec.site
            key = (dest, rec.operator_node)
            f = follower_of.get(key)
            if f is None:
                f = follower_of[key] = len(pullers)
                at_holder = key in direct
                pullers.append(_Puller(
                    rec.operator_region, dest,
                    rec.operator_node == self.reader_node.get(dest), rec.operator_node,
                    max(1, self.follow_records), direct=at_holder))
            rec_runner.append(r)
            rec_follower.append(f)
        followers = set(follower_of.values())
        # The shared host (``host_cores``): running jobs' CPU seconds left, what each one
        # does when it ends, and the time the amounts were last brought up to date.
        active: dict[int, float] = {}
        then: dict[int, tuple[float, int, int] | None] = {}
        host_t = 0.0
        host_gen = 0
        jobs = 0

        background = max(0.0, self.host_background_jobs)

        def host_rate() -> float:
            running = len(active) + background
            return 1.0 if running <= self.host_cores else self.host_cores / running

        def host_advance(t: float) -> None:
            nonlocal host_t
            done = (t - host_t) * host_rate()
            for j in active:
                active[j] -= done
            host_t = t

        def host_next(t: float) -> None:
            nonlocal host_gen
            host_gen += 1
            if active:
                push(t + max(0.0, min(active.values())) / host_rate(), _HOST_DONE, host_gen)

        def run_job(t: float, node: str, cpu: float, extra: float, kind: int, i: int) -> None:
            """``cpu`` seconds of work on ``node`` from ``t``; at its end plus ``extra``,
            event ``kind`` for ``i``."""
            nonlocal jobs
            self.busy_s[node] = self.busy_s.get(node, 0.0) + cpu
            if self.host_cores <= 0:
                free = core_free[node]
                end = max(t, heapq.heappop(free)) + cpu
                heapq.heappush(free, end)
                push(end + extra, kind, i)
                return
            host_advance(t)
            jobs += 1
            active[jobs] = cpu
            then[jobs] = (extra, kind, i)
            host_next(t)

        def host_done(t: float, gen: int) -> None:
            if gen != host_gen:
                return
            host_advance(t)
            for j in [j for j, left_s in active.items() if left_s <= 1e-9]:
                del active[j]
                action = then.pop(j)
                if action is not None:
                    extra, kind, i = action
                    push(t + extra, kind, i)
            host_next(t)

        def hop_cpu(t: float, messages: int = 1) -> None:
            """The host's CPU for ``messages`` hops at ``t`` (a shared host only): work that
            slows every job running then, while the hop's own delay is ``hop_overhead_s``."""
            nonlocal jobs
            if self.host_cores <= 0 or self.hop_cpu_s <= 0:
                return
            self.hop_messages += messages
            host_advance(t)
            jobs += 1
            active[jobs] = self.hop_cpu_s * messages
            then[jobs] = None
            host_next(t)
        left = sum(1 for r in rec_runner if r >= 0)
        """Stream records not yet back: pullers stop polling once it is 0."""
        for k, pl in enumerate(pullers):
            first = 0.0 if pl.local else one_way(pl.puller_region, pl.holder_region)
            push(first, _FOLLOW if k in followers else _FETCH, k)

        def reply(t: float, k: int) -> None:
            """The fetch waiting at ``k``'s holder takes what is there and goes back."""
            pl = pullers[k]
            pl.waiting = False
            pl.gen += 1
            batch = [pl.pending.popleft() for _ in range(min(pl.limit, len(pl.pending)))]
            pl.batch = batch
            nbytes = 0
            for j in batch:
                rec = records[j]
                b = rec.out_bytes if k in followers else rec.in_bytes
                nbytes += b
                if pl.holder_region != pl.puller_region:
                    rec.cross_region_bytes += b
            if pl.local:
                push(t, _RESULTS_BACK if k in followers else _BATCH, k)
                return
            back = send(t, pl.holder_region, pl.puller_region, nbytes) + (
                hop() if pl.direct else fetch_hop())
            push(back, _RESULTS_BACK if k in followers else _BATCH, k)

        def arrive(t: float, k: int, js: list[int]) -> None:
            """Records ``js`` are appended to ``k``'s shard together."""
            pl = pullers[k]
            pl.pending.extend(js)
            if pl.waiting:
                reply(t, k)

        def fetch(t: float, k: int, timeout_kind: int, wait_s: float) -> None:
            pl = pullers[k]
            copying = pl.copied_s
            pl.copied_s = -1.0
            if pl.pending:
                reply(t, k)
            elif copying >= 0.0:
                # Sent while its outputs' copy travelled: this fetch carries no commit
                # and does not wait. It comes back empty; the runner waits for the copy,
                # then fetches again (that one long-polls).
                back = t + one_way(pl.holder_region, pl.puller_region)
                push(max(back, copying) + one_way(pl.puller_region, pl.holder_region),
                     _FETCH, k)
            else:
                pl.waiting = True
                push(t + wait_s, timeout_kind, k * 1_000_000 + pl.gen % 1_000_000)

        def timed_out(t: float, code: int, next_kind: int) -> None:
            k, gen = divmod(code, 1_000_000)
            pl = pullers[k]
            if not pl.waiting or pl.gen % 1_000_000 != gen:
                return
            pl.waiting = False
            pl.gen += 1
            if pl.local:
                push(t, next_kind, k)
            else:
                back = t + one_way(pl.holder_region, pl.puller_region)
                push(back + one_way(pl.puller_region, pl.holder_region), next_kind, k)

        for i, rec in enumerate(records):
            if rec.runner:
                pl = pullers[rec_runner[i]]
                if rec.site in self.site_has_nodes:
                    t_in = travel(rec.created_s, rec.site, rec.site, rec.in_bytes, rec) + hop()
                else:
                    t_in = travel(rec.created_s, rec.site, pl.holder_region, rec.in_bytes,
                                  rec) + hop()
                push(t_in, _AT_SHARD, i)
            elif rec.site in self.site_has_nodes:
                push(travel(rec.created_s, rec.site, rec.site, rec.in_bytes, rec)
                     + hop(), _ARRIVE_ENTRY, i)
            else:
                push(rec.created_s, _ARRIVE_ENTRY, i)
        while heap:
            t, _, kind, i = heapq.heappop(heap)
            if kind >= _AT_SHARD:
                if kind == _AT_SHARD:
                    hop_cpu(t)  # the publish
                    arrive(t, rec_runner[i], [i])
                elif kind == _FETCH:
                    fetch(t, i, _FETCH_TIMEOUT, self.fetch_wait_s)
                elif kind == _FETCH_TIMEOUT:
                    timed_out(t, i, _FETCH)
                elif kind == _BATCH:
                    pl = pullers[i]
                    hop_cpu(t, 1 if pl.local else 2)  # (the fetch's reply,) the hand-off
                    cpu = records[pl.batch[0]].batch_cpu_s + sum(
                        records[j].cpu_s for j in pl.batch)
                    run_job(t, pl.node, cpu, hop(), _APPLIED, i)
                elif kind == _APPLIED:
                    pl = pullers[i]
                    outputs: dict[int, list[int]] = {}
                    for j in pl.batch:  # a batch's results are appended in one go
                        outputs.setdefault(rec_follower[j], []).append(j)
                    for f, js in outputs.items():
                        arrive(t, f, js)
                    pl.batch = []
                    # The outputs' copy to their backup (a node of the runner's region)
                    # costs a hop of CPU and travels beside the runner, which fetches
                    # again at once; a remote holder's fetch then does not long-poll.
                    hop_cpu(t)
                    if pl.local:
                        push(t, _FETCH, i)
                    else:
                        pl.copied_s = t + hop() + 2 * one_way(pl.puller_region,
                                                            pl.puller_region)
                        push(t + one_way(pl.puller_region, pl.holder_region), _FETCH, i)
                elif kind == _HOST_DONE:
                    host_done(t, i)
                elif kind == _FOLLOW:
                    fetch(t, i, _FOLLOW_TIMEOUT, self.follow_wait_s)
                elif kind == _FOLLOW_TIMEOUT:
                    timed_out(t, i, _FOLLOW)
                else:  # _RESULTS_BACK: at the consumer (direct) or at its node
                    pl = pullers[i]
                    if pl.direct:
                        hop_cpu(t)  # the holder's answer to the subscriber's read
                        done = t
                    else:
                        # (the follower's fetch reply, unless in-process,) the node's
                        # answer to the consumer's read
                        hop_cpu(t, 1 if pl.local else 2)
                        done = t + one_way(pl.puller_region, pl.puller_region) + hop()
                    for j in pl.batch:
                        records[j].done_s = done
                    left -= len(pl.batch)
                    pl.batch = []
                    push(t if pl.local else t + one_way(pl.puller_region, pl.holder_region),
                         _FOLLOW, i)
                continue
            rec = records[i]
            if kind == _ARRIVE_ENTRY:
                if rec.operator_region == rec.site and rec.site in self.site_has_nodes:
                    push(t, _ARRIVE_OP, i)  # the site's entry node runs the operator
                    continue
                push(travel(t, rec.site, rec.operator_region, rec.in_bytes, rec)
                     + hop(), _ARRIVE_OP, i)
            elif kind == _ARRIVE_OP:
                run_job(t, rec.operator_node, rec.cpu_s, 0.0, _DONE, i)
            elif kind == _DONE:
                push(travel(t, rec.operator_region, rec.site, rec.out_bytes, rec)
                     + hop(), _ARRIVE_BACK, i)
            else:
                rec.done_s = t
