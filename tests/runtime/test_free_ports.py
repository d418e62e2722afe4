"""LocalMesh's ports: found free, and outside the kernel's ephemeral range, where any
outgoing connection could take one between the check and the node's bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from meshscale.runtime import launcher
from meshscale.runtime.launcher import ephemeral_ports, find_free_base_port


def test_base_ports_are_below_the_ephemeral_range_and_free() -> None:
    eph = ephemeral_ports()
    for _ in range(200):
        base = find_free_base_port(6)
        assert base + 6 <= eph.start or base >= eph.stop, (base, eph)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base))  # free when found (nothing else took it meanwhile)


def test_a_machine_with_no_room_below_the_range_still_gets_ports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "range"
    f.write_text("1024\t65000\n")
    monkeypatch.setattr(launcher, "EPHEMERAL_RANGE_FILE", str(f))
    assert ephemeral_ports() == range(1024, 65001)
    assert 20000 <= find_free_base_port(3) < 60000
    f.write_text("garbage")
    assert ephemeral_ports() == range(32768, 61000)
