"""A meshscale client living inside a test host (network namespace), driven from the test
over stdin/stdout: one JSON request per line in, one JSON answer per line out.

    python nsclient.py BUNDLE_DIR

Requests: ``{"op": "call", "addr", "method", "args"}`` (one RPC),
``{"op": "put", "addr", "data", "replicas", "w"}`` (data base64), ``{"op": "get", "addr",
"id"}``, ``{"op": "map", "addr", "n", "region"}`` (squares 0..n-1 as tasks, placed in
``region`` if given; the answer says where each ran, as the worker's own socket sees it). Answers: ``{"ok": true, ...}`` or ``{"ok": false,
"error": "...", "type": "..."}``.
"""

from __future__ import annotations

import base64
import faulthandler
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from meshscale.client.rpc import call
from meshscale.transport.credentials import Credentials
from meshscale.trust.bundle import load_bundle


def where(x: int) -> tuple[int, str, int]:
    """A task: its result, the network address its worker sees as its own, and its pid."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.213.255.254", 9))  # no packet is sent: picks the source address
        addr = probe.getsockname()[0]
    finally:
        probe.close()
    return x * x, addr, os.getpid()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def handle(req: dict[str, Any], bundle: Path, creds: Credentials) -> dict[str, Any]:
    import meshscale

    op = req["op"]
    if op == "call":
        args = req.get("args") or {}
        if "entry_b64" in args:
            args = {**args, "entry": base64.b64decode(args.pop("entry_b64"))}
        return {"result": _plain(call(req["addr"], creds, req["method"], args,
                                      timeout=float(req.get("timeout", 5))))}
    with meshscale.connect(req["addr"], bundle=bundle, timeout=float(req.get("timeout", 20))
                           ) as mesh:
        if op == "put":
            ref = mesh.put(base64.b64decode(req["data"]), replicas=int(req.get("replicas", 3)),
                           w=int(req.get("w", 2)))
            return {"id": ref.id}
        if op == "get":
            return {"data": base64.b64encode(mesh.get(req["id"])).decode()}
        if op == "map":
            fn: Any = where
            if req.get("region"):
                fn = meshscale.task(placement=meshscale.Region(req["region"]))(where)
            futs = mesh.map(fn, range(int(req["n"])))
            out = [f.result(timeout=60) for f in futs]
            return {"results": [list(r) for r in out]}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    # The test sends SIGUSR1 to a client past a call's deadline: its threads, to stderr (the log).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    bundle = Path(sys.argv[1])
    creds = Credentials.from_bundle(load_bundle(bundle))
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.monotonic()
        try:
            answer = {"ok": True, **handle(req, bundle, creds)}
        except Exception as e:  # every failure is an answer, the client lives on
            answer = {"ok": False, "error": str(e), "type": type(e).__name__}
        t1 = time.monotonic()
        out = json.dumps(answer) + "\n"
        # os.write until all is out, not sys.stdout: under PYTHONUNBUFFERED its write may
        # take part of a line when a signal interrupts a write to a full pipe, and the
        # rest was lost (the test then waited for a line that never came).
        data = memoryview(out.encode())
        while data:
            data = data[os.write(1, data):]
        # When each answer was made and sent, for a test that waited too long for one.
        print(f"{time.time():.3f} {req.get('op')} {req.get('method') or req.get('id') or ''}: "
              f"answered in {t1 - t0:.3f}s, {len(out)} bytes written in "
              f"{time.monotonic() - t1:.3f}s, ok={answer['ok']}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
