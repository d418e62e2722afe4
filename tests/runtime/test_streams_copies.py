"""Copies of a shard to its backup go one at a time; a caller whose records the copy
ahead of it carried is done when that copy is confirmed, without a round trip of its own
for the records appended meanwhile (issue 19: with a backup a cloud round trip away, an
operator runner waited a round trip per batch after the demo's node kill).

Deterministic: the backup is a fake whose answers the test releases; no clock is read."""

from __future__ import annotations

import asyncio

from fake_streams import fake_plane, member, turns

from meshscale.core.api.streams import ReplicateReply
from meshscale.core.streams import LogEntry
from meshscale.runtime.streams import StreamPlane


def plane() -> StreamPlane:
    return fake_plane({"n1": member("n1", "r2")})


def test_a_copy_waiting_behind_one_that_carried_its_records_sends_nothing_more() -> None:
    async def main() -> None:
        p = plane()
        sid = p.source_id
        log = p._log("t", sid)
        sent: list[list[int]] = []
        answers: list[asyncio.Event] = []

        async def send_copy(target: str, topic: str, source: str, entries: list[LogEntry],
                            low: int | None) -> ReplicateReply:
            assert target == "n1"
            sent.append([e.offset for e in entries])
            answers.append(asyncio.Event())
            await answers[-1].wait()  # the backup's answer, a round trip away
            return ReplicateReply(head=entries[-1].offset + 1 if entries else 0)

        p._send_copy = send_copy  # type: ignore[method-assign]
        log.append([("k", b"v", "r0", 0.0), ("k", b"v", "r1", 0.0)])
        first = asyncio.ensure_future(p._replicate("t", sid, log, 2))
        await turns()
        assert sent == [[0, 1]]
        # A second batch's copy (its records are 0-1 too: they went in the copy above)
        # queues behind it; meanwhile another record lands.
        second = asyncio.ensure_future(p._replicate("t", sid, log, 2))
        log.append([("k", b"v", "r2", 0.0)])
        await turns()
        answers[0].set()
        await turns()
        assert first.done() and log.copied == 2
        assert second.done(), "waited for a copy of records appended after its own"
        assert sent == [[0, 1]]
        # The record appended meanwhile goes with the next copy that needs it.
        third = asyncio.ensure_future(p._replicate("t", sid, log, 3))
        await turns()
        assert sent == [[0, 1], [2]]
        answers[1].set()
        await turns()
        assert third.done() and log.copied == 3

    asyncio.run(main())
