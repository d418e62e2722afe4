"""core/api/tasks.py: the compute plane's wire contract (task specs, outcomes, scheduling
requests) round-trips, and what is out of it is refused naming the field."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from meshscale.core.api import (
    ApiError,
    Empty,
    ErrorCode,
    ResidencyWire,
    parse_reply,
    parse_request,
    reply_builtins,
    request_args,
)
from meshscale.core.api import tasks as api
from meshscale.core.scheduling import Central, DataLocal, InRegions, Load, NearSource, Resources
from meshscale.core.tasks import TaskState

FN = "ab" * 32


def _wire(req: Any) -> Any:
    """``req`` as it reaches the node: encoded and decoded as msgpack."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(request_args(req)))


def _task(**kw: Any) -> api.TaskWire:
    return api.TaskWire(task_id=kw.pop("task_id", "t1"), fn_id=FN, **kw)


REQUESTS: dict[str, Any] = {
    "task.submit": api.SubmitRequest(tasks=[
        _task(fn=b"\x80fn", args=b"args", inputs=["b3-" + "1" * 64], cpus=0.5, memory_mb=64,
              gpus=1, labels={"disk": "ssd"},
              residency=ResidencyWire(["eu-west"], "pii"),
              placement=api.PlacementRegions(regions=["eu-west", "us-east"]), retries=0,
              timeout_s=2.5),
        _task(task_id="t2", placement=api.PlacementNearSource(source="node-3")),
        _task(task_id="t3", placement=api.PlacementData())]),
    "task.result": api.ResultRequest(task_id="t1", timeout_s=1.5, forwarded=True),
    "task.wait": api.WaitRequest(task_ids=["a", "b"], timeout_s=3.0, min_done=2),
    "task.cancel": api.CancelRequest(task_id="t1"),
    "task.list": api.ListRequest(limit=5),
    "task.stats": Empty(),
    "task.logs": api.LogsRequest(task_id="t1"),
    "task.done": api.DoneRequest(task_id="t1", node="n2", attempt=2, ok=True,
                                 ref=api.ResultRef("b3-" + "2" * 64, 300_000)),
    "task.fn": api.FnRequest(fn_id=FN),
    "task.kill": api.KillRequest(owner="n1", task_id="t1"),
    "sched.msg": api.SchedMsgRequest(src="n1", load=Load(1, 2, 0.5),
                                     cap=Resources(2.0, 1024, 0), payload=b"\x92\x01\x90"),
    "sched.batch": api.SchedBatchRequest(src="n1", load=Load(), cap=Resources(),
                                         payloads=[b"a", b"b"]),
    "sched.load": api.LoadReport(src="n1", load=Load(0, 0, 4.0), cap=Resources(4.0, 8192, 1)),
    "sched.exchange": api.SchedExchangeRequest(
        src="n1", load=Load(), cap=Resources(), payloads=[b"c"],
        outcomes=[api.DoneRequest(task_id="t1", node="n1", attempt=1, ok=True, value=b"v")]),
}


def test_a_sample_request_for_every_method() -> None:
    assert set(REQUESTS) == {m.name for m in api.METHODS}


@pytest.mark.parametrize("method", api.METHODS, ids=lambda m: m.name)
def test_every_request_round_trips(method: Any) -> None:
    req = REQUESTS[method.name]
    assert isinstance(req, method.request)
    assert parse_request(method, _wire(req)) == req


@pytest.mark.parametrize("method", api.METHODS, ids=lambda m: m.name)
def test_every_request_refuses_an_unknown_field(method: Any) -> None:
    args = _wire(REQUESTS[method.name])
    args["bogus"] = 1
    with pytest.raises(ApiError) as e:
        parse_request(method, args)
    assert e.value.code is ErrorCode.INVALID and "bogus" in str(e.value)


def test_the_wire_shape_of_a_task_spec() -> None:
    """Residency is a ResidencyWire map, placement a map with its mode; loads and
    capacities are arrays, as core.scheduling has them."""
    args = _wire(REQUESTS["task.submit"])
    t = args["tasks"][0]
    assert t["residency"] == {"regions": ["eu-west"], "data_class": "pii"}
    assert t["placement"] == {"mode": "regions", "regions": ["eu-west", "us-east"]}
    assert args["tasks"][2] == {"task_id": "t3", "fn_id": FN, "placement": {"mode": "data"}}
    assert _wire(REQUESTS["sched.msg"])["load"] == [1, 2, 0.5]
    assert _wire(REQUESTS["sched.msg"])["cap"] == [2.0, 1024, 0]


