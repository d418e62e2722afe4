"""The multi-host bed: 6 nodes in 3 sites, each node in its own network namespace with
its own address, started the way deploy/README.md says (node bundles from an admin
bundle, `meshscale node start --config node.toml`, seeds by address), plus one client
host per site holding a client bundle. Skipped, with the reason, without root, ``ip`` or
``nft`` (see tests/needs.py).
"""

from __future__ import annotations

import array
import collections
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from needs import require_tools

HERE = Path(__file__).resolve().parent
MESHSCALE = str(Path(sys.executable).parent / "meshscale")
SITES = {"factory": "eu-west", "shop": "eu-central", "cloud": "us-east"}
PORT = 7946


class NsClient:
    """``nsclient.py`` running in a client host: requests in, JSON answers out.

    An answer is read from the pipe with a deadline on the whole line (a client that
    wrote part of a line and stalled fails the call, it does not hang the test); a call
    past its deadline dumps the client's threads into its log (SIGUSR1, see nsclient.py),
    quotes them in the failure and starts a fresh client for the calls after it."""

    def __init__(self, host: Any, bundle: Path, log: Path) -> None:
        self.host = host
        self.bundle = bundle
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            self.host.command([sys.executable, str(HERE / "nsclient.py"), str(self.bundle)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.log, "ab"),  # noqa: SIM115
            start_new_session=True)
        self.host.procs.append(self.proc)
        self._buf = b""
        self._trace: collections.deque[str] = collections.deque(maxlen=40)

    def __call__(self, op: str, deadline_s: float = 90, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}).encode() + b"\n")
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        self._trace.append(f"{time.time():.3f} sent {op} {kw.get('id') or kw.get('method') or ''}"
                           f" (buffered {len(self._buf)})")
        deadline = time.monotonic() + deadline_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                self._stuck(op, deadline_s)
            chunk = os.read(fd, 1 << 16)
            self._trace.append(f"{time.time():.3f} read {len(chunk)}")
            if not chunk:
                raise AssertionError(f"client in {self.host.name} exited ({self.proc.poll()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        self._trace.append(f"{time.time():.3f} line {len(line)} (left {len(self._buf)})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _stuck(self, op: str, timeout: float) -> None:
        assert self.proc.stdout is not None
        waiting = array.array("i", [0])
        fcntl.ioctl(self.proc.stdout.fileno(), termios.FIONREAD, waiting)
        with contextlib.suppress(OSError):
            os.kill(self.proc.pid, signal.SIGUSR1)  # nsclient dumps its threads to the log
        with contextlib.suppress(AssertionError):  # no dump: the log as it is
            wait_until(lambda: b"most recent call first" in self.log.read_bytes(), 5,
                       "the client's thread dump", poll=0.1)
        tail = self.log.read_bytes()[-6000:].decode(errors="replace")
        self.proc.kill()
        self.proc.wait(timeout=10)
        calls = "\n".join(self._trace)
        got = len(self._buf)
        self._start()
        raise AssertionError(
            f"client in {self.host.name}: no whole answer to {op} in {timeout:g}s ({got} "
            f"bytes of it read, {waiting[0]} more in the pipe); the calls:\n{calls}\n"
            f"its log and threads:\n{tail}")

    def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
             timeout: float = 5) -> Any:
        # The RPC's own timeout goes to the client; the pipe waits longer than that.
        answer = self("call", deadline_s=timeout + 30, addr=addr, method=method,
                      args=args or {}, timeout=timeout)
        if not answer["ok"]:
            raise RuntimeError(f"{method} via {addr}: {answer['error']}")
        return answer["result"]


def cli(*args: str | Path, host: Any = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    argv = [MESHSCALE, *map(str, args)]
    if host is not None:
        return host.run(argv, timeout=timeout)  # type: ignore[no-any-return]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@dataclass
class Node:
    name: str
    host: Any
    bundle: Path
    config: Path
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host.ip}:{PORT}"

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = self.host.popen([MESHSCALE, "node", "start", "--config", str(self.config)],
                                    self.log)
        return self.proc


@dataclass
class Sites:
    lab: Any
    root: Path
    admin: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    clients: dict[str, NsClient] = field(default_factory=dict)
    """Site -> the client host of that site."""
    client_bundle: Path = Path()

    def live(self, skip: tuple[str, ...] = ()) -> list[Node]:
        return [n for n in self.nodes.values() if n.name not in skip]

    def view(self, via: str, node: Node) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.clients[via].call(node.addr, "members")}

    def site_of(self, node: Node) -> str:
        return str(node.host.site)


def wait_until(cond: Any, timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
        except (RuntimeError, AssertionError, KeyError) as e:
            last = e
        if last and not isinstance(last, BaseException):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} "
                                 f"(last: {last!r})")
        time.sleep(poll)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    require_tools("ip", "nft", what="the multi-host tests", root=True)
    from netlab import NetLab

    root = tmp_path_factory.mktemp("hosts")
    admin = root / "admin"
    assert cli("init", admin).returncode == 0
    with NetLab() as lab:
        s = Sites(lab, root, admin)
        layout = [(site, i) for site in SITES for i in (1, 2)]
        hosts = {f"{site}-{i}": lab.add_host(f"{site}-{i}", site) for site, i in layout}
        client_hosts = {site: lab.add_host(f"{site}-client", site) for site in SITES}
        seeds = [hosts["factory-1"].ip, hosts["shop-1"].ip, hosts["cloud-1"].ip]
        for name, host in hosts.items():
            bundle = root / "bundles" / name
            made = cli("bundle", "node", "--bundle", admin, "--name", name, "--host", host.ip,
                       "--out", bundle)
            assert made.returncode == 0, made.stderr
            site = host.site
            conf = root / "conf" / f"{name}.toml"
            conf.parent.mkdir(exist_ok=True)
            join = [f"{ip}:{PORT}" for ip in seeds if ip != host.ip]
            conf.write_text(
                f'bundle = "{bundle}"\ndata_dir = "{root / "data" / name}"\n'
                f'region = "{SITES[site]}"\nzone = "{site}"\nbind = "0.0.0.0:{PORT}"\n'
                f'advertise = "{host.ip}:{PORT}"\njoin = {json.dumps(join)}\ncpus = 1\n'
                f'[labels]\nsite = "{site}"\n')
            node = Node(name, host, bundle, conf, root / "data" / name, root / "logs" / f"{name}.log")
            s.nodes[name] = node
            node.start()
        s.client_bundle = root / "alice"
        made = cli("bundle", "client", "--bundle", admin, "--name", "alice", "--out",
                   s.client_bundle)
        assert made.returncode == 0, made.stderr
        for site, host in client_hosts.items():
            s.clients[site] = NsClient(host, s.client_bundle, root / "logs" / f"client-{site}.log")
        yield s
