"""The dashboard in a real browser: Debian's headless Chromium, driven by Selenium through
the system chromedriver, against a real 3-node mesh (3 regions, emulated inter-region
latency so the map is placed by Vivaldi coordinates).

The page must load with no console errors, show 3 alive nodes and the stream operator
registered before it opened (its placement, a non-zero processed count, the nodes running
it), then show a SIGKILLed node as dead without a reload, within the membership detection
bound plus the dashboard's own refresh. Screenshots are saved under ``artifacts/`` (gitignored) for a human to look at.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from runtime_mesh import detection_bound, wait_for

from meshscale.client.tasks import TaskMesh, connect
from meshscale.runtime.launcher import LocalMesh
from meshscale.trust.bundle import load_bundle
from needs import require_tools

pytestmark = pytest.mark.timeout(480)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
REGIONS = ["eu-west", "us-east", "ap-south"]
LATENCY = {("eu-west", "us-east"): 0.04, ("eu-west", "ap-south"): 0.08, ("us-east", "ap-south"): 0.1}
# From the node's state changing to the page showing it: the snapshot is rebuilt at most
# every 0.9 s and streamed once a second; one more period of slack for a loaded machine.
DASHBOARD_REFRESH_S = 3.0

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str, poll: float = 0.2) -> T:
    # A stale element mid-render raises: try again.
    return wait_for(cond, timeout, what, poll=poll, retry=(Exception,))


def square(x: int) -> int:
    return x * x


def boom(x: int) -> int:
    raise ValueError(f"boom {x}: a task that fails on purpose")


def double(rec: Any) -> int:
    """The stream operator the page must show (module level: the mesh pickles it by name)."""
    return int(rec.value) * 2


STREAM_RECORDS = 30


class Echo:
    """The service the page must show (module level: pickled by value with its module)."""

    def echo(self, x: int) -> int:
        return x

    def hold(self, s: float) -> float:
        time.sleep(s)
        return s


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("dash"), 3, regions=REGIONS, latency=LATENCY) as m:
        yield m


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    require_tools(str(CHROMIUM), str(CHROMEDRIVER), what="the dashboard test")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `make venv` (it is in the dev extras)",
                    pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1440,1000", f"--user-data-dir={tmp_path / 'chrome'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        proc = service.process
        assert proc is None or proc.poll() is not None, "chromedriver outlived the test"


def severe(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def rows(driver: Any) -> dict[str, str]:
    """Members table as the page shows it: node name -> state."""
    return driver.execute_script(
        "const o = {}; for (const tr of document.querySelectorAll('#members-body tr[data-node]'))"
        " o[tr.dataset.node] = tr.dataset.state; return o;"
    )


def text(driver: Any, element_id: str) -> str:
    return str(driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
        element_id))


def stream_ops(driver: Any) -> dict[str, dict[str, Any]]:
    """Streams panel as the page shows it: operator name -> its row's cells."""
    return driver.execute_script(
        "const o = {}; for (const tr of document.querySelectorAll('#stream-ops-body tr[data-operator]'))"
        " o[tr.dataset.operator] = {count: Number(tr.querySelector('.processed').dataset.count),"
        " text: tr.textContent,"
        " runners: [...tr.querySelectorAll('.chip.runner')].map(c => c.dataset.node || '')};"
        " return o;"
    )


def service_rows(driver: Any) -> dict[str, dict[str, Any]]:
    """The services panel as the page shows it: service -> its row's numbers and chips."""
    return driver.execute_script(
        "const o = {}; for (const tr of document.querySelectorAll('#services-body tr[data-service]')) {"
        " const c = tr.querySelector('td.replicas'); const p = tr.querySelector('td.p50');"
        " const q = tr.querySelector('td.p99');"
        " o[tr.dataset.service] = {ready: Number(c.dataset.ready), desired: Number(c.dataset.desired),"
        " inflight: Number(tr.dataset.inflight), text: tr.textContent,"
        " p50: p.dataset.ms === undefined ? null : Number(p.dataset.ms),"
        " p99: q.dataset.ms === undefined ? null : Number(q.dataset.ms),"
        " replicas: [...tr.querySelectorAll('.chip.replica')].map(e => ({node: e.dataset.node,"
        "   state: e.dataset.state, inflight: Number(e.dataset.inflight)})),"
        " regions: [...tr.querySelectorAll('td.calls-by-region .chip')].map(e => e.dataset.region)}; }"
        " return o;"
    )


