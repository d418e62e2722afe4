"""The ``meshscale`` command.

Errors the user can fix (a bad flag, a missing or broken bundle, a path that cannot be
written) are printed as ONE line, ``meshscale: error: <message>``, on stderr, with exit
code 2; never a traceback. Commands signal them by raising ``CliError``, ``BundleError`` or
``KeyringError``; ``main()`` turns those and typer/click usage errors into that line.

To add a command: define a function on ``app`` (or on a sub-app such as ``keys_app``, or a
new ``typer.Typer()`` registered with ``app.add_typer``), take the bundle with the
``BundleOption`` annotation (and, for a command that talks to the mesh, ``NodeOption`` and
``MeshOption``, resolved together by ``_target``), and raise ``CliError`` for anything the
user got wrong. Import heavy modules inside the command so ``meshscale --help`` stays fast.

Exit codes: 0 done, 1 a failure (nothing found, the mesh refused), 2 bad input (a flag,
a bundle, a file), 78 a removed node's ``node start``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import sys
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

import meshscale
from meshscale.meshfile import (
    BUNDLE_ENV,
    DEFAULT_NODE,
    MESH_ENV,
    MeshFile,
    MeshFileError,
    Target,
    read_mesh_file,
    resolve_target,
)
from meshscale.runtime.agent_main import LATENCY_HELP
from meshscale.trust.bundle import (
    Bundle,
    BundleError,
    BundleKind,
    init_bundle,
    load_bundle,
    rotate_keys,
)
from meshscale.trust.keyring import KeyringError

if TYPE_CHECKING:
    from meshscale.core.api import Method, Request

Req = TypeVar("Req", bound="Request")
Rep = TypeVar("Rep")

try:  # typer >= 0.22 vendors click
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - older typer with click installed
    import click.exceptions as _click_exc  # type: ignore[no-redef,import-not-found,unused-ignore]

PROG = "meshscale"
USAGE_EXIT = 2
EXIT_FAILED = 1
"""Not found, or the mesh could not do it (busy, unavailable, out of room)."""
EXIT_UNREACHABLE = 3
"""No node answered at the addresses given."""
_BAD_INPUT_CODES = frozenset({"", "invalid", "refused", "unauthorized", "unknown_method"})


def _exit_code(code: str, unreachable: bool = False) -> int:
    """The documented exit code of a failed request: 3 when no node answered, 2 for a
    request the mesh refused as given (bad input, a rule, the caller's role), 1 for not
    found and for failures of the mesh."""
    if unreachable:
        return EXIT_UNREACHABLE
    return USAGE_EXIT if code in _BAD_INPUT_CODES else EXIT_FAILED


class CliError(Exception):
    """A one-line error for the user; ``exit_code`` 2 for bad input, 1 for failures."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _typer(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )


app = _typer("meshscale: a decentralized compute mesh.")
bundle_app = _typer("Make node and client bundles from the admin bundle (where ca.key is).")
keys_app = _typer("Manage the gossip encryption keyring.")
app.add_typer(bundle_app, name="bundle")
app.add_typer(keys_app, name="keys")

BundleOption = Annotated[
    Path,
    typer.Option(
        "--bundle",
        envvar=BUNDLE_ENV,
        show_envvar=True,
        help="Admin bundle directory (made by `meshscale init`).",
    ),
]
ClientBundleOption = Annotated[
    Path | None,
    typer.Option(
        "--bundle",
        envvar=BUNDLE_ENV,
        show_envvar=True,
        help="Client bundle (`meshscale bundle client`) or the admin bundle; default: the "
        "one --mesh names.",
    ),
]
MeshOption = Annotated[
    Path | None,
    typer.Option(
        "--mesh",
        envvar=MESH_ENV,
        show_envvar=True,
        help="mesh.json of `meshscale up`: its nodes and client bundle, in place of "
        "--node and --bundle.",
    ),
]
NodeOption = Annotated[
    str | None,
    typer.Option("--node", help=f"HOST:PORT of the node to go through (default: each node "
                 f"of --mesh in turn, else {DEFAULT_NODE})."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {meshscale.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """meshscale: a decentralized compute mesh."""


# -- bundle and trust -----------------------------------------------------------------


@app.command("init")
def init_cmd(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Directory to create.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle.")] = False,
) -> None:
    """Create a cluster's admin bundle: CA, gossip keyring, admin token and an admin
    client certificate. It stays on the operator's machine."""
    bundle = init_bundle(directory, force=force)
    typer.echo(f"created admin bundle {bundle.path} (cluster {bundle.cluster_id})")
    typer.echo(f"keep it on this machine ({bundle.path / 'ca.key'} can make any identity); "
               "give each node a node bundle (`meshscale bundle node`) and each user a "
               "client bundle (`meshscale bundle client`)")


def _admin(path: Path | None) -> Bundle:
    if path is None:
        raise CliError(f"missing --bundle ADMIN_DIR (or {BUNDLE_ENV})")
    return load_bundle(path).require(BundleKind.ADMIN, use="this command")


DaysOption = Annotated[int, typer.Option("--days", min=1, max=3650,
                                         help="Certificate lifetime in days.")]
OutOption = Annotated[Path, typer.Option("--out", help="Directory to write the bundle in.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite a bundle in --out.")]


@bundle_app.command("node")
def bundle_node_cmd(
    bundle: BundleOption,
    name: Annotated[str, typer.Option("--name", help="Node name (its certificate's CN).")],
    out: OutOption,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="IP or DNS name the node is reached at, for its "
                     "certificate; repeat. Default: 127.0.0.1, localhost."),
    ] = None,
    days: DaysOption = 825,
    force: ForceOption = False,
    renew: Annotated[bool, typer.Option("--renew", help="Re-issue the certificate of the "
                                        "node bundle in --out (and bring its keyring up to "
                                        "date); restart the node to use it.")] = False,
) -> None:
    """Write a node bundle: CA certificate, the node's certificate and key, the gossip
    keyring and what the node checks tokens with. It holds no CA key."""
    from meshscale.trust.bundle import write_node_bundle

    made = write_node_bundle(_admin(bundle), name, out, hosts=host or (), days=days,
                             force=force, renew=renew)
    info = made.cert
    typer.echo(f"{'renewed' if renew else 'wrote'} node bundle {made.path} for {made.name} "
               f"(certificate valid until {info.not_after:%Y-%m-%d})")
    typer.echo("copy it to the node's machine; `meshscale node start --bundle DIR ...`")


@bundle_app.command("client")
def bundle_client_cmd(
    bundle: BundleOption,
    name: Annotated[str, typer.Option("--name", help="Client name (its certificate's CN).")],
    out: OutOption,
    read_only: Annotated[bool, typer.Option("--read-only", help="May only list and read.")
                         ] = False,
    days: DaysOption = 825,
    force: ForceOption = False,
) -> None:
    """Write a client bundle: CA certificate, a client certificate and key carrying its
    role (admin, or read-only), and that role's token for the HTTP API."""
    from meshscale.trust.bundle import write_client_bundle

    made = write_client_bundle(_admin(bundle), name, out, read_only=read_only, days=days,
                               force=force)
    typer.echo(f"wrote {made.role} client bundle {made.path} for {made.name} (certificate "
               f"valid until {made.cert.not_after:%Y-%m-%d})")


@keys_app.command("rotate")
def keys_rotate_cmd(bundle: BundleOption) -> None:
    """Install a new primary gossip key; the old one stays accepted."""
    keyring = rotate_keys(bundle)
    typer.echo(f"new primary key {keyring.primary_id}")
    typer.echo("copy keyring.json to every node; older keys still open messages")


@keys_app.command("list")
def keys_list_cmd(bundle: BundleOption) -> None:
    """List gossip key ids; the primary seals, all of them open."""
    keyring = load_bundle(bundle).keyring
    for i, kid in enumerate(keyring.key_ids()):
        typer.echo(f"{kid}  {'primary' if i == 0 else 'accepted'}")


@app.command("token")
def token_cmd(
    bundle: BundleOption,
    read_only: Annotated[bool, typer.Option(
        "--read-only", help="Print the viewers' token instead: the HTTP API, /metrics "
        "and the dashboard accept it for reading.")] = False,
) -> None:
    """Print the HTTP API token of an admin or client bundle (or, with --read-only, the
    viewers' token)."""
    loaded = load_bundle(bundle).require(BundleKind.ADMIN, BundleKind.CLIENT, use="`token`")
    typer.echo(loaded.read_only_token if read_only else loaded.token)


# -- running ---------------------------------------------------------------------------


@app.command("demo")
def demo_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="A short run (~15 s of data), "
                                        "for tests.")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the mesh running after the "
                                       "summary, until Ctrl-C.")] = False,
    duration: Annotated[float | None, typer.Option("--duration", help="Seconds of sensor "
                                                   "data to generate.")] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="Readings per second from "
                                               "each edge site.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary as "
                                                  "JSON here.")] = None,
    simulated: Annotated[bool, typer.Option("--simulated", help="Run the simulated "
                                            "200-node membership demo instead.")] = False,
) -> None:
    """Real-time anomaly detection near the data vs in the cloud, on a live local mesh:
    6 nodes, 3 emulated regions, a node killed part-way (about a minute)."""
    if simulated:
        from meshscale.sim.demo import run_demo

        rv: Any = run_demo()
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:
            raise typer.Exit(rv)
        return
    for name, value in (("--duration", duration), ("--rate", rate)):
        if value is not None and not (0 < value <= 3600):
            raise CliError(f"{name} must be in (0, 3600], not {value}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise CliError("the demo needs scikit-learn: pip install 'meshscale[demo]'",
                       exit_code=1) from None
    from meshscale.demo import DemoConfig, run_live_demo

    cfg = DemoConfig(keep=keep)
    if quick:
        cfg.duration_s, cfg.rate_per_site = 15.0, 60.0
    if duration is not None:
        cfg.duration_s = duration
    if rate is not None:
        cfg.rate_per_site = rate
    summary = run_live_demo(cfg, json_out)
    lost = sum(p["records_missing"] for p in summary["pipelines"].values())
    if lost or summary.get("processes_left"):
        raise typer.Exit(1)


