"""Inference latency and throughput: serve vs raw ONNX Runtime vs PyTorch eager; writes docs/benchmarks.md.

    python scripts/benchmark_inference.py [--network resnet18] [--size 224] [--repeats 30] [--threads N] [FILE.dcm ...]

Without files it times pydicom's CT_small.dcm (128x128 CT) and, when pydicom-data is installed,
RG1_UNCI.dcm (a 1955x1841 CR).
"""

import argparse
import sys
from pathlib import Path

from pydicom.data import get_testdata_file

from medtriage.benchmarking import BENCHMARKS_DOC, command_line, publish
from medtriage.export.benchmark import markdown, run_benchmark

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="DICOM files to time (default: pydicom test files)")
    parser.add_argument("--network", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="ORT and torch threads (default: all cores)")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_DOC, help="markdown file whose '## Inference' section is rewritten")
    args = parser.parse_args()
    files = args.files or [f for f in (get_testdata_file("CT_small.dcm"), get_testdata_file("RG1_UNCI.dcm")) if f]
    result = run_benchmark(files, args.network, args.size, args.repeats, args.threads)
    publish(markdown(result, command_line()), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
