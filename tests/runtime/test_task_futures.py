"""Futures as task arguments, on real node processes (5 nodes): a future (or a list,
tuple or dict of them) passed into another task is resolved by the node, an upstream
failure fails the downstream task naming it, and ``gather``, ``wait`` (each
``return_when``), ``add_done_callback`` and ``exception()`` behave as in
``concurrent.futures``."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from runtime_mesh import host_like_dir

import meshscale
from meshscale.client.tasks import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    TaskError,
    TaskMesh,
    connect,
)
from meshscale.runtime.launcher import LocalMesh
from waiting import wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with host_like_dir("meshscale-fut-") as directory, LocalMesh(directory, 5) as m:
        yield m


def add(a: int, b: int) -> int:
    return a + b


def square(x: int) -> int:
    return x * x


def total(xs: Any) -> int:
    if isinstance(xs, dict):
        return sum(total(v) for v in xs.values())
    if isinstance(xs, (list, tuple)):
        return sum(total(v) for v in xs)
    return int(xs)


def nap(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def fail_with(message: str) -> int:
    raise ValueError(message)


def blob(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def length(b: bytes, extra: int = 0) -> int:
    return len(b) + extra


def test_a_future_is_an_argument_of_another_task(client: TaskMesh) -> None:
    a = client.submit(add, 1, 2)
    b = client.submit(add, a, 10)        # positional
    c = client.submit(add, a=b, b=a)     # keywords, the same future twice
    assert c.result(timeout=120) == 16
    assert b.result(timeout=10) == 13


def test_lists_tuples_and_dicts_of_futures(client: TaskMesh) -> None:
    squares = [client.submit(square, i) for i in range(6)]
    s = client.submit(total, squares)
    nested = client.submit(total, {"a": (squares[0], squares[5]), "b": [[squares[3]], 1]})
    assert s.result(timeout=120) == sum(i * i for i in range(6))
    assert nested.result(timeout=120) == 0 + 25 + 9 + 1


def test_a_reduce_over_the_futures_of_a_map(client: TaskMesh) -> None:
    parts = client.map(square, range(300))  # more futures than a task's input objects
    s = client.submit(total, parts)
    assert s.result(timeout=120) == sum(i * i for i in range(300))


def test_a_large_upstream_result_travels_as_an_object(client: TaskMesh) -> None:
    big = client.submit(blob, 600_064)  # above the inline bound: stored as an object
    n = client.submit(length, big, extra=1)
    assert n.result(timeout=120) == 600_064 + 1
    assert len(big.result(timeout=60)) == 600_064
    assert big._outcome is not None and big._outcome.ref is not None


def test_the_task_goes_where_the_upstream_result_is(client: TaskMesh,
                                                   mesh: LocalMesh) -> None:
    """A result stored as an object (3 replicas of 5 nodes) steers the tasks that take it,
    as an ObjectRef input does: each runs on a node that holds it, even when submitted
    to a node that does not (which would otherwise run them itself)."""
    big = client.submit(blob, 1 << 20)
    client.wait([big], timeout=120)
    assert big._outcome is not None and big._outcome.ref is not None
    ref = big._outcome.ref

    def copied() -> set[str] | None:
        # Acknowledged at W = 2 copies, the third still on its way: until it lands the
        # nodes listed as holding it are not all that will (a task may run on the third).
        st = client.stat(ref.id)
        return set(st.holders) if set(st.replica_set) <= set(st.holders) else None

    holders = wait_for(copied, 60, "the result's copies on its whole replica set")
    assert 0 < len(holders) < 5
    elsewhere = next(n for n in mesh.nodes if n.name not in holders)
    with connect(elsewhere.address, bundle=mesh.bundle_path) as other:
        downs = [other.submit(length, big, extra=i) for i in range(6)]
        assert other.gather(downs, timeout=120) == [(1 << 20) + i for i in range(6)]
        assert {d.node for d in downs} <= holders


def test_a_future_of_a_task_owned_by_another_node(client: TaskMesh, mesh: LocalMesh) -> None:
    with connect(mesh.nodes[2].address, bundle=mesh.bundle_path) as other:
        up = other.submit(nap, 0.5, 20)   # owned by node 2
        down = client.submit(add, up, 1)  # submitted to node 0: it asks node 2
        assert down.result(timeout=120) == 21
        up = other.submit(nap, 1.0, 30)
        downs = [client.submit(add, up, i) for i in range(20)]  # one wait for all of them
        assert client.gather(downs, timeout=120) == [30 + i for i in range(20)]


def test_an_upstream_failure_fails_the_downstream_task_naming_it(client: TaskMesh) -> None:
    up = client.submit(fail_with, "bad input 7")
    mid = client.submit(add, up, 1)
    down = client.submit(total, [mid, 2])
    with pytest.raises(TaskError) as ei:
        down.result(timeout=120)
    err = ei.value
    assert err.kind == "upstream"
    assert err.task_id == down.task_id
    assert mid.task_id in str(err)           # its direct upstream, by id
    assert "bad input 7" in str(err)         # and the error at the root
    assert isinstance(err, ValueError)       # the root's own type, as it could be unpickled
    with pytest.raises(ValueError, match="bad input 7"):
        mid.result(timeout=10)


def test_gather_returns_values_in_order_and_raises_the_failure(client: TaskMesh) -> None:
    futs = [client.submit(nap, 0.3 - 0.1 * i, i) for i in range(3)]
    assert meshscale.gather(futs) == [0, 1, 2]
    assert meshscale.gather(*futs) == [0, 1, 2]
    assert client.gather(futs, timeout=60) == [0, 1, 2]
    slow = client.submit(nap, 30, 0)
    bad = client.submit(fail_with, "gathered")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="gathered"):
        meshscale.gather([slow, bad], timeout=120)
    assert time.monotonic() - t0 < 25  # did not wait for the slow one
    slow.cancel()


def test_wait_with_each_return_when(client: TaskMesh) -> None:
    fast = client.submit(nap, 0.1, 1)
    slow = client.submit(nap, 30, 2)
    done, not_done = meshscale.wait([slow, fast], timeout=60, return_when=FIRST_COMPLETED)
    assert done == [fast] and not_done == [slow]

    bad = client.submit(fail_with, "first exception")
    done, not_done = meshscale.wait([slow, bad], timeout=60, return_when=FIRST_EXCEPTION)
    assert done == [bad] and not_done == [slow]

    ok = [client.submit(nap, 0.2, i) for i in range(3)]
    done, not_done = meshscale.wait(ok, timeout=60, return_when=FIRST_EXCEPTION)
    assert done == ok and not_done == []  # no failure: waits for all

    done, not_done = meshscale.wait([slow, fast], timeout=0.5)  # ALL_COMPLETED, times out
    assert done == [fast] and not_done == [slow]
    done, not_done = client.wait([*ok, fast], timeout=60)
    assert not not_done
    with pytest.raises(ValueError, match="return_when"):
        meshscale.wait([fast], return_when="SOMETIMES")
    assert slow.cancel()
    assert slow.cancelled() and slow.done() and not slow.running()


def test_done_callbacks_and_exception(client: TaskMesh) -> None:
    seen: list[tuple[str, Any]] = []
    fired = threading.Event()
    lock = threading.Lock()

    def note(f: meshscale.Future) -> None:
        # A callback may block on the mesh (it runs on a thread of its own).
        with lock:
            seen.append((f.task_id, f.exception()))
            if len(seen) == 3:
                fired.set()

    good = client.submit(nap, 0.5, 5)
    bad = client.submit(fail_with, "callback")
    good.add_done_callback(note)
    bad.add_done_callback(note)
    assert good.result(timeout=60) == 5
    good.add_done_callback(note)  # already done: called at once
    assert fired.wait(60)
    by_id: dict[str, list[Any]] = {}
    for tid, exc in seen:
        by_id.setdefault(tid, []).append(exc)
    assert by_id[good.task_id] == [None, None]
    (exc,) = by_id[bad.task_id]
    assert isinstance(exc, ValueError) and isinstance(exc, TaskError)
    assert bad.exception(timeout=10) is not None
    assert good.exception(timeout=10) is None
    with pytest.raises(TimeoutError):
        client.submit(nap, 30, 0).exception(timeout=0.2)


def test_a_future_pickled_outside_a_task_says_so(client: TaskMesh) -> None:
    import pickle

    fut = client.submit(add, 1, 1)
    with pytest.raises(TypeError, match="only as an argument of a task"):
        pickle.dumps(fut)
    assert fut.result(timeout=60) == 2


def test_the_async_client(mesh: LocalMesh) -> None:
    async def main() -> None:
        amesh = await meshscale.connect_async(mesh.nodes[1].address, bundle=mesh.bundle_path)
        try:
            a = await amesh.submit(add, 2, 3)
            b = await amesh.submit(total, [a, a, 1])
            seen: list[Any] = []
            b.add_done_callback(lambda f: seen.append(f.task_id))
            assert await amesh.gather([a, b]) == [5, 11]
            assert seen == [b.task_id]
            slow = await amesh.submit(nap, 30, 0)
            done, not_done = await amesh.wait([slow, a], timeout=60,
                                              return_when=FIRST_COMPLETED)
            assert done == [a] and not_done == [slow]
            bad = await amesh.submit(fail_with, "async")
            assert isinstance(await bad.exception_async(timeout=60), ValueError)
            assert await slow.cancel_async()
        finally:
            await amesh.close()

    asyncio.run(main())


def test_owner_dies_while_a_task_waits_for_its_upstream(mesh: LocalMesh) -> None:
    """Last in this module (it kills node 4). The waiting task's record (with its
    upstream ids) is in the KV: the node that takes it over waits for the upstream task
    (taken over too) and runs it."""
    owner_node = mesh.nodes[4]
    owner = connect(owner_node.address, bundle=mesh.bundle_path)
    other = connect(mesh.nodes[1].address, bundle=mesh.bundle_path)
    try:
        up = owner.submit(nap, 2.0, 4)
        down = owner.submit(total, [up, up, 1])
        assert owner_node.proc is not None
        os.kill(owner_node.proc.pid, signal.SIGKILL)
        owner_node.proc.wait()
        assert other.future(down.task_id).result(timeout=120) == 9
    finally:
        other.close()
        owner.close()
