"""Shared by every test directory: pytest puts this directory on ``sys.path``, so tests
import ``needs`` (what a test needs from the machine) from here."""
