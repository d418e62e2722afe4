"""Shared by every test directory: pytest puts this directory on ``sys.path``, so tests
import ``needs`` (what a test needs from the machine) from here."""

from __future__ import annotations

import os
import random
from collections.abc import Generator

import pytest

SEED_VARS = ("MESHSCALE_SWARM_SEED", "MESHSCALE_FUZZ_SEED", "MESHSCALE_CHAOS_SEED")
"""The base seeds the swarms, the fuzzer and the chaos mesh draw their runs from: fresh
each run unless set. Drawn once here, before pytest-xdist starts its workers (they inherit
the environment), so every worker collects the same seeded test ids."""


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller chose them
        return
    rng = random.SystemRandom()
    for var in SEED_VARS:
        os.environ.setdefault(var, str(rng.randrange(2**31)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    seeds = " ".join(f"{var}={os.environ.get(var)}" for var in SEED_VARS)
    terminalreporter.write_line(f"base seeds (set them to run the same seeds again): {seeds}")


REQUIRE_ALL_VAR = "MESHSCALE_REQUIRE_ALL_TESTS"
"""Set (to 1) by CI: a test that skips (it needs root, cgroups, a kernel feature, a tool)
is reported as a failure, so every test CI collects has run and could have failed there.
Unset, as for a user without root, those tests skip and say what they need."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get(REQUIRE_ALL_VAR) == "1" \
            and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped, but {REQUIRE_ALL_VAR}=1 requires every test to run: "
                           f"{reason}")
