"""The warm worker pool, with real worker processes.

Every test runs under a pytest timeout and a bounded event-loop run; waits are on
conditions with deadlines. The functions below are shipped to workers by value, as a
client's would be (this module is not importable by its name in a worker).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import pytest
from runtime_mesh import wait_for_async

from meshscale.runtime.workers import (
    FunctionNotCached,
    PoolBusy,
    PoolClosed,
    PoolConfig,
    TaskFailed,
    WorkerPool,
    function_id,
    load_result,
    pickle_args,
    pickle_function,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# --- functions that run in workers -------------------------------------------------------


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def whoami() -> int:
    return os.getpid()


def explode_with_value(x: int) -> None:
    raise ValueError(f"boom {x}")


def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def timed_sleep(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def exit_hard(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def allocate(mb: int) -> int:
    block = bytearray(mb << 20)
    return len(block)


def big_result(n: int) -> bytes:
    return b"x" * n


# --- helpers -----------------------------------------------------------------------------


def drive(
    body: Callable[[WorkerPool], Awaitable[None]],
    config: PoolConfig | None = None,
    *,
    use_uvloop: bool = False,
    bound_s: float = 25.0,
) -> WorkerPool:
    """Start a pool, run ``body`` against it within ``bound_s``, always close it."""
    pool = WorkerPool(config or PoolConfig(workers=1))

    async def main() -> None:
        await pool.start()
        try:
            async with asyncio.timeout(bound_s):
                await body(pool)
        finally:
            await pool.close()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    return pool


async def until(cond: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Wait for ``cond`` with a deadline (polling; the pool has no event for everything)."""

    async def check() -> bool:
        return cond()

    await wait_for_async(check, deadline_s, what, poll=0.005)


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no procfs: os.kill said it exists


async def call(pool: WorkerPool, fn: Callable[..., Any], *args: Any, **opts: Any) -> Any:
    fid, data = pickle_function(fn)
    return load_result(await pool.run(fid, data, pickle_args(*args), **opts))


@pytest.fixture
def no_leaks() -> Iterator[list[int]]:
    """Collects worker pids; after the test each must be gone."""
    pids: list[int] = []
    yield pids
    leaked = [p for p in pids if alive(p)]
    assert not leaked, f"worker processes left behind: {leaked}"


# --- tests -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_result_round_trip(use_uvloop: bool, no_leaks: list[int]) -> None:
    async def body(pool: WorkerPool) -> None:
        no_leaks.extend(pool.worker_pids())
        fid, data = pickle_function(add)
        assert fid == function_id(data)
        out = await pool.run(fid, data, cloudpickle.dumps(((2, 3), {"scale": 10})))
        assert load_result(out) == 50
        assert await call(pool, big_result, 3) == b"xxx"

    drive(body, use_uvloop=use_uvloop)


@pytest.mark.timeout(30)
def test_function_is_shipped_once_then_cached() -> None:
    async def body(pool: WorkerPool) -> None:
        fid, data = pickle_function(add)
        assert load_result(await pool.run(fid, data, pickle_args(1, 2))) == 3
        assert pool.stats()["functions_sent"] == 1
        assert pool.stats()["function_bytes_sent"] == len(data)
        # Sent again by the caller, and not sent at all: the worker has it either way.
        assert load_result(await pool.run(fid, data, pickle_args(3, 4))) == 7
        assert load_result(await pool.run(fid, None, pickle_args(5, 6))) == 11
        s = pool.stats()
        assert s["functions_sent"] == 1
        assert s["function_bytes_sent"] == len(data)
        assert (s["cache_misses"], s["cache_hits"], s["completed"]) == (1, 2, 3)

        with pytest.raises(FunctionNotCached):
            await pool.run(function_id(b"never seen"), None, pickle_args())
        with pytest.raises(ValueError, match="do not hash"):
            await pool.run(function_id(b"other"), data, pickle_args(1, 1))

    drive(body)


@pytest.mark.timeout(30)
def test_worker_lru_evicts_and_pool_resends() -> None:
    def one() -> int:
        return 1

    def two() -> int:
        return 2

    async def body(pool: WorkerPool) -> None:
        assert await call(pool, one) == 1
        assert await call(pool, two) == 2  # evicts `one` from the worker (cache of 1)
        assert await call(pool, one) == 1  # re-sent from the pool's own copy
        assert pool.stats()["functions_sent"] == 3
        assert pool.stats()["cache_hits"] == 0

    drive(body, PoolConfig(workers=1, max_cached_functions=1))


