"""``meshscale top``: the mesh live in the terminal, from any node's HTTP API.

Polls ``/api/v1/snapshot`` (the same body the dashboard streams) and draws the members
(state coloured, RTT and load as that node sees them), task throughput and latency, and the
recent events with Rich. Speaks only HTTP, like any other client of the API.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"alive": "bold green", "suspect": "bold yellow", "dead": "bold red",
               "left": "dim"}
SPARK = "▁▂▃▄▅▆▇█"


class TopError(Exception):
    """A one-line problem: bad input (``usage``) or a node that does not answer."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def targets_from_mesh(mesh_json: Path) -> tuple[list[str], Path | None]:
    """HTTP addresses and the bundle recorded in a ``mesh.json``."""
    try:
        data = json.loads(Path(mesh_json).read_text())
        nodes = data["nodes"]
        addrs = [str(n["http"]) for n in nodes if n.get("http")]
        bundle = Path(data["bundle"]) if data.get("bundle") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TopError(f"--mesh {mesh_json}: not a readable mesh.json ({e})", usage=True) \
            from None
    if not addrs:
        raise TopError(f"--mesh {mesh_json}: no node has an HTTP address", usage=True)
    return addrs, bundle


def fetch_snapshot(addr: str, token: str, timeout: float,
                   ca_pem: bytes | None = None) -> dict[str, Any]:
    """``addr`` is ``HOST:PORT`` (plain HTTP) or ``https://HOST:PORT`` (checked against
    the cluster CA, ``ca_pem``)."""
    url = addr if "://" in addr else f"http://{addr}"
    ctx = None
    if url.startswith("https://"):
        import ssl

        ctx = ssl.create_default_context(
            cadata=None if ca_pem is None else ca_pem.decode("ascii"))
    req = urllib.request.Request(f"{url}/api/v1/snapshot",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read()).get("error", "")
        except (ValueError, AttributeError):
            why = ""
        raise TopError(f"{addr}: HTTP {e.code} {why}".rstrip()) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TopError(f"{addr}: {reason}") from None


def _sparkline(values: list[float]) -> str:
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def _ms(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}ms"


def render(snap: dict[str, Any]) -> RenderableType:
    node = snap["node"]
    members = snap["members"]
    counts = {s: sum(1 for m in members if m["state"] == s) for s in STATE_STYLE}
    head = Text.assemble(
        ("meshscale top", "bold"), "  viewed from ", (node["name"], "bold cyan"),
        f" ({node['region'] or '-'}, {node['http'] or node['address']})  ",
        *[(f"{n} {s}  ", STATE_STYLE[s]) for s, n in counts.items() if n or s == "alive"],
    )
    table = Table(expand=True, pad_edge=False, show_edge=False)
    for col, justify in (("NAME", "left"), ("REGION", "left"), ("ZONE", "left"),
                         ("STATE", "left"), ("RTT", "right"), ("RUNNING", "right"),
                         ("QUEUED", "right"), ("SLOTS", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    order = {"alive": 0, "suspect": 1, "dead": 2, "left": 3}
    for m in sorted(members, key=lambda m: (order.get(m["state"], 9), m["region"], m["name"])):
        load = m.get("load") or {}
        table.add_row(
            m["name"], m["region"] or "-", m["zone"] or "-",
            Text(m["state"] + (f" ({m['power']})" if m.get("power") not in (None, "", "active")
                               else ""), style=STATE_STYLE.get(m["state"], "")),
            _ms(m.get("rtt_ms")),
            str(load.get("running", "-")), str(load.get("queued", "-")),
            f"{load['slots']:g}" if "slots" in load else "-",
        )
    points = (snap.get("throughput") or [])[-60:]
    last = points[-1] if points else {}
    recent = [float(p["tasks_done_per_s"]) for p in points]
    busy: dict[str, Any] = next(
        (p for p in reversed(points) if p.get("latency_p50_ms") is not None), {})
    tput = Text.assemble(
        ("tasks ", "bold"),
        f"{float(last.get('tasks_done_per_s', 0.0)):.1f}/s now, "
        f"{sum(recent) / max(1, len(recent)):.1f}/s over {len(recent)} s  "
        f"last latency p50 {_ms(busy.get('latency_p50_ms'))} "
        f"p99 {_ms(busy.get('latency_p99_ms'))}  ",
        (_sparkline(recent), "cyan"),
    )
    objs = snap.get("objects") or []
    under = sum(1 for o in objs if o.get("under_replicated"))
    data = Text.assemble(("objects ", "bold"), f"{len(objs)} listed",
                         (f", {under} under-replicated" if under else "",
                          "bold yellow" if under else ""))
    events = Table(expand=True, show_header=False, show_edge=False, pad_edge=False)
    events.add_column("time", width=8)
    events.add_column("kind", width=18)
    events.add_column("node", width=14)
    events.add_column("detail")
    for e in (snap.get("events") or [])[-10:]:
        kind = str(e["kind"])
        style = "red" if kind in ("member_down",) else "yellow" \
            if kind in ("member_suspect", "under_replicated", "task_retry") else ""
        events.add_row(time.strftime("%H:%M:%S", time.localtime(float(e["time"]))),
                       Text(kind, style=style), str(e["node"]), str(e["detail"]))
    return Group(
        head,
        Panel(table, title="members", title_align="left"),
        tput,
        data,
        Panel(events, title="recent events", title_align="left"),
    )


def run_top(
    addrs: list[str],
    token: str,
    *,
    once: bool,
    interval: float,
    timeout: float,
    console: Console | None = None,
    stop: Callable[[], bool] | None = None,
    ca_pem: bytes | None = None,
) -> None:
    """Draw one frame (``once``) or redraw every ``interval`` s until Ctrl-C. Asks the
    first address that answers; a node that stops answering is replaced by the next."""
    console = console or Console()

    def snapshot() -> dict[str, Any]:
        errors = []
        for addr in list(addrs):
            try:
                snap = fetch_snapshot(addr, token, timeout, ca_pem)
            except TopError as e:
                errors.append(str(e))
                continue
            if addrs[0] != addr:  # stick with the node that answered
                addrs.remove(addr)
                addrs.insert(0, addr)
            return snap
        raise TopError("; ".join(errors) or "no node to ask")

    if once:
        console.print(render(snapshot()))
        return
    with Live(render(snapshot()), console=console, refresh_per_second=4,
              screen=False) as live:
        try:
            while stop is None or not stop():
                time.sleep(interval)
                try:
                    live.update(render(snapshot()))
                except TopError as e:
                    live.update(Text(f"meshscale top: {e} (retrying)", style="bold red"))
        except KeyboardInterrupt:
            return
