"""What a sans-I/O protocol object hands back to its driver.

Every protocol in ``core/`` is fed inputs (a datagram, a stream request, a timer, a local
call), each with ``now`` from the driver's clock, and queues outputs that the driver
collects with ``drain()``. The simulator and the runtime are the two drivers; neither
decides anything, they only move bytes and keep time.

The driver contract (``DrivenProtocol``):

- ``handle_datagram(src, payload, now)``: an unreliable datagram (UDP) arrived from ``src``.
- ``handle_stream(src, payload, now) -> bytes | None``: a reliable request (one TCP
  exchange) arrived; the return value is sent back as the reply (``None``: no reply).
- ``handle_stream_reply(src, payload, now)``: the reply to a ``StreamRequest`` we made.
- ``stream_failed(dst, now)``: a ``StreamRequest`` could not be completed.
- ``next_deadline() -> float | None``: the earliest ``now`` at which ``on_timer`` must run.
- ``on_timer(now)``: called at (or after) ``next_deadline()``.
- ``drain() -> list[Output]``: everything queued since the last drain, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send ``payload`` as one datagram to ``addr`` (UDP in the runtime)."""

    addr: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Open a reliable exchange with ``addr`` (TCP in the runtime): send ``payload``,
    then feed the reply to ``handle_stream_reply`` or report ``stream_failed``."""

    addr: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of events for the layer above (membership changes and the like)."""


Output = SendDatagram | StreamRequest | Event


class DrivenProtocol(Protocol):
    """The interface both drivers (``sim`` and ``runtime``) call."""

    def handle_datagram(self, src: str, payload: bytes, now: float) -> None: ...

    def handle_stream(self, src: str, payload: bytes, now: float) -> bytes | None: ...

    def handle_stream_reply(self, src: str, payload: bytes, now: float) -> None: ...

    def stream_failed(self, dst: str, now: float) -> None: ...

    def next_deadline(self) -> float | None: ...

    def on_timer(self, now: float) -> None: ...

    def drain(self) -> list[Output]: ...
