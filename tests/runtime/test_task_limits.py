"""What stands between task code and its node (#13): node-wide defaults for tasks that set
no limits of their own (a task without memory_mb took 1.5 GB; nothing had a default
timeout, so never-ending tasks held every slot), the share of slots each submitter gets
(one user's tasks made another's wait), the worker user (task code read ca.key, the
token, the keyring and every node key) and cgroups (runtime/isolation.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from runtime_mesh import host_like_dir

import meshscale
from meshscale.client.tasks import TaskError
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.identity import IDENTITY_JSON
from meshscale.runtime.isolation import own_limits
from meshscale.runtime.launcher import LocalMesh
from meshscale.trust.bundle import (
    CA_KEY,
    CLIENT_KEY,
    KEYRING_JSON,
    NODE_KEY,
    TOKEN,
    TOKENS_JSON,
    load_bundle,
    write_client_bundle,
)
from needs import require_root

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
                   node_settings={"task_timeout_s": 2, "task_memory_mb": 128,
                                  "cpus": SLOTS_PER_NODE}) as m:
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


# --- the worker user and cgroups (root) --------------------------------------------------


def node_event(mesh: LocalMesh, event: str) -> dict[str, Any]:
    """The first log line of ``event`` from node 0."""
    path = mesh.nodes[0].log_path
    assert path is not None
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            fields = json.loads(line)
            if fields.get("event") == event:
                return dict(fields)
    raise AssertionError(f"node-0 logged no {event!r} line")


@pytest.fixture(scope="module")
def rooted() -> Iterator[LocalMesh]:
    require_root("workers as another user, in cgroups (the agent does that only as root)")
    with host_like_dir("meshscale-isolation-") as directory, \
            LocalMesh(directory, 2, http=False, node_settings={"cpus": 2}) as m:
        yield m


def probe(paths: list[str], data: bytes) -> dict[str, Any]:
    """Run as a task: try to read each path; report who it runs as and where."""
    out: dict[str, Any] = {}
    for p in paths:
        try:
            if os.path.isdir(p):
                os.listdir(p)
            else:
                with open(p, "rb") as f:
                    f.read(1)
            out[p] = "read"
        except OSError as e:
            out[p] = type(e).__name__
    with open("scratch", "w") as f:  # its working directory is its own
        f.write("x")
    out.update(uid=os.getuid(), cwd=os.getcwd(), input=data)
    return out


def test_tasks_cannot_read_the_nodes_secrets(rooted: LocalMesh) -> None:
    secrets = [rooted.admin_path / CA_KEY, rooted.admin_path / TOKEN,
               rooted.bundle_path / CLIENT_KEY, rooted.bundle_path / TOKEN]
    for node in rooted.nodes:
        secrets += [node.bundle_dir / NODE_KEY, node.bundle_dir / KEYRING_JSON,
                    node.bundle_dir / TOKENS_JSON, node.bundle_dir,
                    node.data_dir / IDENTITY_JSON, node.data_dir / "store" / "meta.sqlite3",
                    node.data_dir / "store" / "objects", node.data_dir]
    by_path = 0
    with meshscale.connect(rooted.nodes[0].address, bundle=rooted.bundle_path) as c:
        ref = c.put(b"an input the task may read", replicas=2)  # both nodes: linked for the run
        out = c.submit(probe, [str(p) for p in secrets], ref).result(timeout=60)
    for node in rooted.nodes:
        with meshscale.connect(node.address, bundle=rooted.bundle_path) as c:
            stats = c._run(c._inner._trequest(TASK_STATS, Empty())).compute
            by_path += stats.get("inputs_by_path", 0)
    for p in secrets:
        assert out[str(p)] == "PermissionError", (p, out[str(p)])
    assert out["uid"] != 0
    assert out["input"] == b"an input the task may read" and by_path == 1
    said = node_event(rooted, "isolation")
    assert said["worker_user"] == "nobody" and "cannot read this node's" in said["statement"]


def late_imports() -> list[str]:
    """Run as a task: import submodules of packages the worker imported before it gave up
    root (found through the package's ``__path__``, not ``sys.path``)."""
    import importlib

    names = ["importlib._abc", "encodings.idna", "json.tool", "xml.dom.minidom"]
    for name in names:
        importlib.import_module(name)
    return names


def test_a_task_imports_what_the_worker_user_cannot_reach_by_path(rooted: LocalMesh) -> None:
    """The interpreter may live where the worker user cannot go (a pyenv under /root):
    a stream operator's unpickle needing ``importlib._abc`` failed with
    ModuleNotFoundError, and no operator ran (the README's stream example, the demo)."""
    with meshscale.connect(rooted.nodes[0].address, bundle=rooted.bundle_path) as c:
        assert c.submit(late_imports).result(timeout=60) == [
            "importlib._abc", "encodings.idna", "json.tool", "xml.dom.minidom"]


def test_a_task_over_its_memory_cgroup_is_killed_by_the_kernel(rooted: LocalMesh) -> None:
    said = node_event(rooted, "isolation")
    if said["cgroups"] is None:
        pytest.fail(f"no writable cgroup for a root agent: {said['statement']}",
                    pytrace=False)
    with meshscale.connect(rooted.nodes[0].address, bundle=rooted.bundle_path) as c:
        limits = c.submit(meshscale.task(memory_mb=200, cpus=1)(own_limits)).result(timeout=60)
        assert limits["cpus"] == 1.0, limits
        # The limit: what the worker used when the task started, plus its memory_mb.
        assert (200 << 20) < limits["memory_bytes"] < (400 << 20), limits
        assert f"meshscale-{rooted.nodes[0].name}-" in limits["memory_dir"]
        with pytest.raises(TaskError) as e:
            c.submit(meshscale.task(memory_mb=64)(hog), 512).result(timeout=60)
        assert e.value.kind == "memory" and "the kernel killed" in e.value.message, e.value
        # The worker was replaced; the next task runs.
        assert c.submit(hog, 16).result(timeout=60) == 16 << 20
