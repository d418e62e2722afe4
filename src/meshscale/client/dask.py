"""Dask on the mesh (issue 20, item 2; ``meshscale.dask`` re-exports it):
``cluster(mesh, ...)`` starts a Dask scheduler here and Dask workers as mesh tasks,
placed by the mesh, and returns an object ``distributed.Client`` accepts::

    with meshscale.connect(address) as mesh, \\
            cluster(mesh, region="eu-west", workers=2, inputs=["meshscale://sales/"],
                    storage_options=wopts) as c, distributed.Client(c) as client:
        c.read_parquet("meshscale://sales/").groupby("region").amount.sum().compute()

What it is:

- Each worker is one long-running mesh task (``serve_worker``: a ``distributed.Worker``
  with ``threads`` threads inside the task's worker process, no nanny), so the mesh's
  scheduler picks its node, its cgroup and limits apply, and a worker whose node dies is
  run again by the mesh on another node (a task lost with its node is retried), which
  re-joins the scheduler. ``close()`` shuts the Dask workers down (their tasks return),
  cancels any that did not (the mesh kills their processes) and stops the scheduler.
- ``region``: a region's name, ``"central"`` (the mesh's central region, as a stream
  operator's ``central`` placement resolves it: ``core.streams.central_region``, the
  region with the most live nodes, ties by name) or None (anywhere). A region with no
  live node is a ``DaskClusterError`` naming the live ones.
- ``inputs``: the job's objects (``meshscale://`` names, directories, ids or
  ``ObjectRef``). Every worker task declares one of them as its task input (an
  *anchor*: the inputs are dealt out so the anchors' holders differ where they can),
  so the mesh's own data-locality placement puts it on a node holding that object (in
  ``data`` mode only holders may take it first; in a region its cost counts the bytes a
  node lacks). The anchor is not passed to the Dask worker (no bytes are read for it on a
  holder: the node only links its local copy). Before any worker starts, the mesh's own
  feasibility rule (``core.scheduling.feasible``) is applied to a task declaring *every*
  input with the cluster's region, so an input whose residency excludes that region is a
  ``DaskClusterError`` naming the rule, as the mesh would refuse a task reading it.
- Locality for Dask: the cluster learns from the mesh's task records which node each
  Dask worker runs on (``worker_nodes``); ``read_parquet`` builds one Dask task per
  object, restricted (loosely: ``allow_other_workers``) to the workers on that object's
  holders, and each read goes through the worker's own node, which serves its local copy.

What it is not (yet): the scheduler runs in this process, not on a mesh node; a plain
``dd.read_parquet("meshscale://...")`` gets no locality (Dask's planner does not ask the
filesystem where blocks are): use ``cluster.read_parquet``; and the residency check is
on declared inputs: the mesh does not refuse a read of an object by a worker outside its
residency (the rule governs where copies and tasks live, not who may read).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

from distributed import LocalCluster

import meshscale.client.fs  # noqa: F401  (registers meshscale://, which the workers read)
from meshscale.client.fs import expand
from meshscale.client.mesh import MeshError, ObjectInfo, ObjectNotFoundError, ObjectRef
from meshscale.client.shipping import Region
from meshscale.client.tasks import Future, TaskFunction, TaskMesh
from meshscale.core.api.tasks import TaskWire
from meshscale.core.placement import Candidate, PlacementError, Residency
from meshscale.core.scheduling import (
    Central,
    DataLocal,
    InputRef,
    NodeState,
    Resources,
    SchedulingError,
    TaskSpec,
    feasible,
)
from meshscale.core.streams import central_region as _central_region

__all__ = ["CENTRAL", "DaskClusterError", "MeshDaskCluster", "central_region", "cluster",
           "serve_worker"]

CENTRAL: Final = "central"
"""``region=CENTRAL``: the mesh's central region (``core.streams.central_region``)."""
WORKER_TIMEOUT_S: Final = 7 * 86400.0
"""A worker task's time limit (the mesh kills it after this long)."""
CLOSE_WAIT_S: Final = 30.0
"""How long ``close`` waits for worker tasks to return before cancelling them."""
MAX_INPUTS: Final = 100_000
"""Most objects ``inputs`` (or ``read_parquet``) may name."""
STAT_CONCURRENCY: Final = 16
"""Object stats (holders) in flight at once when a cluster looks up many objects."""


