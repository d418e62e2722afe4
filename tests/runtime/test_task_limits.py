"""Node-wide defaults for tasks that set no limits of their own (#13: a task without
memory_mb took 1.5 GB; nothing had a default timeout, so never-ending tasks held every
slot)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import meshscale
from meshscale.client.tasks import TaskError
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(180)


def forever(x: int) -> int:
    time.sleep(3600)
    return x


def hog(mb: int) -> int:
    block = bytearray(mb << 20)
    return len(block)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("limits"), 2, http=False,
                   node_args=["--task-timeout-s", "2", "--task-memory-mb", "128"]) as m:
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
