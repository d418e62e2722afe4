"""A local mesh of real node processes on 127.0.0.1 (``meshscale up``, tests, benchmarks).

``LocalMesh`` makes a throw-away admin bundle (``admin/``), a node bundle per node
(``bundles/node-i``), an admin client bundle (``client/``, what users of this mesh connect
with) and one data dir per node under its directory, writes a config file per node
(``nodes/node-i.toml``) and runs ``python -m meshscale.runtime.agent_main --config`` on
it (the agent without the CLI framework; node 0 is the seed the others join; node i
listens on base_port + i, UDP and TCP, and serves HTTP on a second run of free
ports, http_base + i), waits until every node sees every other alive, and writes
``mesh.json`` (each node's address and HTTP address). ``stop()`` sends SIGTERM to every
node it started, waits, then SIGKILLs stragglers. Children run in their own session (a Ctrl-C in the terminal
reaches only the launcher, which stops them in order) and, on Linux, get SIGTERM from the
kernel if the launcher itself dies (PR_SET_PDEATHSIG), so no node outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from meshscale.core.api import Empty, ErrorCode
from meshscale.core.api.node import MEMBERS
from meshscale.core.api.streams import STATS as STREAM_STATS
from meshscale.runtime.latency import RegionPair, format_latency
from meshscale.transport.credentials import Credentials
from meshscale.transport.rpc import ClientCredentials, RemoteError, RpcConnection, RpcError
from meshscale.trust.bundle import (
    init_bundle,
    load_bundle,
    write_client_bundle,
    write_node_bundle,
    write_public,
)

DEFAULT_REGIONS = ("eu-west", "us-east")
ZONES_PER_REGION = 3
MAX_ZONES_PER_REGION = 64
"""Largest ``zones_per_region`` (a region with fewer nodes uses as many zones as nodes)."""
HOST = "127.0.0.1"


@dataclass
class NodeProcess:
    name: str
    region: str
    zone: str
    port: int
    data_dir: Path
    bundle_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    http_port: int | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        """The node's config file, beside its data dir (``node_command`` writes it)."""
        return self.data_dir.parent / f"{self.name}.toml"

    @property
    def http(self) -> str | None:
        """HOST:PORT of the node's HTTP API and dashboard, if it serves one."""
        return None if self.http_port is None else f"{HOST}:{self.http_port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region": self.region,
            "zone": self.zone,
            "address": self.address,
            "http": self.http,
            "pid": self.proc.pid if self.proc is not None else None,
            "data_dir": str(self.data_dir),
            "bundle": str(self.bundle_dir),
            "config": str(self.config_path.absolute()),
        }


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                return False
    return True


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_ports() -> range:
    """The ports the kernel hands to outgoing connections (Linux's default when unknown)."""
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return range(lo, hi + 1)


def find_free_base_port(
    n: int, start: int = 20000, end: int = 60000, avoid: range | None = None
) -> int:
    """A base port P such that P..P+n-1 are free for both TCP and UDP right now (and, given
    ``avoid``, none of them in it). Outside the kernel's ephemeral range when there is room
    below it: a port found free there can be taken by any outgoing connection's local port
    before the node binds it (seen as a node exiting at startup with "address already in
    use" while other meshes on the machine were busy)."""
    import random

    eph = ephemeral_ports()
    if start < eph.start and eph.start - start > 4 * n:
        end = min(end, eph.start)
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(start, end - n)
        if avoid is not None and base < avoid.stop and avoid.start < base + n:
            continue
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise OSError(f"no run of {n} free ports found")


