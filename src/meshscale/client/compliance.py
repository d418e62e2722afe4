"""The residency report from a client (``meshscale compliance report``): gather what the
mesh holds and what its trails say, then hand it to ``core.compliance.build_report`` (the
decisions: what is outside a rule, the overhead), and render the result as text or as one
self-contained HTML file (tables and a bar chart per class of copies and bytes by region,
matplotlib SVG inlined as ``meshscale plan``'s report does).

Gathered, all through methods a client may call: the members and their regions
(``members``), every object with its holders (``obj.list``, page by page), the class
policies (``policy.list``), the refusals in the period from every node's trail
(``audit.query``), and every node's chain check (``audit.verify`` against the heads the
others remember; ``client/audit.py``). The trail needs an admin bundle: with a read-only
one the report says it could not read refusals or chains."""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import time
from typing import Any

from meshscale.client.audit import live_members, query_mesh, verify_mesh
from meshscale.core.api import Empty
from meshscale.core.api import objects as obj_api
from meshscale.core.api import policy as papi
from meshscale.core.api.audit import MAX_QUERY_LIMIT, AuditQuery
from meshscale.core.audit import Kind
from meshscale.core.compliance import (
    UNCLASSIFIED,
    ChainResult,
    ClassReport,
    ComplianceReport,
    RefusalRow,
    build_report,
)
from meshscale.core.erasure import HeldCopy
from meshscale.core.policy import ClassPolicy, PolicyError, make_policy
from meshscale.transport.rpc import ClientCredentials, request_async

__all__ = ["gather_report", "gather_report_blocking", "render_html", "render_text"]


async def gather_report(addr: str, creds: ClientCredentials, *,
                        data_class: str | None = None, since_wall_s: float = 0.0,
                        timeout: float = 60.0) -> ComplianceReport:
    """Gather through the node at ``addr`` and build the report (``RpcError`` if that node
    cannot be asked)."""
    members = await live_members(addr, creds, timeout=min(timeout, 10.0))
    regions = {m.name: m.region for m in members}
    copies: list[HeldCopy] = []
    after = ""
    while True:
        page = await request_async(addr, creds, obj_api.LIST,
                                   obj_api.ListRequest(after=after, limit=obj_api.MAX_LIST_PAGE),
                                   timeout=timeout)
        for o in page.objects:
            res = o.residency
            for node in o.holders:
                copies.append(HeldCopy(
                    o.id, node, regions.get(node, ""), o.size,
                    None if res is None else res.data_class,
                    None if res is None or res.regions is None else tuple(res.regions)))
        if page.next is None:
            break
        after = page.next
    infos = await request_async(addr, creds, papi.LIST, Empty(), timeout=timeout)
    policies: dict[str, ClassPolicy] = {}
    for p in infos:
        try:
            policies[p.name] = make_policy(p.name, p.regions, replicas=p.replicas,
                                           ttl_s=p.ttl_s,
                                           cross_region_reads=p.cross_region_reads,
                                           stream_regions=p.stream_regions)
        except PolicyError:
            continue
    notes: list[str] = []
    everyone = sorted((m.name, m.address) for m in members)
    rows = await query_mesh([a for _, a in everyone], creds,
                            AuditQuery(kind=Kind.REFUSAL, data_class=data_class,
                                       since=since_wall_s, limit=MAX_QUERY_LIMIT),
                            timeout=timeout)
    if rows.more:
        notes.append(f"some node has more than {MAX_QUERY_LIMIT} refusals in the period: "
                     "only its first are listed")
    for a, err in sorted(rows.refused.items()):
        notes.append(f"refusals of {a} not read: {err[:200]}")
    refusals = [RefusalRow(r.node, r.wall_s, r.subject, r.data_class, r.from_region,
                           r.to_region, r.who, r.detail) for r in rows.rows]
    chains: list[ChainResult] = []
    for v in await verify_mesh(everyone, everyone, creds, timeout=timeout):
        r = v.reply
        if r is None:
            chains.append(ChainResult(v.node, None, detail=(v.error or "")[:300]))
            continue
        detail = "" if r.broke is None else (
            f"broken at {r.broke.segment} entry {r.broke.index}: {r.broke.kind}: "
            f"{r.broke.detail}")
        if r.heads_bad:
            detail = (detail + "; " if detail else "") + f"{len(r.heads_bad)} bad head(s)"
        chains.append(ChainResult(r.node, r.ok, r.entries, detail[:500]))
    unreachable = [ch.node for ch in chains if ch.ok is None]
    return build_report(copies, policies, refusals, chains, nodes=regions,
                        unreachable=unreachable, data_class=data_class,
                        since_wall_s=since_wall_s, generated_wall_s=time.time(), notes=notes)


