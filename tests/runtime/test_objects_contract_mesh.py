"""The data plane's typed contract (``core/api/objects.py``) against a live node: every
method refuses an unknown field and a field of the wrong type with the code ``invalid``,
naming the field, before its handler sees the request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from meshscale.client.rpc import RemoteError, call
from meshscale.core.api import Empty
from meshscale.core.api.objects import METHODS
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("objcontract"), 1, http=False) as m:
        yield m


def _refused(mesh: LocalMesh, method: str, args: dict[str, Any]) -> RemoteError:
    if method == "repl.msg":  # the door checks the sender first (core/access.py)
        args = {"src": mesh.nodes[0].name, **args}
    with pytest.raises(RemoteError) as e:
        call(mesh.nodes[0].address, mesh.node_credentials(0), method, args, timeout=10)
    return e.value


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_an_unknown_field_is_invalid_naming_it(mesh: LocalMesh, method: Any) -> None:
    e = _refused(mesh, method.name, {"surprise_field": 1})
    assert e.code == "invalid", (method.name, str(e))
    assert "surprise_field" in str(e) and method.name in str(e)


@pytest.mark.parametrize("method", [m for m in METHODS if m.request is not Empty],
                         ids=lambda m: m.name)
def test_a_field_of_the_wrong_type_is_invalid_naming_it(mesh: LocalMesh, method: Any) -> None:
    field = method.request.__struct_fields__[-1]
    e = _refused(mesh, method.name, {field: [1, 2]})
    assert e.code == "invalid", (method.name, str(e))
    assert f"$.{field}" in str(e), (method.name, str(e))