@pytest.mark.timeout(30)
def test_exception_carries_remote_traceback() -> None:
    async def body(pool: WorkerPool) -> None:
        with pytest.raises(TaskFailed) as info:
            await call(pool, explode_with_value, 42)
        assert info.value.kind == "raised"
        assert "explode_with_value" in info.value.traceback
        assert "ValueError: boom 42" in info.value.traceback
        assert "boom 42" in str(info.value)
        # The worker survives a raising task.
        assert await call(pool, add, 1, 1) == 2
        s = pool.stats()
        assert (s["failed_raised"], s["restarts"]) == (1, 0)

    drive(body)


@pytest.mark.timeout(30)
def test_timeout_kills_and_replaces_the_worker(no_leaks: list[int]) -> None:
    async def body(pool: WorkerPool) -> None:
        (before,) = pool.worker_pids()
        no_leaks.append(before)
        with pytest.raises(TaskFailed) as info:
            await call(pool, sleep_for, 60, timeout_s=0.3)
        assert info.value.kind == "timeout"
        await until(lambda: not alive(before), "the timed-out worker to die")
        await until(lambda: pool.stats()["workers"] == 1, "a replacement worker")
        pid = await call(pool, whoami)
        assert pid != before
        no_leaks.append(pid)
        s = pool.stats()
        assert (s["failed_timeout"], s["restarts"]) == (1, 1)

    drive(body)


@pytest.mark.timeout(30)
def test_default_timeout_from_config() -> None:
    async def body(pool: WorkerPool) -> None:
        with pytest.raises(TaskFailed) as info:
            await call(pool, sleep_for, 60)
        assert info.value.kind == "timeout"
        assert await call(pool, add, 2, 2) == 4

    drive(body, PoolConfig(workers=1, default_timeout_s=0.3))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
@pytest.mark.parametrize(
    ("fn", "args", "expect"),
    [(exit_hard, (3,), "exited with code 3"), (segfault, (), "SIGSEGV")],
    ids=["os._exit", "SIGSEGV"],
)
def test_crash_fails_cleanly_and_worker_is_replaced(
    fn: Callable[..., Any], args: tuple[Any, ...], expect: str, use_uvloop: bool,
    no_leaks: list[int],
) -> None:
    async def body(pool: WorkerPool) -> None:
        no_leaks.extend(pool.worker_pids())
        with pytest.raises(TaskFailed) as info:
            await call(pool, fn, *args)
        assert info.value.kind == "worker_crashed"
        assert expect in info.value.message
        await until(lambda: pool.stats()["workers"] == 2, "capacity to be restored")
        # Both workers (one of them new) still run tasks.
        pids = await asyncio.gather(*(call(pool, timed_sleep, 0.2) for _ in range(2)))
        assert len(pids) == 2
        no_leaks.extend(pool.worker_pids())
        s = pool.stats()
        assert (s["failed_worker_crashed"], s["restarts"]) == (1, 1)

    drive(body, PoolConfig(workers=2), use_uvloop=use_uvloop)


@pytest.mark.timeout(30)
def test_memory_limit_fails_the_task_not_the_worker() -> None:
    async def body(pool: WorkerPool) -> None:
        (pid,) = pool.worker_pids()
        with pytest.raises(TaskFailed) as info:
            await call(pool, allocate, 1024, memory_mb=64)
        assert info.value.kind == "memory"
        assert "allocate" in info.value.traceback
        # Within the limit, and with the limit lifted again after the task.
        assert await call(pool, allocate, 16, memory_mb=64) == 16 << 20
        assert await call(pool, allocate, 128) == 128 << 20
        assert await call(pool, whoami) == pid
        assert pool.stats()["failed_memory"] == 1

    drive(body)


def test_unpicklable_function_is_refused_with_a_clear_error() -> None:
    lock = threading.Lock()
    holds_lock = lambda: lock.locked()  # noqa: E731

    with pytest.raises(TaskFailed) as info:
        pickle_function(holds_lock)
    assert info.value.kind == "unpicklable"
    assert "<lambda>" in str(info.value)
    assert "lock" in str(info.value)

    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(TaskFailed) as info:
        pickle_function(numbers())  # type: ignore[arg-type]
    assert info.value.kind == "unpicklable"
    assert "not callable" in str(info.value)
    assert "generator" in str(info.value)


@pytest.mark.timeout(30)
def test_size_bounds() -> None:
    async def body(pool: WorkerPool) -> None:
        fid, data = pickle_function(big_result)
        with pytest.raises(TaskFailed) as info:
            await pool.run(fid, data, pickle_args(b"y" * 4096))
        assert info.value.kind == "too_large"
        assert "max_arg_bytes" in str(info.value)
        with pytest.raises(TaskFailed) as info:
            await pool.run(fid, data, pickle_args(10_000))
        assert info.value.kind == "too_large"
        assert "max_result_bytes" in str(info.value)
        assert load_result(await pool.run(fid, data, pickle_args(10))) == b"x" * 10
        with pytest.raises(TaskFailed) as info:
            await pool.run(fid, b"z" * 100_000, pickle_args(1))
        assert info.value.kind == "too_large"
        assert pool.stats()["failed_too_large"] == 3

    drive(body, PoolConfig(workers=1, max_arg_bytes=1024, max_result_bytes=2048,
                           max_function_bytes=50_000))