def node_command(
    node: NodeProcess,
    seeds: list[str],
    latency: str = "",
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``node``'s config file (``config_path``: its name, region, zone, addresses,
    data dir and bundle, ``seeds``, ``latency``, then the ``extra`` settings, keys of
    agent_main's ``OPTIONS``) and return the command that runs it: the agent's own entry
    point, which takes that file and no flags, so no node process loads the CLI
    framework."""
    from meshscale.runtime.agent_main import StartError, to_toml

    values: dict[str, Any] = {
        "name": node.name,
        "region": node.region,
        "zone": node.zone,
        "bind": node.address,
        "data_dir": str(node.data_dir.absolute()),
        "bundle": str(node.bundle_dir.absolute()),
        "join": list(seeds),
    }
    if latency:
        values["latency"] = [latency]
    if node.http is not None:
        values["http"] = node.http
    values.update(extra or {})
    try:
        text = to_toml(values)
    except StartError as e:
        raise ValueError(str(e)) from None
    node.config_path.parent.mkdir(parents=True, exist_ok=True)
    node.config_path.write_text(text)
    return [sys.executable, "-m", "meshscale.runtime.agent_main", "--config",
            str(node.config_path.absolute())]


def mesh_temp_dir(prefix: str) -> Path:
    """A new temporary directory for a local mesh, traversable (0711) by the worker user
    as a node's data dir on a host is (/var/lib): a node run as root then links local
    input objects for its task workers (``runtime/isolation.py``) instead of reading and
    piping their bytes, which it must below a 0700 temp dir. Only names known inside are
    reachable: bundles are 0700 and secrets 0600 (``trust.bundle``). The caller removes
    it."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


@contextlib.contextmanager
def temporary_mesh_dir(prefix: str) -> Iterator[Path]:
    """``mesh_temp_dir``, removed on exit."""
    import shutil

    path = mesh_temp_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spawn_node(cmd: list[str], log_path: Path, *, detach: bool = False
               ) -> subprocess.Popen[bytes]:
    """Start one node process; its stdout and stderr go to ``log_path`` (mode 0600: a
    node log is for its operator). Unless ``detach``, the node gets SIGTERM when the
    process that started it dies (Linux PDEATHSIG, which fires when the spawning *thread*
    ends: spawn from a thread that lives as long as the node should, or detach)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        env = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
        env["PYTHONUNBUFFERED"] = "1"
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            preexec_fn=None if detach else _set_pdeathsig,
        )


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every process, wait up to ``timeout``, then SIGKILL the stragglers."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


class LocalMesh:
    def __init__(
        self,
        directory: Path,
        nodes: int,
        *,
        regions: list[str] | None = None,
        latency: dict[RegionPair, float] | None = None,
        base_port: int = 0,
        node_settings: Mapping[str, Any] | None = None,
        converge_timeout_s: float = 60.0,
        http: bool = True,
        zones_per_region: int = ZONES_PER_REGION,
    ) -> None:
        if nodes < 1:
            raise ValueError("--nodes must be at least 1")
        if not 1 <= zones_per_region <= MAX_ZONES_PER_REGION:
            raise ValueError(f"zones_per_region must be in 1..{MAX_ZONES_PER_REGION}, got "
                             f"{zones_per_region}")
        self.directory = Path(directory)
        self.n = nodes
        self.regions = list(regions or DEFAULT_REGIONS)
        self.zones_per_region = zones_per_region
        """Each region's nodes are dealt round-robin over this many zones (``R-z1`` ..)."""
        self.latency = dict(latency or {})
        self.base_port = base_port or find_free_base_port(nodes)
        if not 1 <= self.base_port <= 65535 - nodes + 1:
            raise ValueError(f"--base-port {self.base_port} leaves no room for {nodes} nodes")
        self.node_settings = dict(node_settings or {})
        """Settings every node gets (keys of agent_main's ``OPTIONS``, values as a TOML
        file has them: ``{"cpus": 2, "no_audit": True}``), in its config file."""
        self.converge_timeout_s = converge_timeout_s
        # Node i serves HTTP on H+i, a second run of free ports.
        ports = range(self.base_port, self.base_port + nodes)
        http_base = find_free_base_port(nodes, avoid=ports) if http else None
        self.admin_path = self.directory / "admin"
        """The admin bundle (CA key): only ``start`` and ``node remove`` use it."""
        self.bundle_path = self.directory / "client"
        """The admin client bundle users of this mesh connect with (no CA key)."""
        self.nodes: list[NodeProcess] = []
        per_region: dict[str, int] = {}
        for i in range(nodes):
            region = self.regions[i % len(self.regions)]
            k = per_region.get(region, 0)
            per_region[region] = k + 1
            zone = f"{region}-z{k % zones_per_region + 1}"
            self.nodes.append(
                NodeProcess(
                    name=f"node-{i}",
                    region=region,
                    zone=zone,
                    port=self.base_port + i,
                    data_dir=self.directory / "nodes" / f"node-{i}",
                    bundle_dir=self.directory / "bundles" / f"node-{i}",
                    http_port=None if http_base is None else http_base + i,
                )
            )

        self._check_energy_minimums()

    def _check_energy_minimums(self) -> None:
        """With consolidation asked for in ``node_settings``: refuse minimums of active
        nodes that this mesh's regions or zones cannot meet (``ValueError`` naming the
        key); here, unlike at one node's start, the whole topology is known. A bad
        setting of any kind is refused here too."""
        from meshscale.core.capacity import CapacityConfigError, check_minimums
        from meshscale.runtime.agent_main import StartError, energy_settings, merge, to_toml

        try:
            to_toml(self.node_settings)
            given = merge(self.node_settings)
            if not any(k.startswith("energy") for k in self.node_settings):
                return
            cfg = energy_settings(given).config
        except StartError as e:
            raise ValueError(str(e)) from None
        if cfg.mode == "off":
            return
        zones: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            per_zone = zones.setdefault(n.region, {})
            per_zone[n.zone] = per_zone.get(n.zone, 0) + 1
        try:
            check_minimums(cfg, zones)
        except CapacityConfigError as e:
            raise ValueError(str(e).replace("energy.min_active_by_region.",
                                            "energy_min_active.").replace("energy.",
                                                                          "energy_")) from None

    @property
    def mesh_json(self) -> Path:
        return self.directory / "mesh.json"

    def make_bundles(self) -> None:
        """The admin bundle, a node bundle per node and the client bundle (each made once:
        a restarted mesh reuses them)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.admin_path / "bundle.json").exists():
            init_bundle(self.admin_path)
        admin = load_bundle(self.admin_path)
        for node in self.nodes:
            if not (node.bundle_dir / "bundle.json").exists():
                write_node_bundle(admin, node.name, node.bundle_dir,
                                  hosts=[HOST, "localhost"])
        if not (self.bundle_path / "bundle.json").exists():
            write_client_bundle(admin, "local-admin", self.bundle_path)

    def start(self, *, detach: bool = False) -> None:
        """Start every node; ``detach``: they outlive this process (``up --detach``)."""
        self.make_bundles()
        seed = self.nodes[0].address
        spec = format_latency(self.latency)
        for i, node in enumerate(self.nodes):
            cmd = node_command(node, [] if i == 0 else [seed], spec, self.node_settings)
            node.log_path = node.data_dir.parent / f"{node.name}.log"
            node.proc = spawn_node(cmd, node.log_path, detach=detach)
        self.write_mesh_json()

    @property
    def targets_json(self) -> Path:
        """Prometheus ``file_sd`` targets: every node's HTTP address (``/metrics``)."""
        return self.directory / "prometheus-targets.json"

    def write_mesh_json(self, **extra: Any) -> None:
        data = {"bundle": str(self.bundle_path), "admin_bundle": str(self.admin_path),
                **extra, "nodes": [n.to_json() for n in self.nodes]}
        write_public(self.mesh_json, (json.dumps(data, indent=2) + "\n").encode())
        targets = [{"targets": [n.http], "labels": {"job": "meshscale", "node": n.name,
                                                     "region": n.region, "zone": n.zone}}
                   for n in self.nodes if n.http]
        write_public(self.targets_json, (json.dumps(targets, indent=2) + "\n").encode())

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [n.proc for n in self.nodes if n.proc is not None]

    def exited(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is not None]

    def stop(self, timeout: float = 10.0) -> None:
        stop_processes(self.processes(), timeout)

    def __enter__(self) -> LocalMesh:
        """``with LocalMesh(...) as m``: started and converged (``converge_timeout_s``)."""
        self.start()
        try:
            self.wait_converged(self.converge_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every node, then check that no node process, and no worker process of
        one, outlived it (workers exit when their node does: PDEATHSIG)."""
        workers = children_of({p.pid for p in self.processes() if p.poll() is None})
        self.stop()
        left = [n.name for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        deadline = time.monotonic() + 10.0
        while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        stray = sorted(w for w in workers if pid_alive(w))
        if (left or stray) and not any(exc):
            raise RuntimeError(f"processes outlived the mesh: nodes {left}, workers {stray}")

    def credentials(self) -> ClientCredentials:
        return ClientCredentials.from_bundle(load_bundle(self.bundle_path))

    def node_credentials(self, i: int) -> Credentials:
        """Node ``i``'s own credentials: for tests that call node-to-node methods."""
        return Credentials.for_node(load_bundle(self.nodes[i].bundle_dir))

    def wait_converged(
        self, timeout: float, cancelled: Callable[[], bool] | None = None
    ) -> list[dict[str, Any]]:
        """Wait until every node sees all N alive and serves every plane (``serving``);
        returns node 0's members."""
        addresses = [n.address for n in self.nodes]
        return asyncio.run(
            wait_converged(addresses, self.credentials(), timeout, self.exited, cancelled)
        )


def children_of(parents: set[int]) -> set[int]:
    """Live processes whose parent is one of ``parents`` (Linux /proc; empty elsewhere)."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after the ")".
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and int(fields[1]) in parents:
                out.add(int(entry))
    return out


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] != "Z"


class Interrupted(Exception):
    """Waiting was cancelled (the launcher got a signal)."""


async def views(conns: list[RpcConnection]) -> list[list[dict[str, Any]] | None]:
    async def one(c: RpcConnection) -> list[dict[str, Any]] | None:
        try:
            rows = await c.request(MEMBERS, Empty())
            return [msgspec.to_builtins(r) for r in rows]
        except RpcError:
            return None

    return list(await asyncio.gather(*(one(c) for c in conns)))


async def serving(conns: list[RpcConnection]) -> list[bool]:
    """Whether each node serves every plane: a node answers ``STARTING`` to any method
    its planes do not serve yet, and the stream plane starts last (a node without planes
    answers "unknown method" once it is up, which counts as serving)."""
    async def one(c: RpcConnection) -> bool:
        try:
            await c.request(STREAM_STATS, Empty())
            return True
        except RemoteError as e:
            return e.code != ErrorCode.STARTING
        except RpcError:
            return False

    return list(await asyncio.gather(*(one(c) for c in conns)))


async def wait_converged(
    addresses: list[str],
    creds: ClientCredentials,
    timeout: float,
    exited: Callable[[], list[NodeProcess]] | None = None,
    cancelled: Callable[[], bool] | None = None,
    poll_s: float = 0.2,
) -> list[dict[str, Any]]:
    n = len(addresses)
    conns = [RpcConnection(a, creds, timeout=2.0) for a in addresses]
    deadline = time.monotonic() + timeout
    try:
        while True:
            if cancelled is not None and cancelled():
                raise Interrupted
            if exited is not None and exited():
                names = ", ".join(x.name for x in exited())
                raise RuntimeError(f"node process exited during startup: {names}")
            vs = await views(conns)
            if all(v is not None and sum(1 for m in v if m["state"] == "alive") == n
                   for v in vs) and all(await serving(conns)):
                first = vs[0]
                assert first is not None
                return first
            if time.monotonic() > deadline:
                raise TimeoutError(f"the mesh did not converge to {n} alive nodes in {timeout:g}s")
            await asyncio.sleep(poll_s)
    finally:
        for c in conns:
            await c.close()
