"""Before and after in one run: a benchmark script of this directory, run on two commits
of the project alternately, its numeric JSON keys side by side.

    python bench/ab.py BEFORE AFTER [--runs N] [--json PATH] -- tasks.py --quick --only meshscale

Each commit is checked out into a temporary git worktree and the benchmark runs with that
tree's ``src`` first on ``PYTHONPATH`` (node processes it starts inherit it), so both sides
use the same interpreter, packages and machine, interleaved (before, after, before, ...)
so that a noisy neighbour hurts both alike. It prints the median of each key per side,
their ratio, and every run's value; with ``--json`` it writes the same. Nothing here is a
pass or fail: the machine is shared, and the table says how far apart runs of one side are.

The script itself and the benchmark's arguments come from the working tree; the
benchmark script comes from each commit (a key missing on one side is shown as "-").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_RUNS = 20


def numeric_keys(data: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a benchmark's JSON, nested keys joined with dots."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(numeric_keys(v, f"{prefix}{k}."))
    elif isinstance(data, bool):
        pass
    elif isinstance(data, int | float):
        out[prefix.rstrip(".")] = float(data)
    return out


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="meshscale-ab-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path),
                    ref], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       check=False)


def run_once(tree: Path, script: str, args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=str(tree / "src"))
        cmd = [sys.executable, str(tree / "bench" / script), *args, "--json", str(out)]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise SystemExit(f"{script} failed on {tree.name} (exit {proc.returncode}): "
                             + " | ".join(tail))
        return numeric_keys(json.loads(out.read_text()))


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="commit (or branch) before the change")
    p.add_argument("after", help="commit (or branch) after the change")
    p.add_argument("--runs", type=int, default=2, help=f"runs per side (1..{MAX_RUNS})")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)
    if not 1 <= a.runs <= MAX_RUNS:
        p.error(f"--runs must be 1..{MAX_RUNS}")
    if not bench_args or not bench_args[0].endswith(".py"):
        p.error("after --, give a benchmark script of bench/ and its arguments")
    script, args = bench_args[0], bench_args[1:]
    if "--json" in args:
        p.error("--json after -- is set by this script")
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with worktree(a.before) as before, worktree(a.after) as after:
        for i in range(a.runs):
            for side, tree in (("before", before), ("after", after)):
                print(f"run {i + 1}/{a.runs} {side} ...", file=sys.stderr, flush=True)
                runs[side].append(run_once(tree, script, args))
    keys = sorted({k for side in runs.values() for r in side for k in r})
    rows = []
    for k in keys:
        vals = {s: [r[k] for r in runs[s] if k in r] for s in runs}
        med = {s: statistics.median(v) if v else None for s, v in vals.items()}
        b, f = med["before"], med["after"]
        ratio = f / b if b not in (None, 0) and f is not None else None
        rows.append({"key": k, "before": med["before"], "after": med["after"], "ratio": ratio,
                     "before_runs": vals["before"], "after_runs": vals["after"]})
    width = max(len("key"), *(len(r["key"]) for r in rows)) if rows else 3
    print(f"{script} {' '.join(args)}: {a.before} -> {a.after}, {a.runs} run(s) per side, "
          "medians")
    print(f"{'key':<{width}}  {'before':>10}  {'after':>10}  {'after/before':>12}  runs")
    for r in rows:
        every = " / ".join(fmt(x) for x in r["before_runs"]) + "  |  " + " / ".join(
            fmt(x) for x in r["after_runs"])
        print(f"{r['key']:<{width}}  {fmt(r['before']):>10}  {fmt(r['after']):>10}  "
              f"{fmt(r['ratio']):>12}  {every}")
    if a.json is not None:
        a.json.write_text(json.dumps({"script": script, "args": args, "before": a.before,
                                      "after": a.after, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
