"""``sched.exchange`` on the calling side (``ComputePlane._send``), with the RPC faked: a
worker's outcomes go ahead of its scheduling messages in one call and the reply's
messages are handled; an older owner (no ``sched.exchange``) gets each outcome in a
``task.done`` of its own, then the messages in a ``sched.batch``, every time after."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from meshscale.core.api import ErrorCode
from meshscale.core.api.tasks import DoneRequest, SchedAck, SchedReply
from meshscale.core.scheduling import Load
from meshscale.runtime.compute import ComputeConfig, ComputePlane
from meshscale.transport.rpc import RemoteError


class FakeSched:
    def __init__(self) -> None:
        self.handled: list[tuple[str, bytes]] = []

    def load(self) -> Load:
        return Load(0, 0, 1.0)

    def handle_message(self, src: str, payload: bytes, now: float) -> None:
        self.handled.append((src, payload))

    def peer_boot(self, name: str, boot: str, now: float) -> int:
        self.handled.append((name, f"boot {boot}".encode()))
        return 0


def plane(old_owner: bool) -> tuple[ComputePlane, FakeSched, list[tuple[str, Any]]]:
    agent = SimpleNamespace(
        name="w", meta=SimpleNamespace(capacity={"cpus": 1.0, "memory_mb": 1024}),
        cfg=SimpleNamespace(task_memory_mb=64, task_timeout_s=60.0, task_log_bytes=1024),
        log=lambda *a, **kw: None, m=SimpleNamespace(members={"o": object()}))
    p = ComputePlane(agent, ComputeConfig())  # type: ignore[arg-type]
    sched = FakeSched()
    p.sched = sched  # type: ignore[assignment]
    p._pump = lambda: None  # type: ignore[method-assign]
    calls: list[tuple[str, Any]] = []

    async def call(name: str, method: Any, req: Any, *, lane: str = "") -> Any:
        calls.append((method.name, req))
        if method.name == "sched.exchange":
            if old_owner:
                raise RemoteError("o: unknown method", ErrorCode.UNKNOWN_METHOD)
            return SchedReply([b"grant"])
        return SchedAck() if method.name.startswith("sched.") else None

    p._call = call  # type: ignore[method-assign, assignment]
    return p, sched, calls


def outcome(tid: str) -> DoneRequest:
    return DoneRequest(task_id=tid, node="w", attempt=1, ok=True, value=b"v")


def test_outcomes_go_ahead_of_their_messages_and_the_reply_is_handled() -> None:
    p, sched, calls = plane(old_owner=False)
    p._outcomes["o"] = [outcome("t1")]
    asyncio.run(p._send("o", [b"get", b"result"]))
    assert [(m, r.outcomes, r.payloads) for m, r in calls] == [
        ("sched.exchange", [outcome("t1")], [b"get", b"result"])]
    assert sched.handled == [("o", b"grant")]
    assert p._outcomes == {}


def test_an_older_owner_gets_task_done_then_sched_batch_every_time() -> None:
    p, sched, calls = plane(old_owner=True)
    p._outcomes["o"] = [outcome("t1")]
    asyncio.run(p._send("o", [b"get", b"result"]))
    assert [m for m, _ in calls] == ["sched.exchange", "task.done", "sched.batch"]
    assert calls[1][1] == outcome("t1")
    # An outcome queued meanwhile (the owner not yet known to be older) is not lost.
    calls.clear()
    p._outcomes["o"] = [outcome("t2")]
    asyncio.run(p._send("o", [b"result"]))
    assert [(m, r) for m, r in calls] == [("task.done", outcome("t2")),
                                           ("sched.msg", calls[1][1])]
    assert calls[1][1].payload == b"result"
    assert sched.handled == []


# ---------------------------------------------------------------- failures and the
# answering side (probe of sched.exchange: nothing stranded, nothing overtaken)


def spawning(p: ComputePlane) -> list[asyncio.Task[Any]]:
    """Give the fake agent a ``spawn`` that keeps the tasks it starts (to await them)."""
    tasks: list[asyncio.Task[Any]] = []
    p.agent.spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))  # type: ignore[method-assign]
    return tasks


def test_an_exchange_lost_on_the_way_sends_its_outcomes_again_as_task_done() -> None:
    """The call carrying outcomes fails on the way (a reset, a timeout: the owner may be
    dead or may have them): each outcome goes again in a ``task.done`` of its own, and
    the owner is checked; none is left behind in the queue."""
    from meshscale.transport.rpc import RpcError

    p, sched, calls = plane(old_owner=False)
    suspected: list[str] = []
    p._suspect = suspected.append  # type: ignore[method-assign, assignment]
    inner = p._call

    async def call(name: str, method: Any, req: Any, *, lane: str = "") -> Any:
        if method.name == "sched.exchange":
            calls.append((method.name, req))
            raise RpcError("o: connection reset", unreachable=True, refused=True)
        return await inner(name, method, req, lane=lane)

    p._call = call  # type: ignore[method-assign, assignment]

    async def main() -> None:
        tasks = spawning(p)
        p._outcomes["o"] = [outcome("t1"), outcome("t2")]
        await p._send("o", [b"get", b"result"])
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert [(m, getattr(r, "task_id", None)) for m, r in calls] == [
        ("sched.exchange", None), ("task.done", "t1"), ("task.done", "t2")]
    assert suspected == ["o"]
    assert p._outcomes == {} and sched.handled == []


def test_answers_wait_behind_a_call_of_ours_and_behind_outcomes_not_yet_sent() -> None:
    """``_answers_for``: a caller's reply takes nothing while a call of ours to it is on
    the way (the reply would overtake it) or while outcomes for it wait (their Results
    must not reach it first); otherwise it takes the queue, in order, at most
    ``MAX_SCHED_BATCH`` messages, and the rest stays queued, in order, for the flush."""
    from meshscale.core.api.tasks import MAX_SCHED_BATCH

    p, _, _ = plane(old_owner=False)
    p._outq["o"] = [b"r1", b"r2"]
    p._sending.add("o")
    assert p._answers_for("o") == [] and p._outq["o"] == [b"r1", b"r2"]
    p._sending.discard("o")
    p._outcomes["o"] = [outcome("t1")]
    assert p._answers_for("o") == [] and p._outq["o"] == [b"r1", b"r2"]
    del p._outcomes["o"]
    assert p._answers_for("o") == [b"r1", b"r2"] and "o" not in p._outq
    many = [b"m%d" % i for i in range(MAX_SCHED_BATCH + 3)]
    p._outq["o"] = list(many)
    assert p._answers_for("o") == many[:MAX_SCHED_BATCH]
    assert p._outq["o"] == many[MAX_SCHED_BATCH:]


def test_answers_taken_into_a_reply_leave_the_started_flush_only_what_is_left() -> None:
    """A message queued (its flush spawned, not yet running) and taken into the reply to
    the peer's call: the flush then sends what is left, or makes no call at all."""
    p, _, calls = plane(old_owner=False)

    async def main() -> None:
        tasks = spawning(p)
        p._enqueue("o", b"grant")
        assert p._answers_for("o") == [b"grant"]
        await asyncio.gather(*tasks)
        assert calls == [] and "o" not in p._flushing
        p._enqueue("o", b"a")
        p._outq["o"].append(b"b")
        assert p._answers_for("o") == [b"a", b"b"]
        p._enqueue("o", b"c")  # after the reply: the flush already spawned sends it
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert [(m, r.payloads) for m, r in calls] == [("sched.exchange", [b"c"])]