def gather_report_blocking(addr: str, creds: ClientCredentials, **kw: Any) -> ComplianceReport:
    return asyncio.run(gather_report(addr, creds, **kw))


def _when(t: float) -> str:
    if t <= 0:
        return "the start of the trails"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _label(name: str) -> str:
    return name if name != UNCLASSIFIED else "(no class)"


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024:
            return f"{n} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def _verdict(r: ComplianceReport) -> str:
    bad = []
    if r.out_of_rule:
        bad.append(f"{r.out_of_rule} copies OUTSIDE their rule")
    if not r.chains_ok:
        bad.append("audit chains NOT all verified")
    return "; ".join(bad) if bad else "every copy inside its rule; every audit chain verifies"


def render_text(r: ComplianceReport) -> str:
    out = [f"residency report, {_when(r.generated_wall_s)}; refusals since "
           f"{_when(r.since_wall_s)}; {len(r.nodes)} nodes",
           f"verdict: {_verdict(r)}", ""]
    for c in r.classes:
        rule = ("no policy" if c.policy_regions is None
                else f"regions {','.join(c.policy_regions)}, replicas {c.policy_replicas}")
        out.append(f"class {_label(c.data_class)} ({rule}): {c.objects} objects, "
                   f"{_size(c.logical_bytes)} logical; {c.copies} copies, "
                   f"{_size(c.stored_bytes)} stored; duplication {c.duplication:.2f}x, "
                   f"storage overhead {c.overhead:.2f}x; {c.refusals} refusals")
        for u in c.regions:
            out.append(f"  {u.region or '(no region)'}: {u.copies} copies of {u.objects} "
                       f"objects, {_size(u.bytes)}")
        for o in c.out_of_rule:
            out.append(f"  OUTSIDE RULE: {o.oid} on {o.node} in {o.region or '(no region)'}"
                       f" ({o.rule}: allowed {','.join(o.allowed)})")
    out.append("")
    out.append(f"refusals in the period: {len(r.refusals)}")
    for f in r.refusals[:50]:
        out.append(f"  {_when(f.wall_s)} {f.node}: {f.subject[:24]} class "
                   f"{f.data_class or '-'} from {f.from_region or '-'}: {f.detail[:160]}")
    if len(r.refusals) > 50:
        out.append(f"  ... and {len(r.refusals) - 50} more (--json lists every one)")
    out.append("audit chains:")
    for ch in r.chains:
        state = "not asked" if ch.ok is None else "ok" if ch.ok else "BROKEN"
        out.append(f"  {ch.node}: {state}" + (f" ({ch.entries} entries)" if ch.ok else "")
                   + (f": {ch.detail}" if ch.detail else ""))
    for n in r.notes:
        out.append(f"note: {n}")
    return "\n".join(out)