@pytest.mark.timeout(30)
def test_queue_bound_refuses_with_pool_busy() -> None:
    async def body(pool: WorkerPool) -> None:
        fid, data = pickle_function(sleep_for)
        blocker = asyncio.ensure_future(pool.run(fid, data, pickle_args(60)))
        waiting = [asyncio.ensure_future(pool.run(fid, None, pickle_args(0))) for _ in range(2)]
        await until(lambda: pool.stats()["queued"] == 2, "two queued tasks")
        assert pool.stats()["running"] == 1
        with pytest.raises(PoolBusy):
            await pool.run(fid, None, pickle_args(0))
        assert pool.stats()["rejected_busy"] == 1
        # Unblock: cancel the running task; the queued ones then run on the replacement.
        blocker.cancel()
        await asyncio.gather(*waiting)
        assert pool.stats()["queued"] == 0

    drive(body, PoolConfig(workers=1, max_queue=2))


@pytest.mark.timeout(30)
def test_cancel_running_and_queued(no_leaks: list[int]) -> None:
    async def body(pool: WorkerPool) -> None:
        (first,) = pool.worker_pids()
        no_leaks.append(first)
        fid, data = pickle_function(sleep_for)
        running = asyncio.ensure_future(pool.run(fid, data, pickle_args(60), task_id="a"))
        queued = asyncio.ensure_future(pool.run(fid, None, pickle_args(60), task_id="b"))
        await until(lambda: pool.stats()["queued"] == 1, "task b to queue")
        with pytest.raises(ValueError, match="already"):
            await pool.run(fid, None, pickle_args(0), task_id="a")

        assert await pool.cancel("b")
        with pytest.raises(TaskFailed) as info:
            await queued
        assert info.value.kind == "cancelled"
        assert pool.stats()["queued"] == 0

        assert await pool.cancel("a")
        with pytest.raises(TaskFailed) as info:
            await running
        assert info.value.kind == "cancelled"
        await until(lambda: not alive(first), "the cancelled task's worker to die")
        assert not await pool.cancel("a")
        assert not await pool.cancel("never")

        assert await call(pool, add, 1, 2) == 3
        no_leaks.extend(pool.worker_pids())
        s = pool.stats()
        assert (s["failed_cancelled"], s["restarts"]) == (2, 1)

    drive(body)


