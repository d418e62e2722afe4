"""`meshscale node start` input errors, identity persistence, and the wire helpers."""

from __future__ import annotations

import json
import os
import re
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
from meshscale.trust.bundle import Bundle, init_bundle, write_node_bundle

MESHSCALE = Path(sys.executable).parent / "meshscale"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
    return subprocess.run(
        [str(MESHSCALE), *map(str, args)], capture_output=True, text=True, timeout=30, env=env
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshscale: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def admin(tmp_path: Path) -> Bundle:
    return init_bundle(tmp_path / "admin")


@pytest.fixture
def bundle(admin: Bundle, tmp_path: Path) -> Path:
    """Node n1's bundle."""
    return write_node_bundle(admin, "n1", tmp_path / "bundle").path


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
        (["--advertise", "localhost:7946"],
         "must be an IP address, not a name (localhost resolves to 127.0.0.1)"),
        (["--bind", "localhost:0"], "--bind localhost:0: other nodes reach this one"),
        (["--bogus-flag"], "No such option: --bogus-flag"),
        (["--rpc-port", "7000"], "No such option: --rpc-port"),
        (["--cpus", "notanint"], "Invalid value for '--cpus'"),
        (["--idle-watts", "lots"], "Invalid value for '--idle-watts'"),
        (["--cpus", "0"], "--cpus must be in 1..4096, not 0"),
        (["--task-log-bytes", str(1 << 30)], "--task-log-bytes must be in 1..262144"),
        (["--energy-min-active", "eu-west"], "invalid --energy-min-active 'eu-west'"),
        (["--energy-min-active", "eu-west=many"],
         "energy_min_active.eu-west: must be a whole"),
        (["--region"], "Option '--region' requires an argument"),
        (["extra-word"], "unexpected extra argument"),
        (["--idle-watts", "300", "--peak-watts", "200"], "idle_watts: 300 W is above peak_watts"),
        (["--idle-watts", "-1"], "idle_watts: must be finite and >= 0"),
        (["--standby-watts", "50", "--idle-watts", "20"], "standby_watts: 50 W is above"),
        (["--power-source", "solar"], "power_source: 'solar' is not one of auto, rapl, model"),
        (["--power-source", "rapl", "--power-rapl-dir", "/nonexistent"],
         "power_source: rapl, but no RAPL package counter under /nonexistent"),
    ],
)
def test_bad_flags(bundle: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    base = ["node", "start", "--name", "n1", "--data-dir", tmp_path / "d", "--bundle", bundle]
    assert needle in one_line_error(cli(*base, *extra))
    assert not (tmp_path / "d").exists()  # refused before anything was made


@pytest.mark.timeout(60)
def test_help_lists_every_setting() -> None:
    """`node start --help` is the same framework's help as every other command's, and its
    options are agent_main's OPTIONS, every one of them."""
    from meshscale.runtime.agent_main import OPTIONS

    result = cli("node", "start", "--help")
    assert result.returncode == 0 and result.stderr == "", result
    assert result.stdout.startswith("Usage: meshscale node start [OPTIONS]")
    flags = set(re.findall(r"^  (--[a-z0-9-]+)", result.stdout, re.MULTILINE))
    assert {"--data-dir", "--region", "--power-source", "--label", "--config"} <= flags
    assert flags == {o.option for o in OPTIONS} | {"--config", "--help"}
    assert "[default: 127.0.0.1:7946]" in result.stdout  # --bind's default, from OPTIONS


def test_flags_of_every_kind_over_the_file_over_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The typer command's values reach agent_main's merge typed as a file gives them;
    a flag wins over the file, the file over the default; a flag not given (a bool
    flag left off, a repeatable option not repeated) leaves the file's value."""
    import meshscale.runtime.agent_main as agent_main
    from meshscale.cli import main

    got: list[agent_main.Settings] = []
    monkeypatch.setattr(agent_main, "start", got.append)
    monkeypatch.delenv("MESHSCALE_BUNDLE", raising=False)
    conf = tmp_path / "node.toml"
    conf.write_text('bundle = "b"\nregion = "us-east"\nzone = "z1"\ncpus = 3\n'
                    'no_audit = true\njoin = ["10.0.0.1:7946"]\nidle_watts = 5\n'
                    '[labels]\nsite = "file"\n')
    assert main(["node", "start", "--config", str(conf), "--region", "eu-west",
                 "--label", "gpu=a100", "--label", "rack=7", "--idle-watts", "7.5",
                 "--data-dir", "rel/d", "--metrics-public", "--http", "127.0.0.1:0"]) == 0
    s = got.pop().values
    assert s["region"] == "eu-west" and s["zone"] == "z1"  # flag over file; file
    assert s["labels"] == {"gpu": "a100", "rack": "7"}  # a table given replaces the file's
    assert s["idle_watts"] == 7.5 and s["cpus"] == 3 and s["no_audit"] is True
    assert s["join"] == ["10.0.0.1:7946"] and s["metrics_public"] is True
    assert s["bundle"] == tmp_path / "b"  # relative to the file
    assert s["data_dir"] == Path("rel/d")  # a flag's path is as given (the cwd's)
    assert s["stream_max_backlog"] == 2000 and s["power_source"] == "auto"  # defaults
    assert main(["node", "start", "--config", str(conf)]) == 0
    assert got.pop().values["labels"] == {"site": "file"}
    monkeypatch.setenv("MESHSCALE_BUNDLE", str(tmp_path / "env"))
    assert main(["node", "start", "--data-dir", "d"]) == 0
    assert got.pop().values["bundle"] == tmp_path / "env"  # env only where neither sets it
    assert main(["node", "start", "--config", str(conf)]) == 0
    assert got.pop().values["bundle"] == tmp_path / "b"


LAUNCHER = [sys.executable, "-m", "meshscale.runtime.agent_main"]


@pytest.mark.timeout(60)
def test_the_lean_launcher_takes_a_config_file_only(bundle: Path, tmp_path: Path) -> None:
    """`python -m meshscale.runtime.agent_main --config FILE` and nothing else: flags are
    `meshscale node start`'s."""
    conf = tmp_path / "node.toml"
    conf.write_text(f'bundle = "{bundle}"\ndata_dir = "d"\ncpus = 0\n')
    for argv in ([], ["--help"], ["--config"], ["--name", "n1"], ["--config=" + str(conf)],
                 ["--config", str(conf), "--region", "x"], ["-c", str(conf)]):
        result = subprocess.run([*LAUNCHER, *argv], capture_output=True, text=True,
                                timeout=30)
        line = one_line_error(result)
        assert "usage: python -m meshscale.runtime.agent_main --config FILE" in line, argv
    # The form it takes reads the file, with its checks: out of bounds is refused.
    result = subprocess.run([*LAUNCHER, "--config", str(conf)], capture_output=True,
                            text=True, timeout=30)
    assert "--cpus must be in 1..4096, not 0" in one_line_error(result)
    result = subprocess.run([*LAUNCHER, "--config", str(tmp_path / "none.toml")],
                            capture_output=True, text=True, timeout=30)
    assert "cannot read" in one_line_error(result)
    assert not (tmp_path / "d").exists()


@pytest.mark.timeout(120)
def test_a_local_mesh_node_loads_no_cli_framework(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LocalMesh's nodes run from a config file through the lean launcher: the node
    process never imports typer, click or rich (~12 MB of RSS each). Python's own import
    log (-X importtime, on stderr, in the node's log) says what it imported."""
    from meshscale.runtime.launcher import LocalMesh

    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    mesh = LocalMesh(tmp_path / "mesh", 1, http=True, node_settings={"cpus": 1})
    with mesh:
        node = mesh.nodes[0]
        config = node.config_path.read_text()
        assert 'name = "node-0"' in config and "cpus = 1" in config
        assert node.proc is not None and node.proc.args[-2:] == ["--config",
                                                                  str(node.config_path)]
    assert node.log_path is not None
    imported = {line.rpartition("|")[2].strip() for line in node.log_path.read_text()
                .splitlines() if line.startswith("import time:")}
    assert {"meshscale.runtime.node", "tomllib"} <= imported  # the log can tell
    framework = {m for m in imported if m.split(".")[0] in {"typer", "click", "rich",
                                                            "pydantic"}}
    assert not framework, sorted(framework)


@pytest.mark.timeout(60)
def test_unreadable_or_missing_bundle(bundle: Path, tmp_path: Path) -> None:
    args = ["node", "start", "--name", "n1", "--data-dir", tmp_path / "d"]
    assert "--bundle" in one_line_error(cli(*args))
    one_line_error(cli(*args, "--bundle", tmp_path / "nope"))
    os.chmod(bundle / "node.key", 0o644)
    assert "too open" in one_line_error(cli(*args, "--bundle", bundle))


@pytest.mark.timeout(60)
def test_only_a_node_bundle_starts_a_node(admin: Bundle, tmp_path: Path) -> None:
    from meshscale.trust.bundle import write_client_bundle

    args = ["node", "start", "--data-dir", tmp_path / "d", "--bind", "127.0.0.1:0"]
    line = one_line_error(cli(*args, "--bundle", admin.path))
    assert "is an admin bundle; `node start` needs a node bundle" in line
    client = write_client_bundle(admin, "c1", tmp_path / "client")
    assert "is a client bundle" in one_line_error(cli(*args, "--bundle", client.path))
    assert not (tmp_path / "d").exists()  # refused before anything was made


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('bogus = 1\n', "unknown key 'bogus'"),
        ('stream_max_backlog = "many"\n', "'stream_max_backlog' must be an integer, not str"),
        ('join = "10.0.0.1:7946"\n', "'join' must be a list of strings"),
        ('metrics_public = 1\n', "'metrics_public' must be true or false"),
        ('[labels]\nsite = 3\n', "'labels' must be a table of strings"),
        ('bind = \n', "not valid TOML"),
        ('cpus = 0\n', "--cpus must be in 1..4096"),
        ('repair_busy_max_transfers = 0\n', "--repair-busy-max-transfers must be in 1..64"),
        ('repair_busy_mb_per_s = -1.0\n', "--repair-busy-mb-per-s must be in 0..1048576"),
    ],
)
def test_a_bad_config_file_names_the_key(bundle: Path, tmp_path: Path, text: str,
                                         needle: str) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text(text)
    line = one_line_error(cli("node", "start", "--config", conf, "--bundle", bundle,
                              "--data-dir", tmp_path / "d"))
    assert needle in line
    assert not (tmp_path / "d").exists()


@pytest.mark.timeout(60)
def test_a_removed_node_does_not_start(admin: Bundle, bundle: Path, tmp_path: Path) -> None:
    from meshscale.trust.revocation import RevocationStore, sign_revocation

    assert admin.ca_key_pem is not None
    store = RevocationStore(tmp_path / "d", admin.ca_cert_pem, admin.cluster_id)
    (tmp_path / "d").mkdir()
    store.add(sign_revocation(admin.ca_key_pem, admin.cluster_id, "n1"))
    result = cli("node", "start", "--bundle", bundle, "--data-dir", tmp_path / "d",
                 "--bind", "127.0.0.1:0")
    line = one_line_error(result, code=78)
    assert "was removed from the mesh" in line and "cannot rejoin" in line


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
    # As older versions kept every object: as a file (no inline objects before schema 6).
    with LocalStore(store_dir, StorageConfig(min_free_bytes=0, inline_max_bytes=0)) as s:
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
def test_name_mismatch_is_a_usage_error(admin: Bundle, bundle: Path, tmp_path: Path) -> None:
    args = ["node", "start", "--name", "n2", "--data-dir", tmp_path / "d", "--bundle", bundle]
    assert "--name 'n2' is not the bundle's node ('n1')" in one_line_error(cli(*args))
    start_identity(tmp_path / "d", "n1")
    other = write_node_bundle(admin, "n2", tmp_path / "n2").path
    args = ["node", "start", "--data-dir", tmp_path / "d", "--bundle", other]
    assert "belongs to node 'n1'" in one_line_error(cli(*args))


@pytest.mark.timeout(60)
def test_sigterm_leaves_gracefully_and_saves_incarnation(admin: Bundle, tmp_path: Path) -> None:
    """Started from a config file plus flags: the flags win, the file fills the rest."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Relative paths in the file are relative to it; a certificate ending in 10 days.
    write_node_bundle(admin, "solo", tmp_path / "solo", days=10)
    conf = tmp_path / "node.toml"
    conf.write_text(f'bundle = "solo"\ndata_dir = "d"\nregion = "us-east"\nzone = "z9"\n'
                    f'bind = "127.0.0.1:{port}"\ncpus = 3\n[labels]\ngpu = "a100"\n')
    log = tmp_path / "node.log"
    with open(log, "wb") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "meshscale", "node", "start", "--config", str(conf),
             "--region", "eu-west"],
            stdout=f, stderr=f, cwd="/",
        )
    try:
        creds = ClientCredentials.from_bundle(admin)
        rows = wait_for(lambda: call(f"127.0.0.1:{port}", creds, "members"), 20, "node up")
        assert rows[0]["name"] == "solo" and rows[0]["labels"] == {"gpu": "a100"}
        assert (rows[0]["region"], rows[0]["zone"]) == ("eu-west", "z9")
        # `members` answers while the planes still start ("node is starting"): wait.
        stats = wait_for(lambda: call(f"127.0.0.1:{port}", creds, "task.stats"), 20,
                         "the compute plane up")
        assert stats["capacity"][0] == 3, stats
        # `members` warns of a certificate that ends within 30 days.
        listed = cli("members", "--bundle", admin.path, "--node", f"127.0.0.1:{port}")
        assert listed.returncode == 0 and "solo" in listed.stdout, listed.stderr
        assert re.search(r"warning: the certificate of node solo ends in (9|10) days; "
                         r"re-issue it with `meshscale bundle node --renew`", listed.stderr)
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
    from meshscale.core.rpc import STREAM_PROTOCOL_VERSION as V

    msg = RpcRequest(3, "members", "tok", {"since": 1})
    assert decode_stream_message(encode_stream_message(msg), 1024) == msg
    cases = {
        b"\xc1": "malformed",
        msgspec.msgpack.encode((V + 1, ["req", 1, "m", "t", {}])): "version",
        msgspec.msgpack.encode((V - 1, ["req", 1, "m", "t", {}])): "version",
        msgspec.msgpack.encode((V, ["nope", 1])): "unknown",
        msgspec.msgpack.encode((V, ["req", 1])): "malformed",
        b"x" * 2000: "oversized",
    }
    for data, reason in cases.items():
        with pytest.raises(WireError) as e:
            decode_stream_message(data, 1024)
        assert e.value.reason == reason


def test_node_config_files_round_trip_and_bad_settings_are_refused(tmp_path: Path) -> None:
    """What LocalMesh writes for a node reads back as given (any string: quotes,
    backslashes, newlines, DEL, non-ASCII; table keys that are no bare TOML key), and a
    setting that is not one, or of the wrong type or out of bounds, is refused before
    any node starts."""
    import tomllib

    from meshscale.runtime.agent_main import StartError, read_config, to_toml
    from meshscale.runtime.launcher import LocalMesh

    odd = 'a "q" \\ b\nc\td\x7f é 😀'
    values = {"region": odd, "cpus": 3, "idle_watts": 1e-05, "no_audit": True,
              "join": ["10.0.0.1:7946", odd], "labels": {"a.b c": odd, "": "empty key"},
              "energy_min_active": {"eu-west": "2"}, "data_dir": str(tmp_path / "d")}
    text = to_toml(values)
    assert tomllib.loads(text) == values
    conf = tmp_path / "node.toml"
    conf.write_text(text)
    assert read_config(conf)["labels"] == values["labels"]
    with pytest.raises(StartError, match="unknown key 'rpc_port'"):
        to_toml({"rpc_port": 1})
    for bad, needle in (({"rpc_port": 1}, "unknown key 'rpc_port'"),
                        ({"cpus": "2"}, "'cpus' must be an integer, not str"),
                        ({"no_audit": 1}, "'no_audit' must be true or false"),
                        ({"cpus": 0}, "--cpus must be in 1..4096, not 0")):
        with pytest.raises(ValueError, match=needle):
            LocalMesh(tmp_path / "m", 2, node_settings=bad)
    assert not (tmp_path / "m").exists()