@app.command("plan")
def plan_cmd(
    plan_file: Annotated[Path | None, typer.Argument(help="The plan (TOML); "
                                                     "`meshscale plan --example` prints one.",
                                                     show_default=False)] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every figure as "
                                                  "JSON here.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write the report (one "
                                                  "self-contained HTML file) here.")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**31 - 1,
                                      help="Simulator seed (same seed, same figures).")] = 1,
    example: Annotated[bool, typer.Option("--example", help="Print a commented plan file "
                                          "and exit.")] = False,
) -> None:
    """Weigh a mesh against one central region on your own sites and workloads: runs
    them in the simulator under central, mesh and hybrid placements and gives a verdict
    per workload with the numbers that decide it. docs/plan.md describes the file."""
    import json

    from meshscale.plan.model import EXAMPLE, PlanError, load_plan

    if example:
        typer.echo(EXAMPLE, nl=False)
        return
    if plan_file is None:
        raise CliError("give a plan file (`meshscale plan --example` prints one)")
    try:
        plan = load_plan(plan_file)
    except PlanError as e:
        raise CliError(str(e)) from None
    if html_out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--html needs matplotlib: pip install 'meshscale[plan]'",
                           exit_code=1) from None
    from meshscale.plan.report import render_html, render_text
    from meshscale.plan.run import run_plan

    result = run_plan(plan, seed=seed)
    typer.echo(render_text(result))
    try:
        if json_out is not None:
            json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        if html_out is not None:
            html_out.write_text(render_html(result), encoding="utf-8")
            typer.echo(f"report: {html_out}")
    except OSError as e:
        raise CliError(f"cannot write the output: {e}") from None


# -- node agent, members, local mesh -----------------------------------------------------

node_app = _typer("Run a node agent.")
app.add_typer(node_app, name="node")

def _parse_labels(labels: list[str] | None) -> dict[str, str]:
    from meshscale.runtime.agent_main import StartError, parse_labels

    try:
        return parse_labels(labels)
    except StartError as e:
        raise CliError(str(e)) from None


def _parse_addr(value: str, flag: str) -> str:
    from meshscale.runtime.agent_main import StartError, parse_addr

    try:
        return parse_addr(value, flag)
    except StartError as e:
        raise CliError(str(e)) from None


def node_start_cmd(config: Path | None = None, **flags: Any) -> None:
    """Run a node in the foreground (JSON log lines on stderr); SIGTERM/SIGINT leave
    gracefully. Every setting can also be given in a --config file; flags override it."""
    from meshscale.runtime.agent_main import BY_KEY, StartError, merge, parse_labels, start

    try:
        given = {key: parse_labels(value, BY_KEY[key].option)
                 if BY_KEY[key].kind == "table" and value else value
                 for key, value in flags.items()}
        start(merge(given, config))
    except StartError as e:
        raise CliError(str(e), e.exit_code) from None


def _node_start_signature() -> inspect.Signature:
    """``node start``'s options, one per entry of agent_main's ``OPTIONS`` (its flag,
    type and help), plus ``--config``: typer reads them from this signature."""
    from meshscale.runtime.agent_main import OPTIONS

    kinds: dict[str, Any] = {"str": str, "path": Path, "int": int, "float": float,
                             "list": list[str], "table": list[str]}
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("config", keyword, default=None, annotation=Annotated[
        Path | None, typer.Option("--config", metavar="FILE", help="TOML file with any of "
                                  "the settings below (`meshscale node config-example` "
                                  "prints one); flags override it.")])]
    for o in OPTIONS:
        if o.kind == "bool":
            params.append(inspect.Parameter(o.key, keyword, default=False, annotation=Annotated[
                bool, typer.Option(o.option, help=o.help)]))
            continue
        more = " Repeat." if o.kind in ("list", "table") else ""
        if o.default not in (None, "", [], {}):  # None here: the flag was not given
            more += f"  [default: {o.default}]"
        params.append(inspect.Parameter(o.key, keyword, default=None, annotation=Annotated[
            kinds[o.kind] | None, typer.Option(o.option, help=o.help + more)]))
    return inspect.Signature(params)


node_start_cmd.__signature__ = _node_start_signature()  # type: ignore[attr-defined]
node_app.command("start")(node_start_cmd)


@node_app.command("config-example")
def node_config_example_cmd() -> None:
    """Print a commented node.toml with every key and its default."""
    from meshscale.runtime.agent_main import config_example

    typer.echo(config_example())


# -- reaching the mesh: --node / --mesh / --bundle ---------------------------------------


def _mesh_file(mesh: Path | None) -> MeshFile | None:
    if mesh is None:
        return None
    try:
        return read_mesh_file(mesh)
    except MeshFileError as e:
        raise CliError(str(e)) from None


def _target(node: str | None, mesh: Path | None, bundle: Path | None) -> Target:
    """``--node`` over ``--mesh``'s nodes over the default address; ``--bundle`` (or
    MESHSCALE_BUNDLE) over ``--mesh``'s client bundle (``meshfile.resolve_target``; typer
    read the environment already)."""
    addr = None if node is None else _parse_addr(node, "--node")
    try:
        return resolve_target(addr, mesh, bundle, environ={}, missing_bundle=(
            f"missing --bundle DIR (or {BUNDLE_ENV}, or --mesh mesh.json)"))
    except MeshFileError as e:
        raise CliError(str(e)) from None


def _client_creds(bundle: Path) -> Any:
    from meshscale.transport.credentials import Credentials
    from meshscale.transport.tls import TLSConfigError

    try:
        return Credentials.from_bundle(load_bundle(bundle))
    except TLSConfigError as e:
        raise CliError(str(e)) from None


def _request(target: Target, method: Method[Req, Rep], req: Req, timeout: float = 5.0,
             creds: Any = None) -> Rep:
    """One typed call (``core/api``) through the first node of ``target`` that answers."""
    from meshscale.client.rpc import RemoteError, RpcError, request

    creds = creds if creds is not None else _client_creds(target.bundle)
    last: RpcError | None = None
    for addr in target.addresses:
        try:
            return request(addr, creds, method, req, timeout=timeout)
        except RemoteError as e:
            raise CliError(str(e), _exit_code(e.code)) from None
        except RpcError as e:
            last = e
    assert last is not None
    raise CliError(str(last), _exit_code("", last.unreachable))


