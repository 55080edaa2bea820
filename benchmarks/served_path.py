"""Where the time of one served score goes: decode, ONNX Runtime, and the serve path around them.

    python -m benchmarks.served_path [--package DIR] [--repeats 60] [--budget 12] [--threads N] [FILE.dcm ...]

For each file: the header and pixel bytes alone (`pydicom.dcmread`), decode alone (`medtriage.io.read_dicom`),
ORT alone on the decoded tensor, a bare loop doing both, and `Predictor.score_file` (decode + channels + scope
+ ORT + result) as served; with the served session; with ORT's default of worker threads that spin after
each run (not for JPEG 2000 files, whose decode dwarfs it); and, for JPEG 2000 files, with the opt-in
reduced-resolution decode (`Predictor(reduced_j2k=True)`: the bare loop still decodes in full, so that row
shows what the option buys, not overhead).
Target: serve / bare loop <= 1.0 with the served setting.
Without --package it uses models/pneumoniamnist-r10-28, or exports an untrained ResNet-18 at 224.
Without files: pydicom's CT_small.dcm and, with pydicom-data, RG1_UNCI.dcm (1955x1841 CR) and RG1_J2KR.dcm
(the same CR, JPEG 2000 lossless). Slow calls get fewer rounds: at most --budget seconds per file and setting.
The `## Served path` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import pydicom
from pydicom.data import get_testdata_file

from benchmarks.common import (
    BENCHMARKS_DOC,
    ROOT,
    Timing,
    command_line,
    header,
    interleaved,
    machine,
    publish,
    verdict,
)
from medtriage.io.dicom import read_dicom
from medtriage.io.j2k_reduced import J2K_SYNTAXES
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, to_model_channels

SECTION = "## Served path"
DEFAULT_PACKAGE = ROOT / "models" / "pneumoniamnist-r10-28"
DEFAULT_FILES = ("CT_small.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm")
RATIO_TARGET = 1.0
BLOCKS = 5
CALLS = ("header", "decode", "ort", "bare", "serve")


def spinning_predictor(package, threads: int | None) -> Predictor:
    """A Predictor whose ORT session keeps ORT's default: worker threads spin after each run."""
    predictor = Predictor(package, threads=threads, allow_out_of_scope=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    predictor.session = ort.InferenceSession(str(package.onnx_path), options, providers=["CPUExecutionProvider"])
    return predictor


def is_j2k(path: str) -> bool:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID in J2K_SYNTAXES


def measure(path: str, predictors: dict[str, Predictor], repeats: int, budget_s: float) -> dict:
    """{(setting, call): Timing} for one file. Within a block the calls of one setting take turns; the settings
    alternate block by block (a spinning pool would steal the cores of calls made right after it)."""
    channels = next(iter(predictors.values())).package.channels
    pixels = to_model_channels(read_dicom(path).pixels[:1], channels)
    merged: dict[tuple[str, str], Timing] = {}
    j2k = is_j2k(path)  # JPEG 2000: the reduced setting applies; spinning threads hardly matter next to its decode
    settings = {name: p for name, p in predictors.items() if (p.min_decoded_side is not None) == j2k or name == "served"}
    calls_of = {}
    for setting, predictor in settings.items():
        session, name = predictor.session, predictor.input_name
        calls_of[setting] = {
            "header": lambda: pydicom.dcmread(path),
            "decode": lambda: read_dicom(path),
            "ort": lambda s=session, n=name: s.run(None, {n: pixels}),
            "bare": lambda s=session, n=name: s.run(None, {n: to_model_channels(read_dicom(path).pixels, channels)}),
            "serve": lambda p=predictor: p.score_file(path),
        }
    rounds = min(repeats, max(BLOCKS * 2, int(budget_s / round_seconds(calls_of))))
    for _ in range(BLOCKS):
        for setting, calls in calls_of.items():
            for call, timing in interleaved(calls, max(1, rounds // BLOCKS), warmup=1).items():
                merged.setdefault((setting, call), Timing()).seconds.extend(timing.seconds)
    shape = "x".join(map(str, pixels.shape[-2:]))
    return {"file": Path(path).name, "shape": shape, "settings": list(settings), "rounds": rounds, "timings": merged}


def round_seconds(calls_of: dict) -> float:
    """Seconds one round of every call of one setting takes (after a first, warming call)."""
    calls = next(iter(calls_of.values()))
    for call in calls.values():
        call()
    start = time.perf_counter()
    for call in calls.values():
        call()
    return time.perf_counter() - start


SETTING_WORDS = {
    "served": "served = the session as `medtriage serve` creates it (ORT worker threads do not spin)",
    "spinning": "spinning = ORT's default, worker threads spin after each run",
    "reduced j2k": (
        "reduced j2k = served, with `Predictor(reduced_j2k=True)` (opt-in): JPEG 2000 decoded at the coarsest wavelet level "
        "still 8x the model's input size; its bare loop decodes in full, so its ratio is what the option buys"
    ),
}


def markdown(rows: list[dict], package: str, args: argparse.Namespace, machine_line: str) -> str:
    lines = [
        SECTION,
        "",
        *header(command_line(), f"{machine_line}, onnxruntime {ort.__version__}"),
        (
            f"- model: {package}; ORT threads {args.threads or 'all cores'}; up to {args.repeats} rounds per call after warm-up "
            f"(fewer for slow files: {args.budget:g} s per file and setting), in {BLOCKS} blocks per setting, settings alternating; "
            "medians in ms (p95 of serve in brackets)"
        ),
        (
            "- calls: header = `pydicom.dcmread` alone (header and pixel bytes); decode = `read_dicom` alone; ORT = the session "
            "alone on the decoded tensor; bare = a plain loop doing read_dicom then the session; serve = `Predictor.score_file` "
            "(decode, channels, scope, ORT, result)"
        ),
        "- settings: " + "; ".join(SETTING_WORDS[s] for s in dict.fromkeys(s for row in rows for s in row["settings"])),
        "",
        "| file | decoded | setting | rounds | header | decode | ORT | bare loop | serve | serve / bare | serve − decode − ORT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for row in rows:
        for setting in row["settings"]:
            t = {call: row["timings"][(setting, call)] for call in CALLS}
            ratio = t["serve"].median_ms / t["bare"].median_ms
            if setting == "served":
                verdicts.append(ratio <= RATIO_TARGET)
            rest = t["serve"].median_ms - t["decode"].median_ms - t["ort"].median_ms
            lines.append(
                f"| {row['file']} | {row['shape']} | {setting} | {row['rounds']} | {t['header'].median_ms:.2f} | "
                f"{t['decode'].median_ms:.2f} | {t['ort'].median_ms:.2f} | {t['bare'].median_ms:.2f} | "
                f"{t['serve'].median_ms:.2f} ({t['serve'].p95_ms:.2f}) | {ratio:.2f} | {rest:+.2f} |"
            )
    lines += [
        "",
        (
            f"Target serve / bare loop ≤ {RATIO_TARGET} with the served setting: {verdict(all(verdicts))} "
            f"({sum(verdicts)} of {len(verdicts)} files). Decode − header is the pixel work (decompression, unused bits, "
            "rescale, window, inversion); serve − decode − ORT is what serving adds, as a difference of medians each timed "
            "in its own interleaved loop (it can come out negative)."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*")
    parser.add_argument("--package", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--budget", type=float, default=12.0, help="seconds of timed rounds per file and setting, at most")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_DOC)
    args = parser.parse_args(argv)
    files = args.files or [f for f in map(get_testdata_file, DEFAULT_FILES) if f]
    machine_line = machine()
    with tempfile.TemporaryDirectory() as tmp:
        if args.package is None and not DEFAULT_PACKAGE.is_dir():
            from benchmarks.serve_load import build_package

            args.package = build_package(Path(tmp))
        package = load_package(args.package or DEFAULT_PACKAGE)
        predictors = {
            "served": Predictor(package, threads=args.threads, allow_out_of_scope=True),
            "spinning": spinning_predictor(package, args.threads),
            "reduced j2k": Predictor(package, threads=args.threads, allow_out_of_scope=True, reduced_j2k=True),
        }
        rows = [measure(f, predictors, args.repeats, args.budget) for f in files]
        publish(markdown(rows, package.describe(), args, machine_line), args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
