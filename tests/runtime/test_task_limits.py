"""Node-wide defaults for tasks that set no limits of their own, and the share of slots
each submitter gets (#13: a task without memory_mb took 1.5 GB; nothing had a default
timeout, so never-ending tasks held every slot; one user's tasks made another's wait)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import meshscale
from meshscale.client.tasks import TaskError
from meshscale.runtime.launcher import LocalMesh
from meshscale.trust.bundle import load_bundle, write_client_bundle

pytestmark = pytest.mark.timeout(180)
SLOTS_PER_NODE = 2


def forever(x: int) -> int:
    time.sleep(3600)
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def noop() -> str:
    return "done"


def hog(mb: int) -> int:
    block = bytearray(mb << 20)
    return len(block)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("limits"), 2, http=False,
                   node_args=["--task-timeout-s", "2", "--task-memory-mb", "128",
                              "--cpus", str(SLOTS_PER_NODE)]) as m:
        yield m


def test_defaults_stop_a_runaway_task(mesh: LocalMesh) -> None:
    with meshscale.connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as c:
        stuck = c.submit(forever, 1)
        with pytest.raises(TaskError) as e:
            stuck.result(timeout=60)
        assert e.value.kind == "timeout", e.value
        with pytest.raises(TaskError) as e:
            c.submit(hog, 1024).result(timeout=60)
        assert e.value.kind == "memory", e.value
        # Within the defaults, and with a task's own larger limit, work goes on.
        assert c.submit(hog, 16).result(timeout=60) == 16 << 20
        own = meshscale.task(memory_mb=2048, timeout_s=30)(hog)
        assert c.submit(own, 1024).result(timeout=60) == 1024 << 20


def test_a_second_user_is_not_queued_behind_the_first(mesh: LocalMesh) -> None:
    # Two client certificates, two submitters. A fills every slot of the mesh three times
    # over; B's one task takes the first slot that frees instead of waiting for A's queue.
    bob = write_client_bundle(load_bundle(mesh.admin_path), "bob", mesh.directory / "bob")
    long = meshscale.task(timeout_s=60)(nap)
    with meshscale.connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as a, \
            meshscale.connect(mesh.nodes[0].address, bundle=bob.path) as b:
        slots = SLOTS_PER_NODE * len(mesh.nodes)
        burst = a.map(long, [3.0] * (3 * slots))
        try:
            assert b.submit(noop).result(timeout=60) == "done"
            finished = sum(f.done() for f in burst)
            # Without the share B ran after 2 slots' worth of A's tasks had ended.
            assert finished <= slots, f"{finished} of A's {len(burst)} tasks ended first"
        finally:
            for f in burst:
                f.cancel()