def _columns(lines: Sequence[Sequence[str]]) -> str:
    """Rows of cells (the header first) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


def _members_table(rows: list[dict[str, Any]]) -> str:
    header = ("NAME", "ADDRESS", "REGION", "ZONE", "STATE", "POWER", "INC", "RTT")
    lines = [header]
    for r in rows:
        rtt = r.get("rtt_ms")
        lines.append(
            (
                r["name"],
                r["address"],
                r.get("region") or "-",
                r.get("zone") or "-",
                r["state"],
                r.get("power") or "-",
                str(r["incarnation"]),
                "-" if rtt is None else f"{rtt:.1f}ms",
            )
        )
    return _columns(lines)


@app.command("members")
def members_cmd(
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh: MeshOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds.")] = 5.0,
) -> None:
    """List the members as one node sees them, with the estimated RTT from it; warn of
    node certificates that end within 30 days."""
    import json
    import time

    import msgspec

    from meshscale.core.api import Empty
    from meshscale.core.api.node import MEMBERS
    from meshscale.trust.certs import EXPIRY_WARNING_DAYS

    infos = _request(_target(node, mesh, bundle), MEMBERS, Empty(), timeout=timeout)
    rows: list[dict[str, Any]] = [msgspec.to_builtins(r) for r in infos]
    if as_json:
        keys = ("name", "address", "region", "zone", "state", "incarnation", "rtt_ms",
                "labels", "cert_expires", "disk_full", "power")
        typer.echo(json.dumps([{k: r.get(k) for k in keys} for r in rows], indent=2))
    else:
        typer.echo(_members_table(rows))
    now = time.time()
    for r in rows:
        if r.get("disk_full") and r.get("state") in ("alive", "suspect"):
            typer.echo(f"warning: the disk of node {r['name']} is full: it refuses writes "
                       "and takes no new copies until it has room", err=True)
        ends = r.get("cert_expires")
        if r.get("state") in ("alive", "suspect") and isinstance(ends, int | float):
            days = (ends - now) / 86400
            if days <= EXPIRY_WARNING_DAYS:
                when = "ended" if days <= 0 else f"ends in {days:.0f} days"
                typer.echo(f"warning: the certificate of node {r['name']} {when}; re-issue "
                           "it with `meshscale bundle node --renew`", err=True)


def _ask_live_members(target: Target, method: Method[Req, Rep], req: Req, timeout: float
                      ) -> tuple[dict[str, Rep], list[str]]:
    """``method`` on every live member (as the first node of ``target`` that answers sees
    them), asked at once: the answers by node name, and the members that did not answer."""
    import asyncio

    from meshscale.client.rpc import RpcConnection, RpcError
    from meshscale.core.api import Empty
    from meshscale.core.api.node import MEMBERS

    creds = _client_creds(target.bundle)
    members = [m for m in _request(target, MEMBERS, Empty(), timeout=timeout, creds=creds)
               if m.state in ("alive", "suspect")]

    async def one(address: str) -> Rep | None:
        conn = RpcConnection(address, creds, timeout)
        try:
            return await conn.request(method, req)
        except RpcError:
            return None
        finally:
            await conn.close()

    async def every() -> list[Rep | None]:
        return list(await asyncio.gather(*(one(m.address) for m in members)))

    answers: dict[str, Rep] = {}
    missing: list[str] = []
    for m, rep in zip(members, asyncio.run(every()), strict=True):
        if rep is None:
            missing.append(m.name)
        else:
            answers[m.name] = rep
    return answers, sorted(missing)


def _energy_rows(target: Target, timeout: float) -> tuple[list[Any], list[str]]:
    """``node.energy`` of every live member, and the members that did not answer."""
    from meshscale.core.api import Empty
    from meshscale.core.api.node import ENERGY

    answers, missing = _ask_live_members(target, ENERGY, Empty(), timeout)
    return [answers[name] for name in sorted(answers)], missing


def _energy_table(rows: list[Any]) -> str:
    header = ("NODE", "REGION", "ZONE", "SOURCE", "WATTS", "LAST HOUR J", "WINDOW", "TOTAL J",
              "CPU")
    lines = [header]
    for r in rows:
        lines.append((r.name, r.region or "-", r.zone or "-", r.source, f"{r.watts:.1f}",
                      f"{r.joules_last_hour:,.0f}", f"{r.window_s}s",
                      f"{r.joules_total:,.0f}", f"{r.cpu_utilization:.0%}"))
    regions: dict[str, list[Any]] = {}
    for r in rows:
        regions.setdefault(r.region or "-", []).append(r)
    for region, rs in sorted(regions.items()):
        sources = "+".join(sorted({r.source for r in rs}))
        lines.append((f"[{region}]", region, "", sources, f"{sum(r.watts for r in rs):.1f}",
                      f"{sum(r.joules_last_hour for r in rs):,.0f}", "",
                      f"{sum(r.joules_total for r in rs):,.0f}", ""))
    return _columns(lines)


@app.command("energy")
def energy_cmd(
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh: MeshOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds.")] = 5.0,
) -> None:
    """Power and energy of every live node and region over the last hour, and where each
    figure comes from: `rapl` (measured) or `model` (declared watts at the node's CPU
    use: an estimate). Exit 1 if a live node did not answer."""
    import json

    import msgspec

    rows, missing = _energy_rows(_target(node, mesh, bundle), timeout)
    if as_json:
        by_region: dict[str, dict[str, float]] = {}
        for r in rows:
            agg = by_region.setdefault(r.region, {"watts": 0.0, "joules_last_hour": 0.0,
                                                  "joules_total": 0.0})
            agg["watts"] += r.watts
            agg["joules_last_hour"] += r.joules_last_hour
            agg["joules_total"] += r.joules_total
        typer.echo(json.dumps({"nodes": msgspec.to_builtins(rows), "regions": by_region,
                               "unreachable": missing}, indent=2))
    else:
        typer.echo(_energy_table(rows))
        if any(r.source == "model" for r in rows):
            typer.echo("model: declared idle/peak watts at the node's CPU use, an estimate; "
                       "rapl: the machine's own counters", err=True)
    if missing:
        raise CliError(f"no answer from {', '.join(missing)}", exit_code=1)


@app.command("up")
def up_cmd(
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=1000, help="Node processes.")] = 3,
    regions: Annotated[
        str, typer.Option("--regions", help="Comma-separated regions, round robin.")
    ] = "eu-west,us-east",
    latency: Annotated[list[str] | None, typer.Option("--latency", help=LATENCY_HELP)] = None,
    base_port: Annotated[
        int,
        typer.Option(
            "--base-port", min=0, max=65535, help="Node i listens on P+i; 0: pick free ports."
        ),
    ] = 7946,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Mesh directory (default: a new temporary "
                                  "one, removed when the mesh stops).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Convergence deadline (s).")
    ] = 60.0,
    detach: Annotated[bool, typer.Option("--detach", help="Return once the mesh has "
                                         "converged and leave it running; `meshscale down "
                                         "--dir DIR` stops it.")] = False,
    metrics_public: Annotated[bool, typer.Option(
        "--metrics-public", help="Serve every node's /metrics without the token, for the "
        "Prometheus scraper that DIR/prometheus-targets.json (file_sd) points at.")] = False,
) -> None:
    """Start a local mesh of N node processes on 127.0.0.1 until Ctrl-C or SIGTERM (or,
    with --detach, until `meshscale down`)."""
    import shutil
    import signal
    import threading

    from meshscale.runtime.latency import parse_latency
    from meshscale.runtime.launcher import Interrupted, LocalMesh, mesh_temp_dir

    region_list = [r.strip() for r in regions.split(",") if r.strip()]
    if not region_list:
        raise CliError("--regions: give at least one region")
    try:
        table = parse_latency(latency)
    except ValueError as e:
        raise CliError(f"--latency: {e}") from None
    temporary = directory is None
    path = directory or mesh_temp_dir("meshscale-up-")
    if not temporary and (path / "mesh.json").exists() and _mesh_running(path):
        raise CliError(f"{path}: a mesh from there is still running; `meshscale down --dir "
                       f"{path}` first")

    def cleanup() -> None:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)

    try:
        mesh = LocalMesh(path, nodes, regions=region_list, latency=table, base_port=base_port,
                         node_settings={"metrics_public": True} if metrics_public else None)
    except (ValueError, OSError) as e:
        cleanup()
        raise CliError(str(e)) from None
    if base_port:
        from meshscale.runtime.launcher import _port_free

        busy = [n.port for n in mesh.nodes if not _port_free(n.port)]
        if busy:
            cleanup()
            raise CliError(f"ports in use: {', '.join(map(str, busy))}; use --base-port 0")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    keep = False
    try:
        mesh.start(detach=detach)
        mesh.write_mesh_json(temporary=temporary)
        typer.echo(f"starting {nodes} nodes in {path}", err=True)
        try:
            rows = mesh.wait_converged(timeout, stop.is_set)
        except Interrupted:
            return
        except (TimeoutError, RuntimeError) as e:
            if temporary:
                raise CliError(str(e), exit_code=1) from None
            raise CliError(f"{e}; node logs are in {path / 'nodes'}", exit_code=1) from None
        typer.echo(_members_table(rows))
        typer.echo("")
        for n in mesh.nodes:
            assert n.proc is not None
            typer.echo(
                f"{n.name} listens on {n.address} (udp+tcp)  http {n.http or '-'}  "
                f"pid {n.proc.pid}  log {n.log_path}"
            )
        typer.echo(f"mesh file: {mesh.mesh_json}")
        typer.echo(f"prometheus targets (file_sd): {mesh.targets_json}"
                   + ("" if metrics_public else " (scrapes need the token: --metrics-public "
                      "opens /metrics)"))
        typer.echo(f"export MESHSCALE_MESH={mesh.mesh_json}")
        typer.echo(f"export MESHSCALE_BUNDLE={mesh.bundle_path}")
        if detach:
            typer.echo(f"running in the background; stop it with: meshscale down --dir {path}")
            keep = True
            return
        typer.echo("Ctrl-C to stop the mesh")
        sys.stdout.flush()
        while not stop.wait(0.5):
            gone = mesh.exited()
            if len(gone) == len(mesh.nodes):
                raise CliError("every node process has exited", exit_code=1)
    finally:
        if not keep:
            mesh.stop()
            cleanup()
    typer.echo("stopped", err=True)


def _mesh_pids(mf: MeshFile) -> list[int]:
    """The node processes of a mesh.json that are still running as those nodes (a pid
    counts only while its command line names the node's config file, or for a mesh.json
    that has none, its data dir: never a reused pid)."""
    out = []
    for n in mf.nodes:
        pid, named = n.get("pid"), n.get("config", n.get("data_dir"))
        if not isinstance(pid, int) or not isinstance(named, str):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if named.encode() in cmdline:
            out.append(pid)
    return out


def _mesh_running(path: Path) -> bool:
    try:
        return bool(_mesh_pids(read_mesh_file(path / "mesh.json")))
    except MeshFileError:
        return False


@app.command("down")
def down_cmd(
    directory: Annotated[Path, typer.Option("--dir", help="The mesh directory `meshscale up "
                                            "--detach` printed.")],
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for "
                                           "a graceful leave before SIGKILL.")] = 10.0,
) -> None:
    """Stop a mesh started with `meshscale up --detach` (and remove its directory if `up`
    made a temporary one)."""
    import shutil
    import signal
    import time

    from meshscale.runtime.launcher import pid_alive

    mf = _mesh_file(directory / "mesh.json")
    assert mf is not None
    pids = _mesh_pids(mf)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if mf.temporary:
        shutil.rmtree(directory, ignore_errors=True)
    typer.echo(f"stopped {len(pids)} node(s)" + (f" ({len(killed)} killed)" if killed else "")
               + (f"; removed {directory}" if mf.temporary else ""))


@node_app.command("remove")
def node_remove_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The node to remove.")],
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", envvar=BUNDLE_ENV, help="The admin bundle (it signs the removal); "
        "default: the one --mesh names.")] = None,
    node: NodeOption = None,
    mesh: MeshOption = None,
    reason: Annotated[str, typer.Option("--reason", help="Kept with the entry.")] = "",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds.")] = 10.0,
) -> None:
    """Remove a node for good: a revocation signed by the CA, handed to a live node and
    spread by gossip. Every node then refuses the removed node's TLS and gossip, its data
    is re-replicated elsewhere, and it cannot rejoin."""
    from meshscale.core.api.node import ADMIN_REVOKE, RevokeRequest
    from meshscale.transport.credentials import Credentials
    from meshscale.trust.certs import check_name
    from meshscale.trust.revocation import sign_revocation

    try:
        check_name(name)
    except ValueError as e:
        raise CliError(str(e)) from None
    mf = _mesh_file(mesh)
    admin = _admin(bundle if bundle is not None else (mf.admin_bundle if mf else None))
    target = _target(node, mesh, admin.path)
    assert admin.ca_key_pem is not None
    entry = sign_revocation(admin.ca_key_pem, admin.cluster_id, name, reason)
    result = _request(target, ADMIN_REVOKE, RevokeRequest(entry=entry), timeout=timeout,
                      creds=Credentials.from_bundle(admin))
    state = "removed" if result.new else "was already removed"
    typer.echo(f"node {name} {state}; the removal spreads by gossip (seconds)")
    typer.echo("the removed machine still holds the gossip keyring: rotate it with "
               "`meshscale keys rotate` and copy keyring.json to every node bundle")


def _power_cmd(name: str, wake: bool, bundle: Path | None, node: str | None,
               mesh: Path | None, timeout: float) -> None:
    """``node.standby`` / ``node.wake`` sent to node ``name`` itself (its address from the
    members list of the node --node or --mesh names)."""
    from meshscale.client.rpc import RemoteError, RpcError, request
    from meshscale.core.api import Empty
    from meshscale.core.api.node import MEMBERS, NODE_STANDBY, NODE_WAKE
    from meshscale.trust.certs import check_name

    try:
        check_name(name)
    except ValueError as e:
        raise CliError(str(e)) from None
    target = _target(node, mesh, bundle)
    creds = _client_creds(target.bundle)
    members = _request(target, MEMBERS, Empty(), timeout=timeout, creds=creds)
    found = [m for m in members if m.name == name and m.state in ("alive", "suspect")]
    if not found:
        raise CliError(f"no live member named {name!r}", exit_code=1)
    try:
        reply = request(found[0].address, creds, NODE_WAKE if wake else NODE_STANDBY,
                        Empty(), timeout=timeout)
    except RemoteError as e:
        raise CliError(str(e), _exit_code(e.code)) from None
    except RpcError as e:
        raise CliError(f"{name}: {e}", _exit_code("", e.unreachable)) from None
    detail = f" ({reply.detail})" if reply.detail else ""
    typer.echo(f"node {reply.name}: {reply.state}{detail}")


@node_app.command("standby")
def node_standby_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The node to put to sleep.")],
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh: MeshOption = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds.")] = 5.0,
) -> None:
    """Put a node on standby (admin): it takes no new work, finishes what runs, then
    stops its worker processes, while its data stays readable. Refused, naming the rule,
    for a --no-standby node or one holding the only live copy of an object; once
    drained, it gives the request up (an event says why) if the rest of its region would
    drop below its minimum of active nodes. It stays asleep until `node wake` or a task
    placed on it."""
    _power_cmd(name, False, bundle, node, mesh, timeout)


@node_app.command("wake")
def node_wake_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The node to wake.")],
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh: MeshOption = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds.")] = 5.0,
) -> None:
    """Wake a node (admin): it starts its workers and takes work again."""
    _power_cmd(name, True, bundle, node, mesh, timeout)


@app.command("top")
def top_cmd(
    http: Annotated[
        str | None, typer.Option("--http", help="HOST:PORT of a node's HTTP API "
                                 "(https://HOST:PORT where it serves HTTPS).")
    ] = None,
    mesh: MeshOption = None,
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", envvar=BUNDLE_ENV, help="Client or admin bundle (its "
                     "token); default: the one --mesh names."),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds.")] = 1.0,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds.")] = 5.0,
) -> None:
    """Live view of the mesh from any node: members, load, task throughput, events."""
    from meshscale.top import TopError, run_top, targets_from_mesh

    try:
        if http is not None:
            scheme, sep, rest = http.rpartition("://")
            if sep and scheme not in ("http", "https"):
                raise TopError(f"--http {http}: use HOST:PORT or https://HOST:PORT", usage=True)
            addrs = [f"{scheme}://{_parse_addr(rest, '--http')}" if sep
                     else _parse_addr(http, "--http")]
        elif mesh is not None:
            addrs, mesh_bundle = targets_from_mesh(mesh)
            bundle = bundle or mesh_bundle
        else:
            raise TopError(f"give --http HOST:PORT or --mesh mesh.json (or {MESH_ENV})",
                           usage=True)
        if bundle is None:
            raise TopError("--bundle DIR is needed for the token", usage=True)
        loaded = load_bundle(bundle).require(BundleKind.ADMIN, BundleKind.CLIENT, use="`top`")
        assert loaded.token is not None
        run_top(addrs, loaded.token, once=once, interval=interval, timeout=timeout,
                ca_pem=loaded.ca_cert_pem)
    except TopError as e:
        raise CliError(str(e), USAGE_EXIT if e.usage else 1) from None


# -- data plane: objects and KV -----------------------------------------------------------

kv_app = _typer("Read and write the mesh's replicated key-value space.")
app.add_typer(kv_app, name="kv")

TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds for each request.")
]
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


class ConsistencyLevel(StrEnum):
    one = "one"
    quorum = "quorum"
    all = "all"


ConsistencyOption = Annotated[
    ConsistencyLevel,
    typer.Option("--consistency", case_sensitive=False, help="Replicas that must answer."),
]


@contextlib.contextmanager
def _data_plane(target: Target, timeout: float) -> Iterator[Any]:
    """A ``Mesh`` connected through the first node of ``target`` that answers; client
    errors become one-line ``CliError``s."""
    from meshscale.client.mesh import ConnectError, IntegrityError, MeshError, connect

    mesh = None
    for addr in target.addresses:
        try:
            mesh = connect(addr, bundle=target.bundle, timeout=timeout)
            break
        except ConnectError as e:
            if addr == target.addresses[-1]:
                raise CliError(str(e), _exit_code(e.code, e.unreachable)) from None
    assert mesh is not None
    try:
        yield mesh
    except IntegrityError as e:
        raise CliError(str(e), exit_code=EXIT_FAILED) from None
    except MeshError as e:
        raise CliError(str(e), _exit_code(e.code, e.unreachable)) from None
    except ValueError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise CliError(f"{where}{e.strerror or e}") from None
    finally:
        mesh.close()


class _ProgressBar:
    """A rich progress bar on stderr, shown once the transfer is known to be large."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._progress: Any = None
        self._task: Any = None
        self._off = False

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            if total <= PROGRESS_MIN_BYTES or self._off:
                return
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            console = Console(stderr=True)
            if not console.is_terminal:  # no bar (and no stray output) in logs and pipes
                self._off = True
                return
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=total)
        self._progress.update(self._task, completed=done, total=total)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _parse_residency(value: str | None) -> list[str] | None:
    if value is None:
        return None
    regions = [r.strip() for r in value.split(",")]
    if not all(regions):
        raise CliError(f"--residency {value!r}: give comma-separated region names")
    return regions


