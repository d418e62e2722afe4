"""A service replica's process, and its wire format (issue #22).

A replica is a fresh interpreter started by the services plane (``runtime/
services_plane.py``) like a task worker (``python -c BOOT ROOT FD PARENT_PID [UID:GID
WORK_DIR]``), with the same isolation: given ``UID:GID`` it becomes the worker user before
it reads anything (``worker_main._drop_privileges``), it dies with its node
(``PR_SET_PDEATHSIG``), and the plane puts it in a cgroup of its own when the node has
them. It inherits one end of a ``socketpair`` and stdio, nothing else of the agent.

It receives the service's pickled ``(class, args, kwargs)`` once, constructs the class
once (``__init__`` loads the model: this is the point of a replica), answers ``Ready`` and
then serves calls one at a time on its main thread: read a frame, call the method, write a
frame. A method that raises fails that call only, with its traceback; the replica lives on.

Frames both ways: ``>II`` (envelope length, body length), a msgspec envelope, a raw body
(the code, the encoded arguments, the encoded result, a traceback). Bounds are checked
before anything is read.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import msgspec

from meshscale.runtime.worker_main import (
    FRAME_HEADER,
    MAX_ENVELOPE,
    _Closed,
    _held,
    _recv_exact,
    _short,
    _traceback_text,
    child_socket,
    frame_header,
)

__all__ = ["ActorCall", "Call", "Done", "Drop", "Failed", "Init", "Load", "Ready", "decode_from_replica", "encoder",
           "frame_header", "main"]


class Init(msgspec.Struct, tag="init", array_like=True):
    """Plane -> replica, once. Body: the pickled ``(class, args, kwargs)``."""

    max_args_bytes: int
    max_result_bytes: int
    sys_path: list[str]
    max_state_bytes: int = 0
    """Non-zero: an actor's process (``core/actors.py``): one instance per key, each call
    names its key and is answered with the instance's pickled state after it."""


class Call(msgspec.Struct, tag="call", array_like=True):
    """Plane -> replica. Body: the encoded arguments."""

    method: str
    encoding: str


class Load(msgspec.Struct, tag="load", array_like=True):
    """Plane -> actor process: make ``key``'s instance from the body (its pickled state;
    empty: construct the class, its ``__init__`` runs). Answered ``Done``/``Failed``."""

    key: str


class Drop(msgspec.Struct, tag="drop", array_like=True):
    """Plane -> actor process: forget ``key``'s instance. Not answered."""

    key: str


class ActorCall(msgspec.Struct, tag="acall", array_like=True):
    """Plane -> actor process: ``Call`` on ``key``'s instance. Answered ``Done`` with
    ``state_bytes`` set: the body is the result followed by the pickled instance."""

    key: str
    method: str
    encoding: str


class Ready(msgspec.Struct, tag="ready", array_like=True):
    pid: int
    methods: list[str]


class Done(msgspec.Struct, tag="done", array_like=True):
    """Replica -> plane. Body: the encoded result (an actor call: then its state)."""

    state_bytes: int = 0


class Failed(msgspec.Struct, tag="failed", array_like=True):
    """Replica -> plane. ``kind``: raised, unpicklable, too-large, init. Body: traceback."""

    kind: str
    message: str


_to_replica = msgspec.msgpack.Decoder(Init | Call | Load | Drop | ActorCall)
decode_from_replica = msgspec.msgpack.Decoder(Ready | Done | Failed)
encoder = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()


def _send(sock: socket.socket, msg: Ready | Done | Failed, body: bytes = b"") -> None:
    sock.sendall(frame_header(encoder.encode(msg), len(body)) + body)


def public_methods(obj: Any) -> list[str]:
    """The methods a caller may call: callable attributes not starting with ``_``."""
    return sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))


