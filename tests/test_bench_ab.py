"""bench/ab.py: before and after side by side (its parsing; the runs are a benchmark)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ab


def test_numeric_keys_flattens_and_skips_what_is_not_a_number() -> None:
    data = {"a": 1, "b": {"c": 2.5, "d": "x", "e": True, "f": None}, "g": [1, 2]}
    assert ab.numeric_keys(data) == {"a": 1.0, "b.c": 2.5}


@pytest.mark.parametrize("argv", [["a", "b"], ["a", "b", "--", "nope"],
                                  ["a", "b", "--runs", "0", "--", "x.py"],
                                  ["a", "b", "--", "x.py", "--json", "p"]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        ab.main(argv)
    assert e.value.code == 2
