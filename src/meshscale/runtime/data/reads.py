"""Reads: ``obj.read`` (from the local copy, or a redirect to holders, or relayed from
one), ``obj.read_local`` between members, the hash check of a local copy before it is
served (with the cache of recently checked copies, ``verified_ttl_s``), and hash-checked
local copies lent to tasks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import msgspec

from meshscale.core.api import ApiError, ErrorCode
from meshscale.core.api import objects as api
from meshscale.core.audit import Kind
from meshscale.core.policy import read_refusal
from meshscale.runtime import caller
from meshscale.runtime.data.state import DataPlaneBase
from meshscale.runtime.storage import ObjectMeta, StorageError
from meshscale.transport.rpc import RpcError


class Reads(DataPlaneBase):
    """Serving the bytes of objects."""

    def _file_key(self, oid: str) -> tuple[int, ...] | None:
        assert self.store is not None
        try:
            st = os.stat(self.store.object_path(oid))
        except (OSError, StorageError):
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _remember_verified(self, oid: str, key: tuple[int, ...] | None) -> None:
        if key is None or self.cfg.verified_ttl_s <= 0:
            return
        self._verified[oid] = (time.monotonic(), key)
        self._verified.move_to_end(oid)
        while len(self._verified) > self.cfg.verified_cache:
            self._verified.popitem(last=False)

    def _check_local(
        self, oid: str, seen: tuple[float, tuple[int, ...]] | None
    ) -> tuple[ObjectMeta | None, bool, tuple[int, ...] | None]:
        """(meta, hash checked now or recently, file identity when checked now), in one
        thread hop; ``seen`` is the copy's entry in ``_verified``."""
        store = self.store
        assert store is not None
        meta = store.meta(oid)
        if meta is None:
            return None, False, None
        key = self._file_key(oid)
        if (seen is not None and key is not None and seen[1] == key
                and time.monotonic() - seen[0] < self.cfg.verified_ttl_s):
            return meta, True, None  # recently checked, same file: not re-hashed
        return meta, store.verify(oid), key

    async def _local_verified(self, oid: str) -> tuple[ObjectMeta | None, bool]:
        """(meta or None if not held, whether the copy hashes right); a bad copy is
        quarantined."""
        meta, ok, key = await asyncio.to_thread(self._check_local, oid, self._verified.get(oid))
        if meta is None:
            return None, False
        if not ok:
            await self._quarantine(oid)
            return meta, False
        if key is not None:
            self._count("verified_full")
            self._remember_verified(oid, key)
        else:
            self._count("verified_cached")
        return meta, True

    async def local_copy_path(self, oid: str) -> Path | None:
        """A path on this machine holding ``oid``'s bytes, hash-checked (see
        ``_local_verified``) and hard-linked so a drop or delete meanwhile cannot take them
        away; release it with ``release_copy_path``. None when no good local copy exists
        (or the link cannot be made), or the worker user cannot reach the links: read the
        bytes instead."""
        iso = self.agent.isolation
        if self.store is None or (iso is not None and not iso.links_reachable):
            return None
        meta, ok = await self._local_verified(oid)
        if meta is None or not ok:
            return None
        before = self._verified.get(oid)
        try:
            path, after = await asyncio.to_thread(self._link, oid)
        except (StorageError, OSError):
            return None
        self._own_change(oid, before, after)
        self._linked[path] = oid
        while len(self._linked) > self.cfg.verified_cache:
            self._linked.popitem(last=False)
        return path

    def _link(self, oid: str) -> tuple[Path, tuple[int, ...] | None]:
        assert self.store is not None
        return self.store.link_copy(oid), self._file_key(oid)

    async def release_copies(self, paths: list[Path]) -> None:
        """Remove links made by ``local_copy_path``."""
        if self.store is None or not paths:
            return
        befores = [(path, self._linked.pop(path, None)) for path in paths]
        befores_v = [(oid, self._verified.get(oid)) for _, oid in befores if oid is not None]
        afters = await asyncio.to_thread(self._release, [path for path, _ in befores],
                                         [oid for oid, _ in befores_v])
        for (oid, before), after in zip(befores_v, afters, strict=True):
            self._own_change(oid, before, after)

    def _release(self, paths: list[Path], oids: list[str]) -> list[tuple[int, ...] | None]:
        assert self.store is not None
        for path in paths:
            with contextlib.suppress(OSError, ValueError):
                self.store.release_copy(path)
        return [self._file_key(oid) for oid in oids]

    def _own_change(self, oid: str, before: tuple[float, tuple[int, ...]] | None,
                    after: tuple[int, ...] | None) -> None:
        """This node's own link or unlink of a copy's file changed its ctime (the link
        count is the inode's): a copy checked before, whose file is otherwise the same
        (device, inode, size, mtime), stays checked, from its last full check. Without
        it every task's input was hashed again in full (issue #19: 12.7 ms of a 20 MB
        input's ~20 ms between two tasks on a slot). Only a ctime-only change is taken,
        and only when nothing else changed the entry meanwhile."""
        if before is None or after is None:
            return
        checked_at, key = before
        if key != after and key[:4] == after[:4] and self._verified.get(oid) == before:
            self._verified[oid] = (checked_at, after)

    def _read_range(self, oid: str, offset: int, length: int) -> bytes:
        assert self.store is not None
        with self.store.open_read(oid) as f:
            f.seek(offset)
            return f.read(length)

    def _audit_read_now(self, oid: str, offset: int) -> bool:
        """Whether this chunk read starts a read the audit trail records: every read from
        offset 0, and a read that starts further on (a range) unless the same caller's
        read of the object was recorded in the last ``audit_range_read_s``."""
        who = caller.current.get()
        key = (who.name if who is not None else "", oid)
        now = time.monotonic()
        seen = self._range_reads.get(key)
        self._range_reads[key] = now
        self._range_reads.move_to_end(key)
        while len(self._range_reads) > self.cfg.max_range_reads_tracked:
            self._range_reads.popitem(last=False)
        return offset == 0 or seen is None or now - seen > self.cfg.audit_range_read_s

    async def _rpc_read_local(self, req: api.ReadRequest) -> api.ReadReply:
        oid, offset = req.id, req.offset
        length = min(req.length, self.cfg.chunk_bytes)
        assert self.store is not None
        if offset == 0:
            meta, ok = await self._local_verified(oid)
            if meta is not None and not ok:
                raise ApiError(ErrorCode.INVALID, f"corrupt copy of {oid} here; try another replica")
        else:
            meta = await asyncio.to_thread(self.store.meta, oid)
        if meta is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}")
        if meta.data_class is not None:
            # A node relaying a read for its client: it reads only if its region may.
            peer = caller.current.get()
            member = None if peer is None else self.agent.m.members.get(peer.name)
            if member is not None and member.name != self.agent.name:
                await self._check_read(oid, meta.data_class, member.meta.region)
        try:
            data = await asyncio.to_thread(self._read_range, oid, offset, length)
        except StorageError as e:
            raise ApiError(ErrorCode.INVALID, f"{e.reason}: {oid}") from None
        # Bytes this node read from its own copies for readers (a client, or a node
        # relaying to one); a range read counts only the range.
        self._count("read_served_bytes", len(data))
        if self._audit_read_now(oid, offset):  # per read of an object, not per chunk
            detail = (f"{meta.size} bytes" if offset == 0
                      else f"range from byte {offset} of {meta.size}")
            self.agent.record(Kind.READ, oid, data_class=meta.data_class,
                              to_region=self._caller_region(), detail=detail)
        return api.ReadReply(data=data, size=meta.size, chunk_bytes=self.cfg.chunk_bytes)

    async def _rpc_read(self, req: api.ReadRequest) -> api.ReadReply:
        oid = req.id
        assert self.store is not None
        if self.rm is not None and self.rm.tombstone(oid) is not None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: it was deleted")
        if await asyncio.to_thread(self.store.has, oid):
            with contextlib.suppress(ValueError):
                return await self._rpc_read_local(req)
        # Not held here: a class whose policy forbids cross-region reads is neither relayed
        # nor redirected to from a node outside its regions.
        if oid not in self._read_classes:
            stats = await self._local_stats(oid)
            desc = next(iter(stats.values()), None)
            res = None if desc is None else desc.residency
            self._read_classes[oid] = None if res is None else res.data_class
            while len(self._read_classes) > self.cfg.read_source_cache:
                self._read_classes.popitem(last=False)
        cls = self._read_classes.get(oid)
        if cls is not None:
            await self._check_read(oid, cls, self.agent.meta.region)
        src = self._sources.get(oid)
        if src is not None and not self._live(src):
            # Remembered from before it died (or was cut off): never send a reader there.
            self._sources.pop(oid, None)
            src = None
        if req.redirect:
            redirect = await self._redirect(oid, src)
            if redirect is not None:
                return redirect
        return await self._relay(msgspec.structs.replace(req, redirect=False), src)

    async def _redirect(self, oid: str, src: str | None) -> api.ReadReply | None:
        """One hop: name holders; the client reads from one over its own connection (and
        asks us again, without ``redirect``, if it cannot reach any)."""
        names = [src] if src is not None else [
            h for h in await self._holders(oid) if h != self.agent.name]
        targets = [api.Holder(node=n, addr=a) for n in names[:3]
                   if (a := self._addr(n)) is not None]
        if not targets:
            return None
        self._remember_source(oid, names[0])
        self._count("reads_redirected")
        return api.ReadReply(redirect=targets)

    async def _relay(self, req: api.ReadRequest, src: str | None) -> api.ReadReply:
        """The bytes read from a holder (``src`` first, if known), relayed."""
        oid = req.id
        tried: list[str] = []
        if src is not None:
            try:
                result = await self._call(src, api.READ_LOCAL, req)
                self._count("reads_proxied")
                return result
            except (RpcError, ValueError):
                tried.append(src)
                self._sources.pop(oid, None)
        for holder in await self._holders(oid):
            if holder in tried or holder == self.agent.name:
                continue
            try:
                result = await self._call(holder, api.READ_LOCAL, req)
            except (RpcError, ValueError):
                continue
            self._remember_source(oid, holder)
            self._count("reads_proxied")
            return result
        raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: no live node holds a good copy")

    async def _check_read(self, oid: str, data_class: str, region: str) -> None:
        """Refuse a read of ``oid`` (class ``data_class``) by a node in ``region`` when the
        class's policy forbids it (``core.policy.read_refusal``)."""
        why = read_refusal(region, data_class, await self._policies_for([data_class]))
        if why is not None:
            raise self._refuse("cross_region_read", f"read of {oid}: {why}", subject=oid,
                               data_class=data_class, region=region)

    def _remember_source(self, oid: str, holder: str) -> None:
        self._sources[oid] = holder
        while len(self._sources) > self.cfg.read_source_cache:
            self._sources.popitem(last=False)