NAME_TAKEN_RETRY_S: Final = 0.5
"""How often a worker whose name the scheduler still holds for a lost run asks again."""


class DaskClusterError(MeshError):
    """The cluster could not be started (no node for a worker, a worker that failed)."""


def serve_worker(scheduler: str, threads: int, name: str, memory_limit: str | int,
                 death_timeout_s: float, storage_options: dict[str, Any] | None = None,
                 anchor: str | None = None) -> dict[str, Any]:
    """Run a Dask worker until the scheduler tells it to close (a mesh task's body);
    returns its name and the address it listened on. With ``storage_options``, first
    check that ``meshscale://`` can be reached with them from here (the task fails with
    the reason if not, instead of every Dask task that reads one failing later).
    ``anchor``: the input object the task declared (for the placement; unused here)."""
    from distributed import Worker

    if storage_options is not None:
        from meshscale.client.fs import MeshFileSystem

        MeshFileSystem(**storage_options, skip_instance_cache=True).close()

    async def main() -> dict[str, Any]:
        deadline = time.monotonic() + death_timeout_s
        while True:
            w = Worker(scheduler, nthreads=threads, name=name, memory_limit=memory_limit,
                       death_timeout=death_timeout_s, dashboard=False)
            try:
                await w
                break
            except RuntimeError as e:
                # The mesh runs this task again when its node dies, and the new run can
                # reach the scheduler before it has seen the old run's connection close:
                # the name is still taken. Ask again until the old registration is gone
                # (a run whose twin still lives gives up after death_timeout_s).
                if "name taken" not in str(e.__cause__) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(NAME_TAKEN_RETRY_S)
        address = w.address
        await w.finished()  # type: ignore[no-untyped-call]
        return {"name": name, "address": address, "anchor": anchor}

    return asyncio.run(main())


class _WorkerTask(TaskFunction[..., dict[str, Any]]):
    """``serve_worker`` as a task whose ``anchor`` keyword (an object id) is declared as
    the task's one input: the mesh places it by that object, and the worker's function
    gets the id as a string, not the object's bytes (a plain ``ObjectRef`` argument would
    hand it the bytes)."""

    def _wire(self, args: Sequence[Any], kwargs: dict[str, Any],
              code: tuple[str, bytes] | None = None) -> tuple[str, bytes, TaskWire]:
        fn_id, fn_bytes, wire = super()._wire(args, kwargs, code)
        anchor = kwargs.get("anchor")
        if anchor is not None:
            wire.inputs = [anchor]
        return fn_id, fn_bytes, wire


def _live(mesh: TaskMesh) -> list[dict[str, Any]]:
    return [m for m in mesh.members() if m.get("state") in ("alive", "suspect")]


def central_region(mesh: TaskMesh) -> str:
    """The mesh's central region now: what ``cluster(region="central")`` runs in."""
    got = _resolve_region(mesh, CENTRAL, _live(mesh))
    assert got is not None
    return got


def _resolve_region(mesh: TaskMesh, region: str | None,
                    live: list[dict[str, Any]]) -> str | None:
    """The region the workers must run in: ``region``, the mesh's central region for
    ``"central"`` (unless a region is literally named so), None for anywhere;
    ``DaskClusterError`` for a region with no live node."""
    regions = sorted({str(m["region"]) for m in live})
    if region == CENTRAL and CENTRAL not in regions:
        try:
            return _central_region(Candidate(str(m["name"]), str(m["region"]),
                                            str(m.get("zone") or m["region"])) for m in live)
        except PlacementError as e:
            raise DaskClusterError(f"no central region: {e}") from None
    if region is not None and region not in regions:
        raise DaskClusterError(f"no live node in region {region!r} (live regions: "
                               f"{', '.join(regions) or 'none'})")
    return region


def _stat_many(mesh: TaskMesh, objs: Sequence[tuple[str, str]]) -> list[ObjectInfo]:
    """``stat`` of each ``(path, object id)``, in order, ``STAT_CONCURRENCY`` at a time
    (one round trip each: done one after another they were most of a job's start for
    many objects); ``FileNotFoundError`` naming a path whose object no live node holds."""
    inner = mesh._inner
    gate = asyncio.Semaphore(STAT_CONCURRENCY)

    async def one(path: str, oid: str) -> ObjectInfo:
        async with gate:
            try:
                return await inner.stat(oid)
            except ObjectNotFoundError:
                raise FileNotFoundError(f"{path}: object {oid} is not held by any live "
                                        "node") from None

    async def every() -> list[ObjectInfo]:
        return list(await asyncio.gather(*(one(p, o) for p, o in objs)))

    got: list[ObjectInfo] = mesh._run(every())
    return got


