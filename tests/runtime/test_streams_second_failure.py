"""A dead source's shard keeps two copies (issue 23: every guarantee, 0 lost).

When a shard's source dies its backup serves the shard, a frozen prefix (only the epoch
that owned it appended). Two ways that lost acknowledged records before the surviving
holders kept the shard's copies (``StreamPlane._keep_copies``, deciding by
``core.streams.shard_copies`` / ``frozen_copy_targets``):

- a second failure: the backup was the shard's only copy, so when it died too the
  records acknowledged to producers and not yet consumed were gone;
- a switched backup: a source that passed over a failed backup (``bad_backup_s``) copied
  its later records to the next node only; if it then died, readers went to the first
  backup by the rule (``shard_holder``), which lacked them, and nobody read them.

In process and deterministic, as ``test_streams_failover_reads.py``: real
``StreamPlane`` s whose node-to-node calls go straight to each other's handlers, a
``down`` set of nodes whose copies fail, views marked dead by hand, and each round of
``_keep_copies`` run by the test (the reconcile loop runs it every
``reconcile_interval_s``). No clock is read; no sleeps.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from meshscale.core.api import streams as api
from meshscale.core.api.streams import (
    FetchReply,
    FetchRequest,
    OperatorSpec,
    PublishRecord,
    PublishRequest,
)
from meshscale.core.membership import State
from meshscale.core.placement import Candidate
from meshscale.core.streams import backup_for
from meshscale.runtime.streams import StreamConfig, StreamPlane
from meshscale.transport.rpc import RpcError
from waiting import wait_for_async

T = "t"
ZONES = (("A", "z1"), ("B", "z1"), ("C", "z2"), ("D", "z2"))


async def no_record(key: str) -> bytes | None:
    return None  # no KV here: the topics have no replicated record (no class)


def member(name: str, zone: str) -> Any:
    return SimpleNamespace(name=name, addr=f"{name}:1", state=State.ALIVE, meta=SimpleNamespace(
        region="r", zone=zone, labels={}, tags={"epoch": "1"}))


class Net:
    """Four planes, A and B in one zone (B backs A's shards up), C and D in another.
    Copies to a node in ``down`` fail (it is alive in the views: a failed copy, not yet
    a failure the views show)."""

    def __init__(self) -> None:
        self.members = {n: member(n, z) for n, z in ZONES}
        self.planes: dict[str, StreamPlane] = {}
        self.down: set[str] = set()
        spec = OperatorSpec(name="sink", topic=T, fn_id="f", fn_object="o")
        for name, m in self.members.items():
            agent: Any = SimpleNamespace(
                name=name, meta=m.meta, m=SimpleNamespace(members=self.members),
                log=lambda *a, **k: None)
            p = StreamPlane(agent, StreamConfig())
            p._call = self.caller()  # type: ignore[method-assign]
            p.local.kv_get = no_record  # type: ignore[method-assign]
            p.ops["sink"] = spec  # an operator reads the topic: its shards hold for it
            self.planes[name] = p

    def caller(self) -> Any:
        async def call(name: str, method: Any, req: Any, **_: Any) -> Any:
            if name in self.down or self.members[name].state == State.DEAD:
                raise RpcError(f"{name} does not answer", unreachable=True)
            target = self.planes[name]
            if method is api.REPLICATE:
                return await target._rpc_replicate(req)
            assert method is api.FETCH
            return await target._rpc_fetch(req)
        return call

    def kill(self, name: str) -> None:
        self.members[name].state = State.DEAD

    def live(self) -> list[StreamPlane]:
        return [p for n, p in self.planes.items() if self.members[n].state != State.DEAD]

    async def keep_copies(self) -> None:
        """One round of every live node's ``_keep_copies``."""
        for p in self.live():
            await p._keep_copies()

    def holder(self, source: str) -> StreamPlane:
        """The node readers of ``source``'s shard go to (``core.streams.shard_holder``
        from a live node's view)."""
        p = self.live()[0]
        name = p._holder(T, source, p._alive())
        assert name is not None
        return self.planes[name]


def recs(*ids: str) -> list[PublishRecord]:
    return [PublishRecord("k", i.encode(), i, 0.0) for i in ids]


async def fetch(p: StreamPlane, source: str, offset: int, committed: int | None = None
                ) -> FetchReply:
    return await p._rpc_fetch(FetchRequest(topic=T, source=source, offset=offset, wait_s=0.0,
                                           op="sink", committed=committed))


def cand(name: str) -> Candidate:
    return Candidate(name, "r", dict(ZONES)[name])


def test_a_dead_sources_shard_survives_its_backups_death() -> None:
    async def main() -> None:
        net = Net()
        a, b = net.planes["A"], net.planes["B"]
        sa = a.source_id
        acked = await a._rpc_publish(PublishRequest(topic=T, records=recs("r0", "r1", "r2")))
        assert (acked.first, acked.last) == (0, 2)
        assert b.logs[(T, sa)].head == 3  # acknowledged at two copies: A and B

        net.kill("A")
        assert net.holder(sa) is b
        await net.keep_copies()
        net.kill("B")
        holder = net.holder(sa)
        r = await fetch(holder, sa, 0)
        assert not r.missing, "the dead source's shard died with its backup"
        assert [e.rid for e in r.entries] == ["r0", "r1", "r2"]  # none of the acked lost
        # The second copy of the frozen shard was at the node next in backup_for's order,
        # the one readers go to once B is gone too.
        assert holder is net.planes[backup_for(T, cand("A"), [cand("C"), cand("D")], None)]

        # The last live node takes the new second copy...
        await net.keep_copies()
        (last,) = [p for p in net.live() if p is not holder]
        assert last.logs[(T, sa)].head == 3
        assert a.stats["unreplicated_appends"] == 0
        # ... and once the operator consumed the shard, retention drops both copies.
        await fetch(holder, sa, 3, committed=3)
        await net.keep_copies()
        for p in net.live():
            assert not p.logs[(T, sa)].entries and p.logs[(T, sa)].base == 3
        # A round with nothing new sends nothing.
        before = {id(p): p.stats["records_backed_up"] for p in net.live()}
        await net.keep_copies()
        assert {id(p): p.stats["records_backed_up"] for p in net.live()} == before

    asyncio.run(main())


def test_readers_of_a_dead_source_get_what_its_switched_backup_holds() -> None:
    async def main() -> None:
        net = Net()
        a, b = net.planes["A"], net.planes["B"]
        sa = a.source_id
        await a._rpc_publish(PublishRequest(topic=T, records=recs("r0")))
        assert b.logs[(T, sa)].head == 1

        # A copy to B fails (B alive in every view): A passes B over for bad_backup_s and
        # copies the whole shard to the next node, then acks the later records there.
        net.down.add("B")
        await a._rpc_publish(PublishRequest(topic=T, records=recs("r1", "r2")))
        net.down.clear()
        switched = a._backup_of[(T, sa)]
        assert switched in {"C", "D"} and a.stats["unreplicated_appends"] == 0
        assert net.planes[switched].logs[(T, sa)].head == 3
        assert b.logs[(T, sa)].head == 1  # stale

        # A dies within bad_backup_s: the rule sends readers to B, the nearest.
        net.kill("A")
        assert net.holder(sa) is b
        await net.keep_copies()
        r = await fetch(b, sa, 0)
        assert [e.rid for e in r.entries] == ["r0", "r1", "r2"], \
            "readers of the dead source's shard miss what its switched backup holds"
        # Both copies the rule wants now hold all of it, and a copy outside them went.
        copies = [p for p in net.live() if (T, sa) in p.logs]
        second = backup_for(T, cand("A"), [cand("C"), cand("D")], None)
        assert {p.agent.name for p in copies} == {"B", second}
        assert all(p.logs[(T, sa)].head == 3 for p in copies)

    asyncio.run(main())


def test_a_copy_outside_the_rule_is_handed_to_both_copies_then_dropped() -> None:
    """The source passed over B and then C: its records went to D, which is neither of
    the two copies the rule wants once the source dies (B, then C or D by HRW; here D
    is made the one outside them). D sends them to both, then drops its own copy."""

    async def main() -> None:
        net = Net()
        a = net.planes["A"]
        sa = a.source_id
        second = backup_for(T, cand("A"), [cand("C"), cand("D")], None)
        other = "D" if second == "C" else "C"
        await a._rpc_publish(PublishRequest(topic=T, records=recs("r0")))
        net.down |= {"B", second}
        await a._rpc_publish(PublishRequest(topic=T, records=recs("r1", "r2")))
        net.down.clear()
        assert a._backup_of[(T, sa)] == other

        net.kill("A")
        await net.keep_copies()
        await net.keep_copies()
        holder = net.holder(sa)
        assert holder.agent.name == "B"
        assert [e.rid for e in (await fetch(holder, sa, 0)).entries] == ["r0", "r1", "r2"]
        assert net.planes[second].logs[(T, sa)].head == 3
        assert (T, sa) not in net.planes[other].logs
        assert net.planes[other].stats["frozen_copies_handed_over"] == 1

    asyncio.run(main())


def test_a_copy_lost_in_a_restart_is_made_again() -> None:
    """The second copy's node restarts (a new epoch, empty in-memory logs): the holder,
    which knows each copy it made by the run of the node that took it, makes it again."""

    async def main() -> None:
        net = Net()
        a, b = net.planes["A"], net.planes["B"]
        sa = a.source_id
        await a._rpc_publish(PublishRequest(topic=T, records=recs("r0", "r1")))
        net.kill("A")
        await net.keep_copies()
        second = backup_for(T, cand("A"), [cand("C"), cand("D")], None)
        assert second is not None and net.planes[second].logs[(T, sa)].head == 2

        # The restart: a new plane, a new epoch in the views.
        net.members[second].meta.tags["epoch"] = "2"
        fresh = StreamPlane(net.planes[second].agent, StreamConfig())
        fresh._call = net.caller()  # type: ignore[method-assign]
        fresh.local.kv_get = no_record  # type: ignore[method-assign]
        net.planes[second] = fresh
        await net.keep_copies()
        assert (T, sa) in fresh.logs, "the holder took the restarted node's copy as made"
        assert [e.rid for e in fresh.logs[(T, sa)].entries] == ["r0", "r1"]
        assert b.stats["frozen_records_copied"] == 4

    asyncio.run(main())


def test_the_reconcile_loop_keeps_the_copies() -> None:
    """The rounds run beside each node's reconcile loop (not only when a test calls
    them): with A dead, B's loop makes the second copy."""

    async def main() -> None:
        net = Net()
        a = net.planes["A"]
        sa = a.source_id
        await a._rpc_publish(PublishRequest(topic=T, records=recs("r0")))
        net.kill("A")
        second = backup_for(T, cand("A"), [cand("C"), cand("D")], None)
        assert second is not None
        loops = []
        for p in net.live():
            p.cfg = StreamConfig(reconcile_interval_s=0.01)
            loops.append(asyncio.ensure_future(p._reconcile_loop()))

        async def copied() -> bool:
            return (T, sa) in net.planes[second].logs

        try:
            await wait_for_async(copied, 30, "the second copy of the dead source's shard")
        finally:
            for p in net.live():
                await p.stop()
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    asyncio.run(main())
