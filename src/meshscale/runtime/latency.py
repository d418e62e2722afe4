"""Emulated inter-region latency for a mesh run on one machine (``meshscale up``).

A spec such as ``eu-west:us-east=80ms,eu-west:ap-south=0.15s`` names the round-trip
time between two regions (symmetric); pairs not named, and members of the same region,
get no added delay. The node agent holds each send to a member of another region for
half the RTT (both directions are delayed, so a probe and its ack add up to the RTT).
It is off unless configured and must stay off in real deployments.
"""

from __future__ import annotations

import re

RegionPair = tuple[str, str]
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s)?\s*$")
MAX_EMULATED_RTT_S = 10.0


def parse_duration(text: str) -> float:
    """``80ms`` / ``0.08s`` / ``0.08`` (seconds) -> seconds."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise ValueError(f"invalid duration {text!r}: use e.g. 80ms or 0.08s")
    value = float(m.group(1))
    return value / 1000.0 if m.group(2) == "ms" else value


def parse_latency(spec: str | list[str] | None) -> dict[RegionPair, float]:
    """Parse ``a:b=80ms,...`` (or a list of such strings) into ``{(a, b): rtt_s}``,
    with both orders of each pair present."""
    if spec is None:
        return {}
    parts: list[str] = []
    for chunk in [spec] if isinstance(spec, str) else spec:
        parts.extend(p for p in chunk.split(",") if p.strip())
    out: dict[RegionPair, float] = {}
    for part in parts:
        pair, sep, value = part.partition("=")
        a, colon, b = pair.strip().partition(":")
        if not sep or not colon or not a.strip() or not b.strip():
            raise ValueError(f"invalid latency {part.strip()!r}: use REGION:REGION=80ms")
        rtt = parse_duration(value)
        if not 0 <= rtt <= MAX_EMULATED_RTT_S:
            raise ValueError(f"invalid latency {part.strip()!r}: must be 0..{MAX_EMULATED_RTT_S}s")
        a, b = a.strip(), b.strip()
        out[(a, b)] = rtt
        out[(b, a)] = rtt
    return out


def format_latency(table: dict[RegionPair, float]) -> str:
    """The inverse of ``parse_latency`` (each pair once)."""
    seen: set[frozenset[str]] = set()
    parts = []
    for (a, b), rtt in sorted(table.items()):
        key = frozenset((a, b))
        if key in seen:
            continue
        seen.add(key)
        parts.append(f"{a}:{b}={rtt * 1000:g}ms")
    return ",".join(parts)
