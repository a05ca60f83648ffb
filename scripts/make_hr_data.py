"""Regenerate the bundled HR dataset (deterministic): processed JSONL, test set and the raw spreadsheet.

    .venv/bin/python scripts/make_hr_data.py [--root .]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data_engine import hr_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="project root")
    args = parser.parse_args()
    out = hr_dataset.write_all(args.root)
    built = out["built"]
    for name, path in out["paths"].items():
        print(f"{name:10s} {path} ({Path(path).stat().st_size / 1024:.0f} KiB)")
    train_counts = Counter(s.tool or "(no call)" for s in built.train)
    test_counts = Counter(s.tool or "(no call)" for s in built.test)
    for tool in sorted(train_counts):
        print(f"  {tool:22s} train {train_counts[tool]:4d}  test {test_counts.get(tool, 0):3d}")
    raw, masked = hr_dataset.max_similarity(built.train, built.test)
    print(f"leakage check passed: max test~train similarity {raw:.2f} raw, {masked:.2f} masked "
          f"(limits {hr_dataset.NEAR_DUP}, {hr_dataset.PATTERN_DUP})")


if __name__ == "__main__":
    main()
