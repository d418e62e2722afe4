"""Gossip replay protection: a freshness header inside every sealed datagram and a sliding
window per sender, as DTLS (RFC 6347 §4.1.2.6) and WireGuard keep one.

Sealing (``keyring.py``) proves a datagram came from a holder of the gossip key, not that
it is new: a captured datagram sent again used to be accepted (12 of 12 replays). Each
sender now puts, inside the sealed plaintext,

    boot id (8 bytes, random per process start) | sequence (8, +1 per datagram) |
    send time (4, Unix seconds)

and a receiver accepts a datagram only if its send time is within ``window_s`` of its own
clock and its sequence has not been seen from that boot id: the highest sequence plus a
64-bit bitmap of the ones just below it, so datagrams reordered by the network still pass.
A replay older than the time window is refused whatever the receiver remembers, so the
bounded table of senders (least recently heard evicted) cannot be used to replay.
Members' clocks must agree within ``window_s`` (60 s by default: NTP does far better).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

FRESHNESS = struct.Struct(">8sQI")
FRESHNESS_BYTES = FRESHNESS.size  # 20
WINDOW_BITS = 64


@dataclass(frozen=True)
class ReplayConfig:
    window_s: float = 60.0
    """Accept a datagram sent at most this long ago (or ahead) by the receiver's clock."""
    max_senders: int = 4096
    """Sender windows kept (a boot id each); the least recently heard is evicted."""


class ReplayGuard:
    """Stamps outgoing plaintexts and checks incoming ones. Pure: the caller passes the
    wall clock and the boot id (``os.urandom(8)`` at start)."""

    def __init__(self, boot_id: bytes, config: ReplayConfig | None = None) -> None:
        assert len(boot_id) == 8
        self.boot_id = boot_id
        self.config = config or ReplayConfig()
        self._seq = 0
        self._senders: OrderedDict[bytes, list[int]] = OrderedDict()
        """boot id -> [highest sequence, bitmap of the 64 below it (bit 0: highest)]."""

    def stamp(self, payload: bytes, now: float) -> bytes:
        self._seq += 1
        return FRESHNESS.pack(self.boot_id, self._seq, int(now) & 0xFFFFFFFF) + payload

    def check(self, plaintext: bytes, now: float) -> tuple[bytes | None, str]:
        """(the payload, "") if ``plaintext`` is fresh, else (None, reason): ``short``,
        ``stale`` (sent outside the time window) or ``replay``."""
        if len(plaintext) < FRESHNESS_BYTES:
            return None, "short"
        boot, seq, sent = FRESHNESS.unpack_from(plaintext)
        if abs(now - sent) > self.config.window_s:
            return None, "stale"
        window = self._senders.get(boot)
        if window is None:
            self._senders[boot] = [seq, 1]
            if len(self._senders) > self.config.max_senders:
                self._senders.popitem(last=False)
        else:
            highest, bits = window
            if seq > highest:
                shift = seq - highest
                bits = ((bits << shift) | 1) & ((1 << WINDOW_BITS) - 1) if shift < WINDOW_BITS \
                    else 1
                window[0], window[1] = seq, bits
            else:
                back = highest - seq
                if back >= WINDOW_BITS or bits >> back & 1:
                    return None, "replay"
                window[1] = bits | (1 << back)
            self._senders.move_to_end(boot)
        return plaintext[FRESHNESS_BYTES:], ""
