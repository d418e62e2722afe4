"""Puts: client uploads (``obj.put_*``), replica transfers received from other members
(``obj.rw_*``), the put's coordination (placement check, W acknowledgements), cut-through
forwards of a put's chunks to the replica set as they arrive, and spare copies of puts
coordinated outside the replica set."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshscale.core.api import ApiError, ErrorCode, ResidencyWire
from meshscale.core.api import objects as api
from meshscale.core.audit import Kind
from meshscale.core.hlc import ClockSkewError
from meshscale.core.objects import object_id
from meshscale.core.placement import PlacementError
from meshscale.core.policy import PolicyError, Rule, copy_refusal, resolve, stored_rule
from meshscale.core.puts import SpareFate, put_refusal, spare_fate
from meshscale.core.replication import ObjectPolicy
from meshscale.runtime.data.state import (
    DataPlaneBase,
    _Forward,
    _policy,
    _small_copy,
    _Spare,
    _stamp,
    _storage_error,
    _Upload,
)
from meshscale.runtime.storage import ObjectMeta, StorageError
from meshscale.transport.rpc import RpcConnection, RpcError


def _class(policy: ObjectPolicy) -> str | None:
    return None if policy.residency is None else policy.residency.data_class


def _planned(up: _Upload) -> int:
    """Copies a put aimed for: its plan's write set (0 when it was planned elsewhere)."""
    return len(up.plan.targets) if up.plan is not None else 0


@dataclass(frozen=True)
class _UploadSpec:
    """An upload as asked for (a client put's or a replica transfer's header)."""

    size: int
    policy: ObjectPolicy
    w: int
    oid: str | None
    hint_for: str | None = None
    ttl_s: float | None = None
    expires: float | None = None
    written: str | None = None
    allow_degraded: bool = True
    """A client put that said it accepts fewer copies than ``replicas`` for now."""


