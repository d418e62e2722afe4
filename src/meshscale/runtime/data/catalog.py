"""What the mesh holds: a member's own copies (``obj.local_stat``, ``obj.local_list``), an
object's holders and health across the live members (``obj.stat``, ``obj.list``), deletes
(``obj.delete``: tombstones through ``ReplicaManager.delete``) and a scrub of the local
copies (``obj.corrupt_local``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, TypeVar

import msgspec

from meshscale.core.api import ApiError, Empty, ErrorCode, Method, ResidencyWire
from meshscale.core.api import objects as api
from meshscale.core.audit import Kind
from meshscale.core.hlc import ClockSkewError
from meshscale.core.placement import Candidate, PlacementError, replica_set, write_set
from meshscale.core.replication import ReplicationOverloaded
from meshscale.runtime.data.state import DataPlaneBase, _policy, _stamp, policy_of
from meshscale.runtime.services import Rep, Req
from meshscale.runtime.storage import ObjectMeta
from meshscale.transport.rpc import RpcError

D = TypeVar("D", bound=api.ObjectDesc)


_DESC_FIELDS = len(api.ObjectDesc.__struct_fields__)


def _as(cls: type[D], desc: api.ObjectDesc, **extra: Any) -> D:
    """``desc``'s ``ObjectDesc`` fields as a ``cls`` (a richer description) with ``extra``
    (positionally: a subclass's fields come after its base's)."""
    return cls(*msgspec.structs.astuple(desc)[:_DESC_FIELDS], **extra)


def _health(e: api.ListedObject) -> api.ListedObject:
    """``e`` with its holders sorted and its health: ``ok`` when enough of them are where
    its rule and the current view put its copies."""
    e.holders.sort()
    want = min(e.replicas, len(e.replica_set)) if e.replica_set else e.replicas
    # A stand-in (write set) holds a copy in place of a full member that lacks it.
    fits = set(e.replica_set) | set(e.write_set)
    good = [h for h in e.holders if h in fits]
    e.health = "ok" if len(good) >= want and want == e.replicas else "under-replicated"
    return e


LIST_PAGE_COPIES = 1000
"""Copies asked of a member per ``obj.local_list`` page when every copy must be listed."""


class Catalog(DataPlaneBase):
    """Looking objects up across the members, and deleting them."""

    async def _holders(self, oid: str) -> list[str]:
        """Live nodes that hold ``oid``, replica-set members first."""
        return list(await self._local_stats(oid))

    async def _local_stats(self, oid: str) -> dict[str, api.LocalObject]:
        """Every live node's own copy of ``oid``, by node (those that hold one)."""
        stats = await self._fan_out(api.LOCAL_STAT, api.ObjectIdRequest(id=oid),
                                    self.cfg.stat_timeout_s)
        return {name: st for name, st in stats.items() if st is not None}

    async def _fan_out(self, method: Method[Req, Rep], req: Req,
                       timeout_s: float | None = None) -> dict[str, Rep | None]:
        """``method`` on every live member at once; None where it failed or was silent."""
        names = [c.name for c in self._view()]
        bound = self.agent.peers.cfg.call_timeout_s if timeout_s is None else timeout_s

        async def one(name: str) -> Rep | None:
            try:
                return await asyncio.wait_for(self._call(name, method, req), bound)
            except (RpcError, ValueError, TimeoutError):
                return None

        results = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, results, strict=True))

    async def _member_copies(self, name: str, max_copies: int) -> list[api.ObjectDesc] | None:
        """Every copy member ``name`` holds, page by page with a cursor of its own (one
        cursor shared by several members skips or repeats copies); None once it holds more
        than ``max_copies``. RPC failures propagate: the caller decides what a silent
        member means."""
        out: list[api.ObjectDesc] = []
        after = ""
        while True:
            if len(out) > max_copies:
                return None
            page = await asyncio.wait_for(
                self._call(name, api.LOCAL_LIST,
                           api.ListRequest(after=after, limit=LIST_PAGE_COPIES)),
                self.agent.peers.cfg.call_timeout_s)
            out += page
            if len(page) < LIST_PAGE_COPIES:
                return out
            after = page[-1].id

    def _describe(self, meta: ObjectMeta, view: list[Candidate] | None = None
                  ) -> api.ObjectDesc:
        """``meta`` with its replica and write sets under the current view: as replication
        keeps them for a copy it tracks (no hashing), else placed now over ``view`` (None:
        the current one)."""
        policy = policy_of(meta)
        known = None if self.rm is None else self.rm.placement(meta.object_id, policy)
        if known is not None:
            return api.ObjectDesc(id=meta.object_id, size=meta.size, replicas=meta.replicas,
                                  residency=ResidencyWire.of(policy.residency),
                                  replica_set=list(known[0]), write_set=list(known[1]))
        if view is None:
            view = self._view()
        try:
            rs = [c.name for c in replica_set(meta.object_id, view, policy.replicas,
                                              policy.residency)]
        except PlacementError:
            rs = []
        try:
            ws = [c.name for c in write_set(meta.object_id, view, policy.replicas,
                                            policy.residency)]
        except PlacementError:
            ws = []
        return api.ObjectDesc(id=meta.object_id, size=meta.size, replicas=meta.replicas,
                              residency=ResidencyWire.of(policy.residency), replica_set=rs,
                              write_set=ws)

    async def _rpc_local_stat(self, req: api.ObjectIdRequest) -> api.LocalObject | None:
        assert self.store is not None
        meta = await asyncio.to_thread(self.store.meta, req.id)
        if meta is None:
            return None
        return _as(api.LocalObject, self._describe(meta), written=meta.written)

    async def _rpc_local_list(self, req: api.ListRequest) -> list[api.ObjectDesc]:
        assert self.store is not None
        page = await asyncio.to_thread(self.store.list, after=req.after, limit=req.limit)
        view = self._view()
        return [self._describe(m, view) for m in page]

    async def _rpc_stat(self, req: api.ObjectIdRequest) -> api.ObjectStat:
        oid = req.id
        held = await self._local_stats(oid)
        if not held:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: no live node holds it")
        return _as(api.ObjectStat, next(iter(held.values())), holders=sorted(held))

    async def _rpc_list(self, req: api.ListRequest) -> api.ObjectPage:
        limit = req.limit
        pages = await self._fan_out(api.LOCAL_LIST, api.ListRequest(after=req.after, limit=limit))
        # Each id's first description (every holder describes it alike from its own view)
        # and its holders; only the page's objects are built.
        merged: dict[str, tuple[api.ObjectDesc, list[str]]] = {}
        for node, page in pages.items():
            for desc in page or []:
                entry = merged.get(desc.id)
                if entry is None:
                    merged[desc.id] = (desc, [node])
                else:
                    entry[1].append(node)
        ids = sorted(merged)[:limit]
        out = []
        for oid in ids:
            desc, holders = merged[oid]
            out.append(_health(_as(api.ListedObject, desc, holders=holders)))
        # A node that filled its page may hold more beyond it, even if the merge did not.
        more = len(merged) > limit or any(len(p or []) >= limit for p in pages.values())
        return api.ObjectPage(objects=out, next=ids[-1] if more and ids else None)

    async def _rpc_delete(self, req: api.ObjectIdRequest) -> api.DeleteReply:
        """Delete an object everywhere: drop every copy and leave tombstones (see the module
        docstring). Returns the nodes that held a copy and those told at once; nodes that
        are away now learn it from anti-entropy when they come back."""
        assert self.rm is not None
        oid = req.id
        held = await self._local_stats(oid)
        if not held:
            if self.rm.tombstone(oid) is not None:
                return api.DeleteReply(id=oid, holders=[], already_deleted=True)
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: no live node holds it")
        desc = next(iter(held.values()))
        policy = _policy(desc.replicas, desc.residency)
        wall = time.time()
        for st in held.values():
            # Stamp the delete after every write of the object we can see.
            stamp = _stamp(st.written)
            if stamp is not None:
                with contextlib.suppress(ClockSkewError, ValueError):
                    self.hlc.update(stamp, wall)
        ts = self.hlc.now(wall)
        rid = next(self._req_ids)
        fut: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self._deletes[rid] = fut
        try:
            notified = self.rm.delete(oid, policy, ts, time.monotonic(), wall, sorted(held),
                                      req_id=rid)
        except ReplicationOverloaded as e:
            self._deletes.pop(rid, None)
            raise ApiError(ErrorCode.BUSY, f"busy: {e}") from None
        self._count("deletes")
        self.agent.record(Kind.DELETE, oid, data_class=desc.residency.data_class
                          if desc.residency is not None else None,
                          detail=f"held by {len(held)}: {', '.join(sorted(held))}")
        self._pump()
        try:
            kept = await asyncio.wait_for(fut, self.cfg.put_wait_s)
        except TimeoutError:
            self._deletes.pop(rid, None)
            raise ApiError(ErrorCode.UNAVAILABLE, f"delete of {oid} not confirmed in "
                                                  f"{self.cfg.put_wait_s:g} s") from None
        return api.DeleteReply(id=oid, holders=sorted(held), notified=list(notified),
                               ts=ts.encode(), tombstones=list(kept))

    async def _rpc_corrupt_local(self, req: Empty) -> api.CorruptReply:
        """Check every local copy's hash now (an operator's scrub); returns what was bad."""
        store = self.store
        assert store is not None
        bad = []
        for oid in await asyncio.to_thread(lambda: list(store.ids())):
            if not await asyncio.to_thread(store.verify, oid):
                await self._quarantine(oid)
                bad.append(oid)
        return api.CorruptReply(quarantined=bad)
