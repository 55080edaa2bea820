"""Inference latency: (a) DICOM file -> calibrated score through medtriage.serve, (b) a raw ORT session
on the already-decoded tensor, (c) PyTorch eager on the same tensor; plus throughput at batch 1 and 16.

The network is built untrained (latency does not depend on the weights) and exported through the
real export path, so (a) and (b) run exactly the graph a package ships.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from medtriage.benchmarking import machine
from medtriage.export.config import ExportConfig
from medtriage.export.onnx import CalibratedNet
from medtriage.export.run import SplitScores, export_model
from medtriage.io.dicom import read_dicom
from medtriage.networks import PreprocessSpec, build_triage_net
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, to_model_channels

SECTION = "## Inference"


@dataclass
class Timing:
    median_ms: float
    p95_ms: float


def time_calls(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, Timing]:
    """Time each call `repeats` times, interleaved, so a busy machine slows all of them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: Timing(statistics.median(v), float(np.percentile(v, 95))) for name, v in samples.items()}


def build_package(models_dir: Path, network: str, size: int) -> tuple[Path, CalibratedNet]:
    """An untrained network exported as a real package (synthetic validation scores)."""
    torch.manual_seed(0)
    net = build_triage_net(network, 2, PreprocessSpec(size=size, in_channels=1)).eval()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    logits = np.stack([np.zeros(200), rng.normal(labels * 1.5, 1.0)], axis=1)
    cfg = ExportConfig(models_dir=str(models_dir), name=f"bench-{network}", parity_images=2, log_to_mlflow=False, register_model=False)
    images = [rng.random((1, size + 16, size + 16), dtype=np.float32) for _ in range(2)]
    result = export_model(net, cfg, label_names=["normal", "pneumonia"], val=SplitScores(logits, labels, np.array(["bench"] * 200)),
                          parity_images=images, network={"name": network})
    return result.package_dir, CalibratedNet(net, result.meta["calibration"]["temperature"]).eval()


def benchmark_file(path: str, predictor: Predictor, session: ort.InferenceSession, model: CalibratedNet, repeats: int) -> dict:
    pixels = to_model_channels(read_dicom(path).pixels[:1], predictor.package.channels)
    tensor = torch.from_numpy(pixels)
    # (a) and (b) interleaved; (c) on its own: torch's busy worker threads would slow whatever runs next.
    timings = time_calls({"serve": lambda: predictor.score_file(path), "ort": lambda: session.run(None, {"pixels": pixels}),
                          "decode": lambda: read_dicom(path)}, repeats)
    with torch.inference_mode():
        timings.update(time_calls({"torch": lambda: model(tensor)}, repeats))
    return {"file": Path(path).name, "shape": "x".join(map(str, pixels.shape[-2:])), **timings}


def throughput(session: ort.InferenceSession, model: CalibratedNet, pixels: np.ndarray, batch: int, repeats: int) -> dict:
    stacked = np.repeat(pixels[:1], batch, axis=0)
    tensor = torch.from_numpy(stacked)
    timings = time_calls({"ort": lambda: session.run(None, {"pixels": stacked})}, repeats)
    with torch.inference_mode():
        timings.update(time_calls({"torch": lambda: model(tensor)}, repeats))
    return {"batch": batch, "ort_images_s": batch * 1000 / timings["ort"].median_ms, "torch_images_s": batch * 1000 / timings["torch"].median_ms}


def run_benchmark(files: list[str], network: str = "resnet18", size: int = 224, repeats: int = 30, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine skews figures
    with tempfile.TemporaryDirectory() as tmp:
        package_dir, model = build_package(Path(tmp), network, size)
        predictor = Predictor(load_package(package_dir), threads=threads)
        session = predictor.session  # (b) is the very session (a) uses, fed the decoded tensor directly
        rows = [benchmark_file(f, predictor, session, model, repeats) for f in files]
        pixels = to_model_channels(read_dicom(files[0]).pixels[:1], 1)
        batches = [throughput(session, model, pixels, b, max(5, repeats // 3)) for b in (1, 16)]
        provider = predictor.provider
    return {"network": network, "size": size, "repeats": repeats, "threads": threads or os.cpu_count(),
            "rows": rows, "batches": batches, "provider": provider, "machine": f"{machine()}, onnxruntime {ort.__version__}, torch {torch.__version__}", "load": load}


def markdown(result: dict, command: str) -> str:
    """The `## Inference` section of docs/benchmarks.md."""
    lines = [
        SECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {dt.date.today().isoformat()}; model: untrained {result['network']} (stride-2 stem) at {result['size']}x{result['size']}, "
        f"1 channel, exported through medtriage.export; ORT provider {result['provider']}, {result['threads']} thread(s); "
        f"{result['repeats']} timed runs after 3 warm-up runs, (a) and (b) interleaved"
        + (f"; 1-min load average at start {result['load']:.1f}." if result.get("load") is not None else "."), "",
        "Latency per image (ms, median / p95). (a) DICOM file -> calibrated score through `medtriage.serve` "
        "(decode with medtriage.io + ORT); (b) raw ORT session on the already-decoded tensor; (c) PyTorch eager on the same tensor.", "",
        "| file | decoded size | (a) serve | (b) ORT | (c) PyTorch | a/b | c/b | decode alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        a, b, c = row["serve"], row["ort"], row["torch"]
        lines.append(f"| {row['file']} | {row['shape']} | {a.median_ms:.1f} / {a.p95_ms:.1f} | {b.median_ms:.1f} / {b.p95_ms:.1f} | "
                     f"{c.median_ms:.1f} / {c.p95_ms:.1f} | {a.median_ms / b.median_ms:.2f} | {c.median_ms / b.median_ms:.2f} | "
                     f"{row['decode'].median_ms:.1f} |")
    lines += ["", "Targets: a/b <= 1.15 (serving adds little beyond the model); c/b >= 2 (ORT at least twice as fast as PyTorch eager).", "",
              f"Throughput on {result['rows'][0]['file']} (images/s, median batch time):", "",
              "| batch | ORT | PyTorch eager |", "|---|---|---|"]
    lines += [f"| {t['batch']} | {t['ort_images_s']:.1f} | {t['torch_images_s']:.1f} |" for t in result["batches"]]
    return "\n".join(lines) + "\n"
