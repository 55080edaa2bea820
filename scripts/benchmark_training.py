"""Training throughput, this engine vs a plain MONAI-tutorial loop; writes `## Training` in docs/benchmarks.md.

    python scripts/benchmark_training.py [--quick] [--networks resnet18 densenet121] [--compile] [--pool data/pool/pneumonia_sites]

Runs on CUDA when present, else on CPU (use --quick there: batch 16, short windows). Without an
existing site pool it writes a small one (make_sites --limit) under outputs/benchmark_training/.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from medtriage.benchmarking import BENCHMARKS_DOC, command_line, publish
from medtriage.training.speed_benchmark import Settings, quick_settings, run_benchmark
from medtriage.training.speed_report import markdown

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few, short windows (CPU: batch 16)")
    parser.add_argument("--networks", nargs="+", default=list(Settings.networks))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the plain loop")
    parser.add_argument("--compile", action="store_true", help="also time ResNet-18 with trainer.compile=true")
    parser.add_argument("--pool", type=Path, default=ROOT / "data" / "pool" / "pneumonia_sites")
    parser.add_argument("--pool-limit", type=int, default=600, help="images of the site pool written when none exists")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_DOC)
    args = parser.parse_args()
    settings = quick_settings(torch.cuda.is_available()) if args.quick else Settings()
    settings = replace(settings, networks=tuple(args.networks), size=args.size, compile=args.compile,
                       batch_size=args.batch_size or settings.batch_size,
                       plain_workers=settings.plain_workers if args.workers is None else args.workers)
    result = run_benchmark(settings, args.pool, ROOT / "outputs" / "benchmark_training", args.pool_limit)
    publish(markdown(result, command_line()), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
