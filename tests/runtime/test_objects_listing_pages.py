"""The HTTP API's object listing pages as ``meshscale objects`` does (issue #24): a
cursor (``next``) that, followed, gives every object once in id order; a prefix that
stops the scan once the ids pass it; a class filter that looks at a bounded number of
objects per call and hands back where it stopped. The node behind it is a fake that
answers ``obj.list`` as the catalog does (ids after ``after``, ``limit`` of them, and a
``next`` while more follow), counting the calls."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from meshscale.core.api import objects as api
from meshscale.core.api.contract import ResidencyWire
from meshscale.core.objects import listing_start, listing_step, object_id, prefix_problem
from meshscale.runtime.observe import NodeObserver


class Catalog:
    def __init__(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        ids = sorted(object_id(rng.randbytes(8)) for _ in range(n))
        self.classes = {oid: rng.choice([None, "pii", "telemetry"]) for oid in ids}
        self.ids = ids
        self.calls = 0
        self.scanned = 0
        self.afters: list[str] = []

    async def call_local(self, method: Any, req: Any) -> Any:
        assert method is api.LIST
        self.calls += 1
        self.afters.append(req.after)
        rest = [o for o in self.ids if o > req.after]
        page = rest[:req.limit]
        self.scanned += len(page)
        objs = [api.ListedObject(
            id=o, size=1, replicas=3, replica_set=["a"], holders=["a"], health="ok",
            residency=None if self.classes[o] is None
            else ResidencyWire(data_class=self.classes[o])) for o in page]
        return api.ObjectPage(objects=objs, next=page[-1] if len(rest) > len(page) else None)


def _all(obs: NodeObserver, limit: int, **kw: Any) -> tuple[list[str], int]:
    """Every page followed by its ``next``: the ids, and how many pages."""
    out: list[str] = []
    after, pages = kw.pop("after", ""), 0
    while True:
        objs, nxt = asyncio.run(obs.objects(limit, after=after, **kw))
        pages += 1
        assert len(objs) <= limit
        out += [o["id"] for o in objs]
        if nxt is None:
            return out, pages
        assert nxt >= after and (not objs or nxt >= objs[-1]["id"])
        after = nxt


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [1, 3, 7, 50])
def test_following_next_gives_every_object_once_in_order(seed: int, limit: int) -> None:
    cat = Catalog(37, seed)
    got, pages = _all(NodeObserver(cat), limit)  # type: ignore[arg-type]
    assert got == cat.ids
    assert pages == max(1, -(-len(cat.ids) // limit))  # no empty page at the end


@pytest.mark.parametrize("seed", range(4))
def test_a_prefix_lists_its_ids_and_stops_past_them(seed: int) -> None:
    cat = Catalog(300, seed)
    prefix = cat.ids[150][:5]  # "b3-" and two hex digits: about 1 in 256 ids
    want = [o for o in cat.ids if o.startswith(prefix)]
    got, pages = _all(NodeObserver(cat), 2, prefix=prefix)  # type: ignore[arg-type]
    assert got == want and want
    # Each call asks from the prefix on and stops at the first id past it: it never
    # walks the ids before the prefix, nor more than a page (3) beyond it.
    assert min(cat.afters) >= prefix
    assert cat.calls == pages and cat.scanned <= 3 * pages


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_scanned", [1, 5, 10_000])
def test_a_class_filter_is_bounded_per_call_and_its_cursor_goes_on(
        seed: int, max_scanned: int) -> None:
    cat = Catalog(120, seed)
    want = [o for o in cat.ids if cat.classes[o] == "pii"]
    obs = NodeObserver(cat)  # type: ignore[arg-type]
    out: list[str] = []
    after = ""
    while True:
        before = cat.scanned
        objs, nxt = asyncio.run(obs.objects(4, after=after, data_class="pii",
                                            max_scanned=max_scanned))
        assert cat.scanned - before <= max_scanned  # looked at no more than the bound
        assert all(cat.classes[o["id"]] == "pii" for o in objs)
        assert all(o["data_class"] == "pii" for o in objs)
        out += [o["id"] for o in objs]
        if nxt is None:
            break
        after = nxt
    assert out == want


def test_the_narrowing_rules() -> None:
    assert prefix_problem("") is None and prefix_problem("b3-0a") is None
    assert prefix_problem("b") is None and prefix_problem("b3") is None
    assert prefix_problem("zz") == "object ids start with b3-"
    assert prefix_problem("b4-") == "object ids start with b3-"
    assert listing_start("", "b3-5") == "b3-5" and listing_start("b3-7", "b3-5") == "b3-7"
    assert listing_start("b3-1", "") == "b3-1"
    assert listing_step("b3-50", None, prefix="b3-5", want_class=None) == "take"
    assert listing_step("b3-49", None, prefix="b3-5", want_class=None) == "skip"
    assert listing_step("b3-60", None, prefix="b3-5", want_class=None) == "stop"
    assert listing_step("b3-50", "pii", prefix="", want_class="pii") == "take"
    assert listing_step("b3-50", None, prefix="", want_class="pii") == "skip"
    assert listing_step("b3-50", "telemetry", prefix="b3-5", want_class="pii") == "skip"