class Uploads(DataPlaneBase):
    """Uploads open on this node and the puts it coordinates."""

    async def _client_spec(self, size: int, replicas: int | None, w: int | None,
                           residency: ResidencyWire | None, oid: str | None,
                           ttl_s: float | None, allow_degraded: bool) -> _UploadSpec:
        """What a client put asks for, its data class's policy resolved here, where the put
        is coordinated (``core.policy.resolve``), and checked against this node's bounds."""
        data_class = None if residency is None else residency.data_class
        explicit = Rule(regions=None if residency is None or residency.regions is None
                        else frozenset(residency.regions), replicas=replicas, ttl_s=ttl_s)
        policies = await self._policies_for([data_class])
        try:
            resolved = resolve(data_class, explicit, policies)
        except PolicyError as e:
            if e.rule == "malformed":
                raise ApiError(ErrorCode.INVALID, str(e)) from None
            if e.rule != "widens" or data_class is None:
                raise self._refuse(e.rule, str(e), data_class=data_class) from None
            # The cached rule may be older than the caller's (a task's result, put by a
            # runner an owner placed under a policy it read since): a refusal for
            # widening is confirmed by a fresh read of the class's policy first.
            with contextlib.suppress(ApiError, PolicyError, ValueError):
                await self._policy_fetch(data_class)
            try:
                resolved = resolve(data_class, explicit, self.policies)
            except PolicyError as again:
                raise self._refuse(again.rule, str(again), data_class=data_class) from None
        n = resolved.rule.replicas if resolved.rule.replicas is not None else 3
        ttl_s = resolved.rule.ttl_s
        if n > self.cfg.max_replicas:
            raise ApiError(ErrorCode.INVALID, f"replicas must be at most "
                                              f"{self.cfg.max_replicas}, not {n}")
        if w is not None and w > n:
            raise ApiError(ErrorCode.INVALID, f"w must be from 1 to replicas ({n}), "
                                              f"not {w}")
        if ttl_s is not None and ttl_s > self.cfg.max_ttl_s:
            raise ApiError(ErrorCode.INVALID, f"ttl_s must be in (0, {self.cfg.max_ttl_s:g}], "
                                              f"got {ttl_s:g}")
        return _UploadSpec(size, ObjectPolicy(n, resolved.residency()),
                           min(2, n) if w is None else w, oid, ttl_s=ttl_s,
                           allow_degraded=allow_degraded)

    @staticmethod
    def _replica_spec(h: api.ReplicaHeader) -> _UploadSpec:
        return _UploadSpec(h.size, _policy(h.replicas, h.residency), min(2, h.replicas), h.id,
                           hint_for=h.hint_for, expires=h.expires, written=h.written)

    def _new_upload(self, spec: _UploadSpec, *, client: bool, early: bool = False) -> str:
        """A new upload. A client put whose id is known is planned here, once
        (``ReplicaManager.plan_put``); ``early``: its copies leave while the bytes arrive
        (cut-through, or a small put's copies sent while this node commits its own)."""
        assert self.store is not None and self.rm is not None
        self._expire_uploads()
        if len(self._uploads) >= self.cfg.max_uploads:
            raise ApiError(ErrorCode.BUSY, f"busy: {self.cfg.max_uploads} uploads already open")
        policy = spec.policy
        if not client:
            # The receiver checks the rule itself, the copy's and its class's as this node
            # knows it: a replica outside them is never written.
            why = copy_refusal(self.agent.meta.region, policy.residency, self.policies)
            if why is not None:
                self._count("replicas_refused_residency")
                res = policy.residency
                raise self._refuse("residency", why, subject=spec.oid or "",
                                   data_class=None if res is None else res.data_class)
            # Kept under its rule narrowed to the class's regions as this node knows them:
            # a sender that has not heard of a narrowing still sends the wider rule.
            kept = stored_rule(policy.residency, self.policies)
            if kept is not policy.residency:
                self._count("replica_rules_narrowed")
                policy = ObjectPolicy(policy.replicas, kept)
        plan = None
        if client:
            try:
                if spec.oid is None:
                    self.rm.check_put(policy, spec.w, allow_degraded=spec.allow_degraded)
                else:
                    plan = self.rm.plan_put(spec.oid, policy, spec.w, early_copies=early,
                                            allow_degraded=spec.allow_degraded)
            except PlacementError as e:
                why = f"refused: {put_refusal(e)}"
                self.agent.record(Kind.REFUSAL, spec.oid or "", data_class=_class(policy),
                                  detail=why)
                raise ApiError(ErrorCode.REFUSED, why) from None
        now = time.time()
        ttl_s = spec.ttl_s
        if ttl_s is None and spec.expires is not None:
            # A replica of an object with a TTL: same expiry on every copy.
            ttl_s = spec.expires - now
            if ttl_s <= 0:
                raise ApiError(ErrorCode.INVALID, f"expired: {spec.oid} expired before it arrived")
        written = self._write_stamp(spec, client, now)
        res = policy.residency
        try:
            writer = self.store.writer(
                written=written, now=now, size=spec.size, replicas=policy.replicas,
                data_class=res.data_class if res is not None else None,
                residency=(sorted(res.regions) if res is not None and res.regions is not None
                           else None),
                hint_for=spec.hint_for, pinned=ttl_s is None, ttl_s=ttl_s,
            )
        except StorageError as e:  # a full disk refuses the write, naming the bound
            raise _storage_error(e) from None
        upload = f"{self.agent.name}-{next(self._upload_ids)}"
        self._uploads[upload] = _Upload(writer, spec.size, policy, spec.w, spec.oid,
                                        spec.hint_for, client,
                                        expires=None if ttl_s is None else now + ttl_s,
                                        plan=plan)
        return upload

    def _write_stamp(self, spec: _UploadSpec, client: bool, now: float) -> str | None:
        """The write's HLC time: a client put's is now (a delete before it loses); a
        replica's is the coordinator's, refused if a delete we know of came after it."""
        if client:
            return self.hlc.now(now).encode()
        if spec.written is None:
            return None
        stamp = _stamp(spec.written)
        if stamp is None:
            raise ApiError(ErrorCode.INVALID, f"bad write timestamp {spec.written!r:.80}")
        assert self.rm is not None
        if not self.rm.accepts(str(spec.oid), stamp):
            self._count("deleted_copies_refused")
            raise ApiError(ErrorCode.INVALID,
                           f"deleted: {spec.oid} was deleted after this copy was written")
        return spec.written

    def _expire_uploads(self) -> None:
        now = time.monotonic()
        for key, up in list(self._uploads.items()):
            if now - up.last > self.cfg.upload_idle_s:
                self._drop_upload(key, up)
                self._count("uploads_expired")

    def _upload(self, key: str) -> tuple[str, _Upload]:
        up = self._uploads.get(key)
        if up is None:
            raise ValueError(f"unknown or expired upload {key!r}")
        return key, up

    def _drop_upload(self, key: str, up: _Upload) -> None:
        self._uploads.pop(key, None)
        self._abort_upload(up)

    def _abort_upload(self, up: _Upload) -> None:
        """Nothing of this upload remains: its copies in flight are stopped and the temp
        file goes once the write still running in a thread (if any) has returned."""
        for fwd in up.forwards.values():
            self._stop_forward(fwd)
            if up.req is not None:
                self._early.pop((up.req, fwd.dst), None)
        pending, up.pending = up.pending, None
        if pending is not None and not pending.done():
            def abort(fut: asyncio.Future[None]) -> None:
                if not fut.cancelled():
                    fut.exception()  # retrieved: the upload is gone anyway
                up.writer.abort()

            pending.add_done_callback(abort)
        else:
            if pending is not None and not pending.cancelled():
                pending.exception()
            up.writer.abort()

    async def _settle(self, key: str, up: _Upload) -> None:
        """Wait for the local write of the previous chunk; its failure ends the upload."""
        pending = up.pending
        if pending is None:
            return
        try:
            await asyncio.shield(pending)
        except StorageError as e:
            self._drop_upload(key, up)  # the writer already removed its temp file
            raise _storage_error(e) from None
        if up.pending is pending:
            up.pending = None

    def _stamp_after_tombstone(self, up: _Upload, oid: str) -> None:
        """Putting bytes again after they were deleted: stamp the write after the
        tombstone we know of, even if its clock ran ahead of ours."""
        assert self.rm is not None
        tomb = self.rm.tombstone(oid)
        stamp = _stamp(up.writer.written_ts)
        if tomb is not None and (stamp is None or stamp <= tomb):
            with contextlib.suppress(ClockSkewError, ValueError):
                self.hlc.update(tomb, time.time())
            up.writer.written_ts = self.hlc.now(time.time()).encode()

    # -- copies that start before the coordinator's own commit

    def _copy_header(self, oid: str, up: _Upload) -> api.ReplicaHeader:
        return api.ReplicaHeader(
            id=oid, size=up.size, replicas=up.policy.replicas,
            residency=ResidencyWire.of(up.policy.residency), expires=up.expires,
            written=up.writer.written_ts)

    def _early_targets(self, up: _Upload, oid: str) -> list[str]:
        """The other members of ``oid``'s write set, from the put's plan: ``begin_put``
        sends to the same ones (a member that left or filled meanwhile gets a stand-in;
        a copy that went early to it is then a stray copy, handed off like any other)."""
        plan = up.plan
        assert plan is not None and plan.oid == oid, "early copies of a put not planned"
        if up.req is None:
            up.req = next(self._req_ids)
        if plan.spare:
            # Not a member: our copy is only a fallback for the pushes (see _finish_spare).
            up.writer.defer_hash()
        return list(plan.forwards)

    def _add_forward(self, up: _Upload, dst: str, work: Callable[[_Forward], Any],
                     *, queued: bool) -> None:
        assert up.req is not None
        fwd = _Forward(dst, asyncio.Queue(self.cfg.forward_window if queued else 1),
                       asyncio.get_running_loop().create_future(), closed=not queued)
        task = asyncio.ensure_future(work(fwd))
        fwd.task = task
        self._forward_tasks.add(task)
        task.add_done_callback(self._forward_tasks.discard)
        up.forwards[dst] = fwd
        self._early[(up.req, dst)] = fwd.done

    def _start_forwards(self, up: _Upload, oid: str) -> None:
        """Cut-through: a client that names the object's id up front lets us stream each
        chunk to the replica set as it arrives, so the members receive, hash and write
        while we do, and commit (fsync, hash checked against the id) while we commit."""
        header = self._copy_header(oid, up)
        for dst in self._early_targets(up, oid):
            self._add_forward(up, dst, functools.partial(self._run_forward, header=header),
                              queued=True)

    def _start_small_copies(self, up: _Upload, oid: str, data: bytes) -> None:
        """A small put's copies leave at once, while we commit our own."""
        header = _small_copy(self._copy_header(oid, up), data)
        for dst in self._early_targets(up, oid):
            self._add_forward(up, dst, functools.partial(self._run_small_copy, header=header),
                              queued=False)

    async def _run_small_copy(self, fwd: _Forward, header: api.ReplicaSmallRequest) -> None:
        ok = False
        try:
            async with self._copy_slot(fwd.dst):
                conn = self._checkout(fwd.dst)
                try:
                    await conn.request(api.RW_SMALL, header)
                    ok = True
                except BaseException:
                    await conn.close()
                    raise
                self.agent.peers.checkin(fwd.dst, conn)
            self._count("bytes_sent", header.size)
        except (RpcError, ValueError, OSError) as e:
            self._count("transfers_early_errors")
            self.agent.log("debug", "early_copy_failed", peer=fwd.dst, error=str(e))
        finally:
            if not fwd.done.done():
                fwd.done.set_result(ok)

    async def _run_forward(self, fwd: _Forward, header: api.ReplicaHeader) -> None:
        ok = False
        conn: RpcConnection | None = None
        upload: str | None = None
        try:
            conn = self._checkout(fwd.dst)
            begin = await conn.request(api.RW_BEGIN, header)
            if begin.have or begin.upload is None:
                ok = True
            else:
                upload = begin.upload
                # Chunks go ahead of their replies on the held connection (the member
                # answers them in order), so it takes in the next while writing the last.
                pipe = await conn.pipeline()
                try:
                    while (chunk := await fwd.queue.get()) is not None:
                        if pipe.outstanding >= self.cfg.forward_ahead:
                            await pipe.receive_reply(api.RW_CHUNK)
                        await pipe.send_request(api.RW_CHUNK,
                                                api.PutChunkRequest(upload=upload, data=chunk))
                    while pipe.outstanding:
                        await pipe.receive_reply(api.RW_CHUNK)
                finally:
                    await pipe.close()
                await conn.request(api.RW_END, api.UploadRequest(upload=upload))
                upload = None
                ok = True
                self._count("bytes_sent", header.size)
        except (RpcError, ValueError, OSError, KeyError) as e:
            self._count("transfers_early_errors")
            self.agent.log("debug", "forward_failed", peer=fwd.dst, error=str(e))
        finally:
            fwd.closed = True
            while not fwd.queue.empty():
                fwd.queue.get_nowait()  # whoever waits to queue a chunk is let go
            if not fwd.done.done():
                fwd.done.set_result(ok)
            if conn is not None:
                if ok:
                    self.agent.peers.checkin(fwd.dst, conn)
                else:
                    # A call may have been cut short: this connection is not reused. The
                    # member's half-received upload is aborted (or expires on its own).
                    self.agent.spawn(conn.close())
                    if upload is not None:
                        self.agent.spawn(self._abort_remote(fwd.dst, upload))

    async def _abort_remote(self, dst: str, upload: str) -> None:
        with contextlib.suppress(Exception):
            conn = self._checkout(dst)
            try:
                await asyncio.wait_for(
                    conn.request(api.PUT_ABORT, api.UploadRequest(upload=upload)), 5.0)
            except BaseException:
                await conn.close()
                raise
            self.agent.peers.checkin(dst, conn)

    def _stop_forward(self, fwd: _Forward) -> None:
        fwd.closed = True
        if fwd.task is not None and not fwd.task.done():
            fwd.task.cancel()
        if not fwd.done.done():
            fwd.done.set_result(False)

    async def _feed_forwards(self, up: _Upload, chunk: bytes | None) -> None:
        """Queue a chunk (``None``: the end) for every member still streaming. One that
        stays ``forward_stall_s`` behind is dropped: memory stays bounded and a dead or
        slow member does not hold the put; it gets the bytes from our copy instead."""
        for fwd in list(up.forwards.values()):
            if fwd.closed:
                continue
            try:
                await asyncio.wait_for(fwd.queue.put(chunk), self.cfg.forward_stall_s)
            except TimeoutError:
                self._count("forwards_stalled")
                self._stop_forward(fwd)

    # -- RPCs

    async def _rpc_put_begin(self, req: api.PutBeginRequest) -> api.PutBeginReply:
        oid = req.id
        spec = await self._client_spec(req.size, req.replicas, req.w, req.residency, oid,
                                       req.ttl_s, req.allow_degraded)
        key = self._new_upload(spec, client=True,
                               early=oid is not None and req.size > self.cfg.inline_bytes)
        policy = self._uploads[key].policy
        if oid is None and not self._may_hold(policy):
            # Without the id the bytes are committed here before their set is known: that
            # would be a copy outside the rule. (The client library sends the id ahead.)
            self._drop_upload(key, self._uploads[key])
            res = policy.residency
            regions = sorted(res.regions) if res is not None and res.regions is not None \
                else []
            why = (f"refused by the residency rule (regions {regions}): this node is in "
                   f"{self.agent.meta.region!r} and a put whose id is not sent ahead is "
                   "stored here first; send the id with obj.put_begin, or put through a node "
                   "in those regions")
            self.agent.record(Kind.REFUSAL, "", data_class=_class(policy), detail=why)
            raise ApiError(ErrorCode.REFUSED, why)
        if oid is not None:
            up = self._uploads[key]
            self._stamp_after_tombstone(up, oid)
            if up.size > self.cfg.inline_bytes:
                self._start_forwards(up, oid)
        return api.PutBeginReply(upload=key, chunk_bytes=self.cfg.chunk_bytes)

    async def _rpc_put_chunk(self, req: api.PutChunkRequest) -> api.ChunkReply:
        return api.ChunkReply(received=await self._put_chunk(req.upload, req.data))

    async def _put_chunk(self, upload: str, data: bytes) -> int:
        """Take one chunk of ``upload``; the bytes taken so far."""
        key, up = self._upload(upload)
        if len(data) > max(self.cfg.chunk_bytes, self.cfg.inline_bytes):
            self._drop_upload(key, up)
            raise ValueError(f"chunk of {len(data)} bytes is over chunk_bytes={self.cfg.chunk_bytes}")
        if up.received + len(data) > up.size:
            self._drop_upload(key, up)
            raise ValueError(f"more bytes than the declared size {up.size}; upload aborted")
        up.last = time.monotonic()
        await self._settle(key, up)
        if key not in self._uploads:
            raise ValueError(f"unknown or expired upload {key!r}")
        if up.writer.inline:  # into memory: no I/O, no thread hop
            try:
                up.writer.write(data)
            except StorageError as e:
                self._drop_upload(key, up)  # the writer already aborted itself
                raise _storage_error(e) from None
        else:
            up.pending = asyncio.ensure_future(asyncio.to_thread(up.writer.write, data))
        up.received += len(data)
        if up.forwards:
            await self._feed_forwards(up, data)
        return up.received

    async def _commit(self, key: str, up: _Upload) -> ObjectMeta:
        meta = await self._commit_unless(key, up, unless_held=False)
        assert meta is not None
        return meta

    async def _commit_unless(self, key: str, up: _Upload, *, unless_held: bool
                             ) -> ObjectMeta | None:
        """Commit ``up``; with ``unless_held``, None and nothing done (the upload aborted)
        when the object is already stored here, found in the commit's own thread hop."""
        self._uploads.pop(key, None)
        await self._settle(key, up)
        if up.received != up.size:
            self._abort_upload(up)
            raise ValueError(f"truncated upload: {up.received} of {up.size} bytes; nothing stored")
        assert self.rm is not None
        if up.client:
            self._stamp_after_tombstone(up, up.expected_id or up.writer.peek_id())
        # This node's own copy (a put it coordinates, or a replica) is kept under its rule
        # narrowed to its class's as this node knows it now, as the simulator's node does
        # (core.policy.stored_rule): the class may have been narrowed since the put's
        # rule was resolved (a long upload), and a copy kept under the old rule would go
        # on claiming regions its class no longer allows. The put itself goes on under
        # its rule; receivers narrow theirs.
        kept = stored_rule(up.policy.residency, self.policies)
        local = up.policy
        if kept is not up.policy.residency and kept is not None and kept.regions is not None:
            self._count("local_rules_narrowed")
            local = ObjectPolicy(up.policy.replicas, kept)
            up.writer.narrow_residency(tuple(sorted(kept.regions)))
        try:
            done = await asyncio.to_thread(self._commit_writer, up, unless_held)
        except StorageError as e:
            raise _storage_error(e) from None
        if done is None:
            return None
        meta, file_key = done
        self._remember_verified(meta.object_id, file_key)
        # A copy committed again while its drop waits in the queue is kept (the manager
        # asks again if it is still not ours to hold).
        self._drops.pop(meta.object_id, None)
        self.rm.object_added(meta.object_id, local, up.hint_for, time.monotonic(),
                             _stamp(meta.written))
        self.agent.record(Kind.COPY_MADE, meta.object_id, data_class=_class(up.policy),
                          from_region=None if up.client else self._caller_region(),
                          detail=f"{meta.size} bytes" + (f", hint for {up.hint_for}"
                                                         if up.hint_for else ""))
        return meta

    def _commit_writer(self, up: _Upload, unless_held: bool = False
                       ) -> tuple[ObjectMeta, tuple[int, ...] | None] | None:
        """Commit (in a thread); with the file's identity when this commit wrote the file
        (its bytes were just hashed), None when the object was already stored (or an
        inline object: no file). With ``unless_held``, an object already stored is not
        committed again: the writer is aborted and None returned."""
        assert self.store is not None
        had = self.store.has(up.expected_id or up.writer.peek_id())
        if had and unless_held:
            up.writer.abort()
            return None
        inline = up.writer.inline
        meta = up.writer.commit(up.expected_id)
        return meta, None if had or inline else self._file_key(meta.object_id)

    async def _rpc_put_end(self, req: api.UploadRequest) -> api.PutReply:
        key, up = self._upload(req.upload)
        # The members commit their copies while we commit ours.
        await self._feed_forwards(up, None)
        try:
            return await self._finish_put(key, up)
        finally:
            if up.req is not None:
                for dst in up.forwards:
                    self._early.pop((up.req, dst), None)

    async def _finish_put(self, key: str, up: _Upload) -> api.PutReply:
        if up.spare:
            return await self._finish_spare(key, up)
        try:
            meta = await self._commit(key, up)
        except BaseException:
            for fwd in up.forwards.values():
                self._stop_forward(fwd)
            raise
        assert self.rm is not None
        req = up.req if up.req is not None else next(self._req_ids)
        fut: asyncio.Future[tuple[str, tuple[str, ...]]] = asyncio.get_running_loop().create_future()
        self._puts[req] = fut
        plan = up.plan if up.plan is not None and up.plan.oid == meta.object_id else None
        try:
            self.rm.begin_put(req, meta.object_id, up.policy, up.w, time.monotonic(),
                              _stamp(meta.written), plan=plan)
        except PlacementError as e:
            self._puts.pop(req, None)
            raise ValueError(f"refused: {e}") from None
        self._pump()
        try:
            oid, nodes = await asyncio.wait_for(fut, self.cfg.put_wait_s)
        except TimeoutError:
            self._puts.pop(req, None)
            raise ValueError(f"put of {meta.object_id} timed out waiting for W={up.w}") from None
        self._record_put(oid, up, nodes)
        return api.PutReply(id=oid, size=meta.size, nodes=list(nodes), planned=_planned(up),
                            replicas=up.policy.replicas)

    def _record_put(self, oid: str, up: _Upload, nodes: tuple[str, ...]) -> None:
        regions = sorted({self._region_of(n) for n in nodes})
        self.agent.record(Kind.PUT, oid, data_class=_class(up.policy), to_region=",".join(regions),
                          detail=f"{up.size} bytes, acknowledged by {len(nodes)}")

    async def _finish_spare(self, key: str, up: _Upload) -> api.PutReply:
        """A put coordinated outside the object's replica set: the members' copies (sent
        as the bytes arrived) make the quorum, as with any put, while our own copy stays
        an uncommitted spare (no hash, no fsync: a copy we would drop anyway once the
        set confirms it). A push that must fall back to our copy (a member's copy failed,
        a stand-in, a member without an early copy) commits it first, with the full hash
        check against the id; otherwise it is removed once every member's copy settled."""
        assert self.rm is not None and up.req is not None and up.plan is not None
        self._uploads.pop(key, None)
        try:
            await self._settle(key, up)
        except BaseException:
            for fwd in up.forwards.values():
                self._stop_forward(fwd)
            raise
        if up.received != up.size:
            self._abort_upload(up)
            raise ValueError(f"truncated upload: {up.received} of {up.size} bytes; nothing stored")
        oid, req = up.plan.oid, up.req
        self._stamp_after_tombstone(up, oid)
        self._spares[req] = _Spare(key, up, up.plan)
        fut: asyncio.Future[tuple[str, tuple[str, ...]]] = asyncio.get_running_loop().create_future()
        self._puts[req] = fut
        try:
            self.rm.begin_put(req, oid, up.policy, up.w, time.monotonic(),
                              _stamp(up.writer.written_ts), plan=up.plan)
        except PlacementError as e:
            self._puts.pop(req, None)
            self._spares.pop(req, None)
            self._abort_upload(up)
            raise ValueError(f"refused: {e}") from None
        self._count("spare_puts")
        self.agent.spawn(self._settle_spare(req, [f.done for f in up.forwards.values()]))
        self._pump()
        try:
            oid, nodes = await asyncio.wait_for(fut, self.cfg.put_wait_s)
        except TimeoutError:
            self._puts.pop(req, None)
            raise ValueError(f"put of {oid} timed out waiting for W={up.w}") from None
        self._record_put(oid, up, nodes)
        return api.PutReply(id=oid, size=up.size, nodes=list(nodes), planned=_planned(up),
                            replicas=up.policy.replicas)

    async def _commit_spare(self, req: int) -> None:
        """Commit the spare copy of write ``req`` (once; later callers wait for it). A
        copy that does not hash to the id fails the put with that reason."""
        spare = self._spares.get(req)
        if spare is None:
            return
        if spare.commit is None:
            self._count("spare_copies_committed")
            spare.commit = asyncio.ensure_future(self._commit(spare.key, spare.up))
        try:
            await asyncio.shield(spare.commit)
        except ValueError as e:
            fut = self._puts.pop(req, None)
            if fut is not None and not fut.done():
                fut.set_exception(ValueError(f"put of {spare.oid} failed: {e}"))

    async def _settle_spare(self, req: int, copies: list[asyncio.Future[bool]]) -> None:
        """Once every member's early copy is decided: drop the spare if they all made
        it and nothing needed it, else leave it committed (a stray copy, handed off and
        dropped like any other)."""
        results = await asyncio.gather(*(asyncio.shield(c) for c in copies),
                                       return_exceptions=True)
        spare = self._spares.get(req)
        if spare is None:
            return
        fate = spare_fate(spare.plan, [r is True for r in results], spare.commit is not None)
        if fate is SpareFate.DROP:
            # Not needed, or not ours to keep: a spare outside the object's residency is
            # never committed, whatever became of the put (a failed put leaves nothing).
            self._spares.pop(req, None)
            self._abort_upload(spare.up)
            self._count("spare_copies_dropped")
            return
        if fate is SpareFate.COMMIT:
            await self._commit_spare(req)
        with contextlib.suppress(Exception):
            assert spare.commit is not None
            await spare.commit
        self._spares.pop(req, None)

    def _rpc_put_abort(self, req: api.UploadRequest) -> api.Done:
        up = self._uploads.pop(req.upload, None)
        if up is not None:
            self._abort_upload(up)
        return api.Done()

    async def _rpc_rw_begin(self, req: api.ReplicaHeader) -> api.RwBeginReply:
        assert self.store is not None
        await self._policies_for([None if req.residency is None else req.residency.data_class])
        if await asyncio.to_thread(self.store.has, req.id):
            return api.RwBeginReply(have=True)
        return api.RwBeginReply(upload=self._new_upload(self._replica_spec(req), client=False))

    async def _rpc_rw_small(self, req: api.ReplicaSmallRequest) -> api.StoredReply:
        """A whole small replica in one call (bounded by ``inline_bytes``)."""
        data = req.data
        if len(data) > self.cfg.inline_bytes or len(data) != req.size:
            raise ApiError(ErrorCode.INVALID, (
                f"inline object of {len(data)} bytes does not match its size or is over "
                f"inline_bytes={self.cfg.inline_bytes}"))
        assert self.store is not None
        if len(data) <= self.store.config.inline_max_bytes:
            return await self._rw_inline(req)
        if await asyncio.to_thread(self.store.has, req.id):
            return api.StoredReply(id=req.id)
        await self._policies_for([None if req.residency is None else req.residency.data_class])
        key = self._new_upload(self._replica_spec(req), client=False)
        up = self._uploads[key]
        try:
            await asyncio.to_thread(up.writer.write, data)
        except StorageError as e:
            self._uploads.pop(key, None)
            raise _storage_error(e) from None
        up.received = len(data)
        meta = await self._commit(key, up)
        self._count("bytes_received", meta.size)
        self._pump()
        return api.StoredReply(id=meta.object_id)

    async def _rw_inline(self, req: api.ReplicaSmallRequest) -> api.StoredReply:
        """``obj.rw_small`` of a copy kept inline: as for a file, a copy already held is
        answered at once, but that is found in the commit's own thread hop, not in one
        of its own before the checks (one hop per copy, not two: issue #19). A check that
        refuses a copy we hold still answers that we hold it, as before."""
        assert self.store is not None
        try:
            await self._policies_for([None if req.residency is None
                                      else req.residency.data_class])
            key = self._new_upload(self._replica_spec(req), client=False)
        except (ApiError, ValueError):
            if await asyncio.to_thread(self.store.has, req.id):
                return api.StoredReply(id=req.id)
            raise
        up = self._uploads[key]
        try:
            up.writer.write(req.data)  # into memory: no I/O
        except StorageError as e:
            self._uploads.pop(key, None)
            raise _storage_error(e) from None
        up.received = len(req.data)
        meta = await self._commit_unless(key, up, unless_held=True)
        if meta is None:
            return api.StoredReply(id=req.id)
        self._count("bytes_received", meta.size)
        self._pump()
        return api.StoredReply(id=meta.object_id)

    async def _rpc_put_small(self, req: api.PutSmallRequest) -> api.PutReply:
        """A client put of a small object in one call: begin, chunk and end at once; the
        copies leave for the replica set while this node commits its own."""
        data = req.data
        if len(data) > self.cfg.inline_bytes:
            raise ApiError(ErrorCode.INVALID, (
                f"inline put of {len(data)} bytes is over inline_bytes={self.cfg.inline_bytes}; "
                "use obj.put_begin"))
        oid = object_id(data)
        # With the id known, a coordinator outside the replica set keeps only a spare
        # (uncommitted) copy, as for a large put, instead of committing a stray copy that
        # it must hand off and drop again.
        spec = await self._client_spec(len(data), req.replicas, req.w, req.residency, oid,
                                       req.ttl_s, req.allow_degraded)
        key = self._new_upload(spec, client=True, early=True)
        up = self._uploads[key]
        self._stamp_after_tombstone(up, oid)
        self._start_small_copies(up, oid, data)
        await self._put_chunk(key, data)
        return await self._rpc_put_end(api.UploadRequest(upload=key))

    async def _rpc_rw_end(self, req: api.UploadRequest) -> api.StoredReply:
        key, up = self._upload(req.upload)
        meta = await self._commit(key, up)
        self._count("bytes_received", meta.size)
        self._pump()
        return api.StoredReply(id=meta.object_id)
