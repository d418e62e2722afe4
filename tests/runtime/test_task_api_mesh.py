"""The compute plane's methods on a real node (core/api/tasks.py): every one refuses an
unknown field and a wrong type with ``invalid`` naming the field, and answers in
contract when called typed (node-to-node methods with a node's own certificate, in its
own name)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from runtime_mesh import wait_for

from meshscale.client.rpc import RemoteError, call, request
from meshscale.core.api import Empty
from meshscale.core.api import tasks as api
from meshscale.core.scheduling import Load, Resources
from meshscale.runtime.launcher import LocalMesh
from meshscale.transport.credentials import Credentials

pytestmark = pytest.mark.timeout(120)

FN = "cd" * 32
ME = "node-1"
"""The caller: node 1's certificate, calling node 0."""
LOAD: dict[str, Any] = {"src": ME, "load": [0, 0, 0.0], "cap": [1.0, 0, 0]}

CASES: dict[str, tuple[dict[str, Any], str, Any]] = {
    # method: (args in contract, a field, a wrong value for it)
    "task.submit": ({"tasks": [{"task_id": "t", "fn_id": FN}]}, "tasks", [{"task_id": 1}]),
    "task.result": ({"task_id": "t"}, "timeout_s", "soon"),
    "task.wait": ({"task_ids": ["t"]}, "min_done", 0),
    "task.cancel": ({"task_id": "t"}, "task_id", 5),
    "task.list": ({}, "limit", "ten"),
    "task.stats": ({}, "", None),
    "task.logs": ({"task_id": "t"}, "task_id", 9),
    "task.done": ({"task_id": "t", "node": ME}, "ok", "yes"),
    "task.fn": ({"fn_id": FN}, "fn_id", "not-hex"),
    "task.kill": ({"owner": ME, "task_id": "t"}, "task_id", 7),
    "sched.msg": ({**LOAD, "payload": b""}, "load", "busy"),
    "sched.batch": ({**LOAD, "payloads": []}, "payloads", "x"),
    "sched.exchange": ({**LOAD, "payloads": []}, "payloads", "x"),
    "sched.load": (dict(LOAD), "cap", [-1.0, 0, 0]),
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("taskapi"), 2, http=False) as m:
        yield m


@pytest.fixture(scope="module")
def node_creds(mesh: LocalMesh) -> Credentials:
    creds = mesh.node_credentials(1)
    addr = mesh.nodes[0].address

    def serving() -> bool:
        """The compute plane serves (the node answers "starting" before)."""
        try:
            call(addr, creds, "task.list", {}, timeout=5)
        except RemoteError as e:
            if e.code != "starting":
                raise
            return False
        return True

    wait_for(serving, 60, "the compute plane to serve task.list", poll=0.2)
    return creds


def test_a_case_for_every_method() -> None:
    assert set(CASES) == {m.name for m in api.METHODS}


@pytest.mark.parametrize("method", sorted(CASES))
def test_out_of_contract_is_invalid_naming_the_field(mesh: LocalMesh, node_creds: Credentials,
                                                     method: str) -> None:
    args, field, wrong = CASES[method]
    addr = mesh.nodes[0].address
    bad = [({**args, "bogus_field": 1}, "bogus_field")]
    if field:
        bad.append(({**args, field: wrong}, field))
    for sent, named in bad:
        with pytest.raises(RemoteError) as e:
            call(addr, node_creds, method, sent, timeout=10)
        assert e.value.code == "invalid", (method, str(e.value))
        assert named in str(e.value) and method in str(e.value)


def test_typed_calls_answer_in_contract(mesh: LocalMesh, node_creds: Credentials) -> None:
    addr, client = mesh.nodes[0].address, mesh.credentials()
    stats = request(addr, client, api.TASK_STATS, Empty(), timeout=10)
    assert stats.capacity.cpus > 0 and stats.records >= 0
    report = api.LoadReport(src=ME, load=Load(0, 0, 1.0), cap=Resources(1.0, 512, 0))
    back = request(addr, node_creds, api.SCHED_LOAD, report, timeout=10)
    assert back.src == mesh.nodes[0].name
    # Junk scheduling messages reach the scheduler (which drops and counts them).
    assert request(addr, node_creds, api.SCHED_BATCH, api.SchedBatchRequest(
        src=ME, load=report.load, cap=report.cap, payloads=[b"junk", b"junk"]),
        timeout=10) == api.SchedAck()
    assert request(addr, node_creds, api.TASK_KILL, api.KillRequest(owner=ME, task_id="t"),
                   timeout=10) == api.KillReply(False)
    assert request(addr, node_creds, api.TASK_DONE, api.DoneRequest(task_id="t", node=ME),
                   timeout=10) == api.DoneReply(False)
    # An id with no record is "not yet" for a grace (its owner may still be writing its
    # one record: ``core.tasks.Unrecorded``), then unknown.
    reply = request(addr, client, api.TASK_WAIT, api.WaitRequest(task_ids=["nope"]), timeout=10)
    assert reply.results == [] and reply.unknown == []

    def unknown() -> api.WaitReply | None:
        r = request(addr, client, api.TASK_WAIT, api.WaitRequest(task_ids=["nope"]),
                    timeout=10)
        return r if r.unknown else None

    reply = wait_for(unknown, 30, "the id with no record answered unknown")
    assert reply.results == [] and reply.unknown == ["nope"]
    with pytest.raises(RemoteError) as e:
        request(addr, node_creds, api.TASK_FN, api.FnRequest(fn_id=FN), timeout=10)
    assert e.value.code == "not_found"
    # ``task.result`` likewise: pending while the record may still be on its way.
    assert request(addr, client, api.TASK_RESULT, api.ResultRequest(task_id="nope-2"),
                   timeout=10).state == "pending"

    def result_not_found() -> str | None:
        try:
            request(addr, client, api.TASK_RESULT, api.ResultRequest(task_id="nope-2"),
                    timeout=10)
        except RemoteError as e:
            return e.code
        return None

    assert wait_for(result_not_found, 30, "the id with no record not found") == "not_found"
    typed: list[tuple[Any, Any, str]] = [
        (api.TASK_CANCEL, api.CancelRequest(task_id="nope"), "not_found"),
        (api.TASK_LOGS, api.LogsRequest(task_id="nope"), "not_found"),
        (api.TASK_SUBMIT, api.SubmitRequest(tasks=[api.TaskWire(task_id="t", fn_id=FN)]),
         "need_function")]
    for method, req, code in typed:
        with pytest.raises(RemoteError) as e:
            request(addr, client, method, req, timeout=10)
        assert e.value.code == code, (method, str(e.value))


def test_a_node_speaks_for_itself_on_the_compute_plane(mesh: LocalMesh,
                                                       node_creds: Credentials) -> None:
    """A request that names its sender (``core.access.SENDER_FIELD``) in another node's
    name is refused before it is even parsed."""
    addr = mesh.nodes[0].address
    for method, args in (("sched.load", {**LOAD, "src": "node-0"}),
                         ("task.kill", {"owner": "node-0", "task_id": "t"})):
        with pytest.raises(RemoteError) as e:
            call(addr, node_creds, method, args, timeout=10)
        assert e.value.code == "unauthorized"
