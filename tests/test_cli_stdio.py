"""The CLI's output under ``PYTHONUNBUFFERED``: every byte written reaches the pipe.

Unbuffered, ``sys.stdout.buffer`` is a raw ``FileIO`` whose ``write`` may take only part
of its argument when a signal interrupts a write to a full pipe; glibc sends one to every
thread whenever any thread calls ``setgid`` (SIGSETXID), which the child below does in a
loop while the parent reads slowly. ``meshscale get ID | ...`` and ``kv get`` write
object bytes through ``sys.stdout.buffer``; ``typer.echo`` writes through ``sys.stdout``.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import os
import subprocess
import sys
import termios

from waiting import wait_for

PIPE_BYTES = 64 * 1024
"""A Linux pipe's default capacity."""

CHILD = r"""
import os, sys, threading, time
import meshscale.cli as cli

cli._reliable_stdio()

def churn():
    while True:
        os.setgid(os.getgid())  # glibc: SIGSETXID to every other thread
        time.sleep(0.0002)

threading.Thread(target=churn, daemon=True).start()
chunk = bytes(range(256)) * 4096
for _ in range(16):
    sys.stdout.buffer.write(chunk)  # as `meshscale get` copies an object out
sys.stdout.buffer.flush()
print("x" * 300_000)  # as a long --json answer goes out
"""


def expected() -> bytes:
    return bytes(range(256)) * 4096 * 16 + b"x" * 300_000 + b"\n"


def test_stdout_keeps_every_byte_under_pythonunbuffered() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()

    def full_or_done() -> bool:
        # A slow reader: read only once the pipe is full (the child's write is blocked
        # on it, where a signal cuts it short) or the child has finished.
        waiting = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, waiting)
        return waiting[0] >= PIPE_BYTES or proc.poll() is not None

    got = bytearray()
    while True:
        wait_for(full_or_done, 60, "the pipe full or the child done", poll=0.0002)
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        got += chunk
    assert proc.wait(timeout=60) == 0
    want = expected()
    assert len(got) == len(want), f"{len(want) - len(got)} of {len(want)} bytes lost"
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
