"""INT8 against fp32 on the served path: test AUC and ECE, and latency at batch 1 and 16.

    python -m benchmarks.int8 [--package models/pneumoniamnist-r10-28] [--npz data/samples/pneumoniamnist_28.npz]
                              [--int8 DIR] [--repeats 100] [--threads N]

The int8 package is made by `medtriage quantize` (calibrated on the npz's val split) unless --int8
names one. Accuracy: every test image through each package's Predictor. Latency: Predictor calls
(decoded pixels -> calibrated probabilities) at batch 1 and 16, and one DICOM file scored end to end,
fp32 and int8 interleaved. Quantisation first rewrites the float graph (padded convolution taps trimmed,
basic optimisations); that graph, still fp32, is timed too, so the gain of int8 itself is on record.
Targets: AUC drop <= 0.005; int8 >= 1.8x as fast at batch 1 and 16, against the fp32 package and
against its prepared fp32 graph.
The `## INT8` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydicom.data import get_testdata_file

from benchmarks.common import (
    BENCHMARKS_DOC,
    ROOT,
    command_line,
    header,
    interleaved,
    machine,
    publish,
    verdict,
)
from medtriage.evaluation.calibration import expected_calibration_error
from medtriage.evaluation.metrics import auc
from medtriage.export.package import write_package
from medtriage.export.quantize import prepare_graph, quantize_package, served_probabilities
from medtriage.serve.npz import read_npz_split
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor

SECTION = "## INT8"
PREPARED = "fp32 prepared"
AUC_DROP_TARGET, SPEEDUP_TARGET = 0.005, 1.8
DICOM_FILE = "CT_small.dcm"


def accuracy(predictor: Predictor, images: list[np.ndarray], labels: np.ndarray, bins: int) -> dict:
    probs = served_probabilities(predictor, images)
    return {"auc": auc(labels, probs), "ece": expected_calibration_error(probs, labels, bins)}


def latencies(predictors: dict[str, Predictor], pixels: np.ndarray, repeats: int) -> dict:
    """{(what, precision): Timing}: batch 1, batch 16 and one DICOM file, every call taking turns."""
    dicom = get_testdata_file(DICOM_FILE)
    calls = {}
    for precision, predictor in predictors.items():
        calls[("batch 1", precision)] = lambda p=predictor: p.probabilities(pixels[:1])
        calls[("batch 16", precision)] = lambda p=predictor: p.probabilities(pixels[:16])
        calls[(f"{DICOM_FILE} (decode + score)", precision)] = lambda p=predictor: p.score_file(dicom)
    return interleaved(calls, repeats, warmup=3)


def prepared_package(fp32_package, tmp: Path):
    """The fp32 package with the graph quantisation starts from (still float): what int8 adds beyond that rewrite."""
    graph = tmp / "prepared.onnx"
    prepare_graph(fp32_package.onnx_path, graph)
    write_package(tmp / "fp32-prepared", graph, fp32_package.meta)
    return load_package(tmp / "fp32-prepared")


def run(package_dir: Path, npz: Path, int8_dir: Path | None, repeats: int, threads: int | None) -> dict:
    fp32_package = load_package(package_dir)
    with tempfile.TemporaryDirectory() as tmp:
        int8_dir = int8_dir or quantize_package(package_dir, npz, Path(tmp) / f"{package_dir.name}-int8")
        predictors = {
            "fp32": Predictor(
                fp32_package, allow_out_of_scope=True, threads=threads
            ),  # the timed DICOM file may lie outside the model's scope
            PREPARED: Predictor(prepared_package(fp32_package, Path(tmp)), allow_out_of_scope=True, threads=threads),
            "int8": Predictor(load_package(int8_dir), allow_out_of_scope=True, threads=threads),
        }
        pixels, labels = read_npz_split(npz, "test")
        images = [p[None] for p in pixels]
        bins = int(fp32_package.meta["calibration"].get("bins", 15))
        scores = {name: accuracy(p, images, labels, bins) for name, p in predictors.items()}
        timings = latencies(predictors, pixels, repeats)
        quantization = predictors["int8"].package.meta["quantization"]
    return {
        "package": fp32_package.describe(),
        "test_images": len(labels),
        "scores": scores,
        "timings": timings,
        "parity": quantization["parity"],
        "calibration": quantization["calibration"],
        "nodes": quantization["quantized_nodes"],
        "trimmed": quantization.get("trimmed_convs", []),
        "method": quantization["method"],
        "threads": threads,
        "repeats": repeats,
    }


def markdown(result: dict, command: str, machine_line: str) -> str:
    scores, timings = result["scores"], result["timings"]
    s32, s8 = scores["fp32"], scores["int8"]
    drop = s32["auc"] - s8["auc"]
    trimmed = ", ".join(result["trimmed"]) or "none"
    lines = [
        SECTION,
        "",
        *header(command, f"{machine_line}, onnxruntime {ort.__version__}"),
        (
            f"- model: {result['package']}; int8 by `medtriage quantize`: {result['method']}, {result['nodes']} Conv/Gemm nodes "
            f"with int8 weights, residual Adds, ReLUs and pooling int8 too, calibrated on {result['calibration']}; "
            f"{result['test_images']} test images through each package's Predictor"
        ),
        (
            f"- {PREPARED}: the float graph quantisation starts from (shape inference, taps that read only padding trimmed "
            f"from {trimmed}, basic optimisations), timed to show what int8 itself adds"
        ),
        (f"- timing: {result['repeats']} interleaved rounds after 3 warm-up rounds, ORT threads {result['threads'] or 'all cores'}"),
        "",
        f"| measure | fp32 | {PREPARED} | int8 | int8 vs fp32 | int8 vs {PREPARED} | target | verdict |",
        "|---|---|---|---|---|---|---|---|",
        (
            f"| test AUC | {s32['auc']:.4f} | {scores[PREPARED]['auc']:.4f} | {s8['auc']:.4f} | {-drop:+.4f} | "
            f"{s8['auc'] - scores[PREPARED]['auc']:+.4f} | drop ≤ {AUC_DROP_TARGET} | {verdict(drop <= AUC_DROP_TARGET)} |"
        ),
        (
            f"| test ECE | {s32['ece']:.4f} | {scores[PREPARED]['ece']:.4f} | {s8['ece']:.4f} | {s8['ece'] - s32['ece']:+.4f} | "
            f"{s8['ece'] - scores[PREPARED]['ece']:+.4f} | — | — |"
        ),
    ]
    speedups = {}
    for what in dict.fromkeys(w for w, _ in timings):
        t32, tp, t8 = timings[(what, "fp32")], timings[(what, PREPARED)], timings[(what, "int8")]
        speedups[what] = (t32.median_ms / t8.median_ms, tp.median_ms / t8.median_ms)
        target = what.startswith("batch")
        lines.append(
            f"| latency, {what} (median / p95 ms) | {t32.median_ms:.2f} / {t32.p95_ms:.2f} | {tp.median_ms:.2f} / {tp.p95_ms:.2f} | "
            f"{t8.median_ms:.2f} / {t8.p95_ms:.2f} | {speedups[what][0]:.2f}x | {speedups[what][1]:.2f}x | "
            + (f"≥ {SPEEDUP_TARGET}x (both) | {verdict(min(speedups[what]) >= SPEEDUP_TARGET)} |" if target else "— | — |")
        )
    parity = result["parity"]
    met = drop <= AUC_DROP_TARGET and all(min(v) >= SPEEDUP_TARGET for k, v in speedups.items() if k.startswith("batch"))
    lines += [
        "",
        (
            f"Parity on the calibration images (recorded in the int8 package): max |Δp| {parity['max_abs_diff']:.4f}, "
            f"mean {parity['mean_abs_diff']:.4f}, {parity['priority_changes']} of {parity['images']} priorities changed."
        ),
        "",
        (
            "Both targets are met: int8 packages can be offered where speed matters; fp32 stays what export writes."
            if met
            else "INT8 misses at least one target here, so **fp32 stays the default**: export writes fp32 and an int8 package "
            "exists only where someone runs `medtriage quantize` and checks its parity report."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "pneumoniamnist-r10-28", help="the fp32 package")
    parser.add_argument("--npz", type=Path, default=ROOT / "data" / "samples" / "pneumoniamnist_28.npz")
    parser.add_argument("--int8", type=Path, default=None, help="an int8 package of --package (default: quantise it now)")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_DOC)
    args = parser.parse_args(argv)
    result = run(args.package, args.npz, args.int8, args.repeats, args.threads)
    publish(markdown(result, command_line(), machine()), args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
