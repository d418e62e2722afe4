"""What travels from a client to the nodes with a task or a stream operator: the rule for
shipping a function's module by value, where the work may run (``Region``, ``Regions``),
and the error a refused submit raises. Shared by ``client/tasks.py`` and
``client/streams.py`` (kept apart so neither imports the other's internals)."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import msgspec

from meshscale.client.mesh import MeshError

__all__ = ["Region", "Regions", "TaskSubmitError", "by_value"]


class TaskSubmitError(MeshError):
    """A task was refused at submit: unpicklable, too large, no node may run it, or an
    input object no live node holds. Nothing of the batch was submitted."""



class Region(msgspec.Struct, frozen=True):
    """``placement=Region("cloud")``: run in this one region (central placement)."""

    name: str


class Regions(msgspec.Struct, frozen=True):
    """``placement=Regions(["eu-west", "eu-central"])``: run in one of these regions."""

    names: list[str]


_INSTALLED = tuple(
    str(Path(p).resolve())
    for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib",
                                                     "platlib")}
    if p
)


def by_value(module_name: str) -> bool:
    """Whether a function's module must travel by value: the nodes can import installed
    packages and meshscale, not the user's own scripts and modules."""
    if module_name in ("__main__", "builtins") or module_name.split(".")[0] == "meshscale":
        return module_name == "__main__"
    mod = sys.modules.get(module_name)
    path = getattr(mod, "__file__", None)
    if mod is None or path is None:
        return False
    resolved = str(Path(path).resolve())
    return not resolved.startswith(_INSTALLED)
