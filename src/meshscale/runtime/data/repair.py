"""The replication driver: runs ``core.replication.ReplicaManager``'s outputs (messages,
transfers, drops, tombstones, put and delete acknowledgements), pushes copies to other
members, drops and quarantines local copies, collects expired objects and advertises a
full disk."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

from meshscale.core.api import ResidencyWire
from meshscale.core.api import objects as api
from meshscale.core.audit import Kind
from meshscale.core.outputs import Event
from meshscale.core.placement import FULL_TAG, disk_full, is_full
from meshscale.core.puts import spare_may_source
from meshscale.core.replication import (
    DeleteAcked,
    DeleteFailed,
    DropLocal,
    PutAcked,
    PutFailed,
    SendMessage,
    TombstoneDropped,
    TombstoneStored,
    Transfer,
    UnderReplicated,
)
from meshscale.runtime.data.state import DataPlaneBase, _await, _small_copy
from meshscale.runtime.storage import StorageError
from meshscale.transport.rpc import RpcConnection, RpcError

UNDER_REPLICATED_LOGGED = 8
"""``UnderReplicated`` events logged one line each per batch of outputs; the rest of the
batch is one line with their count. A view change reports every held object it leaves
short of replicas, and a node holding millions must not write (and flush) a line each
on its event loop. The ``under_replicated_events`` counter still counts every one."""


class ReplicaDriver(DataPlaneBase):
    """Drives ``ReplicaManager``: ``_pump`` carries out what it decided."""

    def _hold_outputs(self) -> None:
        """Drain the replica manager's outputs now, to be carried out by the next
        ``_pump`` before the ones it has then, as if they had stayed in the manager, but
        without keeping an ``UnderReplicated`` event ``_pump`` would only count: beyond
        the first ``UNDER_REPLICATED_LOGGED`` held, they are counted, not kept. While
        start reads its store, every copy held is short of replicas in a view of this
        node alone: a million events kept until the end made a high-water mark of
        ~190 B per copy that the process never gave back (issue #24)."""
        assert self.rm is not None
        held = self._held
        logged = sum(1 for o in held if isinstance(o, UnderReplicated))
        for out in self.rm.drain():
            if isinstance(out, UnderReplicated):
                if logged >= UNDER_REPLICATED_LOGGED:
                    self._unlisted += 1
                    continue
                logged += 1
            held.append(out)

    def _pump(self) -> None:
        rm = self.rm
        if rm is None:
            return
        persisting: list[asyncio.Task[None]] = []
        held, self._held = self._held, []
        unlisted, self._unlisted = self._unlisted, 0
        under = 0
        for out in itertools.chain(held, rm.drain()):
            if isinstance(out, SendMessage):
                # A message after a tombstone in the same batch (a TombstoneAck, an offer
                # of it) leaves once the tombstone is on disk: "kept" means durable.
                self.agent.spawn(self._send_repl(out.dst, out.payload, list(persisting)))
            elif isinstance(out, Transfer):
                self.agent.spawn(self._transfer(out))
            elif isinstance(out, DropLocal):
                self.agent.spawn(self._drop(out.oid))
            elif isinstance(out, TombstoneStored | TombstoneDropped):
                task = asyncio.ensure_future(self._persist_tomb(out))
                persisting.append(task)
                self.agent.spawn(_await(task))
            elif isinstance(out, DeleteAcked):
                fut = self._deletes.pop(out.req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(out.nodes)
            elif isinstance(out, DeleteFailed):
                fut = self._deletes.pop(out.req_id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ValueError(f"delete of {out.oid} not confirmed: "
                                                 f"{out.reason}"))
            elif isinstance(out, PutAcked):
                pfut = self._puts.pop(out.req_id, None)
                if pfut is not None and not pfut.done():
                    pfut.set_result((out.oid, out.nodes))
            elif isinstance(out, PutFailed):
                pfut = self._puts.pop(out.req_id, None)
                if pfut is not None and not pfut.done():
                    pfut.set_exception(ValueError(f"put of {out.oid} failed: {out.reason}"))
            elif isinstance(out, UnderReplicated):
                self._count("under_replicated_events")
                under += 1
                if under <= UNDER_REPLICATED_LOGGED:
                    self.agent.log("warning", "under_replicated", object=out.oid,
                                   live=out.live_replicas, wanted=out.wanted)
            elif isinstance(out, Event):
                self.agent.log("info", type(out).__name__)
        if unlisted:
            self._count("under_replicated_events", unlisted)
            under += unlisted
        if under > UNDER_REPLICATED_LOGGED:
            self.agent.log("warning", "under_replicated", objects=under - UNDER_REPLICATED_LOGGED,
                           detail="more held objects with fewer live replicas than wanted "
                                  "(not listed one by one)")
        self._timer.arm(rm.next_deadline())

    def set_foreground_busy(self, busy: bool) -> None:
        """See ``ReplicaManager.set_foreground_busy``."""
        if self.rm is not None:
            self.rm.set_foreground_busy(busy, time.monotonic())
            self._pump()

    async def _repair_pace(self, nbytes: int) -> None:
        """Wait as long as ``ReplicaManager.repair_delay_s`` says before a repair copy
        sends ``nbytes`` more."""
        assert self.rm is not None
        wait = self.rm.repair_delay_s(nbytes, time.monotonic())
        if wait > 0:
            self._count("repair_paced")
            self._count("repair_paced_ms", round(wait * 1000))
            await asyncio.sleep(wait)

    def _on_timer(self) -> None:
        if self.rm is not None:
            self.rm.on_timer(time.monotonic())
        self._pump()

    async def _send_repl(self, dst: str, payload: bytes,
                         after: list[asyncio.Task[None]] | None = None) -> None:
        if after:
            await asyncio.gather(*after, return_exceptions=True)
        # Counted as sent when handed to the connection: the idle anti-entropy cost.
        self._count("repl_msgs_sent")
        self._count("repl_bytes_sent", len(payload))
        try:
            await self._call(dst, api.REPL_MSG,
                             api.ReplMsgRequest(src=self.agent.name, payload=payload))
        except (RpcError, ValueError) as e:
            self._count("repl_send_failed")
            self.agent.log("debug", "repl_send_failed", peer=dst, error=str(e))

    def _rpc_repl_msg(self, req: api.ReplMsgRequest) -> api.Done:
        assert self.rm is not None
        self.rm.handle_message(req.src, req.payload, time.monotonic())
        self._pump()
        return api.Done()

    async def _transfer(self, t: Transfer) -> None:
        ok = False
        early = None if t.req_id is None else self._early.pop((t.req_id, t.dst), None)
        if early is not None:
            ok = await asyncio.shield(early)
            if ok:
                self._count("transfers_ok")
                self._count("transfers_early")
                assert self.rm is not None
                self.rm.transfer_done(t.req_id, t.dst, t.oid, ok, time.monotonic())
                self._pump()
                return
            self._count("transfers_early_failed")  # push the bytes again, from our copy
        spare = None if t.req_id is None else self._spares.get(t.req_id)
        if spare is not None and not spare_may_source(spare.plan):
            # Our copy is a spare outside the object's residency: it can never be a source.
            self._count("transfers_refused_residency")
            assert self.rm is not None
            self.rm.transfer_done(t.req_id, t.dst, t.oid, False, time.monotonic())
            self._pump()
            return
        if spare is not None:
            assert t.req_id is not None
            await self._commit_spare(t.req_id)
        async with self._transfer_sem:
            try:
                if t.dst == self.agent.name:
                    assert self.store is not None
                    ok = await asyncio.to_thread(self.store.has, t.oid)
                else:
                    ok = await self._push_object(t)
            except (RpcError, StorageError, ValueError, OSError) as e:
                self._count("transfers_failed")
                self.agent.log("warning", "transfer_failed", object=t.oid, peer=t.dst, error=str(e))
        if ok:
            self._count("transfers_ok")
        assert self.rm is not None
        self.rm.transfer_done(t.req_id, t.dst, t.oid, ok, time.monotonic())
        self._pump()

    async def _push_object(self, t: Transfer) -> bool:
        store = self.store
        assert store is not None
        meta = await asyncio.to_thread(store.meta, t.oid)
        if meta is None:
            return False
        header = api.ReplicaHeader(
            id=t.oid, size=meta.size, replicas=t.policy.replicas,
            residency=ResidencyWire.of(t.policy.residency), hint_for=t.hint_for,
            expires=None if meta.pinned else meta.expires,
            written=t.written.encode() if t.written is not None else meta.written)
        if not meta.pinned and meta.expires is not None and meta.expires <= time.time():
            # Expired here: collect it rather than spread it.
            await self._drop(t.oid)
            return False
        conn = self._checkout(t.dst)
        try:
            return await self._send_copy(conn, t.oid, header, paced=t.req_id is None)
        except BaseException:
            await conn.close()
            raise
        finally:
            self.agent.peers.checkin(t.dst, conn)

    async def _send_copy(self, conn: RpcConnection, oid: str, header: api.ReplicaHeader,
                         paced: bool = False) -> bool:
        """Our copy of ``oid`` to the node at the other end of ``conn``; ``paced`` (a
        repair or handoff copy, not a write's) at the rate ``_repair_pace`` allows."""
        store = self.store
        assert store is not None
        if header.size <= self.cfg.inline_bytes:
            # Small object: one round trip, bytes inline, verified before sending.
            if paced:
                await self._repair_pace(header.size)
            data = await asyncio.to_thread(store.read_bytes, oid)
            await conn.request(api.RW_SMALL, _small_copy(header, data))
            self._count("bytes_sent", header.size)
            return True
        begin = await conn.request(api.RW_BEGIN, header)
        if begin.have or begin.upload is None:
            return True
        upload = begin.upload
        it = store.read_chunks(oid, verify=True, chunk_bytes=self.cfg.chunk_bytes)
        try:
            while True:
                chunk = await asyncio.to_thread(next, it, None)
                if chunk is None:
                    break
                if paced:
                    await self._repair_pace(len(chunk))
                await conn.request(api.RW_CHUNK, api.PutChunkRequest(upload=upload, data=chunk))
        except StorageError:
            # Our copy is corrupt: the receiver's commit would refuse it anyway.
            await self._quarantine(oid)
            with contextlib.suppress(RpcError):
                await conn.request(api.PUT_ABORT, api.UploadRequest(upload=upload))
            return False
        await conn.request(api.RW_END, api.UploadRequest(upload=upload))
        self._count("bytes_sent", header.size)
        return True

    async def _drop(self, oid: str) -> None:
        """Drop a local copy. Drops come in bursts (a handoff after a view change, the
        copies a coordinator outside the replica set kept), so they are removed in
        batches, one transaction (one fsync) each, instead of one commit per copy that a
        foreground put's commit would queue behind."""
        self._drops[oid] = None
        if self._dropping:
            return
        self._dropping = True
        try:
            await self._drain_drops()
        finally:
            self._dropping = False

    async def _drain_drops(self) -> None:
        assert self.store is not None and self.rm is not None
        while self._drops:
            batch = list(itertools.islice(self._drops, self.cfg.drop_batch))
            for oid in batch:
                del self._drops[oid]
                self._verified.pop(oid, None)
            try:
                removed = await asyncio.to_thread(self._delete_batch, batch)
            except StorageError:
                removed = {}
            now = time.monotonic()
            for oid in batch:
                self.rm.object_removed(oid, now)
            for oid, data_class in removed.items():
                self.agent.record(Kind.COPY_DROPPED, oid, data_class=data_class,
                                  detail="deleted" if self.rm.tombstone(oid) is not None
                                  else "not one of its holders")
            self._count("dropped", len(batch))
            self._pump()

    def _delete_batch(self, batch: list[str]) -> dict[str, str | None]:
        """Remove the copies in ``batch`` (in a thread): those removed, with their class."""
        assert self.store is not None
        classes = {}
        for oid in batch:
            meta = self.store.meta(oid)
            if meta is not None:
                classes[oid] = meta.data_class
        return {oid: classes.get(oid) for oid in self.store.delete_many(batch)}

    async def _persist_tomb(self, ev: TombstoneStored | TombstoneDropped) -> None:
        store = self.store
        assert store is not None
        async with self._tomb_lock:
            try:
                if isinstance(ev, TombstoneStored):
                    res = ev.policy.residency
                    await asyncio.to_thread(
                        store.tombstone_put, ev.oid, ev.ts.encode(), replicas=ev.policy.replicas,
                        data_class=res.data_class if res is not None else None,
                        residency=sorted(res.regions) if res is not None and res.regions is not None
                        else None, moved=ev.moved)
                    self._count("tombstones_stored")
                else:
                    await asyncio.to_thread(store.tombstone_drop, ev.oid)
            except (StorageError, ValueError) as e:
                self._count("tombstone_store_failed")
                self.agent.log("warning", "tombstone_store_failed", object=ev.oid, error=str(e))

    async def _quarantine(self, oid: str) -> None:
        assert self.store is not None and self.rm is not None
        self._verified.pop(oid, None)
        with contextlib.suppress(StorageError):
            await asyncio.to_thread(self.store.quarantine, oid)
        self.rm.object_removed(oid, time.monotonic())
        self._count("quarantined")
        self.agent.log("warning", "corrupt_copy_quarantined", object=oid)
        self.agent.record(Kind.COPY_DROPPED, oid, detail="corrupt: quarantined")
        self._pump()

    async def _check_disk(self) -> None:
        """Advertise the disk full, or not full, when that changed (``disk_full``)."""
        store = self.store
        if store is None:
            return
        try:
            free, reserve = await asyncio.to_thread(store.disk_space)
        except OSError:
            return
        was = is_full(self.agent.meta.tags)
        # A write refused since the last check makes it full even above its reserve.
        full = disk_full(free, reserve, self.cfg.disk_room_margin_bytes, was,
                         store.take_refused_bytes())
        if full == was:
            return
        self._count("disk_full_flips")
        self.agent.log("warning" if full else "info", "disk_full" if full else "disk_room",
                       free_bytes=free, reserve_bytes=reserve,
                       room_at_bytes=reserve + self.cfg.disk_room_margin_bytes)
        self.agent.set_tag(FULL_TAG, "1" if full else None)

    async def _watch_disk(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.disk_check_interval_s)
            await self._check_disk()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gc_interval_s)
            self._expire_uploads()
            store = self.store
            if store is None or self.rm is None:
                continue
            for oid in await asyncio.to_thread(store.expired, time.time()):
                with contextlib.suppress(StorageError):
                    await asyncio.to_thread(store.delete, oid)
                self._verified.pop(oid, None)
                self.rm.object_removed(oid, time.monotonic())
                self._count("gc_expired")
                self.agent.record(Kind.COPY_DROPPED, oid, detail="expired (ttl)")
            self.rm.collect_tombstones(time.time(), time.monotonic())
            self._pump()