def _stat_inputs(mesh: TaskMesh, inputs: Sequence[str | ObjectRef]) -> list[ObjectInfo]:
    """Each object ``inputs`` name (directories expanded), with its holders and rule."""
    paths = [i.id if isinstance(i, ObjectRef) else i for i in inputs]
    return _stat_many(mesh, expand(mesh, paths, MAX_INPUTS))


def _check_residency(infos: Sequence[ObjectInfo], region: str | None, threads: int,
                     live: list[dict[str, Any]]) -> None:
    """The mesh's feasibility rule for a task declaring every input, in ``region``:
    ``DaskClusterError`` naming the rule if no live node may run it (resources are
    left to the mesh: the members list does not carry them)."""
    spec = TaskSpec(
        task_id="dask-workers", cpus=float(threads),
        inputs=tuple(InputRef(i.id, i.size, tuple(i.holders),
                              None if i.residency is None and i.data_class is None
                              else Residency(None if i.residency is None
                                             else frozenset(i.residency), i.data_class))
                     for i in infos),
        placement=DataLocal() if region is None else Central(region))
    nodes = [NodeState(Candidate(str(m["name"]), str(m["region"]),
                                 str(m.get("zone") or m["region"]),
                                 dict(m.get("labels") or {})),
                       capacity=Resources(float(threads), 0, 0)) for m in live]
    try:
        feasible(spec, nodes)
    except SchedulingError as e:
        where = "anywhere" if region is None else f"in region {region!r}"
        kept = [i for i in infos if region is not None and i.residency is not None
                and region not in i.residency]
        named = "" if not kept else (
            f"; {len(kept)} of the {len(infos)} inputs have a residency without {region!r}: "
            + ", ".join(f"{i.id} (regions={{{','.join(sorted(i.residency or ()))}}}"
                        + (f", class {i.data_class})" if i.data_class else ")")
                        for i in kept[:3]))
        more = ", ..." if len(kept) > 3 else ""
        raise DaskClusterError(f"the job's inputs may not be read by Dask workers {where}: "
                               f"{e.rule} rule: {e}{named}{more}") from None


def _anchors(infos: Sequence[ObjectInfo], n: int, region_nodes: set[str] | None
             ) -> list[str | None]:
    """The input each of ``n`` workers declares: objects with a holder in the region
    first, each object once before any twice, and among those the one whose holders
    have been used least (the most-used of them, then all together: so the anchors'
    holders differ where they can). Which holder runs each worker stays the mesh's
    choice, so every holder of an anchor counts as used."""
    if not infos:
        return [None] * n
    used: Counter[str] = Counter()
    taken: Counter[str] = Counter()
    out: list[str | None] = []
    for _ in range(n):
        best = min(range(len(infos)), key=lambda k: (
            0 if region_nodes is None or set(infos[k].holders) & region_nodes else 1,
            taken[infos[k].id],
            max((used[h] for h in infos[k].holders), default=0),
            sum(used[h] for h in infos[k].holders),
            k))
        info = infos[best]
        taken[info.id] += 1
        for h in info.holders:
            used[h] += 1
        out.append(info.id)
    return out


def _own_node_options(storage_options: dict[str, Any], node_addresses: dict[str, str]
                      ) -> dict[str, Any]:
    """``storage_options`` with the address of the node this Dask worker runs on."""
    from distributed import get_worker

    opts = dict(storage_options)
    with contextlib.suppress(ValueError):
        here = node_addresses.get(get_worker().address)
        if here is not None:
            opts["address"] = here
    return opts


def _read_meta(path: str, storage_options: dict[str, Any],
               node_addresses: dict[str, str]) -> Any:
    """The empty pandas frame of a parquet object's schema (its footer only), read on a
    worker through its own node: the caller's process may be outside the object's
    regions, and a class that forbids cross-region reads is refused there."""
    import pyarrow.parquet as pq

    from meshscale.client.fs import MeshFileSystem

    fs = MeshFileSystem(**_own_node_options(storage_options, node_addresses))
    with fs.open(path, "rb") as f:
        return pq.read_schema(f).empty_table().to_pandas()