def timeline_bars(driver: Any) -> dict[str, dict[str, str]]:
    """The task stream as the page draws it: task id -> its bar's state, class, fill, lane."""
    return driver.execute_script(
        "const o = {}; for (const r of document.querySelectorAll('#timeline rect.tl-bar[data-task]'))"
        " o[r.dataset.task] = {state: r.dataset.state, cls: r.getAttribute('class'),"
        " fill: getComputedStyle(r).fill, node: r.closest('g[data-node]').dataset.node,"
        " width: r.getBBox().width, span: r.ownerSVGElement.viewBox.baseVal.width,"
        " duration_ms: Number(r.dataset.durationMs)};"
        " return o;"
    )


def resource_cells(driver: Any) -> dict[str, dict[str, float | None]]:
    """The nodes table: node -> the numbers behind its CPU, memory, disk and network cells."""
    return driver.execute_script(
        "const o = {}; for (const tr of document.querySelectorAll('#resources-body tr[data-node]')) {"
        " const v = (c) => { const td = tr.querySelector('td.' + c);"
        "   return td && td.dataset.value !== undefined ? Number(td.dataset.value) : null; };"
        " o[tr.dataset.node] = {cpu: v('cpu'), mem: v('mem'), disk: v('disk'), net: v('net')}; }"
        " return o;"
    )


def api_points(http: str, token: str) -> list[dict[str, Any]]:
    """The node's own throughput ring, straight from its API."""
    req = urllib.request.Request(f"http://{http}/api/v1/throughput",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return list(json.load(resp)["points"])


def screenshot(driver: Any, name: str) -> Path:
    """The whole page, not only the viewport."""
    ARTIFACTS.mkdir(exist_ok=True)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1440, max(1000, min(height + 140, 4000)))
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    print(f"\ndashboard screenshot: {path}")
    return path


