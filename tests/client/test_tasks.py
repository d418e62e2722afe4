"""Client side of tasks without a mesh: pickling, function ids, ObjectRef slots, options,
errors, and the calling convention the nodes rely on (``call(args_bytes, inputs)``)."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import blake3
import cloudpickle
import pytest

import meshscale
from meshscale.client import tasks as t
from meshscale.client.mesh import MeshError, ObjectRef
from meshscale.core.api import ResidencyWire
from meshscale.core.api.tasks import ResultRef


def add(a: int, b: int = 0) -> int:
    return a + b


def sizes(blob: bytes, other: Any, *, extra: bytes = b"") -> tuple[int, Any, int]:
    return len(blob), other, len(extra)


def run_like_a_worker(fn_bytes: bytes, args_bytes: bytes, inputs: list[bytes]) -> Any:
    """What the node does: plain pickle of bytes around the client's args, then call."""
    call_args = pickle.dumps(((args_bytes, inputs), {}), protocol=5)
    fn = cloudpickle.loads(fn_bytes)
    args, kwargs = pickle.loads(call_args)
    return fn(*args, **kwargs)


def test_function_id_is_blake3_of_the_pickled_bytes_and_cached() -> None:
    fid, data = t.pickle_function(add)
    assert fid == blake3.blake3(data).hexdigest()
    assert t.pickle_function(add) == (fid, data)  # pickled once per process


def test_refs_are_inputs_and_replaced_by_bytes() -> None:
    r1 = ObjectRef("b3-" + "1" * 64, 3)
    r2 = ObjectRef("b3-" + "2" * 64, 5)
    nested = [r1]
    payload, inputs, after = t._pickle_call((r1, nested), {"extra": r2})
    assert after == []
    assert inputs == [r1.id, r2.id]
    _, fn_bytes = t.pickle_function(sizes)
    out = run_like_a_worker(fn_bytes, payload, [b"abc", b"12345"])
    assert out == (3, [r1], 5)  # a nested ref stays a ref


def test_same_ref_twice_is_one_input() -> None:
    r = ObjectRef("b3-" + "3" * 64, 1)
    payload, inputs, _ = t._pickle_call((r, r), {})
    assert inputs == [r.id]
    _, fn_bytes = t.pickle_function(add)
    assert run_like_a_worker(fn_bytes, payload, [b"x"]) == b"xx"


def test_closure_travels_by_value() -> None:
    k = 41

    def plus_k(x: int) -> int:
        return x + k

    _, fn_bytes = t.pickle_function(plus_k)
    payload, _, _ = t._pickle_call((1,), {})
    assert run_like_a_worker(fn_bytes, payload, []) == 42


def test_unpicklable_function_and_arguments_are_refused() -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with pytest.raises(t.TaskSubmitError, match=r"cannot pickle function .*uses_lock: TypeError"):
        t.pickle_function(uses_lock)
    with pytest.raises(t.TaskSubmitError, match="cannot pickle arguments"):
        t._pickle_call((threading.Lock(),), {})
    with pytest.raises(t.TaskSubmitError, match="exceed"):
        t._pickle_call((b"x" * (t.MAX_ARGS_BYTES + 1),), {})


def test_task_decorator_options_and_local_call() -> None:
    @meshscale.task(cpus=2, residency=["eu-west"], retries=1)
    def mul(a: int, b: int) -> int:
        return a * b

    assert mul(3, 4) == 12
    assert mul.cpus == 2.0 and mul.residency == ["eu-west"] and mul.retries == 1
    bigger = mul.options(cpus=4)
    assert bigger.cpus == 4.0 and mul.cpus == 2.0
    with pytest.raises(TypeError, match="unknown task options"):
        mul.options(cpu=1)
    with pytest.raises(ValueError, match="residency is a list"):
        meshscale.task(residency="eu-west")(add)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cpus"):
        meshscale.task(cpus=0)(add)
    fid, _, wire = mul._wire((1, 2), {})
    assert wire.fn_id == fid and wire.fn is None and wire.cpus == 2.0
    assert wire.residency == ResidencyWire(["eu-west"]) and len(wire.task_id) == 32


def test_submit_without_a_mesh_says_connect_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(t, "_default", None)
    with pytest.raises(MeshError, match="connect"):
        meshscale.task(add).submit(1)


