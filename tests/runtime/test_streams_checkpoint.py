"""An operator runner's offset checkpoint never holds up its records.

The checkpoint is a quorum KV write, which waits on other nodes (a slow or far one up to
the RPC timeout). Awaited in the runner's loop, it held every record that landed
meanwhile, every ``checkpoint_interval_s`` (found tracing records through the live
demo's pipeline for issue 17; there the write took about 3 ms). Here the checkpoint
never finishes, and the runner must keep fetching and running batches. Deterministic:
no clock is read for the outcome, only loop turns."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

from meshscale.core.api.streams import FetchReply, FetchRequest, OperatorSpec
from meshscale.core.streams import LogEntry
from meshscale.runtime.streams import StreamConfig, StreamPlane

HOUR = 3600.0


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_runner_keeps_running_batches_while_a_checkpoint_hangs() -> None:
    async def main() -> None:
        agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}),
                                     m=SimpleNamespace(members={}),
                                     log=lambda *a, **k: None)
        p = StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR, fetch_wait_s=HOUR,
                                            checkpoint_interval_s=0.0))
        checkpoints: list[int] = []
        hang = asyncio.Event()

        async def checkpoint(op: str, source: str, offset: int) -> None:
            checkpoints.append(offset)
            await hang.wait()  # a KV write that waits for ever

        async def call(name: str, method: Any, req: FetchRequest, **kw: Any) -> FetchReply:
            return await p._rpc_fetch(req)

        async def apply(spec: OperatorSpec, entries: list[LogEntry], st: Any) -> list[Any]:
            return []

        p._alive = lambda: []  # type: ignore[method-assign]
        p._holder = lambda topic, source, alive: "n0"  # type: ignore[method-assign]
        p._call = call  # type: ignore[method-assign,assignment]
        p._apply = apply  # type: ignore[method-assign,assignment]
        p._checkpoint = checkpoint  # type: ignore[method-assign]
        log = p._log("t", "src~0")
        log.append([("k", b"v", "r0", 0.0)])
        spec = OperatorSpec(name="op", topic="t", fn_id="f" * 64, fn_object="o" * 64)
        st: Counter[str] = Counter()
        runner = asyncio.ensure_future(p._read_shard(spec, "src~0", None, "lane", set(), st))
        await turns()
        assert st["records_processed"] == 1 and checkpoints == [1]
        for i in (1, 2):
            async with p._lock:
                log.append([("k", b"v", f"r{i}", 0.0)])
                p._notify("t")
            await turns()
            assert st["records_processed"] == 1 + i, "the runner waited for its checkpoint"
        assert checkpoints == [1]  # one write at a time: the next waits for this one
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await turns()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending, pending  # the hung checkpoint went with its runner

    asyncio.run(main())


def test_runner_counts_its_batches_time_in_the_worker_pool(monkeypatch: Any) -> None:
    """``apply_us`` / ``batches_applied``: what an operator's calls take where it runs
    (``bench/plan_calibration.py`` reads them to tell a change of load from a model
    error, issue 17). A fake clock: 7 ms pass in each call, none outside."""
    import meshscale.runtime.streams as streams_mod

    now = [100.0]
    monkeypatch.setattr(streams_mod, "_clock", lambda: now[0])

    async def main() -> None:
        agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}),
                                     m=SimpleNamespace(members={}),
                                     log=lambda *a, **k: None)
        p = StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR, fetch_wait_s=HOUR,
                                            checkpoint_interval_s=HOUR))

        async def call(name: str, method: Any, req: FetchRequest, **kw: Any) -> FetchReply:
            return await p._rpc_fetch(req)

        async def apply(spec: OperatorSpec, entries: list[LogEntry], st: Any) -> list[Any]:
            now[0] += 0.007
            return []

        p._alive = lambda: []  # type: ignore[method-assign]
        p._holder = lambda topic, source, alive: "n0"  # type: ignore[method-assign]
        p._call = call  # type: ignore[method-assign,assignment]
        p._apply = apply  # type: ignore[method-assign,assignment]
        log = p._log("t", "src~0")
        log.append([("k", b"v", "r0", 0.0), ("k", b"v", "r1", 0.0)])
        spec = OperatorSpec(name="op", topic="t", fn_id="f" * 64, fn_object="o" * 64)
        st: Counter[str] = Counter()
        runner = asyncio.ensure_future(p._read_shard(spec, "src~0", None, "lane", set(), st))
        await turns()
        async with p._lock:
            log.append([("k", b"v", "r2", 0.0)])
            p._notify("t")
        await turns()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        assert st["records_processed"] == 3
        assert st["batches_applied"] == 2
        assert st["apply_us"] == 14_000

    asyncio.run(main())


def test_runner_runs_the_next_batch_while_its_outputs_copy_travels() -> None:
    """The copy of a batch's outputs to the output shard's backup goes on beside the
    runner (issue 23): a record that lands meanwhile is fetched, run and its output
    appended without waiting for the backup. What the runner commits stays behind the
    outputs the backup confirmed, so an input record is released only once its outputs
    are held twice, and at once when they are. Here the backup answers only when the
    test lets it."""

    async def main() -> None:
        agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}),
                                     m=SimpleNamespace(members={}),
                                     log=lambda *a, **k: None)
        p = StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR, fetch_wait_s=HOUR,
                                            checkpoint_interval_s=0.0))
        checkpoints: list[int] = []
        backup_answers = asyncio.Event()
        copies: list[int] = []

        async def checkpoint(op: str, source: str, offset: int) -> None:
            checkpoints.append(offset)

        async def call(name: str, method: Any, req: FetchRequest, **kw: Any) -> FetchReply:
            return await p._rpc_fetch(req)

        async def apply(spec: OperatorSpec, entries: list[LogEntry], st: Any) -> list[Any]:
            return [(e.key, e.value, f"op:{e.rid}", e.ts) for e in entries]

        async def admit(topic: str, declared: Any) -> None:
            return None

        async def replicate(topic: str, source: str, log: Any, upto: int | None = None
                            ) -> None:
            assert topic == "out"
            copies.append(log.head)
            await backup_answers.wait()
            log.confirm_copy(log.head)

        p._alive = lambda: []  # type: ignore[method-assign]
        p._holder = lambda topic, source, alive: "n0"  # type: ignore[method-assign]
        p._call = call  # type: ignore[method-assign,assignment]
        p._apply = apply  # type: ignore[method-assign,assignment]
        p._admit = admit  # type: ignore[method-assign,assignment]
        p._replicate = replicate  # type: ignore[method-assign,assignment]
        p._checkpoint = checkpoint  # type: ignore[method-assign]
        log = p._log("t", "src~0")
        log.register("op")
        log.append([("k", b"v", "r0", 0.0)])
        spec = OperatorSpec(name="op", topic="t", output="out", fn_id="f" * 64,
                            fn_object="o" * 64)
        st: Counter[str] = Counter()
        runner = asyncio.ensure_future(p._read_shard(spec, "src~0", None, "lane", set(), st))
        await turns()
        out = p.logs[("out", p.source_id)]
        assert st["records_processed"] == 1 and [e.rid for e in out.entries] == ["op:r0"]
        async with p._lock:
            log.append([("k", b"v", "r1", 0.0)])
            p._notify("t")
        await turns()
        assert st["records_processed"] == 2, "the runner waited for its outputs' copy"
        assert [e.rid for e in out.entries] == ["op:r0", "op:r1"]  # in order
        # Nothing committed past outputs the backup has not confirmed.
        assert log.committed["op"] == 0 and checkpoints == []
        backup_answers.set()
        await turns()
        # Committed as soon as the backup holds the outputs, though the runner's fetch
        # still waits (an hour here): a producer held for room goes on at once.
        assert log.committed["op"] == 2
        async with p._lock:
            log.append([("k", b"v", "r2", 0.0)])
            p._notify("t")
        await turns()
        assert log.committed["op"] == 3 and checkpoints[:1] == [2]
        assert copies[:2] == [1, 2]
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await turns()

    asyncio.run(main())


def test_a_batch_reaches_the_worker_as_pickle_args_would_send_it() -> None:
    """The runner pickles a batch with the standard pickler (``_batch_args``); the worker
    reads it as it reads ``pickle_args``'s bytes (``cloudpickle.loads``)."""
    import cloudpickle

    from meshscale.runtime.streams import _batch_args
    from meshscale.runtime.workers import pickle_args

    batch = [["k", b"\x00v", "r0", 1.5], ["k2", b"", "r1", 0.0]]
    assert cloudpickle.loads(_batch_args(batch)) == cloudpickle.loads(pickle_args(batch))