def test_a_flush_puts_at_most_max_sched_batch_messages_in_one_call() -> None:
    """The receiving node refuses a call with more than ``MAX_SCHED_BATCH`` messages (its
    request type's bound): a long queue (a few maps' reservations to one peer) goes in
    several calls, in order, not in one refused call that loses them all."""
    from meshscale.core.api.tasks import MAX_SCHED_BATCH

    p, _, calls = plane(old_owner=False)
    many = [b"m%d" % i for i in range(MAX_SCHED_BATCH + 5)]

    async def main() -> None:
        tasks = spawning(p)
        for m in many:
            p._enqueue("o", m)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert all(len(r.payloads) <= MAX_SCHED_BATCH for _, r in calls), [
        len(r.payloads) for _, r in calls]
    assert [m for _, r in calls for m in r.payloads] == many


def answering(queued: list[bytes]) -> tuple[ComputePlane, list[tuple[str, Any]]]:
    """The owner's side of ``sched.exchange`` (node ``w`` calls it): outcomes and
    messages handled are recorded in order; ``queued`` waits to go to ``w``."""
    p, sched, _ = plane(old_owner=False)
    order: list[tuple[str, Any]] = []

    async def done(req: DoneRequest) -> Any:
        order.append(("done", req.task_id))

    def handle(src: str, payload: bytes, now: float) -> None:
        order.append(("message", payload))

    p._rpc_done = done  # type: ignore[method-assign, assignment]
    sched.handle_message = handle  # type: ignore[method-assign]
    if queued:
        p._outq["w"] = list(queued)
    return p, order


