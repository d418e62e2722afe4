"""Erasure on this node (``erase.*``; what is selected and what a receipt holds is
``core/erasure.py``).

``erase.run`` (admin): list every live member's copies (``obj.local_list``), select, delete
each selected object through ``obj.delete``'s own path (``Catalog._rpc_delete``: copies
dropped, tombstones spread) and each selected key through ``kv.delete``'s, then ask every
node that held a copy for its signed confirmation (``erase.confirm``), and answer with the
receipt, signed with this node's key and recorded in its audit trail (an ``erase`` entry
whose detail carries the receipt's BLAKE3).

``erase.confirm`` (node to node): wait, up to ``erase_confirm_wait_s``, until none of the
named objects is in this node's store index nor on its disk, then sign what is gone and
what is still held, record it (an ``erase`` entry), and answer."""

from __future__ import annotations

import asyncio
import time
import uuid

from blake3 import blake3

from meshscale.core.api import ApiError, ErrorCode
from meshscale.core.api import erasure as eapi
from meshscale.core.api import objects as api
from meshscale.core.audit import Kind
from meshscale.core.erasure import (
    RECEIPT_VERSION,
    ErasedCopy,
    ErasedKey,
    ErasedObject,
    HeldCopy,
    NodeConfirmation,
    Receipt,
    ReceiptBody,
    Selector,
    check_selector,
    confirmation_payload,
    receipt_payload,
    receipt_problems,
    select,
)
from meshscale.core.policy import PolicyError
from meshscale.runtime import caller
from meshscale.runtime.data.catalog import Catalog
from meshscale.runtime.data.kv import KvStore
from meshscale.transport.rpc import RpcError
from meshscale.trust.receipts import sign_bytes

_POLL_S = 0.05


