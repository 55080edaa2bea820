"""Rerun the PneumoniaMNIST accuracy table and write `## Accuracy` in docs/benchmarks.md.

`python scripts/benchmark_accuracy.py [--quick] [--threads 1] [--no-loso] [--doc docs/benchmarks.md]`
(--quick: one short epoch on 64 images per split, written to outputs/ unless --doc is given).
"""

import argparse
import sys
from pathlib import Path

from medtriage.training.accuracy_benchmark import run_benchmark
from medtriage.benchmarking import command_line, write_section
from medtriage.training.accuracy_report import section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--no-loso", action="store_true", help="skip the leave-one-site-out sweep")
    parser.add_argument("--doc", default=None, help="markdown file to update (default: docs/benchmarks.md; outputs/ with --quick)")
    args = parser.parse_args()
    result = run_benchmark(quick=args.quick, threads=args.threads, loso=not args.no_loso)
    root = result["root"]
    doc = Path(args.doc) if args.doc else root / ("outputs/benchmark_accuracy_quick.md" if args.quick else "docs/benchmarks.md")
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_section(section(result, command_line(), doc.parent), doc)
    print(f"accuracy table written to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