def _read_part(path: str, storage_options: dict[str, Any], columns: list[str] | None,
               node_addresses: dict[str, str], oid: str | None = None) -> Any:
    """One object as a pandas frame, read by a Dask task through the node its worker
    runs on (``node_addresses``: Dask worker address -> that node's address): the whole
    object (a get, verified) when every column is wanted, else range reads of the
    columns' chunks. ``oid``: the object ``path`` named when the read was planned, read
    by id (no KV look-up of the name, a quorum read, per task)."""
    import io

    import pandas as pd

    from meshscale.client.fs import MeshFileSystem

    fs = MeshFileSystem(**_own_node_options(storage_options, node_addresses))
    if columns is None:  # every column: one whole read, checked against the id
        return pd.read_parquet(io.BytesIO(fs.cat_file(path if oid is None else oid)))
    return pd.read_parquet(path, filesystem=fs, columns=columns)


def nodes_of_workers(records: Sequence[dict[str, Any]], task_of: dict[str, str],
                     names: dict[str, str]) -> dict[str, str]:
    """Dask worker address -> mesh node, from the mesh's task ``records``, ``task_of``
    (worker name -> its mesh task id) and ``names`` (worker address -> name): only a
    record in state ``running`` places a worker (see ``MeshDaskCluster.worker_nodes``)."""
    by_task = {r["task_id"]: r.get("node") for r in records if r.get("state") == "running"}
    out = {}
    for addr, name in names.items():
        tid = task_of.get(name)
        node = None if tid is None else by_task.get(tid)
        if node:
            out[addr] = str(node)
    return out


