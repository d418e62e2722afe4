"""Vivaldi network coordinates with height.

After Dabek, Cox, Kaashoek and Morris, "Vivaldi: A Decentralized Network Coordinate
System", SIGCOMM 2004, with the refinements HashiCorp Serf's ``coordinate`` package makes:
a height term for the access link, a per-node adjustment term (the mean residual over a
window of recent samples, halved, after Lee et al. 2010), a weak gravity toward the origin
so that the whole system does not drift away, and a latency filter (median of the last few
RTT samples per peer, after Ledlie et al., NSDI 2007). Departures from Serf: randomness
comes only from the ``random.Random`` handed in, an RTT of exactly zero is rejected rather
than clamped, a peer coordinate with a negative height or error is rejected as garbage,
gravity never kicks a coordinate sitting on the origin in a random direction, and the
number of peers with a latency filter is bounded (least recently updated dropped first).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass

import msgspec

__all__ = [
    "Coordinate",
    "VivaldiClient",
    "VivaldiConfig",
    "estimate_rtt",
    "is_valid",
    "origin",
]

# Two positions closer than this (seconds) are treated as the same point.
_ZERO_THRESHOLD = 1.0e-6


class Coordinate(msgspec.Struct, frozen=True):
    """A node's network coordinate; all distances are in seconds.

    It travels on the wire inside membership acks, so a received one may be garbage:
    check it with :func:`is_valid` before use.
    """

    vec: tuple[float, ...]
    """Euclidean part, seconds."""
    height: float
    """Access-link latency that no Euclidean placement can express, seconds (>= height_min)."""
    error: float
    """Confidence in this coordinate, dimensionless, in [0, error_max]; lower is better."""
    adjustment: float = 0.0
    """Mean offset between observed RTTs and the Euclidean model, seconds."""


@dataclass(frozen=True)
class VivaldiConfig:
    """Knobs of the coordinate system. Defaults are Serf's."""

    dimensionality: int = 8
    """Number of Euclidean dimensions; accuracy stops improving beyond about 7 (Ledlie)."""
    error_max: float = 1.5
    """Error of a fresh coordinate, and the cap on error thereafter."""
    ce: float = 0.25
    """Largest share an observation can move a node's error estimate (Vivaldi's c_e)."""
    cc: float = 0.25
    """Largest share an observation can move a node's coordinate (Vivaldi's c_c)."""
    adjustment_window_size: int = 20
    """Samples averaged for the adjustment term; 0 disables the adjustment."""
    height_min: float = 10e-6
    """Floor of the height, seconds; also the height of a fresh coordinate."""
    latency_filter_size: int = 3
    """RTT samples per peer whose median is fed to Vivaldi (1 disables filtering)."""
    gravity_rho: float = 150.0
    """Distance (seconds) at which gravity toward the origin pulls with unit force;
    the pull grows with the square of the distance from the origin."""
    max_rtt_s: float = 10.0
    """Samples outside (0, max_rtt_s] are rejected (no change)."""
    max_peers: int = 10_000
    """Most peers with a latency filter; the least recently updated one is dropped."""

    def __post_init__(self) -> None:
        if self.dimensionality < 1:
            raise ValueError(f"dimensionality must be >= 1, got {self.dimensionality}")
        for name in ("error_max", "ce", "cc", "height_min", "gravity_rho", "max_rtt_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        if self.ce > 1 or self.cc > 1:
            raise ValueError(f"ce and cc must be <= 1, got ce={self.ce} cc={self.cc}")
        if self.adjustment_window_size < 0:
            raise ValueError(
                f"adjustment_window_size must be >= 0, got {self.adjustment_window_size}"
            )
        if self.latency_filter_size < 1:
            raise ValueError(f"latency_filter_size must be >= 1, got {self.latency_filter_size}")
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {self.max_peers}")


def origin(config: VivaldiConfig) -> Coordinate:
    """A fresh coordinate: at the origin, minimum height, maximum error."""
    return Coordinate(
        vec=(0.0,) * config.dimensionality,
        height=config.height_min,
        error=config.error_max,
        adjustment=0.0,
    )


def _raw_distance(a: Coordinate, b: Coordinate) -> float:
    if len(a.vec) != len(b.vec):
        raise ValueError(f"coordinate dimensionality differs: {len(a.vec)} != {len(b.vec)}")
    # Grouping keeps the result bit-for-bit symmetric in a and b.
    return math.dist(a.vec, b.vec) + (a.height + b.height)


def estimate_rtt(a: Coordinate, b: Coordinate) -> float:
    """Estimated round-trip time between ``a`` and ``b``, in seconds (>= 0 for valid input).

    The Euclidean distance plus both heights, plus both adjustments when that stays
    positive (a large negative adjustment must not make an estimate meaningless).
    Raises ``ValueError`` if the dimensionalities differ.
    """
    raw = _raw_distance(a, b)
    adjusted = raw + (a.adjustment + b.adjustment)
    return adjusted if adjusted > 0.0 else raw


def is_valid(c: Coordinate, config: VivaldiConfig) -> bool:
    """Whether ``c`` is usable: right dimensionality, finite numbers, height and error >= 0.

    Bounds beyond that are not checked: a peer may run with a different ``height_min``
    or ``error_max`` and its coordinate is still meaningful.
    """
    if len(c.vec) != config.dimensionality:
        return False
    if not all(map(math.isfinite, c.vec)):
        return False
    if not (math.isfinite(c.height) and math.isfinite(c.error) and math.isfinite(c.adjustment)):
        return False
    return c.height >= 0.0 and c.error >= 0.0


class VivaldiClient:
    """One node's coordinate, updated from RTT samples to peers.

    Sans-I/O: the driver (membership) calls :meth:`update` with each probe RTT and the
    coordinate the peer sent in its ack, and :meth:`forget` when a peer leaves.
    """

    def __init__(self, config: VivaldiConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self._origin = origin(config)
        self._coord = self._origin
        self._latency_samples: OrderedDict[str, deque[float]] = OrderedDict()
        self._adjustment_samples = [0.0] * config.adjustment_window_size
        self._adjustment_index = 0
        self.rejected = 0
        """Samples ignored because the peer coordinate or the RTT was invalid."""
        self.resets = 0
        """Times our own coordinate went invalid and was reset to the origin."""

    @property
    def coordinate(self) -> Coordinate:
        return self._coord

    @property
    def config(self) -> VivaldiConfig:
        return self._config

    def update(self, peer: str, peer_coord: Coordinate, rtt_s: float) -> Coordinate:
        """Feed one RTT sample (seconds) to ``peer`` at ``peer_coord``; return our coordinate.

        An invalid peer coordinate or an RTT outside (0, max_rtt_s] changes nothing and is
        counted in ``rejected``.
        """
        if not (
            is_valid(peer_coord, self._config)
            and math.isfinite(rtt_s)
            and 0.0 < rtt_s <= self._config.max_rtt_s
        ):
            self.rejected += 1
            return self._coord

        self._step(peer_coord, self._latency_filter(peer, rtt_s))
        if not is_valid(self._coord, self._config):
            # Overflow from an absurd (yet finite) peer coordinate, most likely.
            self.resets += 1
            self._coord = self._origin
            self._adjustment_samples = [0.0] * self._config.adjustment_window_size
            self._adjustment_index = 0

        c = self._coord
        # Valid here: checked just above (the origin is valid).
        assert self._config.height_min <= c.height
        assert 0.0 <= c.error <= self._config.error_max
        return c

    def forget(self, peer: str) -> None:
        """Drop ``peer``'s latency filter (it left, or came back as someone new)."""
        self._latency_samples.pop(peer, None)

    def _latency_filter(self, peer: str, rtt_s: float) -> float:
        filters = self._latency_samples
        samples = filters.get(peer)
        if samples is None:
            samples = deque(maxlen=self._config.latency_filter_size)
            while len(filters) >= self._config.max_peers:
                filters.popitem(last=False)
            filters[peer] = samples  # inserted last: most recently used
        else:
            filters.move_to_end(peer)
        samples.append(rtt_s)
        ordered = sorted(samples)
        return ordered[len(ordered) // 2]

    def _step(self, other: Coordinate, rtt: float) -> None:
        """One Vivaldi step toward ``other`` at filtered RTT ``rtt``: the spring force,
        then the adjustment term, then gravity toward the origin, into one new
        coordinate. Every number is computed by the same operations, in the same order,
        as three separate steps would (a run is reproducible bit for bit), without
        building the coordinates in between."""
        cfg = self._config
        me = self._coord
        mine = me.vec
        theirs = other.vec
        # The spring: move away from (toward) the peer by the weighted residual.
        dist = estimate_rtt(me, other)
        wrongness = abs(dist - rtt) / rtt
        total_error = max(me.error + other.error, _ZERO_THRESHOLD)
        weight = me.error / total_error
        error = cfg.ce * weight * wrongness + me.error * (1.0 - cfg.ce * weight)
        error = min(error, cfg.error_max)
        force = cfg.cc * weight * (rtt - dist)
        vec, height = self._moved(mine, me.height, force, theirs, other.height, True)
        # The adjustment: the mean residual against the raw distance over a window
        # (adjustments must not feed on themselves).
        adjustment = me.adjustment
        window = cfg.adjustment_window_size
        if window:
            samples = self._adjustment_samples
            samples[self._adjustment_index] = rtt - (
                math.dist(vec, theirs) + (height + other.height))
            self._adjustment_index = (self._adjustment_index + 1) % window
            adjustment = sum(samples) / (2.0 * window)
        # Gravity: a pull toward the origin growing with the square of the distance.
        o = self._origin
        raw = math.dist(o.vec, vec) + (o.height + height)
        adjusted = raw + (o.adjustment + adjustment)
        ratio = (adjusted if adjusted > 0.0 else raw) / cfg.gravity_rho
        vec, height = self._moved(vec, height, -(ratio * ratio), o.vec, o.height, False)
        self._coord = Coordinate(vec, height, error, adjustment)

    def _moved(
        self,
        mine: tuple[float, ...],
        height: float,
        force: float,
        theirs: tuple[float, ...],
        their_height: float,
        random_if_coincident: bool,
    ) -> tuple[tuple[float, ...], float]:
        """Position and height moved by ``force`` seconds away from ``theirs`` (toward it
        if negative)."""
        diff = [a - b for a, b in zip(mine, theirs, strict=True)]
        mag = math.hypot(*diff)
        if mag > _ZERO_THRESHOLD:
            # Each component moves by its share of the unit vector (d / mag) times the
            # force. The height takes its share of the force in proportion to its share
            # of the distance; it never drops below the floor.
            moved = height + force * (height + their_height) / mag
            return (tuple([x + d / mag * force for x, d in zip(mine, diff, strict=True)]),
                    max(moved, self._config.height_min))
        if random_if_coincident:
            unit = self._random_unit_vector()
            return tuple([x + u * force for x, u in zip(mine, unit, strict=True)]), height
        return mine, height

    def _random_unit_vector(self) -> list[float]:
        dims = self._config.dimensionality
        for _ in range(8):
            v = [self._rng.gauss(0.0, 1.0) for _ in range(dims)]
            mag = math.hypot(*v)
            if mag > _ZERO_THRESHOLD:
                return [x / mag for x in v]
        v = [0.0] * dims  # practically unreachable
        v[0] = 1.0
        return v
