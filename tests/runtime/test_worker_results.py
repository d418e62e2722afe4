"""A worker pickles a plain result (int, float, str, bytes, bool, None) with ``pickle``
itself, the same bytes as cloudpickle's, without setting up cloudpickle's pickler (issue
#19: that cost more than a no-op's whole call); anything else still goes through
cloudpickle."""

from __future__ import annotations

import pickle
import socket
from typing import Any

import cloudpickle
import pytest

from meshscale.runtime import worker_main
from meshscale.runtime.worker_main import Done, Init, Task, Worker, function_id


def run(result: Any, monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[object, bytes]:
    a, b = socket.socketpair()
    try:
        w = Worker(a, Init(1 << 20, 1 << 20, 1 << 20, 4, []))
        fn = cloudpickle.dumps(lambda: result)
        body = fn + cloudpickle.dumps(((), {}))
        if monkeypatch is not None:
            monkeypatch.setattr(cloudpickle, "dumps", refuse)
        reply, out, _ = w.run(Task(function_id(fn), len(fn)), memoryview(body))
        return reply, out
    finally:
        a.close()
        b.close()


def refuse(*a: object, **kw: object) -> bytes:
    raise AssertionError("cloudpickle's pickler was set up for a plain result")


@pytest.mark.parametrize("value", [7, 2.5, "é", b"x", True, None])
def test_a_plain_result_is_pickled_without_cloudpickle(
        value: object, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pickle.dumps(value, protocol=5) == cloudpickle.dumps(value, protocol=5)
    reply, out = run(value, monkeypatch)
    assert isinstance(reply, Done) and pickle.loads(out) == value


def test_other_results_still_go_through_cloudpickle() -> None:
    reply, out = run([1, {"a": (2, 3)}])
    assert isinstance(reply, Done) and pickle.loads(out) == [1, {"a": (2, 3)}]
    reply, out = run(lambda x: x + 1)  # pickled by value: only cloudpickle can
    assert isinstance(reply, Done) and cloudpickle.loads(out)(1) == 2
    assert worker_main._PLAIN_RESULTS  # the plain types, exactly