def test_task_error_carries_the_remote_traceback() -> None:
    e = t.TaskError("abc", "raised", "ValueError: no", "Traceback...\nValueError: no\n", "n1")
    assert e.traceback.endswith("ValueError: no\n")
    assert "Remote traceback" in str(e) and "on n1" in str(e)
    assert issubclass(t.TaskCancelledError, t.TaskError)


def test_public_names() -> None:
    for name in ("task", "as_completed", "Future", "TaskError", "TaskSubmitError", "connect"):
        assert getattr(meshscale, name) is getattr(t, name)


def _where(x: int) -> int:
    return x


def test_a_placement_by_region_is_sent_as_its_mode() -> None:
    """``placement=meshscale.Region(...)`` used to travel as ``{"name": ...}``, which the
    node read as "no mode: data placement" and ran the task anywhere."""
    import meshscale
    from meshscale.core.api.tasks import PlacementCentral

    t = meshscale.task(placement=meshscale.Region("us-east"))(_where)
    assert t.placement == {"mode": "central", "region": "us-east"}
    t = meshscale.task(placement=meshscale.Regions(["a", "b"]))(_where)
    assert t.placement == {"mode": "regions", "regions": ["a", "b"]}
    assert meshscale.task(placement="data")(_where).placement is None
    for bad in ({"name": "us-east"}, "cloud", 3):
        with pytest.raises(ValueError, match="placement must be"):
            meshscale.task(placement=bad)(_where)
    # A placement with its mode but not that mode's fields is refused here too.
    with pytest.raises(ValueError, match="region"):
        meshscale.task(placement={"mode": "central"})(_where)
    _, _, wire = meshscale.task(placement=meshscale.Region("us-east"))(_where)._wire((), {})
    assert wire.placement == PlacementCentral(region="us-east")


def test_an_oversized_kv_value_is_refused_before_it_is_sent() -> None:
    """A 9 MB KV value used to be sent, and cut off as "Connection reset by peer"."""
    import asyncio

    from meshscale.client.mesh import AsyncKV

    class NoNetwork:
        async def _call_dict(self, *a: object) -> dict[str, object]:
            raise AssertionError("nothing may be sent")

    kv = AsyncKV(NoNetwork())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"at most 1048576 bytes \(MAX_VALUE_BYTES\); this "
                       r"one is 9437184"):
        asyncio.run(kv.put("k", b"x" * (9 << 20)))


# -- futures as arguments, remote exceptions, logs (issue 18) --------------------------


def _future(task_id: str) -> t.Future:
    return t.Future(None, task_id, "f", None)  # type: ignore[arg-type]


def test_futures_at_any_depth_are_references_resolved_on_the_worker() -> None:
    a, b = _future("up-a"), _future("up-b")
    r = ObjectRef("b3-" + "4" * 64, 2)
    payload, inputs, after = t._pickle_call((a, [b, (a, {"k": b})], r), {"extra": b})
    assert after == ["up-a", "up-b"] and inputs == [r.id]
    assert len(payload) < 400  # each future is a small reference to its task
    _, fn_bytes = t.pickle_function(sizes_of_all)
    values = [cloudpickle.dumps(10), cloudpickle.dumps("bee")]
    call_args = pickle.dumps(((payload, [b"rr"], values), {}), protocol=5)
    fn = cloudpickle.loads(fn_bytes)
    args, kwargs = pickle.loads(call_args)
    assert fn(*args, **kwargs) == (10, ["bee", (10, {"k": "bee"})], b"rr", "bee")


def sizes_of_all(*args: Any, extra: Any = None) -> tuple[Any, ...]:
    return (*args, extra)


def test_a_call_with_futures_refuses_a_worker_without_their_values() -> None:
    payload, _, after = t._pickle_call((_future("up"),), {})
    _, fn_bytes = t.pickle_function(add)
    with pytest.raises(pickle.UnpicklingError, match="unknown reference"):
        run_like_a_worker(fn_bytes, payload, [])
    assert after == ["up"]


def test_the_users_file_name_travels_with_the_code() -> None:
    _, fn_bytes = t.pickle_function(add)
    wrapper = cloudpickle.loads(fn_bytes)
    # modules of this project travel with it (this test module is one,
    # client/shipping.py): the call wrapper is pickled inside (client/codepack.py)
    blob = next(c.cell_contents for c in wrapper.__closure__
                if isinstance(c.cell_contents, bytes) and c.cell_contents)
    inner = cloudpickle.loads(blob).__closure__[0].cell_contents
    assert inner.__name__ == "add"
    assert inner.__code__.co_filename == __file__
    assert inner.__code__.co_filename != "<dynamic-code>"


