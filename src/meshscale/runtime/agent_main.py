"""``meshscale node start``: parse the node's flags and run the agent.

The flags are declared here, once, with argparse, and ``python -m
meshscale.runtime.agent_main FLAGS`` runs a node without loading the CLI framework (typer,
click, rich and pydantic: ~12 MB of RSS per node process). ``meshscale node start`` in
``cli.py`` passes its arguments through to ``run``; ``LocalMesh`` (``meshscale up``, the
demo, the tests) starts nodes here directly.

Bad input gets one line on stderr (``meshscale: error: ...``) and exit code 2; a port that
cannot be bound exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

PROG = "meshscale"
BUNDLE_ENV = "MESHSCALE_BUNDLE"
USAGE_EXIT = 2
LATENCY_HELP = (
    "Emulated inter-region RTT, e.g. eu-west:us-east=80ms (repeat or comma-separate). "
    "Sends to a member of another region are delayed by RTT/2 in this process. For "
    "trying a geo-distributed mesh on one machine; off by default, never use in production."
)


class StartError(Exception):
    """A one-line error; ``exit_code`` 2 for bad input, 1 for failures."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise StartError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} node start", description="Run a node in the foreground (JSON "
                "log lines on stderr); SIGTERM/SIGINT leave gracefully.")
    p.add_argument("--bundle", type=Path, default=os.environ.get(BUNDLE_ENV) or None,
                   help=f"Cluster bundle directory (made by `meshscale init`) [env {BUNDLE_ENV}]")
    p.add_argument("--data-dir", type=Path, required=True,
                   help="Node data directory (identity, certificate).")
    p.add_argument("--name", help="Node name (default: the stored identity's).")
    p.add_argument("--region", default="", help="Region this node runs in.")
    p.add_argument("--zone", default="", help="Zone (failure domain) in the region.")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE label; repeat.")
    p.add_argument("--bind", default="127.0.0.1:7946",
                   help="HOST:PORT for UDP gossip and TCP (TLS) streams.")
    p.add_argument("--advertise", help="HOST:PORT other nodes reach us at (default: --bind).")
    p.add_argument("--join", action="append", default=[],
                   help="HOST:PORT of a member to join; repeat.")
    p.add_argument("--latency", action="append", default=[], help=LATENCY_HELP)
    p.add_argument("--http", help="HOST:PORT for the HTTP API, /metrics and the dashboard.")
    p.add_argument("--metrics-public", action="store_true",
                   help="Serve /metrics without the token.")
    p.add_argument("--stream-max-backlog", type=int, default=2000,
                   help="Records a stream shard holds for its slowest operator before "
                        "producers wait (backpressure).")
    return p


def parse_addr(value: str, flag: str) -> str:
    """``HOST:PORT`` normalised, or ``StartError`` naming the flag."""
    from meshscale.trust.framing import split_addr

    try:
        host, port = split_addr(value)
    except ValueError as e:
        raise StartError(f"{flag}: {e}") from None
    return f"{host}:{port}"


def parse_labels(labels: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in labels or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StartError(f"invalid --label {item!r}: use KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def start(argv: Sequence[str]) -> None:
    """Parse ``argv`` (the flags after ``node start``), build the agent and run it until
    SIGTERM/SIGINT. Raises ``StartError``."""
    args = build_parser().parse_args(list(argv))
    from meshscale.core.membership import NodeMeta
    from meshscale.runtime.identity import IdentityError, node_certificate, start_identity
    from meshscale.runtime.latency import parse_latency
    from meshscale.runtime.node import AgentConfig, NodeAgent, run_forever
    from meshscale.trust.bundle import BundleError, load_bundle
    from meshscale.trust.keyring import KeyringError
    from meshscale.trust.tls import TLSConfigError

    if args.bundle is None:
        raise StartError(f"missing --bundle DIR (or set {BUNDLE_ENV})")
    bind = parse_addr(args.bind, "--bind")
    if not 1 <= args.stream_max_backlog <= 1_000_000:
        raise StartError(f"--stream-max-backlog must be in 1..1000000, not "
                         f"{args.stream_max_backlog}")
    http = None if args.http is None else parse_addr(args.http, "--http")
    if args.metrics_public and http is None:
        raise StartError("--metrics-public needs --http HOST:PORT")
    host = bind.rpartition(":")[0]
    advertise = None
    if args.advertise is not None:
        advertise = parse_addr(args.advertise, "--advertise")
    elif host in ("0.0.0.0", "::"):
        raise StartError("--bind on a wildcard address needs --advertise HOST:PORT")
    seeds = [parse_addr(j, "--join") for j in args.join]
    try:
        emulated = parse_latency(args.latency)
    except ValueError as e:
        raise StartError(f"--latency: {e}") from None
    meta = NodeMeta(region=args.region, zone=args.zone, labels=parse_labels(args.label))
    try:
        loaded = load_bundle(args.bundle)
        identity = start_identity(args.data_dir, args.name)
        adv_host = (advertise or bind).rpartition(":")[0].strip("[]")
        hosts = list(dict.fromkeys([adv_host, "127.0.0.1", "localhost"]))
        cert_pem, key_pem = node_certificate(loaded, args.data_dir, identity.name, hosts)
        agent = NodeAgent(
            identity=identity,
            data_dir=args.data_dir,
            bundle=loaded,
            cert_pem=cert_pem,
            key_pem=key_pem,
            bind=bind,
            advertise=advertise,
            meta=meta,
            seeds=seeds,
            emulated_latency=emulated,
            agent_config=AgentConfig(http=http, metrics_public=args.metrics_public,
                                     stream_max_backlog=args.stream_max_backlog),
        )
    except (BundleError, KeyringError, IdentityError, TLSConfigError, ValueError) as e:
        raise StartError(str(e)) from None
    from meshscale.runtime.storage import StorageError

    try:
        run_forever(agent)
    except StorageError as e:  # the store under --data-dir cannot be used as it is
        raise StartError(str(e), exit_code=1) from None
    except OSError as e:
        where = bind if http is None else f"{bind} (or --http {http})"
        raise StartError(f"cannot listen on {where}: {e.strerror or e}", exit_code=1) from None


def run(argv: Sequence[str]) -> int:
    """``start`` with its errors as one line on stderr; returns the exit code."""
    try:
        start(argv)
    except StartError as e:
        message = " ".join(str(e).split())
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
        return e.exit_code
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
