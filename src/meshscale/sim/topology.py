"""Where simulated nodes sit and how far apart they are.

A topology is a set of regions, each with availability zones, and a round-trip-time
model: a fixed RTT between two zones of one region, a smaller one inside a zone, and a
symmetric matrix of inter-region RTTs (pairs left out fall back to a default). Each
node may also carry a small access latency (its NIC, host stack, last-mile link) that is
added to every RTT involving it: this is what the "height" of a Vivaldi coordinate
models, so a simulated mesh gives coordinate code something real to fit.

The numbers in the presets are rounded public inter-region ping medians of large cloud
providers; they are meant to be plausible, not exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Irrational step of a low-discrepancy sequence: spreads access latencies evenly over
# [0, max) for any n, deterministically and without a random generator.
_GOLDEN_FRACTION = 0.6180339887498949


@dataclass(frozen=True, slots=True)
class Placement:
    """A node's failure domain and its own access latency (seconds, added to every RTT
    involving it)."""

    region: str
    zone: str
    access_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.access_s) and self.access_s >= 0.0):
            raise ValueError(f"access_s must be finite and >= 0, got {self.access_s!r}")


@dataclass(frozen=True)
class Topology:
    """Regions, zones and the RTTs between them. All times are seconds."""

    regions: dict[str, tuple[str, ...]]
    region_rtt_s: dict[tuple[str, str], float] = field(default_factory=dict)
    intra_region_rtt_s: float = 0.004
    intra_zone_rtt_s: float = 0.0008
    jitter: float = 0.1
    default_inter_region_rtt_s: float = 0.1

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("a topology needs at least one region")
        for region, zones in self.regions.items():
            if not zones:
                raise ValueError(f"region {region!r} has no zones")
            if len(set(zones)) != len(zones):
                raise ValueError(f"region {region!r} lists a zone twice: {zones!r}")
        for name, value in (
            ("intra_region_rtt_s", self.intra_region_rtt_s),
            ("intra_zone_rtt_s", self.intra_zone_rtt_s),
            ("default_inter_region_rtt_s", self.default_inter_region_rtt_s),
        ):
            _check_rtt(name, value)
        if not (0.0 <= self.jitter < 1.0):
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        for (a, b), rtt in self.region_rtt_s.items():
            _check_rtt(f"region_rtt_s[{a!r}, {b!r}]", rtt)
            if a == b:
                raise ValueError(f"region_rtt_s[{a!r}, {b!r}]: use intra_region_rtt_s")
            other = self.region_rtt_s.get((b, a))
            if other is not None and other != rtt:
                raise ValueError(f"region_rtt_s is not symmetric for {a!r} and {b!r}")

    @classmethod
    def three_regions(cls) -> Topology:
        """Europe, US east coast and India, three zones each."""
        return cls(
            regions={
                "eu-west": ("eu-west-a", "eu-west-b", "eu-west-c"),
                "us-east": ("us-east-a", "us-east-b", "us-east-c"),
                "ap-south": ("ap-south-a", "ap-south-b", "ap-south-c"),
            },
            region_rtt_s={
                ("eu-west", "us-east"): 0.080,
                ("eu-west", "ap-south"): 0.140,
                ("us-east", "ap-south"): 0.190,
            },
        )

    @classmethod
    def five_regions(cls) -> Topology:
        """Ireland, Frankfurt, Virginia, Oregon and Mumbai, three zones each."""
        names = ("eu-west", "eu-central", "us-east", "us-west", "ap-south")
        return cls(
            regions={r: (f"{r}-a", f"{r}-b", f"{r}-c") for r in names},
            region_rtt_s={
                ("eu-west", "eu-central"): 0.025,
                ("eu-west", "us-east"): 0.070,
                ("eu-west", "us-west"): 0.130,
                ("eu-west", "ap-south"): 0.120,
                ("eu-central", "us-east"): 0.090,
                ("eu-central", "us-west"): 0.150,
                ("eu-central", "ap-south"): 0.110,
                ("us-east", "us-west"): 0.065,
                ("us-east", "ap-south"): 0.190,
                ("us-west", "ap-south"): 0.220,
            },
        )

    def region_rtt(self, a: str, b: str) -> float:
        """RTT between two regions (``intra_region_rtt_s`` when they are the same)."""
        if a == b:
            return self.intra_region_rtt_s
        rtt = self.region_rtt_s.get((a, b))
        if rtt is None:
            rtt = self.region_rtt_s.get((b, a), self.default_inter_region_rtt_s)
        return rtt

    def core_rtt(self, a: Placement, b: Placement) -> float:
        """RTT between the failure domains of ``a`` and ``b``, without access latency."""
        if a.region != b.region:
            return self.region_rtt(a.region, b.region)
        if a.zone != b.zone:
            return self.intra_region_rtt_s
        return self.intra_zone_rtt_s

    def base_rtt(self, a: Placement, b: Placement) -> float:
        """Expected RTT between two nodes, without jitter."""
        return self.core_rtt(a, b) + a.access_s + b.access_s

    def place(self, n: int, *, max_access_s: float = 0.001) -> list[Placement]:
        """Spread ``n`` nodes round-robin over regions, then over each region's zones.

        Node ``i`` gets an access latency in ``[0, max_access_s)`` from a deterministic
        low-discrepancy sequence, so heights differ without any randomness.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not (math.isfinite(max_access_s) and max_access_s >= 0.0):
            raise ValueError(f"max_access_s must be finite and >= 0, got {max_access_s!r}")
        regions = list(self.regions)
        placements: list[Placement] = []
        for i in range(n):
            region = regions[i % len(regions)]
            zones = self.regions[region]
            zone = zones[(i // len(regions)) % len(zones)]
            access = max_access_s * ((i * _GOLDEN_FRACTION) % 1.0)
            placements.append(Placement(region, zone, access))
        return placements


def _check_rtt(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
