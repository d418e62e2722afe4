"""The replicated KV (``kv.*``): quorum writes and reads coordinated by ``core.kv.KVCoordinator``
(with read repair), a replica's part (``kv.apply``, ``kv.read``), and hinted handoff of
writes a stand-in took (``core.kv.KVHints``), persisted in the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from meshscale.core.api import ApiError, ErrorCode
from meshscale.core.api import objects as api
from meshscale.core.hlc import ClockSkewError, HLCTimestamp
from meshscale.core.kv import (
    ABSENT,
    Consistency,
    HintDeleted,
    HintSend,
    HintStored,
    KVCoordinator,
    KVPlacement,
    KVRecord,
    ScanPage,
    cas_refusal,
    merge_scans,
    strict_replicas,
)
from meshscale.core.placement import PlacementError, Residency
from meshscale.core.policy import (
    POLICY_PREFIX,
    copy_refusal,
    is_reserved_key,
    kv_key_class,
    kv_residency,
    read_refusal,
)
from meshscale.runtime.data.state import DataPlaneBase, _stamp, _storage_error
from meshscale.runtime.storage import MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES, StorageError
from meshscale.transport.rpc import RemoteError, RpcError

KV_STRAGGLERS_MAX = 256
"""KV replica calls left running after their write returned (see ``_kv_round``)."""


def _straggler_done(
    stragglers: set[asyncio.Future[None]],
) -> Callable[[asyncio.Future[None]], None]:
    def done(fut: asyncio.Future[None]) -> None:
        stragglers.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a late failure was already counted by the coordinator

    return done


def _kv_key(key: str, *, write: bool = False) -> str:
    """A KV key within MAX_KV_KEY_BYTES of UTF-8, else ``invalid`` naming the limit; a
    ``write`` to a reserved key (``core.policy.is_reserved_key``) is ``unauthorized``."""
    if not key:
        raise ApiError(ErrorCode.INVALID, "a KV key is a non-empty string")
    if write and is_reserved_key(key):
        raise ApiError(ErrorCode.UNAUTHORIZED, (
            f"KV keys under {POLICY_PREFIX!r} are reserved for data-class policies: change "
            "them with policy.set / policy.delete (`meshscale policy ...`)"))
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KV_KEY_BYTES:
        raise ApiError(ErrorCode.INVALID,
                       f"a KV key is at most {MAX_KV_KEY_BYTES} bytes (MAX_KV_KEY_BYTES)")
    return key


class KvStore(DataPlaneBase):
    """Quorum KV on this node: coordinator and replica."""

    def _kv_rule(self, key: str) -> Residency | None:
        """The residency rule of ``key``: its data class's regions when it lies under the
        prefix of a class with a policy this node knows (``core.policy.kv_residency``).
        From the cache only, never a read on a miss: every KV operation asks (task records,
        stream offsets...), and a policy read that cannot reach its quorum would stall
        them. So a class set through another node governs its keys here once this node's
        refresh has seen it (within ``policy_refresh_s``)."""
        if kv_key_class(key) is None:
            return None
        return kv_residency(key, self.policies)

    def _read_rule(self, key: str) -> Residency | None:
        """The rule a read of ``key`` from this node follows; refused (naming
        ``cross_region_read``) when the key's class keeps reads inside regions this node's
        is not in."""
        rule = self._kv_rule(key)
        if rule is not None and rule.data_class is not None:
            why = read_refusal(self.agent.meta.region, rule.data_class, self.policies)
            if why is not None:
                raise self._refuse("cross_region_read", f"kv read of {key!r}: {why}",
                                   subject=key, data_class=rule.data_class)
        return rule

    def _write_where(self, key: str, rule: Residency | None) -> KVPlacement:
        """Where a write of ``key`` goes, or the refusal naming why none can take it."""
        try:
            return self._kv_where(key, rule)
        except PlacementError as e:
            if rule is not None:
                raise self._refuse("residency", f"kv write of {key!r}: {e}", subject=key,
                                   data_class=rule.data_class) from None
            raise ApiError(ErrorCode.REFUSED, f"kv write of {key!r} refused: {e}") from None

    async def _kv_write(self, key: str, value: bytes | None, consistency: Consistency,
                        expected: list[str] | None = None, _again: bool = False) -> str:
        rule = self._kv_rule(key)
        if expected is not None:
            # The write's stamp must be above every version it replaces (``for_cas``).
            for e in expected:
                if e != ABSENT:
                    try:
                        self.hlc.update(HLCTimestamp.decode(e), time.time())
                    except ValueError as err:
                        raise ApiError(ErrorCode.INVALID,
                                       f"expected version {e!r:.80}: {err}") from None
        ts = self.hlc.now(time.time())
        rec = KVRecord(key, value, ts)
        where = self._write_where(key, rule)
        away: tuple[str, ...] = ()
        if expected is not None:
            why = cas_refusal(consistency)
            if why is not None:
                raise ApiError(ErrorCode.INVALID, f"kv conditional put of {key!r}: {why}")
            strict, away = strict_replicas(where)
            coord = KVCoordinator.for_cas(rec, strict, consistency, expected)
            for n in away:
                coord.on_failure(n, "down or full (a conditional put takes no stand-in)")
        else:
            # A delete also goes to full members (it needs no room; it must beat their
            # value).
            coord = KVCoordinator.for_put(rec, where.replicas, consistency,
                                          where.full if value is None else ())
        apply = api.KvApplyRequest(key=key, value=value, ts=ts.encode(), expected=expected)

        async def ask(node: str) -> None:
            if node in away:
                return
            # A stand-in is told whom it stands in for (``KVHints``).
            targets = where.hint_targets(node)
            req = msgspec.structs.replace(apply, hint_for=list(targets)) if targets else apply
            got = await self._call(node, api.KV_APPLY, req)
            if got.conflict:
                coord.on_conflict(node, got.current)
            else:
                coord.on_reply(node, None)

        # A conditional put waits for every replica: a refusal may name a residue to
        # overwrite (``KVCoordinator.residues``).
        await self._kv_round(coord, ask, reads=expected is not None)
        if coord.outcome is not None and coord.outcome.ok and expected is not None \
                and not _again:
            residues = coord.residues()
            if residues:
                self._count("kv_cas_residues_overwritten", len(residues))
                with contextlib.suppress(ApiError):
                    return await self._kv_write(key, value, consistency,
                                                [ts.encode(), *residues], _again=True)
        if coord.outcome is None or not coord.outcome.ok:
            reason = coord.outcome.reason if coord.outcome else "no outcome"
            if coord.outcome is not None and coord.outcome.conflict:
                self._count("kv_cas_conflicts")
                raise ApiError(ErrorCode.CONFLICT,
                               f"kv conditional put of {key!r} refused: {reason}")
            raise ApiError(ErrorCode.UNAVAILABLE, f"kv write of {key!r} failed: {reason}")
        return ts.encode()

    async def _kv_round(self, coord: KVCoordinator, ask: Callable[[str], Awaitable[None]], *,
                        reads: bool) -> None:
        """``ask`` every replica ``coord`` names (``ask`` reports a reply to it); a failure
        or silence is reported here."""
        async def one(name: str) -> None:
            try:
                await asyncio.wait_for(ask(name), self.cfg.kv_timeout_s)
            except (RpcError, ValueError, TimeoutError) as e:
                coord.on_failure(name, str(e) or type(e).__name__)

        calls = [asyncio.ensure_future(one(n)) for n in coord.asked]
        await self._await_replicas(calls, lambda: coord.outcome is not None, reads=reads)
        if coord.outcome is None:
            coord.expire()

    async def _await_replicas(self, calls: Sequence[asyncio.Future[None]],
                              decided: Callable[[], bool], *, reads: bool) -> None:
        """Wait for the replicas' ``calls``: a write returns once ``decided`` (its
        consistency level met: W acknowledgements, or a failure that decides it); the
        other calls finish in the background, at most KV_STRAGGLERS_MAX of them at a time
        (beyond that, wait for all as a read does: its read repair needs every reply)."""
        stragglers = self._kv_stragglers
        early = not reads and len(stragglers) < KV_STRAGGLERS_MAX
        try:
            pending: set[asyncio.Future[None]] = set(calls)
            while pending and (not early or not decided()):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            for c in calls:
                c.cancel()
            raise
        for left in pending:
            stragglers.add(left)
            left.add_done_callback(_straggler_done(stragglers))

    async def _rpc_kv_put(self, req: api.KvPutRequest) -> api.KvWriteReply:
        key = _kv_key(req.key, write=True)
        # Checked here too: an in-process call (``call_local``) skips the struct's bounds.
        if len(req.value) > MAX_KV_VALUE_BYTES:
            raise ApiError(ErrorCode.INVALID, f"a KV value is at most {MAX_KV_VALUE_BYTES} "
                                              f"bytes (MAX_KV_VALUE_BYTES); this one is "
                                              f"{len(req.value)}")
        return api.KvWriteReply(ts=await self._kv_write(key, req.value,
                                                        Consistency(req.consistency),
                                                        req.expected))

    async def _rpc_kv_put_batch(self, req: api.KvPutBatchRequest) -> api.KvPutBatchReply:
        """Several quorum writes at once (``KvPutBatchRequest``): each key with its own
        stamp, replicas and quorum as ``kv.put`` gives it, each replica asked once for all
        of its keys (``kv.apply_batch``). Answers each key's stamp or why it failed."""
        items = req.items
        results = [api.KvItemResult() for _ in items]
        coords: dict[int, tuple[KVCoordinator, KVPlacement, str]] = {}
        per_node: dict[str, list[int]] = {}
        total = 0
        for i, item in enumerate(items):
            try:
                key = _kv_key(item.key, write=True)
                if len(item.value) > MAX_KV_VALUE_BYTES:
                    raise ApiError(ErrorCode.INVALID, f"a KV value is at most "
                                                      f"{MAX_KV_VALUE_BYTES} bytes")
                total += len(item.value)
                if i and total > api.MAX_KV_BATCH_BYTES:
                    raise ApiError(ErrorCode.INVALID, f"a KV batch carries at most "
                                                      f"{api.MAX_KV_BATCH_BYTES} bytes")
                where = self._write_where(key, self._kv_rule(key))
            except ApiError as e:
                results[i] = api.KvItemResult(error=str(e), code=e.code.value)
                continue
            ts = self.hlc.now(time.time())
            coord = KVCoordinator.for_put(KVRecord(key, item.value, ts), where.replicas,
                                          Consistency.QUORUM)
            coords[i] = (coord, where, ts.encode())
            for node in coord.asked:
                per_node.setdefault(node, []).append(i)

        async def ask(node: str, idxs: list[int]) -> None:
            batch = []
            for i in idxs:
                _, where, ts = coords[i]
                batch.append(api.KvApplyItem(key=items[i].key, value=items[i].value, ts=ts,
                                             hint_for=list(where.hint_targets(node))))
            try:
                try:
                    got = await asyncio.wait_for(self._call(
                        node, api.KV_APPLY_BATCH, api.KvApplyBatchRequest(items=batch)),
                        self.cfg.kv_timeout_s)
                except RemoteError as e:
                    if e.code != ErrorCode.UNKNOWN_METHOD.value:
                        raise
                    # A node from before batches: its part of each key, one by one.
                    got = api.KvApplyBatchReply(await asyncio.wait_for(asyncio.gather(
                        *(self._apply_one(node, b) for b in batch)), self.cfg.kv_timeout_s))
            except (RpcError, ValueError, TimeoutError) as e:
                for i in idxs:
                    coords[i][0].on_failure(node, str(e) or type(e).__name__)
                return
            for i, r in zip(idxs, got.results, strict=False):
                if r.error:
                    coords[i][0].on_failure(node, r.error)
                else:
                    coords[i][0].on_reply(node, None)
            for i in idxs[len(got.results):]:
                coords[i][0].on_failure(node, "no answer for this key")

        calls = [asyncio.ensure_future(ask(n, idxs)) for n, idxs in per_node.items()]
        await self._await_replicas(
            calls, lambda: all(c.outcome is not None for c, _, _ in coords.values()),
            reads=False)
        for i, (coord, _, stamp) in coords.items():
            if coord.outcome is None:
                coord.expire()
            if coord.outcome is not None and coord.outcome.ok:
                results[i] = api.KvItemResult(ts=stamp)
            else:
                reason = coord.outcome.reason if coord.outcome else "no outcome"
                results[i] = api.KvItemResult(
                    error=f"kv write of {items[i].key!r} failed: {reason}",
                    code=ErrorCode.UNAVAILABLE.value)
        self._count("kv_batches")
        self._count("kv_batch_keys", len(items))
        return api.KvPutBatchReply(results)

    async def _apply_one(self, node: str, item: api.KvApplyItem) -> api.KvItemResult:
        try:
            got = await self._call(node, api.KV_APPLY, api.KvApplyRequest(
                key=item.key, value=item.value, ts=item.ts, hint_for=item.hint_for))
        except (RpcError, ValueError) as e:
            return api.KvItemResult(error=str(e) or type(e).__name__)
        return api.KvItemResult(applied=got.applied)

    async def _rpc_kv_delete(self, req: api.KvKeyRequest) -> api.KvWriteReply:
        return api.KvWriteReply(ts=await self._kv_write(_kv_key(req.key, write=True), None,
                                                        Consistency(req.consistency)))

    async def _rpc_kv_get(self, req: api.KvKeyRequest) -> api.KvValue:
        key = req.key
        rule = self._read_rule(key)
        try:
            where = self._kv_where(key, rule)
        except PlacementError as e:
            raise ApiError(ErrorCode.REFUSED, f"kv read of {key!r} refused: {e}") from None
        coord = KVCoordinator.for_get(key, where.replicas, Consistency(req.consistency),
                                      where.full)
        read = api.KvReadRequest(key=key)

        async def ask(node: str) -> None:
            got = await self._call(node, api.KV_READ, read)
            rec = None if got is None else KVRecord(key, got.value, HLCTimestamp.decode(got.ts))
            if rec is not None:
                with contextlib.suppress(ClockSkewError, ValueError):
                    self.hlc.update(rec.ts, time.time())
            coord.on_reply(node, rec)

        await self._kv_round(coord, ask, reads=True)
        if coord.outcome is None or not coord.outcome.ok:
            reason = coord.outcome.reason if coord.outcome else "no outcome"
            raise ApiError(ErrorCode.UNAVAILABLE, f"kv read of {key!r} failed: {reason}")
        for node, rec in coord.read_repair():
            self._count("kv_read_repairs")
            self.agent.spawn(self._call(node, api.KV_APPLY, api.KvApplyRequest(
                key=rec.key, value=rec.value, ts=rec.ts.encode())))
        best = coord.winner()
        if best is None:
            return api.KvValue()
        return api.KvValue(value=best.value, ts=best.ts.encode())

    async def _rpc_kv_versions(self, req: api.KvKeyRequest) -> api.KvVersions:
        """Each replica's own record of ``req.key`` (no merge, no read repair), once the
        consistency level's count of them answered; for readers of conditional puts."""
        key = req.key
        rule = self._read_rule(key)
        try:
            where = self._kv_where(key, rule)
        except PlacementError as e:
            raise ApiError(ErrorCode.REFUSED, f"kv read of {key!r} refused: {e}") from None
        # The same strict set a conditional put writes to (full members can be read).
        strict, _ = strict_replicas(where)
        gone = [n for n in strict if n not in where.replicas and n not in where.full]
        coord = KVCoordinator.for_get(key, strict, Consistency(req.consistency))
        for n in gone:
            coord.on_failure(n, "down")
        read = api.KvReadRequest(key=key)
        out: dict[str, api.KvVersion] = {}

        async def ask(node: str) -> None:
            if node in gone:
                return
            got = await self._call(node, api.KV_READ, read)
            if got is None:
                out[node] = api.KvVersion(node=node)
                coord.on_reply(node, None)
                return
            out[node] = api.KvVersion(node=node, ts=got.ts, value=got.value)
            coord.on_reply(node, KVRecord(key, got.value, HLCTimestamp.decode(got.ts)))

        await self._kv_round(coord, ask, reads=True)
        if coord.outcome is None or not coord.outcome.ok:
            reason = coord.outcome.reason if coord.outcome else "no outcome"
            raise ApiError(ErrorCode.UNAVAILABLE, f"kv read of {key!r} failed: {reason}")
        return api.KvVersions(versions=[out[n] for n in sorted(out)])

    def _take_check(self, key: str, ts: str, hint_for: Sequence[str], now: float
                    ) -> tuple[HLCTimestamp, tuple[str, ...]]:
        """A replica's checks of its part of a write of ``key`` stamped ``ts``: the key's
        class rule (checked here, as an object's receiver does), the stamp, and room for
        the hints ``KVHints.plan`` asks for. Returns the stamp and those hints, or raises
        the refusal."""
        rule = self._kv_rule(key)
        why = copy_refusal(self.agent.meta.region, rule, self.policies)
        if why is not None:
            raise self._refuse("residency", f"kv key {key!r:.200}: {why}", subject=key,
                               data_class=None if rule is None else rule.data_class)
        try:
            stamp = HLCTimestamp.decode(ts)
        except ValueError as e:
            raise ApiError(ErrorCode.INVALID, f"bad timestamp {ts!r:.80}: {e}") from None
        targets = self.hints.plan(key, hint_for, now)
        if targets is None:
            raise ApiError(ErrorCode.BUSY, f"hints_full: this node holds hints for "
                                           f"{self.cfg.kv_hints.max_hints} keys (max_hints)")
        return stamp, targets

    async def _rpc_kv_apply(self, req: api.KvApplyRequest) -> api.KvApplyReply:
        """Take one replica's part of a KV write (a coordinator's, a read repair or a
        hand-off), with the hints ``KVHints.plan`` asks for stored in the same transaction
        (``hint_for``: the replicas the coordinator says this node stands in for)."""
        assert self.store is not None
        key, ts = req.key, req.ts
        now = time.time()
        stamp, targets = self._take_check(key, ts, req.hint_for, now)
        with contextlib.suppress(ClockSkewError, ValueError):
            self.hlc.update(stamp, now)
        try:
            if req.expected is not None:
                applied, current = await asyncio.to_thread(
                    self.store.kv_put_if, key, req.value, ts, req.expected, targets, now)
                if not applied:
                    self._count("kv_cas_refused")
                    return api.KvApplyReply(applied=False, conflict=True, current=current)
            else:
                applied = await asyncio.to_thread(self.store.kv_put, key, req.value, ts,
                                                  targets, now)
        except StorageError as e:
            raise _storage_error(e) from None
        if targets and self.hints.add(key, stamp, targets, now):
            self._hints_wake.set()
        return api.KvApplyReply(applied=applied)

    async def _rpc_kv_apply_batch(self, req: api.KvApplyBatchRequest
                                  ) -> api.KvApplyBatchReply:
        """Take one replica's part of several KV writes (``kv.put_batch``) in one
        transaction, each key checked as ``kv.apply`` checks it; a key refused here is
        answered with its reason and the others are applied."""
        assert self.store is not None
        now = time.time()
        results = [api.KvItemResult() for _ in req.items]
        rows: list[tuple[str, bytes | None, str, tuple[str, ...]]] = []
        taken: list[tuple[int, HLCTimestamp]] = []
        for i, item in enumerate(req.items):
            key = item.key
            try:
                stamp, targets = self._take_check(key, item.ts, item.hint_for, now)
            except ApiError as e:
                results[i] = api.KvItemResult(error=str(e), code=e.code.value)
                continue
            with contextlib.suppress(ClockSkewError, ValueError):
                self.hlc.update(stamp, now)
            rows.append((key, item.value, item.ts, targets))
            taken.append((i, stamp))
        if rows:
            try:
                applied = await asyncio.to_thread(self.store.kv_put_many, rows, now)
            except StorageError as e:
                raise _storage_error(e) from None
            for (i, stamp), row, ok in zip(taken, rows, applied, strict=True):
                results[i] = api.KvItemResult(applied=ok)
                if row[3] and self.hints.add(row[0], stamp, row[3], now):
                    self._hints_wake.set()
        self._count("kv_apply_batches")
        return api.KvApplyBatchReply(results)

    async def _rpc_kv_scan(self, req: api.KvListRequest) -> api.KvPage:
        """This replica's records of keys starting with ``req.prefix`` after ``req.after``
        (tombstones included), at most ``req.limit`` and about ``MAX_KV_PAGE_BYTES``;
        ``next`` is set when the page stopped at either bound."""
        assert self.store is not None
        prefix, limit = req.prefix, req.limit
        try:
            rows = await asyncio.to_thread(self.store.kv_scan, prefix, limit,
                                           after=req.after or None)
        except StorageError as e:
            raise _storage_error(e) from None
        out: list[api.KvEntry] = []
        size = 0
        for key, value, ts in rows:
            size += len(key) + len(value or b"") + len(ts)
            if out and size > api.MAX_KV_PAGE_BYTES:
                break
            out.append(api.KvEntry(key=key, value=value, ts=ts))
        full = len(out) < len(rows) or len(rows) >= limit
        return api.KvPage(entries=out, next=out[-1].key if full and out else None)

    async def _rpc_kv_list(self, req: api.KvListRequest) -> api.KvPage:
        """Live keys starting with ``req.prefix``, in key order: every live member's
        ``kv.scan`` of the range merged (``core.kv.merge_scans``: each key's newest record,
        deletes dropped). A member that does not answer is left out, so a key whose
        replicas are all away is missing from the listing until they are back."""
        scans = await self._fan_out(api.KV_SCAN, req, self.cfg.kv_timeout_s)
        pages: list[ScanPage] = []
        for page in scans.values():
            if page is None:
                continue
            recs: list[KVRecord] = []
            for e in page.entries:
                stamp = _stamp(e.ts)
                if stamp is not None and e.key.startswith(req.prefix):
                    recs.append(KVRecord(e.key, e.value, stamp))
            pages.append(ScanPage(tuple(recs), page.next is not None))
        if not pages:
            raise ApiError(ErrorCode.UNAVAILABLE, "kv list failed: no member answered")
        live, nxt = merge_scans(pages, req.limit)
        entries = []
        for r in live:
            rule = self._kv_rule(r.key)
            if rule is not None and read_refusal(self.agent.meta.region, rule.data_class,
                                                 self.policies) is not None:
                # A class that forbids reads from this node's region: its keys are left out
                # of the listing here (counted), as a kv.get of them is refused.
                self._count("kv_list_withheld")
                continue
            entries.append(api.KvEntry(key=r.key, value=r.value, ts=r.ts.encode()))
        return api.KvPage(entries=entries, next=nxt)

    async def _hand_off_loop(self) -> None:
        """Hand hints to their replicas when ``KVHints`` says so: at its deadline, after a
        view change, after a new hint."""
        while True:
            deadline = self.hints.next_deadline()
            delay = 60.0 if deadline is None else min(60.0, max(0.0, deadline - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hints_wake.wait(), delay + 0.001)
            self._hints_wake.clear()
            now = time.time()
            expired = self.hints.stats.get("expired", 0)
            self.hints.expire(now)
            if self.hints.stats.get("expired", 0) > expired:
                self.agent.log("warning", "kv_hints_expired",
                               count=self.hints.stats["expired"] - expired,
                               max_hint_age_s=self.cfg.kv_hints.max_hint_age_s)
            for send in self.hints.due(now):
                self.agent.spawn(self._hand_off(send))
            await self._persist_hints()

    async def _hand_off(self, send: HintSend) -> None:
        """Send this node's record of ``send.key`` to ``send.target`` with its own
        timestamp; report the answer to ``KVHints``."""
        assert self.store is not None
        try:
            got = await asyncio.to_thread(self.store.kv_get, send.key)
            stamp = None if got is None else _stamp(got[1])
            if got is None or stamp is None or stamp < send.ts:
                self.hints.abandon(send.key, send.target)
                self.agent.log("warning", "kv_hint_abandoned", key=send.key[:200],
                               peer=send.target)
                return
            try:
                await asyncio.wait_for(self._call(send.target, api.KV_APPLY, api.KvApplyRequest(
                    key=send.key, value=got[0], ts=got[1])), self.cfg.kv_timeout_s)
            except (RpcError, ValueError, TimeoutError, OSError) as e:
                self.hints.failed(send.key, send.target, time.time())
                self.agent.log("debug", "kv_hand_off_failed", key=send.key[:200],
                               peer=send.target, error=str(e)[:200])
                return
            self.hints.handed_off(send.key, send.target, stamp)
        finally:
            await self._persist_hints()
            self._hints_wake.set()

    async def _persist_hints(self) -> None:
        """Write what ``KVHints`` changed (``drain``) to the store, in order."""
        changes = self.hints.drain()
        if not changes or self.store is None:
            return
        stored = [(c.key, c.target, c.ts.encode(), c.since) for c in changes
                  if isinstance(c, HintStored)]
        deleted = [(c.key, c.target, c.upto.encode()) for c in changes
                   if isinstance(c, HintDeleted)]
        async with self._hints_lock:
            try:
                await asyncio.to_thread(self.store.kv_hints_apply, stored, deleted)
            except StorageError as e:
                # The book in memory still has them; a restart before the next change
                # reloads the older state (a hint handed off twice, or kept longer).
                self._count("kv_hint_persist_failed")
                self.agent.log("warning", "kv_hint_persist_failed", error=str(e)[:200])

    async def _rpc_kv_read(self, req: api.KvReadRequest) -> api.KvRecordWire | None:
        assert self.store is not None
        got = await asyncio.to_thread(self.store.kv_get, req.key)
        if got is None:
            return None
        value, ts = got
        return api.KvRecordWire(value=value, ts=ts)
