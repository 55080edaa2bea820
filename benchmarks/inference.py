"""Inference latency: (a) DICOM file -> calibrated score through medtriage.serve, (b) a raw ORT session
on the already-decoded tensor, (c) PyTorch eager on the same tensor; plus throughput at batch 1 and 16.

    python -m benchmarks.inference [--network resnet18] [--size 224] [--repeats 30] [--threads N] [--quick] [FILE.dcm ...]

Without files it times pydicom's CT_small.dcm (128x128 CT) and, when pydicom-data is installed,
RG1_UNCI.dcm (a 1955x1841 CR). The network is built untrained (latency does not depend on the
weights) and exported through the real export path, so (a) and (b) run exactly the graph a package
ships. The `## Inference` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from pydicom.data import get_testdata_file

from benchmarks.common import (
    BENCHMARKS_DOC,
    command_line,
    header,
    interleaved,
    machine,
    publish,
    verdict,
)
from medtriage.config.schema import ExportConfig
from medtriage.evaluation.predictions import Predictions
from medtriage.export.onnx import CalibratedNet
from medtriage.export.run import export_model
from medtriage.io.dicom import read_dicom
from medtriage.model.averaging import averaged
from medtriage.model.networks import PreprocessSpec, build_triage_net
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, to_model_channels

SECTION = "## Inference"
WARMUP = 3
SERVE_OVERHEAD = 1.15  # target: a/b at most this (serving adds little beyond the model)
ORT_SPEEDUP = 2.0  # target: c/b at least this (ORT at least twice as fast as PyTorch eager)


def build_package(models_dir: Path, network: str, size: int, stem_stride: int, tta: str = "none") -> tuple[Path, CalibratedNet]:
    """An untrained network exported as a real package (synthetic validation scores), averaged over the `tta` views."""
    torch.manual_seed(0)
    net = averaged(build_triage_net(network, 2, PreprocessSpec(size=size, in_channels=1), stem_stride).eval(), tta)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    logits = np.stack([np.zeros(200), rng.normal(labels * 1.5, 1.0)], axis=1)
    cfg = ExportConfig(models_dir=str(models_dir), name=f"bench-{network}", parity_images=2, log_to_mlflow=False, register_model=False)
    images = [rng.random((1, size + 16, size + 16), dtype=np.float32) for _ in range(2)]
    result = export_model(
        net,
        cfg,
        label_names=["normal", "pneumonia"],
        val=Predictions(logits, labels, np.array(["bench"] * 200)),
        parity_images=images,
        network={"name": network, "stem_stride": stem_stride},
    )
    return result.package_dir, CalibratedNet(net, result.meta["calibration"]["temperature"]).eval()


def benchmark_file(path: str, predictor: Predictor, model: CalibratedNet, repeats: int) -> dict:
    pixels = to_model_channels(read_dicom(path).pixels[:1], predictor.package.channels)
    tensor = torch.from_numpy(pixels)
    session = predictor.session  # (b) is the very session (a) uses, fed the decoded tensor directly
    # (a) and (b) interleaved; (c) on its own: torch's busy worker threads would slow whatever runs next.
    timings = interleaved(
        {
            "serve": lambda: predictor.score_file(path),
            "ort": lambda: session.run(None, {"pixels": pixels}),
            "decode": lambda: read_dicom(path),
        },
        repeats,
        warmup=WARMUP,
    )
    with torch.inference_mode():
        timings.update(interleaved({"torch": lambda: model(tensor)}, repeats, warmup=WARMUP))
    return {
        "file": Path(path).name,
        "shape": "x".join(map(str, pixels.shape[-2:])),
        **{name: (t.median_ms, t.p95_ms) for name, t in timings.items()},
    }


def counted(call, images: int):
    """`call` as the timer wants it: it reports how many images one call handled."""

    def run() -> int:
        call()
        return images

    return run


def throughput(session: ort.InferenceSession, model: CalibratedNet, pixels: np.ndarray, batch: int, repeats: int) -> dict:
    stacked = np.repeat(pixels[:1], batch, axis=0)
    tensor = torch.from_numpy(stacked)
    timings = interleaved({"ort": counted(lambda: session.run(None, {"pixels": stacked}), batch)}, repeats, warmup=WARMUP)
    with torch.inference_mode():
        timings.update(interleaved({"torch": counted(lambda: model(tensor), batch)}, repeats, warmup=WARMUP))
    return {"batch": batch, "ort_images_s": timings["ort"].rate, "torch_images_s": timings["torch"].rate}


def run_benchmark(
    files: list[str], network: str = "resnet18", size: int = 224, repeats: int = 30, threads: int | None = None, stem_stride: int = 2
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        package_dir, model = build_package(Path(tmp), network, size, stem_stride)
        predictor = Predictor(load_package(package_dir), threads=threads)
        rows = [benchmark_file(f, predictor, model, repeats) for f in files]
        pixels = to_model_channels(read_dicom(files[0]).pixels[:1], 1)
        batches = [throughput(predictor.session, model, pixels, b, max(5, repeats // 3)) for b in (1, 16)]
    return {
        "network": network,
        "stem_stride": stem_stride,
        "size": size,
        "repeats": repeats,
        "threads": threads or os.cpu_count(),
        "rows": rows,
        "batches": batches,
        "provider": predictor.provider,
        "versions": f"onnxruntime {ort.__version__}, torch {torch.__version__}",
    }


def network_words(network: str, stem_stride: int) -> str:
    """What was built, in the words that hold for it: only the ResNets take the stem stride."""
    if network.startswith("resnet"):
        stem = "stride-2 7x7 stem" if stem_stride > 1 else "stride-1 3x3 stem, no max-pool"
        return f"{network} ({stem})"
    return network


def markdown(result: dict, command: str, machine_line: str) -> str:
    """The `## Inference` section of docs/benchmarks.md."""
    size = result["size"]
    lines = [
        SECTION,
        "",
        *header(command, f"{machine_line}; {result['versions']}"),
        f"- model: untrained {network_words(result['network'], result['stem_stride'])} at {size}x{size}, 1 channel, exported "
        f"through medtriage.export; ORT provider {result['provider']}, {result['threads']} thread(s); {result['repeats']} timed "
        f"runs after {WARMUP} warm-up runs, (a) and (b) interleaved",
        "",
        "Latency per image (ms, median / p95). (a) DICOM file -> calibrated score through `medtriage.serve` "
        "(decode with medtriage.io + ORT); (b) raw ORT session on the already-decoded tensor; (c) PyTorch eager on the "
        "same tensor.",
        "",
        "| file | decoded size | (a) serve | (b) ORT | (c) PyTorch | a/b | c/b | decode alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        (a, a95), (b, b95), (c, c95) = row["serve"], row["ort"], row["torch"]
        lines.append(
            f"| {row['file']} | {row['shape']} | {a:.1f} / {a95:.1f} | {b:.1f} / {b95:.1f} | {c:.1f} / {c95:.1f} | "
            f"{a / b:.2f} | {c / b:.2f} | {row['decode'][0]:.1f} |"
        )
    lines += [
        "",
        f"Targets: a/b ≤ {SERVE_OVERHEAD} (serving adds little beyond the model); c/b ≥ {ORT_SPEEDUP:g} "
        "(ORT at least twice as fast as PyTorch eager).",
    ]
    for row in result["rows"]:
        overhead, speedup = row["serve"][0] / row["ort"][0], row["torch"][0] / row["ort"][0]
        lines.append(
            f"- {row['file']}: a/b {overhead:.2f} {verdict(overhead <= SERVE_OVERHEAD)}; "
            f"c/b {speedup:.2f} {verdict(speedup >= ORT_SPEEDUP)}"
        )
    lines += [
        "",
        f"Throughput on {result['rows'][0]['file']} (images/s, median over batches):",
        "",
        "| batch | ORT | PyTorch eager |",
        "|---|---:|---:|",
    ]
    lines += [f"| {t['batch']} | {t['ort_images_s']:.1f} | {t['torch_images_s']:.1f} |" for t in result["batches"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="DICOM files to time (default: pydicom test files)")
    parser.add_argument("--network", default="resnet18")
    parser.add_argument("--stem-stride", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="10 timed runs")
    parser.add_argument("--threads", type=int, default=None, help="ORT and torch threads (default: all cores)")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_DOC, help="markdown file whose '## Inference' section is rewritten")
    args = parser.parse_args(argv)
    files = args.files or [f for f in (get_testdata_file("CT_small.dcm"), get_testdata_file("RG1_UNCI.dcm")) if f]
    where = machine()
    result = run_benchmark(files, args.network, args.size, 10 if args.quick else args.repeats, args.threads, args.stem_stride)
    publish(markdown(result, command_line(), where), args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