def _view(exc: BaseException | None, **kw: Any) -> t.TaskView:
    return t.TaskView(task_id="tid", state=t.TaskState.FAILED, kind="raised",
                      error="the error", traceback="Traceback: ...", node="node-3",
                      exc=None if exc is None else cloudpickle.dumps(exc), **kw)


class NeedsTwo(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}{b}")


def test_a_remote_exception_is_its_own_type_and_a_task_error() -> None:
    err = t._error_of(_view(ValueError("bad value")))
    assert isinstance(err, ValueError) and isinstance(err, t.TaskError)
    assert (err.task_id, err.node, err.kind) == ("tid", "node-3", "raised")
    assert err.args == ("bad value",) and err.traceback == "Traceback: ..."
    assert str(err).startswith("ValueError: bad value (task tid on node-3)")
    assert type(err) is type(t._error_of(_view(ValueError("again"))))  # one class per type
    back = pickle.loads(pickle.dumps(err))  # pickles as the plain exception
    assert type(back) is ValueError and back.args == ("bad value",)
    key = t._error_of(_view(KeyError("k")))
    assert isinstance(key, KeyError) and isinstance(key, LookupError)


def test_exceptions_that_cannot_be_remade_here_are_task_errors() -> None:
    for exc in (NeedsTwo(1, 2), SystemExit(3), None):
        err = t._error_of(_view(exc))
        assert type(err) is t.TaskError
        assert err.task_id == "tid" and "the error" in str(err)
    cancelled = t._error_of(t.TaskView(task_id="c", state=t.TaskState.CANCELLED,
                                       kind="cancelled", error="cancelled"))
    import concurrent.futures

    assert isinstance(cancelled, concurrent.futures.CancelledError)
    assert isinstance(cancelled, t.TaskCancelledError)


def test_return_when_rules() -> None:
    ok, bad, open_ = _future("ok"), _future("bad"), _future("open")
    ok._outcome = t.TaskView(task_id="ok", state=t.TaskState.DONE, value=b"")
    bad._outcome = t.TaskView(task_id="bad", state=t.TaskState.FAILED, kind="raised")
    assert t._wait_over([ok], t.FIRST_COMPLETED) and not t._wait_over([], t.FIRST_COMPLETED)
    assert t._wait_over([ok, bad], t.FIRST_EXCEPTION)
    assert not t._wait_over([ok], t.FIRST_EXCEPTION)
    assert not t._wait_over([ok, bad], t.ALL_COMPLETED)
    with pytest.raises(ValueError, match="return_when"):
        t._check_return_when("ANY")
    with pytest.raises(TypeError, match="expected Futures"):
        t.wait([open_, "not a future"])  # type: ignore[list-item]
    assert t.gather([]) == []


def test_logs_format() -> None:
    assert t.format_logs("a\n", "") == "a\n"
    assert t.format_logs("a", "b\n") == "a\n--- stderr ---\nb\n"
    assert t.format_logs("", "b") == "--- stderr ---\nb"


def test_source_lines_the_node_could_not_show_are_filled_in_here() -> None:
    line = add.__code__.co_firstlineno + 1
    remote = ("Traceback (most recent call last):\n"
              f'  File "{__file__}", line {line}, in add\n'
              '  File "/nowhere/gone.py", line 3, in lost\n'
              "ValueError: x\n")
    err = t._error_of(t.TaskView(task_id="t", state=t.TaskState.FAILED, kind="raised",
                                 error="ValueError: x", traceback=remote))
    assert err.traceback == ("Traceback (most recent call last):\n"
                             f'  File "{__file__}", line {line}, in add\n'
                             "    return a + b\n"
                             '  File "/nowhere/gone.py", line 3, in lost\n'
                             "ValueError: x\n")
    shown = remote.replace("in add\n", "in add\n    return a + b\n")
    assert t._with_source(shown) == shown  # a line the node showed is left alone


