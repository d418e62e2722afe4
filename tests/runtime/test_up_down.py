"""`meshscale up --detach` / `meshscale down`, the temporary directory of a plain `up`, and
every client command given `--mesh DIR/mesh.json` (or MESHSCALE_MESH) in place of
`--node` and `--bundle`."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_mesh import wait_for

from meshscale.runtime.launcher import pid_alive

MESHSCALE = Path(sys.executable).parent / "meshscale"


def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MESHSCALE_BUNDLE", "MESHSCALE_MESH")}
    return subprocess.run([str(MESHSCALE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


@pytest.mark.timeout(240)
def test_detach_then_every_command_by_mesh_file_then_down(tmp_path: Path) -> None:
    up = cli("up", "--nodes", "2", "--base-port", "0", "--detach", "--timeout", "60",
             "--metrics-public")
    assert up.returncode == 0, up.stderr
    m = re.search(r"meshscale down --dir (\S+)", up.stdout)
    assert m, up.stdout
    directory = Path(m.group(1))
    mesh_json = directory / "mesh.json"
    info = json.loads(mesh_json.read_text())
    pids = [n["pid"] for n in info["nodes"]]
    try:
        assert info["temporary"] is True and all(pid_alive(p) for p in pids)
        # Traversable by the nodes' task workers, as /var/lib is (local inputs are linked
        # for them, not piped by value), not listable; the bundles stay the operator's.
        assert stat.S_IMODE(directory.stat().st_mode) == 0o711
        for bundle in (info["admin_bundle"], info["bundle"]):
            assert stat.S_IMODE(Path(bundle).stat().st_mode) == 0o700, bundle
        assert f"export MESHSCALE_MESH={mesh_json}" in up.stdout
        # Prometheus file_sd targets beside mesh.json, and /metrics open to a scraper.
        targets = json.loads((directory / "prometheus-targets.json").read_text())
        assert sorted(t["labels"]["node"] for t in targets) == ["node-0", "node-1"]
        assert sorted(a for t in targets for a in t["targets"]) == sorted(
            n["http"] for n in info["nodes"])
        import urllib.request

        with urllib.request.urlopen(f"http://{targets[0]['targets'][0]}/metrics",
                                    timeout=30) as r:
            assert r.status == 200 and b"meshscale_members" in r.read()
        # Every client command, by --mesh alone.
        members = cli("members", "--mesh", mesh_json, "--json")
        assert members.returncode == 0, members.stderr
        assert sorted(r["name"] for r in json.loads(members.stdout)) == ["node-0", "node-1"]
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(5000))
        put = cli("put", src, "--mesh", mesh_json, "--replicas", "2", "--w", "2")
        assert put.returncode == 0, put.stderr
        oid = put.stdout.strip().splitlines()[-1]
        got = cli("get", oid, "-o", tmp_path / "out.bin", "--mesh", mesh_json)
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        assert oid in cli("objects", "--mesh", mesh_json).stdout
        # A unique prefix works wherever an id does; a short or unknown one is refused.
        got = cli("get", oid[:12], "-o", tmp_path / "by-prefix.bin", "--mesh", mesh_json)
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "by-prefix.bin").read_bytes() == src.read_bytes()
        short = cli("get", oid[:6], "-o", "-", "--mesh", mesh_json)
        assert short.returncode == 2 and "unique prefix of at least 6" in short.stderr
        other = "b3-" + ("0" if oid[3] != "0" else "1") * 10
        unknown = cli("get", other, "-o", "-", "--mesh", mesh_json)
        assert unknown.returncode == 1 and f"no object id starts with {other}" in unknown.stderr
        absent = cli("get", "b3-" + "0" * 64, "-o", tmp_path / "absent", "--mesh", mesh_json)
        assert absent.returncode == 1 and "b3-" + "0" * 64 in absent.stderr, absent
        # ... and by MESHSCALE_MESH.
        env = {"MESHSCALE_MESH": str(mesh_json)}
        assert cli("kv", "put", "k", "v1", env=env).returncode == 0
        assert cli("kv", "get", "k", env=env).stdout.strip() == "v1"
        got = json.loads(cli("kv", "get", "k", "--json", env=env).stdout)
        assert got.pop("version")  # what `kv put --expected` names
        assert got == {"key": "k", "value": "v1"}
        assert cli("kv", "delete", "k", env=env).returncode == 0
        assert cli("tasks", env=env).returncode == 0
        assert cli("delete", oid[:16], env=env).returncode == 0
        # A second `up` on the same directory refuses while it runs.
        again = cli("up", "--nodes", "2", "--base-port", "0", "--dir", directory)
        assert again.returncode == 2 and "still running" in again.stderr, again
        # A mesh.json that is not one: one line, exit 2.
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        wrong = cli("members", "--mesh", bad)
        assert wrong.returncode == 2 and "not a mesh.json" in wrong.stderr
    finally:
        down = cli("down", "--dir", directory)
    assert down.returncode == 0, down.stderr
    assert "stopped 2 node(s)" in down.stdout
    wait_for(lambda: not any(pid_alive(p) for p in pids), 20, "every node process gone")
    assert not directory.exists()


@pytest.mark.timeout(180)
def test_a_plain_up_removes_its_temporary_directory() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
    env["PYTHONFAULTHANDLER"] = "1"  # a hang below dumps every thread's stack (SIGABRT)
    p = subprocess.Popen([str(MESHSCALE), "up", "--nodes", "1", "--base-port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        assert p.stderr is not None and p.stdout is not None
        first = p.stderr.readline()
        m = re.match(r"starting 1 nodes in (\S+)", first)
        assert m, first
        directory = Path(m.group(1))
        for line in p.stdout:  # bounded by the test's timeout
            if "Ctrl-C to stop" in line:
                break
        else:
            raise AssertionError(f"up exited ({p.wait()}): {p.stderr.read()[-2000:]}")
        assert directory.exists()
        os.killpg(p.pid, signal.SIGTERM)
        try:
            code = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGABRT)
            p.wait()
            raise AssertionError(f"up did not stop on SIGTERM: {p.stderr.read()[-6000:]}"
                                 ) from None
        assert code == 0, p.stderr.read()[-2000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert not directory.exists()
