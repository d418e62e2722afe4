"""The `meshscale` command, run as a user runs it: a subprocess of the installed script."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from meshscale.trust.bundle import load_bundle

MESHSCALE = Path(sys.executable).parent / "meshscale"


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
    return subprocess.run(
        [str(MESHSCALE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshscale: error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bundle"
    result = cli("init", path)
    assert result.returncode == 0, result.stderr
    return path


def test_script_is_installed() -> None:
    assert MESHSCALE.exists()


def test_init_makes_the_files(bundle_dir: Path) -> None:
    for name in ("bundle.json", "ca.pem", "ca.key", "keyring.json", "token"):
        assert (bundle_dir / name).is_file()
    for name in ("ca.key", "keyring.json", "token"):
        assert stat.S_IMODE((bundle_dir / name).stat().st_mode) == 0o600
    load_bundle(bundle_dir)


def test_init_refuses_existing_then_force(bundle_dir: Path) -> None:
    before = load_bundle(bundle_dir).cluster_id
    line = assert_one_line_error(cli("init", bundle_dir))
    assert "--force" in line
    assert cli("init", bundle_dir, "--force").returncode == 0
    assert load_bundle(bundle_dir).cluster_id != before


@pytest.mark.parametrize(
    "args",
    [
        ("init", "--nope", "x"),
        ("--bogus",),
        ("no-such-command",),
        ("init",),
        ("token",),  # no --bundle and no MESHSCALE_BUNDLE
        ("cert", "issue", "--bundle", "x"),
        ("cert", "issue", "--bundle", "x", "--name", "n", "--out", "o", "--days", "zero"),
        ("keys", "frobnicate"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    assert_one_line_error(cli(*args))


def test_no_command_prints_help_and_one_error_line() -> None:
    result = cli()
    assert_one_line_error(result)
    assert "Usage:" in result.stdout


def test_help_exits_0() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "init" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("command", [("token",), ("keys", "list"), ("keys", "rotate")])
def test_missing_bundle_dir(tmp_path: Path, command: tuple[str, ...]) -> None:
    line = assert_one_line_error(cli(*command, "--bundle", tmp_path / "nope"))
    assert "nope" in line


def test_broken_bundle_names_the_file(bundle_dir: Path) -> None:
    (bundle_dir / "keyring.json").write_text("{oops")
    line = assert_one_line_error(cli("token", "--bundle", bundle_dir))
    assert "keyring.json" in line


def test_empty_dir_is_not_a_bundle(tmp_path: Path) -> None:
    line = assert_one_line_error(cli("token", "--bundle", tmp_path))
    assert "bundle.json" in line


def test_token_prints_the_token(bundle_dir: Path) -> None:
    result = cli("token", "--bundle", bundle_dir)
    assert result.returncode == 0
    assert result.stdout.strip() == load_bundle(bundle_dir).token


def test_bundle_from_environment(bundle_dir: Path) -> None:
    result = cli("token", env={"MESHSCALE_BUNDLE": str(bundle_dir)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == load_bundle(bundle_dir).token


def test_keys_rotate_changes_the_primary(bundle_dir: Path) -> None:
    before = load_bundle(bundle_dir).keyring
    listed = cli("keys", "list", "--bundle", bundle_dir).stdout.split()
    assert listed == [before.primary_id, "primary"]
    result = cli("keys", "rotate", "--bundle", bundle_dir)
    assert result.returncode == 0, result.stderr
    after = load_bundle(bundle_dir).keyring
    assert after.primary != before.primary
    assert before.primary in after.accepted
    assert after.primary_id in result.stdout
    listed = cli("keys", "list", "--bundle", bundle_dir).stdout.split()
    assert listed == [after.primary_id, "primary", before.primary_id, "accepted"]


def test_bundle_node_and_client(bundle_dir: Path, tmp_path: Path) -> None:
    node_dir, client_dir = tmp_path / "edge-1", tmp_path / "alice"
    result = cli("bundle", "node", "--bundle", bundle_dir, "--name", "edge-1",
                 "--host", "10.0.0.7", "--host", "edge-1.local", "--out", node_dir)
    assert result.returncode == 0, result.stderr
    assert "edge-1" in result.stdout and "valid until" in result.stdout
    node = load_bundle(node_dir)
    assert node.kind == "node" and node.name == "edge-1" and node.ca_key_pem is None
    cert = x509.load_pem_x509_certificate((node_dir / "node.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((bundle_dir / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert stat.S_IMODE((node_dir / "node.key").stat().st_mode) == 0o600
    # Refuses to overwrite without --force; --renew re-issues in place.
    again = cli("bundle", "node", "--bundle", bundle_dir, "--name", "edge-1", "--out", node_dir)
    assert "--force" in assert_one_line_error(again)
    renewed = cli("bundle", "node", "--bundle", bundle_dir, "--name", "edge-1", "--out",
                  node_dir, "--renew")
    assert renewed.returncode == 0 and "renewed" in renewed.stdout, renewed.stderr
    assert load_bundle(node_dir).cert.serial != node.cert.serial
    result = cli("bundle", "client", "--bundle", bundle_dir, "--name", "alice", "--read-only",
                 "--out", client_dir)
    assert result.returncode == 0, result.stderr
    assert load_bundle(client_dir).role == "read-only"
    # The token command prints a client bundle's own token.
    assert cli("token", "--bundle", client_dir).stdout.strip() == \
        load_bundle(bundle_dir).read_only_token


def test_bundle_bad_input(bundle_dir: Path, tmp_path: Path) -> None:
    result = cli("bundle", "node", "--bundle", bundle_dir, "--name", "../x", "--out", tmp_path)
    assert "invalid node name" in assert_one_line_error(result)
    result = cli("bundle", "node", "--bundle", bundle_dir, "--name", "n", "--host", "bad host",
                 "--out", tmp_path / "n")
    assert "invalid host" in assert_one_line_error(result)
    cli("bundle", "client", "--bundle", bundle_dir, "--name", "c", "--out", tmp_path / "c")
    # Only the admin bundle makes bundles: a client bundle cannot.
    result = cli("bundle", "node", "--bundle", tmp_path / "c", "--name", "n", "--out",
                 tmp_path / "n2")
    assert "is a client bundle" in assert_one_line_error(result)
    (bundle_dir / "ca.key").unlink()
    result = cli("bundle", "node", "--bundle", bundle_dir, "--name", "n1", "--out", tmp_path / "x")
    assert "ca.key" in assert_one_line_error(result)


def test_node_config_example_is_valid_toml() -> None:
    import tomllib

    result = cli("node", "config-example")
    assert result.returncode == 0, result.stderr
    values = tomllib.loads(result.stdout)
    assert values["bind"] == "127.0.0.1:7946" and values["stream_max_backlog"] == 2000
    for key in ("data_dir", "bundle", "join", "advertise", "cpus", "labels", "http"):
        assert key in result.stdout, key


def test_node_remove_needs_the_admin_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    cli("bundle", "client", "--bundle", bundle_dir, "--name", "c", "--out", tmp_path / "c")
    result = cli("node", "remove", "n1", "--bundle", tmp_path / "c", "--node", "127.0.0.1:1")
    assert "is a client bundle" in assert_one_line_error(result)
    result = cli("node", "remove", "bad name", "--bundle", bundle_dir)
    assert "invalid node name" in assert_one_line_error(result)


def test_no_node_listening_is_exit_3(bundle_dir: Path, tmp_path: Path) -> None:
    """Exit codes: 3 when nothing answers at the address, for the typed calls and for the
    data-plane commands alike (2 stays for bad input, 1 for not found)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    addr = f"127.0.0.1:{port}"
    client = tmp_path / "client"
    assert cli("bundle", "client", "--bundle", bundle_dir, "--name", "c",
               "--out", client).returncode == 0
    for args in (["members"], ["objects"], ["kv", "get", "k"], ["energy"]):
        line = assert_one_line_error(cli(*args, "--node", addr, "--bundle", client,
                                         "--timeout", "5"), code=3)
        assert addr in line, line
    # Bad input stays 2, whatever the network.
    assert_one_line_error(cli("get", "b3-xyz", "-o", tmp_path / "o", "--node", addr,
                              "--bundle", client), code=2)
