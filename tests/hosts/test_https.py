"""The HTTP API beyond loopback: HTTPS with the node's certificate by default, checked by
clients against the cluster CA; plain HTTP there only when asked (``--http-insecure``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostbed import MESHSCALE, cli, wait_until

from needs import require_tools

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, dict[str, Any]]]:
    require_tools("ip", "nft", what="the multi-host tests", root=True)
    from netlab import NetLab

    root = tmp_path_factory.mktemp("https")
    assert cli("init", root / "admin").returncode == 0
    assert cli("bundle", "client", "--bundle", root / "admin", "--name", "ops", "--out",
               root / "ops").returncode == 0
    with NetLab() as net:
        nodes = {}
        for name, extra in (("secure", []), ("plain", ["--http-insecure"])):
            host = net.add_host(name, "s1")
            assert cli("bundle", "node", "--bundle", root / "admin", "--name", name, "--host",
                       host.ip, "--out", root / name).returncode == 0
            proc = host.popen([MESHSCALE, "node", "start", "--bundle", str(root / name),
                               "--data-dir", str(root / f"{name}-data"), "--bind",
                               f"{host.ip}:7946", "--http", f"{host.ip}:8946", *extra],
                              root / f"{name}.log")
            nodes[name] = (host, proc)
        client = net.add_host("client", "s1")
        yield client, root, nodes


def test_https_by_default_beyond_loopback(lab: tuple[Any, Path, dict[str, Any]]) -> None:
    client, root, nodes = lab
    host, _ = nodes["secure"]
    ops = root / "ops"

    def top(url: str) -> Any:
        return cli("top", "--once", "--http", url, "--bundle", ops, host=client, timeout=60)

    wait_until(lambda: top(f"https://{host.ip}:8946").returncode == 0, 30, "HTTPS answers")
    shown = top(f"https://{host.ip}:8946")
    assert "secure" in shown.stdout, shown.stderr
    # Plain HTTP to it does not get the API.
    plain = top(f"{host.ip}:8946")
    assert plain.returncode != 0
    # A client that does not trust the cluster CA refuses the certificate.
    probe = client.run([sys.executable, "-c", (
        "import urllib.request, sys\n"
        f"try: urllib.request.urlopen('https://{host.ip}:8946/api/v1/openapi.json', timeout=10)\n"
        "except Exception as e: print(type(e).__name__, e); sys.exit(3)\n")], timeout=30)
    assert probe.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in probe.stdout, probe


def test_plain_http_only_when_asked(lab: tuple[Any, Path, dict[str, Any]]) -> None:
    client, root, nodes = lab
    host, _ = nodes["plain"]
    wait_until(lambda: cli("top", "--once", "--http", f"{host.ip}:8946", "--bundle",
                           root / "ops", host=client, timeout=60).returncode == 0,
               30, "plain HTTP answers")