def _chart(c: ClassReport) -> str:
    """A bar chart of one class's copies and bytes per region, as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshscale.plan.report import figure_svg

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "meshscale-compliance",
                         "svg.fonttype": "none"})
    names = [u.region or "(none)" for u in c.regions]
    allowed = set(c.policy_regions or names)
    colours = ["#4C72B0" if n in allowed else "#C44E52" for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.6))
    a.bar(names, [u.copies for u in c.regions], color=colours)
    a.set_title("copies per region")
    top = max(u.bytes for u in c.regions)
    unit, scale = next(((n, f) for n, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
                        if top >= f), ("bytes", 1.0))
    b.bar(names, [u.bytes / scale for u in c.regions], color=colours)
    b.set_title(f"{unit} stored per region")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return figure_svg(fig)


def render_html(r: ComplianceReport) -> str:
    """The report as one HTML file: no script, no link, nothing fetched."""
    e = html.escape
    sections = []
    for c in r.classes:
        rule = ("no policy" if c.policy_regions is None
                else f"allowed regions {', '.join(c.policy_regions)}; "
                     f"{c.policy_replicas} replicas")
        regions = "".join(
            f"<tr><td>{e(u.region or '(none)')}</td><td>{u.objects}</td><td>{u.copies}</td>"
            f"<td>{u.bytes:,}</td></tr>" for u in c.regions)
        outside = "".join(
            f"<tr class='bad'><td><code>{e(o.oid)}</code></td><td>{e(o.node)}</td>"
            f"<td>{e(o.region)}</td><td>{e(o.rule)}</td><td>{e(', '.join(o.allowed))}</td>"
            "</tr>" for o in c.out_of_rule)
        outside_html = (
            "<p class='ok'>No copy outside its rule.</p>" if not c.out_of_rule else
            f"<p class='bad'>{len(c.out_of_rule)} copies outside their rule:</p><table><tr>"
            "<th>object</th><th>node</th><th>region</th><th>rule broken</th>"
            f"<th>allowed</th></tr>{outside}</table>")
        chart = _chart(c) if c.regions else "<p>No copies.</p>"
        sections.append(
            f"<section><h2>Class {e(_label(c.data_class))} <small>{e(rule)}</small></h2>"
            f"<table><tr><th>objects</th><th>logical bytes</th><th>copies</th>"
            f"<th>bytes stored</th><th>duplication</th><th>storage overhead</th>"
            f"<th>refusals</th></tr><tr><td>{c.objects}</td><td>{c.logical_bytes:,}</td>"
            f"<td>{c.copies}</td><td>{c.stored_bytes:,}</td><td>{c.duplication:.2f}x</td>"
            f"<td>{c.overhead:.2f}x</td><td>{c.refusals}</td></tr></table>"
            f"<table><tr><th>region</th><th>objects</th><th>copies</th><th>bytes</th></tr>"
            f"{regions}</table><figure>{chart}</figure>{outside_html}</section>")
    refusals = "".join(
        f"<tr><td>{e(_when(f.wall_s))}</td><td>{e(f.node)}</td><td><code>{e(f.subject)}"
        f"</code></td><td>{e(f.data_class or '-')}</td><td>{e(f.from_region or '-')}</td>"
        f"<td>{e(f.to_region or '-')}</td><td>{e(f.who or '-')}</td><td>{e(f.detail)}</td>"
        "</tr>" for f in r.refusals)
    chains = "".join(
        f"<tr class='{'ok' if ch.ok else 'bad'}'><td>{e(ch.node)}</td>"
        f"<td>{'not asked' if ch.ok is None else 'verified' if ch.ok else 'BROKEN'}</td>"
        f"<td>{ch.entries}</td><td>{e(ch.detail)}</td></tr>" for ch in r.chains)
    nodes = "".join(f"<tr><td>{e(n)}</td><td>{e(g)}</td></tr>" for n, g in r.nodes.items())
    notes = "".join(f"<li>{e(n)}</li>" for n in r.notes)
    verdict_cls = "ok" if not r.out_of_rule and r.chains_ok else "bad"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>meshscale residency report {e(_when(r.generated_wall_s))}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 7px; text-align: left; }}
.ok {{ color: #2a7a2a; }} .bad, tr.bad td {{ color: #b00020; font-weight: 600; }}
figure {{ margin: .5em 0; }} figure svg {{ max-width: 100%; height: auto; }}
small {{ color: #666; font-weight: normal; }}
</style></head><body>
<h1>Residency report <small>{e(_when(r.generated_wall_s))}</small></h1>
<p class="{verdict_cls}">{e(_verdict(r))}.</p>
<p>Every copy held by the {len(r.nodes)} live nodes listed below, by data class and region;
refusals recorded in the nodes' audit trails since {e(_when(r.since_wall_s))}; and the
verification of each node's hash-chained audit trail against the signed chain heads the
other nodes remember. Duplication is copies per object; storage overhead is bytes stored
over logical bytes (each object once).</p>
{''.join(sections)}
<h2>Refusals in the period ({len(r.refusals)})</h2>
<table><tr><th>time</th><th>node</th><th>object / key</th><th>class</th><th>from</th>
<th>to</th><th>who</th><th>rule</th></tr>{refusals}</table>
<h2>Audit chains</h2>
<table><tr><th>node</th><th>chain</th><th>entries</th><th>detail</th></tr>{chains}</table>
<h2>Nodes</h2>
<table><tr><th>node</th><th>region</th></tr>{nodes}</table>
<ul>{notes}</ul>
</body></html>
"""
