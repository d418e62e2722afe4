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