def test_runner_reading_a_remote_holder_does_not_long_poll_on_an_uncarried_commit() -> None:
    """A runner reading its shard from another node commits only with a fetch: while its
    outputs' copy travels, its fetches do not wait at the holder, and when one finds
    nothing it waits for the copy, then fetches again at once with the commit (a long
    poll first would hold a producer waiting for room until its timer)."""

    async def main() -> None:
        agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}),
                                     m=SimpleNamespace(members={}),
                                     log=lambda *a, **k: None)
        p = StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR, fetch_wait_s=HOUR,
                                            checkpoint_interval_s=HOUR))
        backup_answers = asyncio.Event()
        asked: list[tuple[float, int | None]] = []
        holder_log = StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR))

        async def call(name: str, method: Any, req: FetchRequest, **kw: Any) -> FetchReply:
            assert name == "n1"
            asked.append((req.wait_s, req.committed))
            return await holder_log._rpc_fetch(req)

        async def apply(spec: OperatorSpec, entries: list[LogEntry], st: Any) -> list[Any]:
            return [(e.key, e.value, f"op:{e.rid}", e.ts) for e in entries]

        async def admit(topic: str, declared: Any) -> None:
            return None

        async def replicate(topic: str, source: str, log: Any, upto: int | None = None
                            ) -> None:
            await backup_answers.wait()

        p._alive = lambda: []  # type: ignore[method-assign]
        p._holder = lambda topic, source, alive: "n1"  # type: ignore[method-assign]
        p._call = call  # type: ignore[method-assign,assignment]
        p._apply = apply  # type: ignore[method-assign,assignment]
        p._admit = admit  # type: ignore[method-assign,assignment]
        p._replicate = replicate  # type: ignore[method-assign,assignment]
        log = holder_log._log("t", "src~0")
        log.register("op")
        log.append([("k", b"v", "r0", 0.0)])
        spec = OperatorSpec(name="op", topic="t", output="out", fn_id="f" * 64,
                            fn_object="o" * 64)
        st: Counter[str] = Counter()
        runner = asyncio.ensure_future(p._read_shard(spec, "src~0", 0, "lane", set(), st))
        await turns()
        assert st["records_processed"] == 1
        assert asked == [(HOUR, 0), (0.0, 0)], asked  # no long-poll while the copy travels
        backup_answers.set()
        await turns()
        assert asked[2] == (HOUR, 1) and log.committed["op"] == 1
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await turns()

    asyncio.run(main())
