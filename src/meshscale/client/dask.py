"""Dask on the mesh (a first piece of issue 20, item 2; ``meshscale.dask`` re-exports
it): ``cluster(mesh, ...)`` starts a Dask scheduler here and Dask workers as mesh tasks,
placed by the mesh (in ``region`` if given), and returns an object ``distributed.Client``
accepts::

    with meshscale.connect(address) as mesh, cluster(mesh, region="eu-west", workers=2) as c:
        with distributed.Client(c) as client:
            dd.read_parquet("meshscale://sales/", storage_options=...).amount.sum().compute()

What it is: each worker is one long-running mesh task (``serve_worker``: a
``distributed.Worker`` with ``threads`` threads inside the task's worker process, no
nanny), so the mesh's scheduler picks its node (the region's nodes when ``region`` is
given), its cgroup and limits apply, and a worker whose node dies is run again by the
mesh on another node (a task lost with its node is retried), which re-joins the scheduler.
``close()`` shuts the Dask workers down (their tasks return), cancels any that did not
(the mesh kills their processes) and stops the scheduler.

What it is not (yet): the scheduler runs in this process, not on a mesh node; workers are
not placed next to a job's inputs, and do not report which objects their node holds to
the Dask scheduler; ``region="central"`` has no meaning of its own (name the region).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any, Final

from distributed import LocalCluster

import meshscale.client.fs  # noqa: F401  (registers meshscale://, which the workers read)
from meshscale.client.mesh import MeshError
from meshscale.client.shipping import Region
from meshscale.client.tasks import Future, TaskMesh, task

__all__ = ["DaskClusterError", "MeshDaskCluster", "cluster", "serve_worker"]

WORKER_TIMEOUT_S: Final = 7 * 86400.0
"""A worker task's time limit (the mesh kills it after this long)."""
CLOSE_WAIT_S: Final = 30.0
"""How long ``close`` waits for worker tasks to return before cancelling them."""


class DaskClusterError(MeshError):
    """The cluster could not be started (no node for a worker, a worker that failed)."""


def serve_worker(scheduler: str, threads: int, name: str, memory_limit: str | int,
                 death_timeout_s: float, storage_options: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Run a Dask worker until the scheduler tells it to close (a mesh task's body);
    returns its name and the address it listened on. With ``storage_options``, first
    check that ``meshscale://`` can be reached with them from here (the task fails with
    the reason if not, instead of every Dask task that reads one failing later)."""
    from distributed import Worker

    if storage_options is not None:
        from meshscale.client.fs import MeshFileSystem

        MeshFileSystem(**storage_options, skip_instance_cache=True).close()

    async def main() -> dict[str, Any]:
        w = Worker(scheduler, nthreads=threads, name=name, memory_limit=memory_limit,
                   death_timeout=death_timeout_s, dashboard=False)
        await w
        address = w.address
        await w.finished()  # type: ignore[no-untyped-call]
        return {"name": name, "address": address}

    return asyncio.run(main())


class MeshDaskCluster(LocalCluster):
    """A Dask scheduler here (a ``distributed.LocalCluster`` with no local worker) and
    workers as mesh tasks; pass it to ``distributed.Client``. See the module docstring."""

    def __init__(self, mesh: TaskMesh, *, region: str | None, workers: int, threads: int,
                 memory: str | int, scheduler_host: str, start_timeout_s: float,
                 death_timeout_s: float, storage_options: dict[str, Any] | None) -> None:
        self.mesh = mesh
        self.region = region
        self.futures: list[Future] = []
        self._closing = False
        super().__init__(  # type: ignore[no-untyped-call]
            n_workers=0, processes=False, protocol="tcp://", host=scheduler_host,
            scheduler_port=0, dashboard_address=f"{scheduler_host}:0",
            name=f"meshscale-dask-{uuid.uuid4().hex[:8]}")
        try:
            run = task(serve_worker, cpus=threads, retries=3, timeout_s=WORKER_TIMEOUT_S,
                       placement=None if region is None else Region(region))
            for i in range(workers):
                try:
                    fut = mesh.submit(run, self.scheduler_address, threads, f"{self.name}-{i}",
                                      memory, death_timeout_s, storage_options)
                except MeshError as e:
                    raise DaskClusterError(f"a Dask worker could not be placed on the mesh"
                                           f"{self._where()}: {e}") from None
                self.futures.append(fut)
            self._join_workers(workers, start_timeout_s)
        except BaseException:
            self.close()
            raise

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
            storage_options: dict[str, Any] | None = None) -> MeshDaskCluster:
    """A Dask cluster whose ``workers`` run as mesh tasks (in ``region`` if named), each
    with ``threads`` threads (and as many cpus asked of the mesh) and ``memory`` (Dask's
    ``memory_limit``); the scheduler listens on ``scheduler_host`` here, which the mesh's
    nodes must reach. ``DaskClusterError`` if the workers cannot start (a region with no
    live node: the mesh refuses the tasks, and the error says why).

    ``storage_options``: the ``meshscale://`` options the job's Dask tasks will use; each
    worker checks it can connect with them before joining, so a bundle the node's worker
    user cannot read (workers are mesh tasks: they run as that user) is a clear error
    here. They travel in the task's record: name a bundle, never a token."""
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
        raise ValueError(f"region must be a region name or None, not {region!r}")
    return MeshDaskCluster(mesh, region=region, workers=workers, threads=threads,
                           memory=memory, scheduler_host=scheduler_host,
                           start_timeout_s=start_timeout_s, death_timeout_s=death_timeout_s,
                           storage_options=storage_options)