def test_dashboard_shows_the_mesh_and_a_killed_node_as_dead(
    mesh: LocalMesh, client: TaskMesh, browser: Any
) -> None:
    http = mesh.nodes[0].http
    assert http, "LocalMesh nodes should serve HTTP"
    token = load_bundle(mesh.bundle_path).token

    # Something to show: objects with replicas, a few finished tasks.
    for k in range(4):
        client.put(os.urandom(2000 + 5000 * k))
    futs = client.map(square, range(20), progress=False)
    assert [f.result(timeout=60) for f in futs] == [k * k for k in range(20)]
    # ... and a task that fails, owned by another node than the one the page asks
    with connect(mesh.nodes[1].address, bundle=mesh.bundle_path) as other:
        failing = other.submit(boom, 7)
        with pytest.raises(ValueError, match="boom 7"):
            failing.result(timeout=60)
    # ... and a stream operator that has processed records
    client.operator("readings", double, output="doubled", name="double-readings")
    producer = client.stream("readings")
    for k in range(STREAM_RECORDS):
        producer.publish(f"sensor-{k % 3}", k)
    producer.flush(30)
    producer.close()

    browser.get(f"http://{http}/#token={token}")
    # the token leaves the address bar at once
    wait_until(lambda: "token=" not in browser.current_url, 10, "the token fragment removed")
    names = {n.name for n in mesh.nodes}
    wait_until(lambda: rows(browser) == dict.fromkeys(names, "alive"), 20,
               "3 alive rows in the members table")
    wait_until(lambda: text(browser, "count-alive") == "3", 5, "the alive count to read 3")
    assert text(browser, "count-dead") == "0"
    assert text(browser, "count-suspect") == "0"
    assert text(browser, "count-regions") == "3"
    map_states = browser.execute_script(
        "return [...document.querySelectorAll('#map-nodes g[data-node]')]"
        ".map(g => g.dataset.node + '=' + g.dataset.state).sort()")
    assert map_states == sorted(f"{n}=alive" for n in names)
    wait_until(lambda: browser.execute_script(
        "return document.querySelectorAll('#objects-body tr[data-object]').length") >= 4,
        20, "the objects table to list the 4 objects")
    # The task table: mesh-wide, the failed task highlighted with its error, named by
    # its function; the summary says a task failed.
    failed_row = wait_until(lambda: browser.execute_script(
        "const tr = document.querySelector(`#tasks-body tr[data-task='${arguments[0]}']`);"
        " return tr && {state: tr.dataset.state, cls: tr.className, text: tr.textContent};",
        failing.task_id), 20, "the failed task in the task table")
    assert failed_row["state"] == "failed" and "task-failed" in failed_row["cls"], failed_row
    assert "boom" in failed_row["text"] and "a task that fails on purpose" in failed_row["text"]
    assert "1 failed" in text(browser, "tasks-summary")
    done_rows = browser.execute_script(
        "return document.querySelectorAll('#tasks-body tr[data-state=done]').length")
    assert done_rows >= 20
    # The task stream: a bar per task in its node's lane, the failed one red.
    square_ids = {f.task_id for f in futs}
    bars = wait_until(lambda: (b := timeline_bars(browser)) and square_ids <= set(b)
                      and failing.task_id in b and b, 20, "timeline bars for every task")
    for tid in square_ids:
        assert bars[tid]["state"] == "done" and "failed" not in bars[tid]["cls"], bars[tid]
        assert bars[tid]["node"] in names and float(bars[tid]["width"]) >= 2
    # each drawn as wide as its duration (2 px at least) and no wider: the window is 30 s
    # at the least, so a second takes at most 1/30 of the drawing
    for b in bars.values():
        most = max(2.0, b["duration_ms"] / 1000 * b["span"] / 30) + 1
        assert 2 <= b["width"] <= most, b
    bad = bars[failing.task_id]
    assert bad["state"] == "failed" and "failed" in bad["cls"].split(), bad
    assert bad["fill"] == "rgb(214, 51, 58)", bad  # --dead: red
    assert {b["node"] for b in bars.values()} <= names
    # Per-node CPU, memory, disk and network, each node's own numbers (node.points).
    cells = wait_until(lambda: (c := resource_cells(browser)) and set(c) == names
                       and all(v["net"] is not None for v in c.values()) and c, 20,
                       "CPU, memory, disk and network numbers for every node")
    for name, v in cells.items():
        assert v["cpu"] is not None and 0 <= v["cpu"] <= 100, (name, v)
        assert v["mem"] is not None and v["mem"] > 10_000_000, (name, v)  # an agent's RSS
        assert v["disk"] is not None and v["disk"] > 0, (name, v)
        assert v["net"] is not None and v["net"] >= 0, (name, v)
    # The mesh-wide chart counts failures of any owner: one more fails now, on node 1.
    with connect(mesh.nodes[1].address, bundle=mesh.bundle_path) as other:
        again = other.submit(boom, 8)
        with pytest.raises(ValueError, match="boom 8"):
            again.result(timeout=60)
    wait_until(lambda: float(browser.execute_script(
        "return document.getElementById('chart-mesh').dataset.failed || 0")) >= 1
        and browser.execute_script(
            "return document.querySelector('#chart-mesh polyline.series.failed,"
            " #chart-mesh circle.dot.failed') !== null"),
        20, "the mesh-wide chart to show a failed task")
    assert "failed" in text(browser, "mesh-now")
    wait_until(lambda: browser.execute_script(
        "return document.querySelector('#events li[data-seq]') !== null"), 10, "events")
    wait_until(lambda: text(browser, "conn-status") == "live", 10, "a live stream")
    assert browser.execute_script("return document.getElementById('health').dataset.level") == "ok"
    # the streams panel: the operator, where it runs, what it has processed
    assert browser.find_element("id", "streams-card").is_displayed()
    op = wait_until(lambda: (stream_ops(browser).get("double-readings") or {}).get("count", 0) > 0
                    and stream_ops(browser)["double-readings"], 30,
                    "the streams panel to show double-readings with records processed")
    assert "readings \u2192 doubled" in op["text"], op
    assert "near-source" in op["text"], op
    assert op["runners"] and set(op["runners"]) <= names, op
    assert 0 < op["count"] <= STREAM_RECORDS, op
    assert "1 operator" in text(browser, "streams-summary")
    # the services panel: replicas per node, calls in flight, p50/p99, calls per region
    client.deploy(Echo, "echo", replicas=2)
    echo = client.service("echo", timeout=60)
    wait_until(lambda: echo.echo(1) == 1, 120, "the echo service to answer")
    for k in range(20):
        assert echo.echo(k) == k
    held = echo.hold.remote(8.0)
    row = wait_until(lambda: (r := service_rows(browser).get("echo")) and r["ready"] == 2
                     and r["p50"] is not None and r["inflight"] >= 1 and r, 30,
                     "the services panel to show echo's 2 ready replicas and a call in flight")
    assert row["desired"] == 2 and len(row["replicas"]) == 2, row
    assert {r["node"] for r in row["replicas"]} <= names, row
    assert all(r["state"] == "ready" for r in row["replicas"]), row
    assert sum(r["inflight"] for r in row["replicas"]) == row["inflight"] >= 1, row
    assert row["p99"] is not None and row["p99"] >= row["p50"] > 0, row
    assert set(row["regions"]) <= set(REGIONS) and row["regions"], row
    assert held.result(timeout=60) == 8.0
    assert "1 service, 2 replicas" in text(browser, "services-summary")
    errors = severe(browser)
    assert not errors, f"console errors on load: {errors}"
    screenshot(browser, "dashboard-alive.png")
    browser.set_window_size(1440, 1000)

    # SIGKILL node 2; no reload from here on.
    victim = mesh.nodes[2]
    assert victim.proc is not None
    marker = browser.execute_script("window.__noReload = 1; return window.__noReload")
    assert marker == 1
    killed_at = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    bound = detection_bound(3) + DASHBOARD_REFRESH_S
    wait_until(lambda: rows(browser).get(victim.name) == "dead", bound,
               f"{victim.name} shown as dead within {bound:.1f}s", poll=0.1)
    shown_after = time.monotonic() - killed_at
    print(f"\n{victim.name} shown dead {shown_after:.1f}s after SIGKILL (bound {bound:.1f}s)")
    assert browser.execute_script("return window.__noReload") == 1, "the page was reloaded"
    wait_until(lambda: text(browser, "count-dead") == "1", 5, "the dead count to read 1")
    assert text(browser, "count-alive") == "2"
    assert browser.execute_script(
        "return document.querySelector('#map-nodes g[data-node=\"node-2\"]').dataset.state"
    ) == "dead"
    assert browser.execute_script("return document.getElementById('health').dataset.level") == "bad"
    assert victim.name in text(browser, "health")
    # let re-replication show up in the feed and the object table before the picture
    wait_until(lambda: text(browser, "conn-status") == "live", 10, "a live stream")
    screenshot(browser, "dashboard.png")
    errors = severe(browser)
    assert not errors, f"console errors after the kill: {errors}"

    # The token form: forget the token, paste it back, the data flows again.
    browser.find_element("id", "forget-token").click()
    wait_until(lambda: browser.find_element("id", "token-form").is_displayed(), 5,
               "the token form")
    browser.find_element("id", "token-input").send_keys(token)
    browser.find_element("css selector", "#token-form button[type=submit]").click()
    wait_until(lambda: text(browser, "conn-status") == "live", 10, "live again after the form")
    assert not browser.find_element("id", "token-form").is_displayed()
    assert browser.execute_script("return window.__noReload") == 1
    errors = severe(browser)
    assert not errors, f"console errors after re-entering the token: {errors}"

    # The throughput history is the node's: a reload shows all of it at once, more than a
    # snapshot carries (60 points), from the node's first point on.
    wait_until(lambda: len(api_points(http, token)) > 75, 120,
               "the node to have kept more points than a snapshot carries")
    browser.refresh()
    wait_until(lambda: text(browser, "conn-status") == "live", 20, "live after the reload")
    served = api_points(http, token)
    shown = wait_until(lambda: browser.execute_script(
        "const d = document.getElementById('chart-throughput').dataset;"
        " return Number(d.loaded) > 0 && {points: Number(d.points), first: Number(d.first),"
        " loaded: Number(d.loaded)};"), 20, "the history loaded after the reload")
    assert shown["loaded"] >= len(served) - 3 and shown["points"] >= len(served) - 3, \
        (shown, len(served))
    assert shown["points"] > 75, shown
    assert abs(shown["first"] - served[0]["t"]) < 0.01, (shown, served[0])
    assert browser.execute_script(
        "return document.querySelector('#chart-throughput polyline.series.done') !== null")
    errors = severe(browser)
    assert not errors, f"console errors after the reload: {errors}"
    screenshot(browser, "dashboard-reloaded.png")
