"""The data plane's start drains the replica manager's outputs page by page while it reads
its store (``ReplicaDriver._hold_outputs``): every copy is short of replicas in a view of
the node alone, and an ``UnderReplicated`` event kept per copy until the end made a
high-water mark the process never gave back (issue #24). The pump that follows must do
exactly what it did with the outputs left in the manager: the same outputs in the same
order, the same count and the same log lines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshscale.core.outputs import Event
from meshscale.core.replication import ReplicationOutput, UnderReplicated
from meshscale.runtime.data.repair import UNDER_REPLICATED_LOGGED, ReplicaDriver
from meshscale.runtime.data.state import DataPlaneBase


@dataclass(frozen=True)
class _Other(Event):
    n: int


class _Rm:
    def __init__(self) -> None:
        self.outputs: list[ReplicationOutput] = []

    def drain(self) -> list[ReplicationOutput]:
        out, self.outputs = self.outputs, []
        return out

    def next_deadline(self) -> float | None:
        return None


class _Agent:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def log(self, level: str, what: str, **fields: Any) -> None:
        self.lines.append((level, what, fields))


class _Timer:
    def arm(self, at: float | None) -> None:
        pass


class _Driver:
    """The driver's pump and its hold, on a manager that only reports events."""

    _hold_outputs = ReplicaDriver._hold_outputs
    _pump = ReplicaDriver._pump
    _count = DataPlaneBase._count

    def __init__(self) -> None:
        self.rm = _Rm()
        self.agent = _Agent()
        self._timer = _Timer()
        self._held: list[ReplicationOutput] = []
        self._unlisted = 0
        self.stats: dict[str, int] = {}


def _pages(pages: int, per_page: int) -> list[list[ReplicationOutput]]:
    """Outputs of a load: under-replicated copies, with other events among them."""
    out: list[list[ReplicationOutput]] = []
    n = 0
    for _ in range(pages):
        page: list[ReplicationOutput] = []
        for _ in range(per_page):
            n += 1
            page.append(_Other(n) if n % 7 == 0 else UnderReplicated(f"o{n}", 1, 3))
        out.append(page)
    return out


def test_held_outputs_are_pumped_as_if_left_in_the_manager() -> None:
    for pages, per_page in ((1, 3), (3, 4), (20, 50)):
        load = _pages(pages, per_page)
        after: list[ReplicationOutput] = [UnderReplicated("late", 1, 3), _Other(-1)]
        ref, held = _Driver(), _Driver()
        for page in load:
            ref.rm.outputs += page  # as before: left in the manager until the pump
            held.rm.outputs += page
            held._hold_outputs()
            # Only the events the pump would log one by one are kept, and the others.
            kept = [o for o in held._held if isinstance(o, UnderReplicated)]
            assert len(kept) <= UNDER_REPLICATED_LOGGED
        for d in (ref, held):
            d.rm.outputs += after
            d._pump()
        assert held.agent.lines == ref.agent.lines
        assert held.stats == ref.stats
        assert held.stats["under_replicated_events"] == sum(
            isinstance(o, UnderReplicated) for o in [*(o for pg in load for o in pg), *after])
        assert held._held == [] and held._unlisted == 0
        held._pump()  # nothing left over for the next pump
        assert held.agent.lines == ref.agent.lines and held.stats == ref.stats
