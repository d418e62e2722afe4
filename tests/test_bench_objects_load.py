"""bench/objects.py's scale load: which failed puts it tries again (the runs are a
benchmark; one lost answer must not end a million-object run, a real refusal must)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import objects
from meshscale.client.rpc import RemoteError, RpcError


def test_transient_answers_and_lost_answers_are_tried_again() -> None:
    assert objects._transient(RemoteError("busy: 64 requests in flight", "busy"))
    assert objects._transient(RemoteError("node is starting", "starting"))
    assert objects._transient(RemoteError("2 of 3 copies, w=2 not met", "unavailable"))
    assert objects._transient(RpcError("connection refused", refused=True))
    assert objects._transient(RpcError("request timed out after 120s"))


def test_a_refusal_or_a_broken_rule_ends_the_run() -> None:
    assert not objects._transient(RemoteError("object too large", "invalid"))
    assert not objects._transient(RemoteError("no space", "disk_full"))
    assert not objects._transient(RemoteError("unauthorized", "unauthorized"))
    assert not objects._transient(RpcError("TLS: certificate verify failed"))