def test_the_submit_window_narrows_on_busy_and_widens_as_requests_get_through() -> None:
    w = t.SubmitWindow(100, 30)
    assert w.next_batch() == 30
    w.sent(30)
    w.sent(30)
    w.sent(30)
    assert w.next_batch() == 10  # never more than the window in flight
    w.sent(10)
    assert w.next_batch() == 0
    w.ended(40)
    assert w.next_batch() == 30
    # The node said busy with 60 in flight: the window halves below what is in flight,
    # so nothing more is sent until enough end.
    w.busy()
    assert w.size_tasks == 30 and w.next_batch() == 0
    w.ended(50)
    assert w.next_batch() == 20
    w.sent(20)
    w.accepted(20)  # a request got through: the window widens by its size, to the limit
    assert w.size_tasks == 50
    for _ in range(10):
        w.accepted(30)
    assert w.size_tasks == 100
    w.ended(30)
    for _ in range(20):
        w.busy()
    assert w.size_tasks == 1 and w.next_batch() == 1  # always room for one task
    with pytest.raises(ValueError):
        w.ended(1)
    with pytest.raises(ValueError):
        t.SubmitWindow(0, 10)


def test_backoff_doubles_with_jitter_up_to_a_cap_and_gives_up() -> None:
    import random

    now = [0.0]
    b = t.Backoff(first_s=0.1, max_s=1.0, give_up_s=5.0, rng=random.Random(7),
                  clock=lambda: now[0])
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for cap in caps:
        d = b.next_delay()
        assert d is not None and cap / 2 <= d <= cap
        now[0] += d
    now[0] = 5.0
    assert b.next_delay() is None  # refused for give_up_s: the caller raises
    b.reset()  # a request got through: start again from first_s
    d = b.next_delay()
    assert d is not None and d <= 0.1


class _BusyNode:
    """A node's submit and wait, as the client sees them: refuses with ``busy`` any
    submit that would take it past ``max_pending`` unfinished tasks (and, with
    ``busy_every``, every n-th submit: a request in the middle of a round), and ends the
    two oldest tasks asked about on each wait, each returning its first argument."""

    def __init__(self, max_pending: int, busy_every: int = 0, lose_first: int = 0) -> None:
        self.max_pending = max_pending
        self.busy_every = busy_every
        self.lose_first = lose_first
        """Take the first n submits, then lose their answers (as a timeout does)."""
        self.taken: list[str] = []
        self.submits = 0
        self.pending: dict[str, bytes] = {}
        self.busy = 0
        self.most_pending = 0

    async def request(self, method: Any, req: Any) -> Any:
        from meshscale.core.api import ErrorCode
        from meshscale.core.api.tasks import SubmitReply, TaskView, WaitReply

        if method.name == "task.submit":
            self.submits += 1
            if len(self.pending) + len(req.tasks) > self.max_pending or (
                    self.busy_every and self.submits % self.busy_every == 0):
                self.busy += 1
                raise MeshError(f"busy: {len(self.pending)} tasks pending", ErrorCode.BUSY)
            for w in req.tasks:
                if w.task_id in self.taken:
                    continue  # an id is taken once (the node's idempotency)
                self.taken.append(w.task_id)
                args, _kwargs, _slots = pickle.loads(w.args)
                self.pending[w.task_id] = cloudpickle.dumps(args[0])
            self.most_pending = max(self.most_pending, len(self.pending))
            if self.submits <= self.lose_first:
                raise MeshError("fake:1: timed out after 30s", unreachable=True)
            return SubmitReply([w.task_id for w in req.tasks])
        assert method.name == "task.wait"
        done = [tid for tid in req.task_ids if tid in self.pending][:2]
        return WaitReply([TaskView(task_id=tid, state="done", value=self.pending.pop(tid))
                          for tid in done], [])


def _fake_mesh(node: _BusyNode) -> t.AsyncTaskMesh:
    mesh = t.AsyncTaskMesh.__new__(t.AsyncTaskMesh)
    mesh.code = None
    mesh.runner = None
    mesh.address = "fake:1"
    mesh._fns_sent = set()
    mesh.map_window_tasks = 64
    mesh.busy_give_up_s = 30.0
    mesh._trequest = node.request  # type: ignore[method-assign]
    return mesh


def test_a_map_past_the_nodes_bound_waits_on_busy_and_keeps_its_window() -> None:
    import asyncio

    node = _BusyNode(max_pending=40)
    mesh = _fake_mesh(node)

    async def run() -> list[int]:
        return [v async for v in mesh.imap(add, range(500))]

    assert asyncio.run(run()) == list(range(500))
    assert node.busy > 0  # the window (64) is above the node's bound (40): it said busy
    assert node.most_pending <= 40 and not node.pending