ID_PREFIX_MIN_HEX = 6
"""Hex digits an abbreviated object id needs (``b3-`` and at least this many)."""
_ID_PREFIX_RE = re.compile(rf"b3-[0-9a-f]{{{ID_PREFIX_MIN_HEX},64}}")


def _resolve_id(target: Target, given: str, timeout: float) -> str:
    """A whole object id, or the one id that starts with ``given`` (a unique prefix of
    ``b3-`` and at least ``ID_PREFIX_MIN_HEX`` hex digits, as git takes commits): exit 2
    for something that is no id, 1 when no object or more than one has that prefix."""
    from meshscale.core.api.objects import LIST, ListRequest
    from meshscale.core.objects import OBJECT_ID_RE

    if OBJECT_ID_RE.fullmatch(given) is not None:
        return given
    if _ID_PREFIX_RE.fullmatch(given) is None:
        raise CliError(f"not an object id: {given!r} (expected b3- and 64 hex digits, or a "
                       f"unique prefix of at least {ID_PREFIX_MIN_HEX} of them)")
    # Ids sort as strings: those with the prefix come right after it.
    page = _request(target, LIST, ListRequest(after=given, limit=2), timeout=timeout)
    found = [o.id for o in page.objects if o.id.startswith(given)]
    if not found:
        raise CliError(f"no object id starts with {given}", exit_code=1)
    if len(found) > 1:
        raise CliError(f"{given} is ambiguous: more than one object id starts with it "
                       "(give more digits)", exit_code=1)
    return found[0]