@pytest.mark.parametrize(("task", "field"), [
    ({"fn_id": "not-hex"}, "fn_id"),
    ({"cpus": 0}, "cpus"),
    ({"cpus": "two"}, "cpus"),
    ({"memory_mb": -1}, "memory_mb"),
    ({"task_id": ""}, "task_id"),
    ({"inputs": ["x"] * (api.MAX_INPUTS + 1)}, "inputs"),
    ({"labels": {"k": 1}}, "labels"),
    ({"residency": ["eu-west"]}, "residency"),
    ({"residency": {"regions": "eu-west"}}, "regions"),
    ({"placement": {"mode": "central"}}, "region"),
    ({"placement": {"mode": "cloud"}}, "mode"),
    ({"placement": {"region": "eu"}}, "mode"),
    ({"placement": "data"}, "placement"),
    ({"retries": -1}, "retries"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"args": b"x" * (api.MAX_ARGS_BYTES + 1)}, "args"),
    ({"name": "f" * (api.MAX_FUNCTION_NAME + 1)}, "name"),
    ({"nmae": "f"}, "nmae"),  # an unknown field
])
def test_a_task_out_of_contract_is_invalid_naming_the_field(task: dict[str, Any],
                                                            field: str) -> None:
    spec = {"task_id": "t", "fn_id": FN, **task}
    with pytest.raises(ApiError) as e:
        parse_request(api.TASK_SUBMIT, {"tasks": [spec]})
    assert e.value.code is ErrorCode.INVALID and field in str(e.value)
    assert "task.submit" in str(e.value)


def test_a_submit_needs_one_task_and_a_bounded_number() -> None:
    for tasks in ([], [{"task_id": str(i), "fn_id": FN}
                       for i in range(api.MAX_SUBMIT_TASKS + 1)]):
        with pytest.raises(ApiError, match="tasks"):
            parse_request(api.TASK_SUBMIT, {"tasks": tasks})


def test_sched_requests_out_of_contract() -> None:
    ok = _wire(REQUESTS["sched.load"])
    for field, bad in (("load", [-1, 0, 0.0]), ("cap", "big"), ("src", ""), ("load", None)):
        with pytest.raises(ApiError) as e:
            parse_request(api.SCHED_LOAD, {**ok, field: bad})
        assert e.value.code is ErrorCode.INVALID and field in str(e.value)
    with pytest.raises(ApiError, match="payloads"):
        parse_request(api.SCHED_BATCH, {**ok, "payloads": [b""] * (api.MAX_SCHED_BATCH + 1)})
    with pytest.raises(ApiError, match="payload"):
        parse_request(api.SCHED_MSG, ok)  # no payload


REPLIES: dict[str, Any] = {
    "task.submit": api.SubmitReply(["t1"], [api.TaskView(
        task_id="t1", state=TaskState.DONE, value=b"\x80v", node="n2", owner="n1",
        reason="n2 (eu): total=1")]),
    "task.result": api.TaskView(task_id="t1", state=TaskState.FAILED, kind="raised",
                                error="ZeroDivisionError", traceback="Traceback..."),
    "task.wait": api.WaitReply([api.TaskView(task_id="a", state=TaskState.DONE,
                                             ref=api.ResultRef("b3-" + "3" * 64, 9))], ["b"]),
    "task.cancel": api.CancelReply(True, TaskState.CANCELLED),
    "task.list": [api.TaskRow(task_id="t1", state=TaskState.RUNNING, node="n2", owner="n1",
                              submitted=1.5)],
    "task.logs": api.TaskLogs(task_id="t1", state=TaskState.DONE, stdout="hello\n",
                              stderr="[meshscale: output truncated]", node="n2"),
    "task.stats": api.TaskStats(compute={"tasks_done": 3}, scheduling={}, pool={"idle": 2},
                                records=3, load=Load(1, 0, 1.0), capacity=Resources(2.0, 64)),
    "task.done": api.DoneReply(False),
    "task.fn": api.FnReply(b"\x80fn"),
    "task.kill": api.KillReply(True),
    "sched.msg": api.SchedAck(),
    "sched.batch": api.SchedAck(),
    "sched.exchange": api.SchedReply([b"\x92\x04\x90", b"d"]),
    "sched.load": REQUESTS["sched.load"],
}


@pytest.mark.parametrize("method", api.METHODS, ids=lambda m: m.name)
def test_every_reply_round_trips(method: Any) -> None:
    rep = REPLIES[method.name]
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(reply_builtins(rep)))
    assert parse_reply(method, wire) == rep


def test_a_reply_out_of_contract_is_refused() -> None:
    with pytest.raises(ValueError, match="state"):
        parse_reply(api.TASK_RESULT, {"task_id": "t", "state": "exploded"})
    with pytest.raises(ValueError, match="accepted"):
        parse_reply(api.TASK_SUBMIT, {"results": []})


def test_placement_modes() -> None:
    assert api.placement_mode(None) == DataLocal()
    assert api.placement_mode(api.PlacementData()) == DataLocal()
    assert api.placement_mode(api.PlacementCentral(region="eu")) == Central("eu")
    assert api.placement_mode(api.PlacementRegions(regions=["a", "b"])) == \
        InRegions(frozenset({"a", "b"}))
    assert api.placement_mode(api.PlacementNearSource(source="n1")) == NearSource("n1")
    # A record's stored placement (the map a client sent) reads back the same.
    for wire in (api.PlacementCentral(region="eu"), api.PlacementRegions(regions=["a"]),
                 api.PlacementNearSource(source="n1"), api.PlacementData()):
        assert api.parse_placement(msgspec.to_builtins(wire)) == wire
    assert api.parse_placement(None) is None
    with pytest.raises(ValueError, match="mode"):
        api.parse_placement({"name": "us-east"})
