"""What ``meshscale plan`` prints, and its one-file HTML report with matplotlib plots.

Plots are rendered to inline SVG (no script, no network): latency distributions side by
side, bytes across regions, energy over the day, and a map of the sites with where each
workload runs. Every figure carries its method note and says whether a real mesh has
checked it (``run.CHECKED``) or it is "model only".
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

from meshscale.plan.run import CHECKED, METHOD, PLACEMENTS, PlanResult

__all__ = ["render_html", "render_text", "save_png"]

_COLOURS = {"central": "#4C72B0", "mesh": "#DD8452", "hybrid": "#55A868"}


def _ms(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:,.1f}"


def _tag(key: str) -> str:
    return "checked" if key in CHECKED else "model only"


def render_text(r: PlanResult) -> str:
    cur = r.currency
    lines = [f"plan: {r.name} (seed {r.seed})", ""]
    for w in r.workloads:
        lines.append(f"{w.name} ({w.kind}, {w.target}): {w.verdict.upper()}")
        for reason in w.reasons:
            lines.append(f"  - {reason}")
        lines.append(f"  {'placement':<9} {'p50 ms':>9} {'p99 ms':>9} {'batch h':>8} "
                     f"{'GB/day x-region':>16} {'servers':>8} {'kWh/day':>8} "
                     f"{cur + '/day':>9} {'avail':>8}")
        for p in PLACEMENTS:
            f = w.figures[p]
            if not f.feasible:
                lines.append(f"  {p:<9} not allowed: {f.refused}")
                continue
            same = f" (= {w.hybrid_same_as})" if p == "hybrid" and w.hybrid_same_as else ""
            batch_h = "-" if not math.isfinite(f.makespan_h) else f"{f.makespan_h:.2f}"
            lines.append(
                f"  {p:<9} {_ms(f.p50_ms):>9} {_ms(f.p99_ms):>9} {batch_h:>8} "
                f"{f.cross_region_bytes_per_day / 1e9:>16,.2f} {sum(f.servers.values()):>8.2f} "
                f"{f.energy_kwh_per_day:>8.1f} {f.cost_per_day:>9.2f} "
                f"{f.availability * 100:>7.3f}%{same}")
        lines.append("")
    lines.append(f"verdict for the plan: {r.verdict.upper()}")
    lines.append("")
    lines.append("what the mesh costs the organisation that central does not:")
    lines.extend(f"  - {c}" for c in r.org_costs)
    lines.append("")
    lines.append("figures checked against a real local mesh (bench/plan_calibration.py): "
                 + ", ".join(sorted(CHECKED)) + "; every other figure is model only.")
    return "\n".join(lines)


def _figures(r: PlanResult) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "meshscale-plan",
                         "svg.fonttype": "none"})
    figs: dict[str, Any] = {}
    flows = [w for w in r.workloads if w.kind != "batch"]
    if flows:
        fig, axes = plt.subplots(1, len(flows), figsize=(3.6 * len(flows) + 0.6, 3.4),
                                 squeeze=False)
        for ax, w in zip(axes[0], flows, strict=True):
            data, labels = [], []
            for p in PLACEMENTS:
                f = w.figures[p]
                if f.feasible and f.sample_ms:
                    data.append(f.sample_ms)
                    labels.append(p)
            if data:
                parts = ax.violinplot(data, showmedians=True, showextrema=False)
                for body, lab in zip(parts["bodies"], labels, strict=True):
                    body.set_facecolor(_COLOURS[lab])
                    body.set_alpha(0.7)
                ax.set_xticks(range(1, len(labels) + 1), labels)
            slo = float(w.target.split("<=")[1].split()[0])
            ax.axhline(slo, color="#C44E52", linestyle="--", linewidth=1)
            ax.text(0.55, slo, f" SLO {slo:g} ms", color="#C44E52", va="bottom", fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"{w.name}\nverdict: {w.verdict}")
            ax.set_ylabel("latency (ms, log)")
        fig.tight_layout()
        figs["latency"] = fig
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    names = [w.name for w in r.workloads]
    width = 0.26
    for i, p in enumerate(PLACEMENTS):
        vals = [w.figures[p].cross_region_bytes_per_day / 1e9 for w in r.workloads]
        ax.bar([x + (i - 1) * width for x in range(len(names))], vals, width, label=p,
               color=_COLOURS[p])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("GB per day across regions")
    ax.legend()
    fig.tight_layout()
    figs["bytes"] = fig
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for p in PLACEMENTS:
        kw = r.totals[p]["kw_by_hour"]
        ax.step(range(25), [*kw, kw[-1]], where="post", label=f"{p} "
                f"({r.totals[p]['energy_kwh_per_day']:,.0f} kWh/day)", color=_COLOURS[p])
    ax.set_xlim(0, 24)
    ax.set_xticks(range(0, 25, 3))
    ax.set_xlabel("hour of the day")
    ax.set_ylabel("kW")
    ax.legend()
    fig.tight_layout()
    figs["energy"] = fig
    figs["map"] = _map(r, plt)
    return figs


def _map(r: PlanResult, plt: Any) -> Any:
    """Sites on a circle around the central region, radius by RTT; each workload's
    recommended placement drawn as the share of its work in each region."""
    regions = r.regions
    central = max(regions, key=lambda g: (g["rtt_to_central_ms"] == 0, g["nodes"]))
    others = [g for g in regions if g is not central]
    far = max((g["rtt_to_central_ms"] for g in others), default=1.0) or 1.0
    pos: dict[str, tuple[float, float]] = {central["name"]: (0.0, 0.0)}
    for i, g in enumerate(others):
        a = 0.7 + 2 * math.pi * i / max(1, len(others))
        rad = 0.35 + 0.65 * g["rtt_to_central_ms"] / far
        pos[g["name"]] = (rad * math.cos(a), rad * math.sin(a))
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for ln in r.links:
        (x1, y1), (x2, y2) = pos[ln["a"]], pos[ln["b"]]
        ax.plot([x1, x2], [y1, y2], color="#BBBBBB", zorder=1)
        ax.text((x1 + x2) / 2, (y1 + y2) / 2, f"{ln['rtt_ms']:g} ms", fontsize=7,
                color="#777777")
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for g in regions:
        x, y = pos[g["name"]]
        ax.scatter([x], [y], s=300 + 60 * g["nodes"], color="#EEEEEE", edgecolor="#555555",
                   zorder=2)
        ax.text(x, y - 0.16, f"{g['name']}\n{g['nodes']} nodes", ha="center", va="top",
                fontsize=8)
    for i, w in enumerate(r.workloads):
        f = w.figures[w.verdict] if w.verdict in w.figures else w.figures["mesh"]
        for reg, share in f.runs_in.items():
            if share <= 0:
                continue
            x, y = pos[reg]
            dx = 0.07 * math.cos(2 * math.pi * i / max(1, len(r.workloads)))
            dy = 0.07 * math.sin(2 * math.pi * i / max(1, len(r.workloads)))
            ax.scatter([x + dx], [y + dy], s=40 + 160 * share, marker=markers[i % 8],
                       color=_COLOURS.get(w.verdict, "#999999"), edgecolor="black",
                       zorder=3, label=f"{w.name} ({w.verdict})" if reg == next(
                           iter(f.runs_in)) else None)
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.25)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("sites (distance from the centre ~ RTT to the central region)\n"
                 "and where each workload runs under its verdict")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    return fig


def figure_svg(fig: Any) -> str:
    """A matplotlib figure as inline SVG markup (no date, so the same figure gives the same
    bytes), the figure closed: the plan report's and the compliance report's charts."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def save_png(r: PlanResult, path: Path, which: str = "latency") -> None:
    """Write one of the report's plots as a PNG (for the README)."""
    import matplotlib.pyplot as plt

    figs = _figures(r)
    figs[which].savefig(path, format="png", dpi=110, metadata={"Software": None})
    for f in figs.values():
        plt.close(f)


