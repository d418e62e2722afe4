"""Data-class policies on this node (``policy.*``): kept in the replicated KV under the
reserved prefix ``core.policy.POLICY_PREFIX`` (one key per class, plus an index key
listing the classes), and cached here for the checks every put and every replica receiver
make (``core.policy.resolve``, ``core.policy.copy_refusal``).

The cache is refreshed every ``DataPlaneConfig.policy_refresh_s`` (every class in the
index and every class it holds), on this node's own writes, and on a miss: a class a
request names that the cache has not read in the last ``policy_refresh_s`` is read at once
(a quorum KV read), so a policy set through another node applies here on the next request
that names it. A policy change another node made is therefore seen here at most
``policy_refresh_s`` late for classes this node already had cached.

A change that would leave existing copies outside the class's regions is refused, naming
them, unless ``migrate``: then the policy is written, every live member rewrites the rule
of its copies of the class that the new regions break (``policy.migrate_local``;
``core.policy.migrated_regions`` decides the new rule) and hands them to
``ReplicaManager`` again under it, so the ordinary re-replication moves them: copies go
to the new replica set (receivers check the new rule), and a holder outside it drops its
copy once every member of the set keeps one. The node asked waits up to
``migrate_wait_s`` for no copy to be left outside and reports what moved.

A member that did not answer then (down, cut off) does the same by itself: whenever its
cache reads a class's policy whose regions differ from the ones it had cached (or a class
it had none cached for, as after a restart), it rewrites its own copies of the class the
same way (``_migrate_own``), as the simulator's nodes do on hearing a change
(``sim/policy_chaos.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping

import msgspec

from meshscale.core.api import ApiError, Empty, ErrorCode
from meshscale.core.api import objects as api
from meshscale.core.api import policy as papi
from meshscale.core.audit import Kind
from meshscale.core.kv import Consistency
from meshscale.core.placement import Residency
from meshscale.core.policy import (
    POLICY_PREFIX,
    ClassPolicy,
    PolicyError,
    breaking_copies,
    check_class_name,
    decode_policy,
    encode_policy,
    make_policy,
    migrated_regions,
    policy_key,
)
from meshscale.core.replication import ObjectPolicy
from meshscale.runtime.data.catalog import Catalog
from meshscale.runtime.data.kv import KvStore
from meshscale.runtime.data.state import _stamp
from meshscale.runtime.storage import ObjectMeta
from meshscale.transport.rpc import RpcError

POLICY_INDEX_KEY = POLICY_PREFIX + ".index"
"""The KV key listing the classes that have a policy (a class name never starts with
``.``, so it is never a class's key)."""
INDEX_WRITE_TRIES = 3
"""Times an index update is written and read back before the call fails (two admins
changing different classes at once: last-writer-wins may drop one name)."""

_MIGRATE_POLL_S = 0.25
_names_encoder = msgspec.msgpack.Encoder()
_names_decoder = msgspec.msgpack.Decoder(list[str])


class Policies(Catalog, KvStore):
    """The ``policy.*`` methods and the node's cache of class policies."""

    # -- the cache

    def _policy_view(self) -> Mapping[str, ClassPolicy]:
        """The class policies this node knows now (no I/O)."""
        return self.policies

    async def _policies_for(self, names: Iterable[str | None]) -> Mapping[str, ClassPolicy]:
        """The known policies, after reading at once any of ``names`` not read in the last
        ``policy_refresh_s`` (a miss, or a class not cached)."""
        now = time.monotonic()
        for name in {n for n in names if n is not None}:
            if now - self._policy_read_at.get(name, -1e18) < self.cfg.policy_refresh_s:
                continue
            with contextlib.suppress(ApiError, PolicyError, ValueError):
                await self._policy_fetch(name)
        return self.policies

    async def _policy_fetch(self, name: str) -> tuple[ClassPolicy | None, str | None]:
        """Read class ``name``'s policy (a quorum KV read) into the cache."""
        got = await self._rpc_kv_get(api.KvKeyRequest(key=policy_key(name)))
        policy = None if got.value is None else decode_policy(got.value)
        self._policy_remember(name, policy, got.ts)
        return policy, got.ts

    def _policy_remember(self, name: str, policy: ClassPolicy | None,
                         ts: str | None) -> None:
        cached = self.policies.get(name)
        if policy is None or ts is None:
            self.policies.pop(name, None)
            self._policy_ts.pop(name, None)
        elif name in self.policies or len(self.policies) < self.cfg.max_policies:
            self.policies[name] = policy
            self._policy_ts[name] = ts
            if (cached is None or cached.regions != policy.regions) \
                    and self.rm is not None \
                    and self.store is not None:
                # This node's copies of the class follow the rule it now knows, whether
                # or not a `policy set --migrate` reached it when it was made.
                self.agent.spawn(self._migrate_own(name, "policy refresh"))
            if cached is None or cached.regions != policy.regions \
                    or cached.stream_regions != policy.stream_regions \
                    or cached.cross_region_reads != policy.cross_region_reads:
                for listener in self.policy_listeners:
                    listener(name)
        self._policy_read_at[name] = time.monotonic()
        if len(self._policy_read_at) > 4 * self.cfg.max_policies:
            # Misses of names that have no policy: forget the oldest.
            for old in sorted(self._policy_read_at, key=self._policy_read_at.__getitem__)[
                    :len(self._policy_read_at) // 2]:
                if old not in self.policies:
                    self._policy_read_at.pop(old, None)

    async def _policy_index(self) -> list[str]:
        got = await self._rpc_kv_get(api.KvKeyRequest(key=POLICY_INDEX_KEY))
        if got.value is None:
            return []
        try:
            return sorted(set(_names_decoder.decode(got.value)))
        except msgspec.DecodeError:
            self._count("policy_index_unreadable")
            return []

    async def _policy_refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.policy_refresh_s)
            try:
                names = set(await self._policy_index()) | set(self.policies)
                for name in sorted(names)[:self.cfg.max_policies]:
                    with contextlib.suppress(PolicyError):
                        await self._policy_fetch(name)
                self._count("policy_refreshes")
            except (ApiError, ValueError) as e:  # no quorum now: the next round retries
                self._count("policy_refresh_failed")
                self.agent.log("debug", "policy_refresh_failed", error=str(e)[:200])

    async def _policy_index_update(self, name: str, present: bool) -> None:
        for _ in range(INDEX_WRITE_TRIES):
            names = set(await self._policy_index())
            if (name in names) == present:
                return
            if present:
                if len(names) >= self.cfg.max_policies:
                    raise ApiError(ErrorCode.INVALID, (
                        f"the mesh already has {len(names)} class policies "
                        f"(max_policies={self.cfg.max_policies})"))
                names.add(name)
            else:
                names.discard(name)
            await self._kv_write(POLICY_INDEX_KEY, _names_encoder.encode(sorted(names)),
                                 Consistency.QUORUM)
        if (name in set(await self._policy_index())) != present:
            raise ApiError(ErrorCode.UNAVAILABLE, (
                f"the policy of {name!r} was written but the class index did not keep it "
                "(another change raced it): run the command again"))

    # -- RPCs

    async def _rpc_policy_set(self, req: papi.PolicySetRequest) -> papi.PolicySetReply:
        try:
            new = make_policy(req.name, req.regions, replicas=req.replicas, ttl_s=req.ttl_s,
                              cross_region_reads=req.cross_region_reads,
                              stream_regions=req.stream_regions)
        except PolicyError as e:
            raise ApiError(ErrorCode.INVALID, f"{e.rule}: {e}") from None
        previous, prev_ts = await self._policy_fetch(new.name)
        checked, broken = await self._class_copies(new)
        if broken and not req.migrate:
            where = ", ".join(f"{oid[:16]}… in {region}" for oid, region in broken[:5])
            more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
            raise self._refuse("policy_change", (
                f"policy of class {new.name} not changed: {len(broken)} existing "
                f"cop{'y' if len(broken) == 1 else 'ies'} would be outside regions "
                f"{{{','.join(new.regions)}}} ({where}{more})"), data_class=new.name)
        ts = await self._kv_write(policy_key(new.name), encode_policy(new), Consistency.QUORUM)
        self._policy_remember(new.name, new, ts)
        await self._policy_index_update(new.name, True)
        self._count("policy_sets")
        moved: list[papi.MovedObject] = []
        still: list[str] = []
        if broken:
            moved, still = await self._migrate(new, broken)
        self.agent.record(Kind.POLICY_CHANGE, policy_key(new.name), data_class=new.name,
                          detail=f"set {new.describe()}"
                          + ("" if previous is None else f"; was {previous.describe()}")
                          + (f"; migrated {len(moved)} objects" if broken else "")
                          + (f", {len(still)} copies still outside" if still else ""))
        self.agent.log("info", "policy_set", data_class=new.name, regions=list(new.regions),
                       replicas=new.replicas)
        return papi.PolicySetReply(
            policy=papi.PolicyInfo.of(new, ts),
            previous=None if previous is None or prev_ts is None
            else papi.PolicyInfo.of(previous, prev_ts),
            checked_objects=checked, migrated=moved, still_outside=still)

    async def _migrate(self, new: ClassPolicy, broken: list[tuple[str, str]]
                       ) -> tuple[list[papi.MovedObject], list[str]]:
        """Have every live member rewrite the rule of its copies that ``new`` breaks, then
        wait (``migrate_wait_s``) for re-replication to move them; what moved, and the
        copies still outside."""
        req = papi.MigrateLocalRequest(name=new.name, regions=list(new.regions))
        answers = await self._fan_out(papi.MIGRATE_LOCAL, req)
        self._count("policy_migrations")
        self.agent.log("info", "policy_migrate", data_class=new.name, copies=len(broken),
                       members=sum(a is not None for a in answers.values()))
        deadline = time.monotonic() + self.cfg.migrate_wait_s
        left = broken
        while True:
            _, left = await self._class_copies(new)
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(_MIGRATE_POLL_S)
        after = await self._class_regions(new.name, {oid for oid, _ in broken})
        from_regions: dict[str, set[str]] = {}
        for oid, region in broken:
            from_regions.setdefault(oid, set()).add(region)
        moved = [papi.MovedObject(oid, sorted(regs), sorted(after.get(oid, ())))
                 for oid, regs in sorted(from_regions.items())]
        return moved, [f"{oid} in {region}" for oid, region in left]

    async def _class_regions(self, name: str, oids: set[str]) -> dict[str, set[str]]:
        """The regions holding a copy of each of ``oids`` (of class ``name``) now."""
        regions = {m.name: m.meta.region for m in self.agent.m.members.values()}
        out: dict[str, set[str]] = {}
        for oid in sorted(oids):
            for node in await self._holders(oid):
                out.setdefault(oid, set()).add(regions.get(node, ""))
        return out

    def _rewrite_rules(self, name: str, regions: tuple[str, ...]
                       ) -> list[tuple[ObjectMeta, frozenset[str]]]:
        """In a thread: give this node's copies of class ``name`` that ``regions`` break
        their new rule in the store; the copies changed, with it."""
        store = self.store
        assert store is not None
        policy = make_policy(name, regions)
        changes: list[tuple[ObjectMeta, frozenset[str]]] = []
        after = ""
        while True:
            page = store.list(after=after, limit=1000)
            for meta in page:
                if meta.data_class != name:
                    continue
                target = migrated_regions(meta.residency, policy)
                if target is not None:
                    changes.append((meta, target))
            if len(page) < 1000:
                break
            after = page[-1].object_id
        done = set(store.set_residency((m.object_id, tuple(sorted(t))) for m, t in changes))
        return [(m, t) for m, t in changes if m.object_id in done]

    async def _rpc_policy_migrate_local(self, req: papi.MigrateLocalRequest
                                        ) -> papi.MigrateLocalReply:
        try:
            policy = make_policy(req.name, req.regions)
        except PolicyError as e:
            raise ApiError(ErrorCode.INVALID, f"{e.rule}: {e}") from None
        rewritten = await self._migrate_own(req.name, "policy migrate", policy)
        return papi.MigrateLocalReply(node=self.agent.name, rewritten=rewritten)

    async def _migrate_own(self, name: str, why: str,
                           policy: ClassPolicy | None = None) -> list[str]:
        """Rewrite the rule of this node's copies (and tombstones) of class ``name`` that
        ``policy`` (None: the class's policy as this node knows it now) breaks, and hand
        them to the replica manager again under it; the ids of the copies rewritten.
        ``why`` goes into the audit entries."""
        async with self._migrate_lock:
            if policy is None:
                policy = self.policies.get(name)
                if policy is None:
                    return []
            assert self.rm is not None
            changed = await asyncio.to_thread(self._rewrite_rules, name, policy.regions)
            now = time.monotonic()
            for meta, target in changed:
                # Handed to the replica manager again under the new rule: the ordinary
                # re-replication (handoff of a copy outside its set, repair of a short set)
                # moves it from here.
                self.rm.object_removed(meta.object_id, now)
                self.rm.object_added(meta.object_id,
                                     ObjectPolicy(meta.replicas, Residency(target, name)),
                                     meta.hint_for, now, _stamp(meta.written))
                self.agent.record(Kind.POLICY_CHANGE, meta.object_id, data_class=name,
                                  detail=f"copy's rule rewritten to regions "
                                         f"{{{','.join(sorted(target))}}} ({why})")
            self._count("copies_migrated", len(changed))
            # Its tombstones of the class too, or a delete kept under the old rule would not
            # follow the copies the migration moves (a deleted object would live on there).
            tombs = self.rm.migrate_tombstones(policy)
            self._count("tombstones_migrated", len(tombs))
            if changed or tombs:
                self.agent.log("info", "policy_migrated_here", data_class=name, why=why,
                               copies=len(changed), tombstones=len(tombs))
            self._pump()
            return [m.object_id for m, _ in changed]

    async def _class_copies(self, new: ClassPolicy) -> tuple[int, list[tuple[str, str]]]:
        """The objects of class ``new.name`` the live members hold, and the copies among
        them that ``new`` would leave outside its regions: (object id, region)."""
        regions = {m.name: m.meta.region for m in self.agent.m.members.values()}
        limit = self.cfg.policy_scan_max_objects
        names = [c.name for c in self._view()]
        got = await asyncio.gather(*(self._member_copies(n, limit) for n in names),
                                   return_exceptions=True)
        copies: list[tuple[str, str]] = []
        for node, page in zip(names, got, strict=True):
            if isinstance(page, RpcError | ValueError | TimeoutError):
                continue  # a silent member: its copies are checked when it is back
            if isinstance(page, BaseException):
                raise page
            if page is None:
                raise self._refuse("policy_scan", (
                    f"cannot check the existing copies of class {new.name}: more than "
                    f"{limit} objects on member {node} (policy_scan_max_objects)"),
                    data_class=new.name)
            copies += [(d.id, regions.get(node, "")) for d in page
                       if d.residency is not None and d.residency.data_class == new.name]
        return len({oid for oid, _ in copies}), breaking_copies(new, copies)

    async def _rpc_policy_get(self, req: papi.PolicyNameRequest) -> papi.PolicyInfo:
        try:
            if req.cached:
                await self._policies_for([check_class_name(req.name)])
                policy, ts = self.policies.get(req.name), self._policy_ts.get(req.name)
            else:
                policy, ts = await self._policy_fetch(req.name)
        except PolicyError as e:
            raise ApiError(ErrorCode.INVALID, f"{e.rule}: {e}") from None
        if policy is None or ts is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"no policy for data class {req.name!r}")
        return papi.PolicyInfo.of(policy, ts)

    async def _rpc_policy_list(self, req: Empty) -> list[papi.PolicyInfo]:
        out = []
        for name in (await self._policy_index())[:self.cfg.max_policies]:
            with contextlib.suppress(PolicyError):
                policy, ts = await self._policy_fetch(name)
                if policy is not None and ts is not None:
                    out.append(papi.PolicyInfo.of(policy, ts))
        return out

    async def _rpc_policy_delete(self, req: papi.PolicyNameRequest) -> papi.PolicyDeleteReply:
        try:
            policy, _ = await self._policy_fetch(req.name)
        except PolicyError as e:
            raise ApiError(ErrorCode.INVALID, f"{e.rule}: {e}") from None
        if policy is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"no policy for data class {req.name!r}")
        ts = await self._kv_write(policy_key(req.name), None, Consistency.QUORUM)
        self._policy_remember(req.name, None, None)
        await self._policy_index_update(req.name, False)
        self._count("policy_deletes")
        self.agent.record(Kind.POLICY_CHANGE, policy_key(req.name), data_class=req.name,
                          detail=f"deleted; was {policy.describe()}")
        self.agent.log("info", "policy_deleted", data_class=req.name)
        return papi.PolicyDeleteReply(name=req.name, ts=ts)
