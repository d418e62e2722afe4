"""``meshscale demo`` (for now): a simulated 200-node, 3-region mesh.

Nodes join through one seed, one node crashes, a region is cut off for 30 s and comes
back; the timeline says when the mesh noticed each thing, and a table sums up who is
alive where. Everything runs in virtual time in the deterministic simulator, with the
same ``core/`` membership code the real node agent runs.
"""

from __future__ import annotations

from collections.abc import Callable

from meshscale.core.membership import State
from meshscale.sim.scenarios import SwimMesh


def run_demo(nodes: int = 200, seed: int = 1, echo: Callable[[str], None] = print) -> dict[str, float]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    mesh = SwimMesh(nodes, seed=seed, converged=False)
    sim = mesh.sim
    results: dict[str, float] = {}

    def line(t: float, text: str) -> None:
        console.print(f"[dim]t={t:7.2f}s[/dim]  {text}")

    regions = sorted({p.region for p in mesh.placements.values()})
    console.print(
        f"[bold]meshscale[/bold] simulated mesh: {nodes} nodes in {len(regions)} regions "
        f"({', '.join(regions)}), seed {seed}, virtual time\n"
    )
    line(0.0, f"{nodes} nodes start; each joins through the seed node n0")
    ok = sim.run_until_true(mesh.converged_alive, 60.0, 0.1)
    results["join_converged_s"] = sim.now if ok else float("inf")
    line(sim.now, f"every node sees all {nodes} alive: one identical view"
         if ok else "[red]view not converged within 60 s[/red]")

    sim.run_until(max(sim.now, 10.0) + 5.0)
    victim = mesh.names[nodes // 3]
    t_crash = sim.now
    line(t_crash, f"[red]{victim} crashes[/red] (silently, no goodbye)")
    first, all_s = mesh.detect(victim)
    results["detect_first_s"], results["detect_all_s"] = first, all_s
    line(t_crash + first, f"first node declares {victim} dead (+{first:.2f} s)")
    line(t_crash + all_s, f"every live node has {victim} dead (+{all_s:.2f} s)")

    sim.run_until(sim.now + 5.0)
    cut = regions[0]
    side_a = [n for n in mesh.names if mesh.placements[n].region == cut and sim.is_up(n)]
    side_b = [n for n in mesh.names if n not in side_a and sim.is_up(n)]
    t_part = sim.now
    sim.partition(side_a, side_b)
    line(t_part, f"[yellow]network partition[/yellow]: {cut} ({len(side_a)} nodes) cut off "
         f"from the other regions ({len(side_b)} nodes) for 30 s")

    def split_seen() -> bool:
        return all(mesh.node(a).state_of(side_b[0]) == State.DEAD for a in side_a[:5]) and all(
            mesh.node(b).state_of(side_a[0]) == State.DEAD for b in side_b[:5]
        )

    if sim.run_until_true(split_seen, t_part + 30.0, 0.1):
        line(sim.now, "each side has declared the other dead and carries on on its own")
    sim.run_until(t_part + 30.0)
    sim.heal()
    t_heal = sim.now
    line(t_heal, "[green]partition heals[/green]")
    live = mesh.live()
    ok = sim.run_until_true(mesh.converged_alive, t_heal + 60.0, 0.1)
    results["heal_converged_s"] = sim.now - t_heal if ok else float("inf")
    line(sim.now, f"one view again: all {len(live)} live nodes see each other alive "
         f"(+{sim.now - t_heal:.2f} s after the heal)" if ok else "[red]not healed[/red]")
    sim.run_until(sim.now + 2.0)

    table = Table(title=f"members seen by n0 at t={sim.now:.1f}s")
    for col in ("region", "alive", "suspect", "dead", "left"):
        table.add_column(col, justify="right" if col != "region" else "left")
    view = mesh.node("n0").members.values()
    for region in regions:
        counts = {s: 0 for s in State}
        for m in view:
            if m.meta.region == region:
                counts[m.state] += 1
        table.add_row(region, *(str(counts[s]) for s in State))
    console.print()
    console.print(table)
    totals = sim.stats.totals()
    console.print(
        f"{sim.events_processed:,} simulated events; {totals.datagrams_sent:,} datagrams, "
        f"{totals.dropped:,} dropped by the network model; "
        f"false deaths of live nodes: {len(mesh.false_downs(until=t_part))} before the partition"
    )
    console.print(
        "\nNext: [bold]meshscale up --nodes 5[/bold] runs a real mesh of node processes on this "
        "machine."
    )
    return results
