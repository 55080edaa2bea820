"""What drawing the worklist picture costs: occlusion map + overlay PNG of one frame, per model.

    python -m benchmarks.saliency [--repeats 5] [--quick] [FILE.dcm]

Times `medtriage.serve.saliency.explain_frame` (the call the worklist makes when a row is first
opened: shrink the frame, cover it cell by cell, the copies through the model in runs of FRAME_BATCH, draw the
PNG) and, on their own, those runs of occluded copies through the package's session; interleaved rounds,
medians. Packages are untrained networks exported through medtriage.export (the time does not
depend on the weights). Default frame: pydicom-data's RG1_UNCI.dcm (a 1955x1841 CR), else pydicom's
CT_small.dcm. The `## Worklist picture` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from benchmarks.common import (
    command_line,
    header,
    interleaved,
    machine,
    publish,
    verdict,
)
from benchmarks.inference import build_package, network_words
from medtriage.io.dicom import read_dicom
from medtriage.serve.package import load_package
from medtriage.serve.predictor import FRAME_BATCH, Predictor, to_model_channels
from medtriage.serve.saliency import (
    DEFAULT_GRID,
    DISPLAY_SIDE,
    explain_frame,
    occluded_copies,
    resize_chw,
    shrink,
)

SECTION = "## Worklist picture"
MODELS = (("resnet18", 224), ("resnet10", 32))
TARGET_SECONDS = 2.0  # the picture appears within this long after a row is first opened


def measure(path: str, network: str, size: int, repeats: int, work: Path) -> dict:
    package_dir, _ = build_package(work, network, size, stem_stride=2)
    predictor = Predictor(load_package(package_dir))
    frame = read_dicom(path).pixels[0]
    pixels = to_model_channels(shrink(frame.astype("float32"), DISPLAY_SIDE)[None], predictor.package.channels)[0]
    work = resize_chw(pixels, (size, size))  # what explain_frame occludes: the frame at the model's input size
    copies = np.concatenate([work[None], occluded_copies(work, DEFAULT_GRID)])
    png = explain_frame(predictor, frame)[1]
    runs = [copies[i : i + FRAME_BATCH] for i in range(0, len(copies), FRAME_BATCH)]  # as explain_frame sends them
    timings = interleaved(
        {"picture": lambda: explain_frame(predictor, frame), "runs": lambda: [predictor.probabilities(r) for r in runs]}, repeats
    )
    return {
        "model": f"{network_words(network, 2)} at {size} px",
        "picture": timings["picture"],
        "runs": timings["runs"],
        "copies": len(copies),
        "png_kb": len(png) / 1000,
    }


def markdown(rows: list[dict], frame: str, repeats: int, command: str, machine_line: str) -> str:
    lines = [
        SECTION,
        "",
        *header(command, machine_line),
        f"- frame: `{frame}`; {repeats} interleaved rounds after one warm-up, medians (p95 in brackets)",
        "",
        f"| model | picture (map + PNG), s | the model alone (image + occluded copies, runs of {FRAME_BATCH}), s | images | PNG, kB |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['picture'].median_ms / 1000:.2f} ({r['picture'].p95_ms / 1000:.2f}) | "
        f"{r['runs'].median_ms / 1000:.2f} | {r['copies']} | {r['png_kb']:.0f} |"
        for r in rows
    ]
    lines += ["", f"Target: the picture within {TARGET_SECONDS:g} s of opening a row (median)."]
    lines += [
        f"- {r['model']}: {r['picture'].median_ms / 1000:.2f} s {verdict(r['picture'].median_ms / 1000 <= TARGET_SECONDS)}" for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default=None, help="DICOM file whose first frame is explained")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args(argv)
    path = args.file or get_testdata_file("RG1_UNCI.dcm") or get_testdata_file("CT_small.dcm")
    repeats, where = (2 if args.quick else args.repeats), machine()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(path, network, size, repeats, Path(tmp)) for network, size in MODELS]
    publish(markdown(rows, Path(path).name, repeats, command_line(), where))


if __name__ == "__main__":
    main()
