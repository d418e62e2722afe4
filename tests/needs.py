"""What a test needs from the machine beyond the virtual environment, and what to do
when it is missing.

`make test` installs the system packages (``scripts/system-deps``) when it runs as root.
So a missing tool is a skip, with the reason, for a user without root, and a failure for
root, where it means the install did not work (CI runs as root and must run these tests).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

INSTALL_HINT = "`make test` installs it as root (scripts/system-deps)"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def require_root(what: str) -> None:
    """Skip the calling test for a user without root, saying why: ``what`` needs root.
    CI runs as root with ``MESHSCALE_REQUIRE_ALL_TESTS=1`` (tests/conftest.py), where a
    skip is reported as a failure: there these tests always run."""
    if not is_root():
        pytest.skip(f"{what} needs root; run as root to include it")


def missing_tools(*tools: str) -> list[str]:
    """The tools (command names or absolute paths) that are not on this machine."""
    out = []
    for tool in tools:
        found = Path(tool).exists() if os.path.isabs(tool) else shutil.which(tool) is not None
        if not found:
            out.append(tool)
    return out


def require_tools(*tools: str, what: str, root: bool = False) -> None:
    """Skip (not root) or fail (root) the calling test when a tool is missing; with
    ``root``, the test also needs root, and skips without it."""
    if root and not is_root():
        pytest.skip(f"{what} needs root (network namespaces); run as root to include it")
    missing = missing_tools(*tools)
    if not missing:
        return
    message = f"{what} needs {', '.join(missing)}: {INSTALL_HINT}"
    if is_root():
        pytest.fail(f"{message}, but it is still missing", pytrace=False)
    pytest.skip(message)
