"""The node's data plane: the driver of ``core.replication`` and ``core.kv``.

Decisions (where copies go, when to repair, hand off or drop, who wins a KV race) are
made in ``core/``; this module only moves bytes and keeps the disk:

- the local store (``runtime.storage.LocalStore``: files under their hash, SQLite index,
  fsync before anything is acknowledged);
- node-to-node transfers over the agent's mutual-TLS connections, chunked RPCs
  (``obj.rw_begin`` / ``obj.rw_chunk`` / ``obj.rw_end``); the receiver commits with the
  expected id, so a corrupt or truncated transfer never becomes a visible object;
- the client-facing RPCs ``obj.*`` and ``kv.*`` (see ``client/mesh.py``).

Reads: a node serves a read from its own copy after checking its hash (a corrupt copy is
quarantined and reported, so anti-entropy refills it) or, when it has none, proxies the
bytes from a node that has one. The client checks the hash of the whole object again. A
copy hash-checked in the last ``verified_ttl_s`` (at its commit or by a read) whose file
is unchanged (inode, size, mtime, ctime; the node's own links of it for tasks' workers
change only its ctime and are excepted) is not re-hashed: see ``DataPlaneConfig``.

Puts: a client that names the object's id up front gets a cut-through put (its chunks
go on to the replica set as they arrive, see ``_start_forwards``); without it, the
coordinator stores the object, then pushes it. Either way the write is acknowledged only
when W copies are committed (fsynced, hash checked against the id) on distinct nodes.

Full disks: every ``disk_check_interval_s`` the node compares its free space with its
reserve (``StorageConfig.min_free_bytes``), counting any write the store refused for want of
room meanwhile, and advertises itself full, or not, in its gossiped tags (``placement.FULL_TAG``; the hysteresis is ``placement.disk_full``, with
``disk_room_margin_bytes``). Its peers then leave it out of new replica sets (puts and
their cut-through copies, stand-ins, repair, KV writes) while its copies stay readable
and counted; see ``core/placement.py`` and ``core/replication.py``.

Deletes (``obj.delete``): the node asked finds the holders, stamps the delete with its HLC
(after catching up with the newest write of the object it heard of) and hands it to
``ReplicaManager.delete``, which drops copies and spreads a tombstone; tombstones are kept
in the store (``obj_tombstones``) so a restarted node still refuses the deleted copies,
and they expire after ``ReplicationConfig.tombstone_grace_s``."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from meshscale.core.api import Empty
from meshscale.core.api import erasure as erasure_api
from meshscale.core.api import objects as api
from meshscale.core.api import policy as policy_api
from meshscale.core.membership import VIEW_CHANGES, MemberReaped
from meshscale.core.outputs import Event
from meshscale.core.placement import Residency
from meshscale.core.replication import ObjectPolicy, ReplicaManager
from meshscale.runtime.data.catalog import Catalog
from meshscale.runtime.data.erasure import Erasure
from meshscale.runtime.data.kv import KvStore
from meshscale.runtime.data.policy import Policies
from meshscale.runtime.data.reads import Reads
from meshscale.runtime.data.repair import ReplicaDriver
from meshscale.runtime.data.state import _stamp, policy_of
from meshscale.runtime.data.uploads import Uploads
from meshscale.runtime.storage import LocalStore


class DataPlane(Policies, Erasure, Uploads, Reads, Catalog, KvStore, ReplicaDriver):
    """Objects and KV on one node; created and started by ``NodeAgent``. Each room is a
    file of ``runtime/data/``; this one starts and stops them and serves their methods."""

    async def start(self) -> None:
        agent = self.agent
        self.store = await asyncio.to_thread(LocalStore, agent.data_dir / "store", self.cfg.storage)
        now = time.monotonic()
        self.rm = ReplicaManager(
            agent.name, config=self.cfg.replication, rng=random.Random(agent.rng.random()), now=now
        )
        # The class policies this node knows: a received tombstone is kept under its rule
        # narrowed to its class's, as a received copy is (uploads.py, core.policy.stored_rule).
        self.rm.class_policies = self.policies
        # The view first (this node alone, until it joins): each copy read below is placed
        # once as it is added, not all of them again by a view change at the end.
        self.rm.set_view(self._view(), now)
        # Tombstones first (few): a read of a deleted object must not be served from a
        # copy that outlived its delete. Then reads are served from the store while the
        # copies are read into the replica manager (O(objects)): a restarted node answers
        # for its copies at once; writes and replication wait for the whole inventory.
        after = ""
        while True:
            tombs = await asyncio.to_thread(self.store.tombstones, after=after, limit=1000)
            for oid, ts, replicas, data_class, residency, moved in tombs:
                stamp = _stamp(ts)
                if stamp is not None:
                    rule = None if residency is None and data_class is None else Residency(
                        None if residency is None else frozenset(residency), data_class)
                    self.rm.tombstone_loaded(oid, ObjectPolicy(replicas, rule), stamp,
                                             moved=moved)
            if len(tombs) < 1000:
                break
            after = tombs[-1][0]
        self._serve_reads()
        after = ""
        while True:
            page = await asyncio.to_thread(self.store.list, after=after, limit=1000)
            for meta in page:
                self.rm.object_added(meta.object_id, policy_of(meta), meta.hint_for, now,
                                     _stamp(meta.written))
            # Not an UnderReplicated event kept per copy until the end (_hold_outputs).
            self._hold_outputs()
            if len(page) < 1000:
                break
            after = page[-1].object_id
        for key, target, ts, since in await asyncio.to_thread(self.store.kv_hints):
            stamp = _stamp(ts)
            if stamp is not None:
                self.hints.load(key, target, stamp, since)
        self.rm.set_view(self._view(), now)
        self.hints.set_view(self._view(), self._down_view())
        self._serve()
        agent.event_listeners.append(self._on_member_event)
        await self._check_disk()  # before the node joins: it comes back full if it is
        agent.spawn(self._housekeeping())
        agent.spawn(self._watch_disk())
        agent.spawn(self._hand_off_loop())
        agent.spawn(self._policy_refresh_loop())
        self._pump()

    def _serve_reads(self) -> None:
        """Reads of what this node holds, and lookups: served from the store (and the
        tombstones) before the replica manager knows every copy."""
        serve = self.agent.serve
        serve(api.READ, self._rpc_read)
        serve(api.READ_LOCAL, self._rpc_read_local)
        serve(api.LOCAL_STAT, self._rpc_local_stat)
        serve(api.LOCAL_LIST, self._rpc_local_list)

    def _serve(self) -> None:
        serve = self.agent.serve
        serve(api.PUT_BEGIN, self._rpc_put_begin)
        serve(api.PUT_CHUNK, self._rpc_put_chunk)
        serve(api.PUT_END, self._rpc_put_end)
        serve(api.PUT_ABORT, self._rpc_put_abort)
        serve(api.PUT_SMALL, self._rpc_put_small)
        serve(api.RW_BEGIN, self._rpc_rw_begin)
        serve(api.RW_CHUNK, self._rpc_put_chunk)
        serve(api.RW_END, self._rpc_rw_end)
        serve(api.RW_SMALL, self._rpc_rw_small)
        serve(api.STAT, self._rpc_stat)
        serve(api.LIST, self._rpc_list)
        serve(api.CORRUPT_LOCAL, self._rpc_corrupt_local)
        serve(api.DELETE, self._rpc_delete)
        serve(api.REPL_MSG, self._rpc_repl_msg)
        serve(api.KV_PUT, self._rpc_kv_put)
        serve(api.KV_DELETE, self._rpc_kv_delete)
        serve(api.KV_GET, self._rpc_kv_get)
        serve(api.KV_APPLY, self._rpc_kv_apply)
        serve(api.KV_APPLY_BATCH, self._rpc_kv_apply_batch)
        serve(api.KV_PUT_BATCH, self._rpc_kv_put_batch)
        serve(api.KV_VERSIONS, self._rpc_kv_versions)
        serve(api.KV_READ, self._rpc_kv_read)
        serve(api.KV_LIST, self._rpc_kv_list)
        serve(api.KV_SCAN, self._rpc_kv_scan)
        serve(api.DP_STATS, self._rpc_stats)
        serve(policy_api.SET, self._rpc_policy_set)
        serve(policy_api.GET, self._rpc_policy_get)
        serve(policy_api.LIST, self._rpc_policy_list)
        serve(policy_api.DELETE, self._rpc_policy_delete)
        serve(policy_api.MIGRATE_LOCAL, self._rpc_policy_migrate_local)
        serve(erasure_api.RUN, self._rpc_erase)
        serve(erasure_api.CONFIRM, self._rpc_erase_confirm)

    async def stop(self) -> None:
        self._timer.cancel()
        for task in list(self._forward_tasks):
            task.cancel()
        for up in [*self._uploads.values(), *(sp.up for sp in self._spares.values())]:
            with contextlib.suppress(Exception):
                self._abort_upload(up)
        self._uploads.clear()
        self._spares.clear()
        if self.store is not None:
            self.store.close()

    def _on_member_event(self, ev: Event) -> None:
        if isinstance(ev, (*VIEW_CHANGES, MemberReaped)):
            self._kv_placer = None  # a reaped member leaves the down view (intended sets)
        if self.rm is None:
            return
        if isinstance(ev, VIEW_CHANGES):
            self.rm.set_view(self._view(), time.monotonic())
            self._pump()
        if isinstance(ev, (*VIEW_CHANGES, MemberReaped)):
            # A reaped member leaves the down view: hints for it go to the key's replicas.
            self.hints.set_view(self._view(), self._down_view())
            self._hints_wake.set()

    async def _rpc_stats(self, req: Empty) -> api.DataPlaneStats:
        assert self.store is not None and self.rm is not None
        st = await asyncio.to_thread(self.store.stats)
        return api.DataPlaneStats(
            store=st, dataplane=dict(self.stats), replication=dict(self.rm.stats),
            uploads=len(self._uploads),
            kv_hints={**self.hints.stats, "keys": len(self.hints), "watched": self.hints.watched})
