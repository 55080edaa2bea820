"""One ONNX graph = preprocessing + network + temperature + softmax, and its parity with PyTorch.

The graph takes decoded pixels (float32 `[batch, channels, H, W]` in [0, 1], all three sizes
dynamic) and returns calibrated class probabilities, so serving needs no torch and no resize code.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from medtriage.errors import ConfigError, PackageError
from medtriage.format import INPUT_AXES
from medtriage.format.onnx_header import graph_header
from medtriage.model.networks import TriageNet

INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
# The graph resizes with antialiasing, which ONNX's Resize has only from opset 18 on: the exporter writes 18 whatever
# lower opset it is asked for. The highest is the newest this onnx knows (it cannot check a graph of a newer one).
MIN_OPSET, MAX_OPSET = 18, onnx.defs.onnx_opset_version()
# What NaN or infinite network outputs mean, and what to do about them.
DIVERGED_HINT = "the training diverged (look for a NaN loss in the run's metrics): train again, e.g. with a lower trainer.lr"
log = logging.getLogger(__name__)
# The exporter's graph passes log every rewrite at INFO; a training run's log should show only ours.
for _chatty in ("onnx_ir", "onnxscript"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)
# It also warns, once per op, that torchvision's detection ops cannot be registered without torchvision: these nets
# use none of them, and the training install has no torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class CalibratedNet(nn.Module):
    """TriageNet logits / temperature -> softmax: the served model, as a torch module."""

    def __init__(self, net: TriageNet, temperature: float = 1.0):
        super().__init__()
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(pixels) / self.temperature, dim=-1)


def export_onnx(model: CalibratedNet, path: str | Path, opset: int = 18) -> dict:
    """Write `model` to `path` as ONNX with dynamic batch/height/width (dynamo exporter) and check it; returns what the
    written graph says of itself (graph_signature), for check_graph_agrees without reading the file again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    size = model.net.preprocess.spec.size
    # The example must differ from the training size: otherwise the resize branch would be traced out.
    example = torch.rand(2, model.net.preprocess.spec.in_channels, size + 7, size + 11)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own deprecation inside the exporter (pytree's LeafSpec), nothing a caller can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(getattr(model, "output_names", [OUTPUT_NAME])),
            dynamic_shapes={"pixels": dims},
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    graph = graph_signature(path)
    if graph["opset"] != opset:  # model.json would name an opset the graph does not have
        raise ConfigError(
            f"export.opset={opset} was asked for, but the exporter wrote opset {graph['opset']}",
            where="export.opset",
            hint=f"use export.opset={graph['opset']} (from {MIN_OPSET} to {MAX_OPSET})",
        )
    return graph


def graph_signature(path: str | Path) -> dict:
    """What the graph at `path` says of itself: its ONNX opset, the channels of its input and the width of its first
    output (None where the graph leaves them free), and the shapes of both (`input`, `output`: an int per fixed axis, a
    name per free one; None where it declares none). Read as serving reads it when it loads the package, so what the
    export checks is what serving will find."""
    header = graph_header(Path(path)) or {}
    shapes = {"input": header.get("input"), "output": header.get("output")}
    return {"opset": header.get("opset"), "channels": _fixed(shapes["input"], 1), "classes": _fixed(shapes["output"], 1), **shapes}


def _fixed(shape: list | None, axis: int) -> int | None:
    """The size of `axis` where `shape` fixes it; None where it is free or undeclared."""
    return shape[axis] if shape is not None and len(shape) > axis and isinstance(shape[axis], int) else None


def check_dynamic_axes(graph: dict, declared: dict, where: str | Path) -> None:
    """Each input axis that model.json's `input` (`declared`) calls dynamic is free in the graph (`graph`, its
    graph_signature), and so is the output's batch axis where the input's is: serving refuses a graph that fixes one,
    which would otherwise be found out only once the package is deployed."""
    dynamic = [axis for axis in INPUT_AXES if declared.get(axis) == "dynamic"]
    fixed = {f"input {axis}": _fixed(graph["input"], INPUT_AXES.index(axis)) for axis in dynamic}
    if "batch" in dynamic:
        fixed["output batch"] = _fixed(graph["output"], 0)
    fixed = {where_fixed: size for where_fixed, size in fixed.items() if size is not None}
    if fixed:
        axes = list(dict.fromkeys(key.rsplit(" ", 1)[1] for key in fixed))
        raise PackageError(
            f"model.json declares the {' and '.join(axes)} {'axis' if len(axes) == 1 else 'axes'} dynamic, but the graph "
            f"fixes {', '.join(f'{key} {size}' for key, size in fixed.items())}",
            where=where,
            hint="the network's forward pass treats that size as a constant (e.g. a reshape or view to a fixed shape): "
            "make it follow the input's shape and export again",
        )


def check_graph_agrees(graph: dict, meta: dict, where: str | Path) -> None:
    """model.json (to be written at `where`) describes the graph it ships with (`graph`, its graph_signature): its
    opset, its input's channels and its output's classes."""
    said = {"opset": meta["onnx"]["opset"], "channels": meta["input"]["channels"], "classes": meta["output"]["classes"]}
    differ = [f"{key} {said[key]} in model.json, {graph[key]} in the graph" for key in said if graph[key] not in (None, said[key])]
    if differ:
        raise PackageError(
            "model.json would not describe its graph: " + "; ".join(differ),
            where=where,
            hint="the network and the export's inputs disagree: export the checkpoint with the pool and config it was trained with",
        )


def onnx_session(path: str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(path: str | Path, model: CalibratedNet, images: Iterable[np.ndarray], where: str | Path | None = None) -> tuple[float, int]:
    """Max |p_onnx - p_torch| over `images` (each `[C, H, W]`, sizes may differ); returns (diff, count). Its refusals
    name `where` (the graph's place in its package), else `path`."""
    where = where or path
    session, model = onnx_session(path), model.eval().cpu()
    worst, count = 0.0, 0
    for image in images:
        batch = np.ascontiguousarray(image[None], dtype=np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch))
        expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()  # a ScoredNet also returns its OOD score
        served = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if not (np.isfinite(served).all() and np.isfinite(expected).all()):  # NaN would pass max() and the tolerance
            raise PackageError(
                f"the model returns NaN or infinite probabilities on validation image {count + 1}",
                where=where,
                hint=DIVERGED_HINT,
            )
        worst, count = max(worst, float(np.abs(served - expected).max())), count + 1
    if count == 0:
        raise PackageError(
            "no validation images for the parity check: the graph cannot be compared with the PyTorch model",
            where=where,
            hint="give the export validation images (parity_images); from a pool, its val split is empty: rebuild the pool with one",
        )
    return worst, count


def check_parity(diff: float, tolerance: float, where: str | Path) -> None:
    if diff > tolerance:
        raise PackageError(
            f"ONNX and PyTorch disagree: max |p_onnx - p_torch| = {diff:.2e} > tolerance {tolerance:.0e}",
            where=where,
            hint="an operator exported differently; try another opset (export.opset) and report the network name",
        )
    log.info("parity ONNX vs PyTorch: max abs diff %.2e (tolerance %.0e)", diff, tolerance)