class Erasure(Catalog, KvStore):
    """The ``erase.*`` methods."""

    async def _inventory(self) -> list[HeldCopy]:
        """Every copy the live members hold now (each member's store, page by page)."""
        regions = {m.name: m.meta.region for m in self.agent.m.members.values()}
        limit = self.cfg.erase_scan_max_copies

        async def one(name: str) -> list[HeldCopy]:
            page = await self._member_copies(name, limit)
            if page is None:
                raise ApiError(ErrorCode.INVALID, (
                    f"member {name} holds more than {limit} copies "
                    "(erase_scan_max_copies): an erase cannot list them all to be "
                    "sure it erases every copy"))
            return [HeldCopy(d.id, name, regions.get(name, ""), d.size,
                             None if d.residency is None else d.residency.data_class,
                             None if d.residency is None or d.residency.regions is None
                             else tuple(d.residency.regions))
                    for d in page]

        names = [c.name for c in self._view()]
        got = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        copies: list[HeldCopy] = []
        for name, r in zip(names, got, strict=True):
            if isinstance(r, ApiError):
                raise r
            if isinstance(r, RpcError | ValueError | TimeoutError):
                raise ApiError(ErrorCode.UNAVAILABLE, (
                    f"cannot list the copies of member {name}: {r}; an erase must see every "
                    "live member's copies (try again)")) from None
            if isinstance(r, BaseException):
                raise r
            copies += r
        return copies

    async def _keys_under(self, prefix: str) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        after = ""
        while True:
            page = await self._rpc_kv_list(api.KvListRequest(prefix=prefix, after=after,
                                                             limit=api.MAX_KV_LIST_PAGE))
            for e in page.entries:
                out[e.key] = e.value
            if page.next is None or len(out) > self.cfg.erase_max_objects:
                return out
            after = page.next

    async def _rpc_erase(self, req: eapi.EraseRequest) -> Receipt:
        try:
            sel = check_selector(req.data_class, req.key_prefix, req.ids)
        except PolicyError as e:
            raise ApiError(ErrorCode.INVALID, f"{e.rule}: {e}") from None
        peer = caller.current.get()
        started = time.time()
        known = {}
        if sel.data_class is not None:
            known = dict(await self._policies_for([sel.data_class]))
        copies = await self._inventory()
        keys = await self._keys_under(sel.key_prefix) if sel.key_prefix is not None else {}
        chosen = select(sel, copies, keys)
        if sel.data_class is not None and sel.data_class not in known \
                and not chosen.objects and not chosen.keys:
            raise ApiError(ErrorCode.INVALID, (
                f"unknown data class {sel.data_class!r}: no policy is set for it and no live "
                "node holds an object of it"))
        if sel.ids and not chosen.objects:
            raise ApiError(ErrorCode.NOT_FOUND, (
                f"no live node holds any of the {len(sel.ids)} object id(s) named "
                f"(first: {sel.ids[0]})"))
        if len(chosen.objects) > self.cfg.erase_max_objects:
            raise ApiError(ErrorCode.INVALID, (
                f"{sel.describe()} selects {len(chosen.objects)} objects, more than one erase "
                f"may take (erase_max_objects={self.cfg.erase_max_objects}): narrow it"))
        receipt_id = f"erase-{uuid.uuid4().hex}"
        problems: list[str] = []
        sem = asyncio.Semaphore(self.cfg.erase_parallel)

        async def delete(oid: str) -> api.DeleteReply | None:
            async with sem:
                try:
                    return await self._rpc_delete(api.ObjectIdRequest(id=oid))
                except ApiError as e:
                    problems.append(f"{oid}: delete failed: {e}")
                    return None

        oids = sorted(chosen.objects)
        replies = dict(zip(oids, await asyncio.gather(*(delete(o) for o in oids)),
                           strict=True))
        erased_keys: list[ErasedKey] = []
        for key in chosen.keys:
            try:
                got = await self._rpc_kv_delete(api.KvKeyRequest(key=key))
                erased_keys.append(ErasedKey(key, got.ts))
            except ApiError as e:
                problems.append(f"key {key!r}: delete failed: {e}")
                erased_keys.append(ErasedKey(key, ""))
        # Every node that held a copy (listed at the start or found by the delete) confirms.
        regions = {m.name: m.meta.region for m in self.agent.m.members.values()}
        held: dict[str, dict[str, HeldCopy]] = {}
        for oid, cs in chosen.objects.items():
            for c in cs:
                held.setdefault(oid, {})[c.node] = c
            reply = replies.get(oid)
            size = cs[0].size if cs else 0
            for node in reply.holders if reply is not None else ():
                held[oid].setdefault(node, HeldCopy(oid, node, regions.get(node, ""), size))
        by_node: dict[str, list[str]] = {}
        for oid, holders in held.items():
            for node in holders:
                by_node.setdefault(node, []).append(oid)

        async def confirm(node: str, ids: list[str]) -> NodeConfirmation | None:
            async with sem:
                try:
                    return await asyncio.wait_for(
                        self._call(node, eapi.CONFIRM,
                                   eapi.ConfirmRequest(receipt_id=receipt_id, ids=sorted(ids))),
                        self.cfg.erase_confirm_wait_s + self.agent.peers.cfg.call_timeout_s)
                except (RpcError, ValueError, TimeoutError) as e:
                    problems.append(f"{node} did not confirm: {str(e)[:200]}")
                    return None

        nodes = sorted(by_node)
        confs = [c for c in await asyncio.gather(*(confirm(n, by_node[n]) for n in nodes))
                 if c is not None]
        objects = []
        for oid in oids:
            listed = held[oid]
            first = next(iter(listed.values()))
            reply = replies[oid]
            objects.append(ErasedObject(
                id=oid, data_class=first.data_class or "", size=first.size,
                copies=[ErasedCopy(c.node, c.region, c.size)
                        for _, c in sorted(listed.items())],
                delete_ts="" if reply is None or reply.ts is None else reply.ts,
                tombstones=[] if reply is None else sorted(reply.tombstones)))
        who = "" if peer is None else peer.name
        role = "" if peer is None else peer.role.value
        body = ReceiptBody(
            version=RECEIPT_VERSION, receipt_id=receipt_id, coordinator=self.agent.name,
            coordinator_region=self.agent.meta.region, requested_by=who, requested_role=role,
            selector=Selector(sel.data_class, sel.key_prefix, sel.ids),
            started_wall_s=started, finished_wall_s=time.time(),
            hlc=self.hlc.now(time.time()).encode(), objects=objects, keys=erased_keys,
            confirmations=sorted(confs, key=lambda c: c.node), missing=chosen.missing,
            problems=[], complete=False)
        body.problems = sorted(set(problems) | set(receipt_problems(body)))
        body.complete = not body.problems
        payload = receipt_payload(body)
        signature = sign_bytes(self.agent.bundle.key_pem, payload)
        self._count("erasures")
        self._count("erased_objects", len(objects))
        self.agent.record(
            Kind.ERASE, receipt_id, data_class=sel.data_class,
            detail=(f"{'complete' if body.complete else 'INCOMPLETE'}: {sel.describe()}: "
                    f"{len(objects)} objects, {sum(len(o.copies) for o in objects)} copies, "
                    f"{len(erased_keys)} keys; receipt b3 {blake3(payload).hexdigest()[:32]}"))
        self.agent.log("info", "erased", receipt=receipt_id, objects=len(objects),
                       complete=body.complete)
        return Receipt(body=body, signature=signature,
                       cert_pem=self.agent.bundle.cert_pem.decode())

    def _still_held(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` in this node's store index or on its disk (in a thread). Once
        none is, the store's files are purged of what the deletes freed
        (``LocalStore.purge_freed``: an inline copy's bytes stay in the index database's
        log until then); one that cannot be purged yet counts every id as still held."""
        store = self.store
        assert store is not None
        still = [oid for oid in ids
                 if store.meta(oid) is not None or store.object_path(oid).exists()]
        if still or not ids:
            return still
        return [] if store.purge_freed() else list(ids)

    async def _rpc_erase_confirm(self, req: eapi.ConfirmRequest) -> NodeConfirmation:
        deadline = time.monotonic() + self.cfg.erase_confirm_wait_s
        ids = sorted(set(req.ids))
        try:
            still = await asyncio.to_thread(self._still_held, ids)
        except ValueError as e:  # an id that is not one
            raise ApiError(ErrorCode.INVALID, str(e)) from None
        while still and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
            still = await asyncio.to_thread(self._still_held, still)
        gone = sorted(set(ids) - set(still))
        wall = time.time()
        region = self.agent.meta.region
        payload = confirmation_payload(req.receipt_id, self.agent.name, region, gone, still,
                                       wall)
        self.agent.record(Kind.ERASE, req.receipt_id,
                          detail=f"confirmed {len(gone)} copies gone"
                          + (f", {len(still)} still held" if still else ""))
        return NodeConfirmation(
            node=self.agent.name, region=region, gone=gone, still_held=sorted(still),
            wall_s=wall, signature=sign_bytes(self.agent.bundle.key_pem, payload),
            cert_pem=self.agent.bundle.cert_pem.decode())
