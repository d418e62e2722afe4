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
from meshscale.runtime.bundle import (
    BundleError,
    init_bundle,
    issue_node_cert,
    load_bundle,
    rotate_keys,
    write_private,
    write_public,
)
from meshscale.runtime.keyring import KeyringError

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
