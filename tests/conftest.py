"""Shared by every test directory: pytest puts this directory on ``sys.path``, so tests
import ``needs`` (what a test needs from the machine) from here."""

from __future__ import annotations

import os
import random

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