def test_map_keeps_order_when_a_request_in_the_middle_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    # Small requests, so one round sends several at once and the node refuses one of
    # them while taking the ones after it.
    monkeypatch.setattr(t, "SUBMIT_BATCH", 8)
    node = _BusyNode(max_pending=1000, busy_every=3)
    mesh = _fake_mesh(node)

    async def run() -> list[int]:
        futs = await mesh.map(add, range(300))
        await mesh.wait(futs)
        return [await f for f in futs]

    assert asyncio.run(run()) == list(range(300))
    assert node.busy >= 10  # refused requests were sent again after later ones


def test_a_submit_whose_answer_is_lost_is_sent_again_with_the_same_ids() -> None:
    import asyncio

    node = _BusyNode(max_pending=1000, lose_first=2)
    mesh = _fake_mesh(node)

    async def run() -> list[int]:
        return [v async for v in mesh.imap(add, range(200))]

    assert asyncio.run(run()) == list(range(200))
    assert len(node.taken) == 200  # each task taken once: the resent ones kept their ids

    # An answer lost every time: the map gives up after a few tries, naming why.
    node = _BusyNode(max_pending=1000, lose_first=10**6)
    mesh = _fake_mesh(node)

    async def doomed() -> list[int]:
        return [v async for v in mesh.imap(add, range(10))]

    with pytest.raises(t.TaskSubmitError, match="timed out after 30s"):
        asyncio.run(doomed())
    assert node.submits == t.SUBMIT_LOST_TRIES + 1


class _CountingRunner:
    """Stands in for a blocking mesh's loop thread: counts the trips through it."""

    def __init__(self) -> None:
        self.trips = 0

    def run(self, coro: Any) -> Any:
        self.trips += 1
        coro.close()
        raise AssertionError("went through the mesh's loop thread")


def test_an_ended_future_answers_without_the_loop_thread() -> None:
    """A task whose outcome came inline (as a submit's answer brings a short task's)
    is answered in the caller's thread: no wake-up of the mesh's loop and back."""
    runner = _CountingRunner()
    ok = t.Future(None, "ok", "f", runner)  # type: ignore[arg-type]
    ok._resolve(t.TaskView(task_id="ok", state=t.TaskState.DONE,
                           value=cloudpickle.dumps({"n": 7})))
    assert ok.result() == {"n": 7}
    assert ok.result(timeout=0) is ok.result()  # loaded once
    assert ok.exception() is None
    bad = t.Future(None, "bad", "f", runner)  # type: ignore[arg-type]
    bad._resolve(t.TaskView(task_id="bad", state=t.TaskState.FAILED, kind="raised",
                            error="ValueError: no"))
    with pytest.raises(t.TaskError, match="no"):
        bad.result()
    assert isinstance(bad.exception(), t.TaskError)
    gone = t.Future(None, "gone", "f", runner)  # type: ignore[arg-type]
    gone._resolve(t.TaskView(task_id="gone", state=t.TaskState.CANCELLED,
                             kind="cancelled", error="cancelled"))
    with pytest.raises(t.TaskCancelledError):
        gone.exception()
    assert runner.trips == 0
    # A result stored as an object is fetched: that one goes through the loop.
    big = t.Future(None, "big", "f", runner)  # type: ignore[arg-type]
    big._resolve(t.TaskView(task_id="big", state=t.TaskState.DONE,
                            ref=ResultRef("b3-" + "4" * 64, 9)))
    with pytest.raises(AssertionError, match="loop thread"):
        big.result()
    assert runner.trips == 1


def test_the_call_wrapper_makes_no_class_per_call() -> None:
    """The worker-side wrapper reads a call with a plain ``Unpickler`` whose
    ``persistent_load`` is set on the instance: a subclass made on every call (to
    resolve futures) took ~100 us, more than the rest of a no-op's run (issue #19)."""
    import gc

    _, fn_bytes = t.pickle_function(add)
    payload, _, _ = t._pickle_call((2,), {"b": 3})
    gc.collect()
    gc.disable()  # a class made per call lingers until collected: count them
    try:
        before = len(pickle.Unpickler.__subclasses__())
        assert [run_like_a_worker(fn_bytes, payload, []) for _ in range(5)] == [5] * 5
        assert len(pickle.Unpickler.__subclasses__()) == before
    finally:
        gc.enable()
