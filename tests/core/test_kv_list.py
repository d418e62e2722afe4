"""``core.kv.merge_scans``: a KV listing from every replica's paged scan, page after page,
gives exactly each key's newest live record (a tombstone beyond another replica's page
still wins), whatever the page size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.kv import KVRecord, ScanPage, lww_merge, merge_scans

KEYS = [f"k{i:02d}" for i in range(12)]


def scan(store: dict[str, KVRecord], prefix: str, after: str, limit: int) -> ScanPage:
    """One replica's ``kv.scan``: its records after ``after``, at most ``limit``."""
    keys = sorted(k for k in store if k.startswith(prefix) and k > after)
    return ScanPage(tuple(store[k] for k in keys[:limit]), len(keys) >= limit)


def list_all(replicas: list[dict[str, KVRecord]], prefix: str, limit: int) -> list[KVRecord]:
    out: list[KVRecord] = []
    after = ""
    for _ in range(1000):
        got, nxt = merge_scans([scan(r, prefix, after, limit) for r in replicas], limit)
        assert len(got) <= limit
        out += got
        if nxt is None:
            return out
        assert nxt > after
        after = nxt
    raise AssertionError("the listing did not end")


record = st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.binary(max_size=3)),
                   st.integers(0, 20), st.sampled_from(["a", "b", "c"]))


@given(st.lists(st.lists(record, max_size=15), min_size=1, max_size=4),
       st.integers(1, 6), st.sampled_from(["", "k0", "k1", "k05"]))
def test_paged_listing_is_the_newest_live_record_of_each_key(
        raw: list[list[tuple[str, bytes | None, int, str]]], limit: int, prefix: str) -> None:
    replicas: list[dict[str, KVRecord]] = []
    truth: dict[str, KVRecord] = {}
    for rows in raw:
        store: dict[str, KVRecord] = {}
        for key, value, wall, node in rows:
            rec = KVRecord(key, value, HLCTimestamp(wall, 0, node))
            store[key] = lww_merge(store[key], rec) if key in store else rec
            truth[key] = lww_merge(truth[key], rec) if key in truth else rec
        replicas.append(store)
    want = [truth[k] for k in sorted(truth) if k.startswith(prefix)
            and truth[k].value is not None]
    assert list_all(replicas, prefix, limit) == want


def test_a_tombstone_past_a_full_page_is_not_outvoted() -> None:
    """Replica A's page ends at k01; its tombstone of k03 is beyond it. B's older value of
    k03 must not be listed in this round (only keys up to k01 are decided)."""
    old, new = HLCTimestamp(1, 0, "b"), HLCTimestamp(2, 0, "a")
    a = ScanPage((KVRecord("k00", b"x", new), KVRecord("k01", None, new)), full=True)
    b = ScanPage((KVRecord("k03", b"stale", old),), full=False)
    got, nxt = merge_scans([a, b], 2)
    assert [r.key for r in got] == ["k00"] and nxt == "k01"
    a2 = ScanPage((KVRecord("k03", None, new),), full=False)
    b2 = ScanPage((KVRecord("k03", b"stale", old),), full=False)
    assert merge_scans([a2, b2], 2) == ([], None)


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        merge_scans([], 0)
