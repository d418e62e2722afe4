"""A test bed of hosts on one machine: one Linux network namespace per host, all joined
by a bridge, each with its own IP address; partitions are real packet drops (nftables
rules inside the namespaces). Needs root, ``ip`` (iproute2) and ``nft`` (nftables).

The bridge lives in a namespace of its own (``<prefix>sw``), so the machine's own network
namespace is never touched: the test only ever uses the addresses of namespaces it made.
``NetLab.close`` kills every process it started in them and deletes every namespace (the
veth pairs go with them), also when the test failed; a lab left behind by a killed test
run (its creator's pid is gone) is swept away by the next one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213"
"""Hosts get 10.213.S.H/16: S the site, H the host in it."""
_NAME_RE = re.compile(r"^mst(\d+)x")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete the namespaces of labs whose creating process is gone."""
    gone = []
    for ns in namespaces():
        m = _NAME_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _kill_inside(ns)
            _ip("netns", "delete", ns, check=False)
            gone.append(ns)
    return gone


def _kill_inside(ns: str) -> None:
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@dataclass
class Host:
    """One machine: a namespace with one interface and one address."""

    lab: NetLab
    name: str
    ns: str
    ip: str
    site: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def popen(self, args: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
        """Start ``args`` inside this host (in a session of its own); output to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            p = subprocess.Popen(self.command(args), stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def run(self, args: list[str], timeout: float = 60, **kw: object
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), capture_output=True, text=True,
                              timeout=timeout, **kw)  # type: ignore[call-overload]

    def nft(self, script: str) -> None:
        subprocess.run(self.command(["nft", "-f", "-"]), input=script, text=True, check=True,
                       capture_output=True, timeout=30)


class NetLab:
    """Hosts on a private bridge. Use as a context manager."""

    _labs = 0

    def __init__(self) -> None:
        NetLab._labs += 1  # several labs in one test run never share a name
        self.prefix = f"mst{os.getpid()}x{NetLab._labs}l"
        self.switch = f"{self.prefix}sw"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        self._sites: dict[str, int] = {}

    def __enter__(self) -> NetLab:
        sweep_stale()
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str, site: str) -> Host:
        """A new host in ``site`` (sites are numbered in the order they first appear)."""
        s = self._sites.setdefault(site, len(self._sites) + 1)
        h = sum(1 for x in self.hosts.values() if x.site == site) + 1
        ns = f"{self.prefix}{len(self.hosts)}"
        ip = f"{SUBNET}.{s}.{10 + h}"
        self._add_ns(ns)
        # veth: "eth0" inside the host, its peer on the bridge in the switch namespace.
        peer = f"v{len(self.hosts)}"
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer,
            "netns", self.switch)
        _ip("-n", self.switch, "link", "set", peer, "master", "br0")
        _ip("-n", self.switch, "link", "set", peer, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, ip, site)
        self.hosts[name] = host
        return host

    def partition(self, side: list[Host]) -> None:
        """Cut ``side`` off from every other host: each end drops what comes from the
        other (nftables, input hook), in both directions."""
        inside = {h.ip for h in side}
        outside = {h.ip for h in self.hosts.values()} - inside
        for host in self.hosts.values():
            others = outside if host.ip in inside else inside
            if not others:
                continue
            addrs = ", ".join(sorted(others))
            host.nft(f"table inet meshscale_partition {{\n"
                     f"  chain input {{ type filter hook input priority 0; policy accept;\n"
                     f"    ip saddr {{ {addrs} }} drop\n  }}\n"
                     f"  chain output {{ type filter hook output priority 0; policy accept;\n"
                     f"    ip daddr {{ {addrs} }} drop\n  }}\n}}\n")

    def heal(self) -> None:
        for host in self.hosts.values():
            host.run(["nft", "delete", "table", "inet", "meshscale_partition"], timeout=10)

    def close(self) -> None:
        """Stop every process started in the lab, then delete its namespaces."""
        for host in self.hosts.values():
            for p in host.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
        for ns in reversed(self._made):
            _kill_inside(ns)
            _ip("netns", "delete", ns, check=False)
        self._made.clear()
