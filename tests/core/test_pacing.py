"""core.pacing: a loop sleeps its interval while busy, and while idle until its next duty
(bounded), never waking more often than at its fixed period (issue #19)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshscale.core.pacing import DUE_SLACK_S, check_wait_bounds, loop_wait_s


def test_busy_loop_keeps_its_interval() -> None:
    assert loop_wait_s(100.0, idle=False, interval_s=0.5, idle_max_s=5.0,
                       next_duty_at=100.1) == 0.5


def test_idle_loop_sleeps_until_its_duty_or_its_bound() -> None:
    # No duty: the bound.
    assert loop_wait_s(100.0, idle=True, interval_s=0.5, idle_max_s=5.0) == 5.0
    # A duty sooner than the bound: just past it.
    assert loop_wait_s(100.0, idle=True, interval_s=0.5, idle_max_s=5.0,
                       next_duty_at=103.0) == pytest.approx(3.0 + DUE_SLACK_S)
    # A duty later than the bound: the bound.
    assert loop_wait_s(100.0, idle=True, interval_s=0.5, idle_max_s=5.0,
                       next_duty_at=200.0) == 5.0
    # A duty due now or past: one interval, as at a fixed period.
    assert loop_wait_s(100.0, idle=True, interval_s=0.5, idle_max_s=5.0,
                       next_duty_at=99.0) == 0.5
    # A bound below the interval: never shorter than the interval.
    assert loop_wait_s(100.0, idle=True, interval_s=2.0, idle_max_s=1.0) == 2.0


@given(now=st.floats(-1e6, 1e6), idle=st.booleans(), interval_s=st.floats(1e-3, 100.0),
       idle_max_s=st.floats(1e-3, 1000.0),
       duty_in_s=st.none() | st.floats(-1e3, 1e3))
def test_never_more_often_than_the_fixed_period_nor_longer_than_the_bound(
        now: float, idle: bool, interval_s: float, idle_max_s: float,
        duty_in_s: float | None) -> None:
    duty = None if duty_in_s is None else now + duty_in_s
    w = loop_wait_s(now, idle=idle, interval_s=interval_s, idle_max_s=idle_max_s,
                    next_duty_at=duty)
    assert w >= interval_s
    assert w <= max(interval_s, idle_max_s)
    if not idle:
        assert w == interval_s


def test_an_idle_loop_over_a_fake_minute_wakes_for_its_duty_only_and_never_late() -> None:
    """A 0.5 s loop whose one idle duty is due every 5 s (a KV index read): over 60 s
    of a fake clock it wakes about 12 times, not 120, and the duty is never later than
    at the fixed period (its period plus one interval)."""
    interval_s, reload_s, now, done_at = 0.5, 5.0, 0.0, -math.inf
    wakes, duties = 0, []
    while now < 60.0:
        if now - done_at >= reload_s:
            done_at = now
            duties.append(now)
        now += loop_wait_s(now, idle=True, interval_s=interval_s, idle_max_s=5.0,
                           next_duty_at=done_at + reload_s)
        wakes += 1
    assert wakes <= 60.0 / reload_s + 1, wakes
    gaps = [b - a for a, b in itertools.pairwise(duties)]
    assert len(duties) >= 12 and max(gaps) <= reload_s + interval_s, gaps


@pytest.mark.parametrize("interval_s,idle_max_s", [
    (0.0, 5.0), (-1.0, 5.0), (math.inf, 5.0), (math.nan, 5.0), (0.5, 0.0), (0.5, math.inf)])
def test_bounds_are_checked(interval_s: float, idle_max_s: float) -> None:
    with pytest.raises(ValueError):
        check_wait_bounds(interval_s, idle_max_s)
    with pytest.raises(ValueError):
        loop_wait_s(0.0, idle=True, interval_s=interval_s, idle_max_s=idle_max_s)
