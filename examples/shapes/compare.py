"""Two runs of the example side by side: `python -m examples.shapes.compare A B`.

A and B are work folders (or their results.json). Prints every held-out metric of every
rewriter in both runs and the largest difference, so "the same seed gives the same
table" is checked, not eyeballed. Exit code 1 when a difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("recall@1", "recall@5", "recall@10", "mrr")


def table(results: dict) -> dict[tuple[str, str, str], float]:
    """{(shift, rewriter name, metric): value} from one run's results.json."""
    # The composed shift names its rows apart: there `none` is the blend baseline.
    names = {"": results.get("names", {}), "compose": results.get("compose_names", {})}
    out = {
        (shift, "retriever", m): float(v[m])
        for shift, v in results.get("retriever", {}).items()
        for m in ("recall@1", "recall@10")
    }
    for shift, report in results["eval"].items():
        shift_names = names["compose" if shift.startswith("compose") else ""]
        for row in report["rows"]:
            name = shift_names.get(row["rewriter"], row["rewriter"])
            for m in METRICS:
                out[shift, name, m] = float(row["metrics"][m])
    return out


def _load(path: Path) -> dict:
    path = path / "results.json" if path.is_dir() else path
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tolerance", type=float, default=0.01)
    args = p.parse_args(argv)
    a, b = table(_load(args.a)), table(_load(args.b))
    keys = sorted(a.keys() & b.keys())
    print("| shift | rewriter | metric | A | B | diff |\n|---|---|---|---|---|---|")
    for k in keys:
        print(f"| {k[0]} | {k[1]} | {k[2]} | {a[k]:.3f} | {b[k]:.3f} | {b[k] - a[k]:+.3f} |")
    worst = max((abs(a[k] - b[k]) for k in keys), default=0.0)
    missing = sorted(a.keys() ^ b.keys())
    print(f"\n{len(keys)} figures compared, largest difference {worst:.4f}", end="")
    print(f", {len(missing)} only in one run" if missing else "")
    return 1 if worst > args.tolerance or missing else 0


if __name__ == "__main__":
    sys.exit(main())