@pytest.mark.timeout(30)
def test_caller_giving_up_kills_the_task(no_leaks: list[int]) -> None:
    async def body(pool: WorkerPool) -> None:
        (first,) = pool.worker_pids()
        no_leaks.append(first)
        fid, data = pickle_function(sleep_for)
        task = asyncio.ensure_future(pool.run(fid, data, pickle_args(60)))
        await until(lambda: pool.stats()["running"] == 1, "the task to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not alive(first), "the abandoned task's worker to die")
        assert await call(pool, add, 2, 3) == 5

    drive(body)


@pytest.mark.timeout(30)
def test_close_leaves_no_processes_and_fails_what_was_pending() -> None:
    seen: list[int] = []
    outcomes: list[BaseException | None] = []

    async def main() -> None:
        pool = WorkerPool(PoolConfig(workers=2))
        await pool.start()
        seen.extend(pool.worker_pids())
        assert len(seen) == 2 and all(alive(p) for p in seen)
        fid, data = pickle_function(sleep_for)
        busy = asyncio.ensure_future(pool.run(fid, data, pickle_args(60)))
        await until(lambda: pool.stats()["running"] == 1, "a busy worker")
        async with asyncio.timeout(10):
            await pool.close()
        outcomes.extend(r if isinstance(r, BaseException) else None
                        for r in await asyncio.gather(busy, return_exceptions=True))
        assert pool.worker_pids() == []
        with pytest.raises(PoolClosed):
            await pool.run(fid, data, pickle_args(0))

    asyncio.run(main())
    assert [p for p in seen if alive(p)] == []
    (outcome,) = outcomes
    assert isinstance(outcome, TaskFailed) and outcome.kind == "cancelled"


@pytest.mark.timeout(30)
def test_two_workers_run_in_parallel() -> None:
    async def body(pool: WorkerPool) -> None:
        spans = await asyncio.gather(*(call(pool, timed_sleep, 0.5) for _ in range(2)))
        (s1, e1), (s2, e2) = spans
        # Overlap, as seen from inside the tasks: each started before the other ended.
        assert s1 < e2 and s2 < e1

    drive(body, PoolConfig(workers=2))


@pytest.mark.timeout(60)
def test_workers_die_with_a_sigkilled_agent() -> None:
    agent = textwrap.dedent(
        """
        import asyncio, sys
        from meshscale.runtime.workers import PoolConfig, WorkerPool

        async def main():
            pool = WorkerPool(PoolConfig(workers=2))
            await pool.start()
            print(*pool.worker_pids(), flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", agent], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait(timeout=10)

    async def gone() -> None:
        await until(lambda: not any(alive(p) for p in pids), "orphaned workers to die")

    asyncio.run(gone())


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        PoolConfig(workers=0)
    with pytest.raises(ValueError):
        PoolConfig(max_queue=0)
    with pytest.raises(ValueError):
        PoolConfig(start_method="fork")  # type: ignore[arg-type]


def prints(n: int) -> int:
    print("out", n)
    print("err", n, file=sys.stderr)
    os.write(1, b"raw bytes on fd 1\n")  # below sys.stdout: goes nowhere, not to the node
    return n


def prints_then_raises(n: int) -> None:
    print("before", n)
    raise ValueError(f"raised {n}")


def prints_a_lot(n: int) -> int:
    sys.stdout.write("é" * n)  # two bytes each: the cut must not split one
    return n


@pytest.mark.timeout(30)
def test_what_a_task_prints_comes_back_with_its_outcome() -> None:
    async def body(pool: WorkerPool) -> None:
        fid, data = pickle_function(prints)
        ran = await pool.run_task(fid, data, pickle_args(7))
        assert load_result(ran.result) == 7
        assert (ran.stdout, ran.stderr) == ("out 7\n", "err 7\n")
        with pytest.raises(TaskFailed) as info:
            await call(pool, prints_then_raises, 3)
        err = info.value
        assert err.stdout == "before 3\n" and err.stderr == ""
        exc = cloudpickle.loads(err.exc)  # the exception itself, pickled by the worker
        assert isinstance(exc, ValueError) and exc.args == ("raised 3",)
        # The next task starts with empty output.
        ran = await pool.run_task(fid, None, pickle_args(8))
        assert (ran.stdout, ran.stderr) == ("out 8\n", "err 8\n")
        fid, data = pickle_function(prints_a_lot)
        ran = await pool.run_task(fid, data, pickle_args(1000))
        kept, _, note = ran.stdout.partition("\n[meshscale: output truncated: ")
        assert kept == "é" * 50  # 101 bytes allowed: 50 whole characters
        assert note == "1899 more bytes not kept (task_log_bytes=101)]\n"

    drive(body, PoolConfig(workers=1, max_log_bytes=101))


def prints_and_waits(path: str) -> str:
    print("step 1", flush=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("step 2")
    return "ok"


@pytest.mark.timeout(30)
def test_the_output_of_a_running_task_is_seen_as_it_comes(tmp_path: Any) -> None:
    go = tmp_path / "go"

    async def body(pool: WorkerPool) -> None:
        fid, data = pickle_function(prints_and_waits)
        run = asyncio.ensure_future(pool.run_task(fid, data, pickle_args(str(go)),
                                                  task_id="t1"))
        await until(lambda: pool.output("t1") == ("step 1\n", ""), "the first line, live")
        assert not run.done()
        go.touch()
        ran = await run
        assert load_result(ran.result) == "ok" and ran.stdout == "step 1\nstep 2\n"
        assert pool.output("t1") is None  # ended: the outcome carries it all

    drive(body, PoolConfig(workers=1))


def leaves_a_printer() -> int:
    out = sys.stdout  # this task's capture, kept by a thread that outlives the task

    def loop() -> None:
        for _ in range(60):
            print("stray", file=out)
            time.sleep(0.01)

    threading.Thread(target=loop, daemon=True).start()
    return 1


@pytest.mark.timeout(30)
def test_output_of_a_thread_a_task_left_behind_goes_nowhere() -> None:
    async def body(pool: WorkerPool) -> None:
        assert await call(pool, leaves_a_printer) == 1
        fid, data = pickle_function(prints_and_waits)
        for i in range(3):
            ran = await pool.run_task(fid, data if i == 0 else None,
                                      pickle_args("/"), task_id=f"after-{i}")
            assert ran.stdout == "step 1\nstep 2\n"
            await asyncio.sleep(0.3)  # while the stray thread prints on
        s = pool.stats()
        assert (s["restarts"], s.get("protocol_errors", 0)) == (0, 0)

    drive(body, PoolConfig(workers=1))
