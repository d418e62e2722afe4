"""Fuzz every decoder a peer's bytes reach (the generator of ``tests/fuzzing.py``).

    python bench/fuzz.py --inputs 1000000 --json bench/results/fuzz.json [--seed N]

Prints a table and writes JSON:

- inputs: inputs decoded, spread evenly over the decoders;
- undocumented_exceptions: inputs that raised anything but the decoder's documented
  ``WireError`` (must be 0); the first few are printed with their seed and index;
- max_decode_ms: the slowest single decode;
- rejections_counted: inputs refused (a ``WireError``, or a rejection the membership
  protocol counted);
- per decoder: inputs, rejected, and the slowest decode.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import DECODERS, MEMBER, inputs  # noqa: E402
from meshscale.core.wire import WireError  # noqa: E402


def _rejections() -> int:
    return sum(v for k, v in MEMBER.stats.items() if k.startswith("rejected."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: fresh)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"fuzz base seed {seed}")
    per = max(1, args.inputs // len(DECODERS))
    rows: dict[str, dict[str, Any]] = {}
    undocumented: list[str] = []
    total = rejected = 0
    slowest = 0.0
    t0 = time.monotonic()
    for name, decode in sorted(DECODERS.items()):
        rng = random.Random(f"{seed}:{name}")
        row = {"inputs": 0, "rejected": 0, "max_decode_ms": 0.0}
        for i, data in enumerate(inputs(name, rng, per)):
            before = _rejections()
            start = time.perf_counter()
            try:
                decode(data)
                refused = _rejections() > before
            except WireError:
                refused = True
            except Exception as e:
                refused = True
                if len(undocumented) < 20:
                    undocumented.append(f"{name} #{i}: {type(e).__name__}: {e!s:.120}")
                row.setdefault("undocumented", 0)
                row["undocumented"] += 1
            ms = (time.perf_counter() - start) * 1000
            row["inputs"] += 1
            row["rejected"] += int(refused)
            row["max_decode_ms"] = max(row["max_decode_ms"], ms)
        rows[name] = row
        total += row["inputs"]
        rejected += row["rejected"]
        slowest = max(slowest, row["max_decode_ms"])
    result = {
        "inputs": total,
        "undocumented_exceptions": sum(r.get("undocumented", 0) for r in rows.values()),
        "max_decode_ms": round(slowest, 3),
        "rejections_counted": rejected,
        "seed": seed,
        "wall_s": round(time.monotonic() - t0, 1),
        "decoders": {k: {**v, "max_decode_ms": round(v["max_decode_ms"], 3)}
                     for k, v in rows.items()},
    }
    print(f"{'decoder':<22} {'inputs':>9} {'rejected':>9} {'undocumented':>12} {'max ms':>8}")
    for name, row in sorted(rows.items()):
        print(f"{name:<22} {row['inputs']:>9,} {row['rejected']:>9,} "
              f"{row.get('undocumented', 0):>12,} {row['max_decode_ms']:>8.3f}")
    print(f"{'all':<22} {total:>9,} {rejected:>9,} {result['undocumented_exceptions']:>12,} "
          f"{slowest:>8.3f}   ({result['wall_s']} s)")
    for line in undocumented:
        print("  " + line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["undocumented_exceptions"] else 0


if __name__ == "__main__":
    sys.exit(main())
