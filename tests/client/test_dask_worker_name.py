"""A Dask worker the mesh runs again (its node died) waits for the scheduler to let go of
its lost run's name, instead of failing at once with "name taken" (which left a job one
worker short for good: tests/client/test_dask_mesh.py saw it under load)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from distributed import Client, LocalCluster, Worker

from meshscale.client.dask import serve_worker
from waiting import wait_for


class _Refusals(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "duplicate name" in record.getMessage():
            self.count += 1


@pytest.mark.timeout(120)
def test_a_worker_run_again_waits_for_its_lost_runs_name() -> None:
    refusals = _Refusals()
    logging.getLogger("distributed.scheduler").addHandler(refusals)
    try:
        with LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                          scheduler_port=0) as lc, Client(lc) as client:
            addr = lc.scheduler_address
            # The first run, still registered under the name (its node's death not yet
            # seen by the scheduler).
            twin_up, twin_stop = threading.Event(), threading.Event()

            async def twin_main() -> None:
                async with Worker(addr, name="w-x", nthreads=1, dashboard=False):
                    twin_up.set()
                    await asyncio.to_thread(twin_stop.wait, 60)

            twin = threading.Thread(target=asyncio.run, args=(twin_main(),))
            twin.start()
            assert twin_up.wait(60)
            out: dict[str, Any] = {}

            def run_again() -> None:
                try:
                    out["ok"] = serve_worker(addr, 1, "w-x", "1GB", death_timeout_s=60)
                except BaseException as e:  # reported below
                    out["error"] = e

            again = threading.Thread(target=run_again)
            again.start()
            wait_for(lambda: refusals.count >= 2 or not again.is_alive(), 60,
                     "the second run refused its name twice")
            assert "error" not in out, out  # it did not give up at the first refusal
            twin_stop.set()
            twin.join(30)
            wait_for(lambda: [a for a, ws in lc.scheduler.workers.items() if ws.name == "w-x"],
                     60, "the second run registered once the first was gone")
            client.retire_workers(close_workers=True)
            again.join(60)
            assert out.get("ok", {}).get("name") == "w-x", out
    finally:
        logging.getLogger("distributed.scheduler").removeHandler(refusals)