def render_html(r: PlanResult) -> str:
    figs = _figures(r)
    e = html.escape
    cur = e(r.currency)
    rows = []
    for w in r.workloads:
        cells = []
        for p in PLACEMENTS:
            f = w.figures[p]
            if not f.feasible:
                cells.append(f"<tr><td>{p}</td><td colspan=9>not allowed: {e(f.refused)}"
                             f"</td></tr>")
                continue
            same = f" (same as {w.hybrid_same_as})" if p == "hybrid" and w.hybrid_same_as \
                else ""
            mk = "-" if not math.isfinite(f.makespan_h) else f"{f.makespan_h:.2f}"
            cls = ' class="pick"' if p == w.verdict else ""
            cells.append(
                f"<tr{cls}><td>{p}{e(same)}</td><td>{_ms(f.p50_ms)}</td><td>{_ms(f.p99_ms)}"
                f"</td><td>{mk}</td><td>{'yes' if f.slo_met else 'no'}</td>"
                f"<td>{f.cross_region_bytes_per_day / 1e9:,.2f}</td>"
                f"<td>{f.egress_cost_per_day:,.2f}</td>"
                f"<td>{sum(f.servers.values()):,.2f}</td><td>{f.energy_kwh_per_day:,.1f}</td>"
                f"<td>{f.cost_per_day:,.2f}</td><td>{f.availability * 100:.3f}%</td>"
                f"<td>{f.outage_affected:,.0f} {e(f.outage_region)}</td></tr>")
        reasons = "".join(f"<li>{e(x)}</li>" for x in w.reasons)
        rows.append(
            f"<section><h3>{e(w.name)} <small>{e(w.kind)}, {e(w.target)}</small> "
            f"<span class='v v-{e(w.verdict)}'>{e(w.verdict)}</span></h3><ul>{reasons}</ul>"
            f"<table><tr><th>placement</th><th>p50 ms</th><th>p99 ms</th><th>batch h</th>"
            f"<th>target met</th><th>GB/day across regions</th><th>egress {cur}/day</th>"
            f"<th>servers at peak</th><th>kWh/day</th><th>{cur}/day</th><th>availability</th>"
            f"<th>work hit by a region outage</th></tr>{''.join(cells)}</table></section>")
    method = "".join(
        f"<tr><td>{e(k)}</td><td>{e(v)}</td><td class='{'ok' if k in CHECKED else 'mo'}'>"
        f"{_tag(k)}</td></tr>" for k, v in METHOD.items())
    org = "".join(f"<li>{e(c)}</li>" for c in r.org_costs)
    notes = "".join(f"<li>{e(n)}</li>" for n in r.notes)
    plots = []
    captions = {
        "latency": ("Latency per workload, each placement side by side",
                    "latency_p99_ms"),
        "bytes": ("Bytes across regions per day", "cross_region_bytes_per_day"),
        "energy": ("Power over the day, all workloads", "energy_kwh_per_day"),
        "map": ("Sites and where each workload runs", "servers"),
    }
    for key in ("map", "latency", "bytes", "energy"):
        if key in figs:
            title, mkey = captions[key]
            plots.append(f"<figure><figcaption>{e(title)} <span class='tag'>"
                         f"{_tag(mkey)}</span></figcaption>{figure_svg(figs[key])}</figure>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>meshscale plan: {e(r.name)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 7px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.pick td {{ background: #f3f9f1; font-weight: 600; }}
.v {{ padding: 2px 9px; border-radius: 10px; color: #fff; font-size: 13px; }}
.v-central {{ background: {_COLOURS['central']}; }} .v-mesh {{ background: {_COLOURS['mesh']}; }}
.v-hybrid {{ background: {_COLOURS['hybrid']}; }} .v-none {{ background: #888; }}
.ok {{ color: #2a7a2a; }} .mo {{ color: #a05a00; }}
.tag {{ font-size: 11px; color: #a05a00; border: 1px solid #e0c090; border-radius: 6px;
        padding: 0 5px; }}
figure {{ margin: 1em 0; }} figure svg {{ max-width: 100%; height: auto; }}
small {{ color: #666; font-weight: normal; }}
</style></head><body>
<h1>Should you use a mesh? <small>{e(r.name)}</small></h1>
<p>Verdict for the plan: <span class="v v-{e(r.verdict)}">{e(r.verdict)}</span>
(seed {r.seed}; every figure from one deterministic simulated run of meshscale's own
placement code; see the method notes at the end).</p>
{''.join(plots[:1])}
<h2>Workloads</h2>
{''.join(rows)}
<h2>Plots</h2>
{''.join(plots[1:])}
<h2>What the mesh costs the organisation that central does not</h2>
<ul>{org}</ul>
<h2>Method</h2>
<table><tr><th>figure</th><th>how it is computed</th><th>checked?</th></tr>{method}</table>
<p>"checked": compared with a real local mesh by <code>bench/plan_calibration.py</code>;
"model only": not compared with a real mesh.</p>
<ul>{notes}</ul>
</body></html>
"""
