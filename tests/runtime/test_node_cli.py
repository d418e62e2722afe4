"""`meshscale node start` input errors, identity persistence, and the wire helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from runtime_mesh import wait_for

from meshscale.client.rpc import ClientCredentials, call
from meshscale.core.rpc import RpcRequest, decode_stream_message, encode_stream_message
from meshscale.core.wire import WireError
from meshscale.runtime.identity import IdentityError, start_identity
from meshscale.runtime.latency import format_latency, parse_latency
from meshscale.runtime.launcher import pid_alive
from meshscale.trust.bundle import init_bundle, load_bundle

MESHSCALE = Path(sys.executable).parent / "meshscale"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
    return subprocess.run(
        [str(MESHSCALE), *map(str, args)], capture_output=True, text=True, timeout=30, env=env
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshscale: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return init_bundle(tmp_path / "bundle").path


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--bind", "nonsense"], "--bind"),
        (["--bind", "127.0.0.1:99999"], "--bind"),
        (["--join", "x"], "--join"),
        (["--label", "novalue"], "--label"),
        (["--latency", "eu:us"], "--latency"),
        (["--name", "bad name!"], "invalid node name"),
        (["--bogus-flag"], "bogus"),
    ],
)
def test_bad_flags(bundle: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    base = ["node", "start", "--name", "n1", "--data-dir", tmp_path / "d", "--bundle", bundle]
    assert needle in one_line_error(cli(*base, *extra))


@pytest.mark.timeout(60)
def test_unreadable_or_missing_bundle(bundle: Path, tmp_path: Path) -> None:
    args = ["node", "start", "--name", "n1", "--data-dir", tmp_path / "d"]
    assert "--bundle" in one_line_error(cli(*args))
    one_line_error(cli(*args, "--bundle", tmp_path / "nope"))
    os.chmod(bundle / "token", 0o644)
    assert "too open" in one_line_error(cli(*args, "--bundle", bundle))


def test_identity_persists_and_bumps(tmp_path: Path) -> None:
    a = start_identity(tmp_path, "n1")
    b = start_identity(tmp_path, None)
    assert (a.name, b.name) == ("n1", "n1") and b.incarnation == a.incarnation + 1
    with pytest.raises(IdentityError, match="belongs to node 'n1'"):
        start_identity(tmp_path, "other")
    with pytest.raises(IdentityError, match="--name"):
        start_identity(tmp_path / "empty", None)


@pytest.mark.timeout(60)
def test_a_store_from_an_older_version_is_one_line_and_left_alone(
    bundle: Path, tmp_path: Path
) -> None:
    import sqlite3

    from meshscale.runtime.storage import LocalStore, StorageConfig

    store_dir = tmp_path / "d" / "store"
    store_dir.mkdir(parents=True)
    with LocalStore(store_dir, StorageConfig(min_free_bytes=0)) as s:
        oid = s.put_bytes(b"kept", now=1.0).object_id
    db = sqlite3.connect(store_dir / "meta.sqlite3")
    db.execute("PRAGMA user_version=2")  # as the BLAKE2b-id versions left it
    db.commit()
    db.close()
    args = ["node", "start", "--name", "n1", "--data-dir", tmp_path / "d", "--bundle", bundle,
            "--bind", "127.0.0.1:0"]
    result = cli(*args)
    assert result.returncode == 1, result
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("meshscale: error: ")]
    assert len(errors) == 1 and "BLAKE2b ids" in errors[0] and "Traceback" not in result.stderr
    assert [p.name for p in (store_dir / "objects").rglob("b3-*")] == [oid]


@pytest.mark.timeout(60)
def test_name_mismatch_is_a_usage_error(bundle: Path, tmp_path: Path) -> None:
    start_identity(tmp_path / "d", "n1")
    args = ["node", "start", "--name", "n2", "--data-dir", tmp_path / "d", "--bundle", bundle]
    assert "belongs to node 'n1'" in one_line_error(cli(*args))


@pytest.mark.timeout(60)
def test_sigterm_leaves_gracefully_and_saves_incarnation(bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "node.log"
    with open(log, "wb") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "meshscale", "node", "start", "--name", "solo",
             "--bind", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"),
             "--bundle", str(bundle), "--region", "eu-west", "--label", "gpu=a100"],
            stdout=f, stderr=f,
        )
    try:
        creds = ClientCredentials.from_bundle(load_bundle(bundle))
        rows = wait_for(lambda: call(f"127.0.0.1:{port}", creds, "members"), 20, "node up")
        assert rows[0]["name"] == "solo" and rows[0]["labels"] == {"gpu": "a100"}
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
    finally:
        if pid_alive(p.pid):
            p.kill()
            p.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"started", "leaving", "stopped"} <= {rec["event"] for rec in lines}
    assert all({"ts", "level", "node", "event"} <= rec.keys() for rec in lines)
    identity = json.loads((tmp_path / "d" / "identity.json").read_text())
    assert identity["incarnation"] >= 2  # started at 1, the leave bumped it


def test_latency_spec() -> None:
    table = parse_latency("eu-west:us-east=80ms, eu-west:ap=0.2s")
    assert table[("us-east", "eu-west")] == pytest.approx(0.08)
    assert table[("ap", "eu-west")] == pytest.approx(0.2)
    assert parse_latency(format_latency(table)) == table
    for bad in ("eu-west=80ms", "a:b=fast", "a:b=100s"):
        with pytest.raises(ValueError):
            parse_latency(bad)


def test_stream_message_decoding() -> None:
    msg = RpcRequest(3, "members", "tok", {"since": 1})
    assert decode_stream_message(encode_stream_message(msg), 1024) == msg
    cases = {
        b"\xc1": "malformed",
        msgspec.msgpack.encode((2, ["req", 1, "m", "t", {}])): "version",
        msgspec.msgpack.encode((1, ["nope", 1])): "unknown",
        msgspec.msgpack.encode((1, ["req", 1])): "malformed",
        b"x" * 2000: "oversized",
    }
    for data, reason in cases.items():
        with pytest.raises(WireError) as e:
            decode_stream_message(data, 1024)
        assert e.value.reason == reason
