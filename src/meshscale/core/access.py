"""Who may call which RPC method: one table, checked by every node on every request.

A caller's role comes from its certificate (the CA signed it; ``trust/certs.py``), and a
token it presents can only narrow it. Three kinds of method:

- ``READ``: list and read; any certificate of the cluster may call them.
- ``WRITE``: change the mesh (put, delete, submit, publish, remove a node); admin
  clients and nodes (a node forwards what its clients asked).
- ``AUDIT``: read the audit trail (who did what, where); admin clients and nodes, not
  read-only ones.
- ``NODE``: node-to-node (replica writes, transfers, scheduling messages, stream copies);
  node certificates only.

A method a node serves must be in the table (registering one that is not fails), so no
method is ever open by omission. A node-to-node request that names its sender must come
from that node's certificate (``SENDER_FIELD``).
"""

from __future__ import annotations

from enum import StrEnum


class Access(StrEnum):
    READ = "read"
    WRITE = "write"
    AUDIT = "audit"
    NODE = "node"


ROLE_NODE = "node"
ROLE_ADMIN = "admin"
ROLE_READ_ONLY = "read-only"
ROLES = (ROLE_NODE, ROLE_ADMIN, ROLE_READ_ONLY)

_GRANTS: dict[str, frozenset[Access]] = {
    ROLE_NODE: frozenset(Access),
    ROLE_ADMIN: frozenset({Access.READ, Access.WRITE, Access.AUDIT}),
    ROLE_READ_ONLY: frozenset({Access.READ}),
}

_READ = (
    "members", "stats", "events", "node.energy", "node.points",
    "obj.read", "obj.stat", "obj.list", "kv.get", "kv.list", "kv.versions", "dp.stats",
    "task.list", "task.stats", "task.result", "task.wait", "task.logs",
    "stream.read", "stream.op_list", "stream.stats",
    "policy.get", "policy.list",
    "svc.list",
)
_WRITE = (
    "obj.put_begin", "obj.put_chunk", "obj.put_end", "obj.put_abort", "obj.put_small",
    "obj.delete", "obj.corrupt_local", "kv.put", "kv.delete",
    "task.submit", "task.cancel",
    "stream.publish", "stream.copied", "stream.op_register", "stream.op_remove",
    "admin.revoke", "node.standby", "node.wake", "policy.set", "policy.delete",
    "erase.run",
    # A service call runs the service's code, which may change what it holds: a write,
    # as a task's submit is (a read-only certificate may list services, not call them).
    "svc.deploy", "svc.remove", "svc.call",
)
_AUDIT = ("audit.query", "audit.verify", "audit.heads")
_NODE = (
    "obj.rw_begin", "obj.rw_chunk", "obj.rw_end", "obj.rw_small", "obj.read_local",
    "obj.local_stat", "obj.local_list", "repl.msg", "kv.apply", "kv.apply_batch", "kv.put_batch",
    "kv.read", "kv.scan",
    "sched.msg", "sched.load", "sched.batch", "sched.exchange", "task.done", "task.fn", "task.kill",
    "stream.replicate", "stream.fetch", "stream.op_notify",
    "svc.notify", "svc.invoke", "svc.status", "erase.confirm", "policy.migrate_local",
)

METHOD_ACCESS: dict[str, Access] = {
    **dict.fromkeys(_READ, Access.READ),
    **dict.fromkeys(_WRITE, Access.WRITE),
    **dict.fromkeys(_AUDIT, Access.AUDIT),
    **dict.fromkeys(_NODE, Access.NODE),
}
assert len(METHOD_ACCESS) == len(_READ) + len(_WRITE) + len(_AUDIT) + len(_NODE), \
    "a method listed twice"


SENDER_FIELD: dict[str, str] = {
    "repl.msg": "src", "sched.msg": "src", "sched.batch": "src", "sched.load": "src",
    "sched.exchange": "src",
    "task.done": "node", "task.kill": "owner",
}
"""Node-to-node methods whose request names the node sending it: that name must be the
one its certificate carries (a node speaks only for itself)."""


def claimed_sender(method: str, args: dict[str, object]) -> str | None:
    """The node a request says it comes from, for the methods that say so; else None."""
    field = SENDER_FIELD.get(method)
    if field is None:
        return None
    value = args.get(field)
    return value if isinstance(value, str) else ""


def narrowest(*roles: str) -> str:
    """The role granting the least of ``roles`` (a token narrows a certificate)."""
    return min(roles, key=lambda r: len(_GRANTS.get(r, frozenset())))


def allowed(role: str, method: str) -> bool:
    """May a caller in ``role`` call ``method``? Unknown roles and methods: no."""
    access = METHOD_ACCESS.get(method)
    return access is not None and access in _GRANTS.get(role, frozenset())