class MeshDaskCluster(LocalCluster):
    """A Dask scheduler here (a ``distributed.LocalCluster`` with no local worker) and
    workers as mesh tasks; pass it to ``distributed.Client``. See the module docstring."""

    def __init__(self, mesh: TaskMesh, *, region: str | None, workers: int, threads: int,
                 memory: str | int, scheduler_host: str, start_timeout_s: float,
                 death_timeout_s: float, storage_options: dict[str, Any] | None,
                 inputs: Sequence[str | ObjectRef] | None = None,
                 work_stealing: bool | None = False) -> None:
        import dask

        self.mesh = mesh
        live = _live(mesh)
        self.region = _resolve_region(mesh, region, live)
        self.storage_options = storage_options
        self.inputs: list[ObjectInfo] = [] if not inputs else _stat_inputs(mesh, inputs)
        if self.inputs:
            _check_residency(self.inputs, self.region, threads, live)
        region_nodes = None if self.region is None else {
            str(m["name"]) for m in live if m["region"] == self.region}
        self.anchors = _anchors(self.inputs, workers, region_nodes)
        self.futures: list[Future] = []
        self._closing = False
        steal = ({} if work_stealing is None
                 else {"distributed.scheduler.work-stealing": work_stealing})
        with dask.config.set(steal):  # read once, as the scheduler starts
            super().__init__(  # type: ignore[no-untyped-call]
                n_workers=0, processes=False, protocol="tcp://", host=scheduler_host,
                scheduler_port=0, dashboard_address=f"{scheduler_host}:0",
                name=f"meshscale-dask-{uuid.uuid4().hex[:8]}")
        try:
            run = _WorkerTask(serve_worker, cpus=threads, retries=3,
                              timeout_s=WORKER_TIMEOUT_S,
                              placement=None if self.region is None else Region(self.region))
            calls: list[tuple[Sequence[Any], dict[str, Any]]] = [
                ((self.scheduler_address, threads, self.worker_name(i), memory,
                  death_timeout_s, storage_options), {"anchor": self.anchors[i]})
                for i in range(workers)]
            try:
                # One submit: the mesh spreads a batch over nodes as it places it.
                self.futures = mesh._run(mesh._inner.submit_many(run, calls))
            except MeshError as e:
                raise DaskClusterError(f"a Dask worker could not be placed on the mesh"
                                       f"{self._where()}: {e}") from None
            self._join_workers(workers, start_timeout_s)
        except BaseException:
            self.close()
            raise

    def worker_name(self, i: int) -> str:
        return f"{self.name}-{i}"

    def _join_workers(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.scheduler is not None
        while len(self.scheduler.workers) < n:
            for f in self.futures:
                if f.done():
                    try:
                        got = f.result(timeout=1)
                    except Exception as e:
                        raise DaskClusterError(f"a Dask worker could not start on the mesh"
                                               f"{self._where()}: {e}") from None
                    raise DaskClusterError(f"Dask worker {got.get('name')} stopped at once")
            if time.monotonic() > deadline:
                raise DaskClusterError(
                    f"{len(self.scheduler.workers)} of {n} Dask workers joined in "
                    f"{timeout_s:g} s")
            time.sleep(0.2)

    def _where(self) -> str:
        return "" if self.region is None else f" in region {self.region!r}"

    def worker_tasks(self) -> list[str]:
        """The mesh task ids of the workers."""
        return [f.task_id for f in self.futures]

    def worker_nodes(self) -> dict[str, str]:
        """Dask worker address -> the mesh node it runs on, for the workers joined now
        (from the mesh's task records: a worker the mesh ran again is on its new node).
        Only a record in state ``running`` places a worker: one that ended (a run that
        failed, say a second run of the task refused its taken name) or waits for a node
        names no node the worker is on, and such a worker gets no locality rather than
        another node's."""
        assert self.scheduler is not None
        return nodes_of_workers(
            self.mesh.tasks(limit=1000),
            {self.worker_name(i): f.task_id for i, f in enumerate(self.futures)},
            {addr: str(ws.name) for addr, ws in list(self.scheduler.workers.items())})

    def _locality(self) -> tuple[dict[str, str], dict[str, str]]:
        """(Dask worker address -> mesh node, Dask worker address -> its node's address)."""
        on = self.worker_nodes()
        addr_of = {str(m["name"]): str(m["address"]) for m in _live(self.mesh)}
        return on, {w: addr_of[n] for w, n in on.items() if n in addr_of}

    @staticmethod
    def _near(info: ObjectInfo, on: dict[str, str]) -> list[str]:
        """The Dask workers (of ``on``: worker -> node) on a holder of ``info``."""
        holders = set(info.holders)
        return sorted(w for w, n in on.items() if n in holders)

    def read_parts(self, paths: str | Sequence[str],
                   storage_options: dict[str, Any] | None = None,
                   columns: list[str] | None = None, client: Any = None) -> list[Any]:
        """One Dask future per parquet object ``paths`` name (names, directories, ids),
        in path order: a pandas frame read by a task restricted (loosely:
        ``allow_other_workers``) to the workers on the object's holders, through their
        own node; a name is read as the object it names now (by id: a name bound again
        meanwhile does not change what the job reads). ``storage_options``: the
        workers' (default: the cluster's)."""
        from distributed import default_client

        so = self._options(storage_options)
        client = client if client is not None else default_client()  # type: ignore[no-untyped-call]
        objs = expand(self.mesh, [paths] if isinstance(paths, str) else list(paths),
                      MAX_INPUTS)
        on, node_addresses = self._locality()
        parts = []
        for (path, oid), info in zip(objs, _stat_many(self.mesh, objs), strict=True):
            near = self._near(info, on)
            parts.append(client.submit(_read_part, path, so, columns, node_addresses, oid,
                                       workers=near or None, allow_other_workers=bool(near),
                                       key=f"meshscale-read-{oid[3:19]}-{uuid.uuid4().hex[:8]}",
                                       pure=False))
        return parts

    def read_parquet(self, paths: str | Sequence[str],
                     storage_options: dict[str, Any] | None = None,
                     columns: list[str] | None = None, client: Any = None) -> Any:
        """A ``dask.dataframe`` of ``read_parts`` (one partition per object); its
        columns are the first object's schema, read on a worker next to it (never in
        this process, which may be outside the object's regions)."""
        import dask.dataframe as dd
        from distributed import default_client

        so = self._options(storage_options)
        client = client if client is not None else default_client()  # type: ignore[no-untyped-call]
        parts = self.read_parts(paths, so, columns, client)
        first = expand(self.mesh, [paths] if isinstance(paths, str) else list(paths),
                       MAX_INPUTS)[:1]
        path = first[0][0]
        on, node_addresses = self._locality()
        near = self._near(_stat_many(self.mesh, first)[0], on)
        meta = client.submit(_read_meta, path, so, node_addresses, workers=near or None,
                             allow_other_workers=bool(near), pure=False).result()
        if columns is not None:
            meta = meta[columns]
        return dd.from_delayed(parts, meta=meta, verify_meta=False)

    def _options(self, storage_options: dict[str, Any] | None) -> dict[str, Any]:
        so = storage_options if storage_options is not None else self.storage_options
        if so is None:
            raise ValueError("reading meshscale:// needs storage_options (or the cluster's)")
        return so

    def close(self, timeout: float | None = None) -> Any:
        """Shut the workers down (their tasks return), cancel those that do not, stop the
        scheduler."""
        if not self._closing:
            self._closing = True
            if self.scheduler is not None and self.status.name == "running":
                with contextlib.suppress(Exception):
                    self.sync(  # type: ignore[no-untyped-call]
                        self.scheduler.retire_workers, close_workers=True)
            deadline = time.monotonic() + CLOSE_WAIT_S
            for f in self.futures:
                with contextlib.suppress(Exception):
                    f.result(timeout=max(0.1, deadline - time.monotonic()))
            for f in self.futures:
                with contextlib.suppress(Exception):
                    if not f.done():
                        f.cancel()
        return super().close(timeout)

    def __repr__(self) -> str:
        return (f"<MeshDaskCluster {self.name} scheduler={self.scheduler_address} "
                f"workers={len(self.futures)} region={self.region}>")


def cluster(mesh: TaskMesh, region: str | None = None, *, workers: int = 2, threads: int = 1,
            memory: str | int = "auto", scheduler_host: str = "127.0.0.1",
            start_timeout_s: float = 120.0, death_timeout_s: float = 60.0,
            storage_options: dict[str, Any] | None = None,
            inputs: Sequence[str | ObjectRef] | None = None,
            work_stealing: bool | None = False) -> MeshDaskCluster:
    """A Dask cluster whose ``workers`` run as mesh tasks (in ``region`` if named;
    ``"central"``: the mesh's central region), each with ``threads`` threads (and as
    many cpus asked of the mesh) and ``memory`` (Dask's ``memory_limit``); the scheduler
    listens on ``scheduler_host`` here, which the mesh's nodes must reach.
    ``DaskClusterError`` if the workers cannot start (a region with no live node, inputs
    whose residency excludes the region, a worker that fails).

    ``inputs``: the job's objects (``meshscale://`` names or directories, ids,
    ``ObjectRef``): each worker declares one as its task input, so the mesh places the
    workers on their holders (see the module docstring); ``FileNotFoundError`` for a
    path that names nothing.

    ``storage_options``: the ``meshscale://`` options the job's Dask tasks will use; each
    worker checks it can connect with them before joining, so a bundle the node's worker
    user cannot read (workers are mesh tasks: they run as that user) is a clear error
    here. They travel in the task's record: name a bundle, never a token.

    ``work_stealing``: Dask's work stealing on the cluster's scheduler; off by default,
    as the read tasks are placed on their objects' holders and stealing moves a task
    (and the partition it needs) to another worker, often on another node (in a full
    ``bench/batch.py`` run it moved 418 to 492 MB of the 935 MB input's partitions
    between workers, against 0.21 MB without it); True turns it on, None leaves it to
    the caller's Dask config."""
    if work_stealing is not None and not isinstance(work_stealing, bool):
        raise ValueError(f"work_stealing is True, False or None, not {work_stealing!r:.80}")
    if storage_options is not None:
        if not isinstance(storage_options, dict):
            raise ValueError(f"storage_options is a dict, not {storage_options!r:.80}")
        if "token" in storage_options:
            raise ValueError("storage_options for the workers must not carry a token (it "
                             "would be stored in their task records); give them a bundle")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, not {workers!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, not {threads!r}")
    if region is not None and (not isinstance(region, str) or not region.strip()):
        raise ValueError(f"region must be a region name, 'central' or None, not {region!r}")
    if inputs is not None and (isinstance(inputs, str | ObjectRef)
                               or not isinstance(inputs, Sequence)):
        raise ValueError(f"inputs is a list of paths, ids or ObjectRefs, not {inputs!r:.80}")
    return MeshDaskCluster(mesh, region=region, workers=workers, threads=threads,
                           memory=memory, scheduler_host=scheduler_host,
                           start_timeout_s=start_timeout_s, death_timeout_s=death_timeout_s,
                           storage_options=storage_options, inputs=inputs,
                           work_stealing=work_stealing)
