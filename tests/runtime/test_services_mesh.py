"""Services on real node processes (issue #22): a class constructed once per replica,
near-caller calls answered in the caller's region, bad input refused with clear errors
while the service keeps serving, and a SIGKILLed replica node: an idempotent method's
callers keep succeeding, a non-idempotent call fails with ``replica-lost``, and the
replica count comes back."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_mesh import wait_for

import meshscale
from meshscale.cli import main as cli_main
from meshscale.client.mesh import MeshError
from meshscale.client.rpc import RemoteError, request
from meshscale.client.services import ServiceCallError
from meshscale.client.tasks import TaskMesh, connect
from meshscale.core.api import Empty, ErrorCode
from meshscale.core.api import services as api
from meshscale.core.api.services import CallReply, CallRequest
from meshscale.runtime.launcher import LocalMesh
from meshscale.trust.bundle import load_bundle

pytestmark = pytest.mark.timeout(300)


class Counted:
    """Writes its pid to ``log_dir/constructed`` in ``__init__``: one line per
    construction."""

    made = 0

    def __init__(self, log_dir: str) -> None:
        type(self).made += 1
        with open(os.path.join(log_dir, "constructed"), "a") as f:
            f.write(f"{os.getpid()}\n")

    def whoami(self) -> tuple[int, int]:
        return os.getpid(), type(self).made

    def add(self, a: int, b: int) -> int:
        return a + b

    def uid(self) -> int:
        return os.getuid()

    def boom(self, what: str) -> None:
        raise ValueError(f"bad {what}")

    def write(self, x: int) -> int:
        return x


class Sickly:
    """Passes its health check until ``fall_ill`` is called; a new process starts well."""

    def __init__(self) -> None:
        self.ill = False

    def whoami(self) -> int:
        return os.getpid()

    def fall_ill(self, pid: int) -> bool:
        """Only the process ``pid`` falls ill (the call may be routed to another)."""
        if pid == os.getpid():
            self.ill = True
        return self.ill

    def check(self) -> bool:
        return not self.ill


@meshscale.service(replicas=2, idempotent=["add"], placement="central")
class Declared:
    """Deployment options declared on the class (``@meshscale.service``)."""

    def add(self, a: int, b: int) -> int:
        return a + b


@meshscale.service(actor=True)
class Tally:
    """An actor declared on the class: one count per key."""

    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


class Slow:
    def work(self, s: float) -> int:
        time.sleep(s)
        return os.getpid()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("services"), 4, regions=["a", "b"]) as m:
        yield m


def raw_call(m: LocalMesh, i: int, service: str, method: str, args: bytes,
             timeout_s: float = 30.0) -> CallReply:
    return request(m.nodes[i].address, m.credentials(), api.CALL,
                   CallRequest(service=service, method=method, args=args,
                               timeout_s=timeout_s), timeout=timeout_s + 10)


def pickled(*args: object) -> bytes:
    return cloudpickle.dumps((args, {}))


def answered(m: LocalMesh, i: int, service: str, method: str = "whoami") -> CallReply | None:
    r = raw_call(m, i, service, method, pickled())
    return r if r.outcome == "done" else None


def test_near_caller_constructed_once_per_replica(mesh: LocalMesh, client: TaskMesh) -> None:
    # Replicas run as the worker user (nobody when the tests run as root): a directory
    # it can write, under the world-writable /tmp.
    tmp_path = Path(tempfile.mkdtemp(prefix="meshscale-svc-", dir="/tmp"))
    os.chmod(tmp_path, 0o777)
    nodes = client.deploy(Counted, "counted", str(tmp_path), replicas=2,
                          idempotent=["whoami", "add"])
    assert len(nodes) == 2
    regions = {mesh.nodes[int(n.split("-")[1])].region for n in nodes}
    assert regions == {"a", "b"}, nodes
    # Callers in region a (node-0) and region b (node-1).
    # Placement follows the calls (gossiped per region): with both regions calling, each
    # gets one of the two replicas, and then every call stays in its caller's region.
    def both_in_region() -> bool:
        ok = True
        for i in (0, 1):
            r = answered(mesh, i, "counted")
            ok = ok and r is not None and r.region == mesh.nodes[i].region
        return ok

    wait_for(both_in_region, 120, "calls from both regions answered in their region")
    pids: set[int] = set()
    for _ in range(40):
        for i in (0, 1):
            r = raw_call(mesh, i, "counted", "whoami", pickled())
            assert r.outcome == "done", r
            assert r.region == mesh.nodes[i].region, (i, r.node, r.region)
            pid, made = cloudpickle.loads(r.value)
            assert made == 1  # __init__ ran once in this process, whatever the calls
            pids.add(pid)
    assert len(pids) >= 2  # (a replica moving between regions adds a process)
    # One construction per replica process: every pid that answered wrote one line (a
    # replica moved away before both regions called may have written one more).
    lines = [int(x) for x in (tmp_path / "constructed").read_text().split()]
    assert len(lines) == len(set(lines)) and pids <= set(lines)
    h = client.service("counted")
    if os.geteuid() == 0:
        # A node run as root runs replicas as its worker user, as it runs task workers.
        assert h.uid() != 0
    assert h.call("add", 2, 3) == 5
    assert h.add(4, 5) == 9
    futs = [h.add.remote(i, i) for i in range(20)]
    assert [f.result(timeout=60) for f in futs] == [2 * i for i in range(20)]

    async def from_a_loop() -> list[Any]:
        return list(await asyncio.gather(*(h.add.call_async(i, 1) for i in range(10)),
                                         h.call_async("add", 7, 8)))
    assert asyncio.run(from_a_loop()) == [i + 1 for i in range(10)] + [15]
    # The listing is each node's latest polled status: a replica the first calls from
    # one region moved there stops once its region's replica is ready elsewhere, and the
    # listing shows it gone a status poll later (on a loaded machine, seconds later).
    def listed() -> list[str]:
        info = {s.spec.name: s for s in client.services()}["counted"]
        return sorted(r.node for r in info.replicas)

    wait_for(lambda: listed() == sorted(nodes), 60,
             f"the listing settles on the deployed replicas {sorted(nodes)}")
    info = {s.spec.name: s for s in client.services()}["counted"]
    assert sorted(r.node for r in info.replicas) == sorted(nodes)
    assert sorted(info.placed) == sorted(nodes)
    assert all(r.constructed == 1 and r.ready for r in info.replicas)
    assert set(info.calls_by_region) >= {"a"}


def test_options_declared_on_the_class_deploy_it(client: TaskMesh) -> None:
    """``@meshscale.service(...)`` options are ``deploy``'s when the call gives none; a
    keyword given to ``deploy`` wins; ``actor=True`` deploys one instance per key."""
    try:
        nodes = client.deploy(Declared, "declared")
        assert len(nodes) == 2
        spec = {s.spec.name: s for s in client.services()}["declared"].spec
        assert (spec.replicas, spec.idempotent, spec.placement) == (2, ["add"], "central")

        def declared_answers() -> bool:
            try:
                return bool(client.service("declared").add(2, 3) == 5)
            except ServiceCallError as e:
                assert e.kind == "no-replica", e  # not ready yet; anything else fails
                return False
        wait_for(declared_answers, 90, "the declared service answers")
        assert len(client.deploy(Declared, "declared-one", replicas=1)) == 1
        spec = {s.spec.name: s for s in client.services()}["declared-one"].spec
        assert (spec.replicas, spec.idempotent) == (1, ["add"])
        client.deploy(Tally, "tally")
        assert {s.spec.name: s for s in client.services()}["tally"].spec.actor
        a, b = client.actor("tally", "door-1"), client.actor("tally", "door-2")
        assert [a.incr(), a.incr(), b.incr(), a.incr()] == [1, 2, 1, 3]
        with pytest.raises(ValueError, match="actor"):
            client.deploy(Tally, "tally-bad", replicas=2)
    finally:
        for name in ("declared", "declared-one", "tally"):
            with contextlib.suppress(MeshError):
                client.remove_service(name)


def test_call_longer_than_the_mesh_timeout(mesh: LocalMesh) -> None:
    """A client connected with timeout=3 s still gets the answer of a call given
    timeout=8 that takes 4 s (it goes on a connection of its own); one given less than
    it takes ends with kind timeout, named."""
    c = connect(mesh.nodes[0].address, bundle=mesh.bundle_path, timeout=3.0)
    try:
        c.deploy(Slow, "slow-long", replicas=1)
        h = c.service("slow-long")
        wait_for(lambda: h.call("work", 0.0, timeout=60) > 0, 90, "slow-long answers",
                 retry=(ServiceCallError,))
        assert h.call("work", 4.0, timeout=8) > 0
        with pytest.raises(ServiceCallError) as e:
            h.call("work", 3.0, timeout=1)
        assert e.value.kind == "replica-lost" or e.value.kind == "timeout", e.value
        assert "did not answer within 1" in str(e.value)
        c.remove_service("slow-long")
    finally:
        c.close()


def test_bad_input_clear_errors_service_keeps_serving(mesh: LocalMesh,
                                                      client: TaskMesh) -> None:
    h = client.service("counted")
    wait_for(lambda: answered(mesh, 0, "counted"), 90, "the service answers")
    with pytest.raises(MeshError, match="unknown service 'nope'") as e1:
        client.service("nope").call("whoami")
    assert e1.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(MeshError, match="has no method 'missing'") as e2:
        h.call("missing")
    assert e2.value.code == ErrorCode.NOT_FOUND
    r = raw_call(mesh, 0, "counted", "add", b"not a pickle")
    assert r.outcome == "unpicklable" and "cannot decode the arguments" in r.message
    with pytest.raises(ServiceCallError) as e3:
        h.call("boom", "input")
    assert e3.value.kind == "raised" and "ValueError: bad input" in e3.value.message
    assert "Remote traceback" in str(e3.value) and "def boom" not in e3.value.message
    assert "in boom" in e3.value.traceback
    with pytest.raises(ServiceCallError, match="MAX_CALL_ARGS_BYTES") as e4:
        h.call("add", b"x" * (api.MAX_CALL_ARGS_BYTES + 1), 1)
    assert e4.value.kind == "too-large"
    with pytest.raises(RemoteError, match="args") as e5:
        raw_call(mesh, 0, "counted", "add", b"x" * (api.MAX_CALL_ARGS_BYTES + 1))
    assert e5.value.code == ErrorCode.INVALID
    with pytest.raises(MeshError, match="rule residency") as e6:
        client.deploy(Counted, "on-mars", "/tmp", residency=["mars"])
    assert e6.value.code == ErrorCode.REFUSED
    with pytest.raises(MeshError, match="min_replicas 3 is greater than max_replicas 2"):
        client.deploy(Counted, "bad-auto", "/tmp", autoscale=(3, 2, 1.0))
    assert "on-mars" not in {s.spec.name for s in client.services()}
    # The service kept serving through all of it.
    assert h.call("add", 1, 1) == 2


class Broken:
    def __init__(self) -> None:
        raise RuntimeError("model file missing")

    def predict(self) -> int:
        return 1


def test_init_that_raises_is_visible_and_others_serve(mesh: LocalMesh,
                                                     client: TaskMesh) -> None:
    """A class whose ``__init__`` raises never gets a ready replica: its calls fail with
    no-replica naming the start failure, ``services()`` shows it per node, and the
    retries back off (doubling from 1 s); the other services keep answering."""
    client.deploy(Broken, "broken", replicas=1)

    def failing() -> dict[str, str] | None:
        svc = {x.spec.name: x for x in client.services()}.get("broken")
        return dict(svc.errors) if svc is not None and svc.errors else None

    errors = wait_for(failing, 60, "the start failure to be reported")
    assert any("RuntimeError: model file missing" in e for e in errors.values()), errors
    with pytest.raises(ServiceCallError) as e:
        client.service("broken").call("predict", timeout=5)
    assert e.value.kind == "no-replica"
    assert "fail to start" in e.value.message and "model file missing" in e.value.message
    assert client.service("counted").add(2, 2) == 4
    client.remove_service("broken")
    assert "broken" not in {x.spec.name for x in client.services()}
    with pytest.raises(MeshError, match="unknown service 'broken'"):
        client.remove_service("broken")


def post(addr: str, path: str, body: bytes, token: str | None) -> tuple[int, Any]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_http_call_json_in_json_out(mesh: LocalMesh, client: TaskMesh) -> None:
    """Every node serves POST /api/v1/services/NAME/METHOD (JSON in and out, the admin
    token); answers and errors match the OpenAPI document's schemas."""
    bundle = load_bundle(mesh.bundle_path)
    token = bundle.token
    host, port = str(mesh.nodes[1].http).rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/api/v1/openapi.json")
    doc = json.loads(conn.getresponse().read())
    conn.close()

    def valid(schema: str, body: Any) -> None:
        root = {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]}
        jsonschema.Draft202012Validator(root).validate(body)

    wait_for(lambda: answered(mesh, 1, "counted"), 90, "the service answers")
    for node in mesh.nodes:
        addr = str(node.http)
        status, body = post(addr, "/api/v1/services/counted/add", b"[2, 3]", token)
        assert status == 200 and body["result"] == 5, body
        valid("ServiceCallResponse", body)
    addr = str(mesh.nodes[1].http)
    status, body = post(addr, "/api/v1/services/counted/add",
                        b'{"args": [1], "kwargs": {"b": 41}}', token)
    assert (status, body["result"]) == (200, 42)
    status, body = post(addr, "/api/v1/services/counted/boom", b'["x"]', token)
    assert status == 500 and body["kind"] == "raised" and "ValueError: bad x" in body["error"]
    valid("ServiceCallError", body)
    status, body = post(addr, "/api/v1/services/counted/add", b"{not json", token)
    assert status == 400 and body["kind"] == "unpicklable", body
    status, body = post(addr, "/api/v1/services/counted/nope", b"[]", token)
    assert status == 404 and "has no method 'nope'" in body["error"]
    status, body = post(addr, "/api/v1/services/nosuch/add", b"[]", token)
    assert status == 404 and "unknown service 'nosuch'" in body["error"]
    status, body = post(addr, "/api/v1/services/counted/add",
                        b"[" + b"1," * (api.MAX_CALL_ARGS_BYTES // 2) + b"1]", token)
    assert status == 413 and "MAX_CALL_ARGS_BYTES" in body["error"]
    assert post(addr, "/api/v1/services/counted/add", b"[1, 2]", None)[0] == 401
    status, body = post(addr, "/api/v1/services/counted/add", b"[1, 2]",
                        bundle.read_only_token)
    assert status == 403 and "svc.call needs the admin token" in body["error"]
    # Still serving.
    assert post(addr, "/api/v1/services/counted/add", b"[1, 2]", token)[1]["result"] == 3


def get(addr: str, path: str, token: str) -> bytes:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (path, resp.status, body[:200])
        return body
    finally:
        conn.close()


def test_metrics_per_service_and_method_and_dashboard_view(mesh: LocalMesh) -> None:
    """The node's Prometheus metrics count the calls that entered at it by service,
    method and outcome, with a latency histogram, calls in flight and its replicas by
    state; /api/v1/services (the dashboard's panel) lists the replicas per node with
    in-flight and p50/p99, matching its schema."""
    token = load_bundle(mesh.bundle_path).token
    addr = str(mesh.nodes[1].http)
    wait_for(lambda: answered(mesh, 1, "counted"), 90, "the service answers")

    def scrape(i: int = 1) -> dict[str, Any]:
        text = get(str(mesh.nodes[i].http), "/metrics", token).decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def value(fams: dict[str, Any], fam: str, suffix: str, **labels: str) -> float:
        return sum(x.value for x in fams[fam].samples if x.name == fam + suffix and
                   all(x.labels.get(k) == v for k, v in labels.items()))

    before = scrape()
    n = 7
    for i in range(n):
        assert post(addr, "/api/v1/services/counted/add", f"[{i}, 1]".encode(),
                    token)[0] == 200
    assert post(addr, "/api/v1/services/counted/boom", b'["y"]', token)[0] == 500
    assert post(addr, "/api/v1/services/counted/nope", b"[]", token)[0] == 404
    after = scrape()
    calls, lat = "meshscale_service_calls", "meshscale_service_call_latency_seconds"
    for o in ("done", "raised"):
        d = value(after, calls, "_total", service="counted", method="add" if o == "done"
                  else "boom", outcome=o) - value(before, calls, "_total", service="counted",
                                                  method="add" if o == "done" else "boom",
                                                  outcome=o)
        assert d == (n if o == "done" else 1), (o, d)
    assert value(after, lat, "_count", service="counted", method="add") - \
        value(before, lat, "_count", service="counted", method="add") == n
    assert value(after, lat, "_sum", service="counted", method="add") > \
        value(before, lat, "_sum", service="counted", method="add")
    # An unknown method is refused before it is counted: no series for it.
    assert not any(x.labels.get("method") == "nope" for x in after[calls].samples)
    assert value(after, "meshscale_service_inflight_calls", "", service="counted") == 0
    # The replicas gauge: each node reports its own replica of counted (ready: 1), and the
    # dashboard's view lists it as ready. Replicas follow their callers (every call here
    # comes from region b), so one may move between a listing and a scrape: the three
    # views are compared on one snapshot, taken again until they agree.
    doc = json.loads(get(addr, "/api/v1/openapi.json", token))
    schema = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/ServicesResponse", "components": doc["components"]})

    def agreed() -> tuple[set[int], dict[str, Any]] | None:
        holders = {int(r.node.split("-")[1]) for s in request(
            mesh.nodes[1].address, mesh.credentials(), api.LIST, Empty(),
            timeout=30).services
            if s.spec.name == "counted" for r in s.replicas if r.ready and r.healthy}
        if not holders:
            return None
        for i in holders:
            fams = scrape(i)
            if value(fams, "meshscale_service_replicas", "", service="counted",
                     state="ready") != 1 or value(
                    fams, "meshscale_service_replicas", "", service="counted",
                    state="unhealthy") != 0:
                return None
        view = json.loads(get(addr, "/api/v1/services", token))
        schema.validate(view)
        row = next(s for s in view["services"] if s["name"] == "counted")
        if not {r["node"] for r in row["replicas"] if r["state"] == "ready"} >= \
                {f"node-{i}" for i in holders}:
            return None
        return holders, view

    _, view = wait_for(agreed, 60, "the listing, each holder's replicas gauge and "
                       "the dashboard's view to agree on counted's ready replicas")
    row = next(s for s in view["services"] if s["name"] == "counted")
    assert any(r["calls"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in row["replicas"])
    assert sum(row["calls_by_region"].values()) > 0
    snap = json.loads(get(addr, "/api/v1/snapshot", token))
    assert [s["name"] for s in snap["services"]["services"]] == \
        [s["name"] for s in view["services"]]


def test_services_cli(mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    """``meshscale services [--json]``: replicas, nodes, in-flight, p50/p99, calls per
    source region; an unknown node address exits 3."""
    wait_for(lambda: answered(mesh, 1, "counted"), 90, "the service answers")
    args = ["services", "--node", mesh.nodes[1].address, "--bundle", str(mesh.bundle_path)]
    assert cli_main([*args, "--json"]) == 0
    rows = {r["spec"]["name"]: r for r in json.loads(capsys.readouterr().out)}
    c = rows["counted"]
    assert c["desired"] == 2 and len(c["replicas"]) >= 2
    # A replica that has served calls shows their p50 and p99; one started since (a
    # replacement) has none yet, and its row leaves the zero count out.
    served = [r for r in c["replicas"] if r["ready"] and r.get("calls", 0) > 0]
    assert served, c["replicas"]
    assert all(r["p50_ms"] is not None and r["p99_ms"] >= r["p50_ms"] for r in served)
    assert sum(c["calls_by_region"].values()) > 0
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "P99_MS" in out and "calls per source region" in out and "counted" in out
    bad = ["services", "--node", "127.0.0.1:1", "--bundle", str(mesh.bundle_path),
           "--timeout", "2"]
    assert cli_main(bad) == 3


def test_autoscale_up_under_burst_and_back_down(mesh: LocalMesh, client: TaskMesh) -> None:
    """autoscale=(1, 3, target_inflight=1): a burst of 6 concurrent callers keeps the
    one replica's queue above target for longer than scale_up_dwell_s (2 s): replicas are
    added (up to 3); after the burst, below half the target for scale_down_dwell_s (10 s)
    each, they are removed one at a time back to 1."""
    client.deploy(Slow, "slow", autoscale=(1, 3, 1.0), idempotent=["work"])

    def ready() -> int:
        svc = {x.spec.name: x for x in client.services()}.get("slow")
        return sum(1 for r in svc.replicas if r.ready) if svc else 0

    wait_for(lambda: ready() == 1, 90, "one ready replica")
    stop = time.monotonic() + 1e9
    pids: set[int] = set()
    errors: list[str] = []

    def caller() -> None:
        # One client per caller, held for the burst (as a real client would). Few of
        # them: every node here shares 127.0.0.1, and a node takes at most
        # max_connections_per_ip (64) connections from one address, peers included.
        c = connect(mesh.nodes[0].address, bundle=mesh.bundle_path)
        h = c.service("slow")
        try:
            while time.monotonic() < stop:
                try:
                    pids.add(h.work(0.2))
                except Exception as e:  # pragma: no cover - reported below
                    errors.append(repr(e))
                    return
        finally:
            c.close()

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(6)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        up = wait_for(lambda: ready() >= 2 and time.monotonic() - t0, 90,
                      "a replica added under the burst")
        wait_for(lambda: len(pids) >= 2, 60, "calls answered by an added replica")
    finally:
        stop = 0.0
        for t in threads:
            t.join(60)
    t1 = time.monotonic()
    down = wait_for(lambda: ready() == 1 and time.monotonic() - t1, 120,
                    "back to one replica after the burst")
    print(f"autoscale: second replica ready {up:.1f}s into the burst, "
          f"{len(pids)} replica processes answered, back to 1 replica {down:.1f}s after it")
    assert not errors, errors[:3]
    desired = {x.spec.name: x for x in client.services()}["slow"].desired
    assert desired == 1


def test_health_method_failing_replica_routed_around_and_replaced(
        mesh: LocalMesh, client: TaskMesh) -> None:
    """A service naming a health method: once a replica's check starts failing, its node
    marks it unhealthy (in its status), routes no more calls to it and starts a new
    process, while every call is answered. A service without one has no health state."""
    with pytest.raises(ValueError, match="health names 'nope', not a public method"):
        client.deploy(Sickly, "sickly", health="nope")
    client.deploy(Sickly, "sickly", replicas=2, health="check", idempotent=["whoami"])

    def ready_nodes() -> list[str] | None:
        svc = {s.spec.name: s for s in client.services()}.get("sickly")
        ready = [r.node for r in svc.replicas if r.ready] if svc else []
        return ready if len(ready) == 2 else None

    nodes = wait_for(ready_nodes, 90, "two ready replicas of sickly")
    si = int(nodes[0].split("-")[1])
    # The sick node's own calls: its status of its own replica is always fresh.
    first = wait_for(lambda: (r := answered(mesh, si, "sickly")) and r.node == nodes[0] and r,
                     60, "a call answered by the replica on its own node")
    sick_pid = cloudpickle.loads(first.value)
    sick = wait_for(lambda: (r := raw_call(mesh, si, "sickly", "fall_ill",
                                           pickled(sick_pid))).outcome == "done"
                    and cloudpickle.loads(r.value) and r, 60, "that replica to fall ill")
    assert sick.node == nodes[0], sick
    t0 = time.monotonic()
    unhealthy_at: float | None = None
    sick_answers: list[float] = []
    outcomes: Counter[str] = Counter()
    replaced: float | None = None
    while time.monotonic() - t0 < 120 and replaced is None:
        r = raw_call(mesh, si, "sickly", "whoami", pickled())
        outcomes[r.outcome] += 1
        if r.outcome == "done":
            pid = cloudpickle.loads(r.value)
            if pid == sick_pid:
                sick_answers.append(time.monotonic())
            elif r.node == sick.node:
                replaced = time.monotonic() - t0
        listed = request(mesh.nodes[si].address, mesh.credentials(), api.LIST, Empty(),
                         timeout=30).services
        mine = [x for s in listed if s.spec.name == "sickly" for x in s.replicas
                if x.node == sick.node]
        if unhealthy_at is None and mine and not mine[0].healthy:
            unhealthy_at = time.monotonic()
            assert mine[0].health_failures >= 3, mine[0]
        time.sleep(0.05)
    print(f"health: unhealthy seen {None if unhealthy_at is None else unhealthy_at - t0}s "
          f"after falling ill, replaced after {replaced}s, outcomes {dict(outcomes)}")
    assert replaced is not None, "the unhealthy replica was never replaced on its node"
    assert unhealthy_at is not None, "the replica was never listed as unhealthy"
    assert all(t < unhealthy_at for t in sick_answers), "calls reached the unhealthy replica"
    assert set(outcomes) == {"done"}, outcomes
    # The new process passes its checks and stays (as the client's node sees it too).
    def new_replica() -> bool:
        svc = {s.spec.name: s for s in client.services()}["sickly"]
        new = [x for x in svc.replicas if x.node == sick.node]
        return bool(new) and new[0].ready and new[0].healthy

    wait_for(new_replica, 30, "the new replica ready and healthy in the client's view")
    info = {s.spec.name: s for s in client.services()}
    assert info["sickly"].spec.health == "check"
    if "counted" in info:  # deployed by the first test of this module, without health
        assert info["counted"].spec.health is None
        assert all(x.healthy and x.health_failures == 0 for x in info["counted"].replicas)
    client.remove_service("sickly")


def test_replica_node_killed_idempotent_callers_recover(mesh: LocalMesh,
                                                       client: TaskMesh) -> None:
    """Kill the node of region a's replica; the caller enters at the other node of
    region a. A non-idempotent call routed to the dead replica fails with replica-lost;
    idempotent calls keep succeeding (on region b's replica), and within a generous
    bound region a has a replica again and its calls stay in region a."""
    client.deploy(Counted, "fo", "/tmp", replicas=2, idempotent=["whoami"])
    info: dict[str, object] = {}

    lister = [client]

    def placed() -> list[str] | None:
        svc = {s.spec.name: s for s in lister[0].services()}.get("fo")
        ready = [r.node for r in svc.replicas if r.ready] if svc else []
        return ready if len(ready) == 2 else None

    wait_for(placed, 90, "two ready replicas")
    a_nodes = [i for i, n in enumerate(mesh.nodes) if n.region == "a"]
    b_node = next(i for i, n in enumerate(mesh.nodes) if n.region == "b")
    # Calls from both regions, so each region holds one replica (placement follows calls).
    seen: dict[int, str] = {}

    def settled() -> bool:
        for i in (a_nodes[0], b_node):
            r = answered(mesh, i, "fo")
            if r is None or r.region != mesh.nodes[i].region:
                return False
            seen[i] = r.node
        return True

    def one_per_region() -> str | None:
        settled()
        svc = {x.spec.name: x for x in lister[0].services()}.get("fo")
        reps = svc.replicas if svc else []
        in_a = [r.node for r in reps if r.region == "a"]
        if len(reps) == 2 and all(r.ready for r in reps) and len(in_a) == 1:
            return in_a[0]
        return None

    wait_for(settled, 120, "calls from both regions answered in their region")
    victim = wait_for(one_per_region, 60, "exactly one replica in each region")
    vi = int(victim.split("-")[1])
    entry = next(i for i in a_nodes if i != vi)
    lister[0] = connect(mesh.nodes[entry].address, bundle=mesh.bundle_path)
    wait_for(lambda: (r := answered(mesh, entry, "fo")) and r.node == victim, 60,
             "the caller's calls to reach region a's replica")
    proc = mesh.nodes[vi].proc
    assert proc is not None
    proc.kill()
    t_kill = time.monotonic()
    lost = raw_call(mesh, entry, "fo", "write", pickled(1))
    assert lost.outcome == "replica-lost", lost
    assert "not declared idempotent" in lost.message
    first_ok: float | None = None
    back: float | None = None
    failures = 0
    while time.monotonic() - t_kill < 120:
        r = raw_call(mesh, entry, "fo", "whoami", pickled())
        if r.outcome != "done":
            failures += 1
        elif first_ok is None:
            first_ok = time.monotonic() - t_kill
        if r.outcome == "done" and r.region == "a":
            back = time.monotonic() - t_kill
            break
        time.sleep(0.05)
    info.update(first_ok=first_ok, back=back, failures=failures)
    print(f"failover: first idempotent success {first_ok}s after the kill, "
          f"region a served again after {back}s, failed idempotent calls {failures}")
    assert failures == 0, info
    assert first_ok is not None and first_ok < 10, info
    assert back is not None, info
    t_restored = wait_for(lambda: (r := placed()) is not None and victim not in r
                          and time.monotonic() - t_kill, 60,
                          "two ready replicas again, none on the dead node")
    print(f"failover: replica count restored {t_restored:.2f}s after the kill")
    lister[0].close()


def test_status_is_node_only(mesh: LocalMesh) -> None:
    """svc.status is node-to-node: a client certificate is refused (node-1 is in region
    b, alive after the kill above)."""
    with pytest.raises(RemoteError) as e:
        request(mesh.nodes[1].address, mesh.credentials(), api.STATUS, Empty(), timeout=10)
    assert e.value.code == ErrorCode.UNAUTHORIZED