def exchange(outcomes: list[DoneRequest], payloads: list[bytes]) -> Any:
    from meshscale.core.api.tasks import SchedExchangeRequest
    from meshscale.core.scheduling import Resources

    return SchedExchangeRequest(src="w", load=Load(0, 0, 1.0), cap=Resources(1.0, 1024, 0),
                                payloads=payloads, outcomes=outcomes)


def test_the_answering_side_takes_outcomes_before_messages_and_answers_what_waits() -> None:
    p, order = answering([b"grant"])
    reply = asyncio.run(p._rpc_sched_exchange(exchange([outcome("t1")], [b"result-t1"])))
    assert order == [("done", "t1"), ("message", b"result-t1")]
    assert reply.payloads == [b"grant"] and "w" not in p._outq


def test_the_answering_side_refuses_an_outcome_of_another_node_before_taking_any() -> None:
    """An outcome naming a node other than the caller refuses the whole call before
    anything in it is taken (the caller then sends its outcomes again as ``task.done``:
    none may count twice or half), and what waits for the caller stays queued."""
    import pytest

    p, order = answering([b"grant"])
    forged = DoneRequest(task_id="t2", node="x", attempt=1, ok=True, value=b"v")
    with pytest.raises(ValueError, match="names node x"):
        asyncio.run(p._rpc_sched_exchange(exchange([outcome("t1"), forged], [b"result"])))
    assert order == []
    assert p._outq["w"] == [b"grant"]


def test_a_replys_boot_is_noted_before_its_messages_and_every_call_carries_ours() -> None:
    """The answering process's boot comes with its answers and is handed in first (a
    restarted peer's ``GetTask`` is taken only once its new process is known, as for a
    request); and every scheduling call of ours carries our boot, as ``sched.load``
    does (the boot was left out of ``sched.batch`` and ``sched.msg``: an owner learnt a
    runner's restart only from ``sched.load``, up to a second after its messages)."""
    p, sched, calls = plane(old_owner=False)

    async def call(name: str, method: Any, req: Any, *, lane: str = "") -> Any:
        calls.append((method.name, req))
        return SchedReply([b"grant"], boot="b2")

    p._call = call  # type: ignore[method-assign, assignment]
    asyncio.run(p._send("o", [b"get"]))
    assert sched.handled == [("o", b"boot b2"), ("o", b"grant")]
    assert calls[0][1].boot == p._boot != ""
    p, sched, calls = plane(old_owner=True)
    p._outcomes["o"] = [outcome("t1")]
    asyncio.run(p._send("o", [b"get", b"result"]))
    asyncio.run(p._send("o", [b"result"]))
    assert [m for m, _ in calls] == ["sched.exchange", "task.done", "sched.batch",
                                     "sched.msg"]
    assert all(r.boot == p._boot for m, r in calls if m.startswith("sched."))
