"""The ``meshscale`` command.

Errors the user can fix (a bad flag, a missing or broken bundle, a path that cannot be
written) are printed as ONE line, ``meshscale: error: <message>``, on stderr, with exit
code 2; never a traceback. Commands signal them by raising ``CliError``, ``BundleError`` or
``KeyringError``; ``main()`` turns those and typer/click usage errors into that line.

To add a command: define a function on ``app`` (or on a sub-app such as ``keys_app``, or a
new ``typer.Typer()`` registered with ``app.add_typer``), take the bundle with the
``BundleOption`` annotation, and raise ``CliError`` for anything the user got wrong.
Import heavy modules inside the command so ``meshscale --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

import meshscale
from meshscale.trust.bundle import (
    BundleError,
    init_bundle,
    issue_node_cert,
    load_bundle,
    rotate_keys,
    write_private,
    write_public,
)
from meshscale.trust.keyring import KeyringError

try:  # typer >= 0.22 vendors click
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - older typer with click installed
    import click.exceptions as _click_exc  # type: ignore[no-redef,import-not-found,unused-ignore]

PROG = "meshscale"
BUNDLE_ENV = "MESHSCALE_BUNDLE"
USAGE_EXIT = 2


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
cert_app = _typer("Issue node certificates from the bundle's CA.")
keys_app = _typer("Manage the gossip encryption keyring.")
app.add_typer(cert_app, name="cert")
app.add_typer(keys_app, name="keys")

BundleOption = Annotated[
    Path,
    typer.Option(
        "--bundle",
        envvar=BUNDLE_ENV,
        show_envvar=True,
        help="Cluster bundle directory (made by `meshscale init`).",
    ),
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
    """Create a cluster bundle: CA, gossip keyring and admin token."""
    bundle = init_bundle(directory, force=force)
    typer.echo(f"created bundle {bundle.path} (cluster {bundle.cluster_id})")
    typer.echo(f"keep {bundle.path / 'ca.key'} private; nodes need the other files")


@cert_app.command("issue")
def cert_issue_cmd(
    bundle: BundleOption,
    name: Annotated[str, typer.Option("--name", help="Node name (certificate CN).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for NAME.pem and NAME.key.")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="IP or DNS name for the SAN; repeat. Default: 127.0.0.1, localhost."
        ),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 825,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing NAME.pem/NAME.key.")
    ] = False,
) -> None:
    """Issue a node certificate (mutual TLS) signed by the bundle's CA."""
    loaded = load_bundle(bundle)
    hosts = host or ["127.0.0.1", "localhost"]
    try:
        cert_pem, key_pem = issue_node_cert(loaded, name, hosts, days)
    except ValueError as e:
        raise CliError(str(e)) from None
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    if not force:
        for p in (cert_path, key_path):
            if p.exists():
                raise CliError(f"{p}: already exists; use --force to overwrite it")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(key_path, key_pem)
        write_public(cert_path, cert_pem)
    except OSError as e:
        raise CliError(f"{out}: cannot write certificate: {e.strerror or e}") from None
    typer.echo(f"wrote {cert_path} and {key_path}")


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
def token_cmd(bundle: BundleOption) -> None:
    """Print the cluster's admin token."""
    typer.echo(load_bundle(bundle).token)


# -- running ---------------------------------------------------------------------------


@app.command("demo")
def demo_cmd() -> None:
    """Run the simulated demo."""
    try:
        from meshscale.sim.demo import run_demo  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise CliError(f"the demo is not available: {e}", exit_code=1) from None
    rv: Any = run_demo()
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:
        raise typer.Exit(rv)


# -- node agent, members, local mesh -----------------------------------------------------

node_app = _typer("Run a node agent.")
app.add_typer(node_app, name="node")

LATENCY_HELP = (
    "Emulated inter-region RTT, e.g. eu-west:us-east=80ms (repeat or comma-separate). "
    "Sends to a member of another region are delayed by RTT/2 in this process. For "
    "trying a geo-distributed mesh on one machine; off by default, never use in production."
)