class Replica:
    def __init__(self, sock: socket.socket, init: Init, instance: Any) -> None:
        self.sock = sock
        self.init = init
        self.instance = instance
        """The service's instance; for an actor process, its ``(class, args, kwargs)``."""
        self.actors: dict[str, Any] = {}

    def serve(self) -> None:
        while True:
            env_len, body_len = FRAME_HEADER.unpack(_recv_exact(self.sock, FRAME_HEADER.size))
            if env_len > MAX_ENVELOPE or body_len > self.init.max_args_bytes:
                raise SystemExit(f"frame too large ({env_len}, {body_len})")
            msg = _to_replica.decode(_recv_exact(self.sock, env_len))
            body = bytes(_recv_exact(self.sock, body_len)) if body_len else b""
            if isinstance(msg, Call) and not self.actors_on:
                reply, out = self.call(msg, body)
            elif isinstance(msg, Load) and self.actors_on:
                reply, out = self.load(msg.key, body)
            elif isinstance(msg, Drop) and self.actors_on:
                self.actors.pop(msg.key, None)
                continue
            elif isinstance(msg, ActorCall) and self.actors_on:
                reply, out = self.actor_call(msg, body)
            else:
                raise SystemExit("unexpected message")
            _send(self.sock, reply, out)

    @property
    def actors_on(self) -> bool:
        return self.init.max_state_bytes > 0

    def load(self, key: str, state: bytes) -> tuple[Done | Failed, bytes]:
        import cloudpickle

        try:
            if state:
                self.actors[key] = cloudpickle.loads(state)
            else:
                cls, cargs, ckwargs = self.instance
                self.actors[key] = cls(*cargs, **ckwargs)
        except BaseException as e:
            return Failed("raised", _short(f"cannot make the instance of key {key!r}: "
                                           f"{type(e).__name__}: {e}")), _traceback_text(e)
        return Done(), b""

    def actor_call(self, msg: ActorCall, body: bytes) -> tuple[Done | Failed, bytes]:
        """A call on one key's instance; the instance's pickled state follows the result.
        A call that fails drops the instance: its node loads the last checkpoint again,
        so a half-done call leaves no trace."""
        import cloudpickle

        inst = self.actors.get(msg.key)
        if inst is None:
            return Failed("crashed", f"key {msg.key!r} is not loaded"), b""
        reply, out = self.call(Call(msg.method, msg.encoding), body, inst)
        if isinstance(reply, Failed):
            self.actors.pop(msg.key, None)
            return reply, out
        try:
            state = cloudpickle.dumps(inst, protocol=5)
        except BaseException as e:
            self.actors.pop(msg.key, None)
            return Failed("unpicklable", _short(f"cannot pickle the actor's state: "
                                                f"{type(e).__name__}: {e}")), b""
        if len(state) > self.init.max_state_bytes:
            self.actors.pop(msg.key, None)
            return Failed("too-large", f"the actor's state is {len(state)} bytes, over "
                                       f"max_state_bytes={self.init.max_state_bytes}"), b""
        return Done(len(state)), out + state

    def call(self, msg: Call, body: bytes, instance: Any = None
             ) -> tuple[Done | Failed, bytes]:
        import cloudpickle

        name = msg.method
        target = self.instance if instance is None else instance
        fn = None if name.startswith("_") else getattr(target, name, None)
        if fn is None or not callable(fn):
            return Failed("unknown-method", f"the service has no method {name!r}"), b""
        try:
            if msg.encoding == "json":
                raw = msgspec.json.decode(body) if body else {}
                if isinstance(raw, list):
                    args, kwargs = raw, {}
                elif isinstance(raw, dict) and set(raw) <= {"args", "kwargs"}:
                    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
                    if not isinstance(args, list) or not isinstance(kwargs, dict):
                        raise ValueError("args must be a list and kwargs an object")
                else:
                    raise ValueError('expected a JSON list of arguments or '
                                     '{"args": [...], "kwargs": {...}}')
            else:
                args, kwargs = cloudpickle.loads(body)
        except BaseException as e:
            return Failed("unpicklable", _short(f"cannot decode the arguments: "
                                                f"{type(e).__name__}: {e}")), b""
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # SystemExit from a method fails the call only
            return Failed("raised", _short(f"{type(e).__name__}: {e}")), _traceback_text(e)
        try:
            if msg.encoding == "json":
                out = _json.encode(result)
            else:
                out = cloudpickle.dumps(result, protocol=5)
        except BaseException as e:
            return Failed("unpicklable", _short(f"cannot encode the result: "
                                                f"{type(e).__name__}: {e}")), b""
        if len(out) > self.init.max_result_bytes:
            return Failed("too-large", f"result of {len(out)} bytes exceeds "
                                       f"{self.init.max_result_bytes}"), b""
        return Done(), out


def main(argv: list[str] | None = None) -> None:
    sock = child_socket(sys.argv[1:] if argv is None else argv, "replica")
    code = 0
    try:
        env_len, body_len = FRAME_HEADER.unpack(_recv_exact(sock, FRAME_HEADER.size))
        if env_len > MAX_ENVELOPE * 16 or body_len > 64 << 20:
            raise SystemExit("bad init frame")
        init = _to_replica.decode(_recv_exact(sock, env_len))
        if not isinstance(init, Init):
            raise SystemExit("expected init")
        code_bytes = bytes(_recv_exact(sock, body_len))
        for p in init.sys_path:
            p = _held.get(p, p)
            if p not in sys.path:
                sys.path.append(p)
        try:
            import cloudpickle

            cls, cargs, ckwargs = cloudpickle.loads(code_bytes)
            instance = ((cls, cargs, ckwargs) if init.max_state_bytes > 0
                        else cls(*cargs, **ckwargs))
        except BaseException as e:
            _send(sock, Failed("init", _short(f"{type(e).__name__}: {e}")),
                  _traceback_text(e))
            raise _Closed from None
        del code_bytes
        _send(sock, Ready(os.getpid(), public_methods(
            instance[0] if init.max_state_bytes > 0 else instance)))
        Replica(sock, init, instance).serve()
    except (_Closed, BrokenPipeError, ConnectionResetError):
        pass
    except SystemExit as e:
        print(f"meshscale replica {os.getpid()}: {e}", file=sys.stderr)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