@app.command("put")
def put_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="File to store; - reads stdin.")],
    replicas: Annotated[int | None, typer.Option(
        "--replicas", min=1, help="Copies to keep (default: the --class policy's, else 3).")
    ] = None,
    w: Annotated[int | None, typer.Option(
        "--w", min=1, help="Copies durable before put returns (default: 2, at most "
        "--replicas).")] = None,
    residency: Annotated[
        str | None,
        typer.Option("--residency", help="Regions copies may live in, e.g. eu-west,eu-central "
                     "(with --class: may narrow the class's policy, never widen it)."),
    ] = None,
    data_class: Annotated[
        str | None, typer.Option("--class", help="Data class, e.g. pii or telemetry.")
    ] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse the put when fewer live nodes than --replicas may hold "
        "it now, instead of storing it under-replicated with a warning.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Store a file (- for stdin) as an object; prints its id on the last line of stdout.
    When fewer live nodes than --replicas may hold it now, it is stored on those there
    are, with a warning (--strict refuses it instead, exit 2)."""
    import warnings

    from meshscale.client.mesh import UnderReplicatedWarning

    if w is not None and replicas is not None and w > replicas:
        raise CliError(f"--w {w} is more than --replicas {replicas}")
    regions = _parse_residency(residency)
    source: Any = file
    if str(file) == "-":
        source = sys.stdin.buffer
    elif not file.exists():
        raise CliError(f"{file}: no such file")
    elif file.is_dir():
        raise CliError(f"{file}: is a directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnderReplicatedWarning)
        with _data_plane(_target(node, mesh_file, bundle), timeout) as mesh, \
                _ProgressBar(f"put {file.name}") as bar:
            ref = mesh.put(source, replicas=replicas, w=w, data_class=data_class,
                           residency=regions, progress=bar, allow_degraded=not strict)
    for warning in caught:
        if issubclass(warning.category, UnderReplicatedWarning):
            typer.echo(f"warning: {_one_line(str(warning.message))}", err=True)
    typer.echo(ref.id)


@app.command("get")
def get_cmd(
    object_id: Annotated[str, typer.Argument(metavar="ID", help="Object id (b3-...), or a "
                                             "unique prefix of it.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="File to write (replaced atomically); - "
                           "for standard output.")
    ],
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Fetch an object to a file (or stdout); nothing is written unless the bytes match
    the id."""
    import shutil
    import tempfile

    to_stdout = str(output) == "-"
    if not to_stdout and output.is_dir():
        raise CliError(f"-o {output}: is a directory")
    target = _target(node, mesh_file, bundle)
    object_id = _resolve_id(target, object_id, timeout)
    with contextlib.ExitStack() as stack:
        dest = output
        if to_stdout:
            # Verified first (in a private temp file), then copied out: stdout never sees
            # bytes that do not match the id.
            dest = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "object"
        mesh = stack.enter_context(_data_plane(target, timeout))
        bar = stack.enter_context(_ProgressBar(f"get {object_id[:12]}"))
        mesh.get(object_id, path=dest, progress=bar)
        if to_stdout:
            with open(dest, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()


@app.command("delete")
def delete_cmd(
    object_id: Annotated[str, typer.Argument(metavar="ID", help="Object id (b3-...), or a "
                                             "unique prefix of it.")],
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Delete an object from every node; repair never brings it back (tombstones)."""
    target = _target(node, mesh_file, bundle)
    object_id = _resolve_id(target, object_id, timeout)
    with _data_plane(target, timeout) as mesh:
        holders = mesh.delete(object_id)
    typer.echo(f"deleted {object_id} (held by {', '.join(holders) or 'no live node'})")


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _objects_table(rows: list[Any]) -> str:
    header = ("ID", "SIZE", "REPLICAS", "HOLDERS", "HEALTH")
    lines = [header]
    for o in rows:
        lines.append(
            (
                o.id,  # whole: it is what `get` and `delete` take
                _human_size(o.size),
                str(o.replicas),
                ",".join(o.holders) or "-",
                o.health or "-",
            )
        )
    return _columns(lines)


@app.command("objects")
def objects_cmd(
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1_000_000, help="At most this "
                                       "many objects (the next page: --after the last id "
                                       "shown).")] = 1000,
    after: Annotated[str, typer.Option("--after", help="Only ids after this one.")] = "",
    prefix: Annotated[str, typer.Option("--prefix", help="Only ids that start with this "
                                        "(b3-...).")] = "",
    data_class: Annotated[str | None, typer.Option("--class", help="Only objects of this "
                                                   "data class.")] = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """List the objects in the mesh with their holders and health, in id order, a page
    at a time (--limit, --after); --prefix and --class narrow it."""
    import json

    import msgspec

    from meshscale.core.objects import listing_start, listing_step, prefix_problem

    bad = prefix_problem(prefix)
    if bad is not None:
        raise CliError(f"--prefix {prefix!r}: {bad}")
    start = listing_start(after, prefix)
    rows: list[Any] = []
    more = False
    with _data_plane(_target(node, mesh_file, bundle), timeout) as mesh:
        for info in mesh.iter_objects(page_size=min(limit + 1, 1000), after=start):
            step = listing_step(info.id, info.data_class, prefix=prefix,
                                want_class=data_class)
            if step == "stop":
                break
            if step == "skip":
                continue
            if len(rows) == limit:
                more = True
                break
            rows.append(info)
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(rows), indent=2))
    else:
        typer.echo(_objects_table(rows))
    if more:
        typer.echo(f"more objects follow: --after {rows[-1].id}", err=True)


@kv_app.command("get")
def kv_get_cmd(
    key: Annotated[str, typer.Argument(metavar="KEY")],
    consistency: ConsistencyOption = ConsistencyLevel.quorum,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Print a key's value (exit 1 if it has none); --json prints {"key", "value",
    "version"} with the value as text when it is UTF-8, else base64 under
    "value_base64"; "version" is what `kv put --expected` names."""
    with _data_plane(_target(node, mesh_file, bundle), timeout) as mesh:
        value, version = mesh.kv.get_version(key, consistency.value)
    if value is None:
        raise CliError(f"no value for key {key!r}", exit_code=1)
    if as_json:
        import base64
        import json

        doc: dict[str, str] = {"key": key, "version": version}
        try:
            doc["value"] = value.decode("utf-8")
        except UnicodeDecodeError:
            doc["value_base64"] = base64.b64encode(value).decode("ascii")
        typer.echo(json.dumps(doc))
        return
    out = sys.stdout.buffer
    out.write(value if value.endswith(b"\n") else value + b"\n")
    out.flush()


@kv_app.command("put")
def kv_put_cmd(
    key: Annotated[str, typer.Argument(metavar="KEY")],
    value: Annotated[str, typer.Argument(metavar="VALUE", help="The value; - reads stdin.")],
    consistency: ConsistencyOption = ConsistencyLevel.quorum,
    expected: Annotated[str | None, typer.Option(
        "--expected", metavar="VERSION",
        help="Conditional put: only if the key is still at VERSION (`kv get --json` "
             "prints it; \"\" for no value); else exit 1, code conflict. Prints the new "
             "version.")] = None,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Set a key."""
    data = sys.stdin.buffer.read() if value == "-" else value.encode("utf-8")
    with _data_plane(_target(node, mesh_file, bundle), timeout) as mesh:
        version = mesh.kv.put(key, data, consistency.value, expected=expected)
    if expected is not None:
        typer.echo(version)


@kv_app.command("delete")
def kv_delete_cmd(
    key: Annotated[str, typer.Argument(metavar="KEY")],
    consistency: ConsistencyOption = ConsistencyLevel.quorum,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Delete a key."""
    with _data_plane(_target(node, mesh_file, bundle), timeout) as mesh:
        mesh.kv.delete(key, consistency.value)


@kv_app.command("list")
def kv_list_cmd(
    prefix: Annotated[str, typer.Option("--prefix", help="Only keys starting with this.")] = "",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON list of {key, value} (as kv get --json: the value as "
                       "text when it is UTF-8, else base64 under value_base64).")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """List the live keys (one a line), in key order."""
    import base64
    import json
    with _data_plane(_target(node, mesh_file, bundle), timeout) as mesh:
        rows = list(mesh.kv.items(prefix, binary=True))
    if not as_json:
        for key, _ in rows:
            typer.echo(key)
        return
    out: list[dict[str, str]] = []
    for key, value in rows:
        try:
            out.append({"key": key, "value": value.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"key": key, "value_base64": base64.b64encode(value).decode("ascii")})
    typer.echo(json.dumps(out, indent=2))


# -- data-class policies -------------------------------------------------------------------

policy_app = _typer("Data-class policies: where a class's copies may live, how many, how "
                    "long, who may read them.")
app.add_typer(policy_app, name="policy")

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def _parse_duration(value: str, flag: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds, as seconds."""
    text = value.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit is not None else text
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise CliError(f"{flag} {value!r}: give a positive duration such as 30d, 12h or 90s")
    return seconds


def _region_list(value: str, flag: str) -> list[str]:
    from meshscale.core.policy import PolicyError, check_region

    regions = [r.strip() for r in value.split(",")]
    try:
        return [check_region(r) for r in regions]
    except PolicyError as e:
        raise CliError(f"{flag} {value!r}: {e}") from None


def _policy_row(p: Any) -> str:
    ttl = "-" if p.ttl_s is None else f"{p.ttl_s:g}s"
    streams = ",".join(p.stream_regions) if p.stream_regions is not None else "(same)"
    return (f"{p.name}  regions={','.join(p.regions)}  replicas={p.replicas}  ttl={ttl}  "
            f"cross_region_reads={'yes' if p.cross_region_reads else 'no'}  "
            f"stream_regions={streams}")


@policy_app.command("set")
def policy_set_cmd(
    name: Annotated[str, typer.Argument(metavar="CLASS", help="Data class, e.g. pii.")],
    regions: Annotated[str, typer.Option("--regions", help="Regions the class's copies may "
                                         "live in, e.g. eu-west,eu-central.")],
    replicas: Annotated[int, typer.Option("--replicas", min=1, max=16,
                                          help="Copies of each object.")] = 3,
    ttl: Annotated[str | None, typer.Option("--ttl", help="Collect copies this long after "
                                            "their put, e.g. 30d, 12h.")] = None,
    no_cross_region_reads: Annotated[bool, typer.Option(
        "--no-cross-region-reads", help="Nodes outside the regions may not read it.")] = False,
    stream_regions: Annotated[str | None, typer.Option(
        "--stream-regions", help="Regions its stream shards may live in (a subset of "
        "--regions; default: the same).")] = None,
    migrate: Annotated[bool, typer.Option(
        "--migrate", help="Move existing copies the change would break into the new "
        "regions (by re-replication) and report what moved; without it such a change is "
        "refused.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Set a data class's policy (admin bundle needed). Refused if existing copies of the
    class would fall outside the new regions, unless --migrate (exit 1 if some copy is
    still outside when the node stops waiting; it keeps moving)."""
    import json

    import msgspec

    from meshscale.core.api import policy as papi
    from meshscale.core.policy import PolicyError, make_policy

    try:
        p = make_policy(name, _region_list(regions, "--regions"), replicas=replicas,
                        ttl_s=None if ttl is None else _parse_duration(ttl, "--ttl"),
                        cross_region_reads=not no_cross_region_reads,
                        stream_regions=None if stream_regions is None
                        else _region_list(stream_regions, "--stream-regions"))
    except PolicyError as e:
        raise CliError(str(e)) from None
    req = papi.PolicySetRequest(
        name=p.name, regions=list(p.regions), replicas=p.replicas, ttl_s=p.ttl_s,
        cross_region_reads=p.cross_region_reads,
        stream_regions=None if p.stream_regions is None else list(p.stream_regions),
        migrate=migrate)
    reply = _request(_target(node, mesh_file, bundle), papi.SET, req, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(reply), indent=2))
        return
    typer.echo(f"set {_policy_row(reply.policy)}")
    if reply.previous is not None:
        typer.echo(f"was {_policy_row(reply.previous)}")
    if not reply.migrated:
        typer.echo(f"checked {reply.checked_objects} existing object(s) of class {p.name}: "
                   "none outside the new regions")
        return
    typer.echo(f"migrated {len(reply.migrated)} of {reply.checked_objects} object(s) of "
               f"class {p.name} into regions {','.join(p.regions)}:")
    for moved in reply.migrated:
        typer.echo(f"  {moved.id}  from {','.join(moved.from_regions)}  now in "
                   f"{','.join(moved.to_regions) or '(no live copy)'}")
    for copy in reply.still_outside:
        typer.echo(f"still outside the new regions (moving): {copy}", err=True)
    if reply.still_outside:
        raise typer.Exit(EXIT_FAILED)


@policy_app.command("get")
def policy_get_cmd(
    name: Annotated[str, typer.Argument(metavar="CLASS")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Print a class's policy (exit 1 if it has none)."""
    import json

    import msgspec

    from meshscale.core.api import policy as papi
    from meshscale.core.policy import PolicyError, check_class_name

    try:
        check_class_name(name)
    except PolicyError as e:
        raise CliError(str(e)) from None
    p = _request(_target(node, mesh_file, bundle), papi.GET,
                 papi.PolicyNameRequest(name=name), timeout=timeout)
    typer.echo(json.dumps(msgspec.to_builtins(p), indent=2) if as_json else _policy_row(p))


@policy_app.command("list")
def policy_list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """List every class that has a policy."""
    import json

    import msgspec

    from meshscale.core.api import Empty
    from meshscale.core.api import policy as papi

    rows = _request(_target(node, mesh_file, bundle), papi.LIST, Empty(), timeout=timeout)
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(rows), indent=2))
    else:
        for p in rows:
            typer.echo(_policy_row(p))


@policy_app.command("delete")
def policy_delete_cmd(
    name: Annotated[str, typer.Argument(metavar="CLASS")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Delete a class's policy (admin bundle needed; exit 1 if it has none). Objects of
    the class keep the rule they were put with."""
    import json

    import msgspec

    from meshscale.core.api import policy as papi
    from meshscale.core.policy import PolicyError, check_class_name

    try:
        check_class_name(name)
    except PolicyError as e:
        raise CliError(str(e)) from None
    reply = _request(_target(node, mesh_file, bundle), papi.DELETE,
                     papi.PolicyNameRequest(name=name), timeout=timeout)
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(reply), indent=2))
    else:
        typer.echo(f"deleted the policy of class {reply.name}")


def _duration(r: dict[str, Any]) -> str:
    start, end = r.get("submitted") or 0.0, r.get("finished") or 0.0
    if not start:
        return "-"
    import time

    secs = (end or time.time()) - start
    text = f"{secs * 1000:.0f}ms" if secs < 1 else f"{secs:.1f}s"
    return text if end else f"{text}+"


def _tasks_table(rows: list[dict[str, Any]]) -> str:
    header = ("TASK", "FUNCTION", "STATE", "DURATION", "NODE", "OWNER", "REASON")
    lines = [header]
    for r in rows:
        reason = r.get("reason") or ""
        if r.get("state") == "failed" and r.get("error"):
            reason = f"{reason} error: {r['error']}".strip()
        lines.append((str(r["task_id"]), r.get("name") or "-", str(r["state"]), _duration(r),
                      r.get("node") or "-", r.get("owner") or "-", reason or "-"))
    return _columns(lines)


@app.command("tasks")
def tasks_cmd(
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    owner: Annotated[str | None, typer.Option(
        "--owner", help="Only the tasks this node (HOST:PORT) owns, asked of it alone.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Newest N tasks.")] = 100,
    timeout: TimeoutOption = 30.0,
) -> None:
    """List the mesh's tasks, newest first, from every live node that owns some (or one
    node's with --owner): function, state, duration (+ while it runs), the node it ran on,
    why there, and the error of a failed one. Exit 1 if a live node did not answer."""
    import json

    import msgspec

    from meshscale.core.api.tasks import TASK_LIST, ListRequest

    req = ListRequest(limit=limit)
    missing: list[str] = []
    if owner is not None:
        target = _target(_parse_addr(owner, "--owner"), mesh_file, bundle)
        found: list[Any] = _request(target, TASK_LIST, req, timeout=timeout)
    else:
        answers, missing = _ask_live_members(_target(node, mesh_file, bundle), TASK_LIST, req,
                                             timeout)
        found = [row for rows in answers.values() for row in rows]
    found.sort(key=lambda r: (-r.submitted, r.task_id))
    rows: list[dict[str, Any]] = msgspec.to_builtins(found[:limit])
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(_tasks_table(rows))
    if missing:
        raise CliError(f"no answer from {', '.join(missing)}: their tasks are not listed",
                       exit_code=EXIT_FAILED)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _services_table(rows: list[Any]) -> str:
    header = ("SERVICE", "NODE", "REGION", "READY", "INFLIGHT", "CALLS", "P50_MS", "P99_MS")
    lines: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    for s in rows:
        for r in s.replicas:
            ready = ("unhealthy" if not r.healthy else "yes") if r.ready else "no"
            lines.append((s.spec.name, r.node, r.region, ready,
                          str(r.inflight), str(r.calls), _ms(r.p50_ms), _ms(r.p99_ms)))
        if not s.replicas:
            lines.append((s.spec.name, "-", "-", "-", "0", "0", "-", "-"))
        by = ", ".join(f"{k}={v}" for k, v in sorted(s.calls_by_region.items())) or "none"
        note = (f"{s.spec.name}: {s.spec.placement}, {s.desired} replica(s) wanted, "
                f"placed on {', '.join(s.placed) or 'no node'}; calls per source region "
                f"(last window): {by}")
        if s.unplaceable:
            note += f"; unplaceable: {s.unplaceable}"
        for n, err in sorted(s.errors.items()):
            note += f"\n  {n}: replica start failed: {err.splitlines()[0] if err else ''}"
        notes.append(note)
    return _columns(lines) + ("\n\n" + "\n".join(notes) if notes else "")


@app.command("services")
def services_cmd(
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """List the deployed services (issue #22): each replica's node, region, readiness,
    calls in flight, calls answered, p50/p99 latency, and calls per source region."""
    import json

    import msgspec

    from meshscale.core.api import Empty
    from meshscale.core.api.services import LIST

    rows = _request(_target(node, mesh_file, bundle), LIST, Empty(), timeout=timeout).services
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(rows), indent=2))
    else:
        typer.echo(_services_table(rows) if rows else "no services")


# -- erasure --------------------------------------------------------------------------


def _erase_verify(path: str, bundle: Path | None, mesh_file: Path | None,
                  as_json: bool) -> None:
    """``meshscale erase verify RECEIPT.json``: offline, against the bundle's CA."""
    import json

    from meshscale.client.erasure import ReceiptError, verify_receipt_file
    from meshscale.meshfile import MeshFileError

    if bundle is None and mesh_file is not None:
        try:
            bundle = _target(None, mesh_file, None).bundle
        except (CliError, MeshFileError):
            bundle = None
    if bundle is None:
        raise CliError(f"missing --bundle DIR (or {BUNDLE_ENV}, or --mesh mesh.json): the "
                       "cluster's CA certificate checks the receipt")
    ca = load_bundle(bundle).ca_cert_pem
    try:
        receipt, problems = verify_receipt_file(path, ca)
    except FileNotFoundError:
        raise CliError(f"{path}: no such file", exit_code=EXIT_FAILED) from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, not a receipt file") from None
    except OSError as e:
        raise CliError(f"{path}: cannot read: {e.strerror or e}", exit_code=EXIT_FAILED) \
            from None
    except ReceiptError as e:
        if e.malformed:
            raise CliError(f"{path}: {e}") from None
        raise CliError(f"{path}: does NOT verify: {e}", exit_code=EXIT_FAILED) from None
    b = receipt.body
    copies = sum(len(o.copies) for o in b.objects)
    if as_json:
        typer.echo(json.dumps({"receipt_id": b.receipt_id, "verified": True,
                               "complete": not problems, "objects": len(b.objects),
                               "copies": copies, "keys": len(b.keys),
                               "coordinator": b.coordinator,
                               "confirmed_by": [c.node for c in b.confirmations],
                               "problems": problems}, indent=2))
    else:
        typer.echo(f"{b.receipt_id}: signatures verify (coordinator {b.coordinator}, "
                   f"{len(b.confirmations)} holder confirmations, CA of this bundle)")
        typer.echo(f"{len(b.objects)} objects, {copies} copies, {len(b.keys)} keys erased "
                   f"({b.selector.describe()}), requested by {b.requested_by or '-'} "
                   f"({b.requested_role or '-'})")
        for p in problems:
            typer.echo(f"NOT PROVEN: {p}")
        if not problems:
            typer.echo("complete: every copy listed is confirmed gone by the node that held it")
    if problems:
        raise typer.Exit(EXIT_FAILED)


@app.command("erase")
def erase_cmd(
    ids: Annotated[list[str] | None, typer.Argument(
        metavar="[ID...] | verify RECEIPT.json",
        help="Object ids to erase; or `verify RECEIPT.json` to check a receipt.")] = None,
    data_class: Annotated[str | None, typer.Option(
        "--class", help="Erase every object of this data class.")] = None,
    key_prefix: Annotated[str | None, typer.Option(
        "--key-prefix", help="With --class: only the KV keys under this prefix (under "
        "'CLASS/') and the objects of the class they name.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the signed receipt (default: "
        "./erasure-<receipt id>.json).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the receipt (or the "
                                          "verification) as JSON.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 300.0,
) -> None:
    """Erase objects everywhere (admin bundle needed) and write a signed receipt listing
    every copy and the node that confirmed dropping it. `meshscale erase verify
    RECEIPT.json` checks a receipt offline with the bundle's CA certificate. Exit 0: done
    (verified and complete); 1: an id not found, an erasure not complete, a receipt that
    does not verify; 2: bad input (a malformed id, class or receipt file; an unknown
    class; a read-only bundle); 3: no node answered."""
    from meshscale.client.erasure import save_receipt
    from meshscale.core.api import erasure as eapi
    from meshscale.core.erasure import check_selector, receipt_json
    from meshscale.core.policy import PolicyError

    args = list(ids or [])
    if args[:1] == ["verify"]:
        if len(args) != 2 or data_class is not None or key_prefix is not None \
                or out is not None:
            raise CliError("usage: meshscale erase verify RECEIPT.json [--bundle DIR] [--json]")
        _erase_verify(args[1], bundle, mesh_file, as_json)
        return
    try:
        sel = check_selector(data_class, key_prefix, args)
    except PolicyError as e:
        raise CliError(str(e)) from None
    target = _target(node, mesh_file, bundle)
    receipt = _request(target, eapi.RUN, eapi.EraseRequest(
        data_class=sel.data_class, key_prefix=sel.key_prefix, ids=list(sel.ids)),
        timeout=timeout)
    b = receipt.body
    path = save_receipt(receipt, out if out is not None else Path(f"erasure-{b.receipt_id}.json"))
    if as_json:
        sys.stdout.buffer.write(receipt_json(receipt))
        sys.stdout.buffer.flush()
    else:
        copies = sum(len(o.copies) for o in b.objects)
        typer.echo(f"erased {len(b.objects)} objects ({copies} copies on "
                   f"{len(b.confirmations)} nodes) and {len(b.keys)} keys: "
                   f"{sel.describe()}")
        for o in b.objects:
            where = ", ".join(f"{c.node} ({c.region})" for c in o.copies)
            typer.echo(f"  {o.id}  {o.data_class or '-'}  {_human_size(o.size)}  {where}")
        for m in b.missing:
            typer.echo(f"  {m}: not held by any live node", err=True)
        for p in b.problems:
            typer.echo(f"NOT CONFIRMED: {p}", err=True)
        typer.echo(f"receipt {b.receipt_id} signed by {b.coordinator}: {path}")
    if not b.complete or b.missing:
        raise typer.Exit(EXIT_FAILED)


# -- compliance -----------------------------------------------------------------------

compliance_app = _typer("Compliance: the residency report (where every copy of each data "
                        "class is, and whether any left its rule). docs/compliance.md.")
app.add_typer(compliance_app, name="compliance")


@compliance_app.command("report")
def compliance_report_cmd(
    data_class: Annotated[str | None, typer.Option("--class", help="Only this data "
                                                   "class.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Refusals since: Unix "
                                              "seconds, ISO 8601, or an age (15m, 2h, 7d); "
                                              "default: all the trails hold.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html_file: Annotated[Path | None, typer.Option(
        "--html", help="Also write the report as one self-contained HTML file.")] = None,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 120.0,
) -> None:
    """For each data class: which regions hold how many copies and bytes, the duplication
    and storage overhead, every copy outside its rule, the refusals in the period (from the
    audit trails) and each node's audit chain verification. Needs an admin bundle for the
    trails. Exit 0: every copy inside its rule and every chain verified; 1: not so (the
    report says what); 2: bad input; 3: no node answered."""
    import json

    import msgspec

    from meshscale.client.compliance import gather_report_blocking, render_html, render_text
    from meshscale.client.rpc import RemoteError, RpcError
    from meshscale.core.policy import PolicyError, check_class_name

    if data_class is not None:
        try:
            check_class_name(data_class)
        except PolicyError as e:
            raise CliError(f"--class: {e}") from None
    since_s = _parse_since(since)
    if html_file is not None and html_file.is_dir():
        raise CliError(f"--html {html_file}: is a directory; name a file")
    target = _target(node, mesh_file, bundle)
    creds = _client_creds(target.bundle)
    last: RpcError | None = None
    for addr in target.addresses:
        try:
            report = gather_report_blocking(addr, creds, data_class=data_class,
                                            since_wall_s=since_s, timeout=timeout)
            break
        except RemoteError as e:
            raise CliError(str(e), _exit_code(e.code)) from None
        except RpcError as e:
            last = e
    else:
        assert last is not None
        raise CliError(f"cannot reach the mesh: {last}", _exit_code("", last.unreachable))
    if html_file is not None:
        try:
            html_file.write_text(render_html(report), encoding="utf-8")
        except OSError as e:
            raise CliError(f"--html {html_file}: cannot write: {e.strerror or e}",
                           exit_code=EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(report), indent=2))
    else:
        typer.echo(render_text(report))
        if html_file is not None:
            typer.echo(f"wrote {html_file}")
    if report.out_of_rule or not report.chains_ok:
        raise typer.Exit(EXIT_FAILED)


# -- audit ----------------------------------------------------------------------------

audit_app = typer.Typer(
    help="Read the nodes' audit trails (who put, copied, read, deleted or was refused "
    "what, where); `meshscale audit verify` checks their hash chains. docs/audit.md.",
    invoke_without_command=True, no_args_is_help=False, add_completion=False,
    pretty_exceptions_enable=False, rich_markup_mode=None)
app.add_typer(audit_app, name="audit")

AllNodesOption = Annotated[bool, typer.Option(
    "--all-nodes", help="Every live member (as the first node that answers sees them), "
    "not only the node asked.")]


def _parse_since(value: str | None) -> float:
    """``--since``: Unix seconds, an ISO 8601 time (UTC unless it says), or an age such
    as 90s, 15m, 2h, 7d."""
    import datetime as dt
    import re
    import time

    if value is None:
        return 0.0
    v = value.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", v)
    if m is not None:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return max(0.0, time.time() - float(m.group(1)) * unit)
    with contextlib.suppress(ValueError):
        t = float(v)
        if 0 <= t < 1e11:
            return t
    try:
        when = dt.datetime.fromisoformat(v)
    except ValueError:
        raise CliError(f"--since {value!r}: use Unix seconds, an ISO 8601 time "
                       "(2026-01-31T12:00) or an age (90s, 15m, 2h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp())


def _audit_targets(node: str | None, mesh: Path | None, bundle: Path | None, all_nodes: bool,
                   creds: Any, timeout: float) -> tuple[list[tuple[str, str]],
                                                        list[tuple[str, str]]]:
    """``(asked, everyone)``: the nodes to ask and every live member, as
    ``(name, address)``; exit 3 if no node answers."""
    import asyncio

    from meshscale.client.audit import live_members
    from meshscale.client.rpc import RemoteError, RpcError

    if node is not None and all_nodes:
        raise CliError("give --node or --all-nodes, not both")
    target = _target(node, mesh, bundle)
    last: RpcError | None = None
    for addr in target.addresses:
        try:
            members = asyncio.run(live_members(addr, creds, timeout=min(timeout, 10.0)))
        except RemoteError as e:
            raise CliError(str(e), _exit_code(e.code)) from None
        except RpcError as e:
            last = e
            continue
        everyone = sorted((m.name, m.address) for m in members)
        if all_nodes:
            return everyone, everyone
        asked = [(n, a) for n, a in everyone if a == addr] or [(addr, addr)]
        return asked, everyone
    assert last is not None
    raise CliError(f"cannot reach the mesh: {last}", _exit_code("", last.unreachable))


def _audit_table(rows: list[Any]) -> str:
    import datetime as dt

    header = ("TIME (UTC)", "NODE", "SEQ", "WHAT", "OBJECT/KEY", "CLASS", "FROM", "TO", "WHO",
              "DETAIL")
    lines = [header]
    for r in rows:
        when = dt.datetime.fromtimestamp(r.wall_s, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        who = f"{r.who} ({r.role})" if r.who else "-"
        subject = r.subject if len(r.subject) <= 24 else r.subject[:21] + "..."
        lines.append((when, r.node, str(r.seq), r.kind, subject or "-", r.data_class or "-",
                      r.from_region or "-", r.to_region or "-", who, r.detail or "-"))
    return _columns(lines)


@audit_app.callback()
def audit_cmd(
    ctx: typer.Context,
    obj: Annotated[str | None, typer.Option("--object", help="Only this object id (or "
                                            "key).")] = None,
    data_class: Annotated[str | None, typer.Option("--class", help="Only entries of this "
                                                   "data class.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Only this kind: put, "
                                             "copy_made, copy_dropped, read, task_run, "
                                             "operator_placed, delete, policy_change, "
                                             "refusal, erase.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only entries since: Unix "
                                              "seconds, ISO 8601, or an age (15m, 2h, "
                                              "7d).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000,
                                       help="Entries per node at most.")] = 100,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    all_nodes: AllNodesOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """List audit entries (oldest first) of one node, or of every node with --all-nodes.
    Needs an admin bundle."""
    if ctx.invoked_subcommand is not None:
        return
    import asyncio
    import json

    import msgspec

    from meshscale.client.audit import query_mesh
    from meshscale.core.api.audit import AuditQuery
    from meshscale.core.audit import Kind

    if kind is not None and kind not in {k.value for k in Kind}:
        raise CliError(f"--kind {kind!r}: use one of {', '.join(k.value for k in Kind)}")
    for flag, value in (("--object", obj), ("--class", data_class)):
        if value is not None and not 0 < len(value) <= 256:
            raise CliError(f"{flag} must be 1 to 256 characters")
    q = AuditQuery(subject=obj, data_class=data_class,
                   kind=None if kind is None else Kind(kind), since=_parse_since(since),
                   limit=limit)
    creds = _client_creds(_target(node, mesh_file, bundle).bundle)
    asked, _ = _audit_targets(node, mesh_file, bundle, all_nodes, creds, timeout)
    result = asyncio.run(query_mesh([a for _, a in asked], creds, q, timeout=timeout))
    if result.refused and len(result.refused) + len(result.errors) == len(asked):
        raise CliError(next(iter(result.refused.values())), exit_code=USAGE_EXIT)
    if result.errors and len(result.errors) == len(asked):
        raise CliError(next(iter(result.errors.values())), exit_code=EXIT_UNREACHABLE)
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(result.rows), indent=2))
    else:
        typer.echo(_audit_table(result.rows))
    for addr, err in sorted(result.errors.items()):
        typer.echo(f"warning: node {addr} did not answer: {_one_line(err)}", err=True)
    for addr, err in sorted(result.refused.items()):
        typer.echo(f"warning: node {addr} refused: {_one_line(err)}", err=True)
    if result.more:
        typer.echo(f"warning: some node has more than {limit} matching entries; narrow "
                   "the query or raise --limit", err=True)
    if result.errors:
        raise typer.Exit(EXIT_UNREACHABLE)
    if result.refused:
        raise typer.Exit(USAGE_EXIT)


@audit_app.command("verify")
def audit_verify_cmd(
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    all_nodes: AllNodesOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    timeout: TimeoutOption = 120.0,
) -> None:
    """Check audit hash chains, and each against the signed heads the other nodes
    remember of it; names the node, segment and entry where a chain broke. Exit 1 if one
    did, 3 if a node could not be asked."""
    import asyncio
    import json

    import msgspec

    from meshscale.client.audit import verify_mesh

    creds = _client_creds(_target(node, mesh_file, bundle).bundle)
    asked, everyone = _audit_targets(node, mesh_file, bundle, all_nodes, creds, timeout)
    verdicts = asyncio.run(verify_mesh(asked, everyone, creds, timeout=timeout))
    broken = unreachable = refused = 0
    out: list[dict[str, Any]] = []
    for v in verdicts:
        r = v.reply
        if r is None:
            refused += v.refused
            unreachable += not v.refused
            out.append({"node": v.node, "address": v.address, "ok": None, "error": v.error})
            if not as_json:
                typer.echo(f"{v.node}: not checked: {_one_line(v.error or '')}")
            continue
        if not r.ok:
            broken += 1
        out.append({"address": v.address, "heads_given": v.heads_given,
                    **msgspec.to_builtins(r)})
        if as_json:
            continue
        if r.ok:
            kept = (f", {r.heads_older_than_kept} older than what is kept"
                    if r.heads_older_than_kept else "")
            typer.echo(f"{r.node}: ok: {r.entries} entries (seq {r.first_seq}..{r.last_seq}) "
                       f"in {r.segments} segments; {r.heads_matched} of {v.heads_given} "
                       f"signed heads matched{kept}")
        if r.broke is not None:
            b = r.broke
            seq = "" if b.seq is None else f" (seq {b.seq})"
            typer.echo(f"{r.node}: BROKEN at {b.segment} entry {b.index}{seq}, byte "
                       f"{b.offset}: {b.kind}: {b.detail}")
        for bad in r.heads_bad:
            typer.echo(f"{r.node}: BAD HEAD: {bad}")
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    if broken or refused:
        raise typer.Exit(1)
    if unreachable:
        raise typer.Exit(EXIT_UNREACHABLE)


FOLLOW_POLL_S = 0.5
"""How often ``logs --follow`` asks for more."""


@app.command("logs")
def logs_cmd(
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The task's full id.")],
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Print the output as the running task makes it (stdout here, "
        "stderr on stderr), until the task ends.")] = False,
    bundle: ClientBundleOption = None,
    node: NodeOption = None,
    mesh_file: MeshOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Print what a task printed: its stdout, then its stderr under a '--- stderr ---'
    line (kept with the task's record, up to the worker node's task_log_bytes of each;
    a cut is said). Exit 1: no such task; 3: no node answered."""
    import time

    from meshscale.client.tasks import format_logs

    target = _target(node, mesh_file, bundle)
    creds = _client_creds(target.bundle)
    shown = ["", ""]
    while True:
        reply = _task_logs(target, creds, task_id, timeout)
        ended = reply.state in ("done", "failed", "cancelled")
        if not follow:
            text = format_logs(reply.stdout, reply.stderr, reply.detail_ref)
            if not ended and not text:
                sys.stderr.write(f"{PROG}: task {task_id} is {reply.state}: nothing printed "
                                 "yet (--follow waits for more)\n")
            typer.echo(text, nl=bool(text) and not text.endswith("\n"))
            return
        for i, (text, stream) in enumerate(((reply.stdout, sys.stdout),
                                            (reply.stderr, sys.stderr))):
            new = text[len(shown[i]):] if text.startswith(shown[i]) else text
            if new:
                stream.write(new)
                stream.flush()
                shown[i] = text
        if ended:
            if reply.detail_ref is not None:
                sys.stderr.write(format_logs("", "", reply.detail_ref))
            return
        time.sleep(FOLLOW_POLL_S)


def _task_logs(target: Target, creds: Any, task_id: str, timeout: float) -> Any:
    """``task.logs`` through the first node of ``target`` that answers (exit 1 for an
    unknown task, 3 when none answers)."""
    from meshscale.client.rpc import RemoteError, RpcError, request
    from meshscale.core.api.tasks import TASK_LOGS, LogsRequest

    last: RpcError | None = None
    for addr in target.addresses:
        try:
            return request(addr, creds, TASK_LOGS, LogsRequest(task_id=task_id),
                           timeout=timeout)
        except RemoteError as e:
            raise CliError(str(e), _exit_code(e.code)) from None
        except RpcError as e:
            last = e
    assert last is not None
    raise CliError(str(last), _exit_code("", last.unreachable))


# -- entry point ----------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    sys.stderr.flush()
    return code


def _reliable_stdio() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` write every byte under ``PYTHONUNBUFFERED``.

    Unbuffered (``-u``, ``PYTHONUNBUFFERED=1``, as many container images set it), their
    ``.buffer`` is a raw ``FileIO`` whose ``write`` may take only part of what it is
    given: a write to a full pipe that a signal interrupts (glibc signals every thread
    when any one calls ``setgid``, for one) returns what went in so far. Neither the text
    layer nor ``shutil.copyfileobj`` looks at that count, so the rest was dropped without
    a word (20 MiB written so, 1 MiB at a time, arrived as 1.4 MiB here). A
    ``BufferedWriter`` writes on until all is out; line buffering keeps text prompt."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        raw = getattr(stream, "buffer", None)
        if not isinstance(stream, io.TextIOWrapper) or not isinstance(raw, io.RawIOBase):
            continue  # buffered already, or replaced by a caller (a test's capture)
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            continue
        stream.flush()
        writer = io.BufferedWriter(io.FileIO(fd, "w", closefd=False))
        setattr(sys, name, io.TextIOWrapper(writer, encoding=stream.encoding,
                                            errors=stream.errors, line_buffering=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    _reliable_stdio()
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except _click_exc.NoArgsIsHelpError as e:
        # `meshscale` or `meshscale keys` alone: help on stdout, the error on stderr.
        sys.stdout.write(e.format_message().rstrip("\n") + "\n")
        return _fail("missing command", USAGE_EXIT)
    except _click_exc.UsageError as e:
        return _fail(e.format_message(), USAGE_EXIT)
    except _click_exc.ClickException as e:
        return _fail(e.format_message(), e.exit_code or 1)
    except (BundleError, KeyringError) as e:
        return _fail(str(e), USAGE_EXIT)
    except CliError as e:
        return _fail(str(e), e.exit_code)
    except typer.Abort:
        return _fail("aborted", 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
