"""Deterministic discrete-event simulator: drives ``core`` protocols in virtual time."""

from meshscale.sim.engine import Factory, NodeContext, NodeStats, SimStats, Simulator
from meshscale.sim.topology import Placement, Topology

__all__ = [
    "Factory",
    "NodeContext",
    "NodeStats",
    "Placement",
    "SimStats",
    "Simulator",
    "Topology",
]
