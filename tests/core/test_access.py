"""Who may call which RPC method (core/access.py)."""

from __future__ import annotations

import pytest

from meshscale.core.access import (
    METHOD_ACCESS,
    ROLE_ADMIN,
    ROLE_NODE,
    ROLE_READ_ONLY,
    ROLES,
    Access,
    allowed,
    narrowest,
)
from meshscale.trust.certs import Role


def test_the_role_names_are_the_certificates() -> None:
    assert set(ROLES) == {r.value for r in Role}


@pytest.mark.parametrize("method", sorted(METHOD_ACCESS))
def test_each_method_by_role(method: str) -> None:
    access = METHOD_ACCESS[method]
    assert allowed(ROLE_NODE, method)
    assert allowed(ROLE_ADMIN, method) == (access is not Access.NODE)
    assert allowed(ROLE_READ_ONLY, method) == (access is Access.READ)


def test_what_no_one_may_call() -> None:
    assert not allowed(ROLE_NODE, "no.such.method")
    assert not allowed("superuser", "members")


@pytest.mark.parametrize(
    ("method", "access"),
    [("obj.rw_small", Access.NODE), ("repl.msg", Access.NODE), ("kv.apply", Access.NODE),
     ("kv.apply_batch", Access.NODE), ("kv.put_batch", Access.NODE),
     ("stream.replicate", Access.NODE), ("obj.put_small", Access.WRITE),
     ("kv.put", Access.WRITE), ("admin.revoke", Access.WRITE), ("obj.read", Access.READ),
     ("members", Access.READ)],
)
def test_replica_writes_are_node_to_node_and_changes_need_admin(method: str,
                                                                access: Access) -> None:
    assert METHOD_ACCESS[method] is access


def test_a_token_only_narrows() -> None:
    assert narrowest(ROLE_ADMIN, ROLE_READ_ONLY) == ROLE_READ_ONLY
    assert narrowest(ROLE_READ_ONLY, ROLE_ADMIN) == ROLE_READ_ONLY
    assert narrowest(ROLE_NODE, ROLE_ADMIN) == ROLE_ADMIN


def test_a_node_request_names_its_sender() -> None:
    from meshscale.core.access import SENDER_FIELD, claimed_sender

    assert all(METHOD_ACCESS[m] is Access.NODE for m in SENDER_FIELD)
    assert claimed_sender("repl.msg", {"src": "n1", "payload": b""}) == "n1"
    assert claimed_sender("repl.msg", {"payload": b""}) == ""  # absent: claims no one
    assert claimed_sender("task.kill", {"owner": 5}) == ""
    assert claimed_sender("members", {"src": "n1"}) is None