def _parse_labels(labels: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in labels or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"invalid --label {item!r}: use KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _parse_addr(value: str, flag: str) -> str:
    from meshscale.trust.framing import split_addr

    try:
        host, port = split_addr(value)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None
    return f"{host}:{port}"


@node_app.command("start")
def node_start_cmd(
    bundle: BundleOption,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Node data directory (identity, certificate).")
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Node name (default: the stored identity's).")
    ] = None,
    region: Annotated[str, typer.Option("--region", help="Region this node runs in.")] = "",
    zone: Annotated[str, typer.Option("--zone", help="Zone (failure domain) in the region.")] = "",
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE label; repeat.")
    ] = None,
    bind: Annotated[
        str, typer.Option("--bind", help="HOST:PORT for UDP gossip and TCP (TLS) streams.")
    ] = "127.0.0.1:7946",
    advertise: Annotated[
        str | None,
        typer.Option("--advertise", help="HOST:PORT other nodes reach us at (default: --bind)."),
    ] = None,
    join: Annotated[
        list[str] | None, typer.Option("--join", help="HOST:PORT of a member to join; repeat.")
    ] = None,
    latency: Annotated[list[str] | None, typer.Option("--latency", help=LATENCY_HELP)] = None,
) -> None:
    """Run a node in the foreground (JSON log lines on stderr); SIGTERM/SIGINT leave gracefully."""
    from meshscale.core.membership import NodeMeta
    from meshscale.runtime.identity import IdentityError, node_certificate, start_identity
    from meshscale.runtime.latency import parse_latency
    from meshscale.runtime.node import NodeAgent, run_forever
    from meshscale.trust.tls import TLSConfigError

    bind = _parse_addr(bind, "--bind")
    host = bind.rpartition(":")[0]
    if advertise is not None:
        advertise = _parse_addr(advertise, "--advertise")
    elif host in ("0.0.0.0", "::"):
        raise CliError("--bind on a wildcard address needs --advertise HOST:PORT")
    seeds = [_parse_addr(j, "--join") for j in join or []]
    try:
        emulated = parse_latency(latency)
    except ValueError as e:
        raise CliError(f"--latency: {e}") from None
    meta = NodeMeta(region=region, zone=zone, labels=_parse_labels(label))
    loaded = load_bundle(bundle)
    try:
        identity = start_identity(data_dir, name)
        adv_host = (advertise or bind).rpartition(":")[0].strip("[]")
        hosts = list(dict.fromkeys([adv_host, "127.0.0.1", "localhost"]))
        cert_pem, key_pem = node_certificate(loaded, data_dir, identity.name, hosts)
        agent = NodeAgent(
            identity=identity,
            data_dir=data_dir,
            bundle=loaded,
            cert_pem=cert_pem,
            key_pem=key_pem,
            bind=bind,
            advertise=advertise,
            meta=meta,
            seeds=seeds,
            emulated_latency=emulated,
        )
    except (IdentityError, TLSConfigError, ValueError) as e:
        raise CliError(str(e)) from None
    try:
        run_forever(agent)
    except OSError as e:
        raise CliError(f"cannot listen on {bind}: {e.strerror or e}", exit_code=1) from None


def _client_creds(bundle: Path) -> Any:
    from meshscale.client.rpc import ClientCredentials
    from meshscale.trust.tls import TLSConfigError

    try:
        return ClientCredentials.from_bundle(load_bundle(bundle))
    except TLSConfigError as e:
        raise CliError(str(e)) from None


def _members_table(rows: list[dict[str, Any]]) -> str:
    header = ("NAME", "ADDRESS", "REGION", "ZONE", "STATE", "INC", "RTT")
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
                str(r["incarnation"]),
                "-" if rtt is None else f"{rtt:.1f}ms",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )


@app.command("members")
def members_cmd(
    bundle: BundleOption,
    node: Annotated[
        str, typer.Option("--node", help="HOST:PORT of the node to ask.")
    ] = "127.0.0.1:7946",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds.")] = 5.0,
) -> None:
    """List the members as one node sees them, with the estimated RTT from it."""
    import json

    from meshscale.client.rpc import RpcError, call

    addr = _parse_addr(node, "--node")
    creds = _client_creds(bundle)
    try:
        rows: list[dict[str, Any]] = call(addr, creds, "members", timeout=timeout)
    except RpcError as e:
        raise CliError(str(e)) from None
    if as_json:
        keys = ("name", "address", "region", "zone", "state", "incarnation", "rtt_ms", "labels")
        typer.echo(json.dumps([{k: r.get(k) for k in keys} for r in rows], indent=2))
    else:
        typer.echo(_members_table(rows))


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
        Path | None, typer.Option("--dir", help="Mesh directory (default: a new temp dir).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Convergence deadline (s).")
    ] = 60.0,
) -> None:
    """Start a local mesh of N node processes on 127.0.0.1 until Ctrl-C or SIGTERM."""
    import signal
    import tempfile
    import threading

    from meshscale.runtime.latency import parse_latency
    from meshscale.runtime.launcher import Interrupted, LocalMesh

    region_list = [r.strip() for r in regions.split(",") if r.strip()]
    if not region_list:
        raise CliError("--regions: give at least one region")
    try:
        table = parse_latency(latency)
    except ValueError as e:
        raise CliError(f"--latency: {e}") from None
    path = directory or Path(tempfile.mkdtemp(prefix="meshscale-up-"))
    try:
        mesh = LocalMesh(path, nodes, regions=region_list, latency=table, base_port=base_port)
    except (ValueError, OSError) as e:
        raise CliError(str(e)) from None
    if base_port:
        from meshscale.runtime.launcher import _port_free

        busy = [n.port for n in mesh.nodes if not _port_free(n.port)]
        if busy:
            raise CliError(f"ports in use: {', '.join(map(str, busy))}; use --base-port 0")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    mesh.start()
    try:
        typer.echo(f"starting {nodes} nodes in {path}", err=True)
        try:
            rows = mesh.wait_converged(timeout, stop.is_set)
        except Interrupted:
            return
        except (TimeoutError, RuntimeError) as e:
            raise CliError(f"{e}; node logs are in {path / 'nodes'}", exit_code=1) from None
        typer.echo(_members_table(rows))
        typer.echo("")
        for n in mesh.nodes:
            assert n.proc is not None
            typer.echo(
                f"{n.name} listens on {n.address} (udp+tcp)  pid {n.proc.pid}  log {n.log_path}"
            )
        typer.echo(f"mesh file: {mesh.mesh_json}")
        typer.echo(f"export MESHSCALE_BUNDLE={mesh.bundle_path}")
        typer.echo("Ctrl-C to stop the mesh")
        sys.stdout.flush()
        while not stop.wait(0.5):
            gone = mesh.exited()
            if len(gone) == len(mesh.nodes):
                raise CliError("every node process has exited", exit_code=1)
    finally:
        mesh.stop()
    typer.echo("stopped", err=True)


# -- entry point ----------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    sys.stderr.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
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
